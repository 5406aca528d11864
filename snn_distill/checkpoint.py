"""Training checkpoints: `checkpoint.pt` in the output folder, written atomically.

A checkpoint holds everything needed to continue a run exactly: student weights, AdamW state,
LR-scheduler state, fp16's gradient-scaler state, the Python/torch/NumPy(/CUDA) RNG states and the
data-loader position of every data-parallel rank, the step, the loss history so far, and a fingerprint
of the settings that shape the run. `--resume` refuses a checkpoint whose fingerprint differs and names
the settings that do.

On the CPU a resumed run is bit-identical to an uninterrupted one. On CUDA it takes the same batches,
learning rates and random numbers, but GPU kernels are not bit-deterministic (atomic adds in backward
passes, cuBLAS's choice of algorithm, NCCL's reduction order), so its losses and weights agree with an
uninterrupted run's to float rounding, not bit for bit.

The file is loaded with `weights_only=True`, so it holds only tensors and plain Python values.
"""

from __future__ import annotations

import json
import pickle
import random
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import atomic_torch_save

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1

# TrainConfig fields that shape the trajectory of a run; the rest (logging, output folder, device,
# checkpoint cadence) may change between the interrupted run and its resumption.
FINGERPRINT_FIELDS = (
    "teacher_model",
    "dataset",
    "dataset_path",
    "batch_size",
    "grad_accum_steps",
    "max_length",
    "lr",
    "weight_decay",
    "grad_clip",
    "temperature",
    "scheduler",
    "warmup_steps",
    "seed",
    "kd_loss",
    "hard_label_weight",
    "pack",
    "held_out_fraction",
    "teacher_dtype",
    "teacher_quantization",
    "teacher_cache_topk",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from a different run; the message says what to do."""


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_FILE


# --teacher-responses settings: they decide the training examples (replies) and the loss.
RESPONSE_FINGERPRINT_FIELDS = (
    "teacher_responses",
    "response_max_new_tokens",
    "response_sample",
    "response_temperature",
    "response_top_p",
    "response_seed",
    "response_loss_only",
    "on_policy_fraction",
    "max_texts",
)


# an energy budget changes the loss (only then: checkpoints of runs without one stay resumable)
ENERGY_FINGERPRINT_FIELDS = ("energy_budget", "energy_budget_body", "energy_weight")


def run_fingerprint(train_cfg: Any, student_cfg: Any, world_size: int) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint's run (plain JSON values).

    --num-steps is included only for schedules that depend on it (cosine, linear): with a constant
    schedule a finished run can be extended by resuming with a larger --num-steps."""
    tc = asdict(train_cfg) if is_dataclass(train_cfg) else dict(train_cfg)
    fp: dict[str, Any] = {k: tc.get(k) for k in FINGERPRINT_FIELDS if k in tc}
    if tc.get("teacher_responses"):  # only then: checkpoints of runs without replies stay resumable
        fp.update({k: tc.get(k) for k in RESPONSE_FINGERPRINT_FIELDS})
    if tc.get("energy_budget") is not None or tc.get("energy_budget_body") is not None:
        fp.update({k: tc.get(k) for k in ENERGY_FINGERPRINT_FIELDS})
        if tc.get("energy_ramp"):  # only then: budgeted checkpoints from before the ramp stay resumable
            fp["energy_ramp"] = tc["energy_ramp"]
    if tc.get("scheduler", "constant") != "constant":
        fp["num_steps"] = tc.get("num_steps")
    sc = student_cfg.to_dict() if hasattr(student_cfg, "to_dict") else dict(student_cfg)
    if not sc.get("rate_floor"):  # only when on: checkpoints from before the floor stay resumable
        sc.pop("rate_floor", None)
    fp.update({f"student.{k}": v for k, v in sc.items()})
    fp["world_size"] = int(world_size)
    return json.loads(json.dumps(fp, default=str))


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise CheckpointError naming the settings that differ between the checkpoint and this run."""
    keys = sorted(set(saved) | set(current))
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if not diffs:
        return
    shown = ", ".join(f"{_flag(k)} {saved.get(k)!r} -> {current.get(k)!r}" for k in diffs[:4])
    more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    raise CheckpointError(
        f"{path} was written by a different run ({shown}{more}); resume with the same settings, "
        "or use a new --output-dir to start afresh"
    )


def _flag(key: str) -> str:
    if key == "world_size":
        return "number of processes"
    if key.startswith("student."):
        return f"student {key.split('.', 1)[1]}"
    return "--" + key.replace("_", "-")


# ---- RNG states ------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, torch CPU, NumPy and (when present) CUDA generator states, as weights_only-safe values."""
    state: dict[str, Any] = {"python": _to_plain(random.getstate()), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        try:
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_plain(x) for x in obj]
    return obj


# ---- save / load -----------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_states: list[dict[str, Any]],
    rng_states: list[dict[str, Any]],
    fingerprint: dict[str, Any],
    progress: dict[str, Any],
    scaler: Any = None,
) -> Path:
    """Write `checkpoint.pt` atomically (temp file + fsync + rename) and return its path.

    data_states / rng_states: one entry per data-parallel rank, in rank order. progress: plain
    values the loop needs to carry on (loss history, tokens seen, ...). scaler: fp16's
    `torch.amp.GradScaler`, saved under "scaler" when enabled (its loss scale must carry on too)."""
    path = checkpoint_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": list(data_states),
        "rng": list(rng_states),
        "fingerprint": fingerprint,
        "progress": progress,
    }
    if scaler is not None and scaler.is_enabled():
        obj["scaler"] = scaler.state_dict()
    atomic_torch_save(obj, path)
    return path


def load_checkpoint(output_dir: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read `checkpoint.pt` from an output folder; CheckpointError with the fix when it cannot be used."""
    path = checkpoint_path(output_dir)
    if not path.is_file():
        raise CheckpointError(
            f"--resume: no {CHECKPOINT_FILE} in {Path(output_dir)}; start the run without --resume "
            "(add --checkpoint-every N to write checkpoints), or point --output-dir at the interrupted run"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read ({first}); delete it and start the run afresh") from e
    required = ("step", "model", "optimizer", "scheduler", "data", "rng", "fingerprint", "progress")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise CheckpointError(f"{path} is not a training checkpoint of this tool; delete it or pick another folder")
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer snn_distill; upgrade to resume it")
    return ckpt


# ---- graceful stop ---------------------------------------------------------------------------


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`: the loop finishes its step, writes a
    checkpoint and stops. Another SIGINT more than 3 s later raises KeyboardInterrupt (force quit).

    Handlers are installed from the main thread only (elsewhere signals cannot be caught)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name if self.signum is not None else ""

    # Ctrl-C under torchrun reaches a worker twice within milliseconds (from the terminal and
    # forwarded by torchrun): a repeat inside this window is the same request, not a force-quit.
    REPEAT_WINDOW_S = 3.0

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        import time

        now = time.monotonic()
        if self.signum is not None:
            if signum == signal.SIGINT and now - self._first_at > self.REPEAT_WINDOW_S:
                raise KeyboardInterrupt
            return
        self.signum, self._first_at = signum, now

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
