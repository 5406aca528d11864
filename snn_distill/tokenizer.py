"""Tokenizer loading with offline fallbacks.

`resolve_tokenizer` picks the tokenizer a backend should use, in this order (each fallback taken is
announced with `warnings.warn`):

1. the user's override (any Hugging Face id or local path);
2. tokenizer files saved in the artifact folder (`tokenizer.json` / `tokenizer_config.json`);
3. `config["tokenizer_name"]` from `metadata.json` (any Hugging Face id or local path);
4. GPT-2: the copy vendored in `snn_distill/assets/gpt2/` first, the Hub's `gpt2` only if that fails;
5. `WhitespaceTokenizer`, a stub, when transformers is not importable or everything above failed.

GPT-2 is loaded from the vendored files *before* the Hub on purpose: they are byte-identical to the
Hub's `vocab.json` / `merges.txt` (50257 entries), need no network, and give the same ids on every
machine, so CI and demos behave the same online and offline.

Hub ids never hang offline: the local HF cache is tried first with `local_files_only=True`; the
network is tried only when `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` is unset and a quick TCP probe
of the endpoint succeeds (otherwise huggingface_hub retries for ~45 s); any error is caught.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GPT2_ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "gpt2"
GPT2_VOCAB_SIZE = 50257
GPT2_EOS = "<|endoftext|>"
GPT2_HUB_IDS = ("gpt2", "openai-community/gpt2")
WHITESPACE_NAMES = ("whitespace", "whitespace-stub")

_TRUTHY = {"1", "true", "yes", "on"}


class TokenizerError(RuntimeError):
    """No tokenizer could be loaded from the requested source (raised in strict mode)."""


def hub_offline() -> bool:
    """True when the user asked Hugging Face libraries to stay offline."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return True
    return False


def hub_kwargs() -> dict[str, Any]:
    """Extra `from_pretrained` kwargs: `local_files_only=True` when offline mode is requested."""
    return {"local_files_only": True} if hub_offline() else {}


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the Hub endpoint (cached per process).

    Without it an unreachable Hub costs ~45 s of retries per `from_pretrained` call. With a proxy
    configured the probe is skipped (a direct connection proves nothing) and the Hub is assumed up.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint in _REACHABLE:
        return _REACHABLE[endpoint]
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(v) for v in proxies):
        _REACHABLE[endpoint] = True
        return True
    import socket
    from urllib.parse import urlparse

    u = urlparse(endpoint)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "huggingface.co", port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _REACHABLE[endpoint] = ok
    return ok


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Whitespace stub
# --------------------------------------------------------------------------------------------------


