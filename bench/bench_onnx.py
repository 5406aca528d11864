#!/usr/bin/env python
"""ONNX Runtime latency of an exported student: full graph per forward, decode graph per token.

    python bench/bench_onnx.py [--artifacts DIR] [--runs 20] [--warmup 3] [--decode-tokens 64]

DIR (default `artifacts/demo` when it exists) must hold student.pt + metadata.json. Its ONNX files
(fp32 + int8, full + decode graphs) are used when all four exist; otherwise (or with `--reexport`) they
are exported from a copy in a temporary folder, so DIR is never written.
Without DIR a default-shape student (dim 128, depth 2, 4 heads, T=4) with SmolLM2's 49152-token
vocabulary and random weights is built and exported in a temporary folder: latency does not depend
on the weights' values beyond spike counts.

Measured on CPUExecutionProvider with intra-op threads 1 and 2:
* full graph: median wall time of one `session.run` at seq_len 1/16/64/128 (batch 1), fp32 and int8;
* decode graph: greedy decoding of `--decode-tokens` tokens one by one from an empty cache (the token
  fed back is the argmax), median over runs of total time / tokens, fp32 and int8.
Prints a markdown table (stdout) headed by the command line and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2_VOCAB = 49152
SEQ_LENS = (1, 16, 64, 128)
GOAL_MS = 5.0


def build_default_student(folder: Path) -> Path:
    import torch

    from snn_distill.artifacts import build_metadata, save_artifacts
    from snn_distill.config import StudentConfig
    from snn_distill.student import SpikingStudentLM

    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=SMOLLM2_VOCAB, dim=128, depth=2, num_heads=4, num_timesteps=4)
    model = SpikingStudentLM(cfg)
    meta = build_metadata(cfg, model.num_parameters(), {}, {"tokenizer_name": "HuggingFaceTB/SmolLM2-135M"},
                          {"steps": 0, "avg_loss": 0.0}, git_tracking=False)
    save_artifacts(folder, model.state_dict(), meta)
    return folder / "student.pt"


ONNX_FILES = {
    "fp32": "student.onnx",
    "int8": "student.int8.onnx",
    "decode fp32": "student.decode.onnx",
    "decode int8": "student.decode.int8.onnx",
}


def ensure_exported(folder: Path, scratch: Path, force: bool) -> dict[str, Path]:
    """The four ONNX files: those in `folder` when all exist, else a fresh export made in `scratch`
    from a copy of student.pt + metadata.json + tokenizer files (the artifacts folder is never written)."""
    import shutil

    from snn_distill.export.onnx import export_onnx

    files = {k: folder / v for k, v in ONNX_FILES.items()}
    if not force and all(p.is_file() for p in files.values()):
        return files
    scratch.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and (f.name in ("student.pt", "metadata.json") or f.name.startswith("tokenizer")):
            shutil.copy2(f, scratch / f.name)
    print(f"exporting {folder / 'student.pt'} (fp32 + int8, full + decode graphs) into {scratch}...",
          file=sys.stderr)
    export_onnx(scratch / "student.pt", quantize="int8", decode_graph=True)
    return {k: scratch / v for k, v in ONNX_FILES.items()}


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def bench_forward(path: Path, threads: int, seq_len: int, vocab: int, runs: int, warmup: int) -> float:
    import numpy as np

    sess = session(path, threads)
    ids = np.random.default_rng(seq_len).integers(0, vocab, size=(1, seq_len), dtype=np.int64)
    feeds = {"input_ids": ids}
    for _ in range(warmup):
        sess.run(["logits"], feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(["logits"], feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_decode(path: Path, threads: int, tokens: int, rows: int, runs: int, warmup: int) -> float:
    """Median ms per greedily decoded token from an empty cache; `rows`: cache rows per token (T for
    a temporal spiking student, else 1)."""
    import numpy as np

    sess = session(path, threads)
    inputs = sess.get_inputs()
    out_names = [o.name for o in sess.get_outputs()]
    dtypes = [np.uint8 if i.type == "tensor(uint8)" else np.float32 for i in inputs[1:]]  # spikes: uint8

    def one_run() -> float:
        past = [np.zeros((rows, int(i.shape[1]), 0, int(i.shape[3])), dt) for i, dt in zip(inputs[1:], dtypes)]
        tok = 1
        t = time.perf_counter()
        for _ in range(tokens):
            feeds = {"input_ids": np.array([[tok]], dtype=np.int64)}
            feeds.update({i.name: p for i, p in zip(inputs[1:], past)})
            out = sess.run(out_names, feeds)
            tok = int(out[0][0, -1].argmax())
            past = out[1:]
        return (time.perf_counter() - t) / tokens * 1e3

    for _ in range(max(1, warmup // 2)):
        one_run()
    return statistics.median(one_run() for _ in range(max(3, runs // 4)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default=None, help="folder with student.pt + metadata.json (default: "
                   "artifacts/demo if present, else a random default-shape student)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--reexport", action="store_true",
                   help="export afresh (into a temporary folder) even when the ONNX files exist")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import onnxruntime as ort

    from snn_distill.artifacts import read_metadata
    from snn_distill.config import StudentConfig

    tmp = tempfile.TemporaryDirectory(prefix="bench_onnx_")
    random_student = False
    folder = Path(args.artifacts) if args.artifacts else ROOT / "artifacts" / "demo"
    if args.artifacts is None and not (folder / "student.pt").is_file():
        folder = Path(tmp.name) / "random"
        random_student = True
        print("no artifacts/demo: building a random default-shape student (vocab 49152)", file=sys.stderr)
        build_default_student(folder)
    elif not (folder / "student.pt").is_file():
        print(f"error: {folder / 'student.pt'} does not exist; pass --artifacts <folder of a trained student>",
              file=sys.stderr)
        return 2
    files = ensure_exported(folder, Path(tmp.name) / "export", args.reexport)
    cfg = StudentConfig.from_metadata(read_metadata(folder / "metadata.json"))
    timesteps = cfg.num_timesteps if cfg.spiking else 1
    cache_rows = cfg.passes  # cache rows per token
    threads = [int(t) for t in args.threads.split(",") if t.strip()]

    rows = []
    for kind in ("fp32", "int8"):
        size = files[kind].stat().st_size / 1e6
        for th in threads:
            cells = [f"{bench_forward(files[kind], th, s, cfg.vocab_size, args.runs, args.warmup):.2f}"
                     for s in SEQ_LENS]
            dec = bench_decode(files[f"decode {kind}"], th, args.decode_tokens, cache_rows, args.runs, args.warmup)
            rows.append((kind, f"{size:.1f}", th, *cells, f"{dec:.2f}"))
            print(f"{kind} threads={th}: {cells} decode {dec:.2f} ms/token", file=sys.stderr)

    cmd = " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Command: `{cmd}`\n")
    print(f"Student: {'random default-shape' if random_student else folder} — dim {cfg.dim}, depth {cfg.depth}, heads "
          f"{cfg.num_heads}/{cfg.num_kv_heads} kv, T={timesteps}, vocab {cfg.vocab_size}, {cfg.student_type}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, onnxruntime "
          f"{ort.__version__}, load average {load:.2f} at the end; median of {args.runs} runs after "
          f"{args.warmup} warm-up runs\n")
    head = ["model", "file MB", "threads", *[f"forward seq {s} (ms)" for s in SEQ_LENS],
            f"decode ms/token ({args.decode_tokens} tokens)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    best = min(float(r[-1]) for r in rows if r[0] == "int8")
    verdict = "meets" if best < GOAL_MS else "misses"
    print(f"\nGoal: < {GOAL_MS:g} ms/token with int8 + decode graph: best {best:.2f} ms/token ({verdict} it).")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
