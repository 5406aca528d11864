"""SpikingStudentLM in the hybrid layout with temporal coding (T rows per token): shapes, binary spikes,
causality, folded-T == per-timestep loop, decode cache. Count coding (the default) is tested in
test_counting.py, the spike-driven layout (the default) in test_spike_driven.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from snn_distill.config import StudentConfig
from snn_distill.student import SpikingStudentLM, apply_rope, fake_quant_int8, rope_cos_sin

V = 97


def make(seed: int = 0, **kw) -> SpikingStudentLM:
    torch.manual_seed(seed)
    args = dict(vocab_size=V, dim=32, depth=2, num_heads=4, num_timesteps=4, coding="temporal", mode="hybrid")
    args.update(kw)
    return SpikingStudentLM(StudentConfig(**args))


@pytest.mark.parametrize("student_type", ["snn", "ann"])
def test_forward_shapes_and_dtype(student_type):
    m = make(student_type=student_type)
    logits = m(torch.randint(0, V, (3, 11)))
    assert logits.shape == (3, 11, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_spikes_are_binary_and_rates_reported():
    m = make()
    seen = []
    hooks = [lif.register_forward_hook(lambda _m, _i, out: seen.append(out)) for lif in m.lif_modules()]
    m(torch.randint(0, V, (2, 9)))
    for h in hooks:
        h.remove()
    assert len(seen) == 4  # qkv + mlp per block
    for s in seen:
        assert set(torch.unique(s).tolist()) <= {0.0, 1.0}
    rates = m.spike_rates()
    assert set(rates) == {"blocks.0.attn.qkv", "blocks.0.mlp.up", "blocks.1.attn.qkv", "blocks.1.mlp.up"}
    # The initialisation keeps currents near the threshold: neurons fire, but sparsely.
    assert all(0.02 < r < 0.6 for r in rates.values()), rates


@pytest.mark.parametrize("student_type", ["snn", "ann"])
def test_causality(student_type):
    m = make(student_type=student_type, num_kv_heads=2).eval()
    ids = torch.randint(0, V, (2, 12))
    base = m(ids)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        out = m(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
        assert not torch.allclose(out[:, t:], base[:, t:])


def _reference_per_timestep(m: SpikingStudentLM, ids: torch.Tensor) -> torch.Tensor:
    """Plain simulation: outer loop over timesteps, each LIF layer keeping its membrane between steps."""
    cfg = m.config
    b, s = ids.shape
    cos, sin = rope_cos_sin(m.inv_freq, 0, s, torch.float64)
    mem: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def lif_step(key: int, current: torch.Tensor) -> torch.Tensor:
        u, spk = mem.get(key, (torch.zeros_like(current), torch.zeros_like(current)))
        u = cfg.decay * u + current - cfg.threshold * spk
        spk = (u > cfg.threshold).to(u.dtype)
        mem[key] = (u, spk)
        return spk

    xs = []
    for _t in range(cfg.num_timesteps):
        x = m.embed(ids)
        for i, blk in enumerate(m.blocks):
            h = blk.norm1(x)
            qkv = lif_step(2 * i, blk.attn.qkv(h))
            hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
            q = apply_rope(q.view(b, s, nh, hd).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(b, s, nkv, hd).transpose(1, 2), cos, sin).repeat_interleave(nh // nkv, 1)
            v = v.view(b, s, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
            scores = (q @ k.transpose(-1, -2)) / hd**0.5
            scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
            x = x + blk.attn.proj(a)
            x = x + blk.mlp.down(lif_step(2 * i + 1, blk.mlp.up(blk.norm2(x))))
        xs.append(x)
    return F.linear(m.norm(torch.stack(xs).mean(0)), m.lm_head_weight)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_folded_timesteps_equal_per_timestep_loop(kv_heads):
    torch.manual_seed(0)
    m = make(num_kv_heads=kv_heads).double().eval()
    m.inv_freq = m.inv_freq.double()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        folded = F.linear(m.forward_hidden(ids), m.lm_head_weight)
        ref = _reference_per_timestep(m, ids)
    torch.testing.assert_close(folded, ref.to(folded.dtype), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("student_type,kv_heads", [("snn", 4), ("snn", 2), ("ann", 2)])
def test_cached_decoding_matches_full_recompute(student_type, kv_heads):
    m = make(student_type=student_type, num_kv_heads=kv_heads).eval()
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        full = m(ids)
        logits, past = m.forward_step(ids[:, :5])  # prefill
        steps = [logits]
        for t in range(5, 9):  # one token at a time
            logits, past = m.forward_step(ids[:, t : t + 1], past)
            steps.append(logits)
        logits, past = m.forward_step(ids[:, 9:], past)  # a multi-token chunk on top of a cache
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert past[0][0].shape == (m.timesteps * 2, kv_heads, 14, m.config.head_dim)


def test_config_json_round_trip_rebuilds_identical_model():
    cfg = StudentConfig(
        vocab_size=V,
        dim=48,
        depth=3,
        num_heads=6,
        num_kv_heads=3,
        num_timesteps=6,
        surrogate="arctan",
        threshold=0.7,
        decay=0.8,
        tie_embeddings=False,
    )
    m = SpikingStudentLM(cfg)
    meta = json.loads(
        json.dumps(
            {"vocab_size": V, "architecture": cfg.architecture_dict(), "snn_config": cfg.snn_config_dict()}
        )
    )
    cfg2 = StudentConfig.from_metadata(meta)
    assert cfg2 == cfg
    m2 = SpikingStudentLM(cfg2)
    m2.load_state_dict(m.state_dict())
    ids = torch.randint(0, V, (2, 7))
    m.eval()
    m2.eval()
    assert torch.equal(m(ids), m2(ids))
    assert m.lm_head is not None and m.num_parameters() == m2.num_parameters()


def test_ann_twin_has_identical_parameters():
    snn, ann = make(), make(student_type="ann")
    assert [(k, v.shape) for k, v in snn.state_dict().items()] == [
        (k, v.shape) for k, v in ann.state_dict().items()
    ]
    assert ann.timesteps == 1 and snn.timesteps == 4


def test_tied_embeddings_share_the_matrix():
    m = make()
    assert m.lm_head is None and m.lm_head_weight is m.embed.weight


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, V, (2, 8))
    grads = []
    for ckpt in (False, True):
        m = make(gradient_checkpointing=ckpt).train()
        m(ids).logsumexp(-1).mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k])


def test_surrogate_gradients_reach_every_parameter():
    m = make().train()
    m(torch.randint(0, V, (2, 8))).logsumexp(-1).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fake_quant_int8_rounds_per_channel_with_straight_through_gradient():
    w = torch.randn(5, 7, requires_grad=True)
    q = fake_quant_int8(w)
    scale = w.detach().abs().amax(1, keepdim=True) / 127
    levels = q.detach() / scale
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert (q.detach() - w.detach()).abs().max() <= scale.max() / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("kw", [dict(mode="spike-driven", coding="count"), dict(tie_embeddings=False)])
def test_qat_student_computes_with_its_int8_rounded_weights(kw):
    """With QAT, evaluation computes with the int8-rounded weights it trained with (every linear weight
    per output channel, the embedding and head per row), the function the int8 export ships;
    bake_int8_weights stores them and gives the same logits without re-rounding."""
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    m = make(qat_int8=True, **kw).eval()
    with torch.no_grad():
        out = m(ids)
        ref = make(qat_int8=False, **kw).eval()
        for p in ref.parameters():
            if p.dim() == 2:  # every weight matrix, the embedding included
                p.copy_(fake_quant_int8(p))
        torch.testing.assert_close(out, ref(ids), rtol=0, atol=1e-5)
        assert not torch.allclose(out, make(qat_int8=False, **kw).eval()(ids), atol=1e-4)  # rounding matters
        m.bake_int8_weights()
        assert not m.qat and not any(getattr(x, "qat", False) for x in m.modules())
        torch.testing.assert_close(m(ids), out, rtol=0, atol=1e-5)
        for p in m.parameters():
            if p.dim() == 2:  # each row is a multiple of its int8 step
                steps = p / (p.abs().amax(-1, keepdim=True) / 127)
                torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dim=30, num_heads=4), "divisible"),
        (dict(dim=12, num_heads=4), "even"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(surrogate="relu"), "sigmoid, fast_sigmoid"),
        (dict(threshold=0.0), "snn-threshold"),
        (dict(num_timesteps=0), "snn-timesteps"),
        (dict(decay=1.5), "decay"),
        (dict(student_type="cnn"), "snn, ann"),
    ],
)
def test_config_validation_messages(kw, match):
    args = dict(vocab_size=V, dim=32, depth=2, num_heads=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        StudentConfig(**args)


def test_the_folded_head_is_computed_once_per_weight_version():
    """Without autograd the spike-driven head's gain is folded into the [V, D] matrix once, not on every
    decoded token; an in-place change of the embedding or the gain (an optimizer step) refolds it, and
    with autograd the fold is recomputed and differentiable."""
    m = make(mode="spike-driven", coding="count").eval()
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        w = m.lm_head_weight
        assert m.lm_head_weight is w  # memoised
        before = m(ids)
        m.head_gain.mul_(2.0)
        assert m.lm_head_weight is not w
        torch.testing.assert_close(m.lm_head_weight, m.embed.weight * (m.head_gain / m.timesteps))
        after = m(ids)
        assert not torch.allclose(before, after)
        m.embed.weight[3].add_(1.0)
        torch.testing.assert_close(m.lm_head_weight, m.embed.weight * (m.head_gain / m.timesteps))
    with torch.inference_mode():  # folded in inference mode, then used without it: still fine
        m.head_gain.mul_(0.5)
        inf = m(ids)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), inf)
    g = m.lm_head_weight
    assert g.requires_grad and g.grad_fn is not None
    assert m._folded_head is None  # a training step does not keep the inference copy
