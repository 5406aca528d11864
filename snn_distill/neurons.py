"""Spiking neurons: surrogate-gradient spike functions and multi-step LIF dynamics.

Dynamics (identical to snnTorch ``Leaky(beta=decay, threshold=θ, reset_mechanism="subtract")``)::

    u[t] = decay * u[t-1] + I[t] - θ * s[t-1]      u[-1] = 0, s[-1] = 0
    s[t] = H(u[t] - θ)                              H(x) = 1 if x > 0 else 0

The reset uses the *previous* step's spike (snnTorch's delayed reset) and carries no gradient
(snnTorch detaches it, as SpikingJelly's ``detach_reset=True`` does). The backward pass replaces
dH/dx by a smooth surrogate derivative, which gives the reverse recurrence used by the fused kernel::

    g_u[t] = g_s[t] * sg[t] + decay * g_u[t+1],     sg[t] = surrogate'(u[t] - θ),  dL/dI[t] = g_u[t]

Everything here is stateless: membrane state lives only inside one call, and the statistics a
`LIF` module records are attributes of that module instance.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .config import LIF_KERNELS

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SLOPES",
    "LIF",
    "LIF_KERNELS",
    "LIFMultiStep",
    "TernaryLIF",
    "LIFMultiStepCompiled",
    "SURROGATES",
    "ArctanSpike",
    "FastSigmoidSpike",
    "SigmoidSpike",
    "TriangularSpike",
    "calibrate_threshold",
    "lif_dynamics",
    "lif_inference",
    "lif_margin",
    "lif_multistep",
    "lif_multistep_loop",
    "spike",
    "surrogate_derivative",
]

# A rate floor lowers a quiet channel's threshold by this log-step per optimizer step, at the peak
# learning rate (about 5 %: a silent channel wakes within tens of steps, a firing one is untouched).
FLOOR_STEP = 0.05

# Each default makes the surrogate derivative peak at exactly 1 at x = 0, so switching surrogates
# does not silently rescale gradients.
DEFAULT_SLOPES: dict[str, float] = {
    "sigmoid": 4.0,
    "fast_sigmoid": 4.0,
    "triangular": 1.0,
    "arctan": 2.0,
}


# --- surrogate derivatives ------------------------------------------------------------------------
# Each `_d_*` can write into `out` (which may be x itself) so the fused LIF turns x into sg in place,
# without temporaries; with out=None every op returns a new tensor (functional code, which the
# compiled LIF needs: inductor keeps in-place updates of temporaries as extra stores). The op sequence
# is the same either way, so the fused kernel and the per-step surrogate backward produce
# bit-identical values.


def _d_sigmoid(x: Tensor, k: float, out: Tensor | None = None) -> Tensor:
    y = torch.mul(x, k, out=out)
    y = torch.sigmoid(y, out=out)
    y = torch.addcmul(y, y, y, value=-1.0, out=out)  # s - s*s == s * (1 - s), one pass instead of two
    return torch.mul(y, k, out=out)


def _d_fast_sigmoid(x: Tensor, k: float, out: Tensor | None = None) -> Tensor:
    y = torch.abs(x, out=out)
    y = torch.add(x.new_ones(()), y, alpha=k, out=out)  # 1 + k|x|
    return torch.pow(y, -2, out=out)


def _d_triangular(x: Tensor, k: float, out: Tensor | None = None) -> Tensor:
    y = torch.abs(x, out=out)
    y = torch.sub(x.new_ones(()), y, alpha=k, out=out)  # 1 - k|x|
    return torch.clamp_min(y, 0.0, out=out)


def _d_arctan(x: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    c = math.pi / 2.0 * alpha
    one = x.new_ones(())  # 0-dim, broadcast: lets addcmul add the constant without a ones tensor
    y = torch.addcmul(one, x, x, value=c * c, out=out)  # 1 + (c x)^2 in one pass
    y = torch.reciprocal(y, out=out)
    if alpha != 2.0:  # alpha / 2 == 1 at the default: skip a pass
        y = torch.mul(y, alpha / 2.0, out=out)
    return y


_DERIVATIVES = {
    "sigmoid": _d_sigmoid,
    "fast_sigmoid": _d_fast_sigmoid,
    "triangular": _d_triangular,
    "arctan": _d_arctan,
}


def _resolve(name: str, slope: float | None) -> float:
    """Validate a surrogate name and return the slope to use (its default when `slope` is None)."""
    if name not in _DERIVATIVES:
        raise ValueError(f"unknown surrogate {name!r}; valid names: {', '.join(_DERIVATIVES)}")
    if slope is None:
        return DEFAULT_SLOPES[name]
    slope = float(slope)
    if not slope > 0.0:
        raise ValueError(f"surrogate slope must be positive, got {slope}")
    return slope


def surrogate_derivative(name: str, x: Tensor, slope: float | None = None) -> Tensor:
    """Analytic surrogate derivative at x = u - threshold; x: any shape -> same shape and dtype."""
    k = _resolve(name, slope)
    return _DERIVATIVES[name](x, k)


def _heaviside(x: Tensor, out: Tensor | None = None) -> Tensor:
    # strict '>' as snnTorch: a membrane exactly at threshold (x == 0) does not fire. One pass
    # straight to x.dtype, unlike (x > 0).to(x.dtype) which goes through a bool temporary.
    return torch.heaviside(x, x.new_zeros(()), out=out)


def _spike_forward(ctx, x: Tensor, name: str, slope: float | None) -> Tensor:
    ctx.slope = _resolve(name, slope)
    ctx.save_for_backward(x)
    return _heaviside(x)


def _spike_backward(ctx, grad: Tensor, name: str) -> tuple[Tensor, None]:
    (x,) = ctx.saved_tensors
    return grad * _DERIVATIVES[name](x, ctx.slope), None


class SigmoidSpike(torch.autograd.Function):
    """Spike with sigmoid surrogate: d/dx σ(kx) = k σ(kx)(1 - σ(kx)); k = slope, default 4.0.

    k sets the steepness; the peak derivative is k/4 (1 at the default). Same as snnTorch
    ``surrogate.sigmoid(slope=k)``. `apply(x, slope)`: x [...] -> spikes [...].
    """

    @staticmethod
    def forward(ctx, x: Tensor, slope: float | None = None) -> Tensor:
        return _spike_forward(ctx, x, "sigmoid", slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _spike_backward(ctx, grad, "sigmoid")


class FastSigmoidSpike(torch.autograd.Function):
    """Spike with fast-sigmoid surrogate: 1 / (1 + k|x|)^2, the derivative of x / (1 + k|x|).

    k = slope (default 4.0) sets the steepness; the peak derivative is always 1. Same as snnTorch
    ``surrogate.fast_sigmoid(slope=k)``. `apply(x, slope)`: x [...] -> spikes [...].
    """

    @staticmethod
    def forward(ctx, x: Tensor, slope: float | None = None) -> Tensor:
        return _spike_forward(ctx, x, "fast_sigmoid", slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _spike_backward(ctx, grad, "fast_sigmoid")


class TriangularSpike(torch.autograd.Function):
    """Spike with triangular surrogate: max(0, 1 - k|x|); k = slope, default 1.0.

    k is the inverse half-width: the gradient is nonzero only for |x| < 1/k and peaks at 1.
    Not comparable to snnTorch ``surrogate.triangular`` (a different, sign-flipping function).
    `apply(x, slope)`: x [...] -> spikes [...].
    """

    @staticmethod
    def forward(ctx, x: Tensor, slope: float | None = None) -> Tensor:
        return _spike_forward(ctx, x, "triangular", slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _spike_backward(ctx, grad, "triangular")


class ArctanSpike(torch.autograd.Function):
    """Spike with arctan surrogate: (α/2) / (1 + (π/2 · α · x)^2); α = slope, default 2.0.

    The derivative of arctan(π/2 · α · x) / π; α sets both width and peak (α/2, 1 at the default).
    Same as snnTorch ``surrogate.atan(alpha=α)``. `apply(x, slope)`: x [...] -> spikes [...].
    """

    @staticmethod
    def forward(ctx, x: Tensor, slope: float | None = None) -> Tensor:
        return _spike_forward(ctx, x, "arctan", slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _spike_backward(ctx, grad, "arctan")


SURROGATES: dict[str, type[torch.autograd.Function]] = {
    "sigmoid": SigmoidSpike,
    "fast_sigmoid": FastSigmoidSpike,
    "triangular": TriangularSpike,
    "arctan": ArctanSpike,
}


def spike(x: Tensor, surrogate: str = "sigmoid", slope: float | None = None) -> Tensor:
    """Heaviside spike of x = u - threshold with a surrogate gradient; x: [...] -> {0, 1} [...]."""
    _resolve(surrogate, slope)
    return SURROGATES[surrogate].apply(x, slope)


# --- multi-step LIF -------------------------------------------------------------------------------


def _check_current(current: Tensor) -> None:
    if current.dim() < 1 or current.shape[0] < 1:
        raise ValueError(f"current must be [T, ...] with T >= 1, got shape {tuple(current.shape)}")


def lif_dynamics(
    current: Tensor, decay: float | Tensor, threshold: float | Tensor, fire: Callable[[Tensor], Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """The LIF dynamics, one timestep at a time: current [T, ...] -> yields (u[t] - θ, s[t]), each [...].

    The one written-out copy of the recurrence (the fused kernel `_lif_forward` is its in-place
    version, tested bit-identical). `fire(u - θ)` makes the spike: a surrogate-gradient Function
    for training, a plain comparison for inference and export (ONNX has no Heaviside op). decay and
    threshold are floats or tensors broadcasting over the last (channel) dim. T is a static shape,
    so the loop unrolls when traced: no data-dependent Python control flow.
    """
    u = torch.zeros_like(current[0])
    s = torch.zeros_like(u)
    # unbind: one backward node stacking all T grads; indexing current[t] would materialise a
    # full-size zero gradient per step (O(T^2) backward work)
    for i_t in current.unbind(0):
        u = decay * u + i_t - threshold * s.detach()
        x = u - threshold
        s = fire(x)
        yield x, s


def _fire_inference(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def lif_multistep_loop(
    current: Tensor,
    *,
    decay: float | Tensor,
    threshold: float | Tensor,
    surrogate: str = "sigmoid",
    slope: float | None = None,
) -> Tensor:
    """Reference LIF: one autograd op per step and term. current [T, ...] -> spikes [T, ...].

    decay/threshold may be tensors (per channel, broadcast over the last dim) that require grad:
    autograd then gives their gradients (learnable leak and threshold, as PLIF).
    """
    k = _resolve(surrogate, slope)
    _check_current(current)
    fn = SURROGATES[surrogate]
    return torch.stack([s for _, s in lif_dynamics(current, decay, threshold, lambda x: fn.apply(x, k))])


def lif_inference(current: Tensor, decay: float | Tensor, threshold: float | Tensor) -> Tensor:
    """No-autograd LIF that torch.export/ONNX can trace: current [T, ...] -> spikes [T, ...]."""
    return torch.stack([s for _, s in lif_dynamics(current, decay, threshold, _fire_inference)])


def lif_margin(current: Tensor, decay: float | Tensor, threshold: float | Tensor) -> tuple[Tensor, Tensor]:
    """`lif_inference` that also reports how close any neuron came to flipping, in the same pass.

    current [T, N, ..., F] -> (spikes [T, N, ..., F], smallest |u - θ| over timesteps and F [N, ...]);
    export verification uses the margin to excuse positions where float rounding legitimately flips a
    spike.
    """
    spikes, best = [], None
    for x, s in lif_dynamics(current, decay, threshold, _fire_inference):
        m = x.abs().amin(-1)
        best = m if best is None else torch.minimum(best, m)
        spikes.append(s)
    return torch.stack(spikes), best


def calibrate_threshold(
    current: Tensor, decay: float | Tensor, target_rate: float, lo: float = 1e-2, hi: float = 1e2, iters: int = 12
) -> Tensor:
    """Per-channel threshold [F] at which each channel of current [T, N..., F] fires at `target_rate`.

    Bisection in log space (the rate falls monotonically as the threshold rises); a channel that
    cannot reach the rate even at `lo` gets `lo`. Data-dependent initialisation, as Glow's ActNorm:
    it starts every neuron firing, whatever the scale of its input current. 12 halvings leave a
    bracket 0.2 % wide: more would park θ within float noise of a membrane value of the calibration
    batch, and a token seen there again would then flip between equal computations (full pass vs
    cached decoding) on rounding alone.
    """
    f = current.shape[-1]
    flat = current.detach().float().reshape(current.shape[0], -1, f)  # [T, N, F]
    log_lo = torch.full((f,), math.log(lo), device=current.device)
    log_hi = torch.full((f,), math.log(hi), device=current.device)
    for _ in range(iters):
        mid = (log_lo + log_hi) / 2
        rate = lif_inference(flat, decay, mid.exp()).mean((0, 1))
        too_many = rate > target_rate  # raise the threshold
        log_lo = torch.where(too_many, mid, log_lo)
        log_hi = torch.where(too_many, log_hi, mid)
    return ((log_lo + log_hi) / 2).exp()


def _lif_forward(
    current: Tensor, decay: float, threshold: float | Tensor, surrogate: str, slope: float, save_sg: bool
) -> tuple[Tensor, Tensor | None]:
    """In-place LIF recurrence: current [T, ...] -> (spikes [T, ...], sg [T, ...] or None).

    The in-place version of `lif_dynamics`: the same elementwise ops in the same order, so spikes
    and surrogate values are bit-identical to `lif_multistep_loop`. threshold: a float or a
    per-channel tensor that needs no gradient.
    """
    T = current.shape[0]
    spikes = torch.empty(current.shape, dtype=current.dtype, device=current.device)
    sg = torch.empty_like(spikes) if save_sg else None
    u = torch.zeros_like(spikes[0])
    x = torch.empty_like(u) if sg is None else None
    deriv = _DERIVATIVES[surrogate]
    # The loop computes u - (θ*s) with θ*s rounded to the tensor dtype; using that rounded θ as
    # `alpha` makes the single fused op give the same bits (s is exactly 0 or 1), also in bf16.
    # A per-channel θ tensor: θ*s is exact too, so addcmul's u - s*θ matches the loop's bits.
    per_channel = isinstance(threshold, Tensor)
    theta_q = threshold.to(current.dtype) if per_channel else torch.tensor(threshold, dtype=current.dtype).item()
    for t in range(T):
        u.mul_(decay).add_(current[t])
        if t > 0:
            if per_channel:
                u.addcmul_(spikes[t - 1], theta_q, value=-1.0)
            else:
                u.sub_(spikes[t - 1], alpha=theta_q)
        xt = x if sg is None else sg[t]  # x = u - θ, turned into sg[t] in place
        torch.sub(u, threshold, out=xt)
        _heaviside(xt, out=spikes[t])
        if sg is not None:
            # per step, not once over [T, ...]: vectorised and scalar-tail kernels (Sleef vs libm
            # exp, FMA contraction) can differ in the last bit, so the surrogate must see the
            # same [...] layout as in the per-step loop to give bit-identical gradients
            deriv(xt, slope, out=xt)
    return spikes, sg


def _graph_is_kept() -> bool:
    """True when the running backward keeps the graph (retain_graph/create_graph), or if unknown."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):  # private API: be safe if it moves or is unavailable
        return True


