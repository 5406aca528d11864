"""Teacher replies (--teacher-responses): generation, the reply cache, response-only loss, reply
evaluation, and generation that never returns an empty reply (min_tokens, repetition penalty)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer, pretrain_briefly

from snn_distill.artifacts import build_metadata, prompt_format_section, save_artifacts
from snn_distill.backends.base import LLMBackend, _Shaping
from snn_distill.backends.snn import SNNLLMBackend
from snn_distill.config import StudentConfig
from snn_distill.data import reply_blocks, response_loss_mask, synthetic_prompts
from snn_distill.evaluate import empty_share, format_responses, response_agreement, rouge_l
from snn_distill.losses import TeacherTargets, chunked_distill_loss, reference_distill_loss, token_weights
from snn_distill.responses import (
    ResponseCache,
    ResponseSettings,
    chat_template_of,
    format_prompt,
    student_continuations,
    teacher_replies,
)
from snn_distill.student import SpikingStudentLM
from snn_distill.teacher import load_teacher
from snn_distill.tokenizer import load_gpt2_tokenizer

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = synthetic_prompts()[:6]


pytestmark = pytest.mark.usefixtures("one_thread")


def chat_tokenizer():
    """The tiny BPE with ChatML special tokens, <|im_end|> as EOS and a chat template."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def chat_teacher_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama whose tokenizer has a chat template (like SmolLM2-Instruct)."""
    d = tmp_path_factory.mktemp("chat_teacher")
    tok = chat_tokenizer()
    model = pretrain_briefly(build_tiny_llama(len(tok)), tok, steps=60)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def replies_of(teacher, tmp_path, **settings):
    s = ResponseSettings(**{"max_new_tokens": 8, "batch_size": 4, **settings})
    return teacher_replies(teacher, PROMPTS, s, tmp_path / "replies", "float32", progress=False)


# ---- chat-template and plain teachers ------------------------------------------------------------


def test_chat_teacher_replies_in_its_template_and_batching_changes_nothing(chat_teacher_dir, tmp_path):
    teacher = load_teacher(str(chat_teacher_dir))
    tok = teacher.tokenizer
    rs = replies_of(teacher, tmp_path)
    assert rs.chat_template == CHAT and chat_template_of(tok) == CHAT
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for prompt, ids in zip(PROMPTS, rs.prompt_ids):
        assert ids == tok(format_prompt(tok, prompt, CHAT), add_special_tokens=False)["input_ids"]
        assert ids[0] == start and ids[-len(header) :] == header and end in ids
    # left-padded batches of 4 give the replies that each prompt gets alone (greedy)
    for ids, reply in zip(rs.prompt_ids, rs.replies):
        alone = teacher.model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=end, pad_token_id=end
        )[0, len(ids) :].tolist()
        body = alone[: alone.index(end)] if end in alone else alone
        assert reply.ids == body
        assert reply.stop == (end if end in alone else None)
        assert reply.text == tok.decode(body, skip_special_tokens=True)
        assert len(reply.ids) <= 8
    assert rs.stats["prompts"] == len(PROMPTS)


def test_plain_teacher_continues_the_prompt(tiny_teacher_dir, chat_teacher_dir, tmp_path):
    plain = load_teacher(str(tiny_teacher_dir))
    rs = replies_of(plain, tmp_path)
    assert rs.chat_template is None
    assert rs.prompt_ids == plain.tokenizer(PROMPTS, add_special_tokens=True)["input_ids"]
    assert all(len(r.ids) <= 8 for r in rs.replies)
    # a chat teacher can be asked for plain continuations too
    chat = load_teacher(str(chat_teacher_dir))
    forced = replies_of(chat, tmp_path / "forced", chat_template=False)
    assert forced.chat_template is None
    assert forced.prompt_ids == chat.tokenizer(PROMPTS, add_special_tokens=True)["input_ids"]


# ---- the reply cache -----------------------------------------------------------------------------


def test_cache_is_reused_without_loading_the_teacher(chat_teacher_dir, tmp_path):
    first = replies_of(load_teacher(str(chat_teacher_dir)), tmp_path)
    lazy = load_teacher(str(chat_teacher_dir), load_model=False)
    again = replies_of(lazy, tmp_path)
    assert lazy.model is None  # every reply came from the cache
    assert [r.ids for r in again.replies] == [r.ids for r in first.replies]
    assert again.cache_path == first.cache_path


