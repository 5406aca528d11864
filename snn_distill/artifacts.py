"""Student artifacts: `student.pt` (a plain state dict) + `metadata.json`, written atomically.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed, so a
crash never leaves a truncated file under the real name. `metadata.json` is written last and
records the SHA-256 of `student.pt`; a loader that finds a mismatch knows the set is mixed.
`save_artifacts` stages a whole set in a hidden folder and replaces an earlier run's set with it,
removing the earlier set's exports and figures (see `save_artifacts`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ARCHITECTURE_VERSION, StudentConfig
from .failures import disk_full_message, first_line, is_disk_full

STUDENT_FILE = "student.pt"
METADATA_FILE = "metadata.json"
# Files of an earlier run's set that a new save removes when it does not write them itself: figures
# and exports made from the old weights must never sit next to new ones.
DERIVED_PATTERNS = ("training_curves.png", "student*.onnx", "student*.onnx.data", "student*.ort")
# Tokenizer files save_pretrained may write; an earlier set's extra ones (e.g. an old added_tokens.json)
# would change the new tokenizer. Sets saved by this version list theirs in metadata.json's "files".
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
STAGING_PREFIX = ".snn-staging-"

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """Artifacts that are missing, broken or inconsistent; the message names the problem."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write through `.NAME.PID.XXXX.tmp` + fsync + rename. A full disk leaves the old file as it was and
    raises ArtifactError (one line); a process killed here leaves only the hidden temp file, which the
    next save removes (`remove_leftovers`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and is_disk_full(e):
            raise ArtifactError(disk_full_message(e, path)) from e
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> str:
    """torch.save through a temp file + rename; returns the SHA-256 of the bytes written."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit(start: str | Path | None = None) -> str | None:
    """Short hash of the git repository holding `start` (default: this package), or None."""
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=8", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_metadata(
    student_cfg: StudentConfig,
    student_params: int,
    train_cfg: dict[str, Any],
    cli_config: dict[str, Any],
    results: dict[str, Any],
    git_tracking: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec's metadata schema (plus our additions) for one trained student."""
    meta: dict[str, Any] = {
        "model_type": "SpikingStudentLM",
        "architecture_version": ARCHITECTURE_VERSION,
        "vocab_size": student_cfg.vocab_size,
        "student_params": int(student_params),
        "architecture": student_cfg.architecture_dict(),
        "snn_config": student_cfg.snn_config_dict(),
        "training_config": train_cfg,
        "config": cli_config,
        "training_results": results,
        "metadata": {"timestamp": utc_timestamp()},
    }
    if git_tracking:
        commit = git_commit()
        if commit:
            meta["metadata"]["git_commit"] = commit
    if extra:
        meta.update(extra)
    return meta


def prompt_format_section(chat_template: str | None, **generation_defaults: Any) -> dict[str, Any]:
    """The `prompt_format` metadata section of a student distilled on the teacher's replies: how
    `SNNLLMBackend.generate(prompt)` formats a plain prompt (the chat template the replies were
    written under, or plain text) and its generation defaults (e.g. min_tokens, repetition_penalty)."""
    return {
        "format": "chat" if chat_template else "plain",
        "chat_template": chat_template,
        "generation_defaults": dict(generation_defaults),
    }


def has_artifacts(output_dir: str | Path) -> bool:
    """True when `output_dir` holds (part of) a saved set: student.pt or metadata.json."""
    out = Path(output_dir)
    return (out / STUDENT_FILE).exists() or (out / METADATA_FILE).exists()


# `.NAME.PID.XXXXXXXX.tmp`: the temp files of atomic_write_bytes (and the export's staging folders).
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_leftovers(folder: str | Path) -> list[str]:
    """Delete what killed saves left in `folder`: hidden `.NAME.PID.XXXX.tmp` files and
    `.snn-staging-PID-XXXX` folders whose process no longer runs. Returns the names removed."""
    removed: list[str] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if name.startswith(STAGING_PREFIX):
            pid = name[len(STAGING_PREFIX) :].split("-", 1)[0]
        else:
            m = _TEMP_NAME.match(name)
            pid = m.group(1) if m else ""
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(name)
        except OSError:
            pass
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or, where the OS allows, a folder's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # folders cannot be fsynced on every OS
    finally:
        os.close(fd)


def _write_error(e: OSError, out: Path) -> str:
    if is_disk_full(e):
        return disk_full_message(e, f"the artifacts to {out}")
    return f"cannot write the artifacts to {out} ({first_line(e)}); nothing was replaced: pick a writable --output-dir"


def _earlier_set_files(out: Path) -> set[str]:
    """Names of the tokenizer (and other listed) files of the set saved in `out` before."""
    try:
        listed = set(read_metadata(out / METADATA_FILE).get("files") or {})
    except (ArtifactError, AttributeError, TypeError):
        listed = set()
    listed -= {STUDENT_FILE, METADATA_FILE}
    names = listed or set(TOKENIZER_FILES)  # sets saved before "files" listed everything
    return {n for n in names if (out / n).is_file()}


def save_artifacts(
    output_dir: str | Path,
    state_dict: dict[str, Any],
    metadata: dict[str, Any],
    tokenizer: Any = None,
    extra_writers: dict[str, Callable[[Path], Any]] | None = None,
) -> dict[str, Path]:
    """Save one complete set: tokenizer files, student.pt, extra files, and metadata.json recording
    the SHA-256 of each. The folder never holds a mix of two runs' files.

    Everything is written and fsynced into a hidden `.snn-staging-PID-XXXX` folder inside `output_dir`
    first; a full disk or any other write failure there leaves the folder as it was and raises
    ArtifactError (one line). Then the set replaces an earlier run's: files of the earlier set that
    this one does not write (exports and figures made from the old weights, old tokenizer files) are
    removed, the new files are renamed into place, and metadata.json goes last. A crash inside these
    renames (microseconds) can leave new weights beside the old metadata.json; the checksum then differs
    and loaders refuse the pair instead of running a mix.

    extra_writers: {file name: fn(path)}; fn writes that file at `path` (in the staging folder), or
    nothing to leave it out of the set (e.g. a figure that could not be drawn).
    """
    import io

    import torch

    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        stage = Path(tempfile.mkdtemp(dir=out, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    except OSError as e:
        raise ArtifactError(_write_error(e, out)) from e
    try:
        try:
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(stage)
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
            (stage / STUDENT_FILE).write_bytes(buf.getvalue())
            del buf
            for name, write in (extra_writers or {}).items():
                write(stage / name)
            names = [STUDENT_FILE] + sorted(
                f.name for f in stage.iterdir() if f.is_file() and f.name not in (STUDENT_FILE, METADATA_FILE)
            )
            files = {}
            for name in names:
                _fsync(stage / name)
                files[name] = {"sha256": sha256_file(stage / name), "bytes": (stage / name).stat().st_size}
            metadata = dict(metadata)
            metadata["files"] = {**(metadata.get("files") or {}), **files}
            text = json.dumps(metadata, indent=2, sort_keys=False, default=str) + "\n"
            (stage / METADATA_FILE).write_text(text, encoding="utf-8")
            _fsync(stage / METADATA_FILE)
            _fsync(stage)
        except OSError as e:
            raise ArtifactError(_write_error(e, out)) from e
        # ---- commit: the staged set replaces the earlier one; metadata.json last ----
        earlier = has_artifacts(out)
        new = set(names) | {METADATA_FILE}
        derived = sorted({p.name for pat in DERIVED_PATTERNS for p in out.glob(pat) if p.is_file()} - new)
        old_set = sorted(_earlier_set_files(out) - new) if earlier else []
        for name in derived:  # before the new weights arrive: never beside them
            (out / name).unlink(missing_ok=True)
        for name in names:  # student.pt first: from here on the old metadata.json's checksum no longer fits
            os.replace(stage / name, out / name)
        for name in old_set:
            (out / name).unlink(missing_ok=True)
        os.replace(stage / METADATA_FILE, out / METADATA_FILE)
        _fsync(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if earlier or derived:
        gone = derived + old_set
        log.info(
            "replaced the artifacts of an earlier run in %s%s",
            out,
            f" (removed its {', '.join(gone)})" if gone else "",
        )
    paths = {"student": out / STUDENT_FILE, "metadata": out / METADATA_FILE}
    for name in extra_writers or {}:
        if name in files:
            paths[Path(name).stem] = out / name
    return paths


def update_metadata(path: str | Path, **sections: Any) -> dict[str, Any]:
    """Merge top-level sections into an existing metadata.json, atomically."""
    meta = read_metadata(path)
    meta.update(sections)
    atomic_write_json(path, meta)
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"metadata file {path} does not exist")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"metadata file {path} is not valid JSON ({e}); re-run training or restore it") from e
    if not isinstance(meta, dict):
        raise ArtifactError(f"metadata file {path} holds a {type(meta).__name__}, not a JSON object")
    return meta


def load_state_dict_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load student.pt with `weights_only=True`: a crafted pickle cannot run code here."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"student weights {path} do not exist; train a student first")
    try:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"{path} is not a loadable state dict (truncated, corrupted, or holds pickled objects that are not "
            f"allowed): {first}"
        ) from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict) and "step" in sd:
        sd = sd["model"]  # a training checkpoint also works
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ArtifactError(f"{path} does not hold a state dict of tensors (found {type(sd).__name__})")
    return sd


