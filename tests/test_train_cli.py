"""scripts/train_snn_student.py: the spec's interface, artifacts, learning, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snn_distill.cli import parse_train_args, train_main
from snn_distill.config import StudentConfig, TrainConfig
from snn_distill.distill import make_optimizer, make_scheduler, train
from snn_distill.student import SpikingStudentLM
from snn_distill.teacher import load_teacher

ROOT = Path(__file__).resolve().parent.parent
SPEC_KEYS = {
    "model_type",
    "architecture_version",
    "vocab_size",
    "student_params",
    "architecture",
    "snn_config",
    "training_config",
    "config",
    "training_results",
    "metadata",
}
SMALL = [
    "--student-dim", "32", "--student-heads", "4", "--log-interval", "0", "--quiet", "--no-git-tracking",
    "--device", "cpu",
]  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = train_main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_spec_quickstart_produces_complete_artifacts(tiny_teacher_dir, tmp_path):
    out = tmp_path / "artifacts" / "snn_student_demo"
    cmd = [
        sys.executable,
        "scripts/train_snn_student.py",
        "--teacher-model",
        str(tiny_teacher_dir),
        "--dataset",
        "synthetic",
        "--num-steps",
        "50",
        "--batch-size",
        "4",
        "--grad-accum-steps",
        "2",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "step 50/50" in proc.stderr  # loss logs every 5 steps go to stderr
    assert "trained SpikingStudentLM" in proc.stdout and "Writing" not in proc.stdout
    meta = json.loads((out / "metadata.json").read_text())
    assert SPEC_KEYS <= set(meta)
    assert meta["model_type"] == "SpikingStudentLM"
    assert meta["architecture"]["dim"] == 128 and meta["architecture"]["depth"] == 2
    assert meta["architecture"]["num_heads"] == 4
    assert meta["snn_config"]["num_timesteps"] == 4 and meta["snn_config"]["surrogate_type"] == "sigmoid"
    assert meta["snn_config"]["spike_threshold"] == 1.0
    tc = meta["training_config"]
    for k in (
        "batch_size",
        "grad_accum_steps",
        "teacher_model",
        "lr",
        "scheduler",
        "warmup_steps",
        "temperature",
        "dataset",
        "max_length",
    ):
        assert k in tc, k
    assert (
        tc["num_steps"] == 50
        and tc["batch_size"] == 4
        and tc["grad_accum_steps"] == 2
        and tc["max_length"] == 64
    )
    assert meta["training_results"]["steps"] == 50 and meta["training_results"]["avg_loss"] > 0
    assert meta["config"]["tokenizer_name"] == str(tiny_teacher_dir)
    assert meta["config"]["teacher_model"] == str(tiny_teacher_dir)
    assert meta["metadata"]["timestamp"].endswith("Z")
    assert len(meta["metadata"]["git_commit"]) >= 7  # this checkout is a git repository
    assert (out / "tokenizer.json").exists()  # artifacts work offline
    sd = torch.load(out / "student.pt", weights_only=True)
    rebuilt = SpikingStudentLM(StudentConfig.from_metadata(meta))
    rebuilt.load_state_dict(sd)  # strict: the metadata alone rebuilds the saved model
    assert rebuilt.num_parameters() == meta["student_params"]
    params = {n for n, _ in rebuilt.named_parameters()}
    assert sum(v.numel() for k, v in sd.items() if k in params) == meta["student_params"]
    assert meta["vocab_size"] == sd["embed.weight"].shape[0]
    assert (out / "training_log.csv").read_text().count("\n") == 11  # header + 10 logged steps


def test_no_git_tracking_and_ann_student(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "o"
    rc, stdout, _ = run_cli(
        [
            "--teacher-model",
            str(tiny_teacher_dir),
            "--num-steps",
            "2",
            "--output-dir",
            str(out),
            "--student-type",
            "ann",
            *SMALL,
        ],
        capsys,
    )
    assert rc == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert "git_commit" not in meta["metadata"]
    assert meta["architecture"]["student_type"] == "ann"


def test_held_out_kl_falls_by_half(tiny_teacher_dir, tmp_path):
    """Real learning: on a small teacher trained in the test, held-out KL(teacher||student) halves."""
    cfg = TrainConfig(
        teacher_model=str(tiny_teacher_dir),
        output_dir=str(tmp_path / "o"),
        num_steps=80,
        batch_size=8,
        lr=3e-3,
        log_interval=0,
        git_tracking=False,
        held_out_fraction=0.05,
    )
    run = train(cfg, {"dim": 64, "depth": 2, "num_heads": 4}, progress=False)
    ev = run.metadata["evaluation"]
    before, after = ev["before_training"]["kl_teacher_student"], ev["kl_teacher_student"]
    assert after <= 0.5 * before, (before, after)
    assert ev["top1_agreement"] > ev["before_training"]["top1_agreement"]


def test_losses_are_pinned_and_reproducible(tiny_teacher_dir, tmp_path):
    def once(d):
        cfg = TrainConfig(
            teacher_model=str(tiny_teacher_dir),
            output_dir=str(d),
            num_steps=8,
            batch_size=4,
            lr=1e-2,
            log_interval=1,
            git_tracking=False,
            seed=3,
        )
        return train(cfg, {"dim": 32, "depth": 1, "num_heads": 2}, progress=False)

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    la = [h["loss"] for h in a.history]
    assert la == [h["loss"] for h in b.history]
    # Pinned: a change to the model, loss or data pipeline that moves these numbers must be deliberate.
    assert la[0] == pytest.approx(3.637, abs=0.02)
    assert la[-1] < la[0] - 0.5


def test_teacher_is_frozen_and_in_eval_mode(tiny_teacher_dir, tmp_path):
    teacher = load_teacher(str(tiny_teacher_dir))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    cfg = TrainConfig(
        teacher_model=str(tiny_teacher_dir),
        output_dir=str(tmp_path / "o"),
        num_steps=3,
        batch_size=2,
        lr=1e-2,
        log_interval=0,
        git_tracking=False,
    )
    train(cfg, {"dim": 32, "depth": 1, "num_heads": 2}, teacher=teacher, progress=False)
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gpt2_teacher_without_pad_token(tiny_gpt2_dir, tmp_path, capsys):
    rc, _, err = run_cli(
        [
            "--teacher-model",
            str(tiny_gpt2_dir),
            "--num-steps",
            "2",
            "--batch-size",
            "3",
            "--output-dir",
            str(tmp_path / "o"),
            *SMALL,
        ],
        capsys,
    )
    assert rc == 0, err


def test_teacher_vocab_wider_than_tokenizer_and_huge(tmp_path, tiny_tokenizer, capsys):
    """Student vocabulary = the teacher's logit width (Qwen-style padding), here a 256k vocabulary on CPU."""
    from conftest import build_tiny_llama

    d = tmp_path / "wide"
    build_tiny_llama(256_000, hidden=8, layers=1).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    rc, _, err = run_cli(
        [
            "--teacher-model",
            str(d),
            "--num-steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "16",
            "--output-dir",
            str(tmp_path / "o"),
            "--student-dim",
            "16",
            "--student-heads",
            "2",
            "--log-interval",
            "0",
            "--quiet",
            "--no-git-tracking",
        ],
        capsys,
    )
    assert rc == 0, err
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert meta["vocab_size"] == 256_000 > len(tiny_tokenizer)


