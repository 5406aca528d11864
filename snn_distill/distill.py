"""The distillation loop: frozen teacher -> spiking student, with accumulation, schedules and logging."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifacts import build_metadata, save_artifacts
from .config import StudentConfig, TrainConfig
from .data import BlockBatcher, fixed_batches, load_texts, split_held_out, tokenize_texts
from .losses import TeacherTargets, chunked_distill_loss
from .student import SpikingStudentLM
from .teacher import Teacher, load_teacher

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int):
    """transformers' own schedule functions (constant / cosine / linear, each with warmup)."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    raise ValueError(f"unknown scheduler {name!r}")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def next_token_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] next-token ids, -1 where there is no next real token."""
    labels = torch.full_like(input_ids, -1)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -1))
    return labels


def teacher_targets(
    teacher: Teacher, input_ids: torch.Tensor, mask: torch.Tensor, temperature: float
) -> TeacherTargets:
    """Log-probabilities at the distillation temperature for the real tokens only: [N_real, V] fp32."""
    logits = teacher.logits(input_ids, mask)
    rows = mask.reshape(-1).bool().to(logits.device)
    sel = logits.reshape(-1, logits.shape[-1])[rows].float()
    return TeacherTargets(torch.log_softmax(sel / temperature, dim=-1))


@dataclass
class StepStats:
    loss: float = 0.0
    kd: float = 0.0
    ce: float = 0.0
    tokens: int = 0
    grad_norm: float = 0.0
    spike_rate: float | None = None
    layer_rates: dict[str, float] = field(default_factory=dict)


def distill_step(
    student: SpikingStudentLM,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor, TeacherTargets]],
    cfg: TrainConfig,
    device: torch.device,
) -> StepStats:
    """Forward/backward over k micro-batches; the loss is normalised by the real tokens of all k, so
    accumulating k micro-batches equals one batch k times larger. Does not step the optimizer."""
    total_tokens = sum(int(m.sum()) for _, m, _ in micro_batches)
    tw = 1.0 / max(total_tokens, 1)
    ce_total = sum(int((next_token_labels(ids, m) >= 0).sum()) for ids, m, _ in micro_batches)
    cw = 1.0 / max(ce_total, 1)
    stats = StepStats(tokens=total_tokens)
    rates: dict[str, float] = {}
    for ids, mask, targets in micro_batches:
        ids, mask = ids.to(device), mask.to(device)
        rows = mask.reshape(-1).bool()
        n = int(rows.sum())
        hidden = student.forward_hidden(ids)
        hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        labels = next_token_labels(ids, mask).reshape(-1)[rows] if cfg.hard_label_weight > 0 else None
        loss, kd, ce = chunked_distill_loss(
            hidden,
            student.lm_head_weight,
            targets.to(device),
            torch.full((n,), tw, device=device),
            kind=cfg.kd_loss,
            temperature=cfg.temperature,
            labels=labels,
            ce_w=None if labels is None else torch.full((n,), cw, device=device),
            hard_weight=cfg.hard_label_weight,
            chunk=cfg.loss_chunk_tokens,
        )
        loss.backward()
        stats.loss += float(loss.detach())
        stats.kd += float(kd)
        stats.ce += float(ce)
        w = n / max(total_tokens, 1)
        for k, v in student.spike_rates().items():
            rates[k] = rates.get(k, 0.0) + w * v
    if rates:
        stats.layer_rates = rates
        stats.spike_rate = sum(rates.values()) / len(rates)
    return stats


