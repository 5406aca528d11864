"""Numeric precision of a training run: the student's autocast dtype, fp16's gradient scaler, TF32.

* Autocast on CUDA: bf16 where the GPU computes it natively (Ampere and later); fp16 otherwise
  (T4, V100 emulate bf16, several times slower), with `torch.amp.GradScaler` so that small gradients
  do not underflow fp16. The CPU trains in fp32 (no autocast).
* TF32: the chunked loss's fp32 `[chunk, D] x [D, V]` matmuls run on TF32 tensor cores on CUDA
  (`torch.set_float32_matmul_precision("high")`: 10-bit mantissa inputs, fp32 accumulation). The setting
  is recorded in metadata.json (`training_config.precision`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def bf16_native(device: torch.device) -> bool:
    """True when the CUDA GPU `device` computes bf16 in hardware (not emulated)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no emulation argument
            return bool(torch.cuda.is_bf16_supported())


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The student's autocast dtype on `device`: bf16 or fp16 on CUDA, None (fp32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if bf16_native(device) else torch.float16


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 autocast (bf16 has fp32's range and needs none); disabled,
    its scale/unscale_/step/update calls pass straight through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def configure_matmul_precision(device: torch.device) -> str:
    """Allow TF32 matmuls on CUDA; returns the fp32 matmul precision now in force."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return torch.get_float32_matmul_precision()


def precision_metadata(device: torch.device, dtype: torch.dtype | None, scaler: Any = None) -> dict[str, Any]:
    """The `precision` entry of metadata.json's training_config."""
    return {
        "autocast_dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "grad_scaler": bool(scaler is not None and scaler.is_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "bf16_native": bf16_native(device) if device.type == "cuda" else None,
    }


def non_finite_loss_message(
    loss: float, step: int, lr: float, teacher_dtype: torch.dtype | None, amp_dtype: torch.dtype | None
) -> str:
    """What to say when the loss is NaN/inf: an fp16 teacher (or fp16 autocast) overflowing its range
    (65504) is the likely cause before a too-high learning rate is."""
    if teacher_dtype == torch.float16:
        return (
            f"loss became {loss} at step {step}: the teacher runs in float16, whose range (up to 65504) its "
            "activations or logits most likely overflowed; pass --teacher-dtype bfloat16 (GPUs without bf16: "
            "--teacher-dtype float32 or --teacher-quantization 8bit); nothing was saved from this run"
        )
    fp16 = " (the student runs under float16 autocast on this GPU)" if amp_dtype == torch.float16 else ""
    return (
        f"loss became {loss} at step {step}{fp16}; lower --lr (now {lr:g}) or raise --warmup-steps; "
        "nothing was saved from this run"
    )
