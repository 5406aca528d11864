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
from pathlib import Path
from typing import Any

from .config import KD_LOSSES, SCHEDULERS, STUDENT_TYPES, SURROGATES, StudentConfig, TrainConfig


def configure_openmp_wait() -> None:
    """Make OpenMP threads wait passively unless the user set OMP_WAIT_POLICY.

    Spinning waits stall when other jobs share the cores: on a 2-core machine running other work, a
    student training step took 2-5x longer spinning than waiting passively. Only effective before
    torch loads libgomp, so this module imports no torch and calls it on import.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


configure_openmp_wait()

log = logging.getLogger("snn_distill")

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
    "gradient_checkpointing": "gradient_checkpointing",
    "max_seq_len": "max_seq_len",
}


class UserError(Exception):
    """Raised for bad input that the CLI reports as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    return v


def build_train_parser(prog: str = "train_snn_student.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Distil a Hugging Face causal LM into a spiking student.")
    p.add_argument(
        "--config",
        help="JSON or YAML file of flags (a previous run's metadata.json works); "
        "command-line flags override it",
    )
    g = p.add_argument_group("basic training")
    g.add_argument("--teacher-model", help="Hugging Face causal LM id, local folder or .gguf file (required)")
    g.add_argument(
        "--dataset",
        default="synthetic",
        help="'synthetic', a datasets id (wikitext-2, tinystories, "
        "name:config), a save_to_disk folder, or a .txt/.jsonl file",
    )
    g.add_argument("--dataset-path", help="plain-text prompts file, one prompt per line")
    g.add_argument("--output-dir", default="artifacts/snn_student")
    g.add_argument("--num-steps", type=_positive_int, default=100)
    g.add_argument("--batch-size", type=_positive_int, default=4)
    g.add_argument("--grad-accum-steps", type=_positive_int, default=1)
    g.add_argument("--max-length", type=_positive_int, default=64)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--scheduler", choices=SCHEDULERS, default="constant")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--pack", action="store_true", help="concatenate texts and cut into --max-length blocks")
    g.add_argument("--held-out-fraction", type=float, default=0.05)
    g = p.add_argument_group("loss")
    g.add_argument("--kd-loss", choices=KD_LOSSES, default="forward_kl")
    g.add_argument(
        "--hard-label-weight", type=float, default=0.0, help="weight of next-token cross-entropy (0-1)"
    )
    g.add_argument("--loss-chunk-tokens", type=_positive_int, default=1024)
    g = p.add_argument_group("student")
    g.add_argument(
        "--student-type",
        choices=STUDENT_TYPES,
        default="snn",
        help="snn: spiking student; ann: identically shaped non-spiking baseline",
    )
    g.add_argument("--student-dim", type=_positive_int, default=128)
    g.add_argument("--student-depth", type=_positive_int, default=2)
    g.add_argument("--student-heads", type=_positive_int, default=4)
    g.add_argument("--student-kv-heads", type=_positive_int, default=None, help="grouped-query attention")
    g.add_argument("--mlp-ratio", type=float, default=4.0)
    g.add_argument(
        "--max-seq-len", type=_positive_int, default=2048, help="longest context the student serves"
    )
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--qat", choices=("none", "int8"), default="none", help="quantization-aware training")
    g = p.add_argument_group("SNN")
    g.add_argument("--snn-timesteps", type=_positive_int, default=4)
    g.add_argument("--snn-surrogate", choices=SURROGATES, default="sigmoid")
    g.add_argument("--surrogate-slope", type=float, default=None)
    g.add_argument("--snn-threshold", type=float, default=1.0)
    g.add_argument("--snn-decay", type=float, default=0.5)
    g = p.add_argument_group("teacher")
    g.add_argument(
        "--teacher-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="teacher weights' dtype; auto: bfloat16 on CUDA, float32 on CPU",
    )
    g.add_argument(
        "--teacher-device", default=None, help="where the teacher runs, e.g. cuda:1 or cpu (default: --device)"
    )
    g.add_argument(
        "--teacher-quantization",
        choices=("none", "8bit", "4bit"),
        default="none",
        help="load the teacher's weights in 8-bit or 4-bit with bitsandbytes (CUDA; pip install bitsandbytes)",
    )
    g.add_argument(
        "--teacher-cache",
        default=None,
        metavar="DIR",
        help="store the teacher's top-k log-probabilities per token (plus the tail mass) in DIR and reuse "
        "them: a later run over the same data and teacher does not load the teacher's weights",
    )
    g.add_argument(
        "--teacher-cache-topk",
        type=_positive_int,
        default=64,
        metavar="K",
        help="words per token the teacher cache keeps (default 64); the rest is one tail bin",
    )
    g = p.add_argument_group("scale: checkpoints, resume, memory plan")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
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
    g = p.add_argument_group("metadata, logging, export")
    g.add_argument("--log-interval", type=int, default=5, help="steps between loss logs, 0 disables")
    g.add_argument("--eval-interval", type=int, default=0, help="steps between held-out evaluations")
    g.add_argument("--no-git-tracking", action="store_true")
    g.add_argument("--export-onnx", action="store_true", help="export student.onnx after training")
    g.add_argument("--quiet", action="store_true", help="no progress bar or info logs")
    return p


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
        teacher_dtype=args.teacher_dtype,
        teacher_device=args.teacher_device,
        teacher_quantization=getattr(args, "teacher_quantization", "none"),
        teacher_cache=getattr(args, "teacher_cache", None),
        teacher_cache_topk=getattr(args, "teacher_cache_topk", 64),
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        resume=getattr(args, "resume", False),
        git_tracking=not args.no_git_tracking,
        export_onnx=args.export_onnx,
    )
    student = {field: getattr(args, dest) for dest, field in STUDENT_FLAGS.items()}
    student["qat_int8"] = args.qat == "int8"
    # Validate the student shape now (vocab is the teacher's, unknown yet), before loading anything.
    StudentConfig(vocab_size=2, **student)
    return cfg, student


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    import warnings

    warnings.filterwarnings("ignore", message=".*TypedStorage.*")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .artifacts import ArtifactError
    from .data import DataError
    from .distill import TrainingError
    from .teacher import TeacherError

    errors: list[type[BaseException]] = [
        UserError,
        ValueError,
        ArtifactError,
        DataError,
        TeacherError,
        TrainingError,
        FileNotFoundError,
    ]
    try:
        from .export.onnx import ExportError

        errors.append(ExportError)
    except ImportError:
        pass
    return tuple(errors)


