"""`snn-distill serve`: load a backend, build the app, run uvicorn on a loopback port by default."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ..cli_common import ArgParser, UserError, non_negative_int, positive_int, run_guarded, setup_logging

log = logging.getLogger("snn_distill.serve")
API_KEY_ENV = "SNN_DISTILL_API_KEY"


def _non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def build_serve_parser(prog: str = "snn-distill serve") -> argparse.ArgumentParser:
    p = ArgParser(prog=prog, description="Serve a trained student (or its teacher) over an OpenAI-compatible API.")
    src = p.add_argument_group("what to serve")
    src.add_argument("--artifacts", help="folder with student.pt + metadata.json (+ tokenizer, ONNX files)")
    src.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="run student.pt or an ONNX graph")
    src.add_argument("--onnx-file", help="full graph to run with --backend onnx (default student.onnx in "
                     "--artifacts; its decode sibling is used when present)")  # fmt: skip
    src.add_argument("--teacher-model", help="serve this Hugging Face model / folder / .gguf instead (side by side)")
    src.add_argument("--model-name", help="model id clients send (default: the artifacts folder or teacher name)")
    src.add_argument("--device", default="cpu", help="torch device for --backend torch / --teacher-model")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs --api-key)")
    net.add_argument("--port", type=non_negative_int, default=8000, help="0 picks a free port (logged)")
    net.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                     help=f"require 'Authorization: Bearer KEY' (default ${API_KEY_ENV})")  # fmt: skip
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-concurrency", type=positive_int, default=4, help="requests decoding at once")
    lim.add_argument("--max-queue", type=non_negative_int, default=64, help="requests waiting beyond that (then 503)")
    lim.add_argument("--queue-timeout", type=_non_negative_float, default=60.0, help="seconds a request may wait")
    lim.add_argument("--max-tokens-cap", type=positive_int, default=512, help="upper bound on max_tokens")
    lim.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="larger bodies get 413")
    lim.add_argument("--threads", type=positive_int, default=None,
                     help="intra-op threads (default: CPU cores / max-concurrency, at least 1)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> None:
    if not args.api_key and not is_loopback(args.host):
        raise UserError(
            f"refusing to serve on {args.host} without an API key; pass --api-key KEY (or set {API_KEY_ENV}), "
            "or bind 127.0.0.1"
        )
    if args.teacher_model and args.artifacts:
        raise UserError("pass either --artifacts (serve the student) or --teacher-model (serve the teacher), not both")
    if not args.teacher_model and not args.artifacts:
        raise UserError("nothing to serve: pass --artifacts DIR (a trained student) or --teacher-model ID")
    if args.teacher_model and args.backend == "onnx":
        raise UserError("--teacher-model is served with PyTorch; drop --backend onnx")
    if args.onnx_file and args.backend != "onnx":
        raise UserError("--onnx-file needs --backend onnx")
    if args.artifacts and not Path(args.artifacts).is_dir():
        raise UserError(f"--artifacts {args.artifacts} is not a folder; pass the folder that holds student.pt")


def load_backend(args: argparse.Namespace, threads: int) -> Any:
    """The `LLMBackend` the flags name (strict: missing or broken artifacts are an error, never a stub)."""
    if args.teacher_model:
        from ..backends.hf import HFBackend
        from ..teacher import load_teacher

        teacher = load_teacher(args.teacher_model, device=args.device, dtype="auto")
        return HFBackend(teacher.model, teacher.tokenizer, device=args.device)
    art = Path(args.artifacts)
    if args.backend == "onnx":
        from ..backends.onnx import ONNXSNNBackend

        onnx_file = Path(args.onnx_file) if args.onnx_file else None
        if onnx_file is not None and not onnx_file.is_absolute() and not onnx_file.exists():
            onnx_file = art / onnx_file  # a bare name means the file inside --artifacts
        return ONNXSNNBackend(art, onnx_path=onnx_file, num_threads=threads)
    from ..backends.snn import SNNLLMBackend

    return SNNLLMBackend(model_path=str(art / "student.pt"), device=args.device, strict=True)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from e
    return sock


def _serve(args: argparse.Namespace) -> None:
    from . import require_serve_deps

    check_args(args)
    try:
        require_serve_deps()
    except ImportError as e:
        raise UserError(str(e)) from None
    import uvicorn

    from .app import create_app
    from .engine import Engine

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.max_concurrency)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    backend = load_backend(args, threads)
    name = args.model_name or (args.teacher_model or Path(args.artifacts).resolve().name)
    engine = Engine(backend, args.max_concurrency, args.max_queue, args.queue_timeout, args.max_tokens_cap)
    engine.warm_up()
    app = create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.warning("serving %r (%s) at http://%s:%d/v1", name, type(backend).__name__, shown, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()


def serve_main(argv: list[str] | None = None, prog: str = "snn-distill serve") -> int:
    args = build_serve_parser(prog).parse_args(argv)
    setup_logging(args.quiet)
    logging.getLogger("snn_distill.serve").setLevel(logging.WARNING if args.quiet else logging.INFO)
    return run_guarded(_serve, args)
