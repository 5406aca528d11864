"""LLMBackend decode loop, sampling, HFBackend and SNNLLMBackend (real artifacts, fallbacks, stub)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snn_distill.artifacts import ArtifactError, build_metadata, save_artifacts
from snn_distill.backends.base import REPLACEMENT_CHAR, LLMBackend, sample_next_token
from snn_distill.backends.hf import HFBackend
from snn_distill.backends.snn import STUB_TEXT, ArtifactNotFoundError, SNNLLMBackend, StubSNNModel
from snn_distill.config import StudentConfig
from snn_distill.student import SpikingStudentLM
from snn_distill.tokenizer import WhitespaceTokenizer, load_gpt2_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Hello from the glasses"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here: never wait for retries


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_tokenizer()


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ================================================================================================
# sample_next_token
# ================================================================================================


@pytest.mark.parametrize("as_list", [False, True])
def test_greedy_is_first_argmax(as_list):
    logits = [1.0, 3.0, 3.0, 2.0]
    x = logits if as_list else torch.tensor(logits)
    assert sample_next_token(x, 0.0) == 1
    assert sample_next_token(x, None) == 1
    assert sample_next_token(x, 0.0, top_k=1, top_p=0.1) == 1


@pytest.mark.parametrize("as_list", [False, True])
def test_top_k_and_top_p_filter(as_list):
    probs = [0.6, 0.3, 0.1]
    raw = [float(torch.log(torch.tensor(p))) for p in probs]
    x = raw if as_list else torch.tensor(raw)
    gen = random.Random(0) if as_list else torch.Generator().manual_seed(0)
    assert {sample_next_token(x, 5.0, top_k=1, generator=gen) for _ in range(50)} == {0}
    assert {sample_next_token(x, 1.0, top_p=0.5, generator=gen) for _ in range(50)} == {0}
    seen = {sample_next_token(x, 1.0, top_p=0.85, generator=gen) for _ in range(200)}
    assert seen == {0, 1}  # 0.6 + 0.3 reaches 0.85; 0.1 is cut
    seen = {sample_next_token(x, 1.0, top_k=2, generator=gen) for _ in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("as_list", [False, True])
def test_sampling_distribution_and_seed(as_list):
    raw = [float(torch.log(torch.tensor(0.25))), float(torch.log(torch.tensor(0.75)))]
    x = raw if as_list else torch.tensor(raw)

    def gen(seed):
        return random.Random(seed) if as_list else torch.Generator().manual_seed(seed)

    g = gen(1)
    draws = [sample_next_token(x, 1.0, generator=g) for _ in range(3000)]
    assert abs(sum(draws) / len(draws) - 0.75) < 0.04
    g1, g2 = gen(7), gen(7)
    assert [sample_next_token(x, 1.0, generator=g1) for _ in range(40)] == [
        sample_next_token(x, 1.0, generator=g2) for _ in range(40)
    ]


def test_sampling_never_touches_global_rng():
    x = torch.randn(100)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    for _ in range(5):
        sample_next_token(x, 1.0, top_k=10, top_p=0.9)  # fresh OS-seeded private generator
        sample_next_token(x.tolist(), 1.0, top_p=0.9)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


@pytest.mark.parametrize("as_list", [False, True])
def test_nan_and_extreme_temperatures(as_list):
    raw = [float("nan"), 1.0, 0.0, float("-inf")]
    x = raw if as_list else torch.tensor(raw)
    assert sample_next_token(x, 0.0) == 1
    gen = random.Random(0) if as_list else torch.Generator().manual_seed(0)
    assert {sample_next_token(x, 1.0, generator=gen) for _ in range(100)} <= {1, 2}
    assert sample_next_token(x, 1e-30, generator=gen) == 1
    assert sample_next_token(x, 1e6, generator=gen) in (1, 2)


def test_invalid_sampling_args():
    x = torch.zeros(3)
    for kw in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample_next_token(x, **{"temperature": 1.0, **kw})


# ================================================================================================
# LLMBackend decode loop (a scripted backend that emits a fixed token sequence)
# ================================================================================================


class Scripted(LLMBackend):
    """Emits `script` token by token (then EOS), whatever the prompt; records what the model saw."""

    def __init__(self, tok, script, max_context=None):
        super().__init__()
        self.tok, self.script, self.max_context = tok, list(script), max_context
        self.starts: list[list[int]] = []
        self.k = 0

    @property
    def eos_token_id(self):
        return self.tok.eos_token_id

    def stream(self, *a, **kw):
        self.starts = []
        return super().stream(*a, **kw)

    def _encode(self, text):
        return self.tok.encode(text)

    def _decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _logits(self):
        x = torch.zeros(len(self.tok))
        x[self.script[self.k] if self.k < len(self.script) else self.eos_token_id] = 10.0
        return x

    def _start(self, ids):
        self.k = self.k + 1 if self.starts else 0  # a restart (sliding window) feeds one token too
        self.starts.append(list(ids))
        return None, self._logits()

    def _advance(self, state, token_id):
        self.k += 1
        return None, self._logits()


TRICKY = "日本語 café 🎉 naïve ’quotes’ Ωμέγα"


def test_stream_decodes_multibyte_tokens_cleanly(gpt2):
    ids = gpt2.encode(TRICKY)
    assert any(REPLACEMENT_CHAR in gpt2.decode([i]) for i in ids)  # some tokens are partial characters
    b = Scripted(gpt2, ids)
    pieces = list(b.stream("x", max_tokens=len(ids) + 5))
    assert "".join(pieces) == TRICKY
    assert len(pieces) > 3 and not any(REPLACEMENT_CHAR in p for p in pieces)
    assert b.generate("x", max_tokens=len(ids) + 5) == TRICKY
    assert b.last_token_ids == ids  # EOS is not counted


def test_truncated_multibyte_at_the_end_is_flushed(gpt2):
    ids = gpt2.encode("ok 🎉")
    partial = next(n for n in range(1, len(ids)) if gpt2.decode(ids[:n]).endswith(REPLACEMENT_CHAR))
    out = Scripted(gpt2, ids).generate("x", max_tokens=partial)
    assert out == gpt2.decode(ids[:partial])


@pytest.mark.parametrize(
    "stop, expected",
    [
        (".", " hello world"),
        (["Bye", "wor"], " hello "),
        ("lo wo", " hel"),  # spans several tokens
        ("zzz", " hello world. Bye now"),
        (["", "now"], " hello world. Bye "),
        ([], " hello world. Bye now"),
        (" hello", ""),
    ],
)
def test_stop_strings(gpt2, stop, expected):
    b = Scripted(gpt2, gpt2.encode(" hello world. Bye now"))
    pieces = list(b.stream("p", max_tokens=50, stop=stop))
    assert "".join(pieces) == expected == b.generate("p", max_tokens=50, stop=stop)
    stops = [stop] if isinstance(stop, str) else stop
    for s in stops:
        if s:
            assert all(s not in p for p in pieces)


def test_eos_and_max_tokens(gpt2):
    a, b_, c = gpt2.encode(" one two three")
    be = Scripted(gpt2, [a, b_, gpt2.eos_token_id, c])
    assert be.generate("p", max_tokens=10) == " one two"
    assert be.last_token_ids == [a, b_]
    assert be.generate("p", max_tokens=1) == " one"
    assert be.generate("p", max_tokens=0) == "" and be.starts == []
    assert list(be.stream("p", max_tokens=0)) == []
    for kw in ({"max_tokens": -1}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_k": -2}):
        with pytest.raises(ValueError):
            be.stream("p", **kw)  # validated eagerly, before iterating


def test_left_truncation_and_sliding_window(gpt2):
    script = gpt2.encode(" a" * 60)
    prompt = " ".join(str(i) for i in range(200))
    pids = gpt2.encode(prompt)
    b = Scripted(gpt2, script, max_context=16)
    b.generate(prompt, max_tokens=4)
    assert b.starts == [pids[-12:]]  # room left for the 4 new tokens
    out = b.generate(prompt, max_tokens=40)
    assert b.starts[0] == pids[-8:]  # cannot leave room for 40: keep half the context
    assert all(len(s) <= 16 for s in b.starts) and len(b.starts) > 1
    assert len(b.last_token_ids) == 40 and out == " a" * 40


class ScriptedNumpy(Scripted):
    """Returns numpy logits, like an ONNX Runtime backend would."""

    def _logits(self):
        x = super()._logits()
        x[:1000] = torch.where(x[:1000] > 0, x[:1000], 8.0)  # mass elsewhere too: sampling has choices
        return x.numpy()


def test_empty_prompt_without_special_tokens():
    class NoEos(Scripted):
        eos_token_id = None

    tok = WhitespaceTokenizer(50)
    b = NoEos(tok, tok.encode("x y z"))
    assert b.generate("", max_tokens=3) == " x y z"  # decoded after the <unk> start token
    assert b.starts == [[0]]


def test_numpy_logits_backend(gpt2):
    b = ScriptedNumpy(gpt2, gpt2.encode(" a b c d e f"))
    assert b.generate("p", max_tokens=6) == " a b c d e f"
    s1 = b.generate("p", max_tokens=6, temperature=2.0, seed=11)
    assert b.generate("p", max_tokens=6, temperature=2.0, seed=11) == s1
    assert "".join(b.stream("p", max_tokens=6, temperature=2.0, seed=11)) == s1


def test_empty_and_non_ascii_prompts(gpt2):
    b = Scripted(gpt2, gpt2.encode(" x y"))
    assert b.generate("", max_tokens=5) == " x y"
    assert b.starts == [[gpt2.eos_token_id]]  # GPT-2 has no separate BOS: start from <|endoftext|>
    assert b.generate(TRICKY, max_tokens=5) == " x y"
    assert b.starts == [gpt2.encode(TRICKY)]


# ================================================================================================
# HFBackend on tiny random models
# ================================================================================================


@pytest.fixture(scope="module")
def hf_gpt2(gpt2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(gpt2), n_embd=16, n_layer=2, n_head=2, n_positions=64)
    return HFBackend(GPT2LMHeadModel(cfg), gpt2)


@pytest.fixture(scope="module")
def hf_llama(gpt2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(gpt2),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=gpt2.eos_token_id,
        eos_token_id=gpt2.eos_token_id,
    )
    return HFBackend(LlamaForCausalLM(cfg), gpt2)


def argmax_loop(model, prompt_ids, n, eos):
    """Reference greedy decoding: full recomputation through `backend.model` at every step."""
    ids, out = list(prompt_ids), []
    for _ in range(n):
        with torch.inference_mode():
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t == eos:
            break
        ids.append(t)
        out.append(t)
    return out


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_hf_greedy_matches_full_recomputation(name, request, gpt2):
    b = request.getfixturevalue(name)
    text = b.generate(PROMPT, max_tokens=12)
    assert b.last_token_ids == argmax_loop(b.model, gpt2.encode(PROMPT), 12, gpt2.eos_token_id)
    assert text == gpt2.decode(b.last_token_ids) and text
    logits = b.model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3, len(gpt2))


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_hf_stream_seed_and_truncation(name, request, gpt2):
    b = request.getfixturevalue(name)
    eos = gpt2.eos_token_id
    assert "".join(b.stream(PROMPT, max_tokens=8)) == b.generate(PROMPT, max_tokens=8)
    s1 = b.generate(PROMPT, max_tokens=8, temperature=1.0, top_k=50, seed=3)
    assert "".join(b.stream(PROMPT, max_tokens=8, temperature=1.0, top_k=50, seed=3)) == s1
    assert b.generate(PROMPT, max_tokens=8, temperature=1.0, top_k=50, seed=3) == s1
    long_prompt = "word " * 300  # far beyond the 64-position context
    assert b.max_context == 64
    b.generate(long_prompt, max_tokens=10)  # the prompt's last 64 - 10 tokens, then 10 new ones
    assert b.last_token_ids == argmax_loop(b.model, gpt2.encode(long_prompt)[-54:], 10, eos)
    sampled = b.generate(long_prompt, max_tokens=80, temperature=0.7, seed=0)  # more than fits: slides
    assert len(b.last_token_ids) == 80 and eos not in b.last_token_ids
    assert b.generate(long_prompt, max_tokens=80, temperature=0.7, seed=0) == sampled
    b.generate("", max_tokens=3)  # an empty prompt starts from GPT-2's <|endoftext|>
    assert b.last_token_ids == argmax_loop(b.model, [eos], 3, eos)


def test_hf_from_pretrained_local_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    b = HFBackend.from_pretrained(str(tmp_path), device="cpu")
    assert b.max_context == 32 and b.eos_token_id == tok.eos_token_id
    b.generate("hello world", max_tokens=6)
    assert b.last_token_ids == argmax_loop(b.model, tok.encode("hello world"), 6, tok.eos_token_id)


# ================================================================================================
# SNNLLMBackend
# ================================================================================================

TINY = {"vocab_size": 50257, "dim": 16, "depth": 1, "num_heads": 2, "max_seq_len": 48}


def write_artifacts(out: Path, cfg: StudentConfig, tokenizer_name="gpt2", state_dict=None, tokenizer=None):
    """student.pt + metadata.json written by snn_distill.artifacts, as training writes them."""
    torch.manual_seed(0)
    model = SpikingStudentLM(cfg)
    cli = {"tokenizer_name": tokenizer_name}
    meta = build_metadata(cfg, model.num_parameters(), {}, cli, {}, git_tracking=False)
    sd = state_dict if state_dict is not None else model.state_dict()
    save_artifacts(out, sd, meta, tokenizer=tokenizer)
    return out / "student.pt", model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path, _ = write_artifacts(tmp_path_factory.mktemp("good"), StudentConfig(**TINY))
    return path


@pytest.fixture(scope="module")
def snn(good):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete artifacts load without a single warning
        return SNNLLMBackend(device="cpu", model_path=str(good))


def test_snn_loads_real_student(snn, good):
    assert not snn.is_stub and snn.model_kind == "state_dict" and snn.stub_reason is None
    assert snn.tokenizer_source == "config:gpt2"
    assert snn.metadata["model_type"] == "SpikingStudentLM"
    assert snn.config == {"tokenizer_name": "gpt2"}
    assert snn.snn_config["num_timesteps"] == 4 and snn.architecture["dim"] == 16
    assert snn.metadata_path == good.parent / "metadata.json"
    assert snn.max_context == 48
    logits = snn.model(torch.tensor([[1, 2, 3]]))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, 50257)


def test_snn_greedy_matches_full_recomputation(snn, gpt2):
    text = snn.generate(PROMPT, max_tokens=16)
    assert text and text == gpt2.decode(snn.last_token_ids)
    assert snn.last_token_ids == argmax_loop(snn.model, gpt2.encode(PROMPT), 16, gpt2.eos_token_id)
    assert "".join(snn.stream(PROMPT, max_tokens=16)) == text


def test_snn_seeded_sampling(snn):
    kw = {"max_tokens": 12, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    rng = torch.get_rng_state()
    a = snn.generate(PROMPT, seed=123, **kw)
    assert snn.generate(PROMPT, seed=123, **kw) == a
    assert "".join(snn.stream(PROMPT, seed=123, **kw)) == a
    assert len({snn.generate(PROMPT, seed=s, **kw) for s in range(4)}) > 1
    assert torch.equal(torch.get_rng_state(), rng)


def test_snn_stop_strings(snn):
    full = snn.generate(PROMPT, max_tokens=16)
    stop = full[4:7]
    assert stop and snn.generate(PROMPT, max_tokens=16, stop=stop) == full[: full.find(stop)]
    assert snn.generate(PROMPT, max_tokens=16, stop=["\x00never"]) == full


def test_snn_edge_prompts(snn, gpt2):
    eos = gpt2.eos_token_id
    assert snn.generate(PROMPT, max_tokens=0) == ""
    snn.generate("", max_tokens=4)  # an empty prompt starts from GPT-2's <|endoftext|>
    assert snn.last_token_ids == argmax_loop(snn.model, [eos], 4, eos)
    snn.generate(TRICKY, max_tokens=4)
    assert snn.last_token_ids == argmax_loop(snn.model, gpt2.encode(TRICKY), 4, eos)
    long_prompt = "glasses " * 400
    snn.generate(long_prompt, max_tokens=6)  # the prompt's last 48 - 6 tokens, then 6 new ones
    assert snn.last_token_ids == argmax_loop(snn.model, gpt2.encode(long_prompt)[-42:], 6, eos)
    # more new tokens than the 48-token context: the window slides, seeded output is reproducible
    sampled = snn.generate(long_prompt, max_tokens=60, temperature=1.0, seed=0)
    assert len(snn.last_token_ids) == 60 and eos not in snn.last_token_ids
    assert snn.generate(long_prompt, max_tokens=60, temperature=1.0, seed=0) == sampled


def test_src_entry_point_reexports():
    from src.llm_snn_backend import HFBackend as H
    from src.llm_snn_backend import LLMBackend as L
    from src.llm_snn_backend import SNNLLMBackend as S

    assert S is SNNLLMBackend and H is HFBackend and L is LLMBackend


# ---- fallbacks and strict mode -------------------------------------------------------------------


def test_missing_student_gives_loud_stub(tmp_path):
    with pytest.warns(RuntimeWarning) as rec:
        b = SNNLLMBackend(device="cpu", model_path=str(tmp_path / "student.pt"))
    msgs = [str(w.message) for w in rec]
    assert any("metadata" in m and "not found" in m for m in msgs)
    assert any("SNNLLMBackend is running a STUB model" in m and "placeholder" in m for m in msgs)
    assert b.is_stub and b.model_kind == "stub" and b.metadata == {}
    out = b.generate(PROMPT, max_tokens=12)
    assert out == b.generate(PROMPT, max_tokens=12) and "stub" in out
    assert out.startswith(STUB_TEXT[:6])
    assert b.generate(PROMPT, max_tokens=12, temperature=1.5, seed=4) == out  # deterministic text
    logits = b.model(torch.tensor([b.tokenizer.encode(PROMPT) + b.last_token_ids]))
    assert logits.shape[:2] == (1, 4 + 12)
    assert logits[0, 3 : 3 + 12].argmax(-1).tolist() == b.last_token_ids


def test_strict_missing_student_raises(tmp_path, good):
    with pytest.raises(ArtifactNotFoundError) as ei:
        SNNLLMBackend(device="cpu", model_path=str(tmp_path / "student.pt"), strict=True)
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, ArtifactError)
    assert "not found" in str(ei.value)
    with pytest.raises(FileNotFoundError):
        SNNLLMBackend(device="cpu", model_path=str(good), metadata_path=str(tmp_path / "nope.json"), strict=True)


def test_missing_metadata_warns(good, tmp_path):
    with pytest.warns(RuntimeWarning, match="metadata"):
        b = SNNLLMBackend(device="cpu", model_path=str(good), metadata_path=str(tmp_path / "elsewhere.json"))
    assert b.metadata == {} and b.config == {} and b.snn_config == {}
    assert b.is_stub and "architecture" in b.stub_reason  # a state dict alone cannot be rebuilt
    out = b.generate(PROMPT, max_tokens=12)  # the stub's placeholder text, never a model's
    assert out.startswith(STUB_TEXT[:6]) and "stub" in out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # pytest.warns re-emits the unmatched ones
def test_malformed_metadata_warns(good, tmp_path):
    bad = tmp_path / "metadata.json"
    bad.write_text("{ this is not json")
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        b = SNNLLMBackend(device="cpu", model_path=str(good), metadata_path=str(bad))
    assert b.metadata == {} and b.is_stub
    bad.write_text("[1, 2, 3]")
    with pytest.warns(RuntimeWarning, match="JSON object"):
        assert SNNLLMBackend(device="cpu", model_path=str(good), metadata_path=str(bad)).metadata == {}
    with pytest.raises(ArtifactError, match="not valid JSON|JSON object"):
        SNNLLMBackend(device="cpu", model_path=str(good), metadata_path=str(bad), strict=True)


@pytest.mark.parametrize(
    "meta_cfg, match",
    [
        ({**TINY, "dim": 32}, r"mismatch for \S+: weights have \((50257, )?16,?\), metadata .*\((50257, )?32,?\)"),
        ({**TINY, "vocab_size": 1000}, r"vocabulary mismatch .*\(1000, 16\)"),
    ],
)
def test_weights_mismatching_metadata(tmp_path, good, meta_cfg, match):
    sd = torch.load(good, weights_only=True)
    path, _ = write_artifacts(tmp_path, StudentConfig(**meta_cfg), state_dict=sd)
    with pytest.raises(ArtifactError, match=match):
        SNNLLMBackend(device="cpu", model_path=str(path), strict=True)
    with pytest.warns(RuntimeWarning, match="STUB") as rec:
        b = SNNLLMBackend(device="cpu", model_path=str(path))
    assert b.is_stub and any(re.search(match, str(w.message)) for w in rec)


def test_strict_tokenizer_failure(good):
    with pytest.raises(ArtifactError, match="tokenizer"):
        SNNLLMBackend(device="cpu", model_path=str(good), tokenizer_name="/no/such/tokenizer", strict=True)
    with pytest.warns(RuntimeWarning, match="override"):
        b = SNNLLMBackend(device="cpu", model_path=str(good), tokenizer_name="/no/such/tokenizer")
    assert b.tokenizer_source == "config:gpt2" and not b.is_stub


def test_tokenizer_saved_in_artifact_folder(tmp_path):
    tok = make_tiny_tokenizer()
    cfg = StudentConfig(vocab_size=len(tok), dim=16, depth=1, num_heads=2, max_seq_len=32)
    path, model = write_artifacts(tmp_path, cfg, tokenizer_name="not/used-artifact-wins", tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = SNNLLMBackend(device="cpu", model_path=str(path))
    assert b.tokenizer_source == f"artifact:{tmp_path}" and not b.is_stub
    out = b.generate("hello world", max_tokens=10)
    prompt_text = tok.decode(tok.encode("hello world"), skip_special_tokens=True)
    full = tok.decode(tok.encode("hello world") + b.last_token_ids, skip_special_tokens=True)
    assert full.startswith(prompt_text) and out == full[len(prompt_text) :]  # decoded after the prompt
    assert b.last_token_ids == argmax_loop(b.model, tok.encode("hello world"), 10, tok.eos_token_id)
    # a tokenizer bigger than the student's vocabulary is refused in strict mode, warned otherwise
    with pytest.raises(ArtifactError, match="vocabulary mismatch"):
        SNNLLMBackend(device="cpu", model_path=str(path), tokenizer_name="gpt2", strict=True)
    with pytest.warns(RuntimeWarning, match="vocabulary mismatch"):
        b = SNNLLMBackend(device="cpu", model_path=str(path), tokenizer_name="gpt2")
    b.generate(PROMPT, max_tokens=3)  # prompt ids past the student's 15 words are replaced, never fed
    assert b.vocab_size == len(tok) and all(0 <= t < len(tok) for t in b.last_token_ids)
    assert b.last_token_ids == argmax_loop(b.model, b._in_vocab(b.tokenizer.encode(PROMPT)), 3, b.eos_token_id)


def make_tiny_tokenizer():
    """A 15-entry word-level Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]"] + "hello world the glasses are smart and see you later a b c".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_not_executed(tmp_path, good):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "student.pt"
    torch.save({"embed.weight": torch.zeros(2, 2), "payload": _Evil(marker)}, evil)
    (tmp_path / "metadata.json").write_bytes((good.parent / "metadata.json").read_bytes())
    with pytest.warns(RuntimeWarning, match="STUB"):
        b = SNNLLMBackend(device="cpu", model_path=str(evil))
    assert b.is_stub and not marker.exists()
    with pytest.raises(ArtifactError):
        SNNLLMBackend(device="cpu", model_path=str(evil), strict=True)
    assert not marker.exists()