@pytest.mark.parametrize(
    "flags",
    [
        ["--scheduler", "cosine", "--warmup-steps", "1", "--kd-loss", "jsd", "--temperature", "2.0"],
        ["--scheduler", "linear", "--kd-loss", "reverse_kl", "--hard-label-weight", "0.5", "--pack"],
        [
            "--snn-timesteps",
            "2",
            "--snn-surrogate",
            "arctan",
            "--snn-threshold",
            "0.5",
            "--student-kv-heads",
            "2",
            "--device",
            "cpu",
            "--seed",
            "5",
            "--grad-accum-steps",
            "2",
            "--qat",
            "int8",
            "--gradient-checkpointing",
        ],
        ["--snn-surrogate", "fast_sigmoid", "--eval-interval", "1", "--max-length", "16"],
        ["--snn-surrogate", "triangular", "--snn-decay", "0.9", "--surrogate-slope", "2.0"],
    ],
)
def test_flag_combinations_train_and_are_recorded(tiny_teacher_dir, tmp_path, capsys, flags):
    out = tmp_path / "o"
    rc, _, err = run_cli(
        [
            "--teacher-model",
            str(tiny_teacher_dir),
            "--num-steps",
            "3",
            "--batch-size",
            "2",
            "--output-dir",
            str(out),
            *SMALL,
            *flags,
        ],
        capsys,
    )
    assert rc == 0, err
    meta = json.loads((out / "metadata.json").read_text())
    args = parse_train_args(["--teacher-model", "x", "--device", "cpu", *flags])  # SMALL's device
    for k, v in vars(args).items():
        if k not in (
            "teacher_model",
            "output_dir",
            "quiet",
            "no_git_tracking",
            "log_interval",
            "num_steps",
            "batch_size",
            "student_dim",
            "student_heads",
        ):
            assert meta["config"][k] == v, k


