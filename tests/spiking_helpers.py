"""Helpers shared by the spiking-student tests (test_spike_driven.py, test_counting.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from snn_distill.config import StudentConfig
from snn_distill.student import SpikingStudentLM

V = 97


def make(mode: str = "spike-driven", student_type: str = "snn", **kw) -> SpikingStudentLM:
    """A tiny student (dim 32, depth 2, 4 heads, 2 kv heads, vocab 97); kw override StudentConfig fields."""
    cfg = dict(vocab_size=V, dim=32, depth=2, num_heads=4, num_kv_heads=2, mode=mode, student_type=student_type)
    cfg.update(kw)
    return SpikingStudentLM(StudentConfig(**cfg))


def calibrated(model: SpikingStudentLM, seed: int = 0) -> SpikingStudentLM:
    """One training forward on random ids: calibrated thresholds set themselves. Returns it in eval mode."""
    model.train()
    model(torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(seed)))
    return model.eval()


class LinearInputs(TorchFunctionMode):
    """Records the weight shape and input of every F.linear call (a real hook: nothing is replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.inputs.append((tuple(args[1].shape), args[0].detach().clone()))
        return func(*args, **(kwargs or {}))


def is_spike_code(x: torch.Tensor, t: int) -> bool:
    """Every value an integer in -t..t."""
    return bool(((x == x.round()) & (x.abs() <= t)).all())