class CsvLog:
    """training_log.csv, one row per logged step (appended and flushed as training runs)."""

    FIELDS = ["step", "loss", "kd_loss", "ce_loss", "lr", "tokens_per_s", "spike_rate", "grad_norm"]

    def __init__(self, path: Path, layer_names: list[str]) -> None:
        self.path = path
        self.layer_names = layer_names
        self.f = open(path, "w", newline="")  # noqa: SIM115 - kept open for the run
        self.w = csv.writer(self.f)
        self.w.writerow(self.FIELDS + [f"rate:{n}" for n in layer_names])

    def row(self, step: int, s: StepStats, lr: float, tps: float) -> None:
        rate = "" if s.spike_rate is None else f"{s.spike_rate:.5f}"
        layer = [f"{s.layer_rates.get(n, float('nan')):.5f}" for n in self.layer_names]
        self.w.writerow(
            [
                step,
                f"{s.loss:.6f}",
                f"{s.kd:.6f}",
                f"{s.ce:.6f}",
                f"{lr:.6g}",
                f"{tps:.1f}",
                rate,
                f"{s.grad_norm:.4f}",
                *layer,
            ]
        )
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@dataclass
class DistillRun:
    """What `train()` returns: the trained student and what it wrote."""

    student: SpikingStudentLM
    metadata: dict[str, Any]
    paths: dict[str, Path]
    history: list[dict[str, float]]


def build_student_config(cfg: TrainConfig, vocab_size: int, student_args: dict[str, Any]) -> StudentConfig:
    return StudentConfig(vocab_size=vocab_size, **student_args)


