"""Command lines: `snn-distill train|export|generate|eval` and the spec's scripts/ entry points.

User errors end with one line on stderr (`error: what is wrong; how to fix it`), a non-zero exit
and no traceback. Results go to stdout; logs and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib import import_module
from pathlib import Path
from typing import Any

from . import __version__
from .cli_common import ArgParser, UserError, positive_int, run_guarded, setup_logging
from .config import (
    FUSED_LOSSES,
    KD_LOSSES,
    LIF_KERNELS,
    SCHEDULERS,
    SNN_CODINGS,
    SNN_MODES,
    STUDENT_TYPES,
    SURROGATES,
    StudentConfig,
    TrainConfig,
)


def configure_openmp_wait() -> None:
    """Make OpenMP threads wait passively unless the user set OMP_WAIT_POLICY.

    Spinning waits stall when other jobs share the cores: on a 2-core machine running other work, a
    student training step took 2-5x longer spinning than waiting passively. Only effective before
    torch loads libgomp, so this module imports no torch and calls it on import.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


configure_openmp_wait()

log = logging.getLogger("snn_distill")

# One copy of each default: the dataclasses'. The CLI reads them, so a run from the command line and one from
# `train(TrainConfig(...))` agree.
TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
STUDENT_DEFAULTS = {f.name: f.default for f in fields(StudentConfig)}

# Flags that map onto StudentConfig fields (dest -> field).
STUDENT_FLAGS = {
    "student_dim": "dim",
    "student_depth": "depth",
    "student_heads": "num_heads",
    "student_kv_heads": "num_kv_heads",
    "mlp_ratio": "mlp_ratio",
    "student_type": "student_type",
    "snn_timesteps": "num_timesteps",
    "snn_surrogate": "surrogate",
    "surrogate_slope": "surrogate_slope",
    "snn_threshold": "threshold",
    "snn_decay": "decay",
    "snn_lif_kernel": "lif_kernel",
    "snn_mode": "mode",
    "snn_learn_threshold": "learn_threshold",
    "snn_learn_decay": "learn_decay",
    "snn_target_rate": "target_rate",
    "snn_homeostasis": "homeostasis",
    "snn_rate_floor": "rate_floor",
    "snn_coding": "coding",
    "snn_ternary": "ternary",
    "gradient_checkpointing": "gradient_checkpointing",
    "max_seq_len": "max_seq_len",
}


def build_train_parser(prog: str = "train_snn_student.py") -> argparse.ArgumentParser:
    p = ArgParser(prog=prog, description="Distil a Hugging Face causal LM into a spiking student.")
    p.add_argument(
        "--config",
        help="JSON or YAML file of flags (a previous run's metadata.json works); command-line flags override it",
    )
    _add_basic_flags(p.add_argument_group("basic training"))
    _add_loss_flags(p.add_argument_group("loss"))
    _add_student_flags(p.add_argument_group("student"))
    _add_snn_flags(p.add_argument_group("SNN"))
    _add_teacher_flags(p.add_argument_group("teacher"))
    _add_response_flags(p.add_argument_group("teacher replies"))
    _add_scale_flags(p.add_argument_group("scale: checkpoints, resume, memory plan"))
    _add_output_flags(p.add_argument_group("metadata, logging, export"))
    return p


def _add_basic_flags(g: argparse._ArgumentGroup) -> None:
    """Basic training: teacher, data, steps, optimizer, device."""
    g.add_argument("--teacher-model", help="Hugging Face causal LM id, local folder or .gguf file (required)")
    g.add_argument(
        "--dataset",
        default=TRAIN_DEFAULTS["dataset"],
        help="'synthetic', a datasets id (wikitext-2, tinystories, "
        "name:config), a save_to_disk folder, or a .txt/.jsonl file",
    )
    g.add_argument("--dataset-path", help="plain-text prompts file, one prompt per line")
    g.add_argument("--output-dir", default=TRAIN_DEFAULTS["output_dir"])
    g.add_argument("--num-steps", type=positive_int, default=TRAIN_DEFAULTS["num_steps"])
    g.add_argument("--batch-size", type=positive_int, default=TRAIN_DEFAULTS["batch_size"])
    g.add_argument("--grad-accum-steps", type=positive_int, default=TRAIN_DEFAULTS["grad_accum_steps"])
    g.add_argument("--max-length", type=positive_int, default=TRAIN_DEFAULTS["max_length"])
    g.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    g.add_argument("--weight-decay", type=float, default=TRAIN_DEFAULTS["weight_decay"])
    g.add_argument("--grad-clip", type=float, default=TRAIN_DEFAULTS["grad_clip"])
    g.add_argument("--temperature", type=float, default=TRAIN_DEFAULTS["temperature"])
    g.add_argument("--scheduler", choices=SCHEDULERS, default=TRAIN_DEFAULTS["scheduler"])
    g.add_argument("--warmup-steps", type=int, default=TRAIN_DEFAULTS["warmup_steps"])
    g.add_argument("--seed", type=int, default=TRAIN_DEFAULTS["seed"])
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=TRAIN_DEFAULTS["device"])
    g.add_argument("--pack", action="store_true", help="concatenate texts and cut into --max-length blocks")
    g.add_argument("--held-out-fraction", type=float, default=TRAIN_DEFAULTS["held_out_fraction"])


