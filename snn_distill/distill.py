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
from .cli_common import progress_bar
from .config import StudentConfig, TrainConfig
from .data import (
    BlockBatcher,
    check_token_ids,
    fixed_batches,
    load_texts,
    pad_batch,
    response_loss_mask,
    split_held_out,
    tokenize_texts,
)
from .distributed import (
    DistContext,
    TrainForward,
    all_reduce_sum,
    any_rank,
    gather_objects,
    init_distributed,
    local_device,
    no_sync,
    on_main_then_barrier,
    quiet_other_ranks,
    shutdown,
    wrap_for_training,
)
from .energy import training_energy_ratios
from .failures import is_out_of_memory, out_of_memory_message
from .fused_loss import resolve_fused_loss
from .losses import TeacherTargets, chunked_distill_loss, token_weights
from .neurons import FLOOR_STEP
from .precision import (
    autocast_dtype,
    configure_matmul_precision,
    grad_scaler,
    non_finite_loss_message,
    precision_metadata,
)
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
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
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
    """AdamW; weight decay only on matrices (not norms).

    Fused (one kernel per parameter) where torch has that kernel: CPU and CUDA floating-point
    parameters. On CPU torch's default is otherwise the per-tensor loop, about ten passes over
    each parameter per step: 12x slower on a 49k x 128 embedding, a tenth of a small student's step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def next_token_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] next-token ids, -1 where there is no next real token."""
    labels = torch.full_like(input_ids, -1)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -1))
    return labels


def teacher_targets(
    teacher: Teacher,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    chunk: int = 1024,
    raw: bool = False,
) -> TeacherTargets:
    """Log-probabilities at the distillation temperature for the real tokens only: [N_real, V] fp32.
    `raw`: the teacher's logits of those tokens as they are (teacher dtype, no copy for packed text);
    the loss takes their log-softmax chunk by chunk (`TeacherTargets.raw`).

    Converted `chunk` rows at a time: besides the logits (teacher dtype) and the fp32 result, only a
    [chunk, V] block is alive (a 3B teacher's [N, V] fp32 copies are a GiB each)."""
    logits = teacher.logits(input_ids, mask)
    flat = logits.reshape(-1, logits.shape[-1])
    keep = mask.reshape(-1).bool().to(logits.device)
    rows = keep.nonzero().squeeze(1)
    dense = rows.numel() == flat.shape[0]  # packed text: every row is real, slice instead of gathering
    if raw:
        return TeacherTargets(flat if dense else flat[rows], raw=True)
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
    energy: float | None = None  # with an energy budget: estimated energy ratio to the ANN twin, whole model
    energy_body: float | None = None  # ... and body


