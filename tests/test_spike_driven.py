"""The spike-driven student: every weight matmul reads spikes, rate control, binary cache, metadata."""

from __future__ import annotations

import json

import pytest
import torch
from spiking_helpers import LinearInputs, V, calibrated, is_spike_code, make  # noqa: E402

from snn_distill.config import StudentConfig
from snn_distill.neurons import LIF, calibrate_threshold, lif_inference, lif_multistep, lif_multistep_loop
from snn_distill.student import pack_kv_cache, unpack_kv_cache


@pytest.mark.parametrize("training", [True, False])
def test_every_weight_matmul_reads_a_spike_code(training):
    torch.manual_seed(0)
    model = calibrated(make())
    model.train(training)
    rec = LinearInputs()
    with rec:
        logits = model(torch.randint(0, V, (2, 12)))
    # qkv, proj, up, down per block + the LM head
    assert len(rec.inputs) == 4 * 2 + 1
    for shape, x in rec.inputs:
        assert is_spike_code(x, model.timesteps), f"weight {shape} reads real values"
        assert x.any(), f"weight {shape} reads an all-zero input (silent branch)"
    head_shape, head_in = rec.inputs[-1]
    assert head_shape == (V, 32) and head_in.max() > 1  # per-token counts, not just binary
    assert logits.shape == (2, 12, V) and torch.isfinite(logits).all()


def test_hybrid_matmuls_read_real_values_where_documented():
    """The same hook tells the modes apart: the test above can fail."""
    torch.manual_seed(0)
    model = make(mode="hybrid").eval()
    rec = LinearInputs()
    with rec:
        model(torch.randint(0, V, (2, 12)))
    spiking = [is_spike_code(x, model.timesteps) for _, x in rec.inputs]
    # per block: qkv real, proj real, up real, down spikes; the head real
    assert spiking == [False, False, False, True] * 2 + [False]


def test_ann_twin_has_the_same_weights_and_no_spikes():
    snn, ann = make(learn_threshold=True), make(student_type="ann")
    lif_params = {n for n, _ in snn.named_parameters() if n.endswith(".theta") or n.endswith("decay_logit")}
    assert lif_params  # learnable thresholds are the only extra parameters
    snn_shapes = {n: p.shape for n, p in snn.named_parameters() if n not in lif_params}
    assert snn_shapes == {n: p.shape for n, p in ann.named_parameters()}
    assert ann.lif_modules() == [] and ann.timesteps == 1
    ann.load_state_dict({k: v for k, v in snn.state_dict().items() if k in ann.state_dict()})
    assert torch.isfinite(ann(torch.randint(0, V, (1, 5)))).all()


def test_metadata_round_trip_and_old_metadata_loads_as_hybrid():
    cfg = StudentConfig(vocab_size=V, mode="spike-driven", learn_threshold=True, learn_decay=True, target_rate=0.1)
    meta = {"architecture": cfg.architecture_dict(), "snn_config": cfg.snn_config_dict()}
    meta = json.loads(json.dumps(meta))
    assert meta["snn_config"]["mode"] == "spike-driven" and "mode" not in meta["architecture"]
    assert StudentConfig.from_metadata(meta) == cfg
    # metadata written before these keys existed: the student it described (hybrid, binary, fixed, 0.15)
    for key in ("mode", "learn_threshold", "ternary", "target_rate"):
        del meta["snn_config"][key]
    old = StudentConfig.from_metadata(meta)
    assert old.mode == "hybrid" and old.learn_threshold is False and old.ternary is False
    assert old.target_rate == 0.15
    with pytest.raises(ValueError, match="--snn-mode must be one of hybrid, spike-driven"):
        StudentConfig(vocab_size=V, mode="spiky")
    with pytest.raises(ValueError, match="--snn-target-rate"):
        StudentConfig(vocab_size=V, target_rate=0.0)


