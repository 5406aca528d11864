"""The forward-KL chunk kernel of `losses.chunked_distill_loss`, fused: compiled, eager, or Liger Kernel.

Per chunk of c tokens the loss needs, over the [c, V] logits z = h W^T: the student's log-softmax
(teacher's too when it comes as raw logits), the KL per token and G = d(KL)/d(z/T) = p_s - p_t. Eager
PyTorch makes about seven passes over [c, V] for that (`losses._forward_kl_lean`); the `torch.compile`d
kernel here (inductor: C++/OpenMP on CPU, Triton on CUDA) reads z (and the teacher's row) two or three
times and writes G once.
The matmuls stay `torch.mm` in the caller.

Modes (`TrainConfig.fused_loss`, `--fused-loss`):
  eager    the plain PyTorch chunk kernel;
  compile  the compiled kernel; if compilation fails it logs one warning and runs eager from then on;
  liger    Liger Kernel's fused linear KL on CUDA (`pip install 'snn-distill[cuda]'`), full targets;
  auto     liger on CUDA when installed, else compile.
The first call of each compiled kernel pays the compile (seconds, logged once); the row count is marked
dynamic, so ragged last chunks and other batch sizes reuse it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time

import torch

from .config import FUSED_LOSSES

log = logging.getLogger(__name__)

FUSED_LOSS_MODES = FUSED_LOSSES
LIGER_HINT = "install Liger Kernel (CUDA only): pip install 'snn-distill[cuda]'"


@functools.cache
def liger_available() -> bool:
    """Whether Liger Kernel's fused linear KL (and so Triton) imports."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        from liger_kernel.transformers import LigerFusedLinearKLDivLoss  # noqa: F401
    except Exception as e:  # noqa: BLE001 (an old release, a broken Triton: use the compiled kernel)
        log.warning("fused loss: Liger Kernel is installed but unusable (%s); %s", e, LIGER_HINT)
        return False
    return True


def resolve_fused_loss(mode: str, device: torch.device | str) -> str:
    """The chunk kernel a run on `device` uses for `mode`: "liger", "compile" or "eager".

    Raises ValueError (with the fix) for an unknown mode, or "liger" asked for where it cannot run."""
    dev = torch.device(device).type
    if mode not in FUSED_LOSS_MODES:
        raise ValueError(f"--fused-loss must be one of {', '.join(FUSED_LOSS_MODES)}, got {mode!r}")
    if mode == "liger":
        if dev != "cuda":
            raise ValueError("--fused-loss liger runs on CUDA only; use --fused-loss auto (or compile) on CPU")
        if not liger_available():
            raise ValueError(f"--fused-loss liger: Liger Kernel is not installed; {LIGER_HINT}, or use auto")
        return "liger"
    if mode == "auto":
        return "liger" if dev == "cuda" and liger_available() else "compile"
    return mode


