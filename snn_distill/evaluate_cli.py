"""`evaluate_snn_student.py` / `snn-distill eval`: fidelity and efficiency of trained artifacts.

    evaluate_snn_student.py --artifacts DIR [--teacher-model M] [--dataset D | --dataset-path FILE]

Defaults come from the run's metadata.json (teacher, dataset, --max-length, --pack, held-out split).
On the training dataset, the evaluation uses the same held-out texts as training did (same
--held-out-fraction and --seed); with no held-out split it falls back to the first training blocks
and says so ("split": "train"). Any other dataset is used whole ("split": "dataset"). The unigram
baseline always comes from the training data's token frequencies when that data can be loaded.

Prints a small table and writes the `evaluation` and `efficiency` sections into metadata.json
(`--no-update` leaves it alone; `--json` prints the sections as JSON instead of the table).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from .cli_common import ArgParser, UserError, run_guarded, setup_logging

log = logging.getLogger("snn_distill")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = ArgParser(prog=prog, description="Evaluate a trained student against its teacher (fidelity and efficiency).")
    p.add_argument("--artifacts", required=True, help="folder holding student.pt + metadata.json")
    p.add_argument("--teacher-model", help="Hugging Face id, folder or .gguf file (default: the run's teacher)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", help="dataset as for training (default: the run's dataset)")
    src.add_argument("--dataset-path", help="plain-text prompts file, one text per line")
    p.add_argument("--max-length", type=int, default=None, help="block length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=8, help="at most this many batches (0: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--no-update", action="store_true", help="do not write the results into metadata.json")
    p.add_argument("--json", action="store_true", help="print the sections as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no info logs")
    return p


def _same_source(a: tuple[str | None, str | None], b: tuple[str | None, str | None]) -> bool:
    def norm(src: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
        ds, path = src
        if path:
            return None, str(Path(path).expanduser().resolve())
        return ds or "synthetic", None

    return norm(a) == norm(b)


def _check_args(args: argparse.Namespace) -> Path:
    """The flags argparse cannot check; returns the artifacts folder."""
    from .artifacts import STUDENT_FILE

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.eval_batches < 0:
        raise UserError(f"--eval-batches must be >= 0 (0: all), got {args.eval_batches}")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {args.max_length}")
    art = Path(args.artifacts).expanduser()
    if not art.is_dir():
        raise UserError(f"--artifacts {art} is not a folder; pass the --output-dir of a training run")
    if not (art / STUDENT_FILE).is_file():
        raise UserError(f"{art} holds no {STUDENT_FILE}; pass the --output-dir of a finished training run")
    return art


def _load_run_teacher(args: argparse.Namespace, meta: dict[str, Any], vocab_size: int, device: Any) -> Any:
    """The run's teacher (or --teacher-model), checked against the student's vocabulary."""
    from .teacher import load_teacher

    cfg = meta.get("config") or {}
    teacher_name = (
        args.teacher_model or cfg.get("teacher_model") or (meta.get("training_config") or {}).get("teacher_model")
    )
    if not teacher_name:
        raise UserError("metadata names no teacher; pass --teacher-model")
    log.info("loading teacher %s", teacher_name)
    teacher = load_teacher(teacher_name, device=device)
    if teacher.vocab_size != vocab_size:
        raise UserError(
            f"teacher {teacher_name} has {teacher.vocab_size} logits but the student was trained for "
            f"{vocab_size}; pass the run's own teacher with --teacher-model"
        )
    return teacher


def _evaluation_data(args: argparse.Namespace, cfg: dict[str, Any], tok: Any, vocab_size: int):
    """(split, dataset name, fixed batches, unigram log-probabilities or None): the run's held-out texts
    on its own dataset (its first training blocks when nothing was held out), any other dataset whole."""
    from .data import DataError, fixed_batches, load_texts, split_held_out, tokenize_texts
    from .evaluate import unigram_baseline

    max_length = args.max_length or int(cfg.get("max_length") or 64)
    pack = bool(cfg.get("pack", False))
    seed = int(cfg.get("seed", 0))
    fraction = float(cfg.get("held_out_fraction", 0.05) or 0.0)
    train_src = (cfg.get("dataset") or "synthetic", cfg.get("dataset_path"))
    eval_src = (args.dataset, args.dataset_path) if (args.dataset or args.dataset_path) else train_src

    def blocks_of(texts: list[str]) -> list[list[int]]:
        return tokenize_texts(texts, tok, max_length, pack=pack)

    train_texts: list[str] | None
    try:
        train_texts, held_texts = split_held_out(load_texts(*train_src), fraction, seed)
    except DataError as e:
        if _same_source(eval_src, train_src):
            raise
        log.warning("warning: training data unavailable (%s); unigram baseline skipped", str(e).splitlines()[0])
        train_texts, held_texts = None, []
    if _same_source(eval_src, train_src):
        if held_texts:
            split, eval_blocks = "held_out", blocks_of(held_texts)
        else:
            split, eval_blocks = "train", blocks_of(train_texts or [])
    else:
        split, eval_blocks = "dataset", blocks_of(load_texts(*eval_src))
    batches = fixed_batches(eval_blocks, args.batch_size, tok.pad_token_id, args.eval_batches or None)
    if not batches:
        raise UserError(
            "no evaluation text of at least 2 tokens; pass a longer --dataset-path or a larger --max-length"
        )
    unigram = unigram_baseline(blocks_of(train_texts), vocab_size) if train_texts else None
    return split, eval_src[1] or eval_src[0], batches, unigram


def _evaluate(args: argparse.Namespace) -> None:
    import torch

    from .artifacts import METADATA_FILE, STUDENT_FILE, load_student, update_metadata
    from .distill import configure_threads, pick_device
    from .evaluate import evaluate_efficiency, evaluate_fidelity, format_report

    art = _check_args(args)
    configure_threads()
    device = pick_device(args.device)
    student, meta = load_student(art / STUDENT_FILE, art / METADATA_FILE, map_location=device)
    teacher = _load_run_teacher(args, meta, student.config.vocab_size, device)
    cfg: dict[str, Any] = dict(meta.get("config") or {})
    split, name, batches, unigram = _evaluation_data(args, cfg, teacher.tokenizer, teacher.vocab_size)
    with torch.inference_mode():
        ev = evaluate_fidelity(student, teacher, batches, device=device, unigram_logprobs=unigram)
    if not ev:
        raise UserError("the evaluation text has no next-token pairs; pass longer texts")
    evaluation = {"split": split, "dataset": name, **ev}
    if isinstance((meta.get("evaluation") or {}).get("responses"), dict):  # measured in training, kept
        evaluation["responses"] = meta["evaluation"]["responses"]
    efficiency = evaluate_efficiency(student, batches, device=device, split=split)
    if not args.no_update:
        update_metadata(art / METADATA_FILE, evaluation=evaluation, efficiency=efficiency)
    if args.json:
        print(json.dumps({"evaluation": evaluation, "efficiency": efficiency}, indent=2))
    else:
        print(format_report(evaluation, efficiency))
        if not args.no_update:
            print(f"written to {art / METADATA_FILE} (evaluation, efficiency)")


def main(argv: list[str] | None = None, prog: str = "evaluate_snn_student.py") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.quiet)
    return run_guarded(_evaluate, args)