def run_guarded(fn, *args) -> int:
    """Run a command; user errors become one line on stderr and exit code 2."""
    try:
        fn(*args)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))  # 130/143: stopped by SIGINT/SIGTERM after a checkpoint
    except (OSError, RuntimeError, MemoryError) as e:  # a full disk or memory anywhere else: one line too
        from .failures import disk_full_message, generic_out_of_memory_message, is_disk_full, is_out_of_memory

        if is_disk_full(e):
            print(f"error: {disk_full_message(e)}", file=sys.stderr)
        elif is_out_of_memory(e):
            print(f"error: {generic_out_of_memory_message(e)}", file=sys.stderr)
        else:
            raise
        return 2


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
    p = _Parser(prog=prog, description="Export a trained student to ONNX.")
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
    p = _Parser(prog=prog, description="Generate text from a trained student (streams to stdout).")
    p.add_argument("prompt")
    p.add_argument(
        "--artifacts", default="artifacts/snn_student", help="folder holding student.pt + metadata.json"
    )
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to a stub")
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

            backend = SNNLLMBackend(model_path=str(art / "student.pt"), strict=args.strict)
        for piece in backend.stream(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    return run_guarded(_run)


def eval_main(argv: list[str] | None = None, prog: str = "evaluate_snn_student.py") -> int:
    from .evaluate_cli import main as evaluate_main

    return evaluate_main(argv, prog)


COMMANDS = {"train": train_main, "export": export_main, "generate": generate_main, "eval": eval_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: snn-distill {{{','.join(COMMANDS)}}} ... (got {argv[:1] or 'nothing'})", file=sys.stderr
        )
        return 2
    return COMMANDS[argv[0]](argv[1:], prog=f"snn-distill {argv[0]}")