def distill_step(
    student: SpikingStudentLM,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor, TeacherTargets | Callable[[], TeacherTargets]]],
    cfg: TrainConfig,
    device: torch.device,
    model: torch.nn.Module | None = None,
    dist: DistContext | None = None,
    loss_masks: list[torch.Tensor | None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: float = 1.0,
) -> StepStats:
    """Forward/backward over k micro-batches; the loss is normalised by the real tokens of all k, so
    accumulating k micro-batches equals one batch k times larger. Does not step the optimizer.

    A micro-batch's targets may be a callable, called when its turn comes (only one [N, V] target is
    alive at a time). `model` is `distributed.wrap_for_training(student)` (DDP over several ranks);
    with several ranks the loss is normalised by the real tokens of all ranks, so the all-reduced
    gradient equals one process's on the combined batch, and the returned stats are global.

    `loss_masks[i]` ([B, S] bool, or None: every real token) keeps only those positions of micro-batch i
    in the loss (the reply positions, `data.response_loss_mask`); the loss is then the mean over the
    kept positions of all micro-batches. `scaler` (fp16 autocast) scales the loss before the backward.
    `progress` (share of the steps done before this one) sets an energy budget's ramp."""
    dist = dist or DistContext()
    model = model if model is not None else TrainForward(student)
    keeps = list(loss_masks) if loss_masks is not None else [None] * len(micro_batches)
    counts = [
        sum(int(m.sum()) for _, m, _ in micro_batches),
        sum(int((_kept_labels(ids, m, k) >= 0).sum()) for (ids, m, _), k in zip(micro_batches, keeps)),
        sum(int(m.sum()) if k is None else int(k.sum()) for (_, m, _), k in zip(micro_batches, keeps)),
    ]
    total_tokens, ce_total, kd_total = (int(round(c)) for c in all_reduce_sum(counts, dist))
    tw = 1.0 / max(kd_total, 1)
    cw = 1.0 / max(ce_total, 1)
    stats = StepStats(tokens=total_tokens)
    rates: dict[str, float] = {}
    # bf16 (fp16 without native bf16) autocast for the student on CUDA; the chunked loss runs in fp32.
    amp_dtype = autocast_dtype(device)
    pinned = device.type == "cuda"  # host batches go through page-locked memory, copied without a sync
    # (loss, kd, ce, token-weighted whole and body energy ratios) per micro-batch, read back once per step
    sums: list[torch.Tensor] = []
    rate_sums: dict[str, torch.Tensor] = {}
    for i, (ids, mask, targets) in enumerate(micro_batches):
        n = int(mask.sum())  # counted before the copy to the device: no device sync
        context = mean_context(mask) if cfg.energy_budgeted else 0.0
        if pinned:
            ids, mask = ids.pin_memory(), mask.pin_memory()
        ids, mask = ids.to(device, non_blocking=pinned), mask.to(device, non_blocking=pinned)
        rows = mask.reshape(-1).bool()
        last = i == len(micro_batches) - 1
        with no_sync(model, skip=dist.enabled and not last):
            tgt = (targets() if callable(targets) else targets).to(device, non_blocking=pinned)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                hidden, head_weight = model(ids)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if n != hidden.shape[0]:  # padding: keep the real tokens (packed text needs no gather)
                hidden = hidden[rows]
            keep = None if keeps[i] is None else keeps[i].to(device).reshape(-1)[rows]
            labels = _kept_labels(ids, mask, keeps[i]).reshape(-1)[rows] if cfg.hard_label_weight > 0 else None
            loss, kd, ce = chunked_distill_loss(
                hidden,
                head_weight,
                tgt,
                token_weights(n, tw, keep, device),
                kind=cfg.kd_loss,
                temperature=cfg.temperature,
                labels=labels,
                ce_w=None if labels is None else torch.full((n,), cw, device=device),
                hard_weight=cfg.hard_label_weight,
                chunk=cfg.loss_chunk_tokens,
                fused=cfg.fused_loss,
            )
            del tgt
            ratios = loss.new_zeros(2)
            if cfg.energy_budgeted:
                penalty, ratios = energy_penalty(student, context, cfg, progress)
                loss = loss + penalty * (n / max(total_tokens, 1))
            # DDP averages gradients over ranks; the loss is already a share of the global mean.
            scaled = loss * dist.world_size if dist.enabled else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        w = n / max(total_tokens, 1)
        sums.append(torch.cat([torch.stack([loss.detach(), kd.detach(), ce.detach()]), ratios * w]).double())
        for m in student.lif_modules():
            if m.last_spike_rate is not None:
                rate_sums[m.stat_name] = rate_sums.get(m.stat_name, 0.0) + w * m.last_spike_rate.float()
    # one host read per step, not one per micro-batch and layer (each is a sync on a GPU)
    keys = list(rate_sums)
    rate_vals = [rate_sums[k].reshape(1).double().cpu() for k in keys]
    values = all_reduce_sum(torch.cat([torch.stack(sums).sum(0).cpu(), *rate_vals]).tolist(), dist)
    stats.loss, stats.kd, stats.ce = values[:3]
    if cfg.energy_budgeted:
        stats.energy, stats.energy_body = values[3:5]
    rates = dict(zip(keys, values[5:]))
    if rates:
        stats.layer_rates = rates
        stats.spike_rate = sum(rates.values()) / len(rates)
    return stats


def mean_context(mask: torch.Tensor) -> float:
    """Mean over the real tokens of (position + 1), the attended positions (mask [B, S], right padded)."""
    lens = mask.sum(1, dtype=torch.float64)
    return float((lens * (lens + 1) / 2).sum() / lens.sum().clamp_min(1))


# A budget is a ceiling, and the hinge holds the training estimate at its aim, around which the held-out
# figure scatters by a few tenths of a percent: the penalty aims this share under the budget.
BUDGET_MARGIN = 0.01


def energy_budget_at(budget: float, progress: float, ramp: float) -> float:
    """The penalty's aim at `progress` (share of the steps done, 0..1): it tightens linearly from 1
    (the ANN twin's energy) to `budget` less BUDGET_MARGIN over the first `ramp` of the steps
    (TrainConfig.energy_ramp); a budget above 1 holds from the start (no ramp would be tighter)."""
    aim = budget * (1.0 - BUDGET_MARGIN)
    if ramp <= 0 or progress >= ramp or budget >= 1.0:
        return aim
    return aim + (1.0 - aim) * (1.0 - progress / ramp)


