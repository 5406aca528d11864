"""Export a trained `SpikingStudentLM` (student.pt + metadata.json) to ONNX, verified with ONNX Runtime.

`export_onnx(model_path)` writes, next to the model unless told otherwise:

* `student.onnx`          full graph: `input_ids` int64 [batch, seq_len] -> `logits` float32
                          [batch, seq_len, vocab], batch and seq_len dynamic, opset 17 by default.
* `student.int8.onnx`     (quantize="int8") the same graph with int8 weights (dynamic quantization;
                          spike operands read exactly, one per-row int8 embedding: `int8.py`).
* `student.decode.onnx`   (decode_graph=True) incremental graph with the key/value spike cache as state:
                          `input_ids` [batch, new_len] + `past_key_<i>` / `past_value_<i>`
                          [T*batch, kv_heads, past_len, head_dim] -> `logits` [batch, new_len, vocab] +
                          `present_key_<i>` / `present_value_<i>` [T*batch, kv_heads, past_len+new_len,
                          head_dim]. past_len may be 0 (start from empty tensors), new_len is normally 1
                          but a whole prompt can be fed in one call. Row block t of the T*batch axis is
                          timestep t. With quantize="int8" also `student.decode.int8.onnx`.
* `<name>.ort`            (ort=True) ONNX Runtime's mobile format for each file above.

The graphs come from the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): it emits the
requested opset directly. The torch.export-based exporter builds opset 18 and down-converts, which
fails on this model (ReduceMean) and leaves external data files behind.

Everything is written into a temporary folder beside the output and renamed into place only after
every requested file was built and checked, so a failure never leaves a partial `.onnx` behind.
Errors are `ExportError` with a one-line message saying what is wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..artifacts import (
    METADATA_FILE,
    ArtifactError,
    load_student,
    read_metadata,
    update_metadata,
    utc_timestamp,
)
from .int8 import quantize_int8

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 14  # first opset with the Trilu / Softmax-on-last-axis forms the exporter emits
ONNX_FILE = "student.onnx"
# protobuf cannot serialise a single message over 2 GiB; keep a margin for the graph itself.
SINGLE_FILE_LIMIT = 2**31 - 2**26
# A spike decision whose membrane sat this close to the threshold in the PyTorch run (times
# max(1, threshold) * sqrt(max(1, dim / 128))) may legitimately come out the other way in ONNX Runtime.
FLIP_MARGIN = 1e-6
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Spiking neurons integrate their input over time and fire when the membrane crosses a threshold.",
    "Turn left at the next crossing, then walk two hundred metres to the station.",
    "Remind me to call my sister tomorrow at nine in the morning.",
    "Once upon a time there was a little robot who wanted to learn how to paint.",
)


class ExportError(RuntimeError):
    """Export failed; the message is one line saying what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def supported_opsets() -> range:
    """Opsets this exporter can write: 14 .. min(installed onnx's newest, TorchScript exporter's newest)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    try:
        from torch.onnx import _constants

        newest = min(newest, int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET))
    except (ImportError, AttributeError):  # pragma: no cover - private constant moved
        newest = min(newest, 20)
    return range(MIN_OPSET, newest + 1)


def _check_opset(opset: Any) -> int:
    ok = supported_opsets()
    try:
        value = int(opset)
    except (TypeError, ValueError):
        raise ExportError(f"opset {opset!r} is not an integer; use --opset {DEFAULT_OPSET}") from None
    if value not in ok:
        raise ExportError(
            f"opset {value} is not supported (supported: {ok.start}-{ok.stop - 1}); use --opset {DEFAULT_OPSET}, "
            "which ONNX Runtime Mobile supports"
        )
    return value


def sibling_path(output: str | Path, kind: str) -> Path:
    """Path of a derived file: kind in {"int8", "decode", "decode.int8"} -> `student.<kind>.onnx`."""
    p = Path(output)
    base = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{base}.{kind}.onnx")


def ort_path(onnx_path: str | Path) -> Path:
    """`x.onnx` -> `x.ort` (ONNX Runtime's mobile format)."""
    return Path(onnx_path).with_suffix(".ort")


def _size_mb(path: Path) -> float:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return round(total / 1e6, 3)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


@contextlib.contextmanager
def _stage(what: str, fix: str) -> Iterator[None]:
    """Turn any unexpected exception inside the block into a one-line ExportError."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:
        log.debug("%s failed", what, exc_info=True)
        raise ExportError(f"{what} failed ({type(e).__name__}: {_first_line(e)}); {fix}") from e


_SESSIONS: dict[str, Any] | None = None  # per-export cache (session creation dominates small exports)


def _ort_session(path: Path):
    import onnxruntime as ort

    key = str(Path(path).resolve())
    if _SESSIONS is not None and key in _SESSIONS:
        return _SESSIONS[key]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    if _SESSIONS is not None:
        _SESSIONS[key] = sess
    return sess


@contextlib.contextmanager
def _session_cache() -> Iterator[None]:
    global _SESSIONS
    outer = _SESSIONS
    _SESSIONS = {} if outer is None else outer
    try:
        yield
    finally:
        _SESSIONS = outer


# --------------------------------------------------------------------------------------------------
# graphs
# --------------------------------------------------------------------------------------------------


def cache_dtype(model):
    """dtype of the decode graph's key/value caches: uint8 spikes for a spiking student (exactly
    0/1: keys are cached before RoPE), float32 for the ANN twin."""
    import torch

    return torch.uint8 if model.config.spiking else torch.float32


def _torch_module_types():
    from torch import nn

    class DecodeStep(nn.Module):
        """`model.forward_step` with the cache flattened into plain tensors for export.

        forward(input_ids [B, S_new], past_key_0, past_value_0, ..., past_key_{L-1}, past_value_{L-1})
        -> (logits [B, S_new, V], present_key_0, present_value_0, ...), caches [T*B, Hkv, S, hd] of
        `cache_dtype(model)` (keys before RoPE).
        """

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.depth = len(model.blocks)
            self.cache_dtype = cache_dtype(model)
            # in eval mode like the model: torch.onnx.export restores the wrapper's mode on the whole
            # tree afterwards, and a training-mode student would calibrate its thresholds when verified
            self.train(model.training)

        def forward(self, input_ids, *past):
            pairs = tuple((past[2 * i].float(), past[2 * i + 1].float()) for i in range(self.depth))
            logits, present = self.model.forward_step(input_ids, pairs)
            return (logits, *[t.to(self.cache_dtype) for kv in present for t in kv])

    return DecodeStep


def decode_io_names(depth: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decode graph for a student with `depth` blocks."""
    ins = ["input_ids"] + [f"past_{kv}_{i}" for i in range(depth) for kv in ("key", "value")]
    outs = ["logits"] + [f"present_{kv}_{i}" for i in range(depth) for kv in ("key", "value")]
    return ins, outs