def test_prompts_file_and_config_file_round_trip(tiny_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "Where is the station?\n\n   \nRemind me to call mom at six.\nWhat does this sign say?\n"
    )
    out1 = tmp_path / "run1"
    rc, _, err = run_cli(
        [
            "--teacher-model",
            str(tiny_teacher_dir),
            "--dataset-path",
            str(prompts),
            "--num-steps",
            "2",
            "--batch-size",
            "2",
            "--output-dir",
            str(out1),
            "--lr",
            "5e-4",
            "--held-out-fraction",
            "0",
            *SMALL,
        ],
        capsys,
    )
    assert rc == 0, err
    meta1 = json.loads((out1 / "metadata.json").read_text())
    assert meta1["training_config"]["dataset"] == str(prompts)
    # A previous run's metadata.json reproduces it; command-line flags override.
    out2 = tmp_path / "run2"
    rc, _, err = run_cli(
        ["--config", str(out1 / "metadata.json"), "--output-dir", str(out2), "--num-steps", "3"], capsys
    )
    assert rc == 0, err
    meta2 = json.loads((out2 / "metadata.json").read_text())
    assert meta2["config"]["lr"] == 5e-4 and meta2["config"]["dataset_path"] == str(prompts)
    assert meta2["training_results"]["steps"] == 3
    # YAML works too.
    yml = tmp_path / "c.yaml"
    yml.write_text(f"teacher-model: {tiny_teacher_dir}\nnum_steps: 1\nstudent_dim: 32\nbatch_size: 2\n")
    args = parse_train_args(["--config", str(yml), "--batch-size", "3"])
    assert args.num_steps == 1 and args.student_dim == 32 and args.batch_size == 3


