"""`snn-distill serve`: an OpenAI-compatible HTTP server for any `LLMBackend`.

A request travels route (`app.py`) -> validated pydantic request (`protocol.py`) -> the engine's
bounded queue (`engine.py`) -> `LLMBackend.stream` in a worker thread -> server-sent events. Chat
messages become a prompt through the tokenizer's chat template, or a plain-text fallback
(`chat.py`). FastAPI, uvicorn and pydantic are the optional extra `snn-distill[serve]`.
"""

from __future__ import annotations

INSTALL_HINT = "pip install 'snn-distill[serve]'"


def require_serve_deps() -> None:
    """Raise ImportError with a one-line install hint when the `serve` extra is missing."""
    missing = []
    for name in ("fastapi", "uvicorn", "pydantic"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"the server needs {', '.join(missing)}: {INSTALL_HINT}")
