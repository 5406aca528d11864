"""Validated configuration dataclasses.

`StudentConfig` alone is enough to rebuild a student (it is stored in `metadata.json` under
`architecture` + `snn_config`, like litgpt's `model_config.yaml`). Every range check raises
`ValueError` whose message says how to fix the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURE_VERSION = "v2.0"
SURROGATES = ("sigmoid", "fast_sigmoid", "triangular", "arctan")
STUDENT_TYPES = ("snn", "ann")
SCHEDULERS = ("constant", "cosine", "linear")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
# the forward-KL chunk kernel (fused_loss.py): auto = liger on CUDA when installed, else compile
FUSED_LOSSES = ("auto", "compile", "eager", "liger")
# the multi-step LIF kernel (neurons.py): auto = compiled when torch.compile works, else fused
LIF_KERNELS = ("auto", "compiled", "fused", "loop")
SNN_MODES = ("hybrid", "spike-driven")
SNN_CODINGS = ("temporal", "count")


# The neuron settings each layout gets unless told otherwise, chosen by measurement (BENCHMARKS.md,
# issue 12): spike-driven students are ternary with learned thresholds calibrated to 0.20, which beat
# binary spikes at 0.15 on both teachers in perplexity, energy and dead neurons.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "hybrid": {"learn_threshold": False, "target_rate": 0.15, "ternary": False, "rate_floor": 0.0},
    "spike-driven": {"learn_threshold": True, "target_rate": 0.20, "ternary": True, "rate_floor": 0.01},
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# StudentConfig fields stored under metadata `snn_config` rather than `architecture`.
SNN_KEYS = (
    "num_timesteps",
    "surrogate",
    "surrogate_slope",
    "threshold",
    "decay",
    "fused_lif",
    "lif_kernel",
    "mode",
    "learn_threshold",
    "learn_decay",
    "target_rate",
    "homeostasis",
    "rate_floor",
    "coding",
    "ternary",
)


@dataclass
class StudentConfig:
    """Shape and neuron settings of a student; `SpikingStudentLM(cfg)` rebuilds it exactly."""

    vocab_size: int
    dim: int = 128
    depth: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (plain multi-head attention)
    mlp_ratio: float = 4.0
    max_seq_len: int = 2048  # longest context served; RoPE itself has no hard limit
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    student_type: str = "snn"  # "snn" (LIF neurons over T timesteps) or "ann" (same shape, GELU)
    num_timesteps: int = 4
    surrogate: str = "sigmoid"
    surrogate_slope: float | None = None  # None: the surrogate's documented default
    threshold: float = 1.0
    decay: float = 0.5  # membrane leak beta: u[t] = beta * u[t-1] + I[t] - threshold * s[t-1]
    fused_lif: bool = True  # False: the per-step reference loop, whatever lif_kernel says
    lif_kernel: str = "auto"  # one of LIF_KERNELS (neurons.lif_multistep; counting.CountLIF)
    # "spike-driven" (default): every weight matmul reads a spike code (see student.py); "hybrid":
    # spikes feed Q/K/V attention and the MLP down-projection only (the original student)
    mode: str = "spike-driven"
    learn_threshold: bool | None = None  # per-channel learnable threshold (None: the mode's default)
    learn_decay: bool = False  # per-channel learnable leak, decay = sigmoid(w) (PLIF)
    # spike-driven or count coding: thresholds calibrated on the first batch to fire at this rate (None:
    # the mode's default)
    target_rate: float | None = None
    homeostasis: float = 0.0  # spike-driven: per-step threshold adaptation toward target_rate (0: off)
    # training: a channel firing below this rate has its threshold lowered (neurons.LIF; 0: off; None:
    # the mode's default)
    rate_floor: float | None = None
    # "count" (default): each layer runs once per token and its neurons emit the spike counts 0..T of
    # their token's constant input current (counting.py; same KJV quality as temporal, T times less
    # matmul work in training); "temporal": every layer runs T timesteps (T rows per token)
    coding: str = "count"
    # spike-driven: the LIFs on normalised inputs emit signed spikes (-1, 0, 1) (None: the mode's default)
    ternary: bool | None = None
    gradient_checkpointing: bool = False
    qat_int8: bool = False  # fake-quantize linear weights (per-channel symmetric int8) while training

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _check(self.mode in SNN_MODES, f"--snn-mode must be one of {', '.join(SNN_MODES)}, got {self.mode!r}")
        for key, value in MODE_DEFAULTS[self.mode].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        _check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.dim >= 1, f"--student-dim must be positive, got {self.dim}")
        _check(self.depth >= 1, f"--student-depth must be positive, got {self.depth}")
        _check(self.num_heads >= 1, f"--student-heads must be positive, got {self.num_heads}")
        _check(
            self.dim % self.num_heads == 0,
            f"--student-dim ({self.dim}) must be divisible by --student-heads ({self.num_heads}); "
            "pick heads that divide the width",
        )
        _check(
            (self.dim // self.num_heads) % 2 == 0,
            f"head size dim/heads = {self.dim // self.num_heads} must be even for rotary embeddings; "
            "change --student-dim or --student-heads",
        )
        _check(
            1 <= self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
            f"num_kv_heads ({self.num_kv_heads}) must divide --student-heads ({self.num_heads})",
        )
        _check(self.mlp_ratio > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        _check(self.max_seq_len >= 1, f"max_seq_len must be positive, got {self.max_seq_len}")
        _check(
            self.student_type in STUDENT_TYPES,
            f"student type must be one of {', '.join(STUDENT_TYPES)}, got {self.student_type!r}",
        )
        _check(
            1 <= self.num_timesteps <= 256,
            f"--snn-timesteps must be in 1..256, got {self.num_timesteps}",
        )
        _check(
            self.surrogate in SURROGATES,
            f"--snn-surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}",
        )
        _check(
            self.surrogate_slope is None or self.surrogate_slope > 0,
            f"surrogate slope must be positive, got {self.surrogate_slope}",
        )
        _check(self.threshold > 0, f"--snn-threshold must be positive (try 0.5-1.5), got {self.threshold}")
        _check(0.0 <= self.decay <= 1.0, f"membrane decay must be in [0, 1], got {self.decay}")
        _check(
            self.lif_kernel in LIF_KERNELS,
            f"--snn-lif-kernel must be one of {', '.join(LIF_KERNELS)}, got {self.lif_kernel!r}",
        )
        _check(
            0.0 < self.target_rate <= 0.5,
            f"--snn-target-rate must be in (0, 0.5] (try 0.1-0.2), got {self.target_rate}",
        )
        _check(
            self.coding in SNN_CODINGS,
            f"--snn-coding must be one of {', '.join(SNN_CODINGS)}, got {self.coding!r}",
        )
        _check(
            not self.ternary or self.mode == "spike-driven",
            "--snn-ternary applies to the LIFs on normalised inputs of --snn-mode spike-driven; add that mode",
        )
        _check(
            0.0 <= self.homeostasis <= 1.0,
            f"--snn-homeostasis must be in [0, 1] (try 0.05; 0 turns it off), got {self.homeostasis}",
        )
        _check(
            0.0 <= self.rate_floor < 0.5,
            f"--snn-rate-floor must be in [0, 0.5) (try 0.01; 0 turns it off), got {self.rate_floor}",
        )
        _check(
            not self.rate_floor or self.per_channel_neurons,
            "--snn-rate-floor moves per-channel thresholds: add --snn-mode spike-driven, --snn-coding count or "
            "--snn-learn-threshold",
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    @property
    def spiking(self) -> bool:
        return self.student_type == "snn"

    @property
    def spike_driven(self) -> bool:
        """The spike-driven layout (also for its ANN twin, which keeps the layout without spikes)."""
        return self.mode == "spike-driven"

    @property
    def count_coded(self) -> bool:
        """A spiking student whose layers run once per token on spike counts (see counting.py)."""
        return self.spiking and self.coding == "count"

    @property
    def passes(self) -> int:
        """Rows of the residual stream (and of the decode cache) per token: T for a temporal spiking
        student, 1 for a count-coded one and for the ANN twin."""
        return self.num_timesteps if self.spiking and not self.count_coded else 1

    @property
    def per_channel_neurons(self) -> bool:
        return self.spike_driven or self.count_coded or self.learn_threshold or self.learn_decay

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # The spec's metadata splits the config in two sections; these keep their spec names.
    def architecture_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in SNN_KEYS:
            d.pop(k)
        return d

    def snn_config_dict(self) -> dict[str, Any]:
        return {
            "num_timesteps": self.num_timesteps,
            "surrogate_type": self.surrogate,
            "spike_threshold": self.threshold,
            "surrogate_slope": self.surrogate_slope,
            "decay": self.decay,
            "fused_lif": self.fused_lif,
            "lif_kernel": self.lif_kernel,
            "mode": self.mode,
            "learn_threshold": self.learn_threshold,
            "learn_decay": self.learn_decay,
            "target_rate": self.target_rate,
            "homeostasis": self.homeostasis,
            "rate_floor": self.rate_floor,
            "coding": self.coding,
            "ternary": self.ternary,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> StudentConfig:
        """Rebuild from a `metadata.json` dict (its `architecture`, `snn_config`, `vocab_size`)."""
        arch = dict(meta.get("architecture") or {})
        snn = dict(meta.get("snn_config") or {})
        if "vocab_size" not in arch and "vocab_size" in meta:
            arch["vocab_size"] = meta["vocab_size"]
        _check("vocab_size" in arch, "metadata has no vocab_size; it cannot describe a student")
        # keys added later: what the student was before they existed, whatever today's default is
        snn.setdefault("mode", "hybrid")
        snn.setdefault("coding", "temporal")
        for key, value in MODE_DEFAULTS["hybrid"].items():  # binary, fixed thresholds, 0.15
            snn.setdefault(key, value)
        renames = {"surrogate_type": "surrogate", "spike_threshold": "threshold"}
        for k, v in snn.items():
            arch[renames.get(k, k)] = v
        return cls.from_dict(arch)


@dataclass
class TrainConfig:
    """Everything the distillation loop needs besides the student shape; mirrors the CLI flags."""

    teacher_model: str
    dataset: str = "synthetic"
    dataset_path: str | None = None
    output_dir: str = "artifacts/snn_student"
    num_steps: int = 100
    batch_size: int = 4  # the spec's examples and the CLI default
    grad_accum_steps: int = 1
    max_length: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0
    scheduler: str = "constant"
    warmup_steps: int = 0
    log_interval: int = 5
    eval_interval: int = 0
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    kd_loss: str = "forward_kl"
    hard_label_weight: float = 0.0
    pack: bool = False
    held_out_fraction: float = 0.05
    loss_chunk_tokens: int = 1024
    fused_loss: str = "auto"  # --fused-loss: auto | compile | eager | liger (fused_loss.py)
    teacher_cache: str | None = None
    teacher_cache_topk: int = 64
    teacher_dtype: str = "auto"
    teacher_device: str | None = None
    teacher_quantization: str = "none"  # "8bit" / "4bit": bitsandbytes (CUDA)
    git_tracking: bool = True
    export_onnx: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    # --teacher-responses: distil over prompt + the teacher's reply (responses.py)
    teacher_responses: bool = False
    response_max_new_tokens: int = 48
    response_sample: bool = False  # False: greedy replies
    response_temperature: float = 0.7
    response_top_p: float = 0.9
    response_seed: int | None = None  # None: --seed
    response_cache: str | None = None  # None: TEACHER_CACHE/responses, else $SNN_DISTILL_CACHE/responses
    response_loss_only: bool = False
    on_policy_fraction: float = 0.0  # share of micro-batches whose reply the student samples itself
    max_texts: int | None = None  # keep the first N texts of the dataset
    # energy budget of a spiking student (energy.training_energy_ratios): the loss adds
    # energy_weight * (max(0, whole - energy_budget) + max(0, body - energy_budget_body)), the estimated
    # energy per token over the ANN twin's, whole model and body (None: no budget)
    energy_budget: float | None = None
    energy_budget_body: float | None = None
    # weight 2 with a ramp over 30 % of the steps, by measurement (BENCHMARKS.md, issue 12): the penalty's
    # gradient flows only through spikes that fired, and with a ramp over half the steps it ended 1-3 %
    # above the budget; over 30 % every run (three tiny GPT-2 seeds, two KJV) lands on it
    energy_weight: float = 2.0
    # the budgets tighten linearly from the ANN twin's energy (ratio 1) to their values over this share
    # of the steps (as gradual pruning does), and hold from then on (0: from the first step)
    energy_ramp: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.teacher_model), "--teacher-model is required (a Hub id, a folder or a .gguf file)")
        _check(self.num_steps >= 1, f"--num-steps must be positive, got {self.num_steps}")
        _check(self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}")
        _check(self.grad_accum_steps >= 1, f"--grad-accum-steps must be positive, got {self.grad_accum_steps}")
        _check(self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}")
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        _check(self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}")
        _check(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _check(self.log_interval >= 0, f"--log-interval must be >= 0 (0 disables), got {self.log_interval}")
        _check(
            self.eval_interval >= 0,
            f"--eval-interval must be >= 0 (0: only at the end), got {self.eval_interval}",
        )
        _check(self.kd_loss in KD_LOSSES, f"--kd-loss must be one of {', '.join(KD_LOSSES)}")
        _check(
            0.0 <= self.hard_label_weight <= 1.0,
            f"--hard-label-weight must be in [0, 1], got {self.hard_label_weight}",
        )
        _check(
            0.0 <= self.held_out_fraction < 0.5,
            f"held-out fraction must be in [0, 0.5), got {self.held_out_fraction}",
        )
        _check(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.loss_chunk_tokens >= 1, "loss chunk size must be positive")
        _check(
            self.fused_loss in FUSED_LOSSES,
            f"--fused-loss must be one of {', '.join(FUSED_LOSSES)}, got {self.fused_loss!r}",
        )
        _check(
            self.teacher_cache_topk >= 1,
            f"--teacher-cache-topk must be positive, got {self.teacher_cache_topk}",
        )
        _check(
            self.teacher_dtype in ("auto", "float32", "bfloat16", "float16"),
            "--teacher-dtype must be auto, float32, bfloat16 or float16",
        )
        _check(self.checkpoint_every >= 0, "--checkpoint-every must be >= 0")
        _check(
            self.teacher_quantization in ("none", "8bit", "4bit"),
            f"--teacher-quantization must be none, 8bit or 4bit, got {self.teacher_quantization!r}",
        )
        self._check_responses()
        for flag, v in (("--snn-energy-budget", self.energy_budget),
                        ("--snn-energy-budget-body", self.energy_budget_body)):  # fmt: skip
            _check(v is None or v > 0, f"{flag} is a ratio to the ANN twin's energy: give one > 0 (e.g. 0.25), not {v}")
        _check(self.energy_weight > 0, f"--snn-energy-weight must be > 0 (try 1-10), got {self.energy_weight}")
        _check(
            0.0 <= self.energy_ramp <= 1.0,
            f"--snn-energy-ramp is a share of the steps: give one in [0, 1] (e.g. 0.5), not {self.energy_ramp}",
        )

    @property
    def energy_budgeted(self) -> bool:
        return self.energy_budget is not None or self.energy_budget_body is not None

    def check_student(self, student_type: str) -> None:
        """Raise ValueError when a setting needs another kind of student."""
        _check(
            not self.energy_budgeted or student_type == "snn",
            "--snn-energy-budget needs a spiking student: drop it or use --student-type snn",
        )

    def _check_responses(self) -> None:
        _check(self.max_texts is None or self.max_texts >= 1, f"--max-texts must be positive, got {self.max_texts}")
        _check(
            1 <= self.response_max_new_tokens <= 4096,
            f"--response-max-new-tokens must be in 1..4096, got {self.response_max_new_tokens}",
        )
        _check(self.response_temperature > 0, f"--response-temperature must be > 0, got {self.response_temperature}")
        _check(0 < self.response_top_p <= 1, f"--response-top-p must be in (0, 1], got {self.response_top_p}")
        _check(
            0.0 <= self.on_policy_fraction <= 1.0,
            f"--on-policy-fraction must be in [0, 1], got {self.on_policy_fraction}",
        )
        needs = [f for f, on in (("--response-loss-only", self.response_loss_only),
                                 ("--on-policy-fraction", self.on_policy_fraction > 0)) if on]  # fmt: skip
        _check(
            self.teacher_responses or not needs,
            f"{' and '.join(needs)} need(s) --teacher-responses (the student learns from the teacher's replies)",
        )
        _check(
            not (self.teacher_responses and self.pack),
            "--teacher-responses and --pack do not mix: each example is one prompt + its reply; drop --pack",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