def empty_past(model, batch: int = 1, past_len: int = 0) -> list:
    """Zero caches [passes*batch, Hkv, past_len, hd] of `cache_dtype(model)` (torch tensors), two per
    layer; passes = T for a temporal spiking student, 1 for a count-coded one or the ANN twin."""
    import torch

    cfg = model.config
    shape = (model.passes * batch, cfg.num_kv_heads, past_len, cfg.head_dim)
    return [torch.zeros(shape, dtype=cache_dtype(model)) for _ in range(2 * cfg.depth)]


def cache_bytes_per_token(model) -> int:
    """Bytes the decode graph's caches hold per token of context (all layers, keys and values)."""
    cfg = model.config
    item = 1 if model.config.spiking else 4  # uint8: spikes 0/1, or spike counts 0..T
    return 2 * cfg.depth * model.passes * cfg.num_kv_heads * cfg.head_dim * item


def _torch_export(module, args: tuple, path: Path, opset: int, input_names, output_names, dynamic_axes) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about constant shape checks, the legacy-path notice
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _dedupe_transposed_initializers(proto) -> int:
    """Replace initializers that are the exact transpose of another 2-D initializer by a Transpose node.

    Constant folding turns the tied LM head (`F.linear(h, embed.weight)`) into a second, transposed
    copy of the embedding, doubling the file for large vocabularies. ONNX Runtime folds the Transpose
    back at load time, so speed is unchanged. Returns the number of bytes saved.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = list(proto.graph.initializer)
    two_d = [t for t in inits if len(t.dims) == 2 and t.dims[0] != t.dims[1] and t.dims[0] * t.dims[1] >= 4096]
    by_shape: dict[tuple[int, int], list] = {}
    for t in two_d:
        by_shape.setdefault((int(t.dims[0]), int(t.dims[1])), []).append(t)
    saved, replaced = 0, []
    arrays: dict[str, Any] = {}

    def arr(t):
        if t.name not in arrays:
            arrays[t.name] = numpy_helper.to_array(t)
        return arrays[t.name]

    done: set[str] = set()
    for t in two_d:
        if t.name in done:
            continue
        for cand in by_shape.get((int(t.dims[1]), int(t.dims[0])), []):
            if cand.name in done or cand.name == t.name:
                continue
            if np.array_equal(arr(cand), arr(t).T):
                replaced.append((cand, t.name))
                done.add(cand.name)
                done.add(t.name)
                break
    if not replaced:
        return 0
    nodes = []
    for cand, src in replaced:
        saved += arr(cand).nbytes
        proto.graph.initializer.remove(cand)
        nodes.append(helper.make_node("Transpose", [src], [cand.name], name=f"untie_{cand.name}", perm=[1, 0]))
    for i, n in enumerate(nodes):
        proto.graph.node.insert(i, n)
    return saved


def _set_props(proto, props: dict[str, Any], doc: str) -> None:
    from onnx import helper

    existing = {p.key: p.value for p in proto.metadata_props}
    existing.update({k: str(v) for k, v in props.items() if v is not None})
    del proto.metadata_props[:]
    helper.set_model_props(proto, existing)
    proto.doc_string = doc
    proto.producer_name = "snn_distill"


def _save_proto(proto, path: Path) -> None:
    """One self-contained file when it fits protobuf's 2 GiB; else weights in `<name>.data` beside it."""
    import onnx

    if proto.ByteSize() < SINGLE_FILE_LIMIT:
        onnx.save_model(proto, str(path))
    else:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )


