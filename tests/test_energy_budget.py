"""The energy budget in training: the differentiable estimate equals the evaluation's accounting, its
hinge penalty pushes spikes down only above the budget, and a budgeted run ends near its budget."""

from __future__ import annotations

import json

import pytest
import torch

from snn_distill.checkpoint import run_fingerprint
from snn_distill.config import StudentConfig, TrainConfig
from snn_distill.distill import BUDGET_MARGIN, energy_budget_at, energy_penalty, mean_context
from snn_distill.energy import training_energy_ratios
from snn_distill.evaluate import efficiency_report, measure_spikes
from snn_distill.neurons import LIF, TernaryLIF
from snn_distill.student import SpikingStudentLM

pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(**kw) -> tuple[SpikingStudentLM, torch.Tensor]:
    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=97, dim=32, depth=2, num_heads=4, num_kv_heads=2, num_timesteps=4, **kw)
    model = SpikingStudentLM(cfg)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    model(ids)  # calibrates the thresholds
    model.eval()  # same spikes in both passes below
    return model, ids


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="spike-driven", coding="count"),
        dict(mode="spike-driven", coding="count", ternary=False, learn_threshold=False),
        dict(mode="spike-driven", coding="temporal"),
        dict(mode="hybrid", coding="temporal"),
        dict(mode="hybrid", coding="count"),
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_training_estimate_equals_the_evaluation_accounting(kw):
    model, ids = calibrated(**kw)
    rep = efficiency_report(model, measure_spikes(model, [(ids, torch.ones_like(ids))]))
    model.keep_spike_counts(True)
    with torch.enable_grad():
        model(ids)
    whole, body = training_energy_ratios(model, mean_context(torch.ones_like(ids)))
    assert whole.requires_grad and body.requires_grad
    assert float(whole.detach()) == pytest.approx(rep["energy_ratio_snn_to_ann"], rel=1e-5)
    assert float(body.detach()) == pytest.approx(rep["without_lm_head"]["energy_ratio_snn_to_ann"], rel=1e-5)


def test_mean_context_counts_the_real_tokens_of_right_padded_rows():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert mean_context(mask) == pytest.approx((1 + 2 + 3 + 4 + 1 + 2) / 6)


def test_hinge_pushes_spikes_down_only_above_the_budget():
    model, ids = calibrated(mode="spike-driven", coding="count")
    model.train()
    model.keep_spike_counts(True)
    model(ids)
    whole, body = (float(r.detach()) for r in training_energy_ratios(model, 8.5))
    for budget, budget_body, active in ((whole + 0.01, body + 0.01, False), (whole - 0.05, None, True),
                                        (None, body - 0.05, True)):  # fmt: skip
        model.zero_grad()
        model(ids)
        cfg = TrainConfig(teacher_model="t", energy_budget=budget, energy_budget_body=budget_body, energy_weight=2.0)
        penalty, ratios = energy_penalty(model, 8.5, cfg)
        assert torch.allclose(ratios, torch.tensor([whole, body]))
        if not active:
            assert float(penalty.detach()) == 0.0
            continue
        aim = 1.0 - BUDGET_MARGIN  # the penalty aims just under the budget
        excess = (whole - aim * budget) if budget is not None else (body - aim * budget_body)
        assert float(penalty.detach()) == pytest.approx(2.0 * excess, rel=1e-5)
        penalty.backward()
        up = model.blocks[0].mlp.up.weight.grad
        assert up is not None and float(up.abs().sum()) > 0  # reaches the weights through the surrogate
        if budget_body is not None:  # the body's budget never touches the head's input neurons
            assert model.head_gain.grad is None or float(model.head_gain.grad.abs().sum()) == 0


@pytest.mark.parametrize("count", [True, False], ids=["count", "temporal"])
@pytest.mark.parametrize("ternary", [False, True], ids=["binary", "ternary"])
def test_the_budget_gradient_never_reaches_a_silent_neuron(count, ternary):
    """Through the surrogate, a penalty on spike counts would push every silent neuron further below
    its threshold (the dead neurons of a budgeted run); the kept counts carry gradient only where
    a neuron fired, like an L1 penalty on a ReLU's output."""
    t, rows = 4, 6
    lif = (TernaryLIF if ternary else LIF)(t, 0.5, 1.0, channels=3, count=count)
    lif.keep_counts = True
    # channel 0 fires, channel 1 sits just under the threshold (inside the surrogate's window), and
    # channel 2 fires on half the rows
    cur = torch.tensor([1.6, 0.45, 0.0]).repeat(rows, 1)
    cur[::2, 2] = 1.6
    if ternary:
        cur[1::2] = -cur[1::2]  # a ternary neuron fires on the magnitude: the sign must not matter
    x = (cur if count else cur.repeat(t, 1)).requires_grad_(True)
    out = lif(x)
    assert float(out.detach()[..., 1].abs().sum()) == 0 and float(out.detach()[..., 0].abs().sum()) > 0
    (surrogate,) = torch.autograd.grad((out * x.detach().sign()).sum(), x, retain_graph=True)
    assert float(surrogate[..., 1].abs().sum()) > 0  # the surrogate alone would reach channel 1
    lif.last_counts.sum().backward()
    g = x.grad
    assert float(g[..., 1].abs().sum()) == 0  # silent everywhere: untouched by the budget
    assert float(g[..., 0].abs().min()) > 0  # firing: the budget pushes down
    lead = rows if count else rows * t
    fired = (torch.arange(lead) % 2 == 0) if count else (torch.arange(lead) % rows % 2 == 0)
    assert float(g[~fired, 2].abs().sum()) == 0 and float(g[fired, 2].abs().min()) > 0
    kept = lif.last_counts.detach()
    assert float(kept[1]) == 0 and float(kept[0]) > 0


