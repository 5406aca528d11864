#!/usr/bin/env python
"""Serving throughput and latency: N concurrent streaming clients against `snn-distill serve`.

    python bench/bench_serve.py --artifacts artifacts/demo [--backend torch onnx] [--clients 1 8 32]

For each backend it starts the server on a free loopback port (or uses `--url`), then for each client
count runs that many clients at once; each client sends `--requests` streaming completions one after
another (a distinct prompt each) and every request generates exactly `--max-tokens` tokens (EOS
suppressed with `min_tokens`). Reported per row: requests/s, output tokens/s, p50/p95 time to first
token (TTFT: request sent -> first text chunk), p50/p95 per-token latency (TPOT: (last chunk - first
chunk) / (tokens - 1) for each request; a chunk carries more than one token only while a character
is still incomplete, so for readable text chunks and tokens coincide) and the number of failed
requests. Clients and server share the machine's cores, as a phone app and its local model would.

The ONNX backend uses the decode graph beside the full one (`student.decode.onnx`,
`student.decode.int8.onnx`) when it exists; export it first with
`python scripts/export_snn_to_onnx.py --model-path DIR/student.pt --decode-graph [--quantize int8]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from snn_distill.data import synthetic_prompts  # noqa: E402


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    tpot: float | None = None
    tokens: int = 0
    error: str = ""


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> Sample:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with http.stream("POST", url + "/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError as e:
        return Sample(False, error=f"{type(e).__name__}: {e}")
    if first is None:
        return Sample(False, error="no text")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(True, ttft=first - t0, tpot=tpot, tokens=tokens)


async def run_clients(url: str, key: str | None, model: str, clients: int, args) -> tuple[list[Sample], float]:
    prompts = synthetic_prompts()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout, limits=limits) as http:

        async def client(c: int) -> list[Sample]:
            out = []
            for r in range(args.requests):
                body = {
                    "model": model, "prompt": prompts[(c * args.requests + r) % len(prompts)],
                    "max_tokens": args.max_tokens, "min_tokens": args.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True},
                }  # fmt: skip
                out.append(await one_request(http, url, body))
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [s for rs in results for s in rs], wall


def start_server(args, backend: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "snn_distill.serve", "--artifacts", args.artifacts, "--backend", backend,
           "--port", "0", "--max-concurrency", str(args.max_concurrency), "--max-queue", "1024",
           "--queue-timeout", str(args.timeout), "--max-tokens-cap", str(args.max_tokens), "--quiet"]  # fmt: skip
    if backend == "onnx" and args.onnx_file:
        cmd += ["--onnx-file", args.onnx_file]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT, env={**os.environ})
    while True:
        text = log_path.read_text()
        m = re.search(r"at (http://\S+/v1)", text)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"error: the {backend} server did not start:\n{text.strip()}")
        time.sleep(0.2)


def row(backend: str, clients: int, samples: list[Sample], wall: float, concurrency: str) -> str:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft * 1e3 for s in ok]
    tpot = [s.tpot * 1e3 for s in ok if s.tpot is not None]
    tokens = sum(s.tokens for s in ok)
    return (
        f"| {backend} | {clients} | {concurrency} | {len(ok) / wall:.2f} | {tokens / wall:.0f} | "
        f"{percentile(ttft, 0.5):.0f} | {percentile(ttft, 0.95):.0f} | {percentile(tpot, 0.5):.1f} | "
        f"{percentile(tpot, 0.95):.1f} | {len(samples) - len(ok)} |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts/demo", help="the student to serve (make demo writes it)")
    p.add_argument("--backend", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"])
    p.add_argument("--onnx-file", help="full graph for the ONNX backend (default student.onnx)")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-concurrency", type=int, default=4, help="the server's --max-concurrency")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (client and queue)")
    p.add_argument("--url", help="bench a running server instead (its /v1 URL); --backend only labels rows")
    p.add_argument("--api-key", default=os.environ.get("SNN_DISTILL_API_KEY"))
    args = p.parse_args()
    if not args.url and not (Path(args.artifacts) / "student.pt").is_file():
        print(f"error: no student.pt in {args.artifacts}; run `make demo` or pass --artifacts DIR", file=sys.stderr)
        return 2

    print(f"# bench_serve: {os.cpu_count()} cores, {args.requests} requests/client, {args.max_tokens} tokens each")
    print("| backend | clients | server concurrency | req/s | tok/s | TTFT p50 ms | TTFT p95 ms | "
          "per-token p50 ms | per-token p95 ms | errors |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors = 0
    for backend in args.backend:
        proc = None
        url = args.url
        if url is None and backend == "onnx":
            from snn_distill.backends.onnx import decode_sibling

            full = Path(args.artifacts) / (args.onnx_file or "student.onnx")
            if not decode_sibling(full).is_file():
                print(f"  note: no {decode_sibling(full).name}: every token recomputes the whole prefix "
                      "(export with --decode-graph)", file=sys.stderr)  # fmt: skip
        if url is None:
            log_path = Path(tempfile.mkdtemp(prefix="bench_serve_")) / f"{backend}.log"
            proc, url = start_server(args, backend, log_path)
        try:
            model = httpx.get(url + "/models", headers={"Authorization": f"Bearer {args.api_key}"}
                              if args.api_key else {}).json()["data"][0]["id"]  # fmt: skip
            asyncio.run(run_clients(url, args.api_key, model, 1, argparse.Namespace(**{**vars(args), "requests": 1})))
            for clients in args.clients:
                samples, wall = asyncio.run(run_clients(url, args.api_key, model, clients, args))
                conc = "?" if args.url else str(args.max_concurrency)
                print(row(backend, clients, samples, wall, conc), flush=True)
                failed = [s.error for s in samples if not s.ok]
                errors += len(failed)
                for e in sorted(set(failed))[:3]:
                    print(f"  error: {e}", file=sys.stderr)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
