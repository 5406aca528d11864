"""Fused vs per-step-loop LIF: forward+backward time and memory saved for backward, on CPU.

    python bench/bench_lif.py [--timesteps 4 8 16] [--neurons 512] [--repeats 15] [--rss] [--snntorch]

Input current is [T, batch*tokens, neurons] (default 8 x 64 tokens x 512 features). Times are medians
over `--repeats` runs, fused and loop interleaved (alternating which goes first) so drift and
background load hit both alike. "Saved" is the bytes of the distinct storages autograd keeps for
backward (via saved_tensors_hooks): deterministic, and what stays resident per layer in a deep
network. `--rss` adds the peak resident-set growth of one forward+backward in a fresh process
(Linux only; includes transient buffers and allocator effects). `--snntorch` adds snnTorch's
`Leaky` stepped over T the usual way (indexing the input per step), for reference.
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_step(variant: str, args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """current [T, N, F] (requires grad) -> spikes [T, N, F], for one implementation."""
    kw = dict(decay=args.decay, threshold=args.threshold, surrogate=args.surrogate)
    if variant == "fused":
        return lambda x: lif_multistep(x, fused=True, **kw)
    if variant == "loop":
        return lambda x: lif_multistep(x, fused=False, **kw)
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
    # its saved tensors. Distinct storages only; the graph input is alive anyway and not charged.
    storages = {}
    for ref in packed:
        t = ref()
        if t is not None:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    storages.pop(x.untyped_storage().data_ptr(), None)
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
    variants = ["loop", "fused"] + (["snntorch"] if args.snntorch else [])
    steps = {v: make_step(v, args) for v in variants}
    print(
        f"LIF fwd+bwd on CPU, torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
        f"current [T, {args.batch}x{args.tokens}, {args.neurons}], surrogate {args.surrogate}, "
        f"decay {args.decay}, threshold {args.threshold}, median of {args.repeats}\n"
    )
    head = ["T", "loop ms", "fused ms", "speedup", "loop saved MiB", "fused saved MiB", "ratio"]
    if args.rss:
        head += ["loop peak RSS MiB", "fused peak RSS MiB"]
    if args.snntorch:
        head += ["snnTorch ms", "snnTorch saved MiB"]
    head += ["spike rate"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for T in args.timesteps:
        current, grad = inputs(T, args)
        for v in variants:
            for _ in range(args.warmup):
                fwd_bwd(steps[v], current, grad)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                times[v].append(fwd_bwd(steps[v], current, grad))
        ms = {v: 1e3 * statistics.median(times[v]) for v in variants}
        saved = {v: saved_bytes(steps[v], current) / MIB for v in variants}
        with torch.no_grad():
            rate = lif_multistep(current, decay=args.decay, threshold=args.threshold).float().mean().item()
        row = [
            str(T),
            f"{ms['loop']:.1f}",
            f"{ms['fused']:.1f}",
            f"{ms['loop'] / ms['fused']:.2f}x",
            f"{saved['loop']:.1f}",
            f"{saved['fused']:.1f}",
            f"{saved['fused'] / saved['loop']:.2f}",
        ]
        if args.rss:
            row += [f"{peak_rss_mib('loop', T, args):.0f}", f"{peak_rss_mib('fused', T, args):.0f}"]
        if args.snntorch:
            row += [f"{ms['snntorch']:.1f}", f"{saved['snntorch']:.1f}"]
        row += [f"{rate:.3f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
