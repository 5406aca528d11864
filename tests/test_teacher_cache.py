"""Teacher logit cache: keys, reuse across runs without the teacher, equality with live top-k targets,
k, and detection of corrupt or partial entries. Tiny real teachers from conftest; no mocks."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snn_distill.cli import parse_train_args, train_main
from snn_distill.config import TrainConfig
from snn_distill.data import BlockBatcher, load_texts, tokenize_texts
from snn_distill.distill import teacher_targets, train
from snn_distill.losses import TeacherTargets, chunked_distill_loss
from snn_distill.teacher import load_teacher
from snn_distill.teacher_cache import (
    CachedTeacherTargets,
    TeacherLogitCache,
    cache_components,
    cache_key,
    teacher_fingerprint,
    topk_targets,
)

STUDENT = {"dim": 32, "depth": 1, "num_heads": 2}


def _blocks(tok, max_length=24):
    return tokenize_texts(load_texts("synthetic")[:40], tok, max_length, pack=True)


def _entry(tmp_path, teacher, blocks, k=8, temperature=1.0, name="t"):
    comps = cache_components(
        teacher_name=name,
        teacher_fingerprint="fp",
        revision=None,
        teacher_dtype="float32",
        tokenizer=teacher.tokenizer,
        vocab_size=teacher.vocab_size,
        dataset="synthetic",
        blocks=blocks,
        max_length=24,
        pack=True,
        temperature=temperature,
        k=k,
    )
    cache = TeacherLogitCache.open(tmp_path / "cache", comps, [len(b) for b in blocks])
    return CachedTeacherTargets(teacher, cache, blocks, temperature)


def _cfg(teacher_dir, out, cache, **kw):
    base = dict(
        teacher_model=str(teacher_dir),
        output_dir=str(out),
        num_steps=4,
        batch_size=4,
        lr=1e-2,
        log_interval=1,
        git_tracking=False,
        seed=3,
        teacher_cache=str(cache),
        teacher_cache_topk=16,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_cache_key_changes_with_each_component(tiny_teacher_dir, tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    blocks = _blocks(tiny_tokenizer)
    base = dict(
        teacher_name=str(tiny_teacher_dir),
        teacher_fingerprint=teacher_fingerprint(str(tiny_teacher_dir)),
        revision=None,
        teacher_dtype="float32",
        tokenizer=tiny_tokenizer,
        vocab_size=len(tiny_tokenizer),
        dataset="synthetic",
        blocks=blocks,
        max_length=24,
        pack=True,
        temperature=1.0,
        k=64,
    )
    # the same teacher's weights, changed: the folder's fingerprint changes
    changed = tmp_path / "changed"
    shutil.copytree(tiny_teacher_dir, changed)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        next(m.parameters()).add_(1e-3)
    m.save_pretrained(changed)
    other_tok = build_tokenizer_variant(tiny_tokenizer)
    other_blocks = [list(b) for b in blocks]
    other_blocks[3][5] = (other_blocks[3][5] + 1) % len(tiny_tokenizer)
    variants = {
        "teacher_name": "another/teacher",
        "teacher_fingerprint": teacher_fingerprint(str(changed)),
        "revision": "v2",
        "teacher_dtype": "bfloat16",
        "tokenizer": other_tok,
        "vocab_size": len(tiny_tokenizer) + 64,
        "dataset": "wikitext-2",
        "blocks": other_blocks,
        "max_length": 32,
        "pack": False,
        "temperature": 2.0,
        "k": 32,
    }
    assert teacher_fingerprint(str(changed)) != base["teacher_fingerprint"]
    assert teacher_fingerprint(str(tiny_gpt2_dir)) != base["teacher_fingerprint"]
    assert teacher_fingerprint(str(tiny_teacher_dir)) == base["teacher_fingerprint"]  # deterministic
    keys = {"base": cache_key(cache_components(**base))}
    for name, value in variants.items():
        keys[name] = cache_key(cache_components(**{**base, name: value}))
    assert len(set(keys.values())) == len(keys), keys
    assert cache_key(cache_components(**base)) == keys["base"]


def build_tokenizer_variant(tok):
    import copy

    other = copy.deepcopy(tok)
    other.add_tokens(["<extra-word>"])
    return other


def test_second_run_never_loads_the_teacher_and_trains_identically(tiny_teacher_dir, tmp_path):
    cache = tmp_path / "tcache"
    t1 = load_teacher(str(tiny_teacher_dir), load_model=False)
    assert t1.model is None
    run1 = train(_cfg(tiny_teacher_dir, tmp_path / "a", cache), STUDENT, teacher=t1, progress=False)
    assert t1.model is not None  # the first run needed the teacher: loaded lazily
    info1 = run1.metadata["training_config"]["teacher_cache"]
    assert info1["blocks_computed"] > 0 and info1["k"] == 16

    t2 = load_teacher(str(tiny_teacher_dir), load_model=False)
    run2 = train(_cfg(tiny_teacher_dir, tmp_path / "b", cache), STUDENT, teacher=t2, progress=False)
    assert t2.model is None  # weights never loaded: every target (training and evaluation) came from the cache
    info2 = run2.metadata["training_config"]["teacher_cache"]
    assert info2["blocks_computed"] == 0 and info2["blocks_read"] > 0
    assert not info2["teacher_model_loaded"]
    assert [h["loss"] for h in run1.history] == [h["loss"] for h in run2.history]
    ev1, ev2 = run1.metadata["evaluation"], run2.metadata["evaluation"]
    assert ev1["kl_teacher_student"] == pytest.approx(ev2["kl_teacher_student"], rel=1e-6)
    assert ev1["teacher_perplexity"] == pytest.approx(ev2["teacher_perplexity"], rel=1e-6)

    # More steps than were cached: the teacher is loaded for the new blocks only.
    t3 = load_teacher(str(tiny_teacher_dir), load_model=False)
    run3 = train(_cfg(tiny_teacher_dir, tmp_path / "c", cache, num_steps=12), STUDENT, teacher=t3, progress=False)
    info3 = run3.metadata["training_config"]["teacher_cache"]
    assert t3.model is not None and 0 < info3["blocks_computed"] < info3["num_blocks"]
    assert info3["blocks_read"] > 0


def test_cli_flags_and_second_run_without_teacher(tiny_teacher_dir, tmp_path, capsys):
    args = parse_train_args(
        ["--teacher-model", str(tiny_teacher_dir), "--teacher-cache", str(tmp_path / "c"), "--teacher-cache-topk", "5"]
    )
    assert args.teacher_cache == str(tmp_path / "c") and args.teacher_cache_topk == 5
    common = [
        "--teacher-model",
        str(tiny_teacher_dir),
        "--teacher-cache",
        str(tmp_path / "c"),
        "--teacher-cache-topk",
        "5",
        "--num-steps",
        "3",
        "--batch-size",
        "2",
        "--student-dim",
        "32",
        "--student-heads",
        "4",
        "--quiet",
        "--no-git-tracking",
    ]
    metas = []
    for d in ("a", "b"):
        assert train_main([*common, "--output-dir", str(tmp_path / d)]) == 0
        metas.append(json.loads((tmp_path / d / "metadata.json").read_text()))
    capsys.readouterr()
    first, second = (m["training_config"]["teacher_cache"] for m in metas)
    assert first["k"] == second["k"] == 5
    assert first["teacher_model_loaded"] and first["blocks_computed"] > 0
    assert not second["teacher_model_loaded"] and second["blocks_computed"] == 0
    entry = next(p for p in (tmp_path / "c").iterdir() if p.is_dir() and not p.name.startswith("."))
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["k"] == 5
    assert (entry / "indices.i32").stat().st_size == meta["num_tokens"] * 5 * 4


@pytest.mark.parametrize("k", [1, 7, 10_000])
def test_cached_targets_equal_live_topk_and_give_the_same_loss(tiny_teacher_dir, tmp_path, k):
    teacher = load_teacher(str(tiny_teacher_dir))
    blocks = _blocks(teacher.tokenizer)
    src = _entry(tmp_path, teacher, blocks, k=k, temperature=1.5)
    kk = min(k, teacher.vocab_size)
    assert src.cache.k == kk
    batcher = BlockBatcher(blocks, 5, teacher.tokenizer.pad_token_id, seed=1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(teacher.vocab_size, 16, generator=g) * 0.3
    for _ in range(3):
        ids, mask = batcher.next_batch()
        block_ids = batcher.last_indices
        live = topk_targets(teacher_targets(teacher, ids, mask, 1.5).logprobs, k)
        cached = src(ids, mask, block_ids)  # first: computed and written; later passes: read back
        again = src(ids, mask, block_ids)  # always read from disk
        for t in (cached, again):
            assert torch.equal(t.indices, live.indices)
            assert torch.equal(t.logprobs, live.logprobs)
            assert torch.equal(t.tail, live.tail)
        n = live.logprobs.shape[0]
        h = torch.randn(n, 16, generator=g)
        losses = []
        for t in (live, cached):
            hh = h.clone().requires_grad_()
            loss, _, _ = chunked_distill_loss(hh, w, t, torch.full((n,), 1.0 / n), temperature=1.5, chunk=7)
            loss.backward()
            losses.append((loss.detach(), hh.grad))
        assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])
    assert src.misses > 0


def test_tail_is_the_exact_remaining_mass_and_loss_bounds_full_kl(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    ids, mask = BlockBatcher(_blocks(teacher.tokenizer), 4, 0, seed=0).next_batch()
    full = teacher_targets(teacher, ids, mask, 1.0).logprobs.double()
    t = topk_targets(full.float(), 8)
    rest = full.exp().sum(-1) - t.logprobs.double().exp().sum(-1)
    assert torch.allclose(t.tail.double().exp(), rest, rtol=1e-5, atol=1e-9)
    # k = V: no tail left (clamped, finite)
    t_all = topk_targets(full.float(), full.shape[1])
    assert torch.isfinite(t_all.tail).all() and (t_all.tail <= -79).all()
    # (k+1)-bin KL never exceeds the full KL
    n = full.shape[0]
    h = torch.randn(n, 8, dtype=torch.float64)
    w = torch.randn(full.shape[1], 8, dtype=torch.float64)
    tw = torch.full((n,), 1.0 / n, dtype=torch.float64)
    kl_full = chunked_distill_loss(h, w, TeacherTargets(full), tw)[0]
    t64 = TeacherTargets(t.logprobs.double(), t.indices, t.tail.double())
    kl_top = chunked_distill_loss(h, w, t64, tw)[0]
    assert 0 <= kl_top <= kl_full + 1e-9


def test_evaluation_logits_reproduce_the_cached_distribution(tiny_teacher_dir, tmp_path):
    teacher = load_teacher(str(tiny_teacher_dir))
    blocks = _blocks(teacher.tokenizer)
    src = _entry(tmp_path, teacher, blocks, k=8)
    batcher = BlockBatcher(blocks, 3, teacher.tokenizer.pad_token_id, seed=0)
    ids, mask = batcher.next_batch()
    pseudo = F.log_softmax(src.logits(ids, mask), -1)
    real = teacher.logits(ids, mask).float()
    t = src(ids, mask, batcher.last_indices)
    sel = pseudo.reshape(-1, pseudo.shape[-1])[mask.reshape(-1).bool()]
    assert torch.allclose(sel.gather(1, t.indices), t.logprobs, atol=1e-5)
    assert torch.equal(real.argmax(-1)[mask.bool()], pseudo.argmax(-1)[mask.bool()])
    # a row that is no cached block falls back to the live teacher
    odd = ids.clone()
    odd[0, 0] = (odd[0, 0] + 1) % teacher.vocab_size
    live = F.log_softmax(teacher.logits(odd, mask).float(), -1)
    assert torch.allclose(F.log_softmax(src.logits(odd, mask), -1)[0], live[0], atol=1e-5)


def test_corrupt_and_partial_entries_are_detected_and_rebuilt(tiny_teacher_dir, tmp_path, caplog):
    teacher = load_teacher(str(tiny_teacher_dir))
    blocks = _blocks(teacher.tokenizer)
    batcher = BlockBatcher(blocks, 6, teacher.tokenizer.pad_token_id, seed=0)
    ids, mask = batcher.next_batch()
    bids = list(batcher.last_indices)
    src = _entry(tmp_path, teacher, blocks)
    ref = src(ids, mask, bids)
    path = src.cache.path
    assert src.cache.num_filled == len(set(bids))

    def fresh():
        return _entry(tmp_path, teacher, blocks)

    # intact: everything is read back, nothing computed
    s = fresh()
    assert s.cache.missing(bids) == []

    # partial: a crash before a block was marked filled -> only that block is recomputed
    filled = np.memmap(path / "filled.u8", dtype=np.uint8, mode="r+")
    filled[bids[0]] = 0
    filled.flush()
    del filled
    s = fresh()
    assert s.cache.missing(bids) == [bids[0]]
    out = s(ids, mask, bids)
    assert s.misses == 1 and torch.equal(out.logprobs, ref.logprobs)

    # corrupt data inside a filled block: caught by its checksum, recomputed
    lp = np.memmap(path / "logprobs.f32", dtype=np.float32, mode="r+")
    off = int(s.cache.offsets[bids[1]])
    lp[off * s.cache.k + 3] = 0.123
    lp.flush()
    del lp
    s = fresh()
    with caplog.at_level("WARNING"):
        assert s.cache.missing(bids) == [bids[1]]
    assert "checksum" in caplog.text
    assert torch.equal(s(ids, mask, bids).logprobs, ref.logprobs)

    # truncated file / unreadable meta.json: the entry is removed and rebuilt empty
    with open(path / "tail.f32", "r+b") as f:
        f.truncate(8)
    caplog.clear()
    with caplog.at_level("WARNING"):
        s = fresh()
    assert "rebuilding" in caplog.text and s.cache.num_filled == 0
    assert torch.equal(s(ids, mask, bids).logprobs, ref.logprobs)
    (path / "meta.json").write_text("{not json")
    s = fresh()
    assert s.cache.num_filled == 0 and s.cache.missing(bids) == list(dict.fromkeys(bids))
    # a different k is a different entry, not a clash
    s8, s4 = fresh(), _entry(tmp_path, teacher, blocks, k=4)
    assert s8.cache.path != s4.cache.path and s4.cache.k == 4


@pytest.mark.parametrize("k", [16, 10_000])  # 10_000 >= the tiny vocabulary: the whole distribution
def test_evaluation_with_the_cache_is_the_teacher_at_temperature_one(tiny_teacher_dir, tmp_path, k):
    """Distilled at T=2 from the cache, evaluation still measures the teacher at T=1 (as a live run does):
    exactly when k covers the vocabulary, and agreement exactly for any k."""
    from snn_distill.data import fixed_batches, split_held_out
    from snn_distill.evaluate import evaluate_fidelity

    cfg = _cfg(tiny_teacher_dir, tmp_path / "run", tmp_path / "tcache", temperature=2.0, teacher_cache_topk=k)
    teacher = load_teacher(str(tiny_teacher_dir), load_model=False)
    run = train(cfg, STUDENT, teacher=teacher, progress=False)
    ev = run.metadata["evaluation"]
    assert ev["split"] == "held_out" and "T=1" in ev["teacher_targets"]

    live = load_teacher(str(tiny_teacher_dir))  # the full teacher at T=1 on the same held-out batches
    _, held_texts = split_held_out(load_texts(cfg.dataset), cfg.held_out_fraction, cfg.seed)
    held = tokenize_texts(held_texts, live.tokenizer, cfg.max_length, pack=cfg.pack)
    batches = fixed_batches(held, cfg.batch_size, live.tokenizer.pad_token_id, cfg.eval_batches)
    with torch.inference_mode():
        want = evaluate_fidelity(run.student.eval(), live, batches, device="cpu")
    assert ev["tokens"] == want["tokens"]
    assert ev["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1e-9)
    if k >= live.vocab_size:
        assert "exact" in ev["teacher_targets"]
        for key in ("teacher_perplexity", "kl_teacher_student", "student_perplexity"):
            assert ev[key] == pytest.approx(want[key], rel=1e-4), key
    # The T=2 training targets give a much flatter teacher (perplexity 1.8x here): evaluating with them
    # is the error this test guards against.
    soft = evaluate_fidelity(run.student.eval(), lambda i, m: live.logits(i, m) / 2.0, batches, device="cpu")
    assert soft["teacher_perplexity"] > 1.3 * want["teacher_perplexity"]
    if k < live.vocab_size:  # top-16 of 384 with the tail spread evenly: labelled approximate, still near
        assert "approximate" in ev["teacher_targets"]
        off = abs(math.log(ev["teacher_perplexity"] / want["teacher_perplexity"]))
        assert off < 0.5 * abs(math.log(soft["teacher_perplexity"] / want["teacher_perplexity"]))
        assert ev["kl_teacher_student"] == pytest.approx(want["kl_teacher_student"], rel=0.1)
