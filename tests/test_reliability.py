"""When things go wrong: each failure of docs/troubleshooting.md that no other test file triggers,
with the message the user sees, plus fault injection (SIGKILL at random points of training and of
saving) showing that an output folder holds either what it held before or one complete, loadable set.

Real failures throughout: a real gated-repo answer over HTTP, a real allocation failure (address-space
limit), a real full disk (a small tmpfs, where mounting is allowed; /dev/full otherwise), real SIGKILLs.
"""

from __future__ import annotations

import errno
import http.server
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snn_distill import artifacts
from snn_distill.artifacts import (
    STAGING_PREFIX,
    ArtifactError,
    atomic_write_bytes,
    build_metadata,
    load_student,
    remove_leftovers,
    save_artifacts,
    sha256_file,
    update_metadata,
)
from snn_distill.backends.snn import SNNLLMBackend
from snn_distill.checkpoint import CHECKPOINT_FILE, load_checkpoint
from snn_distill.cli import export_main, generate_main, run_guarded, train_main
from snn_distill.config import StudentConfig, TrainConfig
from snn_distill.distill import train
from snn_distill.failures import hub_error_message, is_disk_full, is_out_of_memory, out_of_memory_message
from snn_distill.student import SpikingStudentLM

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "--student-dim", "16", "--student-heads", "2", "--max-length", "16", "--batch-size", "2",
    "--log-interval", "0", "--no-git-tracking", "--device", "cpu",
]  # fmt: skip
STUDENT = {"dim": 16, "depth": 1, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI points the root logger at the sys.stderr of its call (pytest's capture of that test)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def run_cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # only what this command prints
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(rc: int, err: str) -> str:
    """The one `error: ...` line a failed command prints (and nothing else, no traceback)."""
    assert rc not in (0, None), err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def set_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file that belongs to an artifact set (not the progress files: training_log.csv,
    checkpoint.pt, which belong to the newest run started in the folder)."""
    if not folder.is_dir():
        return {}
    names = {"student.pt", "metadata.json", "training_curves.png", *artifacts.TOKENIZER_FILES}
    try:
        names |= set(json.loads((folder / "metadata.json").read_text()).get("files") or {})
    except (OSError, ValueError, AttributeError):
        pass
    return {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.name in names or (p.name.startswith("student") and ".onnx" in p.name))
    }


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def tiny_cfg(teacher: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        teacher_model=str(teacher), output_dir=str(out), num_steps=2, batch_size=2, max_length=16,
        log_interval=1, git_tracking=False, held_out_fraction=0.05, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# ================================================================================================
# Teacher: gated model without a token
# ================================================================================================


def _hub_error(status: int, headers: dict[str, str], url: str) -> Exception:
    """The exception huggingface_hub raises for this HTTP answer (its own hf_raise_for_status). httpx2 is
    huggingface_hub's HTTP client, pinned in the dev extra."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    with pytest.raises(Exception) as info:
        hf_raise_for_status(response)
    return info.value


def test_hub_error_messages_for_real_hub_exceptions():
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    url = "https://huggingface.co/api/models/meta-llama/Llama-3.2-3B"
    gated = _hub_error(401, {"X-Error-Code": "GatedRepo"}, url)
    assert isinstance(gated, GatedRepoError)
    for e in (gated, _wrapped_like_transformers(gated)):
        msg = hub_error_message("meta-llama/Llama-3.2-3B", e)
        assert "gated model" in msg and "hf auth login" in msg and "HF_TOKEN" in msg and "\n" not in msg
    missing = _hub_error(401, {"X-Error-Code": "RepoNotFound"}, url)
    assert isinstance(missing, RepositoryNotFoundError) and not isinstance(missing, GatedRepoError)
    assert "private or gated" in hub_error_message("meta-llama/Llama-3.2-3B", missing)
    refused = _hub_error(401, {"X-Error-Message": "Invalid credentials in Authorization header"}, url)
    assert "token was refused" in hub_error_message("x/y", refused)
    assert hub_error_message("x/y", LocalEntryNotFoundError("offline")) is None  # worded by the caller


def _wrapped_like_transformers(e: Exception) -> OSError:
    try:
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it.") from e
    except OSError as wrapped:
        return wrapped


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers one for a gated model without a token."""

    def _answer(self) -> None:
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to this model is restricted. You must be authenticated.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


def test_gated_teacher_without_a_token(tmp_path):
    """The real path: transformers -> huggingface_hub -> HTTP 401 GatedRepo (a local stand-in for the
    Hub, so it runs offline) -> one line saying to log in."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = _env(
        HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    env.pop("HF_TOKEN", None)
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [sys.executable, "scripts/train_snn_student.py", "--teacher-model", "some-org/gated-model",
             "--output-dir", str(out), "--quiet"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        server.shutdown()
    line = error_line(proc.returncode, proc.stderr)
    assert "'some-org/gated-model' is a gated model" in line and "hf auth login" in line and "HF_TOKEN" in line
    assert not out.exists()


# ================================================================================================
# Data: too short, too long; tokenizer: no special tokens at all, ids beyond the teacher's logits
# ================================================================================================


def test_texts_too_short_to_train_on(tiny_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")  # one token each: nothing to predict
    out = tmp_path / "out"
    rc, _, err = run_cli(
        train_main, ["--teacher-model", str(tiny_teacher_dir), "--dataset-path", str(prompts),
                     "--output-dir", str(out), "--quiet", *SMALL], capsys,
    )  # fmt: skip
    assert "no training sequences of at least 2 tokens" in error_line(rc, err)
    assert set_files(out) == {}


def test_long_prompts_are_truncated_and_counted(tiny_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    long = "Remind me to call the dentist tomorrow morning and then water the plants after lunch. " * 3
    prompts.write_text(f"{long}\n{long} again\nWhere is the station?\nOpen the door.\n{long} once more\n")
    out = tmp_path / "out"
    argv = ["--teacher-model", str(tiny_teacher_dir), "--dataset-path", str(prompts), "--output-dir", str(out),
            "--num-steps", "1", "--held-out-fraction", "0", *SMALL, "--max-length", "8"]  # fmt: skip
    rc, _, err = run_cli(train_main, argv, capsys)
    assert rc == 0, err
    assert "3 of 5 texts are longer than --max-length 8 tokens" in err and "truncated" in err and "--pack" in err
    rc, _, err = run_cli(train_main, [*argv, "--pack"], capsys)
    assert rc == 0, err
    assert "truncated" not in err  # packing cuts long texts into blocks: nothing is lost


def test_tokenizer_without_any_special_token_trains(tmp_path):
    """No pad, EOS, UNK or BOS: batches pad with id 0 (masked out) instead of a new <pad> id that the
    teacher has no logit for (which used to stop the run)."""
    from conftest import build_tiny_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "where is the station please call my sister open door remind me to water plants now".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    teacher = tmp_path / "teacher"
    build_tiny_llama(len(words)).save_pretrained(teacher)  # exactly as many logits as words
    tok.save_pretrained(teacher)
    prompts = tmp_path / "p.txt"
    prompts.write_text("where is the station\nplease call my sister now\nopen the door\nremind me to water plants\n")
    cfg = tiny_cfg(teacher, tmp_path / "out", dataset_path=str(prompts), held_out_fraction=0.0)
    run = train(cfg, STUDENT, progress=False)
    assert run.metadata["vocab_size"] == len(words)
    load_student(run.paths["student"])


def test_pad_token_without_a_teacher_logit(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama

    from snn_distill.teacher import TeacherError, load_teacher

    tok = tiny_tokenizer.__class__.from_pretrained(str(_saved(tiny_tokenizer, tmp_path / "tok")))
    tok.add_special_tokens({"pad_token": "<pad>"})  # id 384: one past the teacher's 384 logits
    teacher = tmp_path / "teacher"
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    with pytest.raises(TeacherError, match="tokenizer pad id 384 is outside the teacher's 384 logits"):
        load_teacher(str(teacher))


def _saved(tok, folder: Path) -> Path:
    tok.save_pretrained(folder)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_asked_for_without_a_gpu(tiny_teacher_dir, tmp_path, capsys):
    argv = ["--teacher-model", str(tiny_teacher_dir), "--output-dir", str(tmp_path / "o"), "--quiet", *SMALL,
            "--device", "cuda"]  # fmt: skip
    line = error_line(*run_cli(train_main, argv, capsys)[::2])
    assert "--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto" in line


def test_tokenizer_ids_beyond_the_teachers_logits(tiny_teacher_dir, tmp_path, tiny_tokenizer, capsys):
    from conftest import build_tiny_llama

    teacher = tmp_path / "mixed_up"
    build_tiny_llama(200).save_pretrained(teacher)  # 200 logits, but the 384-word tokenizer beside it
    tiny_tokenizer.save_pretrained(teacher)
    out = tmp_path / "out"
    rc, _, err = run_cli(
        train_main, ["--teacher-model", str(teacher), "--output-dir", str(out), "--quiet", *SMALL], capsys
    )
    line = error_line(rc, err)
    assert "vocabulary mismatch" in line and "token id 383" in line and "only 200 logits" in line
    assert set_files(out) == {}


def test_resuming_a_checkpoint_of_another_teacher(tiny_teacher_dir, tmp_path, tiny_tokenizer, capsys):
    """e.g. a --config or --output-dir of a run with another teacher: --resume names the difference."""
    from conftest import build_tiny_llama

    other = tmp_path / "other_teacher"
    build_tiny_llama(512, seed=3).save_pretrained(other)  # another teacher, another vocabulary size
    tiny_tokenizer.save_pretrained(other)
    out = tmp_path / "out"
    first = ["--teacher-model", str(tiny_teacher_dir), "--output-dir", str(out), "--num-steps", "1",
             "--checkpoint-every", "1", "--quiet", *SMALL]  # fmt: skip
    assert run_cli(train_main, first, capsys)[0] == 0
    before = set_files(out)
    argv = ["--config", str(out / "metadata.json"), "--teacher-model", str(other), "--resume", "--quiet"]
    line = error_line(*run_cli(train_main, argv, capsys)[::2])
    assert "was written by a different run" in line and "--teacher-model" in line
    assert set_files(out) == before


# ================================================================================================
# Out of memory
# ================================================================================================


def test_out_of_memory_messages_for_real_allocation_failures():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**62, dtype=torch.uint8)  # PyTorch's CPU allocator refuses: a real OOM error
    with pytest.raises(MemoryError) as py:
        bytearray(2**62)
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
    for e in (cpu.value, py.value, cuda):
        assert is_out_of_memory(e)
        msg = out_of_memory_message(e, step=7, batch_size=8, grad_accum_steps=2, max_length=512)
        assert msg.startswith("out of memory at step 7 (") and "\n" not in msg
        assert "--batch-size 4 --grad-accum-steps 4" in msg and "effective batch of 16" in msg
        assert "--max-length (now 512)" in msg
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert "already 1" in out_of_memory_message(py.value, batch_size=1)
    odd = out_of_memory_message(py.value, batch_size=5, grad_accum_steps=1)
    assert "effective batch of 5 (e.g. --batch-size 1 --grad-accum-steps 5)" in odd  # the product stays exact


def test_out_of_memory_outside_the_training_loop_is_one_line(capsys):
    def allocate() -> None:
        torch.empty(2**62, dtype=torch.uint8)

    assert run_guarded(allocate) == 2
    line = error_line(2, capsys.readouterr().err)
    assert line.startswith("error: out of memory (") and "--grad-accum-steps" in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS + /proc: Linux")
def test_out_of_memory_in_a_training_step(tiny_teacher_dir, tmp_path):
    """A real allocation failure inside a real training step: the process gets an address-space limit
    of what it uses after loading + 1 GiB, and a batch that needs several GiB."""
    script = tmp_path / "limited.py"
    script.write_text(
        "import os, resource, sys\n"
        "import torch\n"
        "from transformers.models.llama import modeling_llama  # noqa: F401\n"
        "from snn_distill import cli, distill, evaluate, plots  # noqa: F401\n"
        "torch.set_num_threads(os.cpu_count() or 1)\n"
        "torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before the limit\n"
        "vm = next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))\n"
        "sys.exit(cli.train_main(sys.argv[1:]))\n"
    )
    prompts = tmp_path / "p.txt"
    long = "Where is the nearest pharmacy from here? Remind me to call my sister at six. " * 4
    prompts.write_text(f"{long}\n{long}again\n")  # over 64 tokens each: batches of 8192 x 64
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), "--teacher-model", str(tiny_teacher_dir), "--dataset-path", str(prompts),
         "--output-dir", str(out), "--num-steps", "2", "--batch-size", "8192", "--max-length", "64",
         "--held-out-fraction", "0", "--student-dim", "32", "--student-heads", "4", "--log-interval", "0",
         "--no-git-tracking", "--quiet", "--device", "cpu"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    line = error_line(proc.returncode, proc.stderr)
    assert line.startswith("error: out of memory at step 1 (") and "allocate" in line
    assert "--batch-size 4096 --grad-accum-steps 2" in line and "nothing was saved" in line
    assert set_files(out) == {}


# ================================================================================================
# Disk full
# ================================================================================================


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is not allowed."""
    d = tmp_path / "disk"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int) -> Path:
    st_ = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st_.f_bavail * st_.f_frsize - leave))
    return filler


def test_disk_full_while_saving_keeps_the_earlier_set(tiny_teacher_dir, small_disk, capsys):
    out = small_disk / "run"
    train(tiny_cfg(tiny_teacher_dir, out), STUDENT, progress=False)  # an earlier complete set
    before = set_files(out)
    fill(small_disk, leave=64 * 1024)  # room for the log, not for a 150 kB student.pt
    argv = ["--teacher-model", str(tiny_teacher_dir), "--output-dir", str(out), "--num-steps", "2", "--quiet",
            *SMALL, "--student-dim", "32"]  # fmt: skip
    line = error_line(*run_cli(train_main, argv, capsys)[::2])
    assert line.startswith(f"error: no space left on device while writing the artifacts to {out}")
    assert "nothing was replaced" in line and "free some space" in line
    assert set_files(out) == before and hidden(out) == []  # the staging folder is gone too
    load_student(out / "student.pt")


def test_disk_full_while_writing_a_checkpoint(small_disk):
    ckpt = small_disk / CHECKPOINT_FILE
    ckpt.write_bytes(b"the previous checkpoint")
    fill(small_disk, leave=32 * 1024)
    with pytest.raises(ArtifactError) as info:
        atomic_write_bytes(ckpt, os.urandom(256 * 1024))
    assert str(info.value).startswith(f"no space left on device while writing {ckpt}; nothing was replaced")
    assert ckpt.read_bytes() == b"the previous checkpoint" and hidden(small_disk) == []


def test_disk_full_on_any_machine(tmp_path, monkeypatch, capsys):
    """Without root: the kernel's ENOSPC from /dev/full, written through atomic_write_bytes and
    through an ordinary write (e.g. training_log.csv) that reaches the CLI."""
    target = tmp_path / "metadata.json"
    target.write_text("{}")

    def full_mkstemp(dir=None, prefix="", suffix=""):
        return os.open("/dev/full", os.O_WRONLY), str(Path(dir) / f"{prefix}x{suffix}")

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with monkeypatch.context() as m:
        m.setattr(artifacts.tempfile, "mkstemp", full_mkstemp)
        with pytest.raises(ArtifactError, match="no space left on device while writing .*metadata.json"):
            atomic_write_bytes(target, b"x" * 100_000)
    assert target.read_text() == "{}"

    def append_log() -> None:
        with open("/dev/full", "w") as f:
            f.write("step,loss\n")

    with pytest.raises(OSError) as info:
        append_log()
    assert is_disk_full(info.value)
    assert run_guarded(append_log) == 2
    assert error_line(2, capsys.readouterr().err).startswith("error: no space left on device while writing")


# ================================================================================================
# An output folder that already holds artifacts; a failed run; leftovers of killed processes
# ================================================================================================


def test_second_run_replaces_the_whole_set(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train(tiny_cfg(tiny_teacher_dir, out, checkpoint_every=1), STUDENT, progress=False)
    # The earlier set also had exports, and a tokenizer file the new tokenizer does not write.
    for name in ("student.onnx", "student.int8.onnx", "student.decode.onnx.data", "added_tokens.json"):
        (out / name).write_bytes(b"made from the earlier weights")
    meta = json.loads((out / "metadata.json").read_text())
    update_metadata(out / "metadata.json", files={**meta["files"], "added_tokens.json": {"sha256": "x"}})
    argv = ["--teacher-model", str(tiny_teacher_dir), "--output-dir", str(out), "--num-steps", "3",
            *SMALL, "--student-dim", "32", "--seed", "7"]  # fmt: skip
    rc, _, err = run_cli(train_main, argv, capsys)
    assert rc == 0, err
    assert f"{out} holds the artifacts of an earlier run: they stay as they are until this run has finished" in err
    assert (
        f"replaced the artifacts of an earlier run in {out} (removed its student.decode.onnx.data, "
        "student.int8.onnx, student.onnx, added_tokens.json)" in err
    )
    assert f"removed the checkpoint.pt of an earlier run from {out}" in err
    model, meta = load_student(out / "student.pt")
    assert model.config.dim == 32 and meta["training_results"]["steps"] == 3 and meta["config"]["seed"] == 7
    listed = meta["files"]
    present = {p.name for p in out.iterdir()}
    assert present == set(listed) | {"metadata.json", "training_log.csv"}  # exactly the new set
    assert all(sha256_file(out / n) == v["sha256"] for n, v in listed.items())
    assert {"student.pt", "tokenizer.json", "training_curves.png"} <= set(listed)
    rows = (out / "training_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == []  # --log-interval 0: this run's (empty) log


def test_failed_run_leaves_the_earlier_set_untouched(tiny_teacher_dir, tmp_path, tiny_tokenizer, capsys):
    from conftest import build_tiny_llama

    out = tmp_path / "out"
    train(tiny_cfg(tiny_teacher_dir, out), STUDENT, progress=False)
    (out / "student.onnx").write_bytes(b"export of the earlier weights")
    before = set_files(out)
    nan_teacher = tmp_path / "nan_teacher"
    m = build_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    m.save_pretrained(nan_teacher)
    tiny_tokenizer.save_pretrained(nan_teacher)
    argv = ["--teacher-model", str(nan_teacher), "--output-dir", str(out), "--num-steps", "2", "--quiet", *SMALL]
    assert "loss became nan at step 1" in error_line(*run_cli(train_main, argv, capsys)[::2])
    assert set_files(out) == before and hidden(out) == []


def test_leftovers_of_killed_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [f".student.pt.{dead.pid}.k2j4h5g6.tmp", f"{STAGING_PREFIX}{dead.pid}-abc123"]
    stale_export = f".student.onnx.{dead.pid}.zz9x8y7w.tmp"  # the exporter's staging folder
    mine = f".metadata.json.{os.getpid()}.a1b2c3d4.tmp"  # a live process: kept
    (tmp_path / stale[0]).write_bytes(b"half a student")
    (tmp_path / stale[1]).mkdir()
    (tmp_path / stale[1] / "student.pt").write_bytes(b"x")
    (tmp_path / stale_export).mkdir()
    (tmp_path / mine).write_bytes(b"{")
    (tmp_path / ".keep").write_bytes(b"not ours")
    assert sorted(remove_leftovers(tmp_path)) == sorted([*stale, stale_export])
    assert hidden(tmp_path) == sorted([".keep", mine])


# ================================================================================================
# Broken artifacts: truncated student.pt, not a state dict, metadata of another run
# ================================================================================================


@pytest.fixture
def good_set(tmp_path, tiny_tokenizer) -> Path:
    d = tmp_path / "art"
    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=len(tiny_tokenizer), dim=16, depth=1, num_heads=2, max_seq_len=32)
    model = SpikingStudentLM(cfg)
    meta = build_metadata(cfg, model.num_parameters(), {}, {"tokenizer_name": "tiny"}, {}, git_tracking=False)
    save_artifacts(d, model.state_dict(), meta, tokenizer=tiny_tokenizer)
    return d


def _refit_checksum(d: Path) -> None:
    """As if the user re-saved metadata for the file now there: the loader itself must then object."""
    meta = json.loads((d / "metadata.json").read_text())
    meta["files"]["student.pt"]["sha256"] = sha256_file(d / "student.pt")
    (d / "metadata.json").write_text(json.dumps(meta))


def _backend_errors(d: Path, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        SNNLLMBackend(device="cpu", model_path=str(d / "student.pt"), strict=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        b = SNNLLMBackend(device="cpu", model_path=str(d / "student.pt"))  # not strict: a loud stub, never a crash
    assert b.is_stub and any("STUB" in str(w.message) for w in rec)
    assert isinstance(b.generate("hello", max_tokens=3), str)


def test_truncated_student(good_set, capsys):
    data = (good_set / "student.pt").read_bytes()
    (good_set / "student.pt").write_bytes(data[: len(data) // 2])
    _backend_errors(good_set, r"student.pt is not a loadable state dict \(truncated, corrupted")
    line = error_line(*run_cli(generate_main, ["--artifacts", str(good_set), "--strict", "hi"], capsys)[::2])
    assert "is not a loadable state dict (truncated" in line
    # The exporter checks the checksum first: a truncated file no longer matches its metadata.
    line = error_line(*run_cli(export_main, ["--model-path", str(good_set / "student.pt"), "--quiet"], capsys)[::2])
    assert "does not match its metadata.json (checksum differs)" in line and "saving was interrupted" in line
    _refit_checksum(good_set)
    line = error_line(*run_cli(export_main, ["--model-path", str(good_set / "student.pt"), "--quiet"], capsys)[::2])
    assert "is not a loadable state dict (truncated" in line
    assert not list(good_set.glob("*.onnx")) and hidden(good_set) == []


@pytest.mark.parametrize(
    "content, match",
    [
        ([1, 2, 3], r"does not hold a state dict of tensors \(found list\)"),
        ({"embed.weight": "not a tensor"}, r"does not hold a state dict of tensors \(found dict\)"),
        (torch.nn.Linear(2, 2), r"is not a loadable state dict .*pickled objects that are not allowed"),
    ],
    ids=["list", "dict-of-strings", "pickled-module"],
)
def test_student_that_is_not_a_state_dict(good_set, capsys, content, match):
    torch.save(content, good_set / "student.pt")
    _refit_checksum(good_set)
    _backend_errors(good_set, match)
    line = error_line(*run_cli(export_main, ["--model-path", str(good_set / "student.pt"), "--quiet"], capsys)[::2])
    assert re.search(match, line), line


def test_metadata_of_another_run(good_set, tiny_tokenizer, tmp_path, capsys):
    """Same architecture, other weights: only the checksum tells them apart."""
    other = tmp_path / "other"
    torch.manual_seed(1)
    cfg = StudentConfig(vocab_size=len(tiny_tokenizer), dim=16, depth=1, num_heads=2, max_seq_len=32)
    model = SpikingStudentLM(cfg)
    meta = build_metadata(cfg, model.num_parameters(), {}, {"tokenizer_name": "tiny"}, {}, git_tracking=False)
    save_artifacts(other, model.state_dict(), meta, tokenizer=tiny_tokenizer)
    shutil.copy(other / "metadata.json", good_set / "metadata.json")
    with pytest.raises(ArtifactError, match=r"does not match its metadata.json \(checksum differs\)"):
        SNNLLMBackend(device="cpu", model_path=str(good_set / "student.pt"), strict=True)
    with pytest.warns(RuntimeWarning, match="checksum differs.*loading anyway"):
        assert not SNNLLMBackend(device="cpu", model_path=str(good_set / "student.pt")).is_stub
    line = error_line(*run_cli(export_main, ["--model-path", str(good_set / "student.pt"), "--quiet"], capsys)[::2])
    assert "does not match its metadata.json (checksum differs): the files come from different runs" in line


# ================================================================================================
# Interrupted export
# ================================================================================================


def test_ctrl_c_during_export_leaves_no_file(good_set, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from snn_distill.export import onnx as onnx_export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the int8 step

    monkeypatch.setattr(onnx_export, "quantize_int8", interrupted)
    before = set_files(good_set)
    argv = ["--model-path", str(good_set / "student.pt"), "--quantize", "int8", "--no-verify", "--quiet"]
    rc, _, err = run_cli(export_main, argv, capsys)
    assert rc == 130 and error_line(rc, err) == "error: interrupted"
    assert set_files(good_set) == before and hidden(good_set) == []  # no .onnx, no staging folder
    assert "export" not in json.loads((good_set / "metadata.json").read_text())


# ================================================================================================
# Fault injection: SIGKILL at random points
# ================================================================================================


def check_folder(out: Path, before: dict[str, str], steps: int | None = None) -> str:
    """'untouched' (the set is what it was) or 'new' (one complete, loadable set); anything else fails.
    Also: only hidden temp files of killed writes may be left, and a checkpoint.pt always loads."""
    for name in hidden(out):
        assert name.startswith(STAGING_PREFIX) or artifacts._TEMP_NAME.match(name), name
    if (out / CHECKPOINT_FILE).exists():
        assert isinstance(load_checkpoint(out)["step"], int)  # torch.load(weights_only=True) inside
    now = set_files(out)
    if now == before:
        return "untouched"
    model, meta = load_student(out / "student.pt")  # the checksum is verified here
    listed = meta["files"]
    assert {n for n in now if n != "metadata.json"} == set(listed), (now, listed)  # nothing of the earlier set
    assert all(now[n] == v["sha256"] for n, v in listed.items())
    if steps is not None:
        assert meta["training_results"]["steps"] == steps
    return "new"


def _save_in_child(out: str, state_dict, meta, tokenizer, started) -> None:
    started.set()
    save_artifacts(out, state_dict, meta, tokenizer=tokenizer, extra_writers={"training_curves.png": _png})
    os._exit(0)


def _png(path: Path) -> None:
    path.write_bytes(b"\x89PNG new figure")


def test_sigkill_during_save_keeps_one_complete_set(tmp_path, tiny_tokenizer):
    """Kill a process at random moments of save_artifacts (a 30 MB student, so saving takes a while):
    the folder holds the earlier set, untouched, or the new one, complete; never a mix."""
    ctx = multiprocessing.get_context("fork")
    out = tmp_path / "out"
    # The earlier set: a small student with an export and a figure made from it.
    small = StudentConfig(vocab_size=len(tiny_tokenizer), dim=16, depth=1, num_heads=2)
    m = SpikingStudentLM(small)
    meta_a = build_metadata(small, m.num_parameters(), {}, {"run": "a"}, {}, git_tracking=False)
    save_artifacts(out, m.state_dict(), meta_a, tokenizer=tiny_tokenizer,
                   extra_writers={"training_curves.png": lambda p: p.write_bytes(b"\x89PNG old figure")})  # fmt: skip
    (out / "student.onnx").write_bytes(b"export of the earlier weights")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    before = set_files(out)
    big = StudentConfig(vocab_size=120_000, dim=64, depth=1, num_heads=2)
    model = SpikingStudentLM(big)
    sd = model.state_dict()
    meta_b = build_metadata(big, model.num_parameters(), {}, {"run": "b"}, {}, git_tracking=False)

    def one(delay: float | None) -> tuple[str, list[str], float]:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        started = ctx.Event()
        p = ctx.Process(target=_save_in_child, args=(str(out), sd, meta_b, tiny_tokenizer, started))
        t0 = time.perf_counter()
        p.start()
        assert started.wait(60)
        if delay is not None:
            time.sleep(delay)
            os.kill(p.pid, signal.SIGKILL)
        p.join(120)
        took = time.perf_counter() - t0
        left = hidden(out)
        state = check_folder(out, before)
        if state == "new":
            assert not (out / "student.onnx").exists()
            assert (out / "training_curves.png").read_bytes().endswith(b"new figure")
        return state, left, took

    state, left, duration = one(None)
    assert state == "new" and left == []
    rng = random.Random(20240607)
    # One kill in each eighth of [0, 1.25 x the save's duration]: from creating the staging folder to
    # past the commit.
    outcomes = [one(duration * 1.25 * (i + rng.random()) / 8) for i in range(8)]
    print("kills during save:", [(s, bool(lf)) for s, lf, _ in outcomes], f"save took {duration:.2f}s")
    assert any(s == "untouched" and lf for s, lf, _ in outcomes)  # some kills did land mid-save
    remove_leftovers(out)
    assert hidden(out) == []


def _kill_run(cmd: list[str], marker: str | None, delay: float, timeout: float = 300) -> tuple[int, str]:
    """Start training; SIGKILL it `delay` seconds after `marker` appears on stderr (after the start when
    marker is None). Returns (exit status, stderr so far)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = threading.Event() if marker else None
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if seen is not None and marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if seen is not None:
        deadline = time.monotonic() + timeout
        while not seen.wait(0.05):
            if proc.poll() is not None:  # ended: the reader still drains what it printed
                reader.join(30)
                break
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        assert seen.is_set(), "".join(lines)[-3000:]
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout)
    reader.join(30)
    return rc, "".join(lines)


def test_sigkill_during_training_leaves_the_folder_usable(tiny_teacher_dir, tmp_path):
    """The CLI killed while starting, between steps (with a checkpoint every step) and while saving;
    first into an empty folder, then over an earlier run's set (with an export) and other settings."""
    out = tmp_path / "out"
    rng = random.Random(7)
    n = 6
    cmd_a = [sys.executable, "scripts/train_snn_student.py", "--teacher-model", str(tiny_teacher_dir),
             "--output-dir", str(out), "--num-steps", str(n), "--checkpoint-every", "1", *SMALL,
             "--log-interval", "1"]  # fmt: skip
    cmd_b = [*cmd_a, "--student-dim", "32", "--seed", "3"]
    report = "energy, nJ"  # the last log line before the artifacts are saved
    kills = [
        (cmd_a, None, rng.uniform(0.3, 2.5)),  # importing, loading the teacher
        (cmd_a, f"step {rng.randint(1, n - 1)}/{n}", rng.uniform(0.0, 0.3)),  # training, checkpointing
        (cmd_a, report, rng.uniform(0.0, 0.8)),  # saving
        "complete",
        (cmd_b, f"step {rng.randint(1, n - 1)}/{n}", rng.uniform(0.0, 0.3)),
        (cmd_b, report, rng.uniform(0.0, 0.8)),
    ]
    seen = []
    for k in kills:
        if k == "complete":  # an earlier complete set, with an export made from it
            train(tiny_cfg(tiny_teacher_dir, out, num_steps=n, max_length=16), STUDENT, progress=False)
            (out / "student.onnx").write_bytes(b"export of the earlier weights")
            continue
        cmd, marker, delay = k
        before = set_files(out)
        rc, err = _kill_run(cmd, marker, delay)
        assert "Traceback" not in err, err[-3000:]
        state = check_folder(out, before, steps=n)  # "new": exactly the listed set, so no old export
        seen.append((marker, rc, state))
    print("kills:", seen)
    assert all(rc == -signal.SIGKILL or rc == 0 for _, rc, _ in seen)
    assert sum(rc == -signal.SIGKILL for _, rc, _ in seen) >= 3
    # After all that, an ordinary run (other settings) still works there and clears the leftovers.
    run = train(tiny_cfg(tiny_teacher_dir, out, num_steps=2, seed=5), {**STUDENT, "dim": 32}, progress=False)
    assert check_folder(out, {}, steps=2) == "new" and hidden(out) == []
    assert run.metadata["architecture"]["dim"] == 32 and not (out / "student.onnx").exists()


# ================================================================================================
# Property test: the tokenizer fallbacks take any name
# ================================================================================================


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    override=st.one_of(st.none(), st.text(max_size=30)),
    config_name=st.one_of(st.none(), st.text(max_size=30)),
    text=st.text(max_size=40),
)
def test_tokenizer_resolution_never_crashes(tmp_path, override, config_name, text):
    from snn_distill.tokenizer import resolve_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok, source = resolve_tokenizer(override, tmp_path, config_name)
    assert isinstance(source, str) and source
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < len(tok) for i in ids)
    assert isinstance(tok.decode(ids), str)


def test_hidden_errno_of_disk_full_is_recognised_through_causes():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "student.pt")
        except OSError as e:
            raise RuntimeError("saving failed") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
