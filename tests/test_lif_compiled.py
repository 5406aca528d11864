"""Tests for the compiled multi-step LIF (`lif_kernel="compiled"`): against the per-step loop, the
kernel choice (StudentConfig, CLI, LIF module, auto) and the fallback when compiling fails.

Every test runs on CPU with tiny shapes; the compiled kernels are shared across tests (the element
dims are dynamic and the leak is a tensor), so the file pays one compile per (T, surrogate, slope).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from snn_distill.cli import configs_from_args, parse_train_args
from snn_distill.config import StudentConfig
from snn_distill.counting import lif_counts
from snn_distill.neurons import (
    _COMPILED,
    AUTO_MIN_ELEMENTS,
    DEFAULT_SLOPES,
    LIF,
    lif_dynamics,
    lif_multistep,
    lif_multistep_loop,
)
from snn_distill.student import SpikingStudentLM

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["sigmoid", "fast_sigmoid", "triangular", "arctan"]
MARGIN = 1e-5  # compile may contract multiply-adds: spikes may differ only this close to θ
# inductor's CPU code needs a C++ compiler (CXX, else g++); without one only the fallback applies
needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler"
)


def _run(kernel: str, current: torch.Tensor, g: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(spikes, dL/dcurrent for dL/dspikes = g, name of the autograd node) of one kernel."""
    x = current.detach().clone().requires_grad_()
    s = lif_multistep_loop(x, **kw) if kernel == "reference" else lif_multistep(x, kernel=kernel, **kw)
    (gx,) = torch.autograd.grad(s, x, g)
    return s, gx, type(s.grad_fn).__name__


def _clear_neurons(current: torch.Tensor, decay: float, threshold) -> torch.Tensor:
    """[...] bool: neurons whose |u[t] - θ| > MARGIN at every step of the reference trajectory.

    The LIF is elementwise over neurons, so on these the compiled kernel must give the loop's spikes
    exactly and its gradients within rounding; elsewhere a contracted multiply-add may flip a spike.
    """
    xs = [x for x, _ in lif_dynamics(current, decay, threshold, lambda x: (x > 0).to(x.dtype))]
    return (torch.stack(xs).abs() > MARGIN).all(0)


def _assert_close_on(clear: torch.Tensor, spikes, ref_spikes, grad, ref_grad) -> None:
    assert clear.float().mean() > 0.9  # most neurons compared: the check has teeth
    assert torch.equal(spikes[:, clear], ref_spikes[:, clear])
    torch.testing.assert_close(grad[:, clear], ref_grad[:, clear], rtol=1e-5, atol=1e-5)
    assert ref_spikes.sum() > 0 and (ref_spikes == 0).any()  # neither silent nor saturated