def _add_loss_flags(g: argparse._ArgumentGroup) -> None:
    """The distillation loss."""
    g.add_argument("--kd-loss", choices=KD_LOSSES, default=TRAIN_DEFAULTS["kd_loss"])
    g.add_argument(
        "--hard-label-weight",
        type=float,
        default=TRAIN_DEFAULTS["hard_label_weight"],
        help="weight of next-token cross-entropy (0-1)",
    )
    g.add_argument("--loss-chunk-tokens", type=positive_int, default=TRAIN_DEFAULTS["loss_chunk_tokens"])
    g.add_argument(
        "--fused-loss",
        choices=FUSED_LOSSES,
        default=TRAIN_DEFAULTS["fused_loss"],
        help="forward-KL chunk kernel: auto (liger on CUDA when installed, else compile), compile "
        "(torch.compile; the first step pays a one-off compile), eager, liger (pip install 'snn-distill[cuda]')",
    )


def _add_student_flags(g: argparse._ArgumentGroup) -> None:
    """The student's shape."""
    g.add_argument(
        "--student-type",
        choices=STUDENT_TYPES,
        default=STUDENT_DEFAULTS["student_type"],
        help="snn: spiking student; ann: identically shaped non-spiking baseline",
    )
    g.add_argument("--student-dim", type=positive_int, default=STUDENT_DEFAULTS["dim"])
    g.add_argument("--student-depth", type=positive_int, default=STUDENT_DEFAULTS["depth"])
    g.add_argument("--student-heads", type=positive_int, default=STUDENT_DEFAULTS["num_heads"])
    g.add_argument(
        "--student-kv-heads",
        type=positive_int,
        default=STUDENT_DEFAULTS["num_kv_heads"],
        help="grouped-query attention",
    )
    g.add_argument("--mlp-ratio", type=float, default=STUDENT_DEFAULTS["mlp_ratio"])
    g.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=STUDENT_DEFAULTS["max_seq_len"],
        help="longest context the student serves",
    )
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--qat", choices=("none", "int8"), default="none", help="quantization-aware training")


