"""Count-coded students (`coding = "count"`): one pass per token, spike counts that expand exactly
into T binary spikes, surrogate gradients equal to BPTT through the constant-current steps."""

from __future__ import annotations

import json

import pytest
import torch
from spiking_helpers import LinearInputs, V, calibrated, is_spike_code  # noqa: E402
from spiking_helpers import make as make_student  # noqa: E402

from snn_distill.config import StudentConfig
from snn_distill.counting import count_spikes, expand_spikes, lif_counts
from snn_distill.energy import MatmulCounter
from snn_distill.neurons import LIF, lif_multistep_loop
from snn_distill.student import SpikingStudentLM


def make(mode: str = "spike-driven", student_type: str = "snn", **kw) -> SpikingStudentLM:
    """A tiny count-coded student."""
    return make_student(mode, student_type, **{"coding": "count", **kw})


@pytest.mark.parametrize("decay", [0.5, 1.0])
@pytest.mark.parametrize("timesteps", [1, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_counts_expand_into_binary_trains_of_the_same_lif(decay, timesteps, per_channel):
    torch.manual_seed(0)
    current = torch.randn(5, 7, 6, dtype=torch.float64) * 1.5
    theta = torch.rand(6, dtype=torch.float64) + 0.3 if per_channel else 0.8
    counts = count_spikes(current, decay, theta, timesteps)
    trains = expand_spikes(current, decay, theta, timesteps)
    assert trains.shape == (timesteps, 5, 7, 6) and set(trains.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(trains.sum(0), counts)
    # the same trains as the temporal LIF given the token's current at every step
    temporal = lif_multistep_loop(current.expand(timesteps, *current.shape), decay=decay, threshold=theta)
    assert torch.equal(temporal, trains)
    # the training forward gives the same counts, and they span the staircase
    got = lif_counts(current.clone().requires_grad_(), decay=decay, threshold=theta, timesteps=timesteps)
    assert torch.equal(got.detach(), counts)
    assert counts.min() == 0 and counts.max() == timesteps


@pytest.mark.parametrize("surrogate", ["sigmoid", "fast_sigmoid", "triangular", "arctan"])
def test_count_gradient_equals_bptt_through_the_constant_current(surrogate):
    torch.manual_seed(1)
    current = torch.randn(9, 5, dtype=torch.float64)
    theta = torch.rand(5, dtype=torch.float64) + 0.4
    weights = torch.randn(9, 5, dtype=torch.float64)
    a = current.clone().requires_grad_()
    (lif_counts(a, decay=0.5, threshold=theta, timesteps=4, surrogate=surrogate) * weights).sum().backward()
    b = current.clone().requires_grad_()
    spikes = lif_multistep_loop(b.expand(4, 9, 5), decay=0.5, threshold=theta, surrogate=surrogate)
    (spikes.sum(0) * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert a.grad.abs().sum() > 0


@pytest.mark.parametrize("learn", ["threshold", "decay", "both"])
def test_learnable_threshold_and_leak_gradients_equal_bptt(learn):
    torch.manual_seed(2)
    current = torch.randn(9, 5, dtype=torch.float64)
    weights = torch.randn(9, 5, dtype=torch.float64)
    theta0 = torch.rand(5, dtype=torch.float64) + 0.4
    decay0 = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1

    def grads(fn):
        i = current.clone().requires_grad_()
        th = theta0.clone().requires_grad_(learn in ("threshold", "both"))
        de = decay0.clone().requires_grad_(learn in ("decay", "both"))
        (fn(i, de, th) * weights).sum().backward()
        return [t.grad for t in (i, th, de) if t.requires_grad]

    count = grads(lambda i, de, th: lif_counts(i, decay=de, threshold=th, timesteps=4))
    bptt = grads(lambda i, de, th: lif_multistep_loop(i.expand(4, 9, 5), decay=de, threshold=th).sum(0))
    assert len(count) == (3 if learn == "both" else 2)
    for a, b in zip(count, bptt):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert a.abs().sum() > 0


def test_count_lif_module_calibrates_records_and_adapts():
    torch.manual_seed(0)
    lif = LIF(4, 0.5, 1.0, channels=6, target_rate=0.2, homeostasis=0.5, count=True)
    lif.train()
    x = (torch.randn(64, 6) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])).requires_grad_()
    counts = lif(x)
    assert counts.shape == x.shape and counts.max() <= 4
    rates = counts.detach().mean(0) / 4
    assert (rates - 0.2).abs().max() < 0.05  # calibrated per channel whatever the input scale
    lif.record_stats = True
    lif.reset_stats()
    lif.eval()
    with torch.no_grad():
        c = lif(x)
    assert lif.num_observations == 64 * 4  # timesteps x tokens, as the temporal LIF counts them
    assert torch.equal(lif.fire_counts, c.sum(0).double())
    assert float(lif.last_spike_rate) == pytest.approx(float(c.mean()) / 4)


@pytest.mark.parametrize("training", [True, False])
def test_count_coded_spike_driven_student_reads_counts_in_one_pass(training):
    torch.manual_seed(0)
    model = calibrated(make())
    model.train(training)
    rec = LinearInputs()
    ids = torch.randint(0, V, (2, 12))
    with rec:
        logits = model(ids)
    assert model.passes == 1 and model.timesteps == 4
    assert len(rec.inputs) == 4 * 2 + 1  # qkv, proj, up, down per block + the LM head
    for _, x in rec.inputs:
        assert x.shape[0] == 2  # one row per sequence: no T-fold batch
        # counts 0..T, signed (-T..T) after the ternary LIFs on normalised inputs (the default)
        assert bool(((x == x.round()) & (x.abs() <= 4)).all()), "a weight matmul reads real values"
        assert x.max() > 1  # counts, not binary spikes
    assert logits.shape == (2, 12, V) and torch.isfinite(logits).all()
    if training:
        logits.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_count_coded_hybrid_keeps_its_real_valued_matmuls():
    torch.manual_seed(0)
    model = calibrated(make(mode="hybrid"))
    rec = LinearInputs()
    with rec:
        model(torch.randint(0, V, (2, 12)))
    codes = [bool(((x == x.round()) & (x >= 0) & (x <= 4)).all()) for _, x in rec.inputs]
    assert codes == [False, False, False, True] * 2 + [False]


def test_count_energy_counts_accumulates_per_spike_and_pairwise_scores():
    torch.manual_seed(0)
    model = calibrated(make())
    rec = LinearInputs()
    counter = MatmulCounter(model)
    with torch.no_grad(), counter, rec:
        model(torch.randint(0, V, (1, 10)))
    # qkv of block 0 is the first call: its accumulates are the input's spike total x fan-out (a -1 spike
    # of the default ternary code is one subtract)
    fan_out = model.blocks[0].attn.qkv.weight.shape[0]
    assert counter.ops["blocks.0.attn.qkv"].ac == pytest.approx(float(rec.inputs[0][1].abs().sum()) * fan_out)
    assert counter.ops["blocks.0.attn.qkv"].mac == 0
    from snn_distill.energy import _attention_and_neurons

    layers = {"blocks.0.attn.qkv": {"rate_q": 0.5, "rate_k": 0.25, "rate_v": 0.1, "neurons": 10}}
    cfg = model.config  # T=4, H=4, hd=8, depth 2 (block 1 has no stats: zero rates)
    ac, mac, _ = _attention_and_neurons(cfg, 4, layers, mean_context=3.0)
    assert ac["scores"] == pytest.approx(16 * 4 * 3.0 * 2 * 8 * 0.5 * 0.25)  # T^2 timestep pairs
    assert ac["attn_values"] == pytest.approx(4 * 4 * 3.0 * 8 * 0.1)
    assert mac["softmax"] == pytest.approx(2 * 4 * 3.0)  # once per token and block, not T times


def test_count_coding_round_trips_through_metadata_and_validates():
    cfg = make().config
    meta = {"architecture": cfg.architecture_dict(), "snn_config": cfg.snn_config_dict()}
    meta = json.loads(json.dumps(meta))
    assert meta["snn_config"]["coding"] == "count"
    assert StudentConfig.from_metadata(meta) == cfg
    del meta["snn_config"]["coding"]
    assert StudentConfig.from_metadata(meta).coding == "temporal"  # older metadata
    with pytest.raises(ValueError, match="--snn-coding must be one of"):
        StudentConfig(vocab_size=V, coding="rate")
    twin = make(student_type="ann")
    assert twin.passes == 1 and twin.lif_modules() == []


@pytest.mark.slow
def test_count_coded_student_trains_reloads_generates_and_exports(tiny_teacher_dir, tmp_path, capsys):
    import numpy as np
    import onnxruntime as ort

    from snn_distill.backends.onnx import ONNXSNNBackend
    from snn_distill.backends.snn import SNNLLMBackend
    from snn_distill.cli import export_main, train_main

    out = tmp_path / "count"
    argv = ["--teacher-model", str(tiny_teacher_dir), "--num-steps", "6", "--batch-size", "4", "--max-length", "24",
            "--student-dim", "32", "--student-heads", "4", "--snn-mode", "spike-driven", "--snn-coding", "count",
            "--snn-ternary",
            "--output-dir", str(out), "--device", "cpu", "--log-interval", "0", "--quiet",
            "--no-git-tracking"]  # fmt: skip
    assert train_main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["snn_config"]["coding"] == "count" and meta["snn_config"]["ternary"] is True
    eff = meta["efficiency"]
    assert {m["operand"] for m in eff["matmuls"].values()} == {"spikes"} and eff["silent_matmuls"] == []
    assert eff["energy_ratio_snn_to_ann"] < 0.5

    backend = SNNLLMBackend(model_path=str(out / "student.pt"), device="cpu")
    assert backend.model.config.count_coded
    text = backend.generate("hello there", max_tokens=6, min_tokens=6)
    assert isinstance(text, str) and len(backend.last_token_ids) == 6
    ids = list(backend.last_token_ids)

    capsys.readouterr()
    assert export_main(["--model-path", str(out / "student.pt"), "--decode-graph", "--quiet"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["export"]["max_abs_diff"] <= 1e-3 and meta["export"]["decode_max_abs_diff"] <= 1e-3
    sess = ort.InferenceSession(str(out / "student.decode.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in sess.get_inputs()[1:]] == ["tensor(uint8)"] * 4
    onnx_backend = ONNXSNNBackend(out)
    assert onnx_backend.cache_rows == 1
    onnx_backend.generate("hello there", max_tokens=6, min_tokens=6)
    assert list(onnx_backend.last_token_ids) == ids  # the same greedy tokens as the torch backend
    assert np.isfinite(np.array(ids)).all()


@pytest.mark.parametrize("count", [False, True])
def test_ternary_lif_keeps_the_sign_of_a_symmetric_input(count):
    from snn_distill.neurons import TernaryLIF

    torch.manual_seed(0)
    x = torch.randn(4 * 16, 8)
    tern = TernaryLIF(4, 0.5, 0.7, count=count)
    plain = LIF(4, 0.5, 0.7, count=count)
    got = tern(x)
    assert torch.equal(got, torch.sign(x) * plain(x.abs()))
    assert got.min() < 0 and got.max() > 0  # both halves of the input carry spikes
    assert got.abs().max() <= (4 if count else 1) and torch.equal(got, got.round())
    assert torch.equal(plain(x).clamp_min(0), plain(x))  # an unsigned LIF drops the negative half


@pytest.mark.parametrize("coding", ["temporal", "count"])
def test_ternary_spike_driven_student_reads_signed_codes_counted_as_accumulates(coding):
    torch.manual_seed(0)
    model = calibrated(make(coding=coding, ternary=True))
    rec = LinearInputs()
    counter = MatmulCounter(model)
    with torch.no_grad(), counter, rec:
        model(torch.randint(0, V, (2, 12)))
    t = model.timesteps
    assert all(is_spike_code(x, t) for _, x in rec.inputs)
    assert rec.inputs[0][1].min() < 0  # the first Q/K/V projection reads signed spikes
    assert {op.operand for op in counter.ops.values()} == {"spikes"}
    fan_out = model.blocks[0].attn.qkv.weight.shape[0]
    assert counter.ops["blocks.0.attn.qkv"].ac == pytest.approx(float(rec.inputs[0][1].abs().sum()) * fan_out)
    with pytest.raises(ValueError, match="--snn-ternary applies to"):
        StudentConfig(vocab_size=V, ternary=True, mode="hybrid")
