"""`ONNXSNNBackend`: serve an exported student with ONNX Runtime (no PyTorch model needed).

Files, all in the artifacts folder written by `scripts/export_snn_to_onnx.py`:

* `student.onnx` (or any full graph passed as `onnx_path`, e.g. `student.int8.onnx` or a `.ort` file):
  `input_ids` int64 [batch, seq_len] -> `logits` float32 [batch, seq_len, vocab].
* its decode sibling (`student.decode.onnx`, `student.decode.int8.onnx`, `student.decode.ort`, ...), used
  when present and `prefer_decode_graph=True`: the prompt is run once from an empty key/value cache and
  every generated token costs one position; otherwise the full graph recomputes the whole window for
  each token.
* the tokenizer saved with the artifacts (`resolve_tokenizer(tokenizer_name, artifacts_dir,
  metadata config["tokenizer_name"])`), and `metadata.json` (optional: the graphs carry what they need).

`backend.model(input_ids [B, S])` runs the full graph and returns logits [B, S, V] (a torch tensor when
torch is installed, else a numpy array). Greedy output equals `SNNLLMBackend` on the same student up to
float rounding (a spike whose membrane sits within rounding of the threshold can flip).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import ArtifactError, read_metadata  # torch-free on import
from ..tokenizer import TokenizerError, resolve_tokenizer
from .base import TokenizerVocabBackend, torch_or_none

logger = logging.getLogger(__name__)

ONNX_FILE = "student.onnx"


class ONNXArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """The ONNX file does not exist (both an `ArtifactError` and a `FileNotFoundError`)."""


def decode_sibling(path: str | Path) -> Path:
    """Decode graph that belongs to a full graph: `student.onnx` -> `student.decode.onnx`,
    `student.int8.onnx` -> `student.decode.int8.onnx`, `student.ort` -> `student.decode.ort`."""
    p = Path(path)
    for ext in (".int8.onnx", ".int8.ort", ".onnx", ".ort"):
        if p.name.endswith(ext):
            base = p.name[: -len(ext)]
            mid = ".decode.int8" if ext.startswith(".int8") else ".decode"
            return p.with_name(base + mid + ext.replace(".int8", ""))
    return p.with_name(p.name + ".decode")


def _session(path: Path, providers: Sequence[str] | None, num_threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if num_threads:
        so.intra_op_num_threads = int(num_threads)
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"ONNX Runtime cannot load {path}: {first}; re-export it with scripts/export_snn_to_onnx.py"
        ) from e


class ONNXLogits:
    """Callable `input_ids [B, S]` (torch tensor, numpy array or nested lists) -> logits [B, S, V]."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, ids: Any) -> Any:
        """Numpy in (int64 [B, S]), numpy out (float32 [B, S, V])."""
        return self.session.run(["logits"], {"input_ids": ids})[0]

    def __call__(self, input_ids: Any) -> Any:
        import numpy as np

        if hasattr(input_ids, "detach"):
            input_ids = input_ids.detach().cpu().numpy()
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        out = self.run(ids)
        torch = torch_or_none()
        return torch.from_numpy(out) if torch is not None else out


