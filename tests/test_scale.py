"""Scaling up: 2-process DDP training, checkpoints + resume (exact), SIGINT, the memory plan / --dry-run,
teacher dtype/device/quantization options, larger students with gradient checkpointing. All on CPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snn_distill.checkpoint import CHECKPOINT_FILE, load_checkpoint
from snn_distill.cli import configs_from_args, parse_train_args, train_main
from snn_distill.config import StudentConfig, TrainConfig
from snn_distill.distill import TrainingInterrupted, train
from snn_distill.memory_plan import GIB, plan_memory, student_activation_values, teacher_shape
from snn_distill.student import SpikingStudentLM
from snn_distill.teacher import load_teacher, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--student-dim", "32", "--student-heads", "4", "--max-length", "24", "--no-git-tracking", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    """training_curves.png costs a second of matplotlib per in-process run; not what these tests check."""
    import snn_distill.plots as plots

    monkeypatch.setattr(plots, "write_training_curves", lambda csv_path, png: Path(png).touch())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _csv_losses(path: Path) -> list[tuple[int, str]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "student.pt", weights_only=True)


# ---- data parallel -----------------------------------------------------------------------------


def test_two_processes_match_one_process_on_the_combined_batch(tiny_teacher_dir, tmp_path):
    """torchrun 2 x (batch 2, accumulation 2) == 1 x (batch 4, accumulation 2): rank r takes every
    other block of the same shuffled order, the loss is normalised by all ranks' tokens, and DDP
    all-reduces every gradient (the tied embedding/LM head included). The hybrid layout with temporal
    coding: a spike-driven or count-coded student calibrates its thresholds on each rank's first
    micro-batch (averaged over ranks), which is
    not the single process's calibration on its own first micro-batch."""
    common = [
        "--snn-mode",
        "hybrid",
        "--snn-coding",
        "temporal",
        "--teacher-model",
        str(tiny_teacher_dir),
        "--num-steps",
        "3",
        "--grad-accum-steps",
        "2",
        "--snn-timesteps",
        "2",
        "--log-interval",
        "1",
        "--held-out-fraction",
        "0.02",
        "--quiet",
        *TINY,
    ]
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    ddp = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "scripts/train_snn_student.py",
            *common,
            "--batch-size",
            "2",
            "--output-dir",
            str(ddp_out),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    one = subprocess.run(
        [sys.executable, "scripts/train_snn_student.py", *common, "--batch-size", "4", "--output-dir", str(one_out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-2000:]
    assert out.count("trained SpikingStudentLM") == 1  # rank 0 alone reports and writes
    meta = json.loads((ddp_out / "metadata.json").read_text())
    assert meta["training_config"]["world_size"] == 2
    assert meta["training_config"]["effective_batch_size"] == 2 * 2 * 2
    assert json.loads((one_out / "metadata.json").read_text())["training_config"]["world_size"] == 1
    # same tokens seen, same losses (up to float summation order), same parameters
    l_ddp, l_one = _csv_losses(ddp_out / "training_log.csv"), _csv_losses(one_out / "training_log.csv")
    assert [s for s, _ in l_ddp] == [1, 2, 3]
    for (_, a), (_, b) in zip(l_ddp, l_one):
        assert float(a) == pytest.approx(float(b), rel=1e-4)
    w_ddp, w_one = _weights(ddp_out), _weights(one_out)
    assert w_ddp.keys() == w_one.keys()
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-4, atol=2e-6, msg=k)
    # and training moved them (a no-op run would also "match")
    init = SpikingStudentLM(StudentConfig.from_metadata(meta)).state_dict()
    assert any(not torch.equal(init[k], w_one[k]) for k in w_one)


# ---- checkpoints and resume ----------------------------------------------------------------------


def _cfg(teacher: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        teacher_model=str(teacher),
        output_dir=str(out),
        device="cpu",  # the exact-resume tests rely on CPU determinism
        num_steps=4,
        eval_batches=2,
        batch_size=2,
        max_length=24,
        log_interval=1,
        seed=3,
        git_tracking=False,
        scheduler="cosine",
        warmup_steps=2,
        hard_label_weight=0.2,
    )
    base.update(kw)
    return TrainConfig(**base)


STUDENT = dict(dim=32, depth=2, num_heads=4, num_timesteps=2)


def _interrupt_after(monkeypatch, n_steps: int) -> None:
    """Send ourselves SIGINT during step `n_steps`, as a user pressing Ctrl-C would."""
    import snn_distill.distill as distill

    real, calls = distill.distill_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n_steps:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "distill_step", step)


