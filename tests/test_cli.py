"""`snn-distill`: the command a newcomer meets first (help, version, dispatch, defaults, flag checks)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from snn_distill import __version__
from snn_distill.cli import COMMANDS, configs_from_args, main, parse_train_args
from snn_distill.config import StudentConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's --help / --version / errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_each_command_on_one_line(capsys):
    rc, out, err = run_main(["--help"], capsys)
    assert rc == 0 and err == ""
    for name, cmd in COMMANDS.items():
        lines = [line for line in out.splitlines() if line.startswith(f"    {name} ")]
        assert len(lines) == 1 and lines[0].split(None, 1) == [name, cmd.help], out
    assert {"train", "export", "generate", "eval"} <= set(COMMANDS)


def test_no_arguments_prints_the_command_list_and_fails(capsys):
    rc, out, err = run_main([], capsys)
    assert rc == 2 and out == ""
    assert all(cmd.help in err for cmd in COMMANDS.values())


def test_version(capsys):
    rc, out, _ = run_main(["--version"], capsys)
    assert rc == 0 and out.strip() == f"snn-distill {__version__}"


@pytest.mark.parametrize("argv", [["frobnicate"], ["--frobnicate"]])
def test_unknown_command_is_one_line(argv, capsys):
    rc, out, err = run_main(argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_subcommand_help_and_flags_reach_the_command(capsys):
    rc, out, _ = run_main(["train", "--help"], capsys)
    assert rc == 0 and out.startswith("usage: snn-distill train") and "--teacher-model" in out
    rc, _, err = run_main(["export", "--model-path", "/nonexistent/student.pt", "--quiet"], capsys)
    assert rc == 2 and "/nonexistent/student.pt" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "-3"])
@pytest.mark.parametrize("flag", ["--batch-size", "--num-steps", "--max-length", "--snn-timesteps"])
def test_positive_flags_reject_zero_and_negatives(flag, value, capsys):
    rc, out, err = run_main(["train", "--teacher-model", "x", flag, value], capsys)
    assert rc == 2 and out == ""
    assert f"argument {flag}: must be a positive integer, got {int(value)}" in err


def test_cli_defaults_are_the_dataclass_defaults():
    cfg, student = configs_from_args(parse_train_args(["--teacher-model", "x"]))
    assert dataclasses.asdict(cfg) == dataclasses.asdict(TrainConfig(teacher_model="x"))
    assert cfg.batch_size == 4  # the spec's examples
    assert dataclasses.asdict(StudentConfig(vocab_size=2, **student)) == dataclasses.asdict(StudentConfig(2))


def test_help_imports_no_torch_and_the_cli_modules_form_no_circle():
    code = (
        "import sys\n"
        "import snn_distill.evaluate_cli\n"
        "assert 'snn_distill.cli' not in sys.modules, 'evaluate_cli imports cli'\n"
        "from snn_distill.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'snn-distill --help imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_console_entry_point_runs_as_a_module():
    proc = subprocess.run(
        [sys.executable, "-m", "snn_distill.cli", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0 and "generate" in proc.stdout, proc.stderr
