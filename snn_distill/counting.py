"""Count-coded neurons: one pass per token instead of T (`snn_config.coding = "count"`).

In a count-coded student every layer runs once per token. Each layer integrates its input over the
token's T timesteps before its own neurons fire, so a neuron's input current I is constant over
those T steps, and its output is the spike count of the LIF dynamics (neurons.lif_dynamics) driven
by that constant current::

    c(I) = sum_t s[t],  u[t] = decay * u[t-1] + I - θ s[t-1],  s[t] = H(u[t] - θ),   c in 0..T

a closed-form staircase of I (QCFS / SpikeZIP-TF style quantised activations; SpikingBrain's integer
spike counts). Training costs one pass over the weights instead of T.

At inference the counts expand into T binary spikes: `expand_spikes` replays the same LIF on the
same constant current, and `expand_spikes(I).sum(0) == count_spikes(I)` exactly (tested). A layer
whose input is the expanded train s[t] sees the current W s[t] at step t, which varies over t; the
count-coded model instead gives it the token's mean current W c / T at every step. That is the one
place the two schedules differ: the count-coded student is the layer-pipelined schedule (each
layer fires after its input has been accumulated over the token's T steps), not the
timestep-synchronous one of `coding = "temporal"`.

Attention reads count-coded Q, K and V; a score q . k between two count vectors equals the number of
coinciding spike pairs (t, t') of their expanded trains, sum_{t, t'} q[t] k[t'], so it stays a sum of
accumulates (T^2 pair checks per coinciding channel rather than T).

Gradient: the surrogate derivative of the same recurrence with the reset detached (as in temporal
training), i.e. backpropagation through the T constant-current steps, in closed form::

    dc/dI = sum_t surrogate'(u[t] - θ) * (1 + decay + ... + decay^t)

computed in the forward loop, so only one [..., F] tensor is kept for the backward pass.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .neurons import (
    _COMPILED,
    _fire_inference,
    _resolve,
    check_kernel,
    kernel_params,
    lif_dynamics,
    lif_margin,
    surrogate_derivative,
    use_compiled,
)

__all__ = ["CountLIF", "count_spikes", "count_spikes_margin", "expand_spikes", "lif_counts"]


def _constant(current: Tensor, timesteps: int) -> Tensor:
    """current [..., F] -> the same current at each of T steps, [T, ..., F] (a view, no copy).
    -1 keeps each dim as it is: a traced (ONNX) graph must not bake in the example's shape."""
    return current.unsqueeze(0).expand(timesteps, *([-1] * current.dim()))


def expand_spikes(current: Tensor, decay: float | Tensor, threshold: float | Tensor, timesteps: int) -> Tensor:
    """The binary spike trains of constant currents: [..., F] -> [T, ..., F] of 0/1."""
    return torch.stack([s for _, s in lif_dynamics(_constant(current, timesteps), decay, threshold, _fire_inference)])


def count_spikes(current: Tensor, decay: float | Tensor, threshold: float | Tensor, timesteps: int) -> Tensor:
    """Spike counts of constant currents, no autograd: [..., F] -> [..., F] with values in 0..T.

    Plain ops only (traceable by torch.export / ONNX): the T steps unroll.
    """
    counts = torch.zeros_like(current)
    for _, s in lif_dynamics(_constant(current, timesteps), decay, threshold, _fire_inference):
        counts = counts + s
    return counts


def count_spikes_margin(
    current: Tensor, decay: float | Tensor, threshold: float | Tensor, timesteps: int
) -> tuple[Tensor, Tensor]:
    """`count_spikes` plus `neurons.lif_margin`'s smallest |u - θ| over steps and channels [...]."""
    spikes, margin = lif_margin(_constant(current, timesteps), decay, threshold)
    return spikes.sum(0), margin