# ---------------------------------------------------------------- kernels (pure tensor code: compiled as is)
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _kl_full(z: torch.Tensor, t: torch.Tensor, inv_t: torch.Tensor, raw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """z [c, V] logits -> (kd [c] unscaled KL, G = p_s - p_t [c, V]). `t` [c, V] holds the teacher's
    log-probs, or its raw logits when `raw` (then its log-softmax at 1/inv_t happens here).

    Inductor makes this two row reductions per log-softmax (max, sum of exp) and one fused pass that
    writes G and sums the KL. G is returned, not copied over z: a copy_ into an input costs inductor a
    separate [c, V] copy pass."""
    s = z * inv_t
    lse = torch.logsumexp(s, 1, keepdim=True)
    t_logp = t.to(z.dtype)
    if raw:
        t_logp = t_logp * inv_t
        t_logp = t_logp - torch.logsumexp(t_logp, 1, keepdim=True)
    p_t = t_logp.exp()
    kd = (p_t * (t_logp - s + lse)).sum(1)
    return kd, torch.exp(s - lse) - p_t


def _kl_topk(
    z: torch.Tensor, idx: torch.Tensor, t_top: torch.Tensor, t_tail: torch.Tensor, inv_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k + tail targets (see `losses`): z [c, V] -> (kd [c], G [c, V] off the top k, that is
    p_s * (1 - tail_t / tail_s), and G's top-k values [c, k], which the caller scatters into it)."""
    s = z * inv_t
    lse = torch.logsumexp(s, 1, keepdim=True)
    s_top = s.gather(1, idx) - lse
    s_tail = log1mexp(torch.logsumexp(s_top, 1))
    t_top = t_top.to(z.dtype)
    t_tail = t_tail.to(z.dtype)
    p_top = t_top.exp()
    kd = (p_top * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    ratio = (t_tail - s_tail).exp()
    return kd, torch.exp(s - lse) * (1.0 - ratio)[:, None], s_top.exp() - p_top


class CompiledKL:
    """The compiled chunk kernels, each compiled on first use. After a failed compilation it logs one
    warning and `broken` holds the reason; the caller then runs the eager kernel."""

    def __init__(self) -> None:
        self.broken: str | None = None
        self._fns: dict[str, object] = {}
        self._ran: set[str] = set()

    def _call(self, name: str, fn, *args):
        t0 = time.perf_counter()  # before torch.compile: importing dynamo/inductor is part of the cost
        if name not in self._fns:
            self._fns[name] = torch.compile(fn, dynamic=False)
        for a in args:  # row count dynamic: ragged last chunks and other batch sizes reuse one compile
            if isinstance(a, torch.Tensor) and a.dim() >= 1:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        out = self._fns[name](*args)
        if name not in self._ran:
            self._ran.add(name)
            log.info(
                "fused loss: compiled the %s KL kernel in %.1f s (paid once per run)", name, time.perf_counter() - t0
            )
        return out

    def run(self, z: torch.Tensor, targets, temperature: float):
        """(kd [c] unscaled, G [c, V]) for logits z [c, V], or None when compiling failed."""
        if self.broken is not None:
            return None
        inv_t = torch.tensor(1.0 / temperature, dtype=z.dtype, device=z.device)  # a tensor: no recompile per T
        try:
            if targets.indices is None:
                name = "raw-logit" if targets.raw else "full"
                kd, g = self._call(name, _kl_full, z, targets.logprobs, inv_t, targets.raw)
            else:
                args = (z, targets.indices, targets.logprobs, tail_of(targets), inv_t)
                kd, g, top = self._call("top-k", _kl_topk, *args)
                g.scatter_(1, targets.indices, top)
        except Exception as e:  # noqa: BLE001 (inductor raises many types: no compiler, unsupported op, ...)
            self.broken = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("fused loss: torch.compile failed (%s); using the eager loss kernel", self.broken)
            return None
        return kd, g


def tail_of(targets) -> torch.Tensor:
    """The teacher's log tail mass [n] of top-k targets (stored, or 1 - sum of the top k)."""
    if targets.tail is not None:
        return targets.tail
    lp = targets.logprobs
    return log1mexp(torch.logsumexp(lp.to(torch.promote_types(lp.dtype, torch.float32)), dim=1))


COMPILED = CompiledKL()  # one per process: each kernel compiles once per run


def liger_forward_kl(
    hidden: torch.Tensor, weight: torch.Tensor, targets, tok_w: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * sum_i tok_w[i] KL_i through Liger's fused linear KL (autograd included), for full targets.

    Liger takes one weight for all rows, so tok_w must be 0 or one common value (as `losses.token_weights`
    makes): rows with 0 are passed as ignored, the common value scales the sum."""
    from liger_kernel.transformers import LigerFusedLinearKLDivLoss

    if targets.raw:
        probs = torch.softmax(targets.logprobs.float() / temperature, dim=-1)
    else:
        probs = targets.logprobs.float().exp()
    w = tok_w.float()
    scale = w.amax()
    torch._assert_async(((w == 0) | (w == scale)).all())  # checked on the device, without a sync
    labels = torch.where(w > 0, 0, -100).long()
    kl = LigerFusedLinearKLDivLoss(reduction="sum", ignore_index=-100, temperature=temperature)
    return kl(hidden, weight, probs, labels) * (scale * temperature**2)