# spike-driven: its rate floor moves thresholds after each step, which a resumed run must reproduce
@pytest.mark.parametrize("mode", ["hybrid", "spike-driven"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_teacher_dir, tmp_path, monkeypatch, mode):
    student = {**STUDENT, "mode": mode}
    teacher = load_teacher(str(tiny_teacher_dir))
    full = train(_cfg(tiny_teacher_dir, tmp_path / "full"), student, teacher=teacher, progress=False)

    out = tmp_path / "split"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(TrainingInterrupted) as info:
            train(_cfg(tiny_teacher_dir, out), student, teacher=teacher, progress=False)
    assert info.value.exit_code == 130 and "--resume" in str(info.value) and "step 2/4" in str(info.value)
    assert load_checkpoint(out)["step"] == 2 and not (out / "student.pt").exists()
    resumed = train(_cfg(tiny_teacher_dir, out, resume=True), student, teacher=teacher, progress=False)

    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]  # exact
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert _csv_losses(out / "training_log.csv") == _csv_losses(tmp_path / "full" / "training_log.csv")
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    r_full, r_res = full.metadata["training_results"], resumed.metadata["training_results"]
    for k in ("steps", "avg_loss", "first_loss", "final_loss", "tokens_seen"):
        assert r_full[k] == r_res[k], k
    assert resumed.metadata["training_config"]["resumed_from_step"] == 2
    assert resumed.metadata["evaluation"]["before_training"] == full.metadata["evaluation"]["before_training"]