def energy_penalty(
    student: SpikingStudentLM, context: float, cfg: TrainConfig, progress: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The energy budget's hinge penalty for the last forward (`context`: its `mean_context`;
    `progress`: share of the steps done, for `energy_ramp`) -> (penalty, detached [whole, body] energy
    ratios to the ANN twin)."""
    whole, body = training_energy_ratios(student, context)
    penalty = whole.new_zeros(())
    for ratio, budget in ((whole, cfg.energy_budget), (body, cfg.energy_budget_body)):
        if budget is not None:
            penalty = penalty + torch.relu(ratio - energy_budget_at(budget, progress, cfg.energy_ramp))
    return cfg.energy_weight * penalty, torch.stack([whole, body]).detach()


def _kept_labels(ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Next-token labels [B, S], -1 also where a loss mask leaves the position out."""
    labels = next_token_labels(ids, mask)
    return labels if keep is None else labels.masked_fill(~keep.to(labels.device).bool(), -1)


class CsvLog:
    """training_log.csv, one row per logged step (appended and flushed as training runs)."""

    FIELDS = ["step", "loss", "kd_loss", "ce_loss", "lr", "tokens_per_s", "spike_rate", "grad_norm", "energy_ratio",
              "body_energy_ratio"]  # fmt: skip

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
                "" if s.energy is None else f"{s.energy:.5f}",
                "" if s.energy_body is None else f"{s.energy_body:.5f}",
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


@dataclass
class _Progress:
    """What a checkpoint carries besides weights, optimizer, data position and RNG: the run's counters."""

    losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    first_loss: float | None = None
    tokens_seen: int = 0
    eval_before: dict[str, Any] = field(default_factory=dict)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    prior_seconds: float = 0.0  # training time of the earlier part of a resumed run


