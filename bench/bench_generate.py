#!/usr/bin/env python
"""Greedy decoding speed: the student with its key/value cache, the student recomputing the whole
prefix for every token, and the SmolLM2 teacher's own `generate()` — side by side in one run.

    python bench/bench_generate.py --artifacts artifacts/demo [--tokens 64] [--repeats 5]

Each repeat runs the three contestants back to back (interleaved), so machine noise hits all of
them alike; the table reports medians and the ratios of medians. Every contestant generates
exactly --tokens new tokens (EOS ignored) after the same prompt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from snn_distill.artifacts import load_student  # noqa: E402

PROMPT = "Remind me to buy milk when I get close to the grocery store on Main Street."


@torch.inference_mode()
def student_cached(model, ids: torch.Tensor, n: int) -> list[int]:
    logits, past = model.forward_step(ids, None)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits, past = model.forward_step(nxt, past)
    return out


@torch.inference_mode()
def student_recompute(model, ids: torch.Tensor, n: int) -> list[int]:
    out = []
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt], 1)
    return out


@torch.inference_mode()
def teacher_generate(teacher, ids: torch.Tensor, n: int) -> list[int]:
    out = teacher.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default="artifacts/demo")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--cache", default=str(ROOT / ".cache"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    art = Path(args.artifacts)
    if not (art / "student.pt").exists():
        sys.exit(f"error: {art}/student.pt not found; run `make demo` first or pass --artifacts")
    model, meta = load_student(art / "student.pt")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(art))
    ids = torch.tensor([tok(PROMPT)["input_ids"]])

    contestants = {
        "student, KV cache": lambda: student_cached(model, ids, args.tokens),
        "student, recompute prefix": lambda: student_recompute(model, ids, args.tokens),
    }
    if not args.no_teacher:
        from snn_distill.smollm2 import fetch_smollm2
        from snn_distill.teacher import load_teacher

        teacher = load_teacher(str(fetch_smollm2(args.cache))).model
        contestants["teacher generate() (SmolLM2-135M)"] = lambda: teacher_generate(teacher, ids, args.tokens)

    for fn in contestants.values():  # warm-up (allocator, first-call paths)
        fn()
    cached_out, recompute_out = student_cached(model, ids, 16), student_recompute(model, ids, 16)
    assert cached_out == recompute_out, "cached and recomputed greedy decoding disagree"
    times: dict[str, list[float]] = {k: [] for k in contestants}
    for _ in range(args.repeats):
        for name, fn in contestants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["student, KV cache"]
    arch, snn = meta["architecture"], meta["snn_config"]
    print(f"Command: `python bench/bench_generate.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} threads  "
    )
    print(
        f"Student: dim {arch['dim']}, depth {arch['depth']}, T={snn['num_timesteps']}, vocab {meta['vocab_size']}; "
        f"prompt {ids.shape[1]} tokens, {args.tokens} new tokens, greedy, median of {args.repeats}\n"
    )
    print("| decoder | ms / token | tokens / s | time vs student with cache |")
    print("|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m * 1000 / args.tokens:.2f} | {args.tokens / m:.1f} | {m / base:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
