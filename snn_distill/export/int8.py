"""The int8 files: ONNX Runtime's dynamic quantization, then two passes that make it exact where a
spiking student allows.

1. **Spike operands at scale 1.** Dynamic quantization maps every matmul input to uint8 with a scale
   computed per call (range / 255), so a spike code (integers in -T..T) comes out rounded by up to half
   a step, and a spiking student turns such small errors into flipped spikes. A weight matmul whose
   input is a spike code reads it instead as int8 with scale 1 and zero point 0 (a Cast): exact, and no
   range to compute per call. Which inputs are spike codes is measured, not assumed: the graph runs on
   sample inputs and an operand counts only if every value it took was an integer in -T..T.
2. **One per-row int8 embedding.** The quantizer stores the lookup's matrix per tensor (uint8, one
   scale for the whole vocabulary), a second copy beside the tied head's per-row int8 matrix. The
   lookup reads the head's matrix instead (tied), or a per-row int8 copy of its own (untied): one
   matrix less in the file, and the same rows a QAT student trained with (`student.fake_quant_int8`).

With `--qat int8` the weights are already int8 values (`SpikingStudentLM.bake_int8_weights`), so a
spike-driven student's int8 graph computes what the fp32 graph computes, up to float rounding.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUANTIZED_OPS = ["MatMul"]  # the embedding's Gather is quantized per row by per_row_embedding


def quantize_int8(src: Path, dst: Path, workdir: Path, feeds: list[dict[str, Any]], max_count: int) -> dict[str, int]:
    """Dynamic int8 quantization of `src` into `dst` (per-channel int8 weights), then the two passes
    above. `feeds`: sample inputs of the graph (name -> numpy array) to find the spike operands;
    `max_count`: the student's largest spike count T (0 for the ANN twin: no spike operands).

    `src` should be the raw export, where the tied LM head is a constant: it gets quantized, and the
    lookup can then share its int8 matrix. Pre-processing (shape inference + ONNX Runtime's basic graph
    optimisation) happens in `workdir`. Returns {"exact_spike_matmuls": n, "embedding_bytes_saved": bytes}.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prep = workdir / f"prep-{dst.name}"
    with _quiet_loggers("onnxruntime.quantization", ""):
        try:
            # ONNX shape inference + ORT's basic optimisation. The symbolic shape inference step is
            # skipped: it gives up on the decode graph and dynamic int8 does not need it.
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
        except Exception as e:  # pre-processing is an optimisation; the raw graph also quantizes
            log.debug("int8 pre-processing failed (%s); quantizing the raw graph", type(e).__name__)
            prep = src
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(
                str(prep), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS
            )
    proto = onnx.load(str(dst))
    exact = exact_spike_operands(proto, feeds, max_count) if 0 < max_count <= 127 else 0  # counts fit int8
    saved = per_row_embedding(proto)
    onnx.save(proto, str(dst))
    return {"exact_spike_matmuls": exact, "embedding_bytes_saved": saved}


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the given loggers to ERROR for the duration (the quantizer logs progress at INFO/WARNING)."""
    loggers = [logging.getLogger(n) if n else logging.getLogger() for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# --------------------------------------------------------------------------------------------------
# 1. spike operands at scale 1
# --------------------------------------------------------------------------------------------------


def spike_operands(proto, feeds: list[dict[str, Any]], max_count: int) -> list[str]:
    """Names of the DynamicQuantizeLinear inputs that were spike codes (integers in -max_count..max_count)
    on every one of `feeds`."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper

    from ..energy import is_spike_code

    names = [n.input[0] for n in proto.graph.node if n.op_type == "DynamicQuantizeLinear"]
    if not names or not feeds:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    spiking = dict.fromkeys(names, True)
    for feed in feeds:
        for name, x in zip(names, sess.run(names, feed)):
            spiking[name] &= is_spike_code(torch.from_numpy(x), max_count)
    return [n for n in names if spiking[n]]


