"""What a CUDA run would break, checked on the CPU (issue 17): chunked evaluation, the evaluation phase
of the memory plan, the checkpoint barrier of several processes, HFBackend placement, the eval CLI's
device move, precision choices. Tiny real models built here; no mocks. All on device="cpu"."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from snn_distill.artifacts import build_metadata, load_student, save_artifacts
from snn_distill.config import StudentConfig
from snn_distill.data import BlockBatcher, load_texts, tokenize_texts
from snn_distill.evaluate import evaluate_fidelity
from snn_distill.student import SpikingStudentLM
from snn_distill.teacher import load_teacher
from snn_distill.teacher_cache import CachedTeacherTargets, TeacherLogitCache, cache_components

# ---- evaluation in row chunks ----------------------------------------------------------------------


@torch.no_grad()
def _unchunked(student, teacher, batches, unigram):
    """The evaluation as it was before chunking: full [B, S, V] fp32 log-probabilities per batch."""
    kl = agree = s_nll = t_nll = u_nll = 0.0
    n_pos = n_next = 0
    for ids, mask in batches:
        s_logp = F.log_softmax(student(ids).double(), -1)
        t_logp = F.log_softmax(teacher(ids, mask).double(), -1)
        real = mask.bool()
        kl += float((t_logp.exp() * (t_logp - s_logp)).sum(-1)[real].sum())
        agree += float((s_logp.argmax(-1) == t_logp.argmax(-1))[real].sum())
        n_pos += int(real.sum())
        nxt = real[:, 1:] & real[:, :-1]
        tgt = ids[:, 1:, None]
        s_nll -= float(s_logp[:, :-1].gather(-1, tgt).squeeze(-1)[nxt].sum())
        t_nll -= float(t_logp[:, :-1].gather(-1, tgt).squeeze(-1)[nxt].sum())
        u_nll -= float(unigram.double()[ids[:, 1:]][nxt].sum())
        n_next += int(nxt.sum())
    return {
        "student_perplexity": math.exp(s_nll / n_next),
        "teacher_perplexity": math.exp(t_nll / n_next),
        "kl_teacher_student": kl / n_pos,
        "top1_agreement": agree / n_pos,
        "tokens": n_pos,
        "unigram_perplexity": math.exp(u_nll / n_next),
    }


def _padded_batches(tok, n=2, batch=3):
    blocks = tokenize_texts(load_texts("synthetic")[:12], tok, 20, pack=False)
    batcher = BlockBatcher(blocks, batch, tok.pad_token_id, seed=1)
    out = [batcher.next_batch() for _ in range(n)]
    assert any(int(m.sum()) < m.numel() for _, m in out), "the batches should hold padding"
    return out


@pytest.mark.parametrize("chunk", [1, 5, 64, 100_000])
def test_chunked_evaluation_equals_the_unchunked_one(tiny_teacher_dir, chunk):
    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    torch.manual_seed(0)
    student = SpikingStudentLM(StudentConfig(vocab_size=teacher.vocab_size, dim=32, depth=1, num_heads=2)).eval()
    batches = _padded_batches(teacher.tokenizer)
    unigram = torch.log_softmax(torch.randn(teacher.vocab_size), -1)
    want = _unchunked(student, teacher.logits, batches, unigram)
    got = evaluate_fidelity(student, teacher, batches, device="cpu", unigram_logprobs=unigram, chunk=chunk)
    assert got["tokens"] == want["tokens"]
    assert got["top1_agreement"] == want["top1_agreement"]
    for key in ("student_perplexity", "teacher_perplexity", "kl_teacher_student", "unigram_perplexity"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    with pytest.raises(ValueError, match="chunk must be positive"):
        evaluate_fidelity(student, teacher, batches, device="cpu", chunk=0)


def test_cached_teacher_evaluation_builds_rows_not_a_dense_batch(tiny_teacher_dir, tmp_path):
    """The cache serves evaluation a chunk of rows at a time; the figures equal those of its dense
    [B, S, V] view, for rows in the cache and for a row the live teacher computes."""
    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    tok = teacher.tokenizer
    blocks = tokenize_texts(load_texts("synthetic")[:12], tok, 20, pack=False)
    comps = cache_components(
        teacher_name="t", teacher_fingerprint="fp", revision=None, teacher_dtype="float32", tokenizer=tok,
        vocab_size=teacher.vocab_size, dataset="synthetic", blocks=blocks, max_length=20, pack=False,
        temperature=2.0, k=8,
    )  # fmt: skip
    cache = TeacherLogitCache.open(tmp_path / "cache", comps, [len(b) for b in blocks])
    src = CachedTeacherTargets(teacher, cache, blocks, temperature=2.0)
    batches = _padded_batches(tok)
    ids, mask = batches[0]
    odd = ids.clone()
    odd[0, 0] = (odd[0, 0] + 1) % teacher.vocab_size  # no cached block: the live teacher's row
    batches.append((odd, mask))
    torch.manual_seed(0)
    student = SpikingStudentLM(StudentConfig(vocab_size=teacher.vocab_size, dim=32, depth=1, num_heads=2)).eval()
    unigram = torch.log_softmax(torch.randn(teacher.vocab_size), -1)
    want = _unchunked(student, src.logits, batches, unigram)
    got = evaluate_fidelity(student, src, batches, device="cpu", unigram_logprobs=unigram, chunk=7)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    rows = src.eval_logprob_rows(ids, mask)(torch.tensor([0, 1, 2]))
    assert rows.shape == (3, teacher.vocab_size) and rows.dtype == torch.float32


# ---- the eval CLI's device move ---------------------------------------------------------------------


def test_loaded_student_lives_wholly_on_the_requested_device(tmp_path):
    """load_student builds on the CPU, then moves every parameter and buffer (the RoPE table too) to
    the device asked for; the meta device stands in for a GPU."""
    cfg = StudentConfig(vocab_size=50, dim=16, depth=1, num_heads=2)
    model = SpikingStudentLM(cfg)
    meta = build_metadata(cfg, model.num_parameters(), {}, {}, {}, git_tracking=False)
    paths = save_artifacts(tmp_path, model.state_dict(), meta)
    moved, _ = load_student(paths["student"], map_location="meta")
    tensors = [*moved.parameters(), *moved.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    here, _ = load_student(paths["student"], map_location="cpu")
    assert all(t.device.type == "cpu" for t in [*here.parameters(), *here.buffers()])
    assert torch.equal(here.embed.weight, model.embed.weight)


# ---- the evaluation phase of the memory plan --------------------------------------------------------


@pytest.mark.parametrize(
    "teacher,batch,length,vocab",
    [("meta-llama/Llama-3.2-3B", 4, 512, 128256), ("Qwen/Qwen2.5-3B", 2, 1024, 151936)],
)
def test_dry_run_plans_the_evaluation_of_the_3b_recipes(capsys, teacher, batch, length, vocab):
    from snn_distill.cli import train_main
    from snn_distill.config import TrainConfig
    from snn_distill.memory_plan import EVAL_CHUNK_BUFFERS, GIB, plan_memory

    argv = ["--teacher-model", teacher, "--batch-size", str(batch), "--max-length", str(length),
            "--snn-timesteps", "8", "--dry-run"]  # fmt: skip
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    eval_lines = [line for line in out.splitlines() if line.startswith("evaluation ")]
    assert len(eval_lines) == 4 and any("evaluation chunk working set" in line for line in eval_lines)
    plan = plan_memory(TrainConfig(teacher_model=teacher, batch_size=batch, max_length=length), {"num_timesteps": 8})
    rows = {(r.phase, r.item): r.nbytes for r in plan.rows}
    assert rows[("evaluation", "evaluation chunk working set")] == EVAL_CHUNK_BUFFERS * 1024 * vocab * 4
    assert rows[("evaluation", "teacher logits (held)")] == batch * length * vocab * 2
    persistent = sum(r.nbytes for r in plan.rows if r.phase == "persistent")
    evaluation = sum(r.nbytes for r in plan.rows if r.phase == "evaluation")
    assert plan.peak("cuda") >= persistent + evaluation
    assert f"peak on cuda: {plan.peak('cuda') / GIB:.2f} GiB" in out


def test_the_budget_counts_every_gpu_of_the_run():
    from snn_distill.config import TrainConfig
    from snn_distill.memory_plan import gpus_of_run

    cfg = TrainConfig(teacher_model="x")
    assert gpus_of_run(cfg) == [0]
    assert gpus_of_run(cfg, world_size=4) == [0, 1, 2, 3]
    assert gpus_of_run(cfg, world_size=8, local_world_size=2) == [0, 1]
    assert gpus_of_run(TrainConfig(teacher_model="x", teacher_device="cuda:3")) == [0, 3]
    assert gpus_of_run(TrainConfig(teacher_model="x", teacher_device="cpu"), world_size=2) == [0, 1]


# ---- HFBackend placement and dtype ------------------------------------------------------------------


def _tiny_llama_folder(path, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("attr,value", [("hf_device_map", {"": "cpu"}), ("is_quantized", True)])
def test_hf_backend_leaves_a_loader_placed_model_where_it_is(tmp_path, tiny_tokenizer, attr, value):
    """A model with a device_map or quantized weights is not moved (the meta device stands in for the
    GPU a plain `.to()` would collapse it onto); inputs go to its embedding's device and it generates."""
    from snn_distill.backends.hf import HFBackend

    model = _tiny_llama_folder(tmp_path, tiny_tokenizer)
    setattr(model, attr, value)
    backend = HFBackend(model, tiny_tokenizer, device="meta")
    assert backend.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in backend.hf_model.parameters())
    text = backend.generate("the cat", max_tokens=4)
    assert isinstance(text, str) and 0 < len(backend.last_token_ids) <= 4
    # the same model without the attribute is moved to the device asked for
    plain = _tiny_llama_folder(tmp_path / "plain", tiny_tokenizer)
    moved = HFBackend(plain, tiny_tokenizer, device="meta")
    assert moved.device == torch.device("meta") and all(p.device.type == "meta" for p in moved.hf_model.parameters())


