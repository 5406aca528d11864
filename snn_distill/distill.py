"""The distillation loop: frozen teacher -> spiking student, with accumulation, schedules and logging."""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifacts import build_metadata, has_artifacts, save_artifacts
from .checkpoint import (
    StopSignals,
    capture_rng_state,
    check_fingerprint,
    checkpoint_path,
    load_checkpoint,
    restore_rng_state,
    run_fingerprint,
    save_checkpoint,
)
from .config import StudentConfig, TrainConfig
from .data import BlockBatcher, check_token_ids, fixed_batches, load_texts, split_held_out, tokenize_texts
from .distributed import (
    DistContext,
    TrainForward,
    all_reduce_sum,
    any_rank,
    gather_objects,
    init_distributed,
    local_device,
    no_sync,
    quiet_other_ranks,
    shutdown,
    wrap_for_training,
)
from .failures import is_out_of_memory, out_of_memory_message
from .losses import TeacherTargets, chunked_distill_loss
from .student import SpikingStudentLM
from .teacher import Teacher, load_teacher

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


def teacher_dtype(teacher: Teacher) -> torch.dtype | None:
    """dtype of the teacher's first floating-point parameter (quantized weights are integer); None while
    its weights are not loaded (a run served by the teacher logit cache)."""
    if teacher.model is None:
        return None
    return next((p.dtype for p in teacher.model.parameters() if p.is_floating_point()), None)


def teacher_device(teacher: Teacher) -> torch.device | None:
    if teacher.model is None:
        return None
    return next((p.device for p in teacher.model.parameters()), None)