def exact_spike_operands(proto, feeds: list[dict[str, Any]], max_count: int) -> int:
    """Rewrite each DynamicQuantizeLinear of a spike operand (`spike_operands`) as a Cast to int8 with a
    constant scale 1 and zero point 0, in place. Returns the number rewritten."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    spikes = set(spike_operands(proto, feeds, max_count))
    graph, count = proto.graph, 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "DynamicQuantizeLinear" or node.input[0] not in spikes:
            continue
        q, scale, zero_point = node.output
        graph.node.remove(node)
        graph.node.insert(
            i, helper.make_node("Cast", [node.input[0]], [q], to=TensorProto.INT8, name=f"{node.name}_exact")
        )
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), scale))
        graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero_point))
        count += 1
    return count


# --------------------------------------------------------------------------------------------------
# 2. one per-row int8 embedding
# --------------------------------------------------------------------------------------------------


def per_row_embedding(proto) -> int:
    """Make the token lookup (a Gather of a float [V, D] initializer by `input_ids`) read per-row int8
    rows, in place: the tied head's int8 matrix [D, V] when it holds the same rows, else a per-row int8
    copy of the embedding. Returns the bytes this saves against the per-tensor int8 copy of a plain
    dynamic quantization (0 when there is no such lookup)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    lookup = next(
        (n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits), None
    )
    if lookup is None or len(inits[lookup.input[0]].dims) != 2:
        return 0
    emb_init = inits[lookup.input[0]]
    emb = numpy_helper.to_array(emb_init).astype(np.float32)
    vocab, dim = emb.shape
    head = _tied_head(graph, inits, emb)
    prefix = lookup.output[0]
    ids = lookup.input[1]
    if head is not None:  # rows of the head's [D, V] matrix: gather along axis 1, then [D, B, S] -> [B, S, D]
        q_name, scale_name = head
        nodes = [
            helper.make_node("Gather", [q_name, ids], [f"{prefix}_q_dbs"], axis=1, name=f"{lookup.name}_int8"),
            helper.make_node("Transpose", [f"{prefix}_q_dbs"], [f"{prefix}_q"], perm=[1, 2, 0]),
        ]
        saved = vocab * dim
    else:
        q, scale = _quantize_rows(emb)
        q_name, scale_name = f"{emb_init.name}_rows_int8", f"{emb_init.name}_rows_scale"
        graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, scale_name)])
        nodes = [helper.make_node("Gather", [q_name, ids], [f"{prefix}_q"], axis=0, name=f"{lookup.name}_int8")]
        saved = -vocab * 4  # the per-row scales
    nodes += [
        helper.make_node("Cast", [f"{prefix}_q"], [f"{prefix}_qf"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [scale_name, ids], [f"{prefix}_scale"], axis=0),
        helper.make_node("Unsqueeze", [f"{prefix}_scale", f"{prefix}_last_axis"], [f"{prefix}_scale_b"]),
        helper.make_node("Mul", [f"{prefix}_qf", f"{prefix}_scale_b"], [prefix]),
    ]
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}_last_axis"))
    i = list(graph.node).index(lookup)
    graph.node.remove(lookup)
    for k, n in enumerate(nodes):
        graph.node.insert(i + k, n)
    if not any(emb_init.name in n.input for n in graph.node):
        graph.initializer.remove(emb_init)
    return saved


def _quantize_rows(w):
    """[V, D] float -> (int8 [V, D], float32 scale [V]): symmetric per row, scale = max |row| / 127."""
    import numpy as np

    scale = (np.abs(w).max(axis=1) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _tied_head(graph, inits: dict[str, Any], emb) -> tuple[str, str] | None:
    """(int8 [D, V] matrix, [V] scale) initializer names of a MatMulInteger weight holding the per-row
    int8 rounding of `emb` [V, D] (a tied head), or None."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    vocab, dim = emb.shape
    for node in graph.node:
        if node.op_type != "MatMulInteger" or len(node.input) < 2:
            continue
        b = inits.get(node.input[1])
        if b is None or b.data_type != TensorProto.INT8 or tuple(b.dims) != (dim, vocab):
            continue
        scale = inits.get(node.input[1].removesuffix("_quantized") + "_scale")
        zero = inits.get(node.input[3]) if len(node.input) > 3 else None
        if scale is None or tuple(scale.dims) != (vocab,):
            continue
        if zero is not None and np.any(numpy_helper.to_array(zero)):
            continue
        q, s = numpy_helper.to_array(b), numpy_helper.to_array(scale)
        if np.all(np.abs(q.T.astype(np.float32) * s[:, None] - emb) <= 0.5 * s[:, None] * 1.001 + 1e-12):
            return b.name, scale.name
    return None