def _add_snn_flags(g: argparse._ArgumentGroup) -> None:
    """The spiking neurons."""
    g.add_argument("--snn-timesteps", type=positive_int, default=STUDENT_DEFAULTS["num_timesteps"])
    g.add_argument("--snn-surrogate", choices=SURROGATES, default=STUDENT_DEFAULTS["surrogate"])
    g.add_argument("--surrogate-slope", type=float, default=STUDENT_DEFAULTS["surrogate_slope"])
    g.add_argument("--snn-threshold", type=float, default=STUDENT_DEFAULTS["threshold"])
    g.add_argument("--snn-decay", type=float, default=STUDENT_DEFAULTS["decay"])
    g.add_argument(
        "--snn-lif-kernel",
        choices=LIF_KERNELS,
        default=STUDENT_DEFAULTS["lif_kernel"],
        help="LIF training kernel, both codings: auto (compiled for large layers when torch.compile works, else "
        "eager), compiled (torch.compile; the first step pays a one-off compile), fused (eager), loop (reference)",
    )
    g.add_argument(
        "--snn-mode",
        choices=SNN_MODES,
        default=STUDENT_DEFAULTS["mode"],
        help="spike-driven (default): every weight matmul (Q/K/V, attention output, MLP up/down, LM head) reads "
        "spikes; hybrid: spikes feed attention and the MLP down-projection only",
    )
    g.add_argument(
        "--snn-coding",
        choices=SNN_CODINGS,
        default=STUDENT_DEFAULTS["coding"],
        help="temporal: every layer runs T timesteps; count: each layer runs once per token and its neurons "
        "emit spike counts 0..T (T times less matmul work; expands to T binary spikes at inference)",
    )
    g.add_argument(
        "--snn-ternary",
        action=argparse.BooleanOptionalAction,
        default=STUDENT_DEFAULTS["ternary"],
        help="spike-driven: the LIFs on normalised inputs emit signed spikes (-1, 0, 1), keeping the sign "
        "(default: on for spike-driven)",
    )
    g.add_argument(
        "--snn-learn-threshold",
        action=argparse.BooleanOptionalAction,
        default=STUDENT_DEFAULTS["learn_threshold"],
        help="learn a per-channel firing threshold (default: on for spike-driven, off for hybrid)",
    )
    g.add_argument("--snn-learn-decay", action="store_true", help="learn a per-channel membrane leak (PLIF)")
    g.add_argument(
        "--snn-target-rate",
        type=float,
        default=STUDENT_DEFAULTS["target_rate"],
        help="spike-driven or count coding: firing rate the thresholds are calibrated to on the first batch "
        "(default: 0.15 hybrid, 0.20 spike-driven)",
    )
    g.add_argument(
        "--snn-homeostasis",
        type=float,
        default=STUDENT_DEFAULTS["homeostasis"],
        help="spike-driven: rate at which thresholds adapt toward --snn-target-rate while training (0: off)",
    )
    g.add_argument(
        "--snn-rate-floor",
        type=float,
        default=STUDENT_DEFAULTS["rate_floor"],
        metavar="RATE",
        help="while training, lower the threshold of any channel firing below this rate, so that an energy "
        "budget does not leave neurons silent (default: 0.01 spike-driven, 0 hybrid; 0: off)",
    )
    g.add_argument(
        "--snn-energy-budget",
        type=float,
        default=TRAIN_DEFAULTS["energy_budget"],
        metavar="RATIO",
        help="train to this estimated energy per token, as a ratio to the ANN twin's (e.g. 0.25): the loss adds "
        "--snn-energy-weight times the excess; off by default",
    )
    g.add_argument(
        "--snn-energy-budget-body",
        type=float,
        default=TRAIN_DEFAULTS["energy_budget_body"],
        metavar="RATIO",
        help="the same budget for the body alone (everything but the LM head), e.g. 0.15",
    )
    g.add_argument(
        "--snn-energy-weight",
        type=float,
        default=TRAIN_DEFAULTS["energy_weight"],
        help="weight of the energy budget's penalty in the loss",
    )
    g.add_argument(
        "--snn-energy-ramp",
        type=float,
        default=TRAIN_DEFAULTS["energy_ramp"],
        metavar="SHARE",
        help="tighten the energy budgets linearly from the ANN twin's energy to their values over this share of "
        "the steps, then hold them (0: the budgets hold from the first step)",
    )


def _add_teacher_flags(g: argparse._ArgumentGroup) -> None:
    """How the teacher runs, and its logit cache."""
    g.add_argument(
        "--teacher-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default=TRAIN_DEFAULTS["teacher_dtype"],
        help="teacher weights' dtype; auto: bfloat16 on CUDA, float32 on CPU",
    )
    g.add_argument(
        "--teacher-device",
        default=TRAIN_DEFAULTS["teacher_device"],
        help="where the teacher runs, e.g. cuda:1 or cpu (default: --device)",
    )
    g.add_argument(
        "--teacher-quantization",
        choices=("none", "8bit", "4bit"),
        default=TRAIN_DEFAULTS["teacher_quantization"],
        help="load the teacher's weights in 8-bit or 4-bit with bitsandbytes (CUDA; pip install bitsandbytes)",
    )
    g.add_argument(
        "--teacher-cache",
        default=TRAIN_DEFAULTS["teacher_cache"],
        metavar="DIR",
        help="store the teacher's top-k log-probabilities per token (plus the tail mass) in DIR and reuse "
        "them: a later run over the same data and teacher does not load the teacher's weights",
    )
    g.add_argument(
        "--teacher-cache-topk",
        type=positive_int,
        default=TRAIN_DEFAULTS["teacher_cache_topk"],
        metavar="K",
        help="words per token the teacher cache keeps (default 64); the rest is one tail bin",
    )