def test_hf_backend_loads_weights_in_the_chosen_dtype(tmp_path, tiny_tokenizer):
    from snn_distill.backends.hf import HFBackend

    _tiny_llama_folder(tmp_path, tiny_tokenizer)
    auto = HFBackend.from_pretrained(str(tmp_path), device="cpu")
    assert {p.dtype for p in auto.hf_model.parameters()} == {torch.float32}  # auto: fp32 on the CPU
    bf16 = HFBackend.from_pretrained(str(tmp_path), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in bf16.hf_model.parameters()} == {torch.bfloat16}
    assert bf16.model(torch.tensor([[1, 2, 3]])).dtype == torch.float32  # logits are handed out in fp32


# ---- several processes: the checkpoint barrier and the thread share ---------------------------------

_RANK_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import torch
from snn_distill.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from snn_distill.distributed import init_distributed, on_main_then_barrier, shutdown

out = Path(sys.argv[1])
ctx = init_distributed(torch.device("cpu"))
model = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(model.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

def slow_write():  # a checkpoint that takes long to write (a big student on a slow disk)
    time.sleep(3)
    return save_checkpoint(out, step=7, student=model, optimizer=opt, scheduler=sched, data_states=[{}, {}],
                           rng_states=[{}, {}], fingerprint={}, progress={})

on_main_then_barrier(ctx, slow_write)
seen = checkpoint_path(out).is_file() and load_checkpoint(out)["step"] == 7  # what this rank would report
(out / f"rank{ctx.rank}.json").write_text(json.dumps({"seen": seen, "threads": torch.get_num_threads()}))
shutdown(ctx)
"""


def test_no_rank_returns_before_rank_0_has_written_the_checkpoint(tmp_path):
    """Two real processes joined over loopback with gloo: rank 1 returns from the checkpoint write only
    after rank 0's slow write is complete, and each process takes its share of the cores."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from snn_distill.distributed import threads_per_process

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo",
                   PYTHONPATH=str(root))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path)], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["seen"], f"rank {rank} went on before checkpoint.pt was complete"
        assert got["threads"] == threads_per_process(2)


