"""Compiled vs fused vs per-step-loop LIF: forward+backward time and memory saved for backward, on CPU.

    python bench/bench_lif.py [--timesteps 4 8 16] [--neurons 512] [--repeats 15] [--rss] [--snntorch]

Input current is [T, batch*tokens, neurons] (default 8 x 64 tokens x 512 features). Times are medians
over `--repeats` rounds; each round runs every variant once, round-robin (alternating the order) so
drift and background load hit all alike. "compiled" is `lif_kernel="compiled"` (torch.compile); its
first call per T pays the compile, reported on its own ("compile s": the first call minus the median
call) and kept out of the medians. Inductor caches compiled kernels on disk: for a cold compile time
run with `TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)`. "Saved" is the bytes of the distinct storages
autograd keeps for backward (via saved_tensors_hooks): deterministic, and what stays resident per
layer in a deep network. `--rss` adds the peak resident-set growth of one forward+backward in a
fresh process (Linux only; includes transient buffers and allocator effects; each variant first runs
once on a tiny input, so lazy initialisation and the compile stay out of it). `--snntorch` adds
snnTorch's `Leaky` stepped over T the usual way (indexing the input per step), for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from snn_distill.neurons import DEFAULT_SLOPES, lif_multistep  # noqa: E402

MIB = 2**20
KERNELS = ["loop", "fused", "compiled"]  # lif_multistep's kernels, in table order
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_step(variant: str, args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """current [T, N, F] (requires grad) -> spikes [T, N, F], for one implementation."""
    kw = dict(decay=args.decay, threshold=args.threshold, surrogate=args.surrogate)
    if variant in KERNELS:
        return lambda x: lif_multistep(x, kernel=variant, **kw)
    if variant == "snntorch":
        import snntorch as snn
        from snntorch import surrogate

        k = DEFAULT_SLOPES[args.surrogate]
        grads = {
            "sigmoid": lambda: surrogate.sigmoid(slope=k),
            "fast_sigmoid": lambda: surrogate.fast_sigmoid(slope=k),
            "arctan": lambda: surrogate.atan(alpha=k),
        }
        if args.surrogate not in grads:
            raise SystemExit(f"--snntorch has no equivalent of surrogate {args.surrogate!r}")
        lif = snn.Leaky(beta=args.decay, threshold=args.threshold, spike_grad=grads[args.surrogate]())

        def run(x: torch.Tensor) -> torch.Tensor:
            mem = lif.init_leaky()
            out = []
            for t in range(x.shape[0]):
                spk, mem = lif(x[t], mem)
                out.append(spk)
            return torch.stack(out)

        return run
    raise ValueError(variant)


def inputs(T: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(T)
    shape = (T, args.batch * args.tokens, args.neurons)
    dtype = DTYPES[args.dtype]
    # mean 0.25, std 1: about a fifth of the neurons fire per step at decay 0.5, threshold 1
    current = (torch.randn(shape, generator=gen) + 0.25).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    return current, grad


def fwd_bwd(step: Callable, current: torch.Tensor, grad: torch.Tensor) -> float:
    x = current.detach().requires_grad_()
    t0 = time.perf_counter()
    step(x).backward(grad)
    return time.perf_counter() - t0


def saved_bytes(step: Callable, current: torch.Tensor) -> int:
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(weakref.ref(t))
        return t

    x = current.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step(x)
    # Count what the graph still holds: a node dropped during forward (e.g. behind a .detach()) frees
    # its saved tensors. Distinct storages only. The input counts when saved (the compiled kernel
    # keeps it): in a network it is a matmul output that would be freed otherwise.
    storages = {}
    for ref in packed:
        t = ref()
        if t is not None:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    del out
    return sum(storages.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_rss(args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS growth (MiB) of one forward+backward, printed as JSON."""
    torch.set_num_threads(args.threads)
    variant, T = args.child_variant, args.child_T
    step = make_step(variant, args)
    current, grad = inputs(T, args)
    # one call on a tiny input first: lazy initialisation, and the compiled kernel's compile (the same
    # dynamic-shape graph), stay out of the measurement without leaving large freed blocks behind
    tiny = torch.randn(T, 2, 8, dtype=current.dtype)
    fwd_bwd(step, tiny, torch.ones_like(tiny))
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    fwd_bwd(step, current, grad)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_rss_mib(variant: str, T: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--child-variant", variant, "--child-T", str(T)]
    for name in ("batch", "tokens", "neurons", "decay", "threshold", "surrogate", "dtype", "threads"):
        cmd += [f"--{name}", str(getattr(args, name))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--neurons", type=int, default=512, help="features per token")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decay", type=float, default=0.5)
    p.add_argument("--threshold", type=float, default=1.0)
    p.add_argument("--surrogate", default="sigmoid", choices=sorted(DEFAULT_SLOPES))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rss", action="store_true", help="also measure peak RSS growth in fresh processes")
    p.add_argument("--snntorch", action="store_true", help="also time snnTorch Leaky stepped over T")
    p.add_argument("--child-variant", help=argparse.SUPPRESS)
    p.add_argument("--child-T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_variant:
        child_rss(args)
        return

    torch.set_num_threads(args.threads)
    variants = KERNELS + (["snntorch"] if args.snntorch else [])
    steps = {v: make_step(v, args) for v in variants}
    print(
        f"LIF fwd+bwd on CPU, torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
        f"current [T, {args.batch}x{args.tokens}, {args.neurons}], surrogate {args.surrogate}, "
        f"decay {args.decay}, threshold {args.threshold}, median of {args.repeats}\n"
    )
    head = ["T", *(f"{v} ms" for v in KERNELS), "fused speedup", "compiled speedup"]
    head += [f"{v} saved MiB" for v in KERNELS]
    if args.rss:
        head += [f"{v} peak RSS MiB" for v in KERNELS]
    if args.snntorch:
        head += ["snnTorch ms", "snnTorch saved MiB"]
    head += ["compile s", "spike rate"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for T in args.timesteps:
        print("| " + " | ".join(measure_row(T, variants, steps, args)) + " |", flush=True)


def timed_rounds(T: int, variants: list[str], steps: dict[str, Callable], args) -> tuple[dict[str, float], float]:
    """Median ms per variant over round-robin rounds, and the compiled kernel's first call in s."""
    current, grad = inputs(T, args)
    first = fwd_bwd(steps["compiled"], current, grad)  # compiles (or loads from inductor's cache)
    for v in variants:
        for _ in range(args.warmup):
            fwd_bwd(steps[v], current, grad)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]  # each variant in each slot
        for v in order if r % 2 == 0 else order[::-1]:
            times[v].append(fwd_bwd(steps[v], current, grad))
    return {v: 1e3 * statistics.median(times[v]) for v in variants}, first


def measure_row(T: int, variants: list[str], steps: dict[str, Callable], args) -> list[str]:
    ms, first = timed_rounds(T, variants, steps, args)
    current, _ = inputs(T, args)
    saved = {v: saved_bytes(steps[v], current) / MIB for v in variants}
    with torch.no_grad():
        spikes = lif_multistep(current, decay=args.decay, threshold=args.threshold, kernel="fused")
    row = [str(T), *(f"{ms[v]:.1f}" for v in KERNELS)]
    row += [f"{ms['loop'] / ms['fused']:.2f}x", f"{ms['loop'] / ms['compiled']:.2f}x"]
    row += [f"{saved[v]:.1f}" for v in KERNELS]
    if args.rss:
        row += [f"{peak_rss_mib(v, T, args):.0f}" for v in KERNELS]
    if args.snntorch:
        row += [f"{ms['snntorch']:.1f}", f"{saved['snntorch']:.1f}"]
    row += [f"{first - ms['compiled'] / 1e3:.1f}", f"{spikes.float().mean().item():.3f}"]
    return row


if __name__ == "__main__":
    main()