def _add_response_flags(g: argparse._ArgumentGroup) -> None:
    """--teacher-responses: the teacher replies to every prompt and the student distils the replies."""
    g.add_argument(
        "--teacher-responses",
        action="store_true",
        help="the teacher writes a reply to every prompt (its chat template when it has one) and the student "
        "distils over prompt + reply; replies are cached on disk",
    )
    g.add_argument(
        "--response-max-new-tokens", type=positive_int, default=TRAIN_DEFAULTS["response_max_new_tokens"], metavar="N"
    )
    g.add_argument("--response-sample", action="store_true", help="sample the replies (default: greedy)")
    g.add_argument("--response-temperature", type=float, default=TRAIN_DEFAULTS["response_temperature"])
    g.add_argument("--response-top-p", type=float, default=TRAIN_DEFAULTS["response_top_p"])
    g.add_argument("--response-seed", type=int, default=None, help="seed of sampled replies (default: --seed)")
    g.add_argument(
        "--response-cache",
        default=None,
        metavar="DIR",
        help="where replies are cached (default: TEACHER_CACHE/responses with --teacher-cache, else "
        "$SNN_DISTILL_CACHE/responses)",
    )
    g.add_argument("--response-loss-only", action="store_true", help="weight only the reply positions in the loss")
    g.add_argument(
        "--on-policy-fraction",
        type=float,
        default=TRAIN_DEFAULTS["on_policy_fraction"],
        metavar="LAMBDA",
        help="share of micro-batches whose reply the student samples itself, scored by the live teacher (GKD); "
        "default 0",
    )
    g.add_argument(
        "--max-texts", type=positive_int, default=None, metavar="N", help="use only the first N texts of the dataset"
    )


def _add_scale_flags(g: argparse._ArgumentGroup) -> None:
    """Checkpoints, resume, memory plan."""
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=TRAIN_DEFAULTS["checkpoint_every"],
        help="write OUTPUT_DIR/checkpoint.pt every N steps (and after the last); 0: only on SIGINT/SIGTERM",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR/checkpoint.pt up to --num-steps (same flags as the first run)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the GPU memory plan for these flags and exit without loading any weights",
    )


def _add_output_flags(g: argparse._ArgumentGroup) -> None:
    """Metadata, logging, export."""
    g.add_argument(
        "--log-interval", type=int, default=TRAIN_DEFAULTS["log_interval"], help="steps between loss logs, 0 disables"
    )
    g.add_argument(
        "--eval-interval", type=int, default=TRAIN_DEFAULTS["eval_interval"], help="steps between held-out evaluations"
    )
    g.add_argument("--no-git-tracking", action="store_true")
    g.add_argument("--export-onnx", action="store_true", help="export student.onnx after training")
    g.add_argument("--quiet", action="store_true", help="no progress bar or info logs")


def _load_config_file(path: str) -> dict[str, Any]:
    f = Path(path)
    if not f.is_file():
        raise UserError(f"--config file {path} does not exist")
    text = f.read_text(encoding="utf-8")
    try:
        if f.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"--config file {path} cannot be parsed: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"--config file {path} must hold a mapping of flag names to values")
    if isinstance(data.get("config"), dict) and "model_type" in data:
        data = data["config"]  # a previous run's metadata.json
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_train_args(argv: list[str] | None, prog: str = "train_snn_student.py") -> argparse.Namespace:
    parser = build_train_parser(prog)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        data = _load_config_file(pre.config)
        known = {a.dest for a in parser._actions}
        # metadata stores --no-git-tracking as git_tracking and --qat as qat_int8
        if "git_tracking" in data and "no_git_tracking" not in data:
            data["no_git_tracking"] = not data["git_tracking"]
        # --resume / --dry-run are actions of one invocation, never inherited from a file (a resumed
        # run's metadata.json records resume=true)
        skip = {"config", "resume", "dry_run"}
        parser.set_defaults(**{k: v for k, v in data.items() if k in known and k not in skip})
    args = parser.parse_args(argv)
    if not args.teacher_model:
        parser.error("--teacher-model is required (a Hugging Face id, a local folder or a .gguf file)")
    return args


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """Namespace -> (TrainConfig, StudentConfig kwargs). Raises ValueError with the fix."""
    cfg = TrainConfig(
        teacher_model=args.teacher_model,
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        output_dir=args.output_dir,
        num_steps=args.num_steps,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum_steps,
        max_length=args.max_length,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        temperature=args.temperature,
        scheduler=args.scheduler,
        warmup_steps=args.warmup_steps,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        seed=args.seed,
        device=args.device,
        kd_loss=args.kd_loss,
        hard_label_weight=args.hard_label_weight,
        pack=args.pack,
        held_out_fraction=args.held_out_fraction,
        loss_chunk_tokens=args.loss_chunk_tokens,
        fused_loss=args.fused_loss,
        teacher_dtype=args.teacher_dtype,
        teacher_device=args.teacher_device,
        teacher_quantization=getattr(args, "teacher_quantization", "none"),
        teacher_cache=getattr(args, "teacher_cache", None),
        teacher_cache_topk=getattr(args, "teacher_cache_topk", 64),
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        resume=getattr(args, "resume", False),
        git_tracking=not args.no_git_tracking,
        export_onnx=args.export_onnx,
        teacher_responses=getattr(args, "teacher_responses", False),
        response_max_new_tokens=getattr(args, "response_max_new_tokens", TRAIN_DEFAULTS["response_max_new_tokens"]),
        response_sample=getattr(args, "response_sample", False),
        response_temperature=getattr(args, "response_temperature", TRAIN_DEFAULTS["response_temperature"]),
        response_top_p=getattr(args, "response_top_p", TRAIN_DEFAULTS["response_top_p"]),
        response_seed=getattr(args, "response_seed", None),
        response_cache=getattr(args, "response_cache", None),
        response_loss_only=getattr(args, "response_loss_only", False),
        on_policy_fraction=getattr(args, "on_policy_fraction", 0.0),
        max_texts=getattr(args, "max_texts", None),
        energy_budget=getattr(args, "snn_energy_budget", None),
        energy_budget_body=getattr(args, "snn_energy_budget_body", None),
        energy_weight=getattr(args, "snn_energy_weight", TRAIN_DEFAULTS["energy_weight"]),
        energy_ramp=getattr(args, "snn_energy_ramp", TRAIN_DEFAULTS["energy_ramp"]),
    )
    student = {field: getattr(args, dest) for dest, field in STUDENT_FLAGS.items()}
    student["qat_int8"] = args.qat == "int8"
    # Validate the student shape now (vocab is the teacher's, unknown yet), before loading anything.
    StudentConfig(vocab_size=2, **student)
    cfg.check_student(student["student_type"])
    return cfg, student