def _count_loop(
    current: Tensor,
    decay: float | Tensor,
    threshold: float | Tensor,
    timesteps: int,
    surrogate: str,
    slope: float,
    want_theta: bool = False,
    want_decay: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The T constant-current steps, once: current [..., F] -> (counts, dc/dI, dc/dθ or None,
    dc/d(decay) or None), each [..., F].

    Functional ops only (no in-place updates): the same code runs eagerly and compiled.
    """
    counts = dcdi = dcdt = dcdb = None
    gain = 0.0  # du[t]/dI = 1 + decay + ... + decay^t (the reset is detached)
    g_theta = g_decay = u_prev = s_prev = None  # du/dθ, du/d(decay), u[t-1], s[t-1]; zero at t = 0
    for x, s in lif_dynamics(_constant(current, timesteps), decay, threshold, _fire_inference):
        gain = decay * gain + 1.0
        sg = surrogate_derivative(surrogate, x, slope)
        counts = s if counts is None else counts + s
        dcdi = sg * gain if dcdi is None else dcdi + sg * gain
        if want_theta:
            g_theta = torch.zeros_like(x) if s_prev is None else decay * g_theta - s_prev
            term = sg * (g_theta - 1.0)
            dcdt = term if dcdt is None else dcdt + term
        if want_decay:
            g_decay = torch.zeros_like(x) if u_prev is None else u_prev + decay * g_decay
            term = sg * g_decay
            dcdb = term if dcdb is None else dcdb + term
            u_prev = x + threshold  # u[t]
        s_prev = s
    return counts, dcdi, dcdt, dcdb


def _compiled_counts(
    current: Tensor,
    decay: float | Tensor,
    threshold: float | Tensor,
    timesteps: int,
    surrogate: str,
    slope: float,
    want_theta: bool = False,
    want_decay: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """`_count_loop` compiled (one loop over the neurons): current [..., F] -> (counts, dc/dI,
    dc/dθ or None, dc/d(decay) or None), each [..., F]; one graph per set of wanted derivatives."""
    flat = current.reshape(-1, current.shape[-1]).contiguous()  # one layout: one graph
    theta, decay_t = kernel_params(current, decay, threshold)
    learned = "".join(n for n, on in ((", d/dθ", want_theta), (", d/d(decay)", want_decay)) if on)
    key = f"T={timesteps}, {surrogate} surrogate, slope {slope}{learned}"
    fn = functools.partial(
        _count_loop,
        timesteps=timesteps,
        surrogate=surrogate,
        slope=slope,
        want_theta=want_theta,
        want_decay=want_decay,
    )
    out = _COMPILED.call("counts", fn, key, flat, decay_t, theta)
    return tuple(None if t is None else t.view(current.shape) for t in out)


class CountLIF(torch.autograd.Function):
    """`apply(current [..., F], decay, threshold, T, surrogate, slope, kernel) -> counts [..., F]`.

    decay and threshold: floats or per-channel [F] tensors; when they require grad (a learnable leak
    or threshold) their gradients come from the same closed-form recurrences (reset detached):
    du[t]/dθ = decay du[t-1]/dθ - s[t-1] and du[t]/d(decay) = u[t-1] + decay du[t-1]/d(decay), with
    dc/dθ = sum_t sg[t] (du[t]/dθ - 1) and dc/d(decay) = sum_t sg[t] du[t]/d(decay). Saves dc/dI
    (and one tensor per learnable parameter) for the backward pass.

    kernel (neurons.LIF_KERNELS): "compiled" runs the loop as one torch.compile kernel (raises if it
    cannot), "auto" does so for at least `AUTO_MIN_ELEMENTS` neuron updates (T x current elements)
    and falls back to eager after a failed compile; "fused" and "loop" run it eagerly. A learnable
    threshold or leak adds its derivative to the same kernel (one graph per set of wanted derivatives).
    """

    @staticmethod
    def forward(
        ctx, current: Tensor, decay, threshold, timesteps: int, surrogate: str, slope: float, kernel: str
    ) -> Tensor:
        want_theta = isinstance(threshold, Tensor) and ctx.needs_input_grad[2]
        want_decay = isinstance(decay, Tensor) and ctx.needs_input_grad[1]
        out = None
        strict = kernel == "compiled"
        if kernel in ("auto", "compiled"):
            if use_compiled(current, threshold, strict, timesteps * current.numel()):
                try:
                    wants = (want_theta, want_decay)
                    out = _compiled_counts(current, decay, threshold, timesteps, surrogate, slope, *wants)
                except Exception as e:  # noqa: BLE001 (inductor raises many types: no compiler, unsupported op, ...)
                    _COMPILED.failed(e, strict)
        if out is None:
            out = _count_loop(current, decay, threshold, timesteps, surrogate, slope, want_theta, want_decay)
        counts, dcdi, dcdt, dcdb = out
        ctx.save_for_backward(dcdi, dcdt, dcdb)
        ctx.shapes = (
            decay.shape if isinstance(decay, Tensor) else None,
            threshold.shape if isinstance(threshold, Tensor) else None,
        )
        return counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        dcdi, dcdt, dcdb = ctx.saved_tensors
        decay_shape, theta_shape = ctx.shapes
        g_decay = None if dcdb is None else _reduce_to(grad * dcdb, decay_shape)
        g_theta = None if dcdt is None else _reduce_to(grad * dcdt, theta_shape)
        return grad * dcdi, g_decay, g_theta, None, None, None, None


def _reduce_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum a [..., F] gradient down to a parameter broadcast over the leading dims ([F] or [])."""
    return g.reshape(-1, g.shape[-1]).sum(0).reshape(shape) if len(shape) else g.sum()


def lif_counts(
    current: Tensor,
    *,
    decay: float | Tensor,
    threshold: float | Tensor,
    timesteps: int,
    surrogate: str = "sigmoid",
    slope: float | None = None,
    kernel: str = "auto",
) -> Tensor:
    """Spike counts of constant currents [..., F] -> [..., F] (0..T), with surrogate gradients for
    the current (and a learnable per-channel threshold or leak) when they require grad; kernel: see
    `CountLIF`."""
    k = _resolve(surrogate, slope)
    check_kernel(kernel)
    if torch.is_grad_enabled() and (
        current.requires_grad or any(isinstance(p, Tensor) and p.requires_grad for p in (decay, threshold))
    ):
        return CountLIF.apply(current, decay, threshold, int(timesteps), surrogate, k, kernel)
    return count_spikes(current, decay, threshold, int(timesteps))