class DistillRecipe:
    """`train()` in named phases (after torchtune's recipes): `setup_*` build the run in order, `train_loop`
    runs the steps with its logging, evaluation and checkpoint hooks, `finish` evaluates and saves.

    The setup order is part of the behaviour: each phase draws random numbers (data order, student
    init), so a run is reproducible from `--seed` and a resumed run restores its RNG state last."""

    def __init__(self, cfg: TrainConfig, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        self.out = Path(cfg.output_dir)
        self.progress = _Progress()

    # ---------------------------------------------------------------- setup
    def setup_run(self) -> None:
        """Output folder check, seeds, devices, process group, the checkpoint to resume from."""
        cfg, out = self.cfg, self.out
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--output-dir {out} is a file; pass a folder path")
        seed_everything(cfg.seed)
        device = pick_device(cfg.device)
        # torchrun: join the process group (NCCL on CUDA, Gloo on CPU); one GPU per process.
        self.dctx = init_distributed(device)
        self.device = local_device(device, self.dctx)
        configure_matmul_precision(self.device)  # TF32 for the loss's fp32 matmuls on CUDA
        try:  # --fused-loss liger without CUDA or Liger Kernel: say so before loading anything
            resolve_fused_loss(cfg.fused_loss, self.device)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.amp_dtype = autocast_dtype(self.device)
        self.scaler = grad_scaler(self.device, self.amp_dtype)  # enabled for fp16 autocast only
        quiet_other_ranks(self.dctx)
        self.ckpt = load_checkpoint(out) if cfg.resume else None  # fail fast, before loading the teacher
        if not cfg.resume and self.dctx.is_main and has_artifacts(out):
            log.info(
                "%s holds the artifacts of an earlier run: they stay as they are until this run has finished, "
                "then are replaced as one complete set (to continue that run instead use --resume; to keep "
                "them, another --output-dir)",
                out,
            )

    def setup_teacher(self, teacher: Teacher | None) -> None:
        cfg = self.cfg
        if teacher is None:
            log.info("loading teacher %s", cfg.teacher_model)
            tdev = (
                local_device(pick_teacher_device(cfg.teacher_device), self.dctx) if cfg.teacher_device else self.device
            )
            teacher = load_teacher(
                cfg.teacher_model,
                device=tdev,
                dtype=cfg.teacher_dtype,
                quantization=cfg.teacher_quantization,
                load_model=not cfg.teacher_cache,  # with the logit cache: weights only if a block is missing
            )
        self.teacher = teacher

    def setup_data(self) -> None:
        """Training and held-out blocks, this rank's batcher, the teacher logit cache when asked for."""
        cfg, tok = self.cfg, self.teacher.tokenizer
        texts = load_texts(cfg.dataset, cfg.dataset_path, max_texts=cfg.max_texts)
        train_texts, held_texts = split_held_out(texts, cfg.held_out_fraction, cfg.seed)
        self.replies = None  # --teacher-responses: prompt + teacher reply examples (responses.ReplyData)
        if cfg.teacher_responses:
            self.setup_replies(train_texts, held_texts)
        else:
            self.train_blocks = tokenize_texts(train_texts, tok, cfg.max_length, pack=cfg.pack)
            self.held_blocks = tokenize_texts(held_texts, tok, cfg.max_length, pack=cfg.pack) if held_texts else []
        check_token_ids(self.train_blocks + self.held_blocks, self.teacher.vocab_size, cfg.teacher_model)
        self.batcher = BlockBatcher(
            self.train_blocks,
            cfg.batch_size,
            tok.pad_token_id,
            seed=cfg.seed,
            shard=(self.dctx.rank, self.dctx.world_size),
        )
        log.info(
            "data: %d training sequences (%d tokens), %d held out",
            len(self.train_blocks),
            self.batcher.num_tokens,
            len(self.held_blocks),
        )
        self.cached = None  # teacher logit cache: top-k targets of train + held-out blocks, filled on demand
        self.eval_teacher: Any = self.teacher  # evaluation measures against the teacher at T=1
        if cfg.teacher_cache:
            from .teacher_cache import open_for_evaluation, open_for_training

            blocks = self.train_blocks + self.held_blocks
            self.cached = open_for_training(cfg, self.teacher, blocks, self.device)
            self.eval_teacher = open_for_evaluation(cfg, self.teacher, blocks, self.cached, self.device)

    def setup_replies(self, train_texts: list[str], held_texts: list[str]) -> None:
        """The teacher's replies to every prompt (cached on disk), as prompt + reply blocks."""
        from .responses import reply_data
        from .teacher import resolve_dtype

        cfg, teacher = self.cfg, self.teacher
        dtype = teacher_dtype(teacher)
        if dtype is None:  # weights not loaded (teacher cache): the dtype they would load in
            tdev = torch.device(cfg.teacher_device) if cfg.teacher_device else self.device
            dtype = resolve_dtype(cfg.teacher_dtype, tdev)
        self.replies = reply_data(
            cfg,
            teacher,
            train_texts,
            held_texts,
            str(dtype).replace("torch.", ""),
            progress=self.show_progress and self.dctx.is_main,
        )
        self.train_blocks, self.held_blocks = self.replies.train_blocks, self.replies.held_blocks
        # on-policy batches sample from the student: their own RNG, so resuming repeats them
        self.on_policy_rng = torch.Generator(device=self.device)

    def setup_student(self, student_args: dict[str, Any]) -> None:
        """Student, optimizer and schedule; restored from the checkpoint when resuming; DDP-wrapped."""
        cfg, dctx, teacher = self.cfg, self.dctx, self.teacher
        self.scfg = StudentConfig(vocab_size=teacher.vocab_size, **student_args)
        cfg.check_student(self.scfg.student_type)
        self.student = SpikingStudentLM(self.scfg).to(self.device)
        self.student.train()
        self.student.keep_spike_counts(cfg.energy_budgeted)
        self.optimizer = make_optimizer(self.student, cfg.lr, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.scheduler, cfg.warmup_steps, cfg.num_steps)
        self.fingerprint = run_fingerprint(cfg, self.scfg, dctx.world_size)
        self.start_step = 0
        if self.ckpt is not None:
            self._restore_checkpoint(self.ckpt)
        self.model = wrap_for_training(self.student, dctx, self.device)  # DDP over several processes
        self.n_params = self.student.num_parameters()
        log.info(
            "student: %s, %.2fM parameters, T=%d, teacher %s (%.1fM parameters, vocab %d)",
            self.scfg.student_type,
            self.n_params / 1e6,
            self.student.timesteps,
            teacher.name,
            teacher.num_parameters / 1e6,
            teacher.vocab_size,
        )

    def _restore_checkpoint(self, ckpt: dict[str, Any]) -> None:
        cfg, out = self.cfg, self.out
        check_fingerprint(ckpt["fingerprint"], self.fingerprint, checkpoint_path(out))
        self.start_step = int(ckpt["step"])
        if self.start_step > cfg.num_steps:
            raise TrainingError(
                f"the checkpoint in {out} is at step {self.start_step}, past --num-steps {cfg.num_steps}; "
                f"pass --num-steps {self.start_step} or more"
            )
        self.student.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.batcher.load_state_dict(ckpt["data"][self.dctx.rank])
        p = ckpt["progress"]
        self.progress = _Progress(
            losses=list(p.get("losses", [])),
            history=list(p.get("history", [])),
            first_loss=p.get("first_loss"),
            tokens_seen=int(p.get("tokens_seen", 0)),
            eval_before=p["eval_before"],
            eval_history=list(p.get("eval_history", [])),
            prior_seconds=float(p.get("train_seconds", 0.0)),
        )
        log.info("resuming from step %d (%s)", self.start_step, checkpoint_path(out))

    def setup_evaluation(self) -> None:
        """Fixed held-out batches (or a few training batches when nothing is held out) and the unigram baseline."""
        from .evaluate import unigram_baseline

        cfg, pad = self.cfg, self.teacher.tokenizer.pad_token_id
        self.held_batches = fixed_batches(self.held_blocks, cfg.batch_size, pad, cfg.eval_batches)
        self.eval_split = "held_out"
        if not self.held_batches:  # no held-out text: measure on a few training batches, and say so
            self.held_batches = fixed_batches(self.train_blocks, cfg.batch_size, pad, cfg.eval_batches)
            self.eval_split = "train"
        self.unigram = unigram_baseline(self.train_blocks, self.teacher.vocab_size)

    def setup_logs(self) -> None:
        """training_log.csv, TensorBoard, the evaluation before training, the clocks; the RNG state last."""
        resuming = self.ckpt is not None
        if self.dctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.csv_log: CsvLog | _NoLog = CsvLog(
                self.out / "training_log.csv",
                [m.stat_name for m in self.student.lif_modules()],
                resume_step=self.start_step if resuming else None,
            )
        else:
            self.csv_log = _NoLog()
        if not resuming:
            self.progress.eval_before = self.evaluate()
        self.tb = _tensorboard_writer(self.out, self.cfg) if self.dctx.is_main else None
        self.t_start = time.perf_counter()
        self.t_last, self.tok_last = self.t_start, self.progress.tokens_seen
        if resuming:
            restore_rng_state(self.ckpt["rng"][self.dctx.rank])  # last: setup above consumed random numbers
        self.ckpt = None

    def setup(self, student_args: dict[str, Any], teacher: Teacher | None = None) -> None:
        self.setup_run()
        self.setup_teacher(teacher)
        self.setup_data()
        self.setup_student(student_args)
        self.setup_evaluation()
        self.setup_logs()

    # ---------------------------------------------------------------- the step loop
    def train_loop(self) -> None:
        """Steps start_step+1 .. num_steps; each: one optimizer step, then the log, eval and checkpoint hooks."""
        cfg = self.cfg
        self.bar = progress_bar(cfg.num_steps, "distill", "step", self.show_progress and self.dctx.is_main)
        self.bar.update(self.start_step)
        stop = StopSignals()
        try:
            stop.__enter__()
            for step in range(self.start_step + 1, cfg.num_steps + 1):
                stats, lr = self.train_step(step)
                self.bar.update(1)
                if cfg.log_interval and (step % cfg.log_interval == 0 or step == cfg.num_steps):
                    self.log_hook(step, stats, lr)
                if cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.num_steps:
                    self.eval_hook(step)
                self.checkpoint_hook(step, stop)
        finally:
            stop.__exit__(None, None, None)
            self.bar.close()
            self.csv_log.close()
            if self.tb is not None:
                self.tb.close()
        self.elapsed = self.progress.prior_seconds + time.perf_counter() - self.t_start  # with the earlier part

    def micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, Callable[[], TeacherTargets]]]:
        """grad_accum_steps batches, each with its teacher targets computed when distill_step reaches it
        (one [N, V] target alive at a time)."""
        cfg, micro = self.cfg, []
        self.loss_masks: list[torch.Tensor | None] = []
        for k in range(cfg.grad_accum_steps):
            ids, mask = self.batcher.next_batch()
            if self.replies is not None:
                starts = [self.replies.train_starts[i] for i in self.batcher.last_indices]
                if self._on_policy(k):  # the student's own reply, the live teacher's targets on it
                    ids, mask, starts = self.on_policy_batch(starts, k)
                    make = functools.partial(
                        teacher_targets, self.teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens, raw=True
                    )
                    micro.append((ids, mask, make))
                    self.loss_masks.append(response_loss_mask(starts, mask))
                    continue
                self.loss_masks.append(response_loss_mask(starts, mask) if cfg.response_loss_only else None)
            else:
                self.loss_masks.append(None)
            if self.cached is not None:  # block ids of the rows: the cache's keys
                make = functools.partial(self.cached, ids, mask, self.batcher.last_indices)
            else:  # raw logits: their log-softmax happens inside the loss's chunk kernel
                make = functools.partial(
                    teacher_targets, self.teacher, ids, mask, cfg.temperature, cfg.loss_chunk_tokens, raw=True
                )
            micro.append((ids, mask, make))
        return micro

    def _on_policy(self, k: int) -> bool:
        """Whether micro-batch k of the coming step is on-policy: a fraction --on-policy-fraction of them,
        decided by (seed, step, k) alone."""
        lam = self.cfg.on_policy_fraction
        if lam <= 0:
            return False
        step = len(self.progress.losses) + 1
        return random.Random(f"{self.cfg.seed}:{step}:{k}").random() < lam

    def on_policy_batch(self, starts: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The batch's prompts, each followed by a reply the student samples (GKD): (ids, mask, reply starts).
        Sampled under a seed of (seed, step, micro-batch k), so a resumed run samples the same."""
        from .responses import on_policy_blocks

        cfg, rows = self.cfg, self.batcher.last_indices
        self.on_policy_rng.manual_seed((cfg.seed * 1_000_003 + len(self.progress.losses)) * 64 + k)
        blocks, starts = on_policy_blocks(
            self.student,
            [self.train_blocks[i] for i in rows],
            starts,
            cfg.response_max_new_tokens,
            cfg.max_length,
            self.replies.stop_ids,
            self.on_policy_rng,
            vocab_limit=len(self.teacher.tokenizer),
            device=self.device,
        )
        ids, mask = pad_batch(blocks, self.batcher.pad_id)
        return ids, mask, starts

    def train_step(self, step: int) -> tuple[StepStats, float]:
        """Forward/backward over the micro-batches, clip, optimizer and schedule step. Returns the step's
        stats and the learning rate it used."""
        cfg = self.cfg
        try:
            micro = self.micro_batches()
            stats = distill_step(
                self.student,
                micro,
                cfg,
                self.device,
                model=self.model,
                dist=self.dctx,
                loss_masks=self.loss_masks,
                scaler=self.scaler,
                progress=(step - 1) / cfg.num_steps,
            )
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
                non_finite_loss_message(stats.loss, step, cfg.lr, teacher_dtype(self.teacher), self.amp_dtype)
            )
        self.scaler.unscale_(self.optimizer)  # fp16: true gradients before clipping (no-op otherwise)
        stats.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip))
        self.scaler.step(self.optimizer)  # fp16: skips a step whose gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.student.apply_rate_floor(FLOOR_STEP * lr / cfg.lr)  # the floor's step anneals with the lr
        self.scheduler.step()
        p = self.progress
        p.tokens_seen += stats.tokens
        p.losses.append(stats.loss)
        p.first_loss = stats.loss if p.first_loss is None else p.first_loss
        return stats, lr

    # ---------------------------------------------------------------- hooks
    def log_hook(self, step: int, stats: StepStats, lr: float) -> None:
        """Loss line on stderr, a training_log.csv row, TensorBoard, and the metadata's history."""
        cfg, p = self.cfg, self.progress
        now = time.perf_counter()
        tps = (p.tokens_seen - self.tok_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tok_last = now, p.tokens_seen
        recent = p.losses[-cfg.log_interval :]
        msg = f"step {step}/{cfg.num_steps} loss {sum(recent) / len(recent):.4f}"
        if cfg.scheduler != "constant" or cfg.warmup_steps:
            msg += f" lr {lr:.3g}"
        msg += f" tok/s {tps:.0f}"
        if stats.spike_rate is not None:
            msg += f" spike-rate {stats.spike_rate:.3f}"
        if stats.energy is not None:
            msg += f" energy {stats.energy:.3f} (body {stats.energy_body:.3f}) x ANN"
        _log_line(self.bar, msg)
        self.csv_log.row(step, stats, lr, tps)
        if self.tb is not None:
            _tensorboard_row(self.tb, step, stats, lr, tps)
        p.history.append(
            {
                "step": step,
                "loss": stats.loss,
                "lr": lr,
                "tokens_per_s": tps,
                "spike_rate": stats.spike_rate if stats.spike_rate is not None else float("nan"),
            }
        )

    def evaluate(self) -> dict[str, Any]:
        """Held-out fidelity against the teacher (or its logit cache); rank 0 alone evaluates."""
        from .evaluate import evaluate_fidelity

        if not self.held_batches or not self.dctx.is_main:
            return {}
        return evaluate_fidelity(
            self.student,
            self.eval_teacher,
            self.held_batches,
            device=self.device,
            unigram_logprobs=self.unigram,
            chunk=self.cfg.loss_chunk_tokens,  # the memory plan's evaluation working set
        )

    def eval_hook(self, step: int) -> None:
        ev = self.evaluate()
        if not ev:
            return
        self.progress.eval_history.append({"step": step, **ev})
        if self.tb is not None:
            for k in ("student_perplexity", "kl_teacher_student", "top1_agreement"):
                self.tb.add_scalar(f"eval/{k}", ev[k], step)
        _log_line(
            self.bar,
            f"eval step {step}: KL {ev['kl_teacher_student']:.4f} "
            f"agreement {ev['top1_agreement']:.3f} ppl {ev['student_perplexity']:.2f}",
        )

    def checkpoint_hook(self, step: int, stop: StopSignals) -> None:
        """A checkpoint every N steps and after the last (so a finished run can be extended), or when
        SIGINT/SIGTERM reached any rank during this step: then stop with how to resume."""
        cfg = self.cfg
        stopping = any_rank(stop.requested, self.dctx)
        due = cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.num_steps)
        if stopping or due:
            ckpt_file = self.write_checkpoint(step)
        if stopping:
            shutdown(self.dctx)
            raise TrainingInterrupted(
                f"interrupted by {stop.name or 'a signal to another process'} after step {step}/"
                f"{cfg.num_steps}; checkpoint saved to {ckpt_file}; to continue to step {cfg.num_steps}, "
                "run the same command again with --resume",
                exit_code=143 if stop.name == "SIGTERM" else 130,
            )

    def write_checkpoint(self, step: int) -> Path:
        """Gather every rank's data position and RNG state; rank 0 writes checkpoint.pt atomically."""
        data_states = gather_objects(self.batcher.state_dict(), self.dctx)
        rng_states = gather_objects(capture_rng_state(), self.dctx)
        path = checkpoint_path(self.out)

        def write() -> None:
            p = self.progress
            save_checkpoint(
                self.out,
                step=step,
                student=self.student,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                data_states=data_states,
                rng_states=rng_states,
                fingerprint=self.fingerprint,
                progress={
                    "losses": p.losses,
                    "history": p.history,
                    "first_loss": p.first_loss,
                    "tokens_seen": p.tokens_seen,
                    "eval_before": p.eval_before,
                    "eval_history": p.eval_history,
                    "train_seconds": p.prior_seconds + time.perf_counter() - self.t_start,
                },
                scaler=self.scaler,
            )

        # every rank waits for rank 0's write: none reports it saved, or exits, before it is complete
        on_main_then_barrier(self.dctx, write)
        return path

    # ---------------------------------------------------------------- saving
    def finish(self, cli_config: dict[str, Any] | None) -> DistillRun:
        """Rank 0: evaluate, write the artifacts as one complete set, drop a stale checkpoint."""
        cfg, out = self.cfg, self.out
        if not self.dctx.is_main:  # rank 0 alone evaluates and writes the artifacts
            shutdown(self.dctx)
            return DistillRun(self.student, metadata={}, paths={}, history=self.progress.history, rank=self.dctx.rank)
        meta = self.build_metadata(cli_config)
        # One complete set replaces an earlier run's (its exports and figures included); see save_artifacts.
        paths = save_artifacts(
            out,
            self.student.state_dict(),
            meta,
            tokenizer=self.teacher.tokenizer,
            extra_writers={"training_curves.png": self._write_curves},
        )
        paths["training_log"] = out / "training_log.csv"
        if not cfg.resume and not cfg.checkpoint_every and checkpoint_path(out).exists():
            checkpoint_path(out).unlink(missing_ok=True)  # an earlier run's: --resume would continue that run
            log.info("removed the checkpoint.pt of an earlier run from %s", out)
        res = meta["training_results"]
        log.info(
            "done: %d steps in %.1fs, loss %.4f -> %.4f; artifacts in %s",
            cfg.num_steps,
            self.elapsed,
            res["first_loss"],
            res["final_loss"],
            out,
        )
        shutdown(self.dctx)
        return DistillRun(student=self.student, metadata=meta, paths=paths, history=self.progress.history)

    def build_metadata(self, cli_config: dict[str, Any] | None) -> dict[str, Any]:
        """metadata.json: the spec's sections plus the evaluation and efficiency after training."""
        from .evaluate import evaluate_efficiency, format_report

        cfg, p, elapsed = self.cfg, self.progress, self.elapsed
        eval_after = self.evaluate()
        tail = p.losses[-max(1, min(len(p.losses), cfg.log_interval or 10)) :]
        results = {
            "steps": cfg.num_steps,
            "avg_loss": sum(p.losses) / len(p.losses),
            "first_loss": p.first_loss,
            "final_loss": sum(tail) / len(tail),
            "tokens_seen": p.tokens_seen,
            "train_seconds": round(elapsed, 2),
            "tokens_per_second": round(p.tokens_seen / max(elapsed, 1e-9), 1),
        }
        cli = dict(cli_config or cfg.to_dict())
        cli.setdefault("tokenizer_name", cfg.teacher_model)
        extra: dict[str, Any] = {}
        if eval_after:
            extra["evaluation"] = {"split": self.eval_split, "before_training": p.eval_before, **eval_after}
            if self.cached is not None:
                from .teacher_cache import eval_targets_note

                extra["evaluation"]["teacher_targets"] = eval_targets_note(self.cached.cache.k, self.teacher.vocab_size)
            if p.eval_history:
                extra["evaluation"]["during_training"] = p.eval_history
        extra["efficiency"] = evaluate_efficiency(
            self.student, self.held_batches, device=self.device, split=self.eval_split
        )
        log.info("%s", format_report(extra.get("evaluation"), extra["efficiency"]))
        if self.replies is not None:
            extra.update(self.reply_sections(extra.get("evaluation")))
        return build_metadata(self.scfg, self.n_params, self.training_config(), cli, results, cfg.git_tracking, extra)

    def reply_sections(self, evaluation: dict[str, Any] | None) -> dict[str, Any]:
        """--teacher-responses: `evaluation.responses` (held-out replies against the teacher's) and the
        `prompt_format` that SNNLLMBackend formats plain prompts with."""
        from .artifacts import prompt_format_section
        from .evaluate import evaluate_responses, format_responses
        from .responses import GENERATION_DEFAULTS

        r, out = self.replies, {}
        if r.held.prompts and self.dctx.is_main:
            responses = evaluate_responses(
                self.student,
                r.held.prompts,
                r.held.prompt_ids,
                [x.text for x in r.held.replies],
                r.held_blocks,
                r.held_starts,
                self.teacher.tokenizer,
                stop_ids=r.stop_ids,
                max_new_tokens=self.cfg.response_max_new_tokens,
            )
            log.info("%s", format_responses(responses))
            out["evaluation"] = {**(evaluation or {}), "responses": responses}
        out["prompt_format"] = prompt_format_section(r.chat_template, **GENERATION_DEFAULTS)
        return out

    def training_config(self) -> dict[str, Any]:
        """metadata.json's `training_config`: the spec's keys plus where and how the teacher ran."""
        cfg, teacher = self.cfg, self.teacher
        return {
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
            "fused_loss": cfg.fused_loss,
            "hard_label_weight": cfg.hard_label_weight,
            "seed": cfg.seed,
            "device": str(self.device),
            "teacher_params": teacher.num_parameters,
            "teacher_dtype": str(teacher_dtype(teacher)).replace("torch.", ""),
            "teacher_device": str(teacher_device(teacher)),
            "teacher_quantization": cfg.teacher_quantization,
            "teacher_cache": None if self.cached is None else self.cached.summary(),
            "world_size": self.dctx.world_size,
            "effective_batch_size": cfg.batch_size * cfg.grad_accum_steps * self.dctx.world_size,
            "resumed_from_step": self.start_step or None,
            "precision": precision_metadata(self.device, self.amp_dtype, self.scaler),
            "teacher_responses": None if self.replies is None else self.replies.summary,
            "energy_budget": cfg.energy_budget,
            "energy_budget_body": cfg.energy_budget_body,
            "energy_weight": cfg.energy_weight if cfg.energy_budgeted else None,
            "energy_ramp": cfg.energy_ramp if cfg.energy_budgeted else None,
        }

    def _write_curves(self, png: Path) -> None:
        """Drawn into the staged set, so the figure always fits its weights."""
        try:
            from .plots import write_training_curves

            write_training_curves(self.out / "training_log.csv", png)
        except Exception as e:  # noqa: BLE001 - a figure is never worth failing a finished run
            png.unlink(missing_ok=True)
            log.warning("warning: could not write training_curves.png: %s", str(e).splitlines()[0] if str(e) else e)


def train(
    cfg: TrainConfig,
    student_args: dict[str, Any],
    cli_config: dict[str, Any] | None = None,
    teacher: Teacher | None = None,
    progress: bool = True,
) -> DistillRun:
    """Run distillation end to end and write the artifacts into `cfg.output_dir`."""
    recipe = DistillRecipe(cfg, show_progress=progress)
    recipe.setup(student_args, teacher)
    recipe.train_loop()
    return recipe.finish(cli_config)


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
    which on CPU can cost more than the arithmetic on them (`bench/bench_train_speed.py` times a training
    step with and without this). The process keeps its peak heap instead. Linux/glibc only; returns
    whether it applied."""
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