def _train(args: argparse.Namespace) -> None:
    from .distill import configure_threads, train

    cfg, student_args = configs_from_args(args)
    if getattr(args, "dry_run", False):
        from .distributed import env_world_size
        from .memory_plan import plan_from_args

        print(plan_from_args(cfg, student_args, world_size=env_world_size()).format())
        return
    configure_threads()
    cli_config = {k: v for k, v in vars(args).items()}
    cli_config["tokenizer_name"] = args.teacher_model
    run = train(cfg, student_args, cli_config=cli_config, progress=not args.quiet)
    if run.rank != 0:  # data-parallel: rank 0 alone reports
        return
    res = run.metadata["training_results"]
    print(
        f"trained {run.metadata['model_type']} ({run.metadata['student_params'] / 1e6:.2f}M parameters, "
        f"{student_args['student_type']}) for {res['steps']} steps: loss {res['first_loss']:.4f} -> "
        f"{res['final_loss']:.4f}"
    )
    ev = run.metadata.get("evaluation")
    if ev:
        print(
            f"held-out: KL(teacher||student) {ev['kl_teacher_student']:.4f}, top-1 agreement "
            f"{ev['top1_agreement']:.3f}, student ppl {ev['student_perplexity']:.2f}, "
            f"teacher ppl {ev['teacher_perplexity']:.2f}"
        )
        if ev.get("responses"):
            from .evaluate import responses_line

            print(f"held-out replies: {responses_line(ev['responses'])}")
    print(f"artifacts: {run.paths['student']} {run.paths['metadata']}")
    if cfg.export_onnx:
        from .export.onnx import export_onnx

        result = export_onnx(run.paths["student"], run.paths["metadata"], None)
        print(f"onnx: {result['path']}")


def train_main(argv: list[str] | None = None, prog: str = "train_snn_student.py") -> int:
    args = parse_train_args(argv, prog)
    setup_logging(args.quiet)
    return run_guarded(_train, args)


def build_export_parser(prog: str = "export_snn_to_onnx.py") -> argparse.ArgumentParser:
    p = ArgParser(prog=prog, description="Export a trained student to ONNX.")
    p.add_argument("--model-path", default="artifacts/snn_student/student.pt")
    p.add_argument("--metadata-path", default=None, help="default: metadata.json beside the model")
    p.add_argument("--output-path", default=None, help="default: student.onnx beside the model")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--quantize", choices=("none", "int8"), default="none")
    p.add_argument("--decode-graph", action="store_true", help="also export a single-step graph with state")
    p.add_argument("--ort", action="store_true", help="also convert to ONNX Runtime's mobile .ort format")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--quiet", action="store_true")
    return p