@pytest.mark.parametrize(
    "name,total,warmup,checks",
    [
        ("constant", 10, 0, {0: 1.0, 9: 1.0}),
        ("constant", 10, 4, {0: 0.0, 2: 0.5, 4: 1.0, 9: 1.0}),
        ("linear", 10, 2, {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 10: 0.0}),
        ("cosine", 10, 0, {0: 1.0, 5: 0.5, 10: 0.0}),
        ("cosine", 12, 2, {1: 0.5, 2: 1.0, 7: 0.5}),
    ],
)
def test_scheduler_learning_rates(name, total, warmup, checks):
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, 1e-3, 0.0)
    sched = make_scheduler(opt, name, warmup, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    for step, frac in checks.items():
        assert lrs[step] == pytest.approx(1e-3 * frac, abs=1e-12), (step, lrs)


def test_optimizer_is_fused_adamw_with_decay_on_matrices_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = make_optimizer(model, 1e-2, 0.1)
    assert opt.defaults["fused"] is True  # the one-kernel CPU path, not the per-tensor loop
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    # the same update as the reference loop implementation
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ref.load_state_dict(model.state_dict())
    groups = [{"params": [ref[0].weight], "weight_decay": 0.1}, {"params": [ref[0].bias, *ref[1].parameters()]}]
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    w0 = model[0].weight.detach().clone()
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            (m(x) - y).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (model[0].weight - w0).abs().min() > 1e-3  # every weight moved: the comparison has teeth


# ---- bad input: one line, non-zero exit, no traceback, nothing written ----


def _bad(argv, capsys, tmp_path, match):
    out = tmp_path / "never"
    rc, stdout, err = run_cli(
        [*argv, "--output-dir", str(out)] if "--output-dir" not in argv else argv, capsys
    )
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert not (out / "student.pt").exists() and not (out / "metadata.json").exists()


def test_bad_teacher(capsys, tmp_path):
    _bad(["--teacher-model", "no-such-org/no-such-model", *SMALL], capsys, tmp_path, "could not be fetched")
    _bad(["--teacher-model", str(tmp_path / "missing.gguf"), *SMALL], capsys, tmp_path, "does not exist")
    (tmp_path / "empty_dir").mkdir()
    _bad(["--teacher-model", str(tmp_path / "empty_dir"), *SMALL], capsys, tmp_path, "config.json")


def test_bad_data(tiny_teacher_dir, capsys, tmp_path):
    t = ["--teacher-model", str(tiny_teacher_dir), *SMALL]
    _bad([*t, "--dataset", "./no/such/file.txt"], capsys, tmp_path, "file.txt")
    _bad([*t, "--dataset-path", str(tmp_path / "missing.txt")], capsys, tmp_path, "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    _bad([*t, "--dataset-path", str(empty)], capsys, tmp_path, "empty")


@pytest.mark.parametrize(
    "flag,value,match",
    [
        ("--num-steps", "0", "--num-steps"),
        ("--batch-size", "-1", "--batch-size"),
        ("--lr", "0", "--lr"),
        ("--max-length", "0", "--max-length"),
        ("--scheduler", "step", "invalid choice"),
        ("--snn-surrogate", "relu", "invalid choice"),
        ("--kd-loss", "mse", "invalid choice"),
        ("--student-heads", "3", "divisible"),
        ("--snn-threshold", "-1", "--snn-threshold"),
        ("--snn-energy-budget", "0", "--snn-energy-budget is a ratio"),
        ("--snn-energy-weight", "-1", "--snn-energy-weight must be > 0"),
        ("--snn-energy-ramp", "1.5", "--snn-energy-ramp is a share of the steps"),
        ("--snn-rate-floor", "0.5", "--snn-rate-floor must be in"),
    ],
)
def test_bad_values(tiny_teacher_dir, capsys, tmp_path, flag, value, match):
    _bad(["--teacher-model", str(tiny_teacher_dir), *SMALL, flag, value], capsys, tmp_path, match)


def test_energy_budget_of_an_ann_student(tiny_teacher_dir, capsys, tmp_path):
    argv = ["--teacher-model", str(tiny_teacher_dir), *SMALL, "--student-type", "ann", "--snn-energy-budget", "0.3"]
    _bad(argv, capsys, tmp_path, "needs a spiking student")


def test_missing_teacher_flag(capsys, tmp_path):
    _bad(SMALL, capsys, tmp_path, "--teacher-model is required")


def test_output_dir_that_is_a_file(tiny_teacher_dir, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_cli(["--teacher-model", str(tiny_teacher_dir), "--output-dir", str(f), *SMALL], capsys)
    assert rc != 0 and err.startswith("error: ") and "is a file" in err and f.read_text() == "x"


def test_nan_loss_stops_with_a_message(tmp_path, tiny_tokenizer, capsys):
    from conftest import build_tiny_llama

    d = tmp_path / "nan_teacher"
    m = build_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    _bad(
        ["--teacher-model", str(d), "--num-steps", "3", *SMALL], capsys, tmp_path, "loss became nan at step 1"
    )