class LIFMultiStep(torch.autograd.Function):
    """Fused multi-step LIF: `apply(current, decay, threshold, surrogate, slope)`.

    current [T, ...] -> spikes [T, ...]. Saves only sg[t] = surrogate'(u[t] - θ) (one [T, ...]
    tensor of the input dtype) and runs the reverse recurrence analytically in backward, reusing
    that tensor as the returned gradient unless the graph is retained. Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx, current: Tensor, decay: float, threshold: float | Tensor, surrogate: str, slope: float | None
    ) -> Tensor:
        k = _resolve(surrogate, slope)
        _check_current(current)
        save = ctx.needs_input_grad[0]
        spikes, sg = _lif_forward(current, decay, threshold, surrogate, k, save_sg=save)
        if sg is not None:
            ctx.save_for_backward(sg)
        ctx.decay = decay
        return spikes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes: Tensor) -> tuple[Tensor, None, None, None, None]:
        (sg,) = ctx.saved_tensors
        T = sg.shape[0]
        # Unless the graph is retained, autograd frees sg right after this call, so the gradient is
        # written over it (elementwise, each sg value read before its slot is overwritten). Saves a
        # fresh [T, ...] buffer, whose first-touch page faults cost more than the arithmetic on CPU.
        grad = torch.empty_like(sg) if _graph_is_kept() else sg
        torch.mul(grad_spikes, sg, out=grad)  # the spike branch of g_u, all T at once
        if T > 1:
            carry = torch.empty_like(sg[0])
        for t in range(T - 2, -1, -1):
            # round decay * g_u[t+1] on its own, then add: the same rounding as autograd summing the
            # two branches of the per-step loop (add(alpha=) fuses into an FMA on CPU: last bit differs)
            torch.mul(grad[t + 1], ctx.decay, out=carry)
            grad[t].add_(carry)
        return grad, None, None, None, None


# --- compiled multi-step LIF ----------------------------------------------------------------------
# The eager kernels above make several passes over [N] per timestep (memory-bound on CPU).
# torch.compile (inductor: C++ on CPU, Triton on CUDA) turns the whole T-step recurrence into one
# loop over the elements that keeps u, s and the running gradient in registers: forward reads the
# current once and writes the spikes once; backward recomputes the membrane from the saved current
# and reads the spike gradients once. T stays static (the loop unrolls); the element dims are
# dynamic and the leak is a 0-dim tensor, so every layer width, batch shape and leak reuses one
# compile per (T, surrogate, slope).

_COMPILE_DTYPES = (torch.float32, torch.float64)  # inductor computes fp16/bf16 in fp32: spikes would differ
_COMPILE_ERROR = "could not compile the multi-step LIF ({}); use lif_kernel='fused' (--snn-lif-kernel fused)"
# a few graphs per run; tests and sweeps over T, surrogates and leaks need more than dynamo's default 8
_RECOMPILE_LIMIT = 64
# "auto" compiles from this many elements of current: below it a call costs ~0.1 ms more than the
# fused kernel (guards, dispatch) and the one-off compile (seconds) would never pay for itself
AUTO_MIN_ELEMENTS = 1 << 18


def _lif_grad_math(
    current: Tensor, grad_spikes: Tensor, decay: Tensor, theta: Tensor, surrogate: str, slope: float
) -> Tensor:
    """The fused backward in functional form: current, grad_spikes [T, ...] -> dL/dcurrent [T, ...].

    Recomputes u - θ with `lif_dynamics`, then g_u[t] = g_s[t] * sg[t] + decay * g_u[t+1].
    """
    deriv = _DERIVATIVES[surrogate]
    sg = [deriv(x, slope) for x, _ in lif_dynamics(current, decay, theta, _fire_inference)]
    g = grad_spikes[-1] * sg[-1]
    grads = [g]
    for t in range(len(sg) - 2, -1, -1):
        g = grad_spikes[t] * sg[t] + decay * g
        grads.append(g)
    return torch.stack(grads[::-1])


class _CompiledLIF:
    """The two compiled kernels, each compiled on first use, plus the fallback state.

    After a failed compilation `broken` holds the reason and the auto kernel uses the fused one
    from then on (one warning); an explicit lif_kernel="compiled" raises instead.
    """

    def __init__(self) -> None:
        self.broken: str | None = None
        self._fns: dict[tuple[str, str], Callable] = {}

    def call(self, name: str, fn: Callable, key: str, *args):
        """Run compiled `fn(*args)`; tensor args are [T, M, F] (M, F dynamic) or [M, F] / [F] / [] (all
        dims dynamic). `key` names what the graph is specialised on (T, surrogate, ...): one compiled
        function per (name, key), and one compile-time log line.
        """
        first = (name, key) not in self._fns
        if first:
            self._fns[(name, key)] = torch.compile(fn, fullgraph=True)
        for a in args:
            if isinstance(a, Tensor):
                for d in range(a.dim() - 2 if a.dim() == 3 else 0, a.dim()):
                    torch._dynamo.maybe_mark_dynamic(a, d)
        t0 = time.perf_counter()
        # no_grad: one graph for the forward (run inside autograd.Function, where grad is off) and
        # for no-grad calls; the limit: see _RECOMPILE_LIMIT
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            out = self._fns[(name, key)](*args)
        if first:
            secs = time.perf_counter() - t0
            log.info("LIF: compiled the %s kernel (%s) in %.1f s (paid once per run)", name, key, secs)
        return out

    def failed(self, e: Exception, strict: bool) -> None:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if strict:
            raise RuntimeError(_COMPILE_ERROR.format(reason)) from e
        if self.broken is None:
            self.broken = reason
            log.warning("LIF: torch.compile failed (%s); using the fused eager LIF kernel", reason)


_COMPILED = _CompiledLIF()  # one per process: each kernel compiles once per run


def _compiled_spikes(current: Tensor, decay: float, threshold: float | Tensor) -> tuple[Tensor, ...]:
    """Compiled `lif_inference`: current [T, ..., F] -> (spikes [T, ..., F], its [T, M, F] view, and
    `kernel_params`' θ [F] and decay [])."""
    f = current.shape[-1] if current.dim() > 1 else 1
    seq = current.reshape(current.shape[0], -1, f).contiguous()  # one layout: one graph
    theta, decay_t = kernel_params(current, decay, threshold)
    spikes = _COMPILED.call("spikes", lif_inference, f"T={current.shape[0]}", seq, decay_t, theta)
    return spikes.view(current.shape), seq, theta, decay_t


def kernel_params(current: Tensor, decay: float | Tensor, threshold: float | Tensor) -> tuple[Tensor, Tensor]:
    """θ and decay as tensors for a compiled kernel: (θ [F], decay [] or [F]), in the current's dtype
    (the same rounding as the loop's Python floats). θ is a copy: homeostasis updates the buffer in
    place before backward reads it."""
    f = current.shape[-1] if current.dim() > 1 else 1
    if isinstance(threshold, Tensor):
        theta = threshold.detach().to(current.device, current.dtype).expand(f).clone()
    else:
        theta = torch.full((f,), threshold, dtype=current.dtype, device=current.device)
    if isinstance(decay, Tensor):
        return theta, decay.detach().to(current.device, current.dtype)
    return theta, torch.tensor(decay, dtype=current.dtype, device=current.device)


class LIFMultiStepCompiled(torch.autograd.Function):
    """Compiled multi-step LIF: `apply(current, decay, threshold, surrogate, slope, strict)`.

    current [T, ...] (float32/64) -> spikes [T, ...]. Saves the input current (no copy when it is
    contiguous) and a [F] copy of θ; backward recomputes the membrane in the compiled
    `_lif_grad_math`. If that fails to compile, backward runs it eagerly (or raises when strict).
    Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx, current: Tensor, decay: float, threshold: float | Tensor, surrogate: str, slope: float, strict: bool
    ) -> Tensor:
        spikes, seq, theta, decay_t = _compiled_spikes(current, decay, threshold)
        ctx.save_for_backward(seq, theta, decay_t)
        ctx.args = (surrogate, slope, strict)
        return spikes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        seq, theta, decay = ctx.saved_tensors
        surrogate, slope, strict = ctx.args
        # contiguous: a broadcast gradient (e.g. of a sum over T) would otherwise compile its own graph
        args = (seq, grad_spikes.reshape(seq.shape).contiguous(), decay, theta, surrogate, slope)
        key = f"T={seq.shape[0]}, {surrogate} surrogate, slope {slope}"
        grad = None
        if strict or not _COMPILED.broken:
            try:
                grad = _COMPILED.call("grad", _lif_grad_math, key, *args)
            except Exception as e:  # noqa: BLE001 (inductor raises many types: no compiler, unsupported op, ...)
                _COMPILED.failed(e, strict)
        if grad is None:  # the same math, eager
            grad = _lif_grad_math(*args)
        return grad.view(grad_spikes.shape), None, None, None, None, None


def _not_compilable(current: Tensor, threshold: float | Tensor) -> str | None:
    """Why the compiled kernel cannot take this call, or None."""
    if current.dtype not in _COMPILE_DTYPES:
        return f"it needs a float32/float64 current, got {current.dtype}"
    if isinstance(threshold, Tensor) and (threshold.dim() > 1 or threshold.numel() not in (1, current.shape[-1])):
        return f"it needs a scalar or per-channel [F] threshold, got shape {tuple(threshold.shape)}"
    return None


def check_kernel(kernel: str) -> None:
    """Raise ValueError unless `kernel` is one of LIF_KERNELS."""
    if kernel not in LIF_KERNELS:
        raise ValueError(f"unknown LIF kernel {kernel!r}; valid kernels: {', '.join(LIF_KERNELS)}")


def use_compiled(current: Tensor, threshold: float | Tensor, strict: bool, work: int) -> bool:
    """Whether a LIF call with `work` neuron updates takes a compiled kernel. strict (an explicit
    lif_kernel="compiled") raises when it cannot; auto declines small calls and, after one failed
    compile, every call."""
    reason = _not_compilable(current, threshold)
    if strict and reason:
        raise ValueError(f"lif_kernel='compiled' cannot run this LIF: {reason}; use lif_kernel='fused'")
    if not strict and (reason or _COMPILED.broken or work < AUTO_MIN_ELEMENTS):
        return False
    # inside an outer torch.compile the eager kernel is traced and fused there
    return not torch.compiler.is_compiling()


def _run_compiled(
    current: Tensor, decay: float, threshold: float | Tensor, surrogate: str, slope: float, strict: bool
) -> Tensor | None:
    """Spikes from the compiled kernel, or None where auto (not strict) should use the fused kernel."""
    if not use_compiled(current, threshold, strict, current.numel()):
        return None
    try:
        if torch.is_grad_enabled() and current.requires_grad:
            return LIFMultiStepCompiled.apply(current, decay, threshold, surrogate, slope, strict)
        return _compiled_spikes(current, decay, threshold)[0]
    except Exception as e:  # noqa: BLE001 (inductor raises many types: no compiler, unsupported op, ...)
        _COMPILED.failed(e, strict)
        return None


def lif_multistep(
    current: Tensor,
    *,
    decay: float | Tensor,
    threshold: float | Tensor,
    surrogate: str = "sigmoid",
    slope: float | None = None,
    fused: bool = True,
    kernel: str = "auto",
) -> Tensor:
    """LIF over the leading time axis: current [T, ...] -> spikes [T, ...] (same dtype, 0/1).

    kernel (one of `LIF_KERNELS`): "compiled" is `LIFMultiStepCompiled` (torch.compile, one loop over
    the elements; raises if it cannot compile); "fused" is `LIFMultiStep` (eager, in place, saves one
    tensor); "loop" the per-step reference; "auto" is compiled for a float32/64 current of at least
    `AUTO_MIN_ELEMENTS` elements when it compiles, else fused (one warning after a failed compile).
    fused=False means the loop, whatever the kernel. Without grad the fast kernels only run the
    recurrence and keep nothing for backward. A learnable (grad-requiring) threshold or a tensor
    decay takes the reference loop, whose autograd gives their gradients.
    """
    k = _resolve(surrogate, slope)
    _check_current(current)
    check_kernel(kernel)
    learnable = isinstance(decay, Tensor) or (isinstance(threshold, Tensor) and threshold.requires_grad)
    if not fused or kernel == "loop" or (learnable and torch.is_grad_enabled()):
        return lif_multistep_loop(current, decay=decay, threshold=threshold, surrogate=surrogate, slope=k)
    if isinstance(decay, Tensor):  # no grad: plain ops
        return lif_inference(current, decay, threshold)
    if kernel != "fused":
        spikes = _run_compiled(current, decay, threshold, surrogate, k, strict=kernel == "compiled")
        if spikes is not None:
            return spikes
    if torch.is_grad_enabled() and current.requires_grad:
        return LIFMultiStep.apply(current, decay, threshold, surrogate, k)
    return _lif_forward(current, decay, threshold, surrogate, k, save_sg=False)[0]


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return math.log(p / (1.0 - p))


class LIF(torch.nn.Module):
    """LIF layer over T timesteps folded into the batch: x [T*B, ..., F] -> spikes [T*B, ..., F].

    Row block t of x (rows t*B .. t*B+B-1) is the input current at timestep t. After each forward
    `last_spike_rate` holds the mean spike value (0-dim float32, detached); with `record_stats`
    it also accumulates `fire_counts` (float64 [F], spikes per neuron) and `num_observations`
    (rows of F neurons seen, i.e. timesteps x tokens) until `reset_stats()`; with `record_margin`,
    a forward without grad also leaves `lif_margin`'s margin of its input in `last_margin`; with
    `keep_counts`, a forward with grad leaves its spikes per channel [F] (float32, in the autograd
    graph) in `last_counts` and its token count in `last_tokens` (an energy budget's penalty; its
    gradient flows only through the spikes that fired, never into a neuron's silent inputs).

    With `channels`, the threshold is per channel (a buffer, or a parameter with
    `learn_threshold`), and `learn_decay` makes the leak a per-channel parameter (decay = sigmoid(w),
    as PLIF). With `target_rate`, the first training forward sets each channel's threshold so that
    it fires at that rate on its input (`calibrate_threshold`), once: the `calibrated` flag is saved
    with the weights. With `homeostasis` = eta > 0, every later training forward nudges each channel's
    threshold toward that rate, theta *= exp(eta * (rate - target_rate)) (homeostatic threshold
    adaptation: no channel stays silent or saturated as the weights move); frozen in eval mode.
    With `rate_floor` > 0, training forwards count each channel's spikes, and `apply_rate_floor()`
    (the trainer calls it after each optimizer step) lowers by exp(-floor_step) the threshold of every
    channel that fired below that rate over the step: a one-sided homeostasis that only revives quiet
    channels, so it does not fight an energy budget. The trainer anneals `floor_step` with the
    learning rate.

    The recurrence always runs in float32, also under autocast: bf16 rounding of the membrane and
    threshold would make training spikes differ from the float32 serving spikes.
    """

    def __init__(
        self,
        num_timesteps: int,
        decay: float,
        threshold: float,
        surrogate: str = "sigmoid",
        slope: float | None = None,
        fused: bool = True,
        *,
        kernel: str = "auto",
        channels: int | None = None,
        learn_threshold: bool = False,
        learn_decay: bool = False,
        target_rate: float | None = None,
        homeostasis: float = 0.0,
        rate_floor: float = 0.0,
        count: bool = False,
    ) -> None:
        super().__init__()
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        _resolve(surrogate, slope)
        if channels is None and (learn_threshold or learn_decay or target_rate is not None):
            raise ValueError("a learnable or calibrated LIF needs `channels` (its feature count)")
        self.num_timesteps = int(num_timesteps)
        self.count = bool(count)  # count-coded: x is one current per token, the output its spike counts
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.surrogate = surrogate
        self.slope = None if slope is None else float(slope)
        self.fused = bool(fused)
        check_kernel(kernel)
        self.kernel = kernel  # lif_multistep's kernel (fused=False: the loop, whatever this says)
        self.target_rate = target_rate
        if homeostasis < 0 or (homeostasis > 0 and target_rate is None):
            raise ValueError("homeostasis needs a target_rate and a rate >= 0")
        self.homeostasis = float(homeostasis)
        if not 0.0 <= rate_floor < 1.0 or (rate_floor > 0 and channels is None):
            raise ValueError(f"rate_floor must be in [0, 1) and needs `channels`, got {rate_floor}")
        self.rate_floor = float(rate_floor)
        self.floor_step = FLOOR_STEP
        self._floor_spikes: Tensor | None = None  # [F] spikes since the last apply_rate_floor()
        self._floor_rows = 0  # rows of F neurons (tokens x timesteps) behind them
        self.per_channel = channels is not None
        if self.per_channel:
            theta = torch.full((int(channels),), self.threshold)
            if learn_threshold:
                self.theta = torch.nn.Parameter(theta)
            else:
                self.register_buffer("theta", theta)
            self.register_buffer("calibrated", torch.tensor(target_rate is None))
        self.decay_logit = torch.nn.Parameter(torch.full((int(channels),), _logit(self.decay))) if learn_decay else None
        self.record_stats = False
        self.record_margin = False
        self.keep_counts = False
        self.last_spike_rate: Tensor | None = None
        self.last_counts: Tensor | None = None  # with keep_counts: spikes per channel [F], in the graph
        self.last_tokens = 0
        self.last_margin: Tensor | None = None
        self.fire_counts: Tensor | None = None  # None until the first recorded forward
        self.num_observations = 0

    def reset_stats(self) -> None:
        """Forget accumulated `fire_counts` / `num_observations`."""
        self.fire_counts = None
        self.num_observations = 0

    def threshold_value(self) -> float | Tensor:
        """The threshold in use: a float, or [F] (kept above 1e-3 while it learns)."""
        if not self.per_channel:
            return self.threshold
        return self.theta.clamp_min(1e-3) if self.theta.requires_grad else self.theta

    def decay_value(self) -> float | Tensor:
        """The membrane leak in use: a float, or [F] with `learn_decay`."""
        return self.decay if self.decay_logit is None else torch.sigmoid(self.decay_logit)

    def forward(self, x: Tensor) -> Tensor:
        """x [T*B, ...] -> spikes [T*B, ...] of the same dtype; count-coded: x [B, ...] -> counts
        [B, ...] in 0..T (counting.py)."""
        from .counting import _constant

        if x.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float()).to(x.dtype)
        T = self.num_timesteps
        if self.count:
            seq = _constant(x, T)  # the token's current at each of the T steps (a view)
        else:
            if not torch.compiler.is_compiling() and x.shape[0] % T != 0:
                raise ValueError(f"leading dim {x.shape[0]} is not a multiple of num_timesteps={T}")
            seq = x.reshape(T, -1, *x.shape[1:])
        # not while backward recomputes a checkpointed forward: that must see the same thresholds
        adapting = self.training and torch._C._current_graph_task_id() == -1
        if self.per_channel and self.training and not bool(self.calibrated):
            self._calibrate(seq)
        decay, threshold = self.decay_value(), self.threshold_value()
        if self.count:
            out, steps = self._counts(x, decay, threshold), T
        else:
            out, steps = self._spikes(seq, decay, threshold).view(x.shape), 1
        if self.homeostasis and adapting:
            self._adapt(out.detach() / steps)
        if self.rate_floor and adapting and not torch.compiler.is_exporting():
            # applied after the optimizer step: this forward's thresholds are saved for its backward
            counts = out.detach().reshape(-1, out.shape[-1]).sum(0, dtype=torch.float32)
            self._floor_spikes = counts if self._floor_spikes is None else self._floor_spikes + counts
            self._floor_rows += out.numel() // out.shape[-1] * steps
        # while exporting, x is a fake tensor and torch.export warns about tensor attributes
        if not torch.compiler.is_exporting():
            self._record(out.detach(), steps=steps)
            if self.keep_counts and torch.is_grad_enabled():
                feats = out.shape[-1]
                # only the spikes that happened carry the budget's gradient, as an L1 penalty on a
                # ReLU's output: through the surrogate, every silent neuron would be pushed further
                # below its threshold, until no input could ever make it fire again (a dead neuron)
                fired = out * (out.detach() != 0)
                self.last_counts = fired.reshape(-1, feats).sum(0, dtype=torch.float32)
                self.last_tokens = out.numel() // feats // (1 if self.count else T)
        return out

    def _spikes(self, seq: Tensor, decay: float | Tensor, threshold: float | Tensor) -> Tensor:
        """Temporal coding: currents [T, B, ..., F] -> spikes [T, B, ..., F]."""
        if torch.is_grad_enabled() and seq.requires_grad:
            return lif_multistep(
                seq,
                decay=decay,
                threshold=threshold,
                surrogate=self.surrogate,
                slope=self.slope,
                fused=self.fused,
                kernel=self.kernel,
            )
        if self.record_margin and not torch.compiler.is_exporting():
            spikes, self.last_margin = lif_margin(seq, decay, threshold)
            return spikes
        # plain ops only: the autograd.Function and the in-place kernel do not export
        return lif_inference(seq, decay, threshold)

    def _counts(self, x: Tensor, decay: float | Tensor, threshold: float | Tensor) -> Tensor:
        """Count coding: currents [B, ..., F] -> spike counts [B, ..., F] in 0..T."""
        from .counting import count_spikes, count_spikes_margin, lif_counts

        T = self.num_timesteps
        learnable = any(isinstance(p, Tensor) and p.requires_grad for p in (decay, threshold))
        if torch.is_grad_enabled() and (x.requires_grad or learnable):
            return lif_counts(
                x,
                decay=decay,
                threshold=threshold,
                timesteps=T,
                surrogate=self.surrogate,
                slope=self.slope,
                kernel=self.kernel if self.fused else "loop",
            )
        if self.record_margin and not torch.compiler.is_exporting():
            counts, self.last_margin = count_spikes_margin(x, decay, threshold, T)
            return counts
        return count_spikes(x, decay, threshold, T)

    @torch.no_grad()
    def _calibrate(self, seq: Tensor) -> None:
        decay = self.decay_value()
        theta = calibrate_threshold(seq, decay.detach() if isinstance(decay, Tensor) else decay, self.target_rate)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(theta)  # every rank must start from the same thresholds
            theta /= torch.distributed.get_world_size()
        self.theta.copy_(theta)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def _adapt(self, spikes: Tensor) -> None:
        rate = spikes.reshape(-1, spikes.shape[-1]).mean(0, dtype=torch.float32)  # [F]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(rate)  # every rank applies the same update
            rate /= torch.distributed.get_world_size()
        self.theta.mul_(torch.exp(self.homeostasis * (rate - self.target_rate)).to(self.theta.dtype))

    @torch.no_grad()
    def apply_rate_floor(self) -> None:
        """Lower the threshold of each channel that fired below `rate_floor` since the last call (over
        every rank), by exp(-floor_step), kept above 1e-3 as a learned one; then start counting anew."""
        if self._floor_spikes is None:
            return
        sums = torch.cat([self._floor_spikes, self._floor_spikes.new_tensor([self._floor_rows])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # the rate over the global batch; every rank applies it
        quiet = sums[:-1] < self.rate_floor * sums[-1]
        self.theta.mul_(torch.exp(-self.floor_step * quiet.to(self.theta.dtype))).clamp_min_(1e-3)
        self._floor_spikes, self._floor_rows = None, 0

    def _record(self, spikes: Tensor, steps: int = 1) -> None:
        """spikes: 0/1 per row, or (steps = T) spike counts of T timesteps per row."""
        self.last_spike_rate = spikes.mean(dtype=torch.float32) / steps
        if self.record_stats:
            feats = spikes.shape[-1]
            counts = spikes.reshape(-1, feats).sum(0, dtype=torch.float64)
            # out-of-place add: works whether either side was made under inference_mode
            self.fire_counts = counts if self.fire_counts is None else self.fire_counts.to(counts) + counts
            self.num_observations += spikes.numel() // feats * steps

    def extra_repr(self) -> str:
        slope = DEFAULT_SLOPES[self.surrogate] if self.slope is None else self.slope
        extra = ""
        if self.per_channel:
            learn = [
                n
                for n, p in (("threshold", self.theta), ("decay", self.decay_logit))
                if p is not None and p.requires_grad
            ]
            extra = (
                f", per_channel=True, learnable={learn}, target_rate={self.target_rate}, homeostasis={self.homeostasis}"
                f", rate_floor={self.rate_floor}"
            )
        return (
            f"num_timesteps={self.num_timesteps}, decay={self.decay}, threshold={self.threshold}, "
            f"surrogate={self.surrogate}, slope={slope}, fused={self.fused}{extra}"
        )


class TernaryLIF(LIF):
    """Signed spikes for a symmetric input (SpikeLM's ternary spikes): x -> sign(x) * LIF(|x|).

    Spikes (or counts) in -T..T: the neuron fires on the magnitude of its current and the spike
    carries the current's sign, so a normalised input keeps its negative half. A ternary spike is
    still one accumulate (an add or a subtract) in the next weight matmul. Thresholds, rates and
    statistics are those of the magnitude.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.sign(x) * super().forward(x.abs())