def _check(path: Path) -> None:
    import onnx

    fix = "the exported graph is invalid; please report this with the opset used"
    with _stage(f"onnx.checker on {path.name}", fix):
        onnx.checker.check_model(str(path), full_check=True)


def _declared_opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# --------------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------------


def _torch_reference(model, ids) -> tuple[Any, Any]:
    """PyTorch logits [B, S, V] (numpy) and the "fragile" mask [B, S]: positions at or after one whose
    spikes sat within float rounding of the threshold (a flip there legitimately changes everything
    downstream in the same sequence; other sequences and earlier positions are unaffected)."""
    import numpy as np
    import torch

    lifs = model.lif_modules()
    for m in lifs:
        m.record_margin = True
    try:
        with torch.no_grad():
            logits = model(ids).float().numpy()
        margins = [m.last_margin for m in lifs]
    finally:
        for m in lifs:
            m.record_margin, m.last_margin = False, None
    if not margins:
        return logits, np.zeros(logits.shape[:2], dtype=bool)
    cfg = model.config
    theta = max(float(torch.as_tensor(m.threshold_value()).detach().max()) for m in lifs)
    eps = FLIP_MARGIN * max(1.0, theta) * math.sqrt(max(1.0, cfg.dim / 128))
    near = (torch.stack(margins).amin(0) < eps).numpy()  # [B, S]
    return logits, np.maximum.accumulate(near, axis=1)


