"""Energy accounting per weight matmul, by operand, against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from snn_distill.config import StudentConfig
from snn_distill.evaluate import evaluate_efficiency, format_report
from snn_distill.student import SpikingStudentLM

# D=8, H=Hkv=2, hd=4, Q=(2+2*2)*4=24, F=16, V=11, T=2, one block
D, Q, F_, V, T, H, HD = 8, 24, 16, 11, 2, 2, 4
PJ_AC, PJ_MAC = 0.9, 4.6  # Horowitz 2014, 45 nm, written out here on purpose


def tiny(mode: str, theta: float | None) -> SpikingStudentLM:
    # binary spikes and fixed thresholds: the hand-worked counts below (ternary codes: test_counting.py)
    cfg = StudentConfig(
        vocab_size=V, dim=D, depth=1, num_heads=H, mlp_ratio=2.0, num_timesteps=T, mode=mode, coding="temporal",
        ternary=False, learn_threshold=False,
    )  # fmt: skip
    model = SpikingStudentLM(cfg)
    if theta is not None:  # every neuron's threshold, fixed: no calibration
        for lif in model.lif_modules():
            if lif.per_channel:
                lif.theta.fill_(theta)
                lif.calibrated.fill_(True)
            else:
                lif.threshold = theta
    return model


def run(model, s: int = 5):
    ids = torch.randint(0, V, (2, s), generator=torch.Generator().manual_seed(0))
    return evaluate_efficiency(model, [(ids, torch.ones_like(ids))])


def test_spike_driven_all_firing_counts_one_accumulate_per_spike_and_output():
    rep = run(tiny("spike-driven", theta=-1e3))  # u - theta > 0 always: every neuron fires every step
    c = (5 + 1) / 2  # mean attended positions over a 5-token sequence
    mm = rep["matmuls"]
    assert {n: m["operand"] for n, m in mm.items()} == {
        "blocks.0.attn.qkv": "spikes",
        "blocks.0.attn.proj": "spikes",
        "blocks.0.mlp.up": "spikes",
        "blocks.0.mlp.down": "spikes",
        "lm_head": "spikes",
    }
    # T timesteps x every input spiking x fan-out; the head reads counts (T per channel) once per token
    expect = {
        "blocks.0.attn.qkv": T * D * Q,
        "blocks.0.attn.proj": T * D * D,
        "blocks.0.mlp.up": T * D * F_,
        "blocks.0.mlp.down": T * F_ * D,
        "lm_head": T * D * V,
    }
    for name, ac in expect.items():
        assert mm[name]["ac_per_token"] == pytest.approx(ac) and mm[name]["mac_per_token"] == 0
    attn_ac = T * H * c * 2 * HD + T * H * c * HD  # scores (rates 1) + weights . V
    neurons = D + Q + D + D + F_ + D  # attn.in, qkv, attn.out, mlp.in, mlp.up, head.in
    mac = T * H * c + T * neurons  # softmax + LIF updates
    ac = sum(expect.values()) + attn_ac
    ann = D * Q + D * D + D * F_ + F_ * D + D * V + 2 * H * c * HD + H * c
    assert rep["snn_synops_per_token"] == pytest.approx(ac)
    assert rep["snn_macs_per_token"] == pytest.approx(mac)
    assert rep["ann_macs_per_token"] == pytest.approx(ann)
    snn_nj, ann_nj = (PJ_AC * ac + PJ_MAC * mac) / 1e3, PJ_MAC * ann / 1e3
    assert rep["snn_energy_nj_per_token"] == pytest.approx(snn_nj)
    assert rep["energy_ratio_snn_to_ann"] == pytest.approx(snn_nj / ann_nj)
    body = rep["without_lm_head"]
    assert body["snn_energy_nj"] == pytest.approx(snn_nj - PJ_AC * T * D * V / 1e3)
    assert body["ann_energy_nj"] == pytest.approx(ann_nj - PJ_MAC * D * V / 1e3)
    assert rep["silent_matmuls"] == [] and rep["mean_spike_rate"] == 1.0 and rep["dead_fraction"] == 0.0


def test_hybrid_pays_multiply_accumulates_T_times_on_real_inputs():
    rep = run(tiny("hybrid", theta=-1e3))
    mm = rep["matmuls"]
    assert mm["blocks.0.attn.qkv"] == pytest.approx(
        {"operand": "real", "ac_per_token": 0, "mac_per_token": T * D * Q, "ann_mac_per_token": D * Q,
         "zero_input_calls": 0}
    )  # fmt: skip
    assert mm["blocks.0.mlp.down"]["operand"] == "spikes" and mm["blocks.0.mlp.down"]["ac_per_token"] == T * F_ * D
    assert mm["lm_head"]["operand"] == "real" and mm["lm_head"]["mac_per_token"] == D * V  # once, on the T-mean


def test_a_silent_branch_is_reported():
    rep = run(tiny("spike-driven", theta=1e9))  # nothing ever fires
    assert rep["silent_matmuls"] == sorted(rep["matmuls"])
    assert rep["snn_synops_per_token"] == 0 and rep["dead_fraction"] == 1.0
    assert "silent branch" in format_report(None, rep)


def test_ann_twin_counts_each_matmul_once_per_token():
    cfg = StudentConfig(
        vocab_size=V, dim=D, depth=1, num_heads=H, mlp_ratio=2.0, mode="spike-driven", student_type="ann"
    )
    rep = run(SpikingStudentLM(cfg))
    c = 3.0
    assert {m["operand"] for m in rep["matmuls"].values()} == {"real"}
    assert rep["ann_macs_per_token"] == pytest.approx(D * Q + D * D + D * F_ + F_ * D + D * V + 2 * H * c * HD + H * c)
    assert "snn_macs_per_token" not in rep and rep["mean_spike_rate"] is None
