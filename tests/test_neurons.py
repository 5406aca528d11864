"""Tests for snn_distill.neurons: surrogates, LIF dynamics, fused vs loop, snnTorch parity, LIF module."""

from __future__ import annotations

import math

import pytest
import torch

from snn_distill.neurons import (
    DEFAULT_SLOPES,
    LIF,
    SURROGATES,
    LIFMultiStep,
    lif_multistep,
    lif_multistep_loop,
    spike,
    surrogate_derivative,
)

NAMES = ["sigmoid", "fast_sigmoid", "triangular", "arctan"]
F64 = torch.float64


def _analytic(name: str, x: torch.Tensor, k: float) -> torch.Tensor:
    """Hand-written surrogate derivatives, independent of the implementation's op sequence."""
    if name == "sigmoid":
        s = 1.0 / (1.0 + torch.exp(-k * x))
        return k * s * (1.0 - s)
    if name == "fast_sigmoid":
        return 1.0 / (1.0 + k * x.abs()) ** 2
    if name == "triangular":
        return torch.clamp(1.0 - k * x.abs(), min=0.0)
    if name == "arctan":
        return (k / 2.0) / (1.0 + (math.pi / 2.0 * k * x) ** 2)
    raise AssertionError(name)


def _primitive(name: str, x: torch.Tensor, k: float) -> torch.Tensor:
    """Smooth step whose derivative each surrogate is."""
    if name == "sigmoid":
        return torch.sigmoid(k * x)
    if name == "fast_sigmoid":
        return x / (1.0 + k * x.abs())
    if name == "triangular":
        a = torch.clamp(x.abs(), max=1.0 / k)
        return torch.sign(x) * (a - k * a * a / 2.0)
    if name == "arctan":
        return torch.atan(math.pi / 2.0 * k * x) / math.pi
    raise AssertionError(name)


GRID = torch.tensor(
    [0.0, 1e-9, -1e-9, 1e-3, -1e-3, 0.1, -0.1, 0.37, -0.37, 0.9, -0.9, 1.7, -1.7, 5.0, -5.0, 40.0, -40.0],
    dtype=F64,
)