def pick_teacher_device(name: str) -> torch.device:
    """--teacher-device: cpu, cuda or cuda:N (checked against the visible GPUs)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"--teacher-device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise TrainingError(
                f"--teacher-device {name} was asked for but {count} CUDA GPU(s) are visible; "
                "use --teacher-device cpu or another GPU index"
            )
    elif dev.type != "cpu":
        raise TrainingError(f"--teacher-device {name!r} is not supported; use cpu, cuda or cuda:N")
    return dev


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
    teacher: Teacher, input_ids: torch.Tensor, mask: torch.Tensor, temperature: float, chunk: int = 1024
) -> TeacherTargets:
    """Log-probabilities at the distillation temperature for the real tokens only: [N_real, V] fp32.

    Converted `chunk` rows at a time: besides the logits (teacher dtype) and the fp32 result, only a
    [chunk, V] block is alive (a 3B teacher's [N, V] fp32 copies are a GiB each)."""
    logits = teacher.logits(input_ids, mask)
    flat = logits.reshape(-1, logits.shape[-1])
    keep = mask.reshape(-1).bool().to(logits.device)
    rows = keep.nonzero().squeeze(1)
    dense = rows.numel() == flat.shape[0]  # packed text: every row is real, slice instead of gathering
    out = torch.empty((rows.numel(), flat.shape[-1]), dtype=torch.float32, device=logits.device)
    for i in range(0, rows.numel(), chunk):
        dst = out[i : i + chunk]
        src = flat[i : i + chunk] if dense else flat[rows[i : i + chunk]]
        if temperature != 1.0:  # scaled in fp32 into the result, then log-softmax in place
            src = torch.div(src, temperature, out=dst) if src.dtype == dst.dtype else dst.copy_(src).div_(temperature)
        # one pass over [chunk, V] (bf16/fp16 logits upcast inside): no fp32 or scaled copies
        torch.log_softmax(src, dim=-1, dtype=torch.float32, out=dst)
    return TeacherTargets(out)


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
    micro_batches: list[tuple[torch.Tensor, torch.Tensor, TeacherTargets | Callable[[], TeacherTargets]]],
    cfg: TrainConfig,
    device: torch.device,
    model: torch.nn.Module | None = None,
    dist: DistContext | None = None,
) -> StepStats:
    """Forward/backward over k micro-batches; the loss is normalised by the real tokens of all k, so
    accumulating k micro-batches equals one batch k times larger. Does not step the optimizer.

    A micro-batch's targets may be a callable, called when its turn comes (only one [N, V] target is
    alive at a time). `model` is `distributed.wrap_for_training(student)` (DDP over several ranks);
    with several ranks the loss is normalised by the real tokens of all ranks, so the all-reduced
    gradient equals one process's on the combined batch, and the returned stats are global."""
    dist = dist or DistContext()
    model = model if model is not None else TrainForward(student)
    counts = [
        sum(int(m.sum()) for _, m, _ in micro_batches),
        sum(int((next_token_labels(ids, m) >= 0).sum()) for ids, m, _ in micro_batches),
    ]
    total_tokens, ce_total = (int(round(c)) for c in all_reduce_sum(counts, dist))
    tw = 1.0 / max(total_tokens, 1)
    cw = 1.0 / max(ce_total, 1)
    stats = StepStats(tokens=total_tokens)
    rates: dict[str, float] = {}
    # bf16 autocast for the student on CUDA; the chunked loss itself runs in fp32.
    amp = device.type == "cuda"
    sums: list[torch.Tensor] = []  # (loss, kd, ce) per micro-batch, read back once per step
    rate_sums: dict[str, torch.Tensor] = {}
    for i, (ids, mask, targets) in enumerate(micro_batches):
        n = int(mask.sum())  # counted before the copy to the device: no device sync
        ids, mask = ids.to(device), mask.to(device)
        rows = mask.reshape(-1).bool()
        last = i == len(micro_batches) - 1
        with no_sync(model, skip=dist.enabled and not last):
            tgt = (targets() if callable(targets) else targets).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                hidden, head_weight = model(ids)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if n != hidden.shape[0]:  # padding: keep the real tokens (packed text needs no gather)
                hidden = hidden[rows]
            labels = next_token_labels(ids, mask).reshape(-1)[rows] if cfg.hard_label_weight > 0 else None
            loss, kd, ce = chunked_distill_loss(
                hidden,
                head_weight,
                tgt,
                torch.full((n,), tw, device=device),
                kind=cfg.kd_loss,
                temperature=cfg.temperature,
                labels=labels,
                ce_w=None if labels is None else torch.full((n,), cw, device=device),
                hard_weight=cfg.hard_label_weight,
                chunk=cfg.loss_chunk_tokens,
            )
            del tgt
            # DDP averages gradients over ranks; the loss is already a share of the global mean.
            (loss * dist.world_size if dist.enabled else loss).backward()
        sums.append(torch.stack([loss.detach(), kd.detach(), ce.detach()]).double())
        w = n / max(total_tokens, 1)
        for m in student.lif_modules():
            if m.last_spike_rate is not None:
                rate_sums[m.stat_name] = rate_sums.get(m.stat_name, 0.0) + w * m.last_spike_rate.float()
    # one host read per step, not one per micro-batch and layer (each is a sync on a GPU)
    keys = list(rate_sums)
    rate_vals = [rate_sums[k].reshape(1).double().cpu() for k in keys]
    values = torch.cat([torch.stack(sums).sum(0).cpu(), *rate_vals]).tolist()
    stats.loss, stats.kd, stats.ce = values[:3]
    rates = dict(zip(keys, values[3:]))
    if dist.enabled:
        keys = list(rates)
        summed = all_reduce_sum([stats.loss, stats.kd, stats.ce, *(rates[k] for k in keys)], dist)
        stats.loss, stats.kd, stats.ce = summed[:3]
        rates = dict(zip(keys, summed[3:]))
    if rates:
        stats.layer_rates = rates
        stats.spike_rate = sum(rates.values()) / len(rates)
    return stats