def test_truncated_student_falls_back(tmp_path, good):
    data = good.read_bytes()
    (tmp_path / "student.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "metadata.json").write_bytes((good.parent / "metadata.json").read_bytes())
    with pytest.warns(RuntimeWarning, match="STUB"):
        assert SNNLLMBackend(device="cpu", model_path=str(tmp_path / "student.pt")).is_stub
    with pytest.raises(ArtifactError):
        SNNLLMBackend(device="cpu", model_path=str(tmp_path / "student.pt"), strict=True)


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.cumsum(self.embed(input_ids), dim=1)
        return self.head(torch.tanh(h))


def test_torchscript_student(tmp_path, good, gpt2):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
        torch.jit.script(_TinyLM(len(gpt2))).save(str(tmp_path / "student.pt"))
    (tmp_path / "metadata.json").write_bytes((good.parent / "metadata.json").read_bytes())
    path = str(tmp_path / "student.pt")
    # a TorchScript archive runs the code it carries: refused unless the caller opts in
    with pytest.warns(RuntimeWarning, match="TorchScript archive.*allow_torchscript=True"):
        refused = SNNLLMBackend(device="cpu", model_path=path)
    assert refused.is_stub and refused.model_kind == "stub" and "allow_torchscript" in refused.stub_reason
    with pytest.raises(ArtifactError, match="allow_torchscript=True"):
        SNNLLMBackend(device="cpu", model_path=path, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = SNNLLMBackend(device="cpu", model_path=path, allow_torchscript=True, strict=True)
    assert b.model_kind == "torchscript" and not b.is_stub and b.max_context == 48
    b.generate(PROMPT, max_tokens=8)
    assert b.last_token_ids == argmax_loop(b.model, gpt2.encode(PROMPT), 8, gpt2.eos_token_id)
    long_prompt = "x " * 100  # beyond the 48-token context, and no KV cache: the window is recomputed
    b.generate(long_prompt, max_tokens=6)
    assert b.last_token_ids == argmax_loop(b.model, gpt2.encode(long_prompt)[-42:], 6, gpt2.eos_token_id)
    assert len(b.generate(long_prompt, max_tokens=60, temperature=1.0, seed=0)) and len(b.last_token_ids) == 60


def test_stub_model_contract():
    m = StubSNNModel(50, [7, 8, 9])
    out = m(torch.tensor([[1, 2], [7, 8]]))
    assert out.shape == (2, 2, 50)
    assert out[0].argmax(-1).tolist() == [7, 7] and out[1].argmax(-1).tolist() == [8, 9]
    assert m([[1, 2]]).shape == (1, 2, 50)  # numpy array for non-tensor input is fine too


def test_backend_without_torch_and_transformers(tmp_path, good):
    """The module imports and serves stub text where torch / transformers are not installed."""
    code = textwrap.dedent(
        f"""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "tokenizers"):
                    raise ImportError("blocked " + name)
                return None
        sys.meta_path.insert(0, Block())
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as rec:
            from src.llm_snn_backend import SNNLLMBackend
            b = SNNLLMBackend(device="cpu", model_path={str(good)!r})
        assert b.is_stub and b.tokenizer_source == "whitespace-stub", b
        assert any("transformers is not installed" in str(w.message) for w in rec)
        assert any("STUB model" in str(w.message) and "PyTorch" in str(w.message) for w in rec)
        out = b.generate("Hello from the glasses", max_tokens=6)
        n = len(b.last_token_ids)
        assert out == b.generate("Hello from the glasses", max_tokens=6, temperature=0.8, seed=1)
        assert "".join(b.stream("x", max_tokens=6)) == b.generate("x", max_tokens=6)
        assert b.generate("", max_tokens=0) == ""
        print(repr(out), n)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        logits = b.model([[1, 2, 3]])
        print(type(logits).__name__, getattr(logits, "shape", None))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[stub]" in r.stdout and " 6\n" in r.stdout


# ---- property tests ------------------------------------------------------------------------------

_PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_GEN_ARGS = {
    "prompt": st.text(max_size=40),
    "max_tokens": st.integers(0, 8),
    "temperature": st.one_of(st.none(), st.just(0.0), st.floats(0.05, 3.0)),
    "top_k": st.one_of(st.none(), st.integers(0, 60000)),
    "top_p": st.one_of(st.none(), st.floats(0.01, 1.0)),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
}


def _check_generate(b, prompt, max_tokens, temperature, top_k, top_p, seed):
    out = b.generate(prompt, max_tokens, temperature, top_k, top_p, None, seed)
    assert isinstance(out, str)
    assert len(b.last_token_ids) <= max_tokens
    if max_tokens == 0:
        assert out == ""
    if seed is not None or not temperature:
        assert b.generate(prompt, max_tokens, temperature, top_k, top_p, None, seed) == out


@_PROPS
@given(**_GEN_ARGS)
def test_snn_generate_properties(snn, prompt, max_tokens, temperature, top_k, top_p, seed):
    _check_generate(snn, prompt, max_tokens, temperature, top_k, top_p, seed)


@pytest.fixture(scope="module")
def stub_ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("stub")
    return quiet(SNNLLMBackend, model_path=str(d / "student.pt"), tokenizer_name="whitespace")


@_PROPS
@given(**_GEN_ARGS)
def test_stub_generate_properties(stub_ws, prompt, max_tokens, temperature, top_k, top_p, seed):
    assert stub_ws.is_stub and isinstance(stub_ws.tokenizer, WhitespaceTokenizer)
    _check_generate(stub_ws, prompt, max_tokens, temperature, top_k, top_p, seed)


def test_metadata_json_written_like_artifacts(good):
    meta = json.loads((good.parent / "metadata.json").read_text())
    assert meta["vocab_size"] == 50257 and meta["config"]["tokenizer_name"] == "gpt2"