# --- surrogates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("custom_slope", [False, True])
def test_surrogate_backward_is_analytic_derivative(name: str, custom_slope: bool) -> None:
    k = 2.5 if custom_slope else DEFAULT_SLOPES[name]
    x = GRID.clone().requires_grad_()
    (g,) = torch.autograd.grad(SURROGATES[name].apply(x, k).sum(), x)
    expected = _analytic(name, GRID, k)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(surrogate_derivative(name, GRID, k), expected, rtol=1e-12, atol=1e-15)
    # upstream gradient is multiplied through
    w = torch.linspace(-2.0, 3.0, GRID.numel(), dtype=F64)
    (gw,) = torch.autograd.grad((SURROGATES[name].apply(x, k) * w).sum(), x)
    torch.testing.assert_close(gw, w * expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_surrogate_is_derivative_of_its_smooth_step(name: str) -> None:
    k = DEFAULT_SLOPES[name]
    # avoid the kinks of the triangle (0, ±1/k), where a central difference is not the derivative
    x = torch.tensor([-3.0, -0.7, -0.31, -0.05, 0.02, 0.26, 0.64, 2.2], dtype=F64)
    h = 1e-6
    fd = (_primitive(name, x + h, k) - _primitive(name, x - h, k)) / (2 * h)
    torch.testing.assert_close(surrogate_derivative(name, x), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_default_slope_peaks_at_one(name: str) -> None:
    d = surrogate_derivative(name, torch.linspace(-2, 2, 4001, dtype=F64))
    assert d.max().item() == pytest.approx(1.0, abs=1e-12)
    assert surrogate_derivative(name, torch.zeros(1, dtype=F64)).item() == pytest.approx(1.0, abs=1e-15)
    assert surrogate_derivative(name, torch.zeros(1, dtype=F64), slope=None).item() == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_spikes_are_exactly_binary(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(257, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[::7] = 0.0  # at threshold: strict '>' means no spike
    s = spike(x, surrogate=name)
    assert s.dtype == dtype and s.shape == x.shape
    assert torch.equal(s, (x > 0).to(dtype))
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    assert (s[::7] == 0).all()


def test_unknown_surrogate_lists_valid_names() -> None:
    msg = r"unknown surrogate 'relu'.*sigmoid, fast_sigmoid, triangular, arctan"
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=msg):
        surrogate_derivative("relu", x)
    with pytest.raises(ValueError, match=msg):
        spike(x, surrogate="relu")
    with pytest.raises(ValueError, match=msg):
        lif_multistep(x, decay=0.5, threshold=1.0, surrogate="relu")
    with pytest.raises(ValueError, match=msg):
        lif_multistep_loop(x, decay=0.5, threshold=1.0, surrogate="relu")
    with pytest.raises(ValueError, match=msg):
        LIF(4, 0.5, 1.0, surrogate="relu")
    with pytest.raises(ValueError, match="slope must be positive"):
        surrogate_derivative("sigmoid", x, slope=0.0)


# --- LIF dynamics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_lif_matches_hand_computed_sequence(fused: bool) -> None:
    # decay 0.5, θ 1; u[t] = 0.5 u[t-1] + I[t] - s[t-1];  s[t] = u[t] > 1
    # neuron a: I = .6 .6 1.2 0 2    u = .6  .9  1.65  -.175  1.9125      s = 0 0 1 0 1
    #   (u[3] = .825 + 0 - 1: the reset for the spike at t=2 lands one step later, at t=3)
    # neuron b: I = 1.5 .5 0 0 3     u = 1.5  .25  .125  .0625  3.03125   s = 1 0 0 0 1
    # neuron c: I = 1 .5 1 1 .25     u = 1  1  1.5  .75  .625             s = 0 0 1 0 0
    #   (u == θ exactly does not fire)
    current = torch.tensor(
        [[0.6, 1.5, 1.0], [0.6, 0.5, 0.5], [1.2, 0.0, 1.0], [0.0, 0.0, 1.0], [2.0, 3.0, 0.25]],
        dtype=F64,
        requires_grad=True,
    )
    s = lif_multistep(current, decay=0.5, threshold=1.0, surrogate="triangular", fused=fused)
    expected = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=F64)
    assert torch.equal(s, expected)

    # triangular surrogate sg = max(0, 1 - |u - 1|); with dL/ds = 1 everywhere and a detached reset,
    # g_u[t] = sg[t] + 0.5 g_u[t+1], dL/dI[t] = g_u[t].
    # neuron a: sg = .6 .9 .35 0 .0875  ->  g = 1.14296875 1.0859375 .371875 .04375 .0875
    (g,) = torch.autograd.grad(s.sum(), current)
    expected_a = torch.tensor([1.14296875, 1.0859375, 0.371875, 0.04375, 0.0875], dtype=F64)
    torch.testing.assert_close(g[:, 0], expected_a, rtol=1e-12, atol=1e-12)
    # neuron c: sg = 1 1 .5 .75 .625   ->  g = 1.7578125 1.515625 1.03125 1.0625 .625
    expected_c = torch.tensor([1.7578125, 1.515625, 1.03125, 1.0625, 0.625], dtype=F64)
    torch.testing.assert_close(g[:, 2], expected_c, rtol=1e-12, atol=1e-12)


def _fused_vs_loop(current, g, **kw):
    a = current.detach().requires_grad_()
    b = current.detach().requires_grad_()
    sa = lif_multistep(a, fused=True, **kw)
    sb = lif_multistep_loop(b, **kw)
    (ga,) = torch.autograd.grad(sa, a, g)
    (gb,) = torch.autograd.grad(sb, b, g)
    return sa, sb, ga, gb


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 4, 8])
def test_fused_equals_loop_float64(name: str, T: int) -> None:
    gen = torch.Generator().manual_seed(T)
    for trailing in [(3,), (2, 5), (2, 3, 4)]:
        for decay, threshold, slope in [(0.5, 1.0, None), (0.9, 0.3, 1.7), (0.0, 1.5, None), (1.0, 0.7, 6.0)]:
            current = torch.randn(T, *trailing, generator=gen, dtype=F64) * 1.5 + 0.3
            g = torch.randn(T, *trailing, generator=gen, dtype=F64)
            kw = dict(decay=decay, threshold=threshold, surrogate=name, slope=slope)
            sa, sb, ga, gb = _fused_vs_loop(current, g, **kw)
            assert sa.shape == current.shape and sa.dtype == F64
            assert torch.equal(sa, sb), (trailing, decay, threshold)
            assert torch.equal(ga, gb), (trailing, decay, threshold)
            with torch.no_grad():
                assert torch.equal(lif_multistep(current, **kw), sb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_loop_low_precision(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    current = (torch.randn(8, 4, 33, generator=gen) * 1.5).to(dtype)
    g = torch.randn(8, 4, 33, generator=gen).to(dtype)
    sa, sb, ga, gb = _fused_vs_loop(current, g, decay=0.9, threshold=0.7, surrogate=name)
    assert sa.dtype == dtype and ga.dtype == dtype
    assert torch.equal(sa, sb)
    assert torch.equal(ga, gb)


def test_fused_saves_only_surrogate_values_and_nothing_without_grad() -> None:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    current = torch.randn(6, 2, 7, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = lif_multistep(current, decay=0.5, threshold=1.0)
    assert len(saved) == 1 and saved[0].shape == current.shape and saved[0].dtype == current.dtype
    s.sum().backward()
    assert current.grad is not None and current.grad.shape == current.shape

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.no_grad():
        s = lif_multistep(current, decay=0.5, threshold=1.0)
    assert saved == [] and not s.requires_grad
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LIFMultiStep.apply(current.detach(), 0.5, 1.0, "sigmoid", None)
    assert saved == []


def test_fused_backward_reuses_saved_buffer_and_supports_retain_graph() -> None:
    ptrs: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptrs.append(t.data_ptr())
        return t

    gen = torch.Generator().manual_seed(5)
    current = torch.randn(6, 4, 9, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(6, 4, 9, generator=gen, dtype=F64)
    (ref,) = torch.autograd.grad(lif_multistep_loop(current, decay=0.8, threshold=0.9), current, g)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = lif_multistep(current, decay=0.8, threshold=0.9)
    # a retained graph keeps its saved tensor intact: every backward gives the same gradient
    (g1,) = torch.autograd.grad(s, current, g, retain_graph=True)
    (g2,) = torch.autograd.grad(s, current, g, retain_graph=True)
    (g3,) = torch.autograd.grad(s, current, g)
    assert torch.equal(g1, ref) and torch.equal(g2, ref) and torch.equal(g3, ref)
    assert g1.data_ptr() != ptrs[0] and g3.data_ptr() == ptrs[0]  # the last one reuses the buffer
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(s, current, g)


def test_rejects_empty_time_axis() -> None:
    with pytest.raises(ValueError, match="T >= 1"):
        lif_multistep(torch.zeros(0, 3), decay=0.5, threshold=1.0)


# --- snnTorch parity ------------------------------------------------------------------------------


def _snntorch_spike_grad(name: str, k: float):
    from snntorch import surrogate

    return {
        "sigmoid": lambda: surrogate.sigmoid(slope=k),
        "fast_sigmoid": lambda: surrogate.fast_sigmoid(slope=k),
        "arctan": lambda: surrogate.atan(alpha=k),
    }[name]()


@pytest.mark.parametrize("name", ["sigmoid", "fast_sigmoid", "arctan"])
@pytest.mark.parametrize("custom_slope", [False, True])
def test_matches_snntorch_leaky(name: str, custom_slope: bool) -> None:
    try:  # never skipped: this test is the evidence for "spike-for-spike with snnTorch"
        import snntorch as snn
    except ImportError:
        pytest.fail("snntorch is not installed; pip install -e '.[dev]' (it pins snntorch==1.0.0)")
    # snnTorch's spikes are float32 even for float64 membranes, so its reset term is float32(θ)
    # and its sigmoid backward rounds grad * slope to float32: keep decay, threshold, slope and
    # the upstream gradient exactly representable in float32 (slope a power of two)
    k = 2.0 if custom_slope else DEFAULT_SLOPES[name]
    for decay, threshold in [(0.5, 1.0), (0.875, 0.75), (0.25, 1.25)]:
        gen = torch.Generator().manual_seed(int(decay * 8))
        T = 8
        current = torch.randn(T, 4, 16, generator=gen, dtype=F64) * 1.2 + 0.4
        g = torch.randn(T, 4, 16, generator=gen).to(F64)  # float32-representable upstream grad

        ours_in = current.clone().requires_grad_()
        ours = lif_multistep(ours_in, decay=decay, threshold=threshold, surrogate=name, slope=k)
        (ours_g,) = torch.autograd.grad(ours, ours_in, g)

        ref_in = current.clone().requires_grad_()
        lif = snn.Leaky(
            beta=torch.tensor(decay, dtype=F64),
            threshold=torch.tensor(threshold, dtype=F64),
            spike_grad=_snntorch_spike_grad(name, k),
            reset_mechanism="subtract",
        )
        mem = lif.init_leaky()
        spikes = []
        for t in range(T):
            spk, mem = lif(ref_in[t], mem)
            spikes.append(spk)
        ref = torch.stack(spikes)
        (ref_g,) = torch.autograd.grad(ref, ref_in, g.to(ref.dtype))

        assert 0.05 < ours.mean().item() < 0.95  # both regimes exercised
        assert torch.equal(ours, ref.to(F64)), (decay, threshold)
        torch.testing.assert_close(ours_g, ref_g.to(F64), rtol=1e-10, atol=1e-12)


# --- LIF module -----------------------------------------------------------------------------------


def test_lif_module_folds_time_into_batch() -> None:
    T, B, L, F = 4, 3, 5, 6
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T * B, L, F, generator=gen, dtype=F64) * 1.5 + 0.5
    lif = LIF(T, decay=0.75, threshold=1.0, surrogate="arctan")
    out = lif(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = lif_multistep(x.view(T, B, L, F), decay=0.75, threshold=1.0).reshape(T * B, L, F)
    assert torch.equal(out, ref)
    # rows t*B + b are timestep t of batch element b: each element is simulated on its own
    for b in range(B):
        alone = LIF(T, 0.75, 1.0)(x.view(T, B, L, F)[:, b])
        assert torch.equal(out.view(T, B, L, F)[:, b], alone)
    with pytest.raises(ValueError, match="multiple of num_timesteps"):
        lif(x[:-1])


def test_lif_module_training_and_inference_paths_agree() -> None:
    x = torch.randn(8 * 2, 10, generator=torch.Generator().manual_seed(2)) * 2
    for fused in (True, False):
        lif = LIF(8, decay=0.5, threshold=1.0, surrogate="fast_sigmoid", fused=fused)
        xg = x.clone().requires_grad_()
        train_out = lif(xg)
        assert train_out.requires_grad
        train_out.sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
        with torch.inference_mode():
            infer_out = lif.eval()(x)
        assert torch.equal(train_out.detach(), infer_out)
    bf = LIF(8, 0.5, 1.0)(x.bfloat16())
    assert bf.dtype == torch.bfloat16 and set(bf.unique().tolist()) <= {0.0, 1.0}


def test_lif_module_records_statistics() -> None:
    T, B, L, F = 2, 3, 4, 5
    lif = LIF(T, decay=0.5, threshold=1.0)
    assert lif.last_spike_rate is None and lif.fire_counts is None and lif.num_observations == 0
    x1 = torch.randn(T * B, L, F, generator=torch.Generator().manual_seed(0)) * 2
    x2 = torch.randn(T * B, L, F, generator=torch.Generator().manual_seed(1)) * 2
    s1 = lif(x1.requires_grad_())
    rate = lif.last_spike_rate
    assert rate is not None and rate.dim() == 0 and rate.dtype == torch.float32 and not rate.requires_grad
    assert rate.item() == pytest.approx(s1.float().mean().item())
    assert lif.fire_counts is None and lif.num_observations == 0  # record_stats is off by default

    lif.record_stats = True
    s1 = lif(x1)
    with torch.no_grad():
        s2 = lif(x2)
    assert rate is not lif.last_spike_rate
    assert lif.last_spike_rate.item() == pytest.approx(s2.mean().item())
    expected = s1.detach().reshape(-1, F).sum(0).double() + s2.reshape(-1, F).sum(0).double()
    assert lif.fire_counts.dtype == F64 and lif.fire_counts.shape == (F,)
    assert torch.equal(lif.fire_counts, expected)
    assert lif.num_observations == 2 * T * B * L
    lif.reset_stats()
    assert lif.fire_counts is None and lif.num_observations == 0
    with torch.inference_mode():
        lif(x2)
    lif(x1)  # counts made under inference_mode keep accumulating outside it
    assert lif.num_observations == 2 * T * B * L


def test_lif_module_repr_and_validation() -> None:
    r = repr(LIF(4, 0.5, 1.0, surrogate="triangular"))
    for part in ("num_timesteps=4", "decay=0.5", "threshold=1.0", "surrogate=triangular", "slope=1.0"):
        assert part in r
    assert "slope=2.5" in repr(LIF(4, 0.5, 1.0, slope=2.5))
    with pytest.raises(ValueError, match="num_timesteps"):
        LIF(0, 0.5, 1.0)


def test_lif_module_exports_without_autograd_function() -> None:
    lif = LIF(4, 0.5, 1.0).eval()
    x = torch.randn(8, 3, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        ep = torch.export.export(lif, (x,), strict=False)
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any("LIFMultiStep" in t or "autograd" in t for t in targets), targets
        assert torch.equal(ep.module()(x), lif(x))
