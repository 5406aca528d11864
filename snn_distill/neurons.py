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

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_SLOPES",
    "LIF",
    "LIFMultiStep",
    "SURROGATES",
    "ArctanSpike",
    "FastSigmoidSpike",
    "SigmoidSpike",
    "TriangularSpike",
    "lif_multistep",
    "lif_multistep_loop",
    "spike",
    "surrogate_derivative",
]

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
# without temporaries. The op sequence is the same with or without `out`, so the fused kernel and the
# per-step surrogate backward produce bit-identical values.


def _d_sigmoid(x: Tensor, k: float, out: Tensor | None = None) -> Tensor:
    out = torch.mul(x, k, out=out)
    out.sigmoid_()
    out.addcmul_(out, out, value=-1.0)  # s - s*s == s * (1 - s), one pass instead of two
    return out.mul_(k)


def _d_fast_sigmoid(x: Tensor, k: float, out: Tensor | None = None) -> Tensor:
    out = torch.abs(x, out=out)
    torch.add(x.new_ones(()), out, alpha=k, out=out)  # 1 + k|x|
    return out.pow_(-2)


def _d_triangular(x: Tensor, k: float, out: Tensor | None = None) -> Tensor:
    out = torch.abs(x, out=out)
    torch.sub(x.new_ones(()), out, alpha=k, out=out)  # 1 - k|x|
    return out.clamp_min_(0.0)