def test_the_ramp_tightens_the_budget_linearly_then_holds_it():
    assert BUDGET_MARGIN == 0.01
    assert energy_budget_at(0.25, 0.0, 0.5) == pytest.approx(1.0)  # starts at the twin's energy
    assert energy_budget_at(0.25, 0.25, 0.5) == pytest.approx(0.62375)
    assert energy_budget_at(0.25, 0.5, 0.5) == pytest.approx(0.2475)  # 1 % under the budget
    assert energy_budget_at(0.25, 0.9, 0.5) == pytest.approx(0.2475)
    assert energy_budget_at(0.25, 0.0, 0.0) == pytest.approx(0.2475)  # no ramp: from the first step
    assert energy_budget_at(1.5, 0.0, 0.5) == pytest.approx(1.485)  # above the twin: never tighter than asked

    model, ids = calibrated(mode="spike-driven", coding="count")
    model.train()
    model.keep_spike_counts(True)
    model(ids)
    whole = float(training_energy_ratios(model, 8.5)[0].detach())
    cfg = TrainConfig(teacher_model="t", energy_budget=0.5 * whole, energy_ramp=0.5, energy_weight=1.0)
    early, _ = energy_penalty(model, 8.5, cfg, progress=0.1)  # budget 1 - 0.8 (1 - whole / 2) > whole
    late, _ = energy_penalty(model, 8.5, cfg, progress=0.6)
    assert float(early.detach()) == 0.0
    assert float(late.detach()) == pytest.approx(whole - 0.5 * whole * (1 - BUDGET_MARGIN), rel=1e-5)
    with pytest.raises(ValueError, match="--snn-energy-ramp is a share of the steps"):
        TrainConfig(teacher_model="t", energy_ramp=-0.1)


def test_the_ramp_enters_the_resume_fingerprint_only_when_set():
    student = StudentConfig(vocab_size=97, dim=32, num_heads=4, mode="spike-driven")
    plain = run_fingerprint(TrainConfig(teacher_model="t", energy_budget=0.3, energy_ramp=0.0), student, 1)
    ramped = run_fingerprint(TrainConfig(teacher_model="t", energy_budget=0.3, energy_ramp=0.5), student, 1)
    assert "energy_ramp" not in plain  # budgeted checkpoints from before the ramp stay resumable
    assert ramped["energy_ramp"] == 0.5


@pytest.mark.slow
def test_a_budgeted_run_ends_near_its_budget_and_below_the_free_run(tiny_teacher_dir, tmp_path):
    from snn_distill.cli import train_main

    def train(name, *extra):
        out = tmp_path / name
        argv = ["--teacher-model", str(tiny_teacher_dir), "--num-steps", "40", "--batch-size", "4", "--max-length",
                "32", "--pack", "--student-dim", "32", "--student-heads", "4", "--snn-mode", "spike-driven",
                "--snn-target-rate", "0.3", "--lr", "3e-3", "--output-dir", str(out), "--device", "cpu",
                "--log-interval", "10", "--quiet", "--no-git-tracking", *extra]  # fmt: skip
        assert train_main(argv) == 0
        meta = json.loads((out / "metadata.json").read_text())
        return meta, (out / "training_log.csv").read_text().splitlines()

    free, _ = train("free")
    ratio = free["efficiency"]["energy_ratio_snn_to_ann"]
    budget = round(0.6 * ratio, 3)
    held, log = train("budget", "--snn-energy-budget", str(budget))
    assert held["training_config"]["energy_budget"] == budget
    assert held["training_config"]["energy_ramp"] == 0.3 and held["training_config"]["energy_weight"] == 2.0
    assert free["training_config"]["energy_ramp"] is None  # no budget: nothing ramps
    got = held["efficiency"]["energy_ratio_snn_to_ann"]
    assert got <= budget * 1.15, (got, budget, ratio)
    assert got < 0.8 * ratio
    header, last = log[0].split(","), log[-1].split(",")
    assert float(last[header.index("energy_ratio")]) <= budget * 1.15  # logged while training
