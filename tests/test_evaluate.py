"""Fidelity and efficiency figures, training_curves.png, and the standalone evaluator."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snn_distill.config import StudentConfig, TrainConfig
from snn_distill.distill import train
from snn_distill.evaluate import (
    evaluate_efficiency,
    evaluate_fidelity,
    measure_spikes,
    unigram_baseline,
)
from snn_distill.evaluate_cli import main as eval_main
from snn_distill.plots import write_training_curves
from snn_distill.student import SpikingStudentLM

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- fidelity math on hand-made logits ----


def test_uniform_student_has_vocab_size_perplexity_and_self_comparison_is_exact():
    v = 7
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # 8 real positions, 6 next-token pairs
    g = torch.Generator().manual_seed(0)
    table = torch.randn(v, v, generator=g) * 3

    def uniform(x):
        return torch.zeros(*x.shape, v)

    def bigram(x, m=None):
        return table[x]

    res = evaluate_fidelity(uniform, bigram, [(ids, mask)])
    assert res["student_perplexity"] == pytest.approx(v, rel=1e-6)
    assert res["tokens"] == 8
    # KL(teacher || uniform) = log V - H(teacher), averaged over the 8 real positions
    t_logp = torch.log_softmax(table[ids], -1)[mask.bool()]
    ent = -(t_logp.exp() * t_logp).sum(-1)
    assert res["kl_teacher_student"] == pytest.approx(float((math.log(v) - ent).mean()), rel=1e-5)
    # teacher ppl by hand: -log p(next | current) over the 6 real pairs
    nll = [-torch.log_softmax(table[ids[b, i]], -1)[ids[b, i + 1]] for b, n in ((0, 5), (1, 3)) for i in range(n - 1)]
    assert res["teacher_perplexity"] == pytest.approx(math.exp(float(torch.stack(nll).mean())), rel=1e-5)

    same = evaluate_fidelity(bigram, bigram, [(ids, mask)])
    assert same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    assert same["student_perplexity"] == pytest.approx(same["teacher_perplexity"], rel=1e-6)


def test_unigram_baseline_and_its_perplexity():
    lp = unigram_baseline([[0, 1, 1], [2]], vocab_size=4)  # add-one counts 2, 3, 2, 1 over 8
    assert torch.allclose(lp.exp(), torch.tensor([2, 3, 2, 1]) / 8.0)
    ids, mask = torch.tensor([[0, 1, 3]]), torch.ones(1, 3, dtype=torch.long)
    res = evaluate_fidelity(
        lambda x: torch.zeros(*x.shape, 4), lambda x, m: torch.zeros(*x.shape, 4), [(ids, mask)], unigram_logprobs=lp
    )
    assert res["unigram_perplexity"] == pytest.approx(math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2))
    assert evaluate_fidelity(lambda x: torch.zeros(*x.shape, 4), lambda x, m: torch.zeros(*x.shape, 4), []) == {}


# ---- efficiency accounting ----


def tiny_snn(**kw) -> SpikingStudentLM:
    cfg = dict(vocab_size=11, dim=8, depth=1, num_heads=2, mlp_ratio=2.0, num_timesteps=2, coding="temporal")
    cfg.update(kw)
    return SpikingStudentLM(StudentConfig(**cfg))


def test_measured_spikes_count_real_tokens_only():
    torch.manual_seed(0)
    model = tiny_snn(depth=2).eval()  # a training forward would calibrate the thresholds in between
    ids = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 4 + [0] * 2])
    got = measure_spikes(model, [(ids, mask)])
    assert got["tokens"] == 14
    assert got["mean_context"] == pytest.approx((21 + 2 * 10) / 14)  # sum of (position + 1)
    counts = [m.fire_counts.clone() for m in model.lif_modules()]
    assert all(m.num_observations == 2 * 14 for m in model.lif_modules())
    # the same counts as running the unpadded rows one by one
    model.set_record_stats(True)
    with torch.inference_mode():
        for row, n in ((0, 6), (1, 4), (2, 4)):
            model(ids[row : row + 1, :n])
    for m, c in zip(model.lif_modules(), counts):
        assert torch.equal(m.fire_counts, c)
    rep = evaluate_efficiency(model, [(ids, mask)], split="train")
    for m, c in zip(model.lif_modules(), counts):
        name = m.stat_name
        assert rep["layers"][name]["dead_fraction"] == pytest.approx(float((c == 0).double().mean()))
        assert rep["layers"][name]["spike_rate"] == pytest.approx(float(c.sum()) / (28 * c.numel()))
    assert not any(m.record_stats for m in model.lif_modules())


def test_ann_twin_reports_its_own_macs():
    model = SpikingStudentLM(
        StudentConfig(vocab_size=11, dim=8, depth=1, num_heads=2, mlp_ratio=2.0, student_type="ann", mode="hybrid")
    )  # the hybrid layout's twin, counted by hand below
    ids, mask = torch.randint(0, 11, (2, 3)), torch.ones(2, 3, dtype=torch.long)
    rep = evaluate_efficiency(model, [(ids, mask)])
    assert rep["mean_spike_rate"] is None and rep["layers"] == {} and rep["mean_context"] == 2.0
    assert rep["ann_macs_per_token"] == pytest.approx(8 * 24 + 2 * 2 * 4 * 2 + 2 * 2 + 64 + 128 + 128 + 88)
    assert "snn_macs_per_token" not in rep and "Horowitz" in rep["note"]


# ---- training writes both sections and the figure ----


def _train(teacher_dir, out, **kw):
    cfg = dict(
        teacher_model=str(teacher_dir),
        output_dir=str(out),
        num_steps=2,
        batch_size=2,
        log_interval=1,
        eval_batches=2,
        git_tracking=False,
        device="cpu",
    )
    cfg.update(kw)
    student = {"dim": 32, "depth": 1, "num_heads": 4}
    student.update(cfg.pop("student", {}))
    return train(TrainConfig(**cfg), student, progress=False)


def test_training_writes_evaluation_efficiency_and_curves(tiny_teacher_dir, tmp_path):
    out = tmp_path / "snn"
    run = _train(tiny_teacher_dir, out, held_out_fraction=0.0)  # no held-out split: falls back to training batches
    meta = json.loads((out / "metadata.json").read_text())
    ev, eff = meta["evaluation"], meta["efficiency"]
    assert ev["split"] == "train" and eff["split"] == "train"
    assert ev["student_perplexity"] > 1 and 0 <= ev["top1_agreement"] <= 1 and ev["unigram_perplexity"] > 1
    assert "before_training" in ev
    sites = ("attn.in", "attn.qkv", "attn.out", "mlp.in", "mlp.up")
    assert set(eff["layers"]) == {f"blocks.0.{n}" for n in sites} | {"head.in"}
    assert 0 <= eff["mean_spike_rate"] <= 1 and 0 <= eff["dead_fraction"] <= 1
    # the default spike-driven student: every weight matmul reads spike counts (accumulates), so its
    # only multiply-accumulates are the attention's (6 % of the twin's at this toy width and vocabulary;
    # one projection reading real values would add 12 %)
    assert eff["snn_synops_per_token"] > 0 and 0 < eff["snn_macs_per_token"] < 0.1 * eff["ann_macs_per_token"]
    assert eff["snn_energy_nj_per_token"] > 0 and "memory traffic" in eff["note"]
    png = out / "training_curves.png"
    assert run.paths["training_curves"] == png
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == PNG_MAGIC


def test_header_only_log_still_gives_a_figure(tmp_path):
    csv_path = tmp_path / "training_log.csv"
    csv_path.write_text("step,loss,kd_loss,ce_loss,lr,tokens_per_s,spike_rate,grad_norm\n")
    png = write_training_curves(csv_path, tmp_path / "empty.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_ann_run_has_both_sections_and_a_plot_failure_only_warns(tiny_teacher_dir, tmp_path, monkeypatch, caplog):
    import snn_distill.plots

    def broken(*a, **k):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(snn_distill.plots, "write_training_curves", broken)
    out = tmp_path / "ann"
    with caplog.at_level("WARNING"):
        run = _train(tiny_teacher_dir, out, held_out_fraction=0.2, eval_interval=1, student={"student_type": "ann"})
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["evaluation"]["split"] == "held_out" and meta["efficiency"]["split"] == "held_out"
    assert meta["evaluation"]["during_training"][0]["step"] == 1
    assert meta["efficiency"]["ann_macs_per_token"] > 0 and meta["efficiency"]["mean_spike_rate"] is None
    assert "training_curves" not in run.paths and not (out / "training_curves.png").exists()
    assert any("training_curves.png" in r.getMessage() and "no fonts today" in r.getMessage() for r in caplog.records)


# ---- the standalone evaluator ----


@pytest.fixture(scope="module")
def trained_artifacts(tiny_teacher_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_cli")
    texts = d / "texts.txt"
    texts.write_text(
        "\n".join(
            f"Remind me to call {n} about the {e} at {t}."
            for n in ("Maya", "Sam", "Leo")
            for e in ("lunch", "meeting")
            for t in ("noon", "six")
        )
        + "\n"
    )
    out = d / "run"
    _train(tiny_teacher_dir, out, dataset_path=str(texts), held_out_fraction=0.25, num_steps=3)
    return out, texts


def test_evaluator_script_prints_table_and_updates_metadata(trained_artifacts, tiny_teacher_dir):
    out, texts = trained_artifacts
    meta_path = out / "metadata.json"
    before = json.loads(meta_path.read_text())
    before_meta = {k: v for k, v in before.items() if k not in ("evaluation", "efficiency")}
    cmd = [
        sys.executable,
        "scripts/evaluate_snn_student.py",
        "--artifacts",
        str(out),
        "--teacher-model",
        str(tiny_teacher_dir),
        "--dataset-path",
        str(texts),
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in ("perplexity", "KL(teacher||student)", "top-1 agreement", "blocks.0.mlp.up", "energy"):
        assert needle in proc.stdout, needle
    meta = json.loads(meta_path.read_text())
    ev, eff = meta["evaluation"], meta["efficiency"]
    assert ev["split"] == "held_out" and ev["dataset"] == str(texts)  # same held-out texts as training
    # the held-out quarter of 12 prompts, one block each
    assert ev["tokens"] == before["evaluation"]["tokens"]
    assert ev["student_perplexity"] == pytest.approx(before["evaluation"]["student_perplexity"], rel=1e-4)
    assert eff["tokens"] == ev["tokens"] and eff["mean_spike_rate"] is not None
    assert {k: v for k, v in meta.items() if k not in ("evaluation", "efficiency")} == before_meta


def _one_line_error(argv, capsys) -> str:
    try:
        rc = eval_main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    assert rc != 0 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_evaluator_bad_input_is_one_line(trained_artifacts, tiny_teacher_dir, tmp_path, capsys):
    out, texts = trained_artifacts
    q = ["--quiet"]
    assert "--artifacts" in _one_line_error(q, capsys)
    assert "not a folder" in _one_line_error(["--artifacts", str(tmp_path / "nope"), *q], capsys)
    (tmp_path / "empty").mkdir()
    assert "student.pt" in _one_line_error(["--artifacts", str(tmp_path / "empty"), *q], capsys)
    bad_teacher = ["--artifacts", str(out), "--teacher-model", str(tmp_path / "missing.gguf"), *q]
    assert "does not exist" in _one_line_error(bad_teacher, capsys)
    t = ["--artifacts", str(out), "--teacher-model", str(tiny_teacher_dir), *q]
    assert "missing.txt" in _one_line_error([*t, "--dataset-path", str(tmp_path / "missing.txt")], capsys)
    assert "--batch-size" in _one_line_error([*t, "--batch-size", "0"], capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "student.pt").write_bytes((out / "student.pt").read_bytes())
    (broken / "metadata.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(["--artifacts", str(broken), *q], capsys)


def test_a_qat_students_matmuls_are_named_and_its_weights_kept():
    """Efficiency of a QAT student (fake-quantized weights are new tensors each forward): every weight
    matmul is still named by its parameter, the measurement uses the int8-rounded weights, and the float
    shadow weights and the fake quantization come back afterwards (training goes on from them)."""
    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=11, dim=8, depth=2, num_heads=2, mode="spike-driven", qat_int8=True)
    model = SpikingStudentLM(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = torch.randint(0, 11, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    rep = evaluate_efficiency(model, [(ids, mask)])
    names = set(rep["matmuls"])
    assert names == {n for n, *_ in model.weight_matmuls()}, names
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.qat and all(m.qat for m in model.modules() if hasattr(m, "in_scale"))
