"""Data-parallel helpers: one process per GPU (or CPU worker) started by `torchrun`.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and joins the process group: NCCL when training on CUDA, Gloo on CPU. Without those variables (a
plain `python scripts/train_snn_student.py ...`) everything here is a no-op for a single process:
rank 0 of 1, no collectives, no DDP wrapper.

The training step runs the student through `TrainForward`, a module whose forward returns both the
hidden states and the LM-head weight. The chunked loss uses that weight directly; because it comes
out of `DistributedDataParallel.forward`, DDP sees every parameter that gets a gradient and
all-reduces them all (the embedding too when it is tied to the head).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")


class DistributedError(ValueError):
    """A torchrun setup that cannot work (e.g. more processes than GPUs); the message says what to change."""


@dataclass
class DistContext:
    """Where this process stands in a data-parallel job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    owns_group: bool = False  # this context created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun, 1 otherwise (used by --dry-run, which starts no process group)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise return a single-process context.

    On CUDA, each process uses GPU `LOCAL_RANK` (the caller should place the student there).
    """
    world = env_world_size()
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise DistributedError(
                f"process {local_rank} of {local_world} on this machine has no GPU of its own ({gpus} visible); "
                "pass --nproc_per_node at most the number of GPUs, or --device cpu"
            )
        torch.cuda.set_device(local_rank)
    # The processes on one machine share its cores (CPU workers and the host side of GPU workers):
    # each takes its slice instead of all of them.
    torch.set_num_threads(threads_per_process(local_world))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        owns = True
    return DistContext(rank, world, local_rank, local_world, backend, owns)


def threads_per_process(local_world_size: int) -> int:
    """This process's share of the cores it may run on, when `local_world_size` processes share them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(local_world_size, 1))


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    """cuda -> cuda:LOCAL_RANK under torchrun; anything else unchanged."""
    if device.type == "cuda" and ctx.enabled and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few numbers over all ranks (float64); identity in a single process."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop request)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def on_main_then_barrier(ctx: DistContext, fn: Callable[[], T]) -> T | None:
    """Call `fn` on rank 0 alone (e.g. writing checkpoint.pt); every rank returns only once it has
    finished. Without this wait the other ranks of an interrupted run would report the checkpoint
    saved and exit while rank 0 still writes it, and torchrun would then kill rank 0 mid-write.
    Returns fn's result on rank 0, None on the others."""
    result = fn() if ctx.is_main else None
    barrier(ctx)
    return result


class TrainForward(nn.Module):
    """The student's training forward: ids -> (hidden [B, S, D], LM-head weight [V, D]).

    Returning the head weight from forward lets DistributedDataParallel track the gradient the
    chunked loss puts on it."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_hidden(input_ids), self.student.lm_head_weight


def wrap_for_training(student: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """TrainForward(student), wrapped in DistributedDataParallel when there are several ranks.

    DDP broadcasts rank 0's parameters at construction, so every replica starts identical."""
    model: nn.Module = TrainForward(student)
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # The only buffer (RoPE frequencies) is identical everywhere: no per-forward buffer broadcast.
    params = inspect.signature(DDP.__init__).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(model, device_ids=ids, **sync)


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() when `skip` (accumulation micro-batches before the last), else a null context."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def quiet_other_ranks(ctx: DistContext) -> None:
    """Rank 0 alone logs: other ranks keep warnings and errors only."""
    if not ctx.is_main:
        logging.getLogger("snn_distill").setLevel(logging.WARNING)