def train(
    cfg: TrainConfig,
    student_args: dict[str, Any],
    cli_config: dict[str, Any] | None = None,
    teacher: Teacher | None = None,
    progress: bool = True,
) -> DistillRun:
    """Run distillation end to end and write the artifacts into `cfg.output_dir`."""
    from .evaluate import evaluate_fidelity, unigram_baseline

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output-dir {out} is a file; pass a folder path")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if teacher is None:
        log.info("loading teacher %s", cfg.teacher_model)
        teacher = load_teacher(
            cfg.teacher_model, device=cfg.teacher_device or device, dtype=cfg.teacher_dtype
        )
    tok = teacher.tokenizer

    texts = load_texts(cfg.dataset, cfg.dataset_path)
    train_texts, held_texts = split_held_out(texts, cfg.held_out_fraction, cfg.seed)
    train_blocks = tokenize_texts(train_texts, tok, cfg.max_length, pack=cfg.pack)
    held_blocks = tokenize_texts(held_texts, tok, cfg.max_length, pack=cfg.pack) if held_texts else []
    batcher = BlockBatcher(train_blocks, cfg.batch_size, tok.pad_token_id, seed=cfg.seed)
    log.info(
        "data: %d training sequences (%d tokens), %d held out",
        len(train_blocks),
        batcher.num_tokens,
        len(held_blocks),
    )

    scfg = build_student_config(cfg, teacher.vocab_size, student_args)
    student = SpikingStudentLM(scfg).to(device)
    student.train()
    optimizer = make_optimizer(student, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.warmup_steps, cfg.num_steps)
    n_params = student.num_parameters()
    log.info(
        "student: %s, %.2fM parameters, T=%d, teacher %s (%.1fM parameters, vocab %d)",
        scfg.student_type,
        n_params / 1e6,
        student.timesteps,
        teacher.name,
        teacher.num_parameters / 1e6,
        teacher.vocab_size,
    )

    held_batches = fixed_batches(held_blocks, cfg.batch_size, tok.pad_token_id, cfg.eval_batches)
    unigram = unigram_baseline(train_blocks, teacher.vocab_size)

    def evaluate() -> dict[str, Any]:
        if not held_batches:
            return {}
        return evaluate_fidelity(student, teacher, held_batches, device=device, unigram_logprobs=unigram)

    out.mkdir(parents=True, exist_ok=True)
    csv_log = CsvLog(out / "training_log.csv", [m.stat_name for m in student.lif_modules()])
    eval_before = evaluate()
    history: list[dict[str, float]] = []
    losses: list[float] = []
    first_loss = None
    tokens_seen = 0
    t_start = time.perf_counter()
    t_last, tok_last = t_start, 0
    bar = _progress(cfg.num_steps, progress)
    try:
        for step in range(1, cfg.num_steps + 1):
            micro = []
            for _ in range(cfg.grad_accum_steps):
                ids, mask = batcher.next_batch()
                micro.append((ids, mask, teacher_targets(teacher, ids, mask, cfg.temperature)))
            stats = distill_step(student, micro, cfg, device)
            if not math.isfinite(stats.loss):
                raise TrainingError(
                    f"loss became {stats.loss} at step {step}; lower --lr (now {cfg.lr:g}) or raise --warmup-steps; "
                    "nothing was saved from this run"
                )
            stats.grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            tokens_seen += stats.tokens
            losses.append(stats.loss)
            first_loss = stats.loss if first_loss is None else first_loss
            bar.update(1)
            if cfg.log_interval and (step % cfg.log_interval == 0 or step == cfg.num_steps):
                now = time.perf_counter()
                tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens_seen
                recent = losses[-cfg.log_interval :]
                msg = f"step {step}/{cfg.num_steps} loss {sum(recent) / len(recent):.4f}"
                if cfg.scheduler != "constant" or cfg.warmup_steps:
                    msg += f" lr {lr:.3g}"
                msg += f" tok/s {tps:.0f}"
                if stats.spike_rate is not None:
                    msg += f" spike-rate {stats.spike_rate:.3f}"
                _log_line(bar, msg)
                csv_log.row(step, stats, lr, tps)
                history.append(
                    {
                        "step": step,
                        "loss": stats.loss,
                        "lr": lr,
                        "tokens_per_s": tps,
                        "spike_rate": stats.spike_rate if stats.spike_rate is not None else float("nan"),
                    }
                )
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.num_steps:
                ev = evaluate()
                if ev:
                    _log_line(
                        bar,
                        f"eval step {step}: KL {ev['kl_teacher_student']:.4f} "
                        f"agreement {ev['top1_agreement']:.3f} ppl {ev['student_perplexity']:.2f}",
                    )
    finally:
        bar.close()
        csv_log.close()
    elapsed = time.perf_counter() - t_start
    eval_after = evaluate()
    tail = losses[-max(1, min(len(losses), cfg.log_interval or 10)) :]
    results = {
        "steps": cfg.num_steps,
        "avg_loss": sum(losses) / len(losses),
        "first_loss": first_loss,
        "final_loss": sum(tail) / len(tail),
        "tokens_seen": tokens_seen,
        "train_seconds": round(elapsed, 2),
        "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1),
    }
    training_config = {
        "num_steps": cfg.num_steps,
        "steps": cfg.num_steps,
        "batch_size": cfg.batch_size,
        "grad_accum_steps": cfg.grad_accum_steps,
        "teacher_model": cfg.teacher_model,
        "lr": cfg.lr,
        "scheduler": cfg.scheduler,
        "warmup_steps": cfg.warmup_steps,
        "temperature": cfg.temperature,
        "dataset": cfg.dataset_path or cfg.dataset,
        "max_length": cfg.max_length,
        "kd_loss": cfg.kd_loss,
        "hard_label_weight": cfg.hard_label_weight,
        "seed": cfg.seed,
        "device": str(device),
        "teacher_params": teacher.num_parameters,
    }
    cli = dict(cli_config or cfg.to_dict())
    cli.setdefault("tokenizer_name", cfg.teacher_model)
    extra: dict[str, Any] = {}
    if eval_after:
        extra["evaluation"] = {"before_training": eval_before, **eval_after}
    meta = build_metadata(scfg, n_params, training_config, cli, results, cfg.git_tracking, extra)
    paths = save_artifacts(out, student.state_dict(), meta, tokenizer=tok)
    paths["training_log"] = out / "training_log.csv"
    log.info(
        "done: %d steps in %.1fs, loss %.4f -> %.4f; artifacts in %s",
        cfg.num_steps,
        elapsed,
        results["first_loss"],
        results["final_loss"],
        out,
    )
    return DistillRun(student=student, metadata=meta, paths=paths, history=history)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="distill",
        unit="step",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )


def _log_line(bar, msg: str) -> None:
    if getattr(bar, "disable", True):
        log.info(msg)
    else:
        bar.write(msg, file=sys.stderr)


def configure_threads() -> None:
    """Use every core for intra-op work; inter-op parallelism only adds contention on small CPUs."""
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