def export_main(argv: list[str] | None = None, prog: str = "export_snn_to_onnx.py") -> int:
    args = build_export_parser(prog).parse_args(argv)
    setup_logging(args.quiet)

    def _run() -> None:
        from .export.onnx import export_onnx

        result = export_onnx(
            args.model_path,
            args.metadata_path,
            args.output_path,
            opset=args.opset,
            quantize=None if args.quantize == "none" else args.quantize,
            decode_graph=args.decode_graph,
            ort=args.ort,
            verify=not args.no_verify,
        )
        for k, v in result.items():
            print(f"{k}: {v}")

    return run_guarded(_run)


def build_generate_parser(prog: str = "snn-distill generate") -> argparse.ArgumentParser:
    p = ArgParser(prog=prog, description="Generate text from a trained student (streams to stdout).")
    p.add_argument("prompt")
    p.add_argument("--artifacts", default="artifacts/snn_student", help="folder holding student.pt + metadata.json")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--min-tokens", type=int, default=None, help="no end of text before N tokens (default: the student's own)"
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=None, help="as in HF generate; 1 = off (default: the student's)"
    )
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the recorded chat template")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to a stub")
    p.add_argument(
        "--allow-torchscript",
        action="store_true",
        help="load a TorchScript student.pt (loading runs the code it carries: trusted files only)",
    )
    return p


def generate_main(argv: list[str] | None = None, prog: str = "snn-distill generate") -> int:
    args = build_generate_parser(prog).parse_args(argv)
    setup_logging(True)

    def _run() -> None:
        art = Path(args.artifacts)
        if args.backend == "onnx":
            from .backends.onnx import ONNXSNNBackend

            backend = ONNXSNNBackend(art)
        else:
            from .backends.snn import SNNLLMBackend

            backend = SNNLLMBackend(
                model_path=str(art / "student.pt"), strict=args.strict, allow_torchscript=args.allow_torchscript
            )
        for piece in backend.stream(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            min_tokens=args.min_tokens,
            repetition_penalty=args.repetition_penalty,
            raw=args.raw,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    return run_guarded(_run)


def eval_main(argv: list[str] | None = None, prog: str = "evaluate_snn_student.py") -> int:
    from .evaluate_cli import main as evaluate_main

    return evaluate_main(argv, prog)


@dataclass(frozen=True)
class Command:
    """One `snn-distill` subcommand: its one-line help and its `main(argv, prog) -> exit code`.

    `target` is the function or a lazy "module:function" string, so that `snn-distill --help` imports
    neither torch nor a command's optional dependencies.
    """

    help: str
    target: Callable[..., int] | str

    def main(self) -> Callable[..., int]:
        if callable(self.target):
            return self.target
        module, _, name = self.target.partition(":")
        return getattr(import_module(module), name)


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, target: Callable[..., int] | str) -> None:
    """Add `snn-distill NAME`: `target(argv, prog=...)` parses the rest of the command line itself.

    A command from another module of this package registers with one line below, lazily:
    `register_command("serve", "serve a trained student over HTTP", "snn_distill.serve.cli:serve_main")`.
    """
    COMMANDS[name] = Command(help, target)


register_command("train", "distil a teacher LM into a spiking student", train_main)
register_command("export", "export a trained student to ONNX", export_main)
register_command("generate", "stream text from a trained student", generate_main)
register_command("eval", "measure a trained student against its teacher", eval_main)
register_command("serve", "serve a student over an OpenAI-compatible HTTP API", "snn_distill.serve.cli:serve_main")


def build_parser() -> argparse.ArgumentParser:
    """The `snn-distill` parser: one subparser per registered command, `--help` lists them."""
    p = ArgParser(
        prog="snn-distill",
        description="Distil a transformer language model into a small spiking (LIF) student, "
        "generate with it, export it to ONNX.",
        epilog="Run `snn-distill COMMAND --help` for a command's flags.",
    )
    p.add_argument("--version", action="version", version=f"snn-distill {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, cmd in COMMANDS.items():
        # each command parses its own flags (the same parser as its scripts/ entry point)
        sub.add_parser(name, help=cmd.help, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)  # --help and --version exit 0 here
    if args.command is None:
        parser.error(f"unrecognized arguments: {' '.join(rest)}; name a command first")
    return COMMANDS[args.command].main()(rest, prog=f"snn-distill {args.command}")


if __name__ == "__main__":
    sys.exit(main())