def _d_arctan(x: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    c = math.pi / 2.0 * alpha
    one = x.new_ones(())  # 0-dim, broadcast: lets addcmul add the constant without a ones tensor
    out = torch.addcmul(one, x, x, value=c * c, out=out)  # 1 + (c x)^2 in one pass
    out.reciprocal_()
    if alpha != 2.0:  # alpha / 2 == 1 at the default: skip a pass
        out.mul_(alpha / 2.0)
    return out


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


def lif_multistep_loop(
    current: Tensor,
    *,
    decay: float,
    threshold: float,
    surrogate: str = "sigmoid",
    slope: float | None = None,
) -> Tensor:
    """Reference LIF: one autograd op per step and term. current [T, ...] -> spikes [T, ...]."""
    k = _resolve(surrogate, slope)
    _check_current(current)
    fn = SURROGATES[surrogate]
    u = torch.zeros_like(current[0])
    s = torch.zeros_like(u)
    out = []
    # unbind: one backward node stacking all T grads; indexing current[t] would materialise a
    # full-size zero gradient per step (O(T^2) backward work)
    for i_t in current.unbind(0):
        u = decay * u + i_t - threshold * s.detach()
        s = fn.apply(u - threshold, k)
        out.append(s)
    return torch.stack(out)


def _lif_loop_inference(current: Tensor, decay: float, threshold: float) -> Tensor:
    """No-autograd LIF that torch.export/ONNX can trace: current [T, ...] -> spikes [T, ...].

    T is a static shape, so the loop unrolls; there is no data-dependent Python control flow.
    """
    u = torch.zeros_like(current[0])
    s = torch.zeros_like(u)
    out = []
    for t in range(current.shape[0]):
        u = decay * u + current[t] - threshold * s
        s = (u - threshold > 0).to(current.dtype)  # ONNX has no Heaviside op
        out.append(s)
    return torch.stack(out)


def _lif_forward(
    current: Tensor, decay: float, threshold: float, surrogate: str, slope: float, save_sg: bool
) -> tuple[Tensor, Tensor | None]:
    """In-place LIF recurrence: current [T, ...] -> (spikes [T, ...], sg [T, ...] or None).

    Uses the same elementwise ops, in the same order, as `lif_multistep_loop`, so spikes and
    surrogate values are bit-identical to it.
    """
    T = current.shape[0]
    spikes = torch.empty(current.shape, dtype=current.dtype, device=current.device)
    sg = torch.empty_like(spikes) if save_sg else None
    u = torch.zeros_like(spikes[0])
    x = torch.empty_like(u) if sg is None else None
    deriv = _DERIVATIVES[surrogate]
    # The loop computes u - (θ*s) with θ*s rounded to the tensor dtype; using that rounded θ as
    # `alpha` makes the single fused op give the same bits (s is exactly 0 or 1), also in bf16.
    theta_q = torch.tensor(threshold, dtype=current.dtype).item()
    for t in range(T):
        u.mul_(decay).add_(current[t])
        if t > 0:
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
    def forward(ctx, current: Tensor, decay: float, threshold: float, surrogate: str, slope: float | None) -> Tensor:
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


def lif_multistep(
    current: Tensor,
    *,
    decay: float,
    threshold: float,
    surrogate: str = "sigmoid",
    slope: float | None = None,
    fused: bool = True,
) -> Tensor:
    """LIF over the leading time axis: current [T, ...] -> spikes [T, ...] (same dtype, 0/1).

    fused=True uses `LIFMultiStep` (fast, saves one tensor); fused=False the per-step reference.
    Without grad the fused path only runs the recurrence and keeps nothing for backward.
    """
    k = _resolve(surrogate, slope)
    _check_current(current)
    if not fused:
        return lif_multistep_loop(current, decay=decay, threshold=threshold, surrogate=surrogate, slope=k)
    if torch.is_grad_enabled() and current.requires_grad:
        return LIFMultiStep.apply(current, decay, threshold, surrogate, k)
    return _lif_forward(current, decay, threshold, surrogate, k, save_sg=False)[0]


class LIF(torch.nn.Module):
    """LIF layer over T timesteps folded into the batch: x [T*B, ..., F] -> spikes [T*B, ..., F].

    Row block t of x (rows t*B .. t*B+B-1) is the input current at timestep t. After each forward
    `last_spike_rate` holds the mean spike value (0-dim float32, detached); with `record_stats`
    it also accumulates `fire_counts` (float64 [F], spikes per neuron) and `num_observations`
    (rows of F neurons seen, i.e. timesteps x tokens) until `reset_stats()`.
    """

    def __init__(
        self,
        num_timesteps: int,
        decay: float,
        threshold: float,
        surrogate: str = "sigmoid",
        slope: float | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        _resolve(surrogate, slope)
        self.num_timesteps = int(num_timesteps)
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.surrogate = surrogate
        self.slope = None if slope is None else float(slope)
        self.fused = bool(fused)
        self.record_stats = False
        self.last_spike_rate: Tensor | None = None
        self.fire_counts: Tensor | None = None  # None until the first recorded forward
        self.num_observations = 0

    def reset_stats(self) -> None:
        """Forget accumulated `fire_counts` / `num_observations`."""
        self.fire_counts = None
        self.num_observations = 0

    def forward(self, x: Tensor) -> Tensor:
        """x [T*B, ...] -> spikes [T*B, ...] of the same dtype."""
        T = self.num_timesteps
        if not torch.compiler.is_compiling() and x.shape[0] % T != 0:
            raise ValueError(f"leading dim {x.shape[0]} is not a multiple of num_timesteps={T}")
        seq = x.reshape(T, -1, *x.shape[1:])
        if torch.is_grad_enabled() and x.requires_grad:
            spikes = lif_multistep(
                seq,
                decay=self.decay,
                threshold=self.threshold,
                surrogate=self.surrogate,
                slope=self.slope,
                fused=self.fused,
            )
        else:
            # plain ops only: the autograd.Function and the in-place kernel do not export
            spikes = _lif_loop_inference(seq, self.decay, self.threshold)
        out = spikes.view(x.shape)
        # while exporting, x is a fake tensor and torch.export warns about tensor attributes
        if not torch.compiler.is_exporting():
            self._record(out.detach())
        return out

    def _record(self, spikes: Tensor) -> None:
        self.last_spike_rate = spikes.mean(dtype=torch.float32)
        if self.record_stats:
            feats = spikes.shape[-1]
            counts = spikes.reshape(-1, feats).sum(0, dtype=torch.float64)
            # out-of-place add: works whether either side was made under inference_mode
            self.fire_counts = counts if self.fire_counts is None else self.fire_counts.to(counts) + counts
            self.num_observations += spikes.numel() // feats

    def extra_repr(self) -> str:
        slope = DEFAULT_SLOPES[self.surrogate] if self.slope is None else self.slope
        return (
            f"num_timesteps={self.num_timesteps}, decay={self.decay}, threshold={self.threshold}, "
            f"surrogate={self.surrogate}, slope={slope}, fused={self.fused}"
        )
