"""`SNNLLMBackend`: serve a distilled `SpikingStudentLM` (student.pt + metadata.json).

Loading, as in the guide's "Consuming artifacts with SNNLLMBackend":

* metadata: `metadata.json` beside `student.pt` unless `metadata_path` is given; its `config`,
  `snn_config`, `architecture` and tokenizer hint (`config["tokenizer_name"]`) are parsed. Missing or
  malformed -> warning and empty defaults (`self.metadata == {}`).
* tokenizer: `resolve_tokenizer(tokenizer_name, <folder of student.pt>, config["tokenizer_name"])`
  (override, artifact folder, metadata hint, vendored GPT-2, whitespace stub).
* model: with `allow_torchscript=True`, TorchScript via `torch.jit.load` first; then a state dict
  loaded with `weights_only=True` (a crafted pickle cannot run code) into a `SpikingStudentLM` rebuilt
  from the metadata. A TorchScript archive is a program: loading one runs the code it carries, so it is
  refused unless the caller trusts the file and opts in with `allow_torchscript=True` (refused like
  any unloadable file: a stub, or `ArtifactError` with `strict=True`). Training writes state dicts.
* anything missing or unloadable -> a deterministic STUB model (loud warning, `is_stub == True`) so
  demos keep running; `strict=True` raises `ArtifactError` (a `FileNotFoundError` too when a file
  is missing) instead of taking any fallback, tokenizer fallbacks included.

torch and transformers are imported lazily: without them this module still imports and the
backend runs as a stub with the whitespace tokenizer.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import ArtifactError, read_metadata  # torch-free on import
from ..tokenizer import TokenizerError, resolve_tokenizer
from .base import TokenizerVocabBackend, torch_or_none

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = "artifacts/snn_student/student.pt"
STUB_TEXT = " [stub] SNN student not loaded: this is placeholder text."


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """A required artifact file does not exist (both an `ArtifactError` and a `FileNotFoundError`)."""


def _warn(msg: str, loud: bool = False) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    if loud:  # the stub announcement also goes to the logs of services that filter warnings
        logger.warning(msg)
    else:
        logger.debug(msg)


def _section(meta: dict[str, Any], name: str) -> dict[str, Any]:
    v = meta.get(name)
    return dict(v) if isinstance(v, dict) else {}


class StubSNNModel:
    """Deterministic placeholder LM used when no student could be loaded. Output is NOT a model's.

    It cycles through the token ids of `STUB_TEXT`: the logits after a sequence put all mass (0.0,
    every other entry -inf) on the next token of the cycle, so greedy and sampled generation give
    the same text. `model(input_ids [B, S]) -> logits [B, S, V]` (a torch tensor when torch is
    installed, else a numpy array, else nested lists) agrees with the step-by-step decode.
    """

    is_stub = True

    def __init__(self, vocab_size: int, cycle_ids: Sequence[int]) -> None:
        self.vocab_size = int(vocab_size)
        ids = [int(i) for i in cycle_ids if 0 <= int(i) < self.vocab_size]
        self.cycle = ids or [min(2, self.vocab_size - 1)]

    def next_state(self, state: int, token_id: int) -> int:
        """State = how far into the cycle we are; a token that does not follow it restarts the cycle."""
        p = len(self.cycle)
        if token_id == self.cycle[state % p]:
            return state + 1
        return 1 if token_id == self.cycle[0] else 0

    def step_logits(self, state: int) -> Any:
        target = self.cycle[state % len(self.cycle)]
        torch = torch_or_none()
        if torch is not None:
            x = torch.full((self.vocab_size,), float("-inf"))
            x[target] = 0.0
            return x
        x = [float("-inf")] * self.vocab_size
        x[target] = 0.0
        return x

    def __call__(self, input_ids: Any) -> Any:
        torch = torch_or_none()
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else [list(r) for r in input_ids]
        if rows and not isinstance(rows[0], list):
            rows = [rows]
        targets = []
        for row in rows:
            state, tr = 0, []
            for t in row:
                state = self.next_state(state, int(t))
                tr.append(self.cycle[state % len(self.cycle)])
            targets.append(tr)
        b, s = len(rows), (len(rows[0]) if rows else 0)
        if torch is not None:
            out = torch.full((b, s, self.vocab_size), float("-inf"))
            if s:
                out.scatter_(2, torch.tensor(targets, dtype=torch.long).unsqueeze(-1), 0.0)
            return out
        try:
            import numpy as np
        except Exception:
            np = None
        if np is not None:
            out = np.full((b, s, self.vocab_size), -np.inf, dtype=np.float32)
            for i, tr in enumerate(targets):
                for j, t in enumerate(tr):
                    out[i, j, t] = 0.0
            return out
        return [[_one_hot(self.vocab_size, t) for t in tr] for tr in targets]


def _one_hot(v: int, t: int) -> list[float]:
    x = [float("-inf")] * v
    x[t] = 0.0
    return x


class SNNLLMBackend(TokenizerVocabBackend):
    """Text generation with a distilled spiking student (see the module docstring for loading).

    Attributes: `model` (callable `input_ids [B, S] -> logits [B, S, V]`), `tokenizer`,
    `tokenizer_source`, `metadata`, `config`, `snn_config`, `architecture`, `model_kind`
    (`"torchscript"`, `"state_dict"` or `"stub"`), `is_stub`, `stub_reason`, `max_context`, and for a
    student distilled on the teacher's replies `chat_template` (`generate(prompt)` formats plain prompts
    with it, `raw=True` skips it) with `default_min_tokens` = 1 (never an empty or blank reply).
    """

    def __init__(
        self,
        model_path: str = DEFAULT_MODEL_PATH,
        metadata_path: str | None = None,
        tokenizer_name: str | None = None,
        device: str | None = None,
        strict: bool = False,
        allow_torchscript: bool = False,
    ) -> None:
        super().__init__()
        self.model_path = Path(model_path)
        default_meta = self.model_path.parent / "metadata.json"
        self.metadata_path = Path(metadata_path) if metadata_path else default_meta
        self.strict = bool(strict)
        self.allow_torchscript = bool(allow_torchscript)  # TorchScript runs code: opt in for trusted files
        self.stub_reason: str | None = None

        self.metadata = self._load_metadata()
        self.config = _section(self.metadata, "config")
        self.snn_config = _section(self.metadata, "snn_config")
        self.architecture = _section(self.metadata, "architecture")
        # The teacher's name is a second hint: the student shares the teacher's tokenizer.
        hint = self.config.get("tokenizer_name") or _section(self.metadata, "training_config").get("teacher_model")
        self.tokenizer_hint = str(hint) if hint else None

        try:
            self.tokenizer, self.tokenizer_source = resolve_tokenizer(
                tokenizer_name,
                self.model_path.parent,
                self.tokenizer_hint,
                strict=self.strict,
                stub_vocab_size=self._meta_vocab_size(),
            )
        except TokenizerError as e:
            raise ArtifactError(f"tokenizer: {e}") from e
        self.device = self._pick_device(device)
        self.model, self.model_kind = self._load_model()
        self._step_api = hasattr(self.model, "forward_step") and self.model_kind != "stub"
        # Cached decoding (one position per new token); False recomputes the whole window each step.
        self.use_cache = self._step_api
        self.is_stub = self.model_kind == "stub"
        self._setup_vocab()
        self._setup_prompt_format(self.metadata)

    # ---- loading ----------------------------------------------------------------------------
    def _fail(self, msg: str, exc: BaseException | None = None, missing: bool = False) -> None:
        """strict: raise; otherwise only record (the caller takes the fallback)."""
        if self.strict:
            cls = ArtifactNotFoundError if missing else ArtifactError
            raise cls(msg) from exc

    def _load_metadata(self) -> dict[str, Any]:
        path = self.metadata_path
        if not path.is_file():
            msg = f"SNNLLMBackend: metadata {path} not found"
            self._fail(msg, missing=True)
            _warn(msg + "; continuing with empty metadata (no config, snn_config or tokenizer hint)")
            return {}
        try:
            return read_metadata(path)
        except ArtifactError as e:
            self._fail(f"SNNLLMBackend: {e}", e)
            _warn(f"SNNLLMBackend: {e}; continuing with empty metadata")
        return {}

    def _meta_vocab_size(self) -> int | None:
        for v in (self.architecture.get("vocab_size"), self.metadata.get("vocab_size")):
            try:
                if v is not None and int(v) >= 3:
                    return int(v)
            except (TypeError, ValueError):
                pass
        return None

    def _pick_device(self, device: str | None) -> str:
        if device:
            return str(device)
        torch = torch_or_none()
        return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"

    def _load_model(self) -> tuple[Any, str]:
        path = self.model_path
        if not path.is_file():
            return self._stub(f"{path} not found (train a student or pass model_path=...)", missing=True)
        torch = torch_or_none()
        if torch is None:
            return self._stub("PyTorch is not installed")
        if _is_torchscript(path):
            if not self.allow_torchscript:
                return self._stub(
                    f"{path} is a TorchScript archive, which runs the code it carries when loaded; pass "
                    "allow_torchscript=True if you trust the file, or load a state dict written by training"
                )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit.load is deprecated in recent torch
                    model = torch.jit.load(str(path), map_location=self.device)
                model.eval()
                return model, "torchscript"
            except Exception as e:
                logger.info("torch.jit.load(%s) failed (%s); trying a state dict", path, e)
        try:
            from ..artifacts import build_student, load_state_dict_file, verify_checksum

            state_dict = load_state_dict_file(path, map_location="cpu")
            try:
                verify_checksum(path, self.metadata)
            except ArtifactError as e:
                self._fail(str(e), e)
                _warn(f"SNNLLMBackend: {e}; loading anyway")
            if not self.metadata:
                raise ArtifactError(
                    f"no usable metadata ({self.metadata_path}): the student's architecture is unknown, so "
                    f"{path} cannot be rebuilt"
                )
            model = build_student(self.metadata, state_dict)
        except Exception as e:
            if isinstance(e, ArtifactError) and self.strict:
                raise
            return self._stub(f"{type(e).__name__}: {e}", exc=e)
        return model.to(self.device).eval(), "state_dict"

    def _stub(self, reason: str, exc: BaseException | None = None, missing: bool = False) -> tuple[Any, str]:
        self._fail(f"SNNLLMBackend cannot load the student: {reason}", exc, missing=missing)
        self.stub_reason = reason
        _warn(
            f"SNNLLMBackend is running a STUB model: {reason}. The generated text is placeholder, "
            "not the output of a trained student.",
            loud=True,
        )
        cycle = [int(i) for i in self.tokenizer.encode(STUB_TEXT)]
        return StubSNNModel(len(self.tokenizer), cycle), "stub"

    def _setup_vocab(self) -> None:
        """Check the tokenizer fits the model's vocabulary; compute the context length."""
        self.vocab_size = len(self.tokenizer)
        self._mask_from: int | None = None
        self.max_context = None
        if self.is_stub:
            return
        cfg = getattr(self.model, "config", None)
        model_vocab = getattr(cfg, "vocab_size", None) or self._meta_vocab_size()
        ctx = getattr(cfg, "max_seq_len", None) or self.architecture.get("max_seq_len")
        self.max_context = int(ctx) if ctx else None
        if model_vocab is None:
            return
        model_vocab = int(model_vocab)
        n_tok = len(self.tokenizer)
        if n_tok > model_vocab:
            msg = (
                f"vocabulary mismatch: tokenizer ({self.tokenizer_source}) has {n_tok} entries but the "
                f"student's vocab_size is {model_vocab}; pass tokenizer_name= the tokenizer used in training"
            )
            self._fail(msg)
            _warn(f"SNNLLMBackend: {msg}; ids >= {model_vocab} are replaced")
        elif n_tok < model_vocab:
            self._mask_from = n_tok  # padded vocab: never sample ids the tokenizer cannot decode
        self.vocab_size = model_vocab

    # ---- LLMBackend hooks -------------------------------------------------------------------
    def _logits_row(self, out: Any) -> Any:
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = out["logits"]
        x = out[0, -1].float()
        if self._mask_from is not None:
            x[self._mask_from :] = float("-inf")
        return x

    def _start(self, prompt_ids: list[int]) -> tuple[Any, Any]:
        if self.is_stub:
            state = 0
            for t in prompt_ids:
                state = self.model.next_state(state, t)
            return state, self.model.step_logits(state)
        import torch

        x = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            if self.use_cache:
                logits, past = self.model.forward_step(x, None)
                return self._pack(past), self._logits_row(logits)
            return list(prompt_ids), self._logits_row(self.model(x))

    def _packs_cache(self) -> bool:
        """A spiking SpikingStudentLM's decode cache is 0/1 (counts 0..T when count-coded): kept as
        packed uint8 between steps."""
        cfg = getattr(self.model, "config", None)
        return bool(getattr(cfg, "spiking", False)) and hasattr(cfg, "head_dim")

    def _pack(self, past: Any) -> Any:
        from ..student import pack_kv_cache

        if not self._packs_cache():
            return past
        return pack_kv_cache(past, count_coded=self.model.config.count_coded)

    def _unpack(self, state: Any) -> Any:
        from ..student import unpack_kv_cache

        if not self._packs_cache():
            return state
        cfg = self.model.config
        return unpack_kv_cache(state, cfg.head_dim, count_coded=cfg.count_coded)

    def _advance(self, state: Any, token_id: int) -> tuple[Any, Any]:
        if self.is_stub:
            state = self.model.next_state(state, token_id)
            return state, self.model.step_logits(state)
        import torch

        with torch.inference_mode():
            if self.use_cache:
                x = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
                logits, past = self.model.forward_step(x, self._unpack(state))
                return self._pack(past), self._logits_row(logits)
            ids = state + [token_id]  # TorchScript without forward_step: recompute the window
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            return ids, self._logits_row(self.model(x))

    def __repr__(self) -> str:
        return (
            f"SNNLLMBackend(model_path={str(self.model_path)!r}, model={self.model_kind}, "
            f"tokenizer={self.tokenizer_source}, stub={self.is_stub})"
        )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold `constants.pkl` and `code/`; plain `torch.save` files do not."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


__all__ = ["ArtifactError", "ArtifactNotFoundError", "SNNLLMBackend", "StubSNNModel", "STUB_TEXT"]