def verify_checksum(model_path: str | Path, metadata: dict[str, Any]) -> None:
    want = (metadata.get("files") or {}).get(STUDENT_FILE, {}).get("sha256")
    if want and sha256_file(model_path) != want:
        raise ArtifactError(
            f"{model_path} does not match its metadata.json (checksum differs): the files come from different "
            "runs or saving was interrupted; re-run training or restore both files together"
        )


def build_student(metadata: dict[str, Any], state_dict: dict[str, Any]):
    """Rebuild the student described by metadata and load its weights, naming any mismatch. The model
    is for inference: in eval mode, and a QAT student's weights are baked to their int8 values."""
    from .student import SpikingStudentLM

    try:
        cfg = StudentConfig.from_metadata(metadata)
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"metadata does not describe a valid student: {e}") from e
    model = SpikingStudentLM(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"weights do not match the metadata's architecture: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in expected.items():
        got = tuple(state_dict[k].shape)
        if got != tuple(v.shape):
            vocab_rows = k in ("embed.weight", "lm_head.weight") and got[0] != v.shape[0]
            what = "vocabulary" if vocab_rows else "shape"
            raise ArtifactError(
                f"{what} mismatch for {k}: weights have {got}, metadata implies "
                f"{tuple(v.shape)} (vocab_size={cfg.vocab_size}, dim={cfg.dim}); use the metadata.json of the same run"
            )
    model.load_state_dict(state_dict)
    model.bake_int8_weights()
    model.eval()
    return model


def load_student(model_path: str | Path, metadata_path: str | Path | None = None, map_location: Any = "cpu"):
    """student.pt + metadata.json -> (SpikingStudentLM in eval mode on `map_location`, metadata dict).

    The weights are read and loaded on the CPU (where the model is built), then the whole model moves
    to `map_location`: parameters and buffers end up on one device."""
    model_path = Path(model_path)
    metadata_path = Path(metadata_path) if metadata_path else model_path.parent / METADATA_FILE
    meta = read_metadata(metadata_path)
    verify_checksum(model_path, meta)
    model = build_student(meta, load_state_dict_file(model_path, "cpu"))
    return model.to(map_location), meta
