"""GPU memory plan for a distillation run, computed from the configs alone (no weights are loaded).

`--dry-run` prints it. The teacher's shape comes from its config.json (a local folder, a Hub id
already in the local Hugging Face cache, or the materialised copy of a .gguf file), else from a small
built-in table of known models; its parameters are counted exactly by building it on PyTorch's
`meta` device. The student's figures are exact counts; activation sizes are estimates:

* teacher forward (no grad): one layer's activations and the logits [B, S, V] in the teacher dtype;
* teacher targets: those logits, the fp32 log-softmax of the real-token rows [N, V] (the distillation
  target) and the chunk being converted (about 3 buffers of [chunk, V] fp32);
* student step: saved activations for the backward over T x B x S token-timesteps (about
  8.5*D + 2.5*Q + 2*F values per token-timestep per layer, measured with saved-tensor hooks; Q is the
  Q/K/V width, F the MLP width), the teacher target [N, V] fp32, and the chunked loss's working set
  (about 6 buffers of [chunk, V] fp32) plus its fp32 head-gradient accumulator [V, D];
* evaluation (before step 1, every --eval-interval steps and at the end, on rank 0): the teacher's
  logits [B, S, V] in its dtype, the student's fp32 forward without gradients (one layer's working
  set, bounded by what a layer saves for the backward) and its hidden states [B, S, D], and the
  chunked comparison (about 4 buffers of [chunk, V] fp32, the chunk being --loss-chunk-tokens);
* persistent: teacher weights, student weights + gradients + AdamW moments (16 bytes a parameter),
  DDP's gradient buckets (4 bytes a parameter) with several processes, the CUDA context.

N = batch x max-length (every position real: the upper bound). Only one micro-batch's target is alive
at a time, so --grad-accum-steps costs no memory. Peak = persistent + the largest transient phase,
per device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
# bitsandbytes: int8 weights + an fp32 scale per row (~1 B); NF4 packs 2 weights a byte plus
# an absmax per 64 weights (~0.53 B with double quantization).
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.53}
CUDA_CONTEXT_BYTES = 0.5 * GIB  # CUDA context + caching-allocator slack, per process and GPU
LOSS_CHUNK_BUFFERS = 6  # live [chunk, V] fp32 tensors inside the chunked loss
TEACHER_SOFTMAX_BUFFERS = 3  # live [chunk, V] fp32 tensors while building the targets chunk by chunk
EVAL_CHUNK_BUFFERS = 4  # live [chunk, V] fp32 tensors inside evaluate._batch_sums

# Shapes of teachers the spec names, so that a plan for a Hub id works offline without its config.
KNOWN_TEACHERS: dict[str, dict[str, Any]] = {
    "llama-3.2-3b": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        tie_word_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    ),
    "smollm2-360m": dict(
        model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True,
    ),
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=2, n_layer=2, n_head=2, n_positions=1024),
}  # fmt: skip


class PlanError(ValueError):
    """The plan cannot be computed (unknown teacher shape offline); the message says what to pass."""


@dataclass
class TeacherShape:
    name: str
    params: int
    linear_params: int  # weights of nn.Linear layers other than the LM head (what bitsandbytes quantizes)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    source: str


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shape_from_config(config: Any, name: str, source: str) -> TeacherShape:
    """Count a transformers config's parameters exactly by building the model on the meta device."""
    import torch
    from torch import nn

    from .teacher import quiet_transformers

    with quiet_transformers() as tf, torch.device("meta"):
        try:
            model = tf.AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise PlanError(f"{name!r} is not a causal language model: {str(e).splitlines()[0]}") from e
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    vocab = int(head.weight.shape[0]) if head is not None else int(_get(config, "vocab_size"))
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model", default=0))
    inter = int(_get(config, "intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * hidden)
    layers = int(_get(config, "num_hidden_layers", "n_layer", "num_layers", default=0))
    return TeacherShape(name, params, linear, vocab, hidden, inter, layers, source)


def _known_entry(name: str) -> dict[str, Any] | None:
    key = name.lower().rstrip("/").rsplit("/", 1)[-1]
    for known in sorted(KNOWN_TEACHERS, key=len, reverse=True):
        if key == known or key.startswith(known + "-"):  # e.g. Llama-3.2-3B-Instruct
            return KNOWN_TEACHERS[known]
    return None


def teacher_shape(name_or_path: str) -> TeacherShape:
    """The teacher's shape without loading its weights (see the module docstring for the sources)."""
    from .teacher import _gguf_cache_dir, quiet_transformers

    path = Path(name_or_path).expanduser()
    folder: Path | None = None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PlanError(f"teacher GGUF file {path} does not exist; check the path")
        cached = _gguf_cache_dir(path)
        if (cached / "config.json").is_file():
            folder = cached
        else:
            return _gguf_shape(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"teacher path {path} has no config.json; pass a Hugging Face model folder")
        folder = path
    with quiet_transformers() as tf:
        if folder is not None:
            cfg = tf.AutoConfig.from_pretrained(str(folder))
            return shape_from_config(cfg, name_or_path, f"{folder / 'config.json'}")
        try:  # a Hub id already in the local cache: its config.json, no network
            cfg = tf.AutoConfig.from_pretrained(name_or_path, local_files_only=True)
            return shape_from_config(cfg, name_or_path, "cached config.json")
        except (OSError, ValueError):
            pass
        entry = _known_entry(name_or_path)
        if entry is None:
            known = ", ".join(sorted(KNOWN_TEACHERS))
            raise PlanError(
                f"the shape of teacher {name_or_path!r} is unknown offline: pass a local model folder (with "
                f"config.json) or download it once; built-in shapes: {known}"
            )
        kwargs = dict(entry)
        cfg = tf.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return shape_from_config(cfg, name_or_path, "built-in table")


def _gguf_shape(path: Path) -> TeacherShape:
    """Parameters and widths from a .gguf file's tensor table (weights are not dequantised)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise PlanError(f"sizing {path.name} needs the gguf package: pip install gguf") from e
    reader = GGUFReader(str(path))
    params = linear = vocab = hidden = inter = 0
    layers = set()
    for t in reader.tensors:
        n = int(t.n_elements)
        params += n
        dims = [int(d) for d in t.shape]
        if t.name == "token_embd.weight":
            hidden, vocab = dims[0], dims[-1]
        elif t.name.startswith("blk."):
            layers.add(t.name.split(".")[1])
            if len(dims) == 2:
                linear += n
            if t.name.endswith("ffn_up.weight"):
                inter = dims[-1]
    return TeacherShape(str(path), params, linear, vocab, hidden, inter or 4 * hidden, len(layers), "gguf tensors")


@dataclass
class PlanRow:
    phase: str  # "persistent" or a transient phase ("teacher forward", "teacher targets", "student step")
    item: str
    detail: str
    nbytes: float
    device: str


@dataclass
class MemoryPlan:
    teacher: TeacherShape
    summary: list[str]
    rows: list[PlanRow] = field(default_factory=list)
    budget_bytes: float = 16 * GIB

    def add(self, phase: str, item: str, detail: str, nbytes: float, device: str) -> None:
        self.rows.append(PlanRow(phase, item, detail, float(nbytes), device))

    def devices(self) -> list[str]:
        return list(dict.fromkeys(r.device for r in self.rows))

    def peak(self, device: str) -> float:
        """Persistent memory plus the largest transient phase on `device` (bytes)."""
        totals: dict[str, float] = {}
        for r in self.rows:
            if r.device == device:
                totals[r.phase] = totals.get(r.phase, 0.0) + r.nbytes
        persistent = totals.pop("persistent", 0.0)
        return persistent + max(totals.values(), default=0.0)

    def format(self) -> str:
        lines = list(self.summary)
        w_item = max(len(r.item) for r in self.rows) + 1
        w_detail = max(len(r.detail) for r in self.rows)
        head = f"{'phase':<15} {'component':<{w_item}} {'size':<{w_detail}} {'GiB':>7}  device"
        lines += ["", head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.phase:<15} {r.item:<{w_item}} {r.detail:<{w_detail}} {r.nbytes / GIB:>7.2f}  {r.device}")
        lines.append("-" * len(head))
        budget = self.budget_bytes / GIB
        for dev in self.devices():
            peak = self.peak(dev) / GIB
            if dev.startswith("cuda"):
                verdict = "fits" if peak <= budget else f"does NOT fit (over by {peak - budget:.2f} GiB)"
                lines.append(f"peak on {dev}: {peak:.2f} GiB per process; {verdict} in {budget:.0f} GiB")
            else:
                lines.append(f"peak on {dev}: {peak:.2f} GiB (host memory)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.__dict__,
            "rows": [r.__dict__ for r in self.rows],
            "peak_gib": {d: self.peak(d) / GIB for d in self.devices()},
            "budget_gib": self.budget_bytes / GIB,
        }


def _fmt_n(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def student_activation_values(
    dim: int, depth: int, heads: int, kv_heads: int, hidden: int, spike_driven: bool = False
) -> tuple[float, float]:
    """(values saved for the backward per token-timestep per layer, per token-timestep outside layers).
    Spike-driven blocks save about twice as much: a LIF's input and output before every weight matmul,
    and the head's input LIF outside the layers (fitted to the saved bytes, tests/test_scale.py)."""
    q = (heads + 2 * kv_heads) * (dim // heads)
    if spike_driven:
        return 27.0 * dim + 2.0 * q + 3.0 * hidden, 7.25 * dim
    return 8.5 * dim + 2.5 * q + 2.0 * hidden, 1.0 * dim


def autocast_name(dev: str) -> str | None:
    """The student's autocast dtype on `dev` as training picks it (precision.autocast_dtype): None off
    CUDA; "fp16" on a visible GPU without native bf16 (T4, V100); "bf16" otherwise, also when planning
    on a machine without the GPU."""
    if not dev.startswith("cuda"):
        return None
    import torch

    from .precision import autocast_dtype

    if torch.cuda.is_available() and autocast_dtype(torch.device(dev)) == torch.float16:
        return "fp16"
    return "bf16"


def plan_memory(
    cfg: Any,
    student_args: dict[str, Any],
    teacher: TeacherShape | None = None,
    world_size: int = 1,
    device: str | None = None,
    budget_gib: float = 16.0,
) -> MemoryPlan:
    """The memory plan for TrainConfig `cfg` and StudentConfig kwargs `student_args`.

    device: where the student trains ("cuda" or "cpu"); default from cfg.device, "auto" planning for
    CUDA (the plan is for the GPU you are about to rent even when run on a laptop)."""
    from .config import StudentConfig
    from .student import SpikingStudentLM

    teacher = teacher or teacher_shape(cfg.teacher_model)
    dev = device or ("cpu" if cfg.device == "cpu" else "cuda")
    tdev = cfg.teacher_device or dev
    tdev_type = tdev.split(":")[0]
    tdtype = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else ("bfloat16" if tdev_type == "cuda" else "float32")
    quant = getattr(cfg, "teacher_quantization", "none") or "none"

    scfg = StudentConfig(vocab_size=teacher.vocab_size, **student_args)
    import torch

    with torch.device("meta"):
        s_params = SpikingStudentLM(scfg).num_parameters()
    t_steps = scfg.passes  # body passes per token
    b, s, v, d = cfg.batch_size, cfg.max_length, teacher.vocab_size, scfg.dim
    n_tok = b * s  # real tokens per micro-batch, at most
    chunk = min(cfg.loss_chunk_tokens, n_tok)
    autocast = autocast_name(dev)
    act_bytes = 2.5 if autocast else 4.0  # 16-bit autocast saves mostly 16-bit tensors; norms stay fp32

    eff = cfg.batch_size * cfg.grad_accum_steps * world_size
    summary = [
        f"memory plan: teacher {teacher.name} ({_fmt_n(teacher.params)} parameters, vocab {v}, "
        f"{teacher.num_layers} layers; shape from {teacher.source}), {quant + ' ' if quant != 'none' else ''}"
        f"{tdtype} on {tdev}",
        f"student {scfg.student_type} dim {d} depth {scfg.depth} heads {scfg.num_heads} "
        f"T={scfg.num_timesteps if scfg.spiking else 1}{' count-coded (1 pass)' if scfg.count_coded else ''} "
        f"({_fmt_n(s_params)} parameters{', gradient checkpointing' if scfg.gradient_checkpointing else ''}"
        f"{f', {autocast} autocast' if autocast else ', fp32'}) on {dev}",
        f"batch {b} x max-length {s}, grad-accum {cfg.grad_accum_steps}, {world_size} process(es): effective batch "
        f"{eff} sequences ({eff * s} tokens) per optimizer step; loss chunk {cfg.loss_chunk_tokens} tokens",
    ]
    plan = MemoryPlan(teacher, summary, budget_bytes=budget_gib * GIB)

    # persistent
    if quant in QUANT_BYTES:
        rest = teacher.params - teacher.linear_params
        w_bytes = teacher.linear_params * QUANT_BYTES[quant] + rest * DTYPE_BYTES[tdtype]
        detail = f"{_fmt_n(teacher.linear_params)} x {QUANT_BYTES[quant]} B ({quant}) + rest {tdtype}"
    else:
        w_bytes = teacher.params * DTYPE_BYTES[tdtype]
        detail = f"{_fmt_n(teacher.params)} x {DTYPE_BYTES[tdtype]:.0f} B ({tdtype})"
    plan.add("persistent", "teacher weights", detail, w_bytes, tdev)
    plan.add("persistent", "student weights + grads", f"{_fmt_n(s_params)} x (4 + 4) B fp32", s_params * 8, dev)
    plan.add("persistent", "AdamW moments", f"{_fmt_n(s_params)} x 2 x 4 B fp32", s_params * 8, dev)
    if world_size > 1:
        plan.add("persistent", "DDP gradient buckets", f"{_fmt_n(s_params)} x 4 B", s_params * 4, dev)
    if dev == "cuda":
        plan.add("persistent", "CUDA context + allocator slack", "approx.", CUDA_CONTEXT_BYTES, dev)
    if tdev_type == "cuda" and tdev != dev:
        plan.add("persistent", "CUDA context (teacher GPU)", "approx.", CUDA_CONTEXT_BYTES, tdev)

    # teacher forward, then the targets built from its logits (inference mode: activations are freed
    # layer by layer, the logits are freed once the fp32 log-softmax rows exist)
    tb = DTYPE_BYTES[tdtype] if quant == "none" else 2.0
    logits = n_tok * v * tb
    t_act = n_tok * (4 * teacher.hidden_size + 3 * teacher.intermediate_size) * tb
    plan.add("teacher forward", "teacher activations (1 layer)", f"{b}x{s} x (4H + 3I) x {tb:.0f} B", t_act, tdev)
    plan.add("teacher forward", "teacher logits", f"[{b}, {s}, {v}] x {tb:.0f} B", logits, tdev)
    plan.add("teacher targets", "teacher logits (held)", f"[{b}, {s}, {v}] x {tb:.0f} B", logits, tdev)
    plan.add("teacher targets", "target log-softmax", f"[{n_tok}, {v}] x 4 B fp32", n_tok * v * 4, tdev)
    plan.add(
        "teacher targets", "log-softmax chunk", f"{TEACHER_SOFTMAX_BUFFERS} x [{chunk}, {v}] x 4 B",
        TEACHER_SOFTMAX_BUFFERS * chunk * v * 4, tdev,
    )  # fmt: skip

    # student phase
    per_layer, outside = student_activation_values(
        d, scfg.depth, scfg.num_heads, scfg.num_kv_heads, scfg.hidden_dim, spike_driven=scfg.spike_driven
    )
    tok_ts = t_steps * n_tok
    if scfg.gradient_checkpointing:
        acts = tok_ts * (scfg.depth * d * 4.0 + per_layer * act_bytes + outside * 4.0)
        how = f"passes*B*S={tok_ts} x (depth x D x 4 B + 1 layer)"
    else:
        acts = tok_ts * (scfg.depth * per_layer * act_bytes + outside * 4.0)
        how = f"passes*B*S={tok_ts} x depth {scfg.depth} x {per_layer:.0f} x {act_bytes} B"
    plan.add("student step", "student activations (saved)", how, acts, dev)
    plan.add("student step", "teacher target on student", f"[{n_tok}, {v}] x 4 B fp32", n_tok * v * 4, dev)
    plan.add(
        "student step", "loss chunk working set", f"{LOSS_CHUNK_BUFFERS} x [{chunk}, {v}] x 4 B",
        LOSS_CHUNK_BUFFERS * chunk * v * 4, dev,
    )  # fmt: skip
    plan.add("student step", "loss head-gradient buffer", f"[{v}, {d}] x 4 B", v * d * 4, dev)

    dims = dict(b=b, s=s, v=v, d=d, tb=tb, tok_ts=tok_ts, per_layer=per_layer, chunk=chunk)
    _add_evaluation(plan, dims, logits, dev, tdev)
    return plan


def gpus_of_run(cfg: Any, world_size: int = 1, local_world_size: int | None = None) -> list[int]:
    """Indices of the GPUs a run on this machine uses: one per local process (0..n-1) and the
    --teacher-device's."""
    n = max(1, local_world_size or world_size)
    used = set(range(n))
    tdev = getattr(cfg, "teacher_device", None) or ""
    if tdev.startswith("cuda"):
        used.add(int(tdev.split(":")[1]) if ":" in tdev else 0)
    return sorted(used)


def _add_evaluation(plan: MemoryPlan, n: dict[str, Any], logits: float, dev: str, tdev: str) -> None:
    """The evaluation phase (no grad, no autocast): the teacher's logits stay while the student's
    rows are compared a chunk at a time (`evaluate.evaluate_fidelity`)."""
    b, s, v, d, chunk, tok_ts = n["b"], n["s"], n["v"], n["d"], n["chunk"], n["tok_ts"]
    plan.add("evaluation", "teacher logits (held)", f"[{b}, {s}, {v}] x {n['tb']:.0f} B", logits, tdev)
    fwd = f"passes*B*S={tok_ts} x {n['per_layer']:.0f} x 4 B"
    plan.add("evaluation", "student forward (no grad)", fwd, tok_ts * n["per_layer"] * 4, dev)
    plan.add("evaluation", "student hidden states", f"[{b}, {s}, {d}] x 4 B", b * s * d * 4, dev)
    work = f"{EVAL_CHUNK_BUFFERS} x [{chunk}, {v}] x 4 B"
    plan.add("evaluation", "evaluation chunk working set", work, EVAL_CHUNK_BUFFERS * chunk * v * 4, dev)


def plan_from_args(cfg: Any, student_args: dict[str, Any], world_size: int = 1) -> MemoryPlan:
    """The plan for the CLI's configs; the budget is the smallest memory among the visible GPUs the
    run uses (every local process's and the teacher's), else 16 GiB."""
    import os

    budget = 16.0
    try:
        import torch

        if torch.cuda.is_available() and cfg.device != "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None
            count = torch.cuda.device_count()
            used = [i for i in gpus_of_run(cfg, world_size, local) if i < count] or [0]
            budget = min(torch.cuda.get_device_properties(i).total_memory for i in used) / GIB
    except Exception:  # noqa: BLE001 - the default budget is fine
        pass
    return plan_memory(cfg, student_args, world_size=world_size, budget_gib=budget)