class CsvLog:
    """training_log.csv, one row per logged step (appended and flushed as training runs)."""

    FIELDS = ["step", "loss", "kd_loss", "ce_loss", "lr", "tokens_per_s", "spike_rate", "grad_norm"]

    def __init__(self, path: Path, layer_names: list[str], resume_step: int | None = None) -> None:
        """resume_step: continue the log of a resumed run, dropping rows logged after that step."""
        self.path = path
        self.layer_names = layer_names
        header = self.FIELDS + [f"rate:{n}" for n in layer_names]
        kept: list[list[str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                old = list(csv.reader(f))
            if old and old[0] == header:
                kept = [r for r in old[1:] if r and r[0].isdigit() and int(r[0]) <= resume_step]
        self.f = open(path, "w", newline="")  # noqa: SIM115 - kept open for the run
        self.w = csv.writer(self.f)
        self.w.writerow(header)
        self.w.writerows(kept)
        self.f.flush()

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


class _NoLog:
    """Stands in for CsvLog on data-parallel ranks other than 0 (rank 0 alone writes files)."""

    def row(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM: the step finished, a checkpoint was written; the message says how to resume."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class DistillRun:
    """What `train()` returns: the trained student and what it wrote (rank 0; other data-parallel
    ranks return empty metadata and paths)."""

    student: SpikingStudentLM
    metadata: dict[str, Any]
    paths: dict[str, Path]
    history: list[dict[str, float]]
    rank: int = 0


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
    from .evaluate import evaluate_efficiency, evaluate_fidelity, format_report, unigram_baseline

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output-dir {out} is a file; pass a folder path")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    # torchrun: join the process group (NCCL on CUDA, Gloo on CPU); one GPU per process.
    dctx = init_distributed(device)
    device = local_device(device, dctx)
    quiet_other_ranks(dctx)
    ckpt = load_checkpoint(out) if cfg.resume else None  # fail fast, before loading the teacher
    if not cfg.resume and dctx.is_main and has_artifacts(out):
        log.info(
            "%s holds the artifacts of an earlier run: they stay as they are until this run has finished, then "
            "are replaced as one complete set (to continue that run instead use --resume; to keep them, another "
            "--output-dir)",
            out,
        )
    if teacher is None:
        log.info("loading teacher %s", cfg.teacher_model)
        tdev = local_device(pick_teacher_device(cfg.teacher_device), dctx) if cfg.teacher_device else device
        teacher = load_teacher(
            cfg.teacher_model,
            device=tdev,
            dtype=cfg.teacher_dtype,
            quantization=cfg.teacher_quantization,
            load_model=not cfg.teacher_cache,  # with the logit cache: weights only if a block is missing
        )
    tok = teacher.tokenizer

    texts = load_texts(cfg.dataset, cfg.dataset_path)
    train_texts, held_texts = split_held_out(texts, cfg.held_out_fraction, cfg.seed)
    train_blocks = tokenize_texts(train_texts, tok, cfg.max_length, pack=cfg.pack)
    held_blocks = tokenize_texts(held_texts, tok, cfg.max_length, pack=cfg.pack) if held_texts else []
    check_token_ids(train_blocks + held_blocks, teacher.vocab_size, cfg.teacher_model)
    batcher = BlockBatcher(
        train_blocks, cfg.batch_size, tok.pad_token_id, seed=cfg.seed, shard=(dctx.rank, dctx.world_size)
    )
    log.info(
        "data: %d training sequences (%d tokens), %d held out",
        len(train_blocks),
        batcher.num_tokens,
        len(held_blocks),
    )
    cached = None  # teacher logit cache: top-k targets of train + held-out blocks, filled on demand
    if cfg.teacher_cache:
        from .teacher_cache import open_for_training

        cached = open_for_training(cfg, teacher, train_blocks + held_blocks, device)

    scfg = build_student_config(cfg, teacher.vocab_size, student_args)
    student = SpikingStudentLM(scfg).to(device)
    student.train()
    optimizer = make_optimizer(student, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.warmup_steps, cfg.num_steps)
    fingerprint = run_fingerprint(cfg, scfg, dctx.world_size)
    start_step, resumed = 0, {}
    if ckpt is not None:
        check_fingerprint(ckpt["fingerprint"], fingerprint, checkpoint_path(out))
        start_step = int(ckpt["step"])
        if start_step > cfg.num_steps:
            raise TrainingError(
                f"the checkpoint in {out} is at step {start_step}, past --num-steps {cfg.num_steps}; "
                f"pass --num-steps {start_step} or more"
            )
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        batcher.load_state_dict(ckpt["data"][dctx.rank])
        resumed = dict(ckpt["progress"])
        log.info("resuming from step %d (%s)", start_step, checkpoint_path(out))
    model = wrap_for_training(student, dctx, device)  # DDP over several processes
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
    eval_split = "held_out"
    if not held_batches:  # no held-out text: measure on a few training batches, and say so in the metadata
        held_batches = fixed_batches(train_blocks, cfg.batch_size, tok.pad_token_id, cfg.eval_batches)
        eval_split = "train"
    unigram = unigram_baseline(train_blocks, teacher.vocab_size)

    def evaluate() -> dict[str, Any]:
        if not held_batches or not dctx.is_main:  # rank 0 alone evaluates
            return {}
        return evaluate_fidelity(
            student, cached or teacher, held_batches, device=device, unigram_logprobs=unigram
        )

    if dctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        csv_log = CsvLog(
            out / "training_log.csv",
            [m.stat_name for m in student.lif_modules()],
            resume_step=start_step if ckpt is not None else None,
        )
    else:
        csv_log = _NoLog()
    eval_before = resumed["eval_before"] if ckpt is not None else evaluate()
    eval_history: list[dict[str, Any]] = list(resumed.get("eval_history", []))
    tb = _tensorboard_writer(out, cfg) if dctx.is_main else None
    history: list[dict[str, float]] = list(resumed.get("history", []))
    losses: list[float] = list(resumed.get("losses", []))
    first_loss = resumed.get("first_loss")
    tokens_seen = int(resumed.get("tokens_seen", 0))
    prior_seconds = float(resumed.get("train_seconds", 0.0))
    t_start = time.perf_counter()
    t_last, tok_last = t_start, tokens_seen
    if ckpt is not None:
        restore_rng_state(ckpt["rng"][dctx.rank])  # last: setup above consumed random numbers
        del ckpt

    def write_checkpoint(step: int) -> Path:
        """Gather every rank's data position and RNG state; rank 0 writes checkpoint.pt atomically."""
        data_states = gather_objects(batcher.state_dict(), dctx)
        rng_states = gather_objects(capture_rng_state(), dctx)
        path = checkpoint_path(out)
        if dctx.is_main:
            save_checkpoint(
                out,
                step=step,
                student=student,
                optimizer=optimizer,
                scheduler=scheduler,
                data_states=data_states,
                rng_states=rng_states,
                fingerprint=fingerprint,
                progress={
                    "losses": losses,
                    "history": history,
                    "first_loss": first_loss,
                    "tokens_seen": tokens_seen,
                    "eval_before": eval_before,
                    "eval_history": eval_history,
                    "train_seconds": prior_seconds + time.perf_counter() - t_start,
                },
            )
        return path

    bar = _progress(cfg.num_steps, progress and dctx.is_main)
    bar.update(start_step)
    stop = StopSignals()
    try:
        stop.__enter__()
        for step in range(start_step + 1, cfg.num_steps + 1):
            micro = []
            for _ in range(cfg.grad_accum_steps):
                ids, mask = batcher.next_batch()
                # computed when distill_step reaches this micro-batch: one [N, V] target alive at a time
                if cached is not None:  # block ids of the rows: the cache's keys
                    make = functools.partial(cached, ids, mask, batcher.last_indices)
                else:
                    make = functools.partial(
                        teacher_targets, teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens
                    )
                micro.append((ids, mask, make))
            try:
                stats = distill_step(student, micro, cfg, device, model=model, dist=dctx)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                raise TrainingError(
                    out_of_memory_message(
                        e,
                        step=step,
                        batch_size=cfg.batch_size,
                        grad_accum_steps=cfg.grad_accum_steps,
                        max_length=cfg.max_length,
                    )
                ) from e
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
                if tb is not None:
                    _tensorboard_row(tb, step, stats, lr, tps)
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
                    eval_history.append({"step": step, **ev})
                    if tb is not None:
                        for k in ("student_perplexity", "kl_teacher_student", "top1_agreement"):
                            tb.add_scalar(f"eval/{k}", ev[k], step)
                    _log_line(
                        bar,
                        f"eval step {step}: KL {ev['kl_teacher_student']:.4f} "
                        f"agreement {ev['top1_agreement']:.3f} ppl {ev['student_perplexity']:.2f}",
                    )
            # A checkpoint every N steps and after the last (so a finished run can be extended), or
            # when SIGINT/SIGTERM reached any rank during this step: then stop with how to resume.
            stopping = any_rank(stop.requested, dctx)
            due = cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.num_steps)
            if stopping or due:
                ckpt_file = write_checkpoint(step)
            if stopping:
                shutdown(dctx)
                raise TrainingInterrupted(
                    f"interrupted by {stop.name or 'a signal to another process'} after step {step}/"
                    f"{cfg.num_steps}; checkpoint saved to {ckpt_file}; to continue to step {cfg.num_steps}, "
                    "run the same command again with --resume",
                    exit_code=143 if stop.name == "SIGTERM" else 130,
                )
    finally:
        stop.__exit__(None, None, None)
        bar.close()
        csv_log.close()
        if tb is not None:
            tb.close()
    elapsed = prior_seconds + time.perf_counter() - t_start  # a resumed run counts its earlier part
    if not dctx.is_main:  # rank 0 alone evaluates and writes the artifacts
        shutdown(dctx)
        return DistillRun(student=student, metadata={}, paths={}, history=history, rank=dctx.rank)
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
        "teacher_dtype": str(teacher_dtype(teacher)).replace("torch.", ""),
        "teacher_device": str(teacher_device(teacher)),
        "teacher_quantization": cfg.teacher_quantization,
        "teacher_cache": None if cached is None else cached.summary(),
        "world_size": dctx.world_size,
        "effective_batch_size": cfg.batch_size * cfg.grad_accum_steps * dctx.world_size,
        "resumed_from_step": start_step or None,
    }
    cli = dict(cli_config or cfg.to_dict())
    cli.setdefault("tokenizer_name", cfg.teacher_model)
    extra: dict[str, Any] = {}
    if eval_after:
        extra["evaluation"] = {"split": eval_split, "before_training": eval_before, **eval_after}
        if eval_history:
            extra["evaluation"]["during_training"] = eval_history
    extra["efficiency"] = evaluate_efficiency(student, held_batches, device=device, split=eval_split)
    log.info("%s", format_report(extra.get("evaluation"), extra["efficiency"]))
    meta = build_metadata(scfg, n_params, training_config, cli, results, cfg.git_tracking, extra)

    def write_curves(png: Path) -> None:  # drawn into the staged set, so the figure always fits its weights
        try:
            from .plots import write_training_curves

            write_training_curves(out / "training_log.csv", png)
        except Exception as e:  # noqa: BLE001 - a figure is never worth failing a finished run
            png.unlink(missing_ok=True)
            log.warning("warning: could not write training_curves.png: %s", str(e).splitlines()[0] if str(e) else e)

    # One complete set replaces an earlier run's (its exports and figures included); see save_artifacts.
    paths = save_artifacts(
        out, student.state_dict(), meta, tokenizer=tok, extra_writers={"training_curves.png": write_curves}
    )
    paths["training_log"] = out / "training_log.csv"
    if not cfg.resume and not cfg.checkpoint_every and checkpoint_path(out).exists():
        checkpoint_path(out).unlink(missing_ok=True)  # an earlier run's: --resume would continue that run
        log.info("removed the checkpoint.pt of an earlier run from %s", out)
    log.info(
        "done: %d steps in %.1fs, loss %.4f -> %.4f; artifacts in %s",
        cfg.num_steps,
        elapsed,
        results["first_loss"],
        results["final_loss"],
        out,
    )
    shutdown(dctx)
    return DistillRun(student=student, metadata=meta, paths=paths, history=history)


def _tensorboard_writer(out: Path, cfg: TrainConfig):
    """A TensorBoard SummaryWriter into OUT/tensorboard when tensorboard is installed (and
    `cfg.extra["tensorboard"]` is not False), else None."""
    if cfg.extra.get("tensorboard", True) is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(log_dir=str(out / "tensorboard"))
    except Exception as e:  # noqa: BLE001 - logging is optional
        log.warning("warning: TensorBoard logging disabled: %s", e)
        return None


def _tensorboard_row(tb, step: int, s: StepStats, lr: float, tps: float) -> None:
    tb.add_scalar("train/loss", s.loss, step)
    tb.add_scalar("train/kd_loss", s.kd, step)
    tb.add_scalar("train/lr", lr, step)
    tb.add_scalar("train/tokens_per_s", tps, step)
    if s.spike_rate is not None:
        tb.add_scalar("spikes/mean", s.spike_rate, step)
        for name, rate in s.layer_rates.items():
            tb.add_scalar(f"spikes/{name}", rate, step)


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
    """Use every core this process may run on for intra-op work (inter-op parallelism only adds
    contention on small CPUs), and keep freed large blocks mapped (`keep_freed_memory`)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """glibc malloc: serve large blocks from the heap (no mmap) and do not trim it below 1 GiB.

    A step allocates and frees several [N, V] tensors (teacher logits, log-probs, loss buffers: 100 MB
    each for 512 tokens of a 49k vocabulary). By default each is a fresh mmap whose pages fault in zeroed,
    which on CPU costs more than the arithmetic on them (softmax over [512, 49152] fp32: 3-4x faster
    with this; bench/results/speed.md). The process keeps its peak heap instead. Linux/glibc only;
    returns whether it applied."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