@pytest.mark.parametrize(
    "change", [{"max_new_tokens": 5}, {"sample": True}, {"chat_template": False}, {"repetition_penalty": 1.3}]
)
def test_cache_is_invalidated_when_a_setting_changes(chat_teacher_dir, tmp_path, change):
    first = replies_of(load_teacher(str(chat_teacher_dir)), tmp_path)
    lazy = load_teacher(str(chat_teacher_dir), load_model=False)
    changed = replies_of(lazy, tmp_path, **change)
    assert lazy.model is not None  # the teacher had to run
    assert changed.cache_path != first.cache_path
    assert len(list((tmp_path / "replies").glob("*.jsonl"))) == 2
    if "max_new_tokens" in change:
        assert all(len(r.ids) <= 5 for r in changed.replies)
        assert max(len(r.ids) for r in first.replies) > 5


def test_cache_key_covers_the_prompts_and_the_seed(chat_teacher_dir, tmp_path):
    teacher = load_teacher(str(chat_teacher_dir))
    a = replies_of(teacher, tmp_path, sample=True, temperature=1.5, seed=1)
    b = replies_of(teacher, tmp_path / "other", sample=True, temperature=1.5, seed=1)
    c = replies_of(teacher, tmp_path, sample=True, temperature=1.5, seed=2)
    assert [r.ids for r in a.replies] == [r.ids for r in b.replies]  # a seed reproduces sampled replies
    assert [r.ids for r in a.replies] != [r.ids for r in c.replies]
    assert a.cache_path != c.cache_path
    s = ResponseSettings(max_new_tokens=8, batch_size=4)
    other = teacher_replies(teacher, PROMPTS[:5], s, tmp_path / "replies", "float32", progress=False)
    assert other.cache_path != replies_of(teacher, tmp_path).cache_path


def test_interrupted_fill_continues_and_a_torn_line_is_dropped(chat_teacher_dir, tmp_path):
    teacher = load_teacher(str(chat_teacher_dir))
    full = replies_of(teacher, tmp_path)
    path = Path(full.cache_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 2  # header + two batches of 4 and 2 prompts
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # second batch torn mid-write
    cache = ResponseCache(path.parent, json.loads(lines[0])["components"])
    assert cache.load() == 1 and path.read_text().count("\n") == 2  # the torn tail is cut off
    again = replies_of(teacher, tmp_path)
    assert [r.ids for r in again.replies] == [r.ids for r in full.replies]
    assert len(path.read_text().splitlines()) == 3


def test_settings_are_validated():
    with pytest.raises(ValueError, match="response-max-new-tokens"):
        ResponseSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="response-top-p"):
        ResponseSettings(top_p=0)


# ---- prompt + reply examples and the response-only loss -----------------------------------------


def test_reply_blocks_and_response_mask():
    blocks, starts = reply_blocks([[1, 2, 3], [4, 5]], [([7, 8], 0), ([9, 9, 9, 9], None)], max_length=6)
    assert blocks == [[1, 2, 3, 7, 8, 0], [4, 5, 9, 9, 9, 9]]
    assert starts == [3, 2]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # rows [1, 2, 3, 7, 8, 0], [4, 5, 9]
    got = response_loss_mask([3, 2], mask)
    # position i predicts token i + 1: the prompt's last token predicts the reply's first
    assert got.tolist() == [
        [False, False, True, True, True, False],
        [False, True, False, False, False, False],
    ]
    # a prompt that fills max_length leaves no reply position
    blocks, starts = reply_blocks([[1, 2, 3, 4]], [([5], 0)], max_length=4)
    assert starts == [4] and not response_loss_mask(starts, torch.ones(1, 4)).any()


def test_response_only_loss_ignores_prompt_positions():
    torch.manual_seed(0)
    n, d, v = 10, 8, 12
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64)
    t_logp = torch.log_softmax(torch.randn(n, v, dtype=torch.float64), -1)
    keep = torch.tensor([False] * 4 + [True] * 6)
    w = token_weights(n, 1.0 / int(keep.sum()), keep)
    assert w.tolist() == pytest.approx([0.0] * 4 + [1 / 6] * 6)
    loss, _, _ = chunked_distill_loss(hidden, weight, TeacherTargets(t_logp), w.double(), chunk=3)
    loss.backward()
    # equals the plain loss over the reply rows alone, and prompt rows get no gradient
    ref = reference_distill_loss(hidden[keep].detach() @ weight.t(), TeacherTargets(t_logp[keep]), w[keep].double())
    assert torch.allclose(loss.detach(), ref, atol=1e-10)
    assert hidden.grad[~keep].abs().max() == 0 and hidden.grad[keep].abs().max() > 0
    # other teacher targets on prompt rows change nothing
    t2 = t_logp.clone()
    t2[:4] = torch.log_softmax(torch.randn(4, v, dtype=torch.float64), -1)
    loss2, _, _ = chunked_distill_loss(hidden.detach(), weight, TeacherTargets(t2), w.double(), chunk=3)
    assert torch.allclose(loss.detach(), loss2)