class _Comparison:
    """Accumulates ONNX-vs-PyTorch differences over several cases."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = float(tolerance)
        self.max_abs_diff = 0.0
        self.rows = 0
        self.bad_rows = 0
        self.excused_rows = 0
        self.argmax_diff = 0
        self.failures: list[str] = []

    def add(self, name: str, got, ref, fragile) -> None:
        import numpy as np

        if got.shape != ref.shape:
            self.failures.append(f"{name}: shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
            return
        d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        d = np.where(np.isnan(d), np.inf, d)
        row = d.max(-1)  # [B, S]
        self.max_abs_diff = max(self.max_abs_diff, float(row.max()) if row.size else 0.0)
        bad = row > self.tolerance
        self.rows += row.size
        self.bad_rows += int(bad.sum())
        self.argmax_diff += int((got.argmax(-1) != ref.argmax(-1)).sum())
        unexplained = bad & ~fragile
        self.excused_rows += int((bad & fragile).sum())
        if unexplained.any():
            b, s = map(int, np.argwhere(unexplained)[0])
            self.failures.append(
                f"{name}: {int(unexplained.sum())} positions differ by up to {float(row[unexplained].max()):.3g} "
                f"(first at batch {b}, position {s}) with no spike near threshold"
            )

    def summary(self) -> dict[str, Any]:
        return {
            "max_abs_diff": float(f"{self.max_abs_diff:.3g}"),
            "positions": self.rows,
            "positions_over_tolerance": self.bad_rows,
            "spike_flip_positions": self.excused_rows,
            "argmax_mismatches": self.argmax_diff,
        }


def _random_cases(vocab: int, seq_lens: Sequence[int], max_len: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = sorted({max(1, min(int(s), max_len)) for s in seq_lens}) or [1]
    cases = [(1, s) for s in lens] + [(2, lens[-1])]
    return [torch.randint(0, vocab, (b, s), generator=g) for b, s in cases]


def verify_full_graph(model, path: Path, seq_lens: Sequence[int], tolerance: float) -> dict[str, Any]:
    """Run the full graph in ONNX Runtime on random ids (several lengths, batch 1 and 2) against PyTorch.

    Passes when every position's logits agree within `tolerance`, except positions downstream of a
    spike whose membrane was within float rounding of the threshold in PyTorch (FLIP_MARGIN): there a
    last-bit difference legitimately flips the spike. A broken graph differs at ordinary positions
    too and fails. Raises ExportError; returns the comparison summary.
    """
    with _stage(f"loading {path.name} in ONNX Runtime", "the graph uses an op ONNX Runtime lacks; try --opset 17"):
        sess = _ort_session(path)
    cmp = _Comparison(tolerance)
    cfg = model.config
    for ids in _random_cases(cfg.vocab_size, seq_lens, cfg.max_seq_len):
        ref, fragile = _torch_reference(model, ids)
        with _stage(f"running {path.name} in ONNX Runtime", "the graph does not run; please report this"):
            got = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
        cmp.add(f"batch {ids.shape[0]} x seq_len {ids.shape[1]}", got, ref, fragile)
    _raise_on_failure(cmp, path)
    return cmp.summary()


def verify_decode_graph(model, path: Path, seq_len: int, tolerance: float) -> dict[str, Any]:
    """Decode random sequences (batch 1 and 2) with the decode graph, from an empty cache: one token per
    call, and also a prompt prefilled in one call followed by single steps; compare with the
    PyTorch full forward (same pass rule as `verify_full_graph`)."""
    import numpy as np

    with _stage(f"loading {path.name} in ONNX Runtime", "the graph uses an op ONNX Runtime lacks; try --opset 17"):
        sess = _ort_session(path)
    cfg = model.config
    in_names, _ = decode_io_names(cfg.depth)
    cmp = _Comparison(tolerance)
    n = max(2, min(int(seq_len), cfg.max_seq_len))
    for ids in _random_cases(cfg.vocab_size, [n], cfg.max_seq_len, seed=1)[-2:]:
        ref, fragile = _torch_reference(model, ids)
        b = ids.shape[0]
        for prefill in (1, max(1, n // 2)):
            past = [p.numpy() for p in empty_past(model, b, 0)]
            outs, pos = [], 0
            while pos < n:
                step = prefill if pos == 0 else 1
                feeds = {"input_ids": ids[:, pos : pos + step].numpy(), **dict(zip(in_names[1:], past))}
                with _stage(f"running {path.name} in ONNX Runtime", "the decode graph does not run; report this"):
                    res = sess.run(None, feeds)
                outs.append(res[0])
                past = res[1:]
                pos += step
            cmp.add(f"decode batch {b}, prefill {prefill}", np.concatenate(outs, axis=1), ref, fragile)
    _raise_on_failure(cmp, path)
    return cmp.summary()


def _raise_on_failure(cmp: _Comparison, path: Path) -> None:
    s = cmp.summary()
    msg = (
        f"{path.name}: max |ONNX Runtime - PyTorch| = {s['max_abs_diff']:.3g} over {s['positions']} positions "
        f"(tolerance {cmp.tolerance:g}; {s['spike_flip_positions']} positions after a near-threshold spike)"
    )
    if cmp.failures:
        raise ExportError(
            f"verification failed for {path.name}: {cmp.failures[0]} (max abs diff {s['max_abs_diff']:.3g} > "
            f"tolerance {cmp.tolerance:g}); the exported graph does not match PyTorch, please report this "
            "(--no-verify skips the check)"
        )
    log.info("verified %s", msg)


# --------------------------------------------------------------------------------------------------
# int8 and .ort
# --------------------------------------------------------------------------------------------------


def to_ort_format(src: Path, dst: Path) -> None:
    """Convert to ONNX Runtime's `.ort` format as `python -m onnxruntime.tools.convert_onnx_models_to_ort`
    does by default (style "Fixed", all optimisations, without the x86-only NCHWc layout transform)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "0")
    so.log_severity_level = 3
    ort.InferenceSession(
        str(src), sess_options=so, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
    )
    if not dst.is_file():
        raise ExportError(f"ONNX Runtime did not write {dst.name}; check that the folder is writable")


def _sample_ids(model_dir: Path, vocab: int, max_len: int):
    """Token ids of SAMPLE_TEXTS with the tokenizer saved beside the model, else random ids. [N, S]."""
    import torch

    rows: list[list[int]] = []
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        try:
            from ..tokenizer import resolve_tokenizer

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok, _ = resolve_tokenizer(None, model_dir, None, strict=True)
            rows = [[int(i) for i in tok.encode(t)] for t in SAMPLE_TEXTS]
        except Exception as e:
            log.info("tokenizer beside the model not usable (%s); int8 agreement uses random ids", _first_line(e))
            rows = []
    if rows and all(0 <= i < vocab for r in rows for i in r) and min(len(r) for r in rows) >= 2:
        n = min(min(len(r) for r in rows), max_len)
        return torch.tensor([r[:n] for r in rows], dtype=torch.long), "tokenizer"
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (len(SAMPLE_TEXTS), min(24, max_len)), generator=g), "random ids"