def test_each_layout_gets_its_measured_neuron_defaults_and_flags_override_them():
    from snn_distill.cli import configs_from_args, parse_train_args

    sd, hy = StudentConfig(vocab_size=V), StudentConfig(vocab_size=V, mode="hybrid")
    assert sd.mode == "spike-driven"  # the default layout, and its neurons
    assert (sd.ternary, sd.learn_threshold, sd.target_rate) == (True, True, 0.2)
    assert (hy.ternary, hy.learn_threshold, hy.target_rate) == (False, False, 0.15)
    assert sd.snn_config_dict()["ternary"] is True  # metadata records the resolved values
    own = StudentConfig(vocab_size=V, mode="spike-driven", ternary=False, learn_threshold=False, target_rate=0.1)
    assert (own.ternary, own.learn_threshold, own.target_rate) == (False, False, 0.1)

    def student(*flags):
        return configs_from_args(parse_train_args(["--teacher-model", "t", *flags]))[1]

    got = student("--snn-mode", "spike-driven", "--no-snn-ternary", "--no-snn-learn-threshold")
    assert StudentConfig(vocab_size=V, **got).ternary is False and got["learn_threshold"] is False
    assert StudentConfig(vocab_size=V, **student("--snn-mode", "spike-driven")).ternary is True
    assert StudentConfig(vocab_size=V, **student()).mode == "spike-driven"
    assert StudentConfig(vocab_size=V, **student("--snn-mode", "hybrid", "--snn-learn-threshold")).learn_threshold
    with pytest.raises(ValueError, match="--snn-ternary applies"):
        StudentConfig(vocab_size=V, **student("--snn-mode", "hybrid", "--snn-ternary"))


def test_calibration_sets_every_layer_near_the_target_rate_once(tmp_path):
    torch.manual_seed(0)
    model = make(target_rate=0.12)
    ids = torch.randint(0, V, (4, 16))
    model.train()
    model(ids)
    rates = model.spike_rates()
    assert len(rates) == 2 * 5 + 1  # in, qkv, out, mlp.in, mlp.up per block + head
    for name, r in rates.items():
        assert 0.08 <= r <= 0.16, (name, r)  # the target on the calibration batch itself
    # learned (the spike-driven default) or fixed, the thresholds are saved with the weights
    thetas = {n: t.clone() for n, t in model.state_dict().items() if n.endswith(".theta")}
    assert len(thetas) == 11 and all(bool(b) for n, b in model.named_buffers() if n.endswith("calibrated"))
    model(torch.randint(0, V, (4, 16)))  # a second batch does not recalibrate
    assert all(torch.equal(t, thetas[n]) for n, t in model.state_dict().items() if n in thetas)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = make(target_rate=0.12)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    fresh.train()
    fresh(torch.randint(0, V, (4, 16)))  # loaded as calibrated: keeps the saved thresholds
    assert all(torch.equal(t, thetas[n]) for n, t in fresh.state_dict().items() if n in thetas)


def test_calibrate_threshold_hits_the_rate_whatever_the_input_scale():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 30.0):
        cur = torch.randn(4, 256, 8, generator=g) * scale + 0.3 * scale
        theta = calibrate_threshold(cur, 0.5, target_rate=0.2)
        rate = lif_inference(cur, 0.5, theta).mean((0, 1))
        assert ((rate - 0.2).abs() <= 0.02).all(), (scale, rate)


def test_per_channel_threshold_fused_equals_loop_and_learnables_get_gradients():
    torch.manual_seed(0)
    cur = torch.randn(4, 6, 5)
    theta = torch.rand(5) + 0.3
    a, b = cur.clone().requires_grad_(), cur.clone().requires_grad_()
    g = torch.randn(4, 6, 5)
    sa = lif_multistep(a, decay=0.7, threshold=theta, fused=True)
    sb = lif_multistep_loop(b, decay=0.7, threshold=theta)
    (sa * g).sum().backward()
    (sb * g).sum().backward()
    assert torch.equal(sa, sb) and torch.equal(a.grad, b.grad)

    lif = LIF(4, 0.5, 1.0, channels=5, learn_threshold=True, learn_decay=True)
    x = torch.randn(8, 3, 5, requires_grad=True)
    lif(x).sum().backward()
    assert lif.theta.grad is not None and lif.theta.grad.abs().sum() > 0
    assert lif.decay_logit.grad is not None and lif.decay_logit.grad.abs().sum() > 0


