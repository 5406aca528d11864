"""The rate floor: after each optimizer step, a channel that fired below `rate_floor` during it has its
threshold lowered (one-sided, so firing channels and the energy budget are left alone), annealed with the
learning rate, frozen in eval mode, and recorded in the metadata and the resume fingerprint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from snn_distill.checkpoint import run_fingerprint
from snn_distill.config import StudentConfig, TrainConfig
from snn_distill.neurons import FLOOR_STEP, LIF, TernaryLIF

pytestmark = pytest.mark.usefixtures("one_thread")


def _currents(tokens: int = 64) -> torch.Tensor:
    """[tokens, 3]: channel 0 too weak to reach threshold 1 (membrane at most 2 x 0.15 with decay
    0.5), channel 1 firing on every token, channel 2 never driven at all."""
    g = torch.Generator().manual_seed(0)
    weak = 0.05 + 0.1 * torch.rand(tokens, generator=g)
    strong = 0.8 + 0.4 * torch.rand(tokens, generator=g)
    return torch.stack([weak, strong, torch.zeros(tokens)], dim=1)


@pytest.mark.parametrize("cls", [LIF, TernaryLIF])
def test_the_floor_wakes_a_silent_channel_and_leaves_a_firing_one_alone(cls):
    lif = cls(4, 0.5, 1.0, channels=3, learn_threshold=True, rate_floor=0.05, count=True)
    lif.train()
    x = _currents().requires_grad_()
    rates = []
    for _ in range(60):
        out = lif(x)
        out.sum().backward()
        lif.apply_rate_floor()  # after the optimizer step, as the trainer does
        rates.append((out.detach() / 4).mean(0))
    theta = lif.theta.detach()
    assert rates[0][0] == 0 and rates[0][1] >= 0.5  # channel 0 starts silent
    assert rates[-1][0] >= 0.05, rates[-1]  # ... and fires at the floor or above by the end
    assert theta[1] == 1.0  # a channel above the floor keeps its threshold exactly
    # channel 0 lost one FLOOR_STEP per silent step, and none once it fired at the floor
    silent = sum(bool(r[0] < 0.05) for r in rates)
    assert theta[0] == pytest.approx(math.exp(-FLOOR_STEP * silent), rel=1e-5)
    assert 1e-3 <= theta[2] < theta[0]  # an undriven channel keeps falling, down to the clamp at most
    lif.eval()
    lif(x)
    lif.apply_rate_floor()
    assert torch.equal(lif.theta.detach(), theta)  # frozen at inference


def test_the_floor_judges_the_rate_over_the_whole_step():
    # two micro-batches of one step: channel 0 fires on 2 of 64 tokens (rate 1/32) in the first and on
    # none in the second: 1/64 over the step, above a floor of 0.01 though the second alone is below it
    busy = _currents()
    busy[:2, 0] = 2.0
    lif = LIF(4, 0.5, 1.0, channels=3, rate_floor=0.01, count=True)
    lif.train()
    lif(busy)
    lif(_currents())
    assert lif.theta[0] == 1.0  # nothing moves before the step ends
    lif.apply_rate_floor()
    assert lif.theta[0] == 1.0 and lif.theta[2] == pytest.approx(math.exp(-FLOOR_STEP))
    lif(_currents())  # a step of silent micro-batches: below the floor
    lif(_currents())
    lif.apply_rate_floor()
    assert lif.theta[0] == pytest.approx(math.exp(-FLOOR_STEP))
    lif.apply_rate_floor()  # a step without training forwards changes nothing
    assert lif.theta[0] == pytest.approx(math.exp(-FLOOR_STEP))


def test_floor_step_zero_and_floor_zero_leave_the_thresholds():
    x = _currents()
    for kw, step in (({"rate_floor": 0.05}, 0.0), ({}, FLOOR_STEP)):
        lif = LIF(4, 0.5, 1.0, channels=3, count=True, **kw)
        lif.floor_step = step
        lif.train()
        for _ in range(5):
            lif(x)
            lif.apply_rate_floor()
        assert torch.equal(lif.theta, torch.ones(3))
    with pytest.raises(ValueError, match="rate_floor"):
        LIF(4, 0.5, 1.0, rate_floor=0.05)  # a floor is per channel


def test_the_floor_is_a_spike_driven_default_and_in_the_metadata():
    assert StudentConfig(vocab_size=97).rate_floor == 0.01  # spike-driven, the default layout
    assert StudentConfig(vocab_size=97, mode="hybrid").rate_floor == 0.0  # hybrid: off
    assert StudentConfig(vocab_size=97, mode="spike-driven", rate_floor=0.0).rate_floor == 0.0
    with pytest.raises(ValueError, match="--snn-rate-floor must be in"):
        StudentConfig(vocab_size=97, mode="spike-driven", rate_floor=0.6)
    with pytest.raises(ValueError, match="--snn-rate-floor moves per-channel thresholds"):
        StudentConfig(vocab_size=97, mode="hybrid", coding="temporal", rate_floor=0.01)  # one threshold per layer
    cfg = StudentConfig(vocab_size=97, dim=32, num_heads=4, mode="spike-driven")
    meta = {"architecture": {"vocab_size": 97, "dim": 32, "num_heads": 4}, "snn_config": cfg.snn_config_dict()}
    assert StudentConfig.from_metadata(meta).rate_floor == 0.01
    del meta["snn_config"]["rate_floor"]  # metadata from before the floor: trained without one
    assert StudentConfig.from_metadata(meta).rate_floor == 0.0


def test_the_floor_enters_the_resume_fingerprint_only_when_on():
    train = TrainConfig(teacher_model="t")
    on = run_fingerprint(train, StudentConfig(vocab_size=97, mode="spike-driven"), 1)
    off = run_fingerprint(train, StudentConfig(vocab_size=97, mode="spike-driven", rate_floor=0.0), 1)
    assert on["student.rate_floor"] == 0.01
    assert "student.rate_floor" not in off  # checkpoints from before the floor stay resumable


def test_training_anneals_the_floor_step_with_the_learning_rate(tiny_teacher_dir, tmp_path):
    from snn_distill.distill import train

    cfg = TrainConfig(
        teacher_model=str(tiny_teacher_dir), output_dir=str(tmp_path / "s"), num_steps=4, batch_size=2,
        max_length=16, lr=1e-3, scheduler="linear", log_interval=0, git_tracking=False, device="cpu",
    )  # fmt: skip
    run = train(cfg, {"dim": 16, "depth": 1, "num_heads": 2, "mode": "spike-driven"}, progress=False)
    lifs = run.student.lif_modules()
    assert lifs and all(m.rate_floor == 0.01 for m in lifs)
    # linear decay without warmup: the last of 4 steps ran at a quarter of the peak rate
    assert all(m.floor_step == pytest.approx(FLOOR_STEP / 4) for m in lifs)
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["snn_config"]["rate_floor"] == 0.01
