"""Student artifacts: `student.pt` (a plain state dict) + `metadata.json`, written atomically.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed, so a
crash never leaves a truncated file under the real name. `metadata.json` is written last and
records the SHA-256 of `student.pt`; a loader that finds a mismatch knows the set is mixed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .config import ARCHITECTURE_VERSION, StudentConfig

STUDENT_FILE = "student.pt"
METADATA_FILE = "metadata.json"


class ArtifactError(RuntimeError):
    """Artifacts that are missing, broken or inconsistent; the message names the problem."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def save_artifacts(
    output_dir: str | Path, state_dict: dict[str, Any], metadata: dict[str, Any], tokenizer: Any = None
) -> dict[str, Path]:
    """Write tokenizer files, then student.pt, then metadata.json (with student.pt's checksum)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        # Tokenizer files first: they are only read when metadata points at a complete set.
        with tempfile.TemporaryDirectory(dir=out, prefix=".tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                if f.is_file():
                    os.replace(f, out / f.name)
    digest = atomic_torch_save(
        {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, out / STUDENT_FILE
    )
    metadata = dict(metadata)
    metadata.setdefault("files", {})[STUDENT_FILE] = {"sha256": digest}
    atomic_write_json(out / METADATA_FILE, metadata)
    return {"student": out / STUDENT_FILE, "metadata": out / METADATA_FILE}


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
        raise ArtifactError(
            f"metadata file {path} is not valid JSON ({e}); re-run training or restore it"
        ) from e
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
    """Rebuild the student described by metadata and load its weights, naming any mismatch."""
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
    model.eval()
    return model


def load_student(model_path: str | Path, metadata_path: str | Path | None = None, map_location: Any = "cpu"):
    """student.pt + metadata.json -> (SpikingStudentLM in eval mode, metadata dict)."""
    model_path = Path(model_path)
    metadata_path = Path(metadata_path) if metadata_path else model_path.parent / METADATA_FILE
    meta = read_metadata(metadata_path)
    verify_checksum(model_path, meta)
    model = build_student(meta, load_state_dict_file(model_path, map_location))
    return model, meta