class WhitespaceTokenizer:
    """STUB tokenizer: splits on whitespace and hashes each word to an id. Not a real vocabulary.

    It exists so that the backends keep working (with placeholder output) where transformers is not
    installed or no tokenizer can be loaded. Ids are deterministic across processes (CRC32 of the
    UTF-8 word modulo the vocabulary), `decode` maps ids back through a table of the words seen so far
    and prints `<unk>` for the others. Id 0 is `<unk>`, id 1 is `<eos>` (also used for padding).
    It implements only the subset of the Hugging Face tokenizer interface the backends use.
    """

    is_stub = True
    unk_token = "<unk>"
    eos_token = "<eos>"
    pad_token = "<eos>"
    bos_token = None
    unk_token_id = 0
    eos_token_id = 1
    pad_token_id = 1
    bos_token_id = None
    name_or_path = "whitespace-stub"

    def __init__(self, vocab_size: int = GPT2_VOCAB_SIZE) -> None:
        if int(vocab_size) < 3:
            raise ValueError(f"WhitespaceTokenizer needs vocab_size >= 3, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self._words: dict[int, str] = {}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WhitespaceTokenizer(vocab_size={self.vocab_size}, STUB)"

    def _word_id(self, word: str) -> int:
        if word == self.unk_token:
            return self.unk_token_id
        if word == self.eos_token:
            return self.eos_token_id
        h = zlib.crc32(word.encode("utf-8", "surrogatepass"))
        return 2 + h % (self.vocab_size - 2)

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        ids = []
        for word in str(text).split():
            i = self._word_id(word)
            if i >= 2:
                self._words.setdefault(i, word)
            ids.append(i)
        return ids

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        ids = self.encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = True, **_: Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                if not skip_special_tokens:
                    words.append(self.eos_token)
                continue
            words.append(self._words.get(i, self.unk_token))
        return " ".join(words)


# --------------------------------------------------------------------------------------------------
# Hugging Face loaders
# --------------------------------------------------------------------------------------------------


def _check_nonempty(tok: Any, source: str) -> Any:
    n = len(tok)
    if n < 2:
        raise TokenizerError(f"tokenizer from {source} is empty ({n} entries)")
    return tok


def load_gpt2_tokenizer(assets_dir: str | Path | None = None) -> Any:
    """GPT-2's fast byte-level BPE tokenizer built from the vendored `vocab.json` / `merges.txt`.

    Note: in transformers 5 `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an
    EMPTY tokenizer; the vocabulary and merges must be passed as `vocab=` / `merges=`.
    bos/eos/unk are all `<|endoftext|>` (id 50256); there is no pad token, as on the Hub.
    """
    from transformers import GPT2TokenizerFast

    d = Path(assets_dir) if assets_dir is not None else GPT2_ASSETS_DIR
    with open(d / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    merges = []
    with open(d / "merges.txt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            merges.append((a, b))
    tok = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=GPT2_EOS,
        bos_token=GPT2_EOS,
        eos_token=GPT2_EOS,
        model_max_length=1024,
    )
    tok.name_or_path = "gpt2"
    return _check_nonempty(tok, f"vendored GPT-2 files in {d}")


def _load_local(path: Path) -> Any:
    from transformers import AutoTokenizer

    if path.is_file():
        if path.name.endswith(".json"):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        raise TokenizerError(f"{path} is not a tokenizer.json file or a tokenizer folder")
    has_config = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    if not has_config and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        # A bare GPT-2 style folder: AutoTokenizer cannot tell the model type, build it directly.
        return load_gpt2_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_hf_tokenizer(name_or_path: str) -> Any:
    """Load any Hugging Face tokenizer by Hub id or local path (file or folder); raises on failure."""
    if str(name_or_path).strip().lower() in GPT2_HUB_IDS:
        try:
            return load_gpt2_tokenizer()
        except Exception as e:  # vendored files missing: try the Hub below
            logger.debug("vendored GPT-2 tokenizer failed (%s); trying the Hub", e)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _check_nonempty(_load_local(path), str(path))
    return _check_nonempty(_from_hub(str(name_or_path)), str(name_or_path))


def _from_hub(name: str) -> Any:
    """`AutoTokenizer.from_pretrained(name)`: the local cache first, the network only if reachable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:
        if hub_offline() or not hub_reachable():
            raise
    return AutoTokenizer.from_pretrained(name)


def _artifact_has_tokenizer(artifact_dir: Path) -> bool:
    return (artifact_dir / "tokenizer.json").is_file() or (artifact_dir / "tokenizer_config.json").is_file()


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    logger.debug(msg)


def resolve_tokenizer(
    override: str | None,
    artifact_dir: str | Path | None,
    config_name: str | None,
    *,
    strict: bool = False,
    stub_vocab_size: int | None = None,
) -> tuple[Any, str]:
    """Pick a tokenizer: override, artifact folder, `config["tokenizer_name"]`, GPT-2, whitespace stub.

    Returns `(tokenizer, source)` where source is one of `"override:<name>"`, `"artifact:<dir>"`,
    `"config:<name>"`, `"gpt2-vendored"`, `"gpt2-hub"`, `"whitespace-stub"`.

    With `strict=True` a source that was asked for (override, artifact files, config name) and fails
    raises `TokenizerError` instead of falling back; GPT-2 is still used when nothing names a
    tokenizer (it is the documented default), the whitespace stub never is.
    `stub_vocab_size` sizes the whitespace stub (default: GPT-2's 50257).
    """
    stub_size = int(stub_vocab_size) if stub_vocab_size else GPT2_VOCAB_SIZE
    if override is not None and str(override).strip().lower() in WHITESPACE_NAMES:
        return WhitespaceTokenizer(stub_size), "whitespace-stub"

    if not transformers_available():
        msg = "transformers is not installed: using the WhitespaceTokenizer STUB (placeholder ids)"
        if strict:
            raise TokenizerError(msg + " (strict mode refuses the stub)")
        _warn(msg)
        return WhitespaceTokenizer(stub_size), "whitespace-stub"

    named = False
    candidates: list[tuple[str, str, Any]] = []
    if override:
        candidates.append(("override", str(override), lambda: load_hf_tokenizer(str(override))))
    if artifact_dir is not None:
        adir = Path(artifact_dir)
        if _artifact_has_tokenizer(adir):
            candidates.append(("artifact", str(adir), lambda: _load_local(adir)))
    if config_name:
        candidates.append(("config", str(config_name), lambda: load_hf_tokenizer(str(config_name))))

    for kind, name, loader in candidates:
        named = True
        try:
            return _check_nonempty(loader(), name), f"{kind}:{name}"
        except Exception as e:
            msg = f"could not load the tokenizer from {kind} {name!r}: {type(e).__name__}: {e}"
            if strict:
                raise TokenizerError(msg) from e
            _warn(msg + "; trying the next source")

    if not named:
        _warn(
            "no tokenizer named (no override, no tokenizer files in the artifact folder, no "
            "config['tokenizer_name'] in metadata): falling back to GPT-2 (vendored copy)"
        )
    else:
        _warn("every named tokenizer failed: falling back to GPT-2 (vendored copy)")
    try:
        return load_gpt2_tokenizer(), "gpt2-vendored"
    except Exception as e:
        _warn(f"vendored GPT-2 tokenizer failed ({type(e).__name__}: {e}); trying the Hub's 'gpt2'")
    try:
        return _check_nonempty(_from_hub("gpt2"), "gpt2"), "gpt2-hub"
    except Exception as e:
        msg = f"GPT-2 tokenizer unavailable from the Hub too ({type(e).__name__}: {e})"
        if strict:
            raise TokenizerError(msg) from e
        _warn(msg + ": using the WhitespaceTokenizer STUB (placeholder ids)")
    return WhitespaceTokenizer(stub_size), "whitespace-stub"


__all__ = [
    "GPT2_ASSETS_DIR",
    "GPT2_VOCAB_SIZE",
    "TokenizerError",
    "WhitespaceTokenizer",
    "hub_kwargs",
    "hub_offline",
    "hub_reachable",
    "load_gpt2_tokenizer",
    "load_hf_tokenizer",
    "resolve_tokenizer",
    "transformers_available",
]