def test_neuron_math_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 32) * 2
    lif = LIF(4, 0.5, 1.0)
    ref = lif(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lif(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.float(), lif(x.to(torch.bfloat16).float()))  # the fp32 recurrence on the bf16 input
    assert (got.float() != ref).float().mean() < 0.05  # only inputs rounded by bf16 itself differ


@pytest.mark.parametrize("coding", ["temporal", "count"])
@pytest.mark.parametrize("mode", ["hybrid", "spike-driven"])
def test_cache_is_binary_before_rope_and_decoding_equals_recompute(mode, coding):
    """Temporal coding caches 0/1 spikes (T rows per sequence, bit-packed); count coding caches the
    counts 0..T (one row per sequence, uint8)."""
    torch.manual_seed(0)
    count = coding == "count"
    model = calibrated(make(mode=mode, coding=coding), seed=1)
    ids = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(7))  # not the calibration batch
    with torch.no_grad():
        full = model(ids)
        logits, past = model.forward_step(ids[:, :6])
        outs = [logits]
        for i in range(6, 14):
            packed = pack_kv_cache(past, count_coded=count)
            assert all(k.dtype == torch.uint8 for kv in packed for k in kv)
            restored = unpack_kv_cache(packed, model.config.head_dim, count_coded=count)
            assert all(torch.equal(a, b) for kv, rkv in zip(past, restored) for a, b in zip(kv, rkv))
            logits, past = model.forward_step(ids[:, i : i + 1], restored)
            outs.append(logits)
    values = set(range(5)) if count else {0, 1}
    for k, v in past:
        assert set(k.unique().tolist()) <= values and set(v.unique().tolist()) <= values
        assert k.shape == (2 * model.passes, 2, 14, model.config.head_dim)
    assert model.passes == (1 if count else 4)
    if count:
        assert max(k.max() for k, _ in past) > 1  # counts, not just spikes
    inc = torch.cat(outs, 1)
    assert torch.equal(inc.argmax(-1), full.argmax(-1))
    assert (inc - full).abs().max() < 1e-4
    packed_bytes = sum(t.numel() for kv in pack_kv_cache(past, count_coded=count) for t in kv)
    values_cached = sum(t.numel() for kv in past for t in kv)
    assert packed_bytes * (1 if count else 8) == values_cached  # 1 byte per count, 1 bit per 0/1 value


@pytest.mark.slow
def test_spike_driven_trains_saves_reloads_generates_and_exports(tiny_teacher_dir, tmp_path, capsys):
    import numpy as np
    import onnxruntime as ort

    from snn_distill.backends.snn import SNNLLMBackend
    from snn_distill.cli import export_main, train_main

    out = tmp_path / "sd"
    argv = ["--teacher-model", str(tiny_teacher_dir), "--num-steps", "6", "--batch-size", "4", "--max-length", "24",
            "--student-dim", "32", "--student-heads", "4", "--snn-mode", "spike-driven", "--snn-learn-threshold",
            "--output-dir", str(out), "--device", "cpu", "--log-interval", "0", "--quiet",
            "--no-git-tracking"]  # fmt: skip
    assert train_main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["snn_config"]["mode"] == "spike-driven" and meta["snn_config"]["learn_threshold"] is True
    eff = meta["efficiency"]
    assert {m["operand"] for m in eff["matmuls"].values()} == {"spikes"} and eff["silent_matmuls"] == []
    assert eff["energy_ratio_snn_to_ann"] < 0.5

    backend = SNNLLMBackend(model_path=str(out / "student.pt"), device="cpu")
    assert backend.model.config.mode == "spike-driven"
    text = backend.generate("hello there", max_tokens=6, min_tokens=6)
    assert isinstance(text, str) and len(backend.last_token_ids) == 6

    capsys.readouterr()
    assert (
        export_main(["--model-path", str(out / "student.pt"), "--decode-graph", "--quantize", "int8", "--quiet"]) == 0
    )
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["export"]["max_abs_diff"] <= 1e-3 and meta["export"]["decode_max_abs_diff"] <= 1e-3
    sess = ort.InferenceSession(str(out / "student.decode.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in sess.get_inputs()[1:]] == ["tensor(uint8)"] * 4
    logits = ort.InferenceSession(str(out / "student.int8.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)}
    )[0]
    assert np.isfinite(logits).all()


def test_homeostasis_pulls_every_channel_toward_the_target_rate():
    torch.manual_seed(0)
    lif = LIF(4, 0.5, 1.0, channels=6, target_rate=0.2, homeostasis=0.5)
    lif.train()
    base = torch.randn(4 * 32, 6) + 0.5
    lif(base)  # calibrates on this input
    shifted = base * torch.tensor([4.0, 2.0, 1.0, 1.0, 0.3, 0.1])  # the weights grow or shrink
    first = lif(shifted).reshape(4, -1, 6).mean((0, 1))
    for _ in range(300):
        last = lif(shifted).reshape(4, -1, 6).mean((0, 1))
    assert (first - 0.2).abs().max() > 0.15  # the drift moved the rates far from the target
    assert (last - 0.2).abs().max() < 0.05, last
    theta = lif.theta.clone()
    lif.eval()
    lif(shifted)
    assert torch.equal(lif.theta, theta)  # frozen at inference
    with pytest.raises(ValueError, match="homeostasis needs a target_rate"):
        LIF(4, 0.5, 1.0, channels=6, homeostasis=0.1)