# ---- precision, teacher placement, the gradient scaler in checkpoints -------------------------------


def test_cpu_trains_in_fp32_and_cuda_placement_is_direct():
    from snn_distill.precision import autocast_dtype, configure_matmul_precision, grad_scaler, precision_metadata
    from snn_distill.teacher import placement_kwargs

    cpu = torch.device("cpu")
    before = torch.get_float32_matmul_precision()
    assert autocast_dtype(cpu) is None and configure_matmul_precision(cpu) == before  # TF32 is a CUDA setting
    assert not grad_scaler(cpu, None).is_enabled() and not grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert grad_scaler(cpu, torch.float16).is_enabled()  # fp16 alone needs loss scaling
    meta = precision_metadata(cpu, None, grad_scaler(cpu, None))
    assert meta == {"autocast_dtype": None, "grad_scaler": False, "float32_matmul_precision": before,
                    "bf16_native": None}  # fmt: skip
    # a rank's teacher loads straight onto its GPU; the CPU needs no map; quantized weights keep theirs
    assert placement_kwargs(torch.device("cuda", 1), {}) == {"device_map": {"": 1}}
    assert placement_kwargs(cpu, {}) == {}
    quant = {"quantization_config": object(), "device_map": {"": 0}}
    assert placement_kwargs(torch.device("cuda", 0), quant) is quant