def _inputs(T: int, seed: int, shape=(3, 5, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, *shape, generator=gen) * 1.5 + 0.3, torch.randn(T, *shape, generator=gen)


def _assert_matches_loop(current, g, **kw) -> None:
    s_c, g_c, node = _run("compiled", current, g, **kw)
    s_l, g_l, _ = _run("reference", current, g, **kw)
    assert node == "LIFMultiStepCompiledBackward"
    assert s_c.shape == current.shape and s_c.dtype == current.dtype
    clear = _clear_neurons(current, kw["decay"], kw["threshold"])
    _assert_close_on(clear, s_c, s_l, g_c, g_l)
    with torch.no_grad():
        s_ng = lif_multistep(current, kernel="compiled", **kw)
    assert torch.equal(s_ng[:, clear], s_l[:, clear])


@needs_cxx
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("T", [1, 4, 16])
def test_compiled_matches_loop(T: int, per_channel: bool) -> None:
    current, g = _inputs(T, seed=T)
    gen = torch.Generator().manual_seed(100 + T)
    threshold = torch.rand(8, generator=gen) + 0.5 if per_channel else 0.8
    _assert_matches_loop(current, g, decay=0.6, threshold=threshold, surrogate="sigmoid")


@needs_cxx
@pytest.mark.parametrize("name", NAMES)
def test_compiled_matches_loop_for_every_surrogate(name: str) -> None:
    current, g = _inputs(4, seed=7)
    _assert_matches_loop(current, g, decay=0.6, threshold=0.8, surrogate=name, slope=1.7)


@needs_cxx
@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_compiled_matches_loop_at_the_leak_extremes(decay: float) -> None:
    current, g = _inputs(4, seed=11)
    _assert_matches_loop(current, g, decay=decay, threshold=0.8, surrogate="sigmoid")


@needs_cxx
def test_non_contiguous_current_and_other_ranks() -> None:
    current, g = _inputs(4, seed=5, shape=(8, 6))
    _assert_matches_loop(current.transpose(1, 2), g.transpose(1, 2), decay=0.6, threshold=0.8, surrogate="sigmoid")
    current, g = _inputs(4, seed=6, shape=(2, 3, 2, 8))
    _assert_matches_loop(current, g, decay=0.6, threshold=0.8, surrogate="sigmoid")


@needs_cxx
def test_backward_uses_the_threshold_of_the_forward_pass() -> None:
    # homeostasis scales the threshold buffer in place after the forward pass, before backward
    current, g = _inputs(4, seed=9)
    theta = torch.full((8,), 0.8)
    x = current.clone().requires_grad_()
    s = lif_multistep(x, decay=0.6, threshold=theta, kernel="compiled")
    theta.mul_(1.5)
    (gx,) = torch.autograd.grad(s, x, g)
    _, g_ref, _ = _run("reference", current, g, decay=0.6, threshold=torch.full((8,), 0.8), surrogate="sigmoid")
    torch.testing.assert_close(gx, g_ref, rtol=1e-5, atol=1e-5)


@needs_cxx
def test_lif_module_bf16_under_autocast() -> None:
    # the module runs the recurrence in float32 whatever the input dtype, so the compiled kernel applies
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(4 * 6, 5, 8, generator=gen) * 1.5 + 0.3).bfloat16()
    outs = {}
    for kernel in ("compiled", "loop"):
        lif = LIF(4, 0.6, 0.8, channels=8, kernel=kernel)
        xk = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lif(xk)
        out.float().pow(2).sum().backward()
        outs[kernel] = (out, xk.grad)
    (o_c, g_c), (o_l, g_l) = outs["compiled"], outs["loop"]
    assert o_c.dtype == torch.bfloat16 and g_c.dtype == torch.bfloat16
    assert torch.equal(o_c, o_l)
    torch.testing.assert_close(g_c, g_l)


