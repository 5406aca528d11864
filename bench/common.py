"""Shared helpers for the benchmarks: machine description, fp32 matmul FLOP/s probe, interleaved timing.
The SmolLM2-135M teacher comes from `snn_distill.smollm2.fetch_smollm2` (re-exported here).

Everything here runs from a plain checkout (`python bench/<script>.py`); nothing needs installing.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

# Before torch loads libgomp: the training CLI's OpenMP wait policy (passive on busy cores).
from snn_distill.cli import configure_openmp_wait  # noqa: E402  (torch-free)

configure_openmp_wait()

import torch  # noqa: E402

from snn_distill.smollm2 import VOCAB_SIZE as SMOLLM2_VOCAB  # noqa: E402, F401  (re-exported)
from snn_distill.smollm2 import fetch_smollm2  # noqa: E402, F401  (re-exported)


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


def md_table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table; `align` is one letter per column, "l" or "r" (default: all left)."""
    rules = ["---:" if a == "r" else "---" for a in (align or "l" * len(head))]
    assert len(rules) == len(head), "one alignment letter per column"
    lines = ["| " + " | ".join(head) + " |", "|" + "".join(r + "|" for r in rules)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