# ---- evaluation figures --------------------------------------------------------------------------


def test_rouge_l_and_empty_share_on_known_strings():
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(2 * 1.0 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l(["Turn left at Oak Avenue."], ["turn left at oak avenue"]) == pytest.approx(1.0)
    assert rouge_l(["", "blue sky"], ["green grass", "blue sky"]) == pytest.approx(0.5)
    assert empty_share(["", "  \n", "hi", "ok"]) == 0.5 and empty_share([]) == 0.0


class OneHot(torch.nn.Module):
    """A 'student' predicting `table[token]` after each token (logits [B, S, V])."""

    def __init__(self, table: dict[int, int], v: int = 16) -> None:
        super().__init__()
        self.table, self.v = table, v

    def forward(self, ids):
        out = torch.zeros(*ids.shape, self.v)
        for (b, s), t in zip(torch.cartesian_prod(*map(torch.arange, ids.shape)).tolist(), ids.flatten().tolist()):
            out[b, s, self.table.get(t, 0)] = 1.0
        return out


def test_teacher_forced_agreement_counts_reply_tokens_only():
    # blocks: prompt [1, 2] + reply [3, 4, 5]; prompt [1] + reply [6, 7]
    blocks, starts = [[1, 2, 3, 4, 5], [1, 6, 7]], [2, 2 - 1]
    student = OneHot({1: 2, 2: 3, 3: 4, 4: 9, 6: 9})  # right on 2->3, 3->4; wrong on 4->5, 1->6, 6->7
    agreement, positions = response_agreement(student, blocks, starts, pad_id=0, batch_size=2)
    assert positions == 3 + 2  # positions predicting 3, 4, 5 and 6, 7; prompt positions left out
    assert agreement == pytest.approx(2 / 5)


def test_format_responses_prints_the_figures_and_samples():
    text = format_responses(
        {
            "prompts": 2,
            "teacher_forced_agreement": 0.25,
            "rouge_l": 0.5,
            "empty_reply_share": 0.0,
            "samples": [{"prompt": "Where is the bank?", "teacher": "Two blocks north.", "student": "North."}],
        }
    )
    assert "0.250" in text and "0.500" in text and "0.0%" in text
    assert "Two blocks north." in text and "North." in text


# ---- generation: min_tokens, repetition penalty, chat template -----------------------------------


class Ranked(LLMBackend):
    """Always the same next-token ranking (highest first), whatever came before."""

    def __init__(self, tok, ranking, eos):
        super().__init__()
        self.tok, self.eos = tok, eos
        self.logits = torch.full((len(tok),), -10.0)
        for r, t in enumerate(ranking):
            self.logits[t] = 10.0 - r

    @property
    def eos_token_id(self):
        return self.eos

    def _encode(self, text):
        return self.tok.encode(text)

    def _decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _start(self, ids):
        return None, self.logits.clone()

    def _advance(self, state, token_id):
        return None, self.logits.clone()


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_tokenizer()


def test_min_tokens_suppresses_eos_and_blank_tokens(gpt2):
    eos = gpt2.eos_token_id
    space, newline, hi = gpt2.encode(" ")[0], gpt2.encode("\n")[0], gpt2.encode("Hi")[0]
    b = Ranked(gpt2, [eos, space, newline, hi], eos)
    assert b.generate("Hello", max_tokens=8) == ""  # EOS first: an empty reply by default
    assert b.last_token_ids == []
    text = b.generate("Hello", max_tokens=8, min_tokens=1)
    assert text.strip() and b.last_token_ids == [hi]  # blank tokens skipped, then EOS allowed
    text = b.generate("Hello", max_tokens=8, min_tokens=3)
    assert b.last_token_ids[0] == hi and len(b.last_token_ids) == 3 and text.startswith("Hi")
    assert b.generate("Hello", max_tokens=0, min_tokens=1) == ""
    with pytest.raises(ValueError, match="min_tokens"):
        b.generate("Hello", min_tokens=-1)
    b.default_min_tokens = 1  # what SNNLLMBackend sets for a student trained on replies
    assert b.generate("Hello", max_tokens=8).strip()


def test_repetition_penalty_matches_hugging_face():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    scores = torch.randn(1, 50) * 3
    seen = [3, 7, 7, 11, 42]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), scores.clone())[0]
    got = _Shaping(0, 1.3).apply(scores[0], set(seen), [])
    assert torch.allclose(got, want)
    got_list = _Shaping(0, 1.3).apply(scores[0].tolist(), set(seen), [])
    assert torch.allclose(torch.tensor(got_list), want)