@needs_cxx
def test_auto_compiles_large_currents_only() -> None:
    small, _ = _inputs(4, seed=1)
    big = torch.randn(4, AUTO_MIN_ELEMENTS // (4 * 256), 256, generator=torch.Generator().manual_seed(2))
    kw = dict(decay=0.6, threshold=0.8, surrogate="sigmoid")
    _, _, node = _run("auto", small, torch.ones_like(small), **kw)
    assert node == "LIFMultiStepBackward"
    s, gx, node = _run("auto", big, torch.ones_like(big), **kw)
    assert node == "LIFMultiStepCompiledBackward"
    s_f, g_f, _ = _run("fused", big, torch.ones_like(big), **kw)
    _assert_close_on(_clear_neurons(big, 0.6, 0.8), s, s_f, gx, g_f)


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    return names


@needs_cxx
@pytest.mark.parametrize("kernel", ["compiled", "fused", "loop"])
def test_student_config_chooses_the_kernel(kernel: str) -> None:
    cfg = StudentConfig(  # the multi-step kernels run the temporal coding's T-step LIFs with fixed thresholds
        vocab_size=50, dim=32, depth=1, num_heads=2, num_timesteps=4, lif_kernel=kernel, coding="temporal",
        mode="hybrid",
    )  # fmt: skip
    torch.manual_seed(0)
    student = SpikingStudentLM(cfg)
    assert {m.kernel for m in student.lif_modules()} == {kernel}
    loss = student(torch.randint(0, 50, (2, 8))).float().pow(2).mean()
    nodes = _autograd_nodes(loss)
    expected = {"compiled": {"LIFMultiStepCompiledBackward"}, "fused": {"LIFMultiStepBackward"}, "loop": set()}
    assert {n for n in nodes if n.startswith("LIFMultiStep")} == expected[kernel]


@needs_cxx
@pytest.mark.parametrize("coding", ["temporal", "count"])
def test_compiled_student_trains_like_the_eager_one(coding: str) -> None:
    """Both codings: the compiled kernels (multi-step LIF, or `CountLIF`'s constant-current steps)
    against the eager ones, loss and every gradient."""
    cfg = StudentConfig(
        vocab_size=50, dim=32, depth=2, num_heads=2, num_timesteps=4, mode="spike-driven", coding=coding
    )
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = {}
    for kernel in ("compiled", "fused"):
        torch.manual_seed(0)
        student = SpikingStudentLM(dataclasses.replace(cfg, lif_kernel=kernel)).train()
        loss = torch.nn.functional.cross_entropy(student(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        grads[kernel] = (loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None])
    (l_c, g_c), (l_f, g_f) = grads["compiled"], grads["fused"]
    torch.testing.assert_close(l_c, l_f, rtol=1e-5, atol=1e-5)
    assert len(g_c) == len(g_f) > 0
    for a, b in zip(g_c, g_f, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_config_validation_metadata_and_cli() -> None:
    with pytest.raises(ValueError, match="--snn-lif-kernel must be one of auto, compiled, fused, loop"):
        StudentConfig(vocab_size=50, lif_kernel="triton")
    cfg = StudentConfig(vocab_size=50, lif_kernel="fused")
    meta = {"vocab_size": 50, "architecture": cfg.architecture_dict(), "snn_config": cfg.snn_config_dict()}
    assert meta["snn_config"]["lif_kernel"] == "fused" and "lif_kernel" not in meta["architecture"]
    assert StudentConfig.from_metadata(meta) == cfg
    del meta["snn_config"]["lif_kernel"]  # metadata written before the field existed
    assert StudentConfig.from_metadata(meta).lif_kernel == "auto"
    _, student = configs_from_args(parse_train_args(["--teacher-model", "x", "--snn-lif-kernel", "loop"]))
    assert student["lif_kernel"] == "loop"


def test_bad_kernel_names_and_inputs_are_rejected() -> None:
    x = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="unknown LIF kernel 'cuda'"):
        lif_multistep(x, decay=0.5, threshold=1.0, kernel="cuda")
    with pytest.raises(ValueError, match="unknown LIF kernel 'cuda'"):
        LIF(4, 0.5, 1.0, kernel="cuda")
    with pytest.raises(ValueError, match="float32/float64 current.*lif_kernel='fused'"):
        lif_multistep(x.bfloat16(), decay=0.5, threshold=1.0, kernel="compiled")
    with pytest.raises(ValueError, match="per-channel"):
        lif_multistep(x, decay=0.5, threshold=torch.ones(3, 8), kernel="compiled")


def test_without_a_compiler_auto_falls_back_to_fused_with_one_warning(tmp_path) -> None:
    # a real failed compile: no C++ compiler and an empty inductor cache, in a fresh process
    code = textwrap.dedent(
        f"""
        import logging, sys
        import torch
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        from snn_distill.counting import lif_counts
        from snn_distill.neurons import lif_multistep
        x = torch.randn(4, {AUTO_MIN_ELEMENTS // 1024}, 256, generator=torch.Generator().manual_seed(0))
        ref = lif_multistep(x, decay=0.5, threshold=1.0, kernel="fused")
        kw = dict(decay=0.5, threshold=1.0, timesteps=4)
        ref_counts = lif_counts(x[0], kernel="fused", **kw)
        assert torch.equal(lif_counts(x[0].clone().requires_grad_(), kernel="auto", **kw).detach(), ref_counts)
        for _ in range(2):
            xg = x.clone().requires_grad_()
            s = lif_multistep(xg, decay=0.5, threshold=1.0, kernel="auto")
            assert type(s.grad_fn).__name__ == "LIFMultiStepBackward", s.grad_fn
            assert torch.equal(s, ref)
        try:
            lif_multistep(x, decay=0.5, threshold=1.0, kernel="compiled")
        except RuntimeError as e:
            print("STRICT:", e)
        try:
            lif_counts(x[0].clone().requires_grad_(), kernel="compiled", **kw)
        except RuntimeError as e:
            print("STRICT COUNTS:", e)
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "LIF: torch.compile failed" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "using the fused eager LIF kernel" in warnings[0]
    assert "STRICT: could not compile the multi-step LIF" in proc.stdout
    assert "STRICT COUNTS: could not compile the multi-step LIF" in proc.stdout
    assert "use lif_kernel='fused'" in proc.stdout


# --- count coding: the T constant-current steps of `counting.CountLIF` as one compiled kernel -----


def _counts_and_grad(kernel: str, current: torch.Tensor, g: torch.Tensor, **kw):
    x = current.detach().clone().requires_grad_()
    c = lif_counts(x, kernel=kernel, **kw)
    (gx,) = torch.autograd.grad(c, x, g)
    return c, gx


@needs_cxx
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 4, 8])
def test_compiled_counts_match_the_eager_loop(name: str, T: int) -> None:
    gen = torch.Generator().manual_seed(T)
    current = torch.randn(6, 5, 16, generator=gen) * 1.5 + 0.3
    g = torch.randn(6, 5, 16, generator=gen)
    theta = torch.rand(16, generator=gen) + 0.4  # per channel, as calibrated students have it
    kw = dict(decay=0.6, threshold=theta, timesteps=T, surrogate=name)
    c_c, g_c = _counts_and_grad("compiled", current, g, **kw)
    c_e, g_e = _counts_and_grad("fused", current, g, **kw)
    assert ("counts", f"T={T}, {name} surrogate, slope {DEFAULT_SLOPES[name]}") in _COMPILED._fns
    clear = _clear_neurons(current.expand(T, *current.shape), 0.6, theta)
    assert clear.float().mean() > 0.9
    assert torch.equal(c_c[clear], c_e[clear])
    torch.testing.assert_close(g_c[clear], g_e[clear], rtol=1e-5, atol=1e-5)
    assert c_e.min() == 0 and c_e.max() == T and g_e.abs().sum() > 0


@needs_cxx
@pytest.mark.parametrize("learn", ["threshold", "decay", "both"])
def test_compiled_counts_learn_threshold_and_leak_like_the_eager_loop(learn: str) -> None:
    gen = torch.Generator().manual_seed(7)
    current = torch.randn(6, 5, 16, generator=gen) * 1.5 + 0.3
    g = torch.randn(6, 5, 16, generator=gen)
    theta0 = torch.rand(16, generator=gen) + 0.4
    decay0 = torch.rand(16, generator=gen) * 0.8 + 0.1

    def run(kernel: str) -> list[torch.Tensor]:
        x = current.clone().requires_grad_()
        th = theta0.clone().requires_grad_(learn in ("threshold", "both"))
        de = decay0.clone().requires_grad_(learn in ("decay", "both"))
        c = lif_counts(x, decay=de, threshold=th, timesteps=4, kernel=kernel)
        (c * g).sum().backward()
        return [c.detach()] + [t.grad for t in (x, th, de) if t.requires_grad]

    compiled, eager = run("compiled"), run("fused")
    wanted = {"threshold": ", d/dθ", "decay": ", d/d(decay)", "both": ", d/dθ, d/d(decay)"}[learn]
    assert ("counts", f"T=4, sigmoid surrogate, slope {DEFAULT_SLOPES['sigmoid']}{wanted}") in _COMPILED._fns
    assert len(compiled) == (4 if learn == "both" else 3)
    # no neuron within rounding of its threshold, so both kernels take the same spikes and the
    # per-channel sums of the parameter gradients compare term by term
    assert bool(_clear_neurons(current.expand(4, *current.shape), decay0, theta0).all())
    assert torch.equal(compiled[0], eager[0]) and eager[0].max() == 4
    for a, b in zip(compiled[1:], eager[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert b.abs().sum() > 0


@needs_cxx
def test_auto_compiles_large_count_currents_only() -> None:
    before = set(_COMPILED._fns)
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(8, 16, generator=gen)
    kw = dict(decay=0.5, threshold=0.9, timesteps=2, surrogate="fast_sigmoid", slope=7.0)
    _counts_and_grad("auto", small, torch.ones_like(small), **kw)
    assert set(_COMPILED._fns) == before  # 256 neuron updates: eager
    big = torch.randn(AUTO_MIN_ELEMENTS // (2 * 256), 256, generator=gen)  # T x elements = the bar
    c_a, g_a = _counts_and_grad("auto", big, torch.ones_like(big), **kw)
    assert set(_COMPILED._fns) - before == {("counts", "T=2, fast_sigmoid surrogate, slope 7.0")}
    c_f, g_f = _counts_and_grad("fused", big, torch.ones_like(big), **kw)
    clear = _clear_neurons(big.expand(2, *big.shape), 0.5, 0.9)
    assert torch.equal(c_a[clear], c_f[clear])
    torch.testing.assert_close(g_a[clear], g_f[clear], rtol=1e-5, atol=1e-5)