def int8_agreement(fp32: Path, int8: Path, ids) -> dict[str, float]:
    """Top-1 agreement and mean KL(fp32 || int8) of the next-token distributions on `ids` [N, S]."""
    import numpy as np

    a = _ort_session(fp32).run(["logits"], {"input_ids": ids.numpy()})[0].astype(np.float64)
    b = _ort_session(int8).run(["logits"], {"input_ids": ids.numpy()})[0].astype(np.float64)
    return logit_agreement(a, b)


def logit_agreement(a, b) -> dict[str, float]:
    """Top-1 agreement and mean KL(a || b) of two numpy logit arrays [..., V] over their positions."""
    import numpy as np

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    la, lb = log_softmax(a), log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return {
        "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4),
        "mean_kl": float(f"{float(kl.mean()):.4g}"),
    }


# --------------------------------------------------------------------------------------------------
# export_onnx
# --------------------------------------------------------------------------------------------------


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # different drives on Windows
        return str(path.resolve())


def export_onnx(
    model_path: str | Path,
    metadata_path: str | Path | None = None,
    output_path: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    decode_graph: bool = False,
    ort: bool = False,
    verify: bool = True,
    seq_lens: Sequence[int] = (1, 7, 32),
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Export student.pt to ONNX and check it; returns a dict of results (also saved in metadata.json).

    metadata_path / output_path default to `metadata.json` / `student.onnx` beside the model.
    quantize="int8" adds `student.int8.onnx` (+ `student.decode.int8.onnx` with decode_graph);
    decode_graph=True adds `student.decode.onnx`; ort=True adds a `.ort` file for every `.onnx` written.

    Verification (verify=True) runs ONNX Runtime on random ids of `seq_lens` (batch 1, and batch 2 at the
    longest) and compares with PyTorch: every position must agree within `tolerance`, except positions at
    or after one where a membrane sat within float rounding of the spike threshold (FLIP_MARGIN) — there
    a last-bit difference flips a spike and the logits legitimately move; a broken graph also differs at
    ordinary positions and fails. The decode graph is checked the same way (token by token from an empty
    cache, and prefill + steps). int8 files are judged by top-1 agreement and KL, not logit closeness.

    Result keys: path, opset, size_mb, max_abs_diff (None when not verified), seconds; with int8:
    int8_path, int8_size_mb, int8_top1_agreement, int8_mean_kl, int8_sample, int8_exact_spike_matmuls
    (weight matmuls that read their spike codes exactly, `export/int8.py`); with decode_graph:
    decode_path, decode_size_mb, cache_bytes_per_token, decode_max_abs_diff (+ decode_int8_path,
    decode_int8_size_mb); with ort: ort_path (+ int8_ort_path, decode_ort_path, decode_int8_ort_path).
    """
    t0 = time.perf_counter()
    opset = _check_opset(opset)
    quantize = _check_quantize(quantize, tolerance)
    model_path, metadata_path, out = _resolve_paths(model_path, metadata_path, output_path)
    model, props = _load_for_export(model_path, metadata_path)
    try:
        # .NAME.PID.XXXX.tmp: after a SIGKILL the next save_artifacts there removes it (remove_leftovers)
        tmp_ctx = tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:
        raise ExportError(f"cannot write into {out.parent} ({_first_line(e)}); pick a writable --output-path") from e
    with tmp_ctx as tmpd, _session_cache():
        st = _Staging(Path(tmpd), model, props, opset)
        _export_full(st, out, verify, seq_lens, tolerance)
        if decode_graph:
            _export_decode(st, out, verify, seq_lens, tolerance)
        if quantize == "int8":
            _export_int8(st, out, model_path.parent, decode_graph)
        if ort:
            _export_ort(st)
        st.commit()
    result = st.result
    result["seconds"] = round(time.perf_counter() - t0, 2)
    _record(metadata_path, result)
    if result.get("max_abs_diff") is not None:
        log.info("max abs difference ONNX Runtime vs PyTorch: %.3g (tolerance %g)", result["max_abs_diff"], tolerance)
    return result


def _check_quantize(quantize: str | None, tolerance: float) -> str | None:
    if quantize in ("none", ""):
        quantize = None
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r} is not supported; use 'int8' or leave it out")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ExportError(f"tolerance must be a number >= 0, got {tolerance!r}")
    return quantize


def _resolve_paths(
    model_path: str | Path, metadata_path: str | Path | None, output_path: str | Path | None
) -> tuple[Path, Path, Path]:
    """Check the inputs exist and the output can be written: (student.pt, metadata.json, output .onnx)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ExportError(
            f"model file {model_path} does not exist; train a student first or pass --model-path to its student.pt"
        )
    metadata_path = Path(metadata_path) if metadata_path else model_path.parent / METADATA_FILE
    if not metadata_path.is_file():
        raise ExportError(
            f"metadata file {metadata_path} does not exist; pass --metadata-path to the metadata.json of the same run"
        )
    out = Path(output_path) if output_path else model_path.parent / ONNX_FILE
    if out.is_dir():
        raise ExportError(f"output path {out} is a folder; pass a file name such as {out / ONNX_FILE}")
    if not out.name.endswith(".onnx") or out.name == ".onnx":
        raise ExportError(f"output path {out} must end in .onnx, e.g. {out.with_name(ONNX_FILE)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create output folder {out.parent} ({_first_line(e)}); pick a writable path") from e
    return model_path, metadata_path, out


def _load_for_export(model_path: Path, metadata_path: Path) -> tuple[Any, dict[str, Any]]:
    """The student in float32 eval mode on CPU, and the properties every graph carries."""
    try:
        model, meta = load_student(model_path, metadata_path, map_location="cpu")
    except ArtifactError as e:
        raise ExportError(_first_line(e)) from e
    model = model.float().cpu().eval()
    cfg = model.config
    props = {
        "snn_distill.model_type": meta.get("model_type", "SpikingStudentLM"),
        "snn_distill.architecture_version": meta.get("architecture_version"),
        "snn_distill.student_type": cfg.student_type,
        "snn_distill.snn_mode": cfg.mode,
        "snn_distill.vocab_size": cfg.vocab_size,
        "snn_distill.timesteps": model.timesteps,
        "snn_distill.snn_coding": cfg.coding,
        "snn_distill.cache_rows_per_token": model.passes,
        "snn_distill.num_layers": cfg.depth,
        "snn_distill.num_kv_heads": cfg.num_kv_heads,
        "snn_distill.head_dim": cfg.head_dim,
        "snn_distill.max_seq_len": cfg.max_seq_len,
        "snn_distill.tokenizer_name": (meta.get("config") or {}).get("tokenizer_name"),
    }
    return model, props


class _Staging:
    """Graphs built and checked in a temporary folder, renamed into place only when all succeeded."""

    def __init__(self, root: Path, model: Any, props: dict[str, Any], opset: int) -> None:
        self.root, self.model, self.props, self.opset = root, model, props, opset
        self.work = root / "work"
        self.work.mkdir()
        self.result: dict[str, Any] = {}
        self.written: list[tuple[str, Path]] = []  # (result key, final path), in commit order

    def path(self, final: Path) -> Path:
        return self.root / final.name

    def commit(self) -> None:
        for _, final in self.written:
            src = self.path(final)
            data = src.with_name(src.name + ".data")
            if data.exists():
                os.replace(data, final.with_name(final.name + ".data"))
            os.replace(src, final)


def _export_full(st: _Staging, out: Path, verify: bool, seq_lens: Sequence[int], tolerance: float) -> None:
    """student.onnx: input_ids [batch, seq_len] -> logits, exported, checked and verified."""
    import torch

    cfg = st.model.config
    raw = st.work / "full.raw.onnx"
    example = torch.randint(0, cfg.vocab_size, (1, min(7, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with _stage("torch.onnx.export", f"check that the model runs in PyTorch, or try --opset {DEFAULT_OPSET}"):
        _torch_export(
            st.model, (example,), raw, st.opset, ["input_ids"], ["logits"],
            {"input_ids": {0: "batch", 1: "seq_len"}, "logits": {0: "batch", 1: "seq_len"}},
        )  # fmt: skip
    doc = "SpikingStudentLM: input_ids [batch, seq_len] -> logits [batch, seq_len, vocab]"
    _finish_graph(raw, st.path(out), st.props, "full", doc)
    st.written.append(("path", out))
    declared = _declared_opset(st.path(out))
    if declared != st.opset:
        raise ExportError(f"the exporter wrote opset {declared} instead of {st.opset}; use --opset {DEFAULT_OPSET}")
    st.result.update(path=str(out), opset=declared, size_mb=_size_mb(st.path(out)), max_abs_diff=None)
    if verify:
        summary = verify_full_graph(st.model, st.path(out), seq_lens, tolerance)
        st.result.update(max_abs_diff=summary["max_abs_diff"], verification=summary)


def _export_decode(st: _Staging, out: Path, verify: bool, seq_lens: Sequence[int], tolerance: float) -> None:
    """student.decode.onnx: one decode step with flattened uint8 (spiking) or float32 caches."""
    import torch

    model = st.model
    ins, outs = decode_io_names(model.config.depth)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "new_len"}, "logits": {0: "batch", 1: "new_len"}}
    axes.update({name: {0: "timesteps_x_batch", 2: "past_len"} for name in ins[1:]})
    axes.update({name: {0: "timesteps_x_batch", 2: "total_len"} for name in outs[1:]})
    # Traced with 2 new tokens and a non-empty cache: the masked attention path, valid for any
    # new_len >= 1 and past_len >= 0.
    ex_ids = torch.randint(0, model.config.vocab_size, (1, 2), generator=torch.Generator().manual_seed(1))
    dec, raw_dec = sibling_path(out, "decode"), st.work / "decode.raw.onnx"
    with _stage("torch.onnx.export (decode graph)", f"try --opset {DEFAULT_OPSET} or export without --decode-graph"):
        step = _torch_module_types()(model)
        _torch_export(step, (ex_ids, *empty_past(model, 1, 3)), raw_dec, st.opset, ins, outs, axes)
    cfg = model.config
    kind = ("uint8 spike counts 0..T" if cfg.count_coded else "uint8 spikes") if cfg.spiking else "float32"
    rows = "batch" if model.passes == 1 else "timesteps*batch"
    doc = (
        "SpikingStudentLM decode step: input_ids [batch, new_len] + past_key/value_<i> "
        f"[{rows}, kv_heads, past_len, head_dim] ({kind}, keys before RoPE) -> logits + present_key/value_<i>"
    )
    _finish_graph(raw_dec, st.path(dec), st.props, "decode", doc)
    st.written.append(("decode_path", dec))
    st.result.update(
        decode_path=str(dec), decode_size_mb=_size_mb(st.path(dec)), cache_bytes_per_token=cache_bytes_per_token(model)
    )
    if verify:
        summary = verify_decode_graph(model, st.path(dec), max(seq_lens) if seq_lens else 8, tolerance)
        st.result["decode_max_abs_diff"] = summary["max_abs_diff"]


def _export_int8(st: _Staging, out: Path, model_dir: Path, decode_graph: bool) -> None:
    """student.int8.onnx (+ the int8 decode graph), judged by top-1 agreement with fp32 on real text."""
    cfg, res = st.model.config, st.result
    q = sibling_path(out, "int8")
    ids, source = _sample_ids(model_dir, cfg.vocab_size, cfg.max_seq_len)
    probes = [ids, *_random_cases(cfg.vocab_size, (16,), cfg.max_seq_len, seed=1)]
    max_count = st.model.timesteps if cfg.spiking else 0
    with _stage("int8 quantization", "export without --quantize int8 or report this"):
        passes = quantize_int8(
            st.work / "full.raw.onnx", st.path(q), st.work, [{"input_ids": x.numpy()} for x in probes], max_count
        )
        _relabel(st.path(q), st.props, "int8")
    _check(st.path(q))
    st.written.append(("int8_path", q))
    with _stage("running the int8 model in ONNX Runtime", "export without --quantize int8 or report this"):
        agree = int8_agreement(st.path(out), st.path(q), ids)
    res.update(
        int8_path=str(q), int8_size_mb=_size_mb(st.path(q)), int8_top1_agreement=agree["top1_agreement"],
        int8_mean_kl=agree["mean_kl"], int8_sample=f"{ids.shape[0]}x{ids.shape[1]} {source}",
        int8_exact_spike_matmuls=passes["exact_spike_matmuls"],
    )  # fmt: skip
    log.info(
        "int8: %.2f MB -> %.2f MB, %d matmuls read spike codes exactly, top-1 agreement %.3f, mean KL(fp32||int8)"
        " %.4g on %s", res["size_mb"], res["int8_size_mb"], passes["exact_spike_matmuls"], agree["top1_agreement"],
        agree["mean_kl"], res["int8_sample"],
    )  # fmt: skip
    if decode_graph:
        qd = sibling_path(out, "decode.int8")
        with _stage("int8 quantization (decode graph)", "export without --quantize int8 or report this"):
            ins, _ = decode_io_names(cfg.depth)
            empty = dict(zip(ins[1:], [p.numpy() for p in empty_past(st.model, 1, 0)]))
            feeds = [{"input_ids": x[:1].numpy(), **empty} for x in probes]
            quantize_int8(st.work / "decode.raw.onnx", st.path(qd), st.work, feeds, max_count)
            _relabel(st.path(qd), st.props, "decode.int8")
        _check(st.path(qd))
        with _stage("running the int8 decode graph", "export without --quantize int8 or report this"):
            _smoke_decode(st.path(qd), st.model)
        st.written.append(("decode_int8_path", qd))
        res.update(decode_int8_path=str(qd), decode_int8_size_mb=_size_mb(st.path(qd)))


def _export_ort(st: _Staging) -> None:
    """A .ort file beside every .onnx written, checked against it."""
    for key, final in list(st.written):
        target = ort_path(final)
        with _stage(f"converting {final.name} to .ort", "export without --ort or report this"):
            to_ort_format(st.path(final), st.path(target))
            _check_ort(st.path(target), st.path(final), st.model, key)
        ort_key = key.replace("path", "ort_path")
        st.written.append((ort_key, target))
        st.result[ort_key] = str(target)


def _finish_graph(raw: Path, dst: Path, props: dict[str, Any], kind: str, doc: str) -> None:
    """Deduplicate the tied head, add metadata, save (single file when < 2 GiB), run the full checker."""
    import onnx

    with _stage(f"post-processing the {kind} graph", "please report this"):
        proto = onnx.load(str(raw))
        saved = _dedupe_transposed_initializers(proto)
        if saved:
            log.debug("%s graph: shared the tied LM head with the embedding (%.1f MB saved)", kind, saved / 1e6)
        _set_props(proto, {**props, "snn_distill.graph": kind}, doc)
        _save_proto(proto, dst)
    _check(dst)


def _relabel(path: Path, props: dict[str, Any], kind: str) -> None:
    import onnx

    proto = onnx.load(str(path))
    _set_props(proto, {**props, "snn_distill.graph": kind}, proto.doc_string or f"SpikingStudentLM ({kind})")
    _save_proto(proto, path)


def _smoke_decode(path: Path, model) -> None:
    """The graph loads and runs two steps from an empty cache with the expected output shapes."""
    sess = _ort_session(path)
    ins, _ = decode_io_names(model.config.depth)
    past = [p.numpy() for p in empty_past(model, 1, 0)]
    import numpy as np

    for step in range(2):
        res = sess.run(None, {"input_ids": np.array([[step + 1]], dtype=np.int64), **dict(zip(ins[1:], past))})
        past = res[1:]
        if res[0].shape != (1, 1, model.config.vocab_size) or past[0].shape[2] != step + 1:
            raise ExportError(f"{path.name} returned shapes {res[0].shape}, {past[0].shape}; please report this")


def _check_ort(ort_file: Path, onnx_file: Path, model, key: str) -> None:
    """The .ort file loads and gives the same outputs as the .onnx it came from."""
    import numpy as np

    a = _ort_session(onnx_file)
    b = _ort_session(ort_file)
    if key.startswith("decode"):
        ins, _ = decode_io_names(model.config.depth)
        feeds = {
            "input_ids": np.array([[1, 2, 3]], dtype=np.int64),
            **dict(zip(ins[1:], [p.numpy() for p in empty_past(model, 1, 0)])),
        }
    else:
        feeds = {"input_ids": np.arange(1, 9, dtype=np.int64).reshape(1, 8) % model.config.vocab_size}
    ra = a.run(["logits"], feeds)[0]
    rb = b.run(["logits"], feeds)[0]
    # Both sessions apply the same optimisations, so the outputs are normally bit-identical.
    if ra.shape != rb.shape or not (np.allclose(ra, rb, rtol=0, atol=1e-4) or (ra.argmax(-1) == rb.argmax(-1)).all()):
        raise ExportError(f"{ort_file.name} does not reproduce {onnx_file.name}; please report this")


def _record(metadata_path: Path, result: dict[str, Any]) -> None:
    """Add an `export` section to metadata.json (atomic); a failure here only warns."""
    import onnx
    import onnxruntime
    import torch

    base = metadata_path.parent
    section = {k: (_rel(Path(v), base) if k.endswith("path") and v else v) for k, v in result.items()}
    section.update(
        timestamp=utc_timestamp(),
        exporter="torch.onnx.export (TorchScript, dynamo=False)",
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    )
    try:
        read_metadata(metadata_path)
        update_metadata(metadata_path, export=section)
    except (ArtifactError, OSError) as e:
        log.warning("exported, but could not record the export in %s: %s", metadata_path, _first_line(e))


__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "cache_bytes_per_token",
    "cache_dtype",
    "decode_io_names",
    "empty_past",
    "export_onnx",
    "int8_agreement",
    "ort_path",
    "quantize_int8",
    "sibling_path",
    "supported_opsets",
    "to_ort_format",
    "verify_decode_graph",
    "verify_full_graph",
]