def test_an_fp16_overflow_is_named_before_the_learning_rate():
    from snn_distill.precision import non_finite_loss_message

    msg = non_finite_loss_message(float("nan"), 3, 3e-4, torch.float16, torch.bfloat16)
    assert "float16" in msg and "--teacher-dtype bfloat16" in msg and "--lr" not in msg
    plain = non_finite_loss_message(float("nan"), 3, 3e-4, torch.bfloat16, torch.bfloat16)
    assert "lower --lr (now 0.0003)" in plain and "float16" not in plain


def test_checkpoint_carries_the_fp16_loss_scale(tmp_path):
    from snn_distill.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()  # one real scaled step
    scaler.step(opt)
    scaler.update(512.0)
    kw = dict(step=1, student=model, optimizer=opt, scheduler=sched, data_states=[{}], rng_states=[{}],
              fingerprint={}, progress={})  # fmt: skip
    save_checkpoint(tmp_path, scaler=scaler, **kw)
    ckpt = load_checkpoint(tmp_path)
    again = torch.amp.GradScaler("cpu", enabled=True)
    again.load_state_dict(ckpt["scaler"])
    assert again.get_scale() == 512.0
    save_checkpoint(tmp_path, scaler=torch.amp.GradScaler("cpu", enabled=False), **kw)  # bf16 / fp32: nothing
    assert "scaler" not in load_checkpoint(tmp_path)


def test_training_names_an_fp16_teacher_overflow(tiny_tokenizer, tmp_path):
    """A float16 teacher whose logits overflow fp16's range (65504) makes the loss NaN; the error says
    so and points at --teacher-dtype bfloat16 instead of the learning rate. Real run on the CPU."""
    from conftest import build_tiny_llama

    from snn_distill.config import TrainConfig
    from snn_distill.distill import TrainingError, train

    model = build_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.lm_head.weight.fill_(6e4)  # representable in fp16; the logits (a sum of 32 such terms) are not
    model.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    cfg = TrainConfig(teacher_model=str(tmp_path / "teacher"), output_dir=str(tmp_path / "out"), device="cpu",
                      teacher_dtype="float16", num_steps=2, batch_size=2, max_length=16,
                      git_tracking=False)  # fmt: skip
    with pytest.raises(TrainingError) as info:
        train(cfg, {"dim": 16, "depth": 1, "num_heads": 2}, progress=False)
    msg = str(info.value)
    assert msg.startswith("loss became nan at step 1") and "float16" in msg and "--teacher-dtype bfloat16" in msg
    assert not (tmp_path / "out" / "student.pt").exists()