class ONNXSNNBackend(TokenizerVocabBackend):
    """Text generation with an exported student in ONNX Runtime.

    Attributes: `model` (`ONNXLogits`), `session` / `decode_session` (ONNX Runtime sessions; the latter
    None without a decode graph), `onnx_path`, `decode_path`, `uses_decode_graph`, `tokenizer`,
    `tokenizer_source`, `metadata`, `vocab_size`, `timesteps`, `max_context`.
    Raises `ArtifactError` when the graph is missing or unloadable, or the tokenizer cannot be loaded.
    """

    def __init__(
        self,
        artifacts_dir: str | Path,
        onnx_path: str | Path | None = None,
        tokenizer_name: str | None = None,
        prefer_decode_graph: bool = True,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.artifacts_dir = Path(artifacts_dir)
        self.onnx_path = Path(onnx_path) if onnx_path else self.artifacts_dir / ONNX_FILE
        if not self.onnx_path.is_file():
            raise ONNXArtifactNotFoundError(
                f"{self.onnx_path} not found; export the student first: python scripts/export_snn_to_onnx.py "
                f"--model-path {self.artifacts_dir / 'student.pt'}"
            )
        self.metadata = self._load_metadata()
        self.session = _session(self.onnx_path, providers, num_threads)
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input_ids"]:
            raise ArtifactError(
                f"{self.onnx_path} is not a full graph (inputs {names}); pass student.onnx, its decode graph is "
                "picked up automatically"
            )
        self.props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.model = ONNXLogits(self.session)
        self.vocab_size = self._graph_vocab_size()
        self.timesteps = self._timesteps()
        self.cache_rows = self._cache_rows()

        self.decode_path: Path | None = None
        self.decode_session = None
        candidate = decode_sibling(self.onnx_path)
        if prefer_decode_graph and candidate.is_file():
            self.decode_session = _session(candidate, providers, num_threads)
            self.decode_path = candidate
            self._decode_inputs = [i for i in self.decode_session.get_inputs()]
            self._decode_output_names = [o.name for o in self.decode_session.get_outputs()]
        self.uses_decode_graph = self.decode_session is not None

        hint = (self.metadata.get("config") or {}).get("tokenizer_name") or self.props.get("snn_distill.tokenizer_name")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.tokenizer, self.tokenizer_source = resolve_tokenizer(
                    tokenizer_name, self.artifacts_dir, str(hint) if hint else None, stub_vocab_size=self.vocab_size
                )
        except TokenizerError as e:
            raise ArtifactError(f"tokenizer: {e}") from e
        self._setup_vocab()
        self._setup_prompt_format(self.metadata)

    # ---- loading ----------------------------------------------------------------------------
    def _load_metadata(self) -> dict[str, Any]:
        path = self.artifacts_dir / "metadata.json"
        if not path.is_file():
            return {}
        try:
            return read_metadata(path)
        except ArtifactError as e:
            logger.warning("ONNXSNNBackend: ignoring %s (%s)", path, e)
            return {}

    def _graph_vocab_size(self) -> int:
        shape = self.session.get_outputs()[0].shape
        if shape and isinstance(shape[-1], int):
            return int(shape[-1])
        for v in (self.props.get("snn_distill.vocab_size"), self.metadata.get("vocab_size")):
            if v is not None:
                return int(v)
        raise ArtifactError(f"{self.onnx_path}: the vocabulary size is unknown (dynamic logits dim, no metadata)")

    def _timesteps(self) -> int:
        if "snn_distill.timesteps" in self.props:
            return int(self.props["snn_distill.timesteps"])
        snn = self.metadata.get("snn_config") or {}
        arch = self.metadata.get("architecture") or {}
        if arch.get("student_type") == "ann":
            return 1
        return int(snn.get("num_timesteps", 1))

    def _cache_rows(self) -> int:
        """Decode-cache rows per sequence: T for a temporal spiking student, 1 when count-coded or ANN."""
        if "snn_distill.cache_rows_per_token" in self.props:
            return int(self.props["snn_distill.cache_rows_per_token"])
        count = (self.metadata.get("snn_config") or {}).get("coding") == "count"
        return 1 if count else self.timesteps

    def _setup_vocab(self) -> None:
        n_tok = len(self.tokenizer)
        self._mask_from: int | None = None
        if n_tok > self.vocab_size:
            warnings.warn(
                f"ONNXSNNBackend: tokenizer ({self.tokenizer_source}) has {n_tok} entries but the graph's vocabulary "
                f"is {self.vocab_size}; ids >= {self.vocab_size} are replaced (pass tokenizer_name=)",
                RuntimeWarning,
                stacklevel=3,
            )
        elif n_tok < self.vocab_size:
            self._mask_from = n_tok  # padded vocabulary: never pick ids the tokenizer cannot decode
        ctx = self.props.get("snn_distill.max_seq_len") or (self.metadata.get("architecture") or {}).get("max_seq_len")
        self.max_context = int(ctx) if ctx else None

    # ---- LLMBackend hooks -------------------------------------------------------------------
    def _row(self, logits: Any) -> Any:
        """Last position of logits [1, S, V] -> [V] (torch tensor when torch is installed)."""
        import numpy as np

        x = np.array(logits[0, -1], dtype=np.float32)
        if self._mask_from is not None:
            x[self._mask_from :] = -np.inf
        torch = torch_or_none()
        return torch.from_numpy(x) if torch is not None else x

    def _empty_past(self, batch: int = 1) -> list[Any]:
        import numpy as np

        past = []
        for inp in self._decode_inputs[1:]:
            _, hkv, _, hd = inp.shape
            # a spiking student's cache is uint8 spikes; an ANN twin's is float32
            dtype = np.uint8 if inp.type == "tensor(uint8)" else np.float32
            past.append(np.zeros((self.cache_rows * batch, int(hkv), 0, int(hd)), dtype=dtype))
        return past

    def _step(self, ids: list[int], past: list[Any]) -> tuple[list[Any], Any]:
        import numpy as np

        feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
        feeds.update({inp.name: p for inp, p in zip(self._decode_inputs[1:], past)})
        out = self.decode_session.run(self._decode_output_names, feeds)
        return out[1:], self._row(out[0])

    def _start(self, prompt_ids: list[int]) -> tuple[Any, Any]:
        import numpy as np

        if self.uses_decode_graph:
            return self._step(list(prompt_ids), self._empty_past(1))
        ids = list(prompt_ids)
        return ids, self._row(self.model.run(np.asarray([ids], dtype=np.int64)))

    def _advance(self, state: Any, token_id: int) -> tuple[Any, Any]:
        import numpy as np

        if self.uses_decode_graph:
            return self._step([int(token_id)], state)
        ids = state + [int(token_id)]  # no decode graph: recompute the window
        return ids, self._row(self.model.run(np.asarray([ids], dtype=np.int64)))

    def __repr__(self) -> str:
        return (
            f"ONNXSNNBackend(onnx_path={str(self.onnx_path)!r}, decode_graph={self.uses_decode_graph}, "
            f"tokenizer={self.tokenizer_source})"
        )


__all__ = ["ONNXArtifactNotFoundError", "ONNXLogits", "ONNXSNNBackend", "decode_sibling"]