def test_repetition_penalty_breaks_a_loop(gpt2):
    near = gpt2.encode(" nearest")[0]
    other = gpt2.encode(" pharmacy")[0]
    b = Ranked(gpt2, [near, other], gpt2.eos_token_id)
    b.logits[near], b.logits[other] = 4.0, 3.5
    assert b.generate("the", max_tokens=3) == " nearest nearest nearest"
    assert b.generate("the", max_tokens=2, repetition_penalty=1.5) == " nearest pharmacy"
    with pytest.raises(ValueError, match="repetition_penalty"):
        b.generate("the", repetition_penalty=0)


def write_reply_student(out: Path, tok, template, **defaults):
    cfg = StudentConfig(vocab_size=len(tok), dim=16, depth=1, num_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = SpikingStudentLM(cfg)
    meta = build_metadata(cfg, model.num_parameters(), {}, {"tokenizer_name": "x"}, {}, git_tracking=False)
    meta["prompt_format"] = prompt_format_section(template, **defaults)
    save_artifacts(out, model.state_dict(), meta, tokenizer=tok)
    return out / "student.pt", model


def test_snn_backend_formats_prompts_with_the_recorded_template(tmp_path):
    tok = chat_tokenizer()
    path, model = write_reply_student(tmp_path, tok, CHAT, min_tokens=1, repetition_penalty=1.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = SNNLLMBackend(model_path=str(path), device="cpu")
    assert b.chat_template == CHAT and b.default_min_tokens == 1 and b.default_repetition_penalty == 1.2
    q = "Where is the bank?"
    assert b._prompt_ids(q, raw=False) == tok(format_prompt(tok, q, CHAT), add_special_tokens=False)["input_ids"]
    assert b._prompt_ids(q, raw=True) == tok.encode(q)
    for prompt in (q, "", "?"):
        text = b.generate(prompt, max_tokens=6)
        assert text.strip() and 1 <= len(b.last_token_ids) <= 6  # never an empty or blank reply
    # the decode loop's greedy matches the student's own batched greedy on the formatted prompt
    ids = b._prompt_ids(q, raw=False)
    b.generate(q, max_tokens=6, min_tokens=0, repetition_penalty=1.0)
    (cont,) = student_continuations(model.eval(), [ids], 6, [tok.eos_token_id], vocab_limit=len(tok))
    assert b.last_token_ids == cont.ids


def test_onnx_backend_formats_prompts_like_the_torch_backend(tmp_path):
    from snn_distill.backends.onnx import ONNXSNNBackend
    from snn_distill.export.onnx import export_onnx

    tok = chat_tokenizer()
    path, _ = write_reply_student(tmp_path, tok, CHAT, min_tokens=1, repetition_penalty=1.2)
    export_onnx(path, seq_lens=(3,), verify=False)
    onnx = ONNXSNNBackend(tmp_path)
    torch_b = SNNLLMBackend(model_path=str(path), device="cpu")
    q = "Is the bakery open?"
    assert onnx._prompt_ids(q, raw=False) == torch_b._prompt_ids(q, raw=False)
    assert onnx.default_min_tokens == 1 and onnx.generate(q, max_tokens=4).strip()


def test_snn_backend_without_prompt_format_keeps_old_behaviour(tmp_path):
    tok = chat_tokenizer()
    cfg = StudentConfig(vocab_size=len(tok), dim=16, depth=1, num_heads=2, max_seq_len=64)
    model = SpikingStudentLM(cfg)
    meta = build_metadata(cfg, model.num_parameters(), {}, {"tokenizer_name": "x"}, {}, git_tracking=False)
    save_artifacts(tmp_path, model.state_dict(), meta, tokenizer=tok)
    b = SNNLLMBackend(model_path=str(tmp_path / "student.pt"), device="cpu")
    assert b.chat_template is None and b.default_min_tokens == 0 and b.default_repetition_penalty == 1.0
    assert b._prompt_ids("hi there", raw=False) == tok.encode("hi there")


def test_student_continuations_batch_prompts_of_any_length():
    torch.manual_seed(0)
    model = SpikingStudentLM(StudentConfig(vocab_size=40, dim=16, depth=1, num_heads=2)).eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    together = student_continuations(model, prompts, 5, [0])
    alone = [student_continuations(model, [p], 5, [0])[0] for p in prompts]
    assert [c.ids for c in together] == [c.ids for c in alone]
    g = torch.Generator().manual_seed(3)
    sampled = student_continuations(model, prompts, 5, [], temperature=1.0, generator=g)
    assert all(len(c.ids) == 5 and c.stop is None for c in sampled)
    limited = student_continuations(model, prompts, 5, [], vocab_limit=10)
    assert all(t < 10 for c in limited for t in c.ids)


# ---- training with --teacher-responses -----------------------------------------------------------

STUDENT = {"dim": 16, "depth": 1, "num_heads": 2}


def reply_config(teacher_dir, tmp_path, out="out", **kw):
    from snn_distill.config import TrainConfig

    base = {
        "teacher_model": str(teacher_dir),
        "output_dir": str(tmp_path / out),
        "num_steps": 4,
        "batch_size": 4,
        "max_length": 40,
        "lr": 3e-3,
        "log_interval": 0,
        "device": "cpu",
        "git_tracking": False,
        "teacher_responses": True,
        "response_max_new_tokens": 8,
        "max_texts": 60,
        "teacher_cache": str(tmp_path / "teacher_cache"),
    }
    return TrainConfig(**{**base, **kw})


def test_training_on_replies_records_evaluation_and_prompt_format(chat_teacher_dir, tmp_path):
    from snn_distill.distill import train

    run = train(reply_config(chat_teacher_dir, tmp_path, response_loss_only=True), dict(STUDENT), progress=False)
    meta = run.metadata
    r = meta["evaluation"]["responses"]
    assert r["prompts"] == 3  # 5 % of 60 held out
    assert 0.0 <= r["teacher_forced_agreement"] <= 1.0 and r["reply_positions"] > 0
    assert 0.0 <= r["rouge_l"] <= 1.0 and 0.0 <= r["empty_reply_share"] <= 1.0
    assert len(r["samples"]) == 3 and all(set(s) == {"prompt", "teacher", "student"} for s in r["samples"])
    assert meta["prompt_format"]["format"] == "chat" and meta["prompt_format"]["chat_template"] == CHAT
    assert meta["prompt_format"]["generation_defaults"]["min_tokens"] == 1
    tr = meta["training_config"]["teacher_responses"]
    assert tr["prompts"] == 60 and tr["chat_template"] is True
    assert meta["config"]["response_loss_only"] is True
    # the served student formats a plain question with the template and always replies
    b = SNNLLMBackend(model_path=str(run.paths["student"]), device="cpu")
    assert b.chat_template == CHAT
    for s in r["samples"]:
        assert b.generate(s["prompt"], max_tokens=8).strip()
    # a second run reads replies and teacher logits from the caches: the teacher's weights stay unloaded
    again = train(reply_config(chat_teacher_dir, tmp_path, out="again"), dict(STUDENT), progress=False)
    cache = again.metadata["training_config"]["teacher_cache"]
    assert cache["teacher_model_loaded"] is False and cache["blocks_computed"] == 0
    assert again.metadata["evaluation"]["responses"]["samples"][0]["teacher"] == r["samples"][0]["teacher"]


def test_resume_reuses_the_replies(chat_teacher_dir, tmp_path):
    from snn_distill.distill import train

    cfg = reply_config(chat_teacher_dir, tmp_path, num_steps=2, checkpoint_every=2)
    train(cfg, dict(STUDENT), progress=False)
    resumed = reply_config(chat_teacher_dir, tmp_path, num_steps=4, checkpoint_every=2, resume=True)
    run = train(resumed, dict(STUDENT), progress=False)
    assert run.metadata["training_config"]["resumed_from_step"] == 2
    other = reply_config(
        chat_teacher_dir, tmp_path, num_steps=6, checkpoint_every=2, resume=True, response_max_new_tokens=6
    )
    with pytest.raises(Exception, match="response"):  # other reply settings: not the same run
        train(other, dict(STUDENT), progress=False)


def test_on_policy_batches_replace_the_replies_and_their_targets(chat_teacher_dir, tmp_path):
    from snn_distill.distill import DistillRecipe

    recipe = DistillRecipe(reply_config(chat_teacher_dir, tmp_path, on_policy_fraction=1.0), show_progress=False)
    recipe.setup(dict(STUDENT))
    micro = recipe.micro_batches()
    (ids, mask, make), keep = micro[0], recipe.loss_masks[0]
    rows = recipe.batcher.last_indices
    off = [recipe.train_blocks[i] for i in rows]
    starts = [recipe.replies.train_starts[i] for i in rows]
    got = [ids[r, : int(mask[r].sum())].tolist() for r in range(len(rows))]
    assert [g[:s] for g, s in zip(got, starts)] == [b[:s] for b, s in zip(off, starts)]  # same prompts
    assert [g[s:] for g, s in zip(got, starts)] != [b[s:] for b, s in zip(off, starts)]  # the student's replies
    assert torch.equal(keep, response_loss_mask(starts, mask))  # only the sampled reply is distilled
    targets = make()  # the live teacher on the student's tokens
    assert targets.logprobs.shape[0] == int(mask.sum())
    from snn_distill.distill import teacher_targets

    want = teacher_targets(recipe.teacher, ids, mask, 1.0)
    assert targets.raw  # raw logits: the loss takes their log-softmax (fused_loss.py)
    assert torch.allclose(targets.resolved(1.0).logprobs, want.logprobs, atol=1e-5)
    run_stats = recipe.train_step(1)[0]
    assert run_stats.loss > 0


def test_reply_flags_are_checked(chat_teacher_dir, tmp_path):
    from snn_distill.config import TrainConfig

    with pytest.raises(ValueError, match="teacher-responses"):
        TrainConfig(teacher_model="x", response_loss_only=True)
    with pytest.raises(ValueError, match="on-policy-fraction"):
        TrainConfig(teacher_model="x", teacher_responses=True, on_policy_fraction=1.5)
    with pytest.raises(ValueError, match="--pack"):
        TrainConfig(teacher_model="x", teacher_responses=True, pack=True)


def test_cli_flags_reach_the_run(chat_teacher_dir, tmp_path, capsys):
    from snn_distill.cli import train_main

    out = tmp_path / "cli"
    argv = [
        "--teacher-model", str(chat_teacher_dir), "--output-dir", str(out), "--num-steps", "2",
        "--max-length", "40", "--student-dim", "16", "--student-depth", "1", "--student-heads", "2",
        "--device", "cpu", "--quiet", "--no-git-tracking", "--log-interval", "0",
        "--teacher-responses", "--response-max-new-tokens", "6", "--response-sample", "--response-seed", "5",
        "--response-loss-only", "--on-policy-fraction", "0.5", "--max-texts", "40",
        "--response-cache", str(tmp_path / "rc"),
    ]  # fmt: skip
    assert train_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "held-out replies: teacher-forced agreement" in stdout
    meta = json.loads((out / "metadata.json").read_text())
    tr = meta["training_config"]["teacher_responses"]
    assert tr["settings"]["sample"] is True and tr["settings"]["seed"] == 5 and tr["settings"]["max_new_tokens"] == 6
    assert tr["cache"].startswith(str(tmp_path / "rc")) and tr["prompts"] == 40
    assert meta["config"]["on_policy_fraction"] == 0.5


def test_training_on_a_plain_teachers_continuations(tiny_teacher_dir, tmp_path):
    from snn_distill.distill import train

    run = train(reply_config(tiny_teacher_dir, tmp_path, max_texts=40), dict(STUDENT), progress=False)
    fmt = run.metadata["prompt_format"]
    assert fmt["format"] == "plain" and fmt["chat_template"] is None
    assert run.metadata["training_config"]["teacher_responses"]["chat_template"] is False
    b = SNNLLMBackend(model_path=str(run.paths["student"]), device="cpu")
    assert b.chat_template is None and b.default_min_tokens == 1
    assert b._prompt_ids("Where is the bank?", raw=False) == b.tokenizer.encode("Where is the bank?")
    assert b.generate("Where is the bank?", max_tokens=6).strip()