def test_checkpoint_every_and_extending_a_constant_schedule_run(tiny_teacher_dir, tmp_path):
    """--checkpoint-every writes step-N checkpoints (and one after the last step); with a constant
    schedule a finished run continues to a larger --num-steps, exactly like one longer run."""
    teacher = load_teacher(str(tiny_teacher_dir))
    kw = dict(scheduler="constant", warmup_steps=0, checkpoint_every=2)
    long = train(_cfg(tiny_teacher_dir, tmp_path / "long", **kw), STUDENT, teacher=teacher, progress=False)
    assert load_checkpoint(tmp_path / "long")["step"] == 4
    out = tmp_path / "ext"
    train(_cfg(tiny_teacher_dir, out, num_steps=2, **kw), STUDENT, teacher=teacher, progress=False)
    assert load_checkpoint(out)["step"] == 2
    ext = train(_cfg(tiny_teacher_dir, out, resume=True, **kw), STUDENT, teacher=teacher, progress=False)
    assert [h["loss"] for h in ext.history] == [h["loss"] for h in long.history]
    a, b = _weights(tmp_path / "long"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_run_or_a_missing_checkpoint(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--teacher-model",
        str(tiny_teacher_dir),
        "--output-dir",
        str(out),
        "--num-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--batch-size",
        "2",
        "--quiet",
        *TINY,
    ]
    assert train_main(["--resume", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checkpoint.pt" in err and "without --resume" in err
    assert train_main(args) == 0
    capsys.readouterr()
    assert train_main([*args, "--resume", "--lr", "3e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different run" in err and "--lr" in err and "Traceback" not in err
    assert train_main([*args, "--resume", "--num-steps", "1"]) == 2
    assert "past --num-steps 1" in capsys.readouterr().err
    (out / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    assert train_main([*args, "--resume"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_sigint_writes_a_checkpoint_and_says_how_to_resume(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "scripts/train_snn_student.py",
        "--teacher-model",
        str(tiny_teacher_dir),
        "--output-dir",
        str(out),
        "--num-steps",
        "12",
        "--batch-size",
        "2",
        "--log-interval",
        "1",
        *TINY,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "step 1/12" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=240)[1]
    err = "".join(lines) + rest
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(last) == 1 and "interrupted by SIGINT" in last[0] and "--resume" in last[0], err[-2000:]
    ckpt = load_checkpoint(out)
    assert 1 <= ckpt["step"] < 12 and f"step {ckpt['step']}/12" in last[0]
    assert not (out / "student.pt").exists()

    assert train_main([*cmd[2:], "--resume", "--quiet"]) == 0  # the same flags, in this process
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["training_results"]["steps"] == 12
    assert [s for s, _ in _csv_losses(out / "training_log.csv")] == list(range(1, 13))
    # the resumed run's metadata, reused as --config, does not make the next run resume
    assert meta["config"]["resume"] is True
    assert parse_train_args(["--config", str(out / "metadata.json")]).resume is False


# ---- memory plan and --dry-run ---------------------------------------------------------------------


def test_builtin_teacher_shapes_are_exact():
    llama, qwen = teacher_shape("meta-llama/Llama-3.2-3B"), teacher_shape("Qwen/Qwen2.5-3B-Instruct")
    assert (llama.params, llama.vocab_size, llama.num_layers) == (3_212_749_824, 128256, 28)
    assert (qwen.params, qwen.vocab_size, qwen.num_layers) == (3_085_938_688, 151936, 36)
    assert teacher_shape("HuggingFaceTB/SmolLM2-135M").params == 134_515_008


def test_dry_run_prints_the_plan_without_loading_weights(tiny_teacher_dir, capsys, monkeypatch):
    import snn_distill.teacher as teacher_mod

    def boom(*a, **k):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(teacher_mod, "load_teacher", boom)
    spec = [
        "--teacher-model",
        "meta-llama/Llama-3.2-3B",
        "--batch-size",
        "4",
        "--grad-accum-steps",
        "8",
        "--max-length",
        "512",
        "--snn-timesteps",
        "8",
        "--dry-run",
    ]
    assert train_main(spec) == 0
    out = capsys.readouterr().out
    assert "teacher weights" in out and "3.21B" in out and "bfloat16" in out
    # the budget is the GPU's memory where one is visible, else 16 GiB
    budget = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}" if torch.cuda.is_available() else "16"
    assert "effective batch 32 sequences" in out and f"fits in {budget} GiB" in out
    assert (
        train_main(
            [
                "--teacher-model",
                "Qwen/Qwen2.5-3B",
                "--batch-size",
                "2",
                "--max-length",
                "1024",
                "--snn-timesteps",
                "8",
                "--teacher-quantization",
                "4bit",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "4bit" in out and "3.09B" in out
    # a local folder: shape from its config.json, parameters counted exactly
    assert train_main(["--teacher-model", str(tiny_teacher_dir), "--device", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "config.json" in out and "float32 on cpu" in out and "host memory" in out
    assert train_main(["--teacher-model", "nobody/unknown-model-7b", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unknown offline" in err and err.count("\n") == 0


def test_plan_names_the_autocast_that_training_uses():
    import torch

    from snn_distill.memory_plan import autocast_name
    from snn_distill.precision import autocast_dtype

    assert autocast_name("cpu") is None
    cuda = torch.device("cuda")
    # with a GPU visible the plan names what training will pick (fp16 on GPUs without bf16); without
    # one it plans for bf16
    expected = {torch.float16: "fp16"}.get(autocast_dtype(cuda), "bf16") if torch.cuda.is_available() else "bf16"
    assert autocast_name("cuda") == autocast_name("cuda:0") == expected
    cfg = TrainConfig(teacher_model="meta-llama/Llama-3.2-3B", batch_size=4, max_length=512)
    gpu = plan_memory(cfg, {"num_timesteps": 8}, device="cuda").summary
    cpu = plan_memory(cfg, {"num_timesteps": 8}, device="cpu").summary
    assert any(f", {expected} autocast) on cuda" in line for line in gpu)
    assert any(", fp32) on cpu" in line for line in cpu) and not any("autocast" in line for line in cpu)


def test_plan_figures_follow_the_configs(tiny_teacher_dir):
    cfg = TrainConfig(teacher_model="meta-llama/Llama-3.2-3B", batch_size=4, max_length=512, grad_accum_steps=8)
    plan = plan_memory(cfg, {"num_timesteps": 8})
    rows = {r.item: r.nbytes for r in plan.rows}
    assert rows["teacher weights"] == 3_212_749_824 * 2
    assert rows["target log-softmax"] == 4 * 512 * 128256 * 4
    assert rows["loss chunk working set"] == 6 * 1024 * 128256 * 4
    assert 8 * GIB < plan.peak("cuda") < 16 * GIB
    # accumulation costs nothing; a wider batch and fp32 teacher cost more; 8-bit weights less
    more = plan_memory(TrainConfig(teacher_model=cfg.teacher_model, batch_size=8, max_length=512), {"num_timesteps": 8})
    assert more.peak("cuda") > plan.peak("cuda")
    assert plan_memory(
        TrainConfig(teacher_model=cfg.teacher_model, batch_size=4, max_length=512, grad_accum_steps=1),
        {"num_timesteps": 8},
    ).peak("cuda") == plan.peak("cuda")
    q8 = plan_memory(TrainConfig(teacher_model=cfg.teacher_model, teacher_quantization="8bit"), {})
    f32 = plan_memory(TrainConfig(teacher_model=cfg.teacher_model, teacher_dtype="float32"), {})
    assert q8.peak("cuda") < f32.peak("cuda")
    # a teacher on another device is planned there
    split = plan_memory(TrainConfig(teacher_model=cfg.teacher_model, teacher_device="cuda:1"), {})
    assert set(split.devices()) == {"cuda", "cuda:1"}
    # the folder's real parameter count
    real = load_teacher(str(tiny_teacher_dir))
    assert teacher_shape(str(tiny_teacher_dir)).params == real.num_parameters


def test_docs_show_the_plans_this_code_computes():
    """docs/scaling.md's tables for the spec's two 3B recipes are this code's output, kept in sync."""
    doc = (ROOT / "docs" / "scaling.md").read_text()
    for teacher, b, s_len, accum in (("meta-llama/Llama-3.2-3B", 4, 512, 8), ("Qwen/Qwen2.5-3B", 2, 1024, 16)):
        cfg = TrainConfig(teacher_model=teacher, batch_size=b, max_length=s_len, grad_accum_steps=accum)
        table = plan_memory(cfg, {"num_timesteps": 8}).format()
        assert table.split("\n", 3)[3] in doc, teacher  # the rows and the verdict, verbatim


@pytest.mark.parametrize("mode", ["hybrid", "spike-driven"])
@pytest.mark.parametrize("coding", ["count", "temporal"])
@pytest.mark.parametrize("gc", [False, True])
def test_student_activation_estimate_matches_measured_saved_tensors(gc, coding, mode):
    """The plan's activation formula against the bytes autograd actually saves (CPU, fp32)."""
    cfg = StudentConfig(
        vocab_size=64, dim=128, depth=3, num_heads=4, num_kv_heads=2, num_timesteps=4, gradient_checkpointing=gc,
        coding=coding, mode=mode,
    )
    model = SpikingStudentLM(cfg).train()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b, s = 2, 16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_hidden(torch.randint(0, 64, (b, s)))
    measured = sum(v for k, v in seen.items() if k not in own)
    per_layer, outside = student_activation_values(
        cfg.dim, cfg.depth, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_dim, spike_driven=cfg.spike_driven
    )
    n = model.passes * b * s
    layers = cfg.depth * cfg.dim if gc else cfg.depth * per_layer
    estimate = n * (layers + outside) * 4
    assert 0.7 < estimate / measured < 1.4, (estimate, measured)


# ---- teacher dtype / device / quantization -------------------------------------------------------


def test_teacher_dtype_resolution_and_loading(tiny_teacher_dir):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        t = load_teacher(str(tiny_teacher_dir), device="cpu", dtype=name)
        assert {p.dtype for p in t.model.parameters()} == {dt}
        assert t.logits(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)).dtype == dt


def test_train_with_a_bf16_teacher_on_an_explicit_device(tiny_teacher_dir, tmp_path):
    args = parse_train_args(
        ["--teacher-model", str(tiny_teacher_dir), "--teacher-dtype", "bfloat16", "--teacher-device", "cpu"]
    )
    cfg, _ = configs_from_args(args)
    assert (cfg.teacher_dtype, cfg.teacher_device, cfg.teacher_quantization) == ("bfloat16", "cpu", "none")
    cfg = _cfg(tiny_teacher_dir, tmp_path / "bf16", teacher_dtype="bfloat16", teacher_device="cpu", num_steps=2)
    run = train(cfg, STUDENT, progress=False)
    tc = run.metadata["training_config"]
    assert tc["teacher_dtype"] == "bfloat16" and tc["teacher_device"] == "cpu" and tc["world_size"] == 1
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in run.history)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_teacher_needs_bitsandbytes_and_cuda(tiny_teacher_dir, tmp_path, capsys, kind):
    rc = train_main(
        [
            "--teacher-model",
            str(tiny_teacher_dir),
            "--teacher-quantization",
            kind,
            "--num-steps",
            "1",
            "--output-dir",
            str(tmp_path / "q"),
            "--quiet",
            *TINY,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "needs the bitsandbytes package" in err and "pip install bitsandbytes" in err
    elif not torch.cuda.is_available():
        assert "CUDA" in err


# ---- larger students -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,depth,heads", [(256, 4, 4), (512, 8, 8)])
def test_larger_students_with_gradient_checkpointing_give_the_same_gradients(dim, depth, heads):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 12))
    grads = []
    for gc in (False, True):
        cfg = StudentConfig(
            vocab_size=50, dim=dim, depth=depth, num_heads=heads, num_timesteps=2, gradient_checkpointing=gc
        )
        torch.manual_seed(1)
        m = SpikingStudentLM(cfg).train()
        m(ids).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_train_a_wider_deeper_student_with_checkpointing(tiny_teacher_dir, tmp_path):
    """Checkpointing recomputes activations; it must not change the training run."""
    losses = {}
    for gc in (True, False):
        student = dict(dim=256, depth=4, num_heads=4, num_timesteps=2, gradient_checkpointing=gc)
        cfg = _cfg(tiny_teacher_dir, tmp_path / f"gc{gc}", num_steps=3, max_length=16, lr=3e-3)
        losses[gc] = [h["loss"] for h in train(cfg, student, progress=False).history]
    meta = json.loads((tmp_path / "gcTrue" / "metadata.json").read_text())
    assert meta["architecture"]["dim"] == 256 and meta["architecture"]["gradient_checkpointing"] is True
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dev,match", [("gpu", "is not a device"), ("cuda:7", "CUDA GPU(s) are visible")])
def test_bad_teacher_device_is_one_line(tiny_teacher_dir, tmp_path, capsys, dev, match):
    if dev.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8+ GPUs")
    rc = train_main(
        [
            "--teacher-model",
            str(tiny_teacher_dir),
            "--teacher-device",
            dev,
            "--output-dir",
            str(tmp_path / "o"),
            "--quiet",
            *TINY,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and err.count("\n") == 0
