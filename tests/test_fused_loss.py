"""The fused forward-KL chunk kernel (`fused_loss.py`): compiled == eager == plain reference in loss and
gradients (full, raw-logit and top-k targets, token weights, temperature, a ragged last chunk), one
compile reused across chunk sizes, and the eager fallback with one warning when compiling is impossible."""

from __future__ import annotations

import logging

import pytest
import torch

from snn_distill.config import TrainConfig
from snn_distill.fused_loss import CompiledKL, liger_available, resolve_fused_loss
from snn_distill.losses import (
    TeacherTargets,
    _forward_kl_lean,
    _lean_kernel,
    chunked_distill_loss,
    reference_distill_loss,
)

N, D, V, K, CHUNK = 37, 16, 300, 8, 16  # chunks of 16, 16 and a ragged 5


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    t_logits = torch.randn(N, V, generator=g) * 3
    tok_w = torch.rand(N, generator=g) / N
    tok_w[::5] = 0.0  # positions left out of the loss (response-only masks)
    return h, w, t_logits, tok_w


def _targets(t_logits: torch.Tensor, kind: str, temperature: float) -> TeacherTargets:
    if kind == "raw":
        return TeacherTargets(t_logits, raw=True)
    logp = torch.log_softmax(t_logits / temperature, dim=-1)
    if kind == "full":
        return TeacherTargets(logp)
    vals, idx = logp.topk(K, dim=-1)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-6)) if kind == "topk_tail" else None
    return TeacherTargets(vals, idx, tail)


def _loss_and_grads(data, targets, temperature, fused, n=N):
    h, w, _, tok_w = data
    hh = h[:n].clone().requires_grad_()
    ww = w.clone().requires_grad_()
    loss, kd, _ = chunked_distill_loss(
        hh, ww, targets[:n], tok_w[:n], temperature=temperature, chunk=CHUNK, fused=fused
    )
    loss.backward()
    return loss.detach(), kd, hh.grad, ww.grad


def _reference(data, targets, temperature):
    h, w, _, tok_w = data
    hh = h.double().requires_grad_()
    ww = w.double().requires_grad_()
    tg = TeacherTargets(
        targets.logprobs.double(), targets.indices, None if targets.tail is None else targets.tail.double(), targets.raw
    )
    loss = reference_distill_loss(hh @ ww.t(), tg, tok_w.double(), temperature=temperature)
    loss.backward()
    return loss.detach(), hh.grad, ww.grad


@pytest.mark.parametrize("kind", ["full", "raw", "topk", "topk_tail"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_compiled_equals_eager_and_reference(data, kind, temperature):
    targets = _targets(data[2], kind, temperature)
    ref_loss, ref_gh, ref_gw = _reference(data, targets, temperature)
    assert ref_loss > 0.1  # a real divergence, not a vanishing one
    results = {m: _loss_and_grads(data, targets, temperature, m) for m in ("compile", "eager")}
    for loss, kd, gh, gw in results.values():
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kd, loss)  # no hard labels: kd_sum is the loss
        torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
        assert gh[::5].abs().max() == 0  # weight-0 positions get no gradient
    (lc, _, ghc, gwc), (le, _, ghe, gwe) = results["compile"], results["eager"]
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghc, ghe, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gwc, gwe, rtol=1e-5, atol=1e-5)


def test_other_chunk_sizes_reuse_the_compiled_kernel(data):
    """Row counts are dynamic: a new batch size (other ragged last chunk) does not compile again."""
    from torch._dynamo.utils import counters

    targets = _targets(data[2], "full", 1.0)
    _loss_and_grads(data, targets, 1.0, "compile")  # compiled here or by an earlier test
    before = counters["stats"]["unique_graphs"]
    for n in (23, 30):  # last chunks of 7 and 14 rows
        loss, _, gh, _ = _loss_and_grads(data, targets, 1.0, "compile", n=n)
        want, _, ghe, _ = _loss_and_grads(data, targets, 1.0, "eager", n=n)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh, ghe, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == before


def test_fallback_to_eager_warns_once_without_a_compiler(data, monkeypatch, caplog):
    """No working C++ compiler (a real inductor failure, no mocks): the kernel reports failure once,
    and the caller's eager kernel gives the loss."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/bin/g++"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    _, w, t_logits, _ = data
    kl = CompiledKL()
    z = (data[0].double() @ w.double().t())[:CHUNK]  # float64: a graph nothing has compiled before
    targets = TeacherTargets(torch.log_softmax(t_logits[:CHUNK].double(), -1))
    want_kd, want_g = _forward_kl_lean(z.clone(), targets, 1.0)
    with caplog.at_level(logging.WARNING, logger="snn_distill.fused_loss"):
        for _ in range(2):  # the second call does not try (nor warn) again
            kd, g = _lean_kernel(z.clone(), targets, 1.0, "compile", None, None, compiled=kl)
            torch.testing.assert_close(kd, want_kd)
            torch.testing.assert_close(g, want_g)
    assert "compiler" in kl.broken  # the reason, as logged
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1


def test_modes_and_config():
    assert resolve_fused_loss("auto", "cpu") == "compile"
    assert resolve_fused_loss("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_fused_loss("liger", "cpu")
    if not liger_available():
        with pytest.raises(ValueError, match=r"pip install 'snn-distill\[cuda\]'"):
            resolve_fused_loss("liger", "cuda")
    with pytest.raises(ValueError, match="--fused-loss must be one of"):
        TrainConfig(teacher_model="t", fused_loss="fast")
    assert TrainConfig(teacher_model="t").to_dict()["fused_loss"] == "auto"


@pytest.mark.parametrize("fused", ["compile", "eager"])
def test_training_step_with_raw_teacher_logits(fused):
    """distill_step on raw teacher logits (what training passes now) == on their log-softmax at T."""
    from snn_distill.config import StudentConfig
    from snn_distill.distill import distill_step
    from snn_distill.student import SpikingStudentLM

    vocab, temperature = V, 2.0
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: only the real rows reach the loss
    logits = torch.randn(int(mask.sum()), vocab, generator=g) * 3
    cfg = TrainConfig(teacher_model="x", temperature=temperature, loss_chunk_tokens=CHUNK, fused_loss=fused)

    def grads(targets):
        torch.manual_seed(1)
        m = SpikingStudentLM(StudentConfig(vocab_size=vocab, dim=16, depth=1, num_heads=2))
        stats = distill_step(m, [(ids, mask, targets)], cfg, torch.device("cpu"))
        return stats.loss, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    loss_raw, g_raw = grads(TeacherTargets(logits, raw=True))
    loss_lp, g_lp = grads(TeacherTargets(torch.log_softmax(logits / temperature, -1)))
    assert loss_raw == pytest.approx(loss_lp, rel=1e-5) and loss_lp > 0.1
    assert g_raw.keys() == g_lp.keys() and len(g_raw) > 3
    for k in g_lp:
        torch.testing.assert_close(g_raw[k], g_lp[k], rtol=1e-4, atol=1e-6)
