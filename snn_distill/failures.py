"""Recognise the failures a user meets on shared machines and say, in one line, what to do.

Each `*_message` function turns a real exception (as raised by PyTorch, the OS or the Hugging Face
libraries) into the text of a one-line `error: ...`; the callers raise it as a user error. The
README's "When things go wrong" table (docs/troubleshooting.md) lists them.
"""

from __future__ import annotations

import errno
from typing import Any

# Substrings of the RuntimeError texts PyTorch raises when an allocation fails (CUDA, CPU, MPS, XPU).
_OOM_TEXTS = (
    "out of memory",  # CUDA / MPS / XPU: "CUDA out of memory. Tried to allocate ..."
    "can't allocate memory",  # CPU allocator (Linux): "DefaultCPUAllocator: can't allocate memory"
    "not enough memory",  # CPU allocator (Windows): "DefaultCPUAllocator: not enough memory"
    "cannot allocate memory",  # errno 12 text
)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _chain(e: BaseException | None):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_out_of_memory(e: BaseException) -> bool:
    """True for `MemoryError`, `torch.OutOfMemoryError` and PyTorch's allocator RuntimeErrors."""
    for x in _chain(e):
        if isinstance(x, MemoryError) or type(x).__name__ == "OutOfMemoryError":
            return True
        if isinstance(x, RuntimeError) and any(t in str(x).lower() for t in _OOM_TEXTS):
            return True
    return False


def out_of_memory_message(
    e: BaseException, *, step: int | None = None, batch_size: int = 1, grad_accum_steps: int = 1, max_length: int = 0
) -> str:
    """`error: out of memory ...` for the training step: halve the batch, double the accumulation (the
    effective batch, and so the run, stays the same), or shorten the sequences."""
    where = f" at step {step}" if step is not None else ""
    if batch_size > 1:
        half = max(d for d in range(1, batch_size // 2 + 1) if batch_size % d == 0)  # keeps the product exact
        fix = (
            f"use a smaller --batch-size with more --grad-accum-steps to keep the effective batch of "
            f"{batch_size * grad_accum_steps} (e.g. --batch-size {half} --grad-accum-steps "
            f"{grad_accum_steps * batch_size // half})"
        )
    else:
        fix = "--batch-size is already 1"
    if max_length > 16:
        fix += f", or a smaller --max-length (now {max_length})"
    fix += ", or --gradient-checkpointing"
    return f"out of memory{where} ({first_line(e)}); {fix}; nothing was saved from this run"


def generic_out_of_memory_message(e: BaseException) -> str:
    return (
        f"out of memory ({first_line(e)}); close other programs using this memory or use smaller settings "
        "(training: a smaller --batch-size with more --grad-accum-steps, or a smaller --max-length)"
    )


def is_disk_full(e: BaseException) -> bool:
    return any(isinstance(x, OSError) and x.errno in _DISK_FULL for x in _chain(e))


def disk_full_message(e: BaseException, what: Any = None) -> str:
    """`no space left on device while writing X; ...`: what was there before is left as it was."""
    target = what or getattr(e, "filename", None) or "a file"
    return (
        f"no space left on device while writing {target}; nothing was replaced (the files there are those of "
        "before): free some space and run again (add --resume if a checkpoint.pt was written)"
    )


def hub_error_message(name: str, e: BaseException) -> str | None:
    """A one-line fix for Hugging Face Hub failures that need the user's action (gated or private
    model, bad token); None for other errors (offline, misspelt id), which the caller words itself."""
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        GatedRepoError = RepositoryNotFoundError = ()  # type: ignore[assignment,misc]  # noqa: N806
    chain = list(_chain(e))
    texts = " ".join(str(x) for x in chain).lower()
    # transformers re-raises GatedRepoError as "You are trying to access a gated repo" (an OSError); the
    # Hub's text for an unknown repo ("... a private or gated repo ...") is not a gated answer.
    if any(isinstance(x, GatedRepoError) for x in chain) or "access a gated repo" in texts:
        return (
            f"teacher {name!r} is a gated model: accept its licence on https://huggingface.co/{name}, then run "
            "`hf auth login` or set HF_TOKEN to a token of that account, and run again"
        )
    status = next(
        (
            getattr(getattr(x, "response", None), "status_code", None)
            for x in chain
            if getattr(getattr(x, "response", None), "status_code", None)
        ),
        None,
    )
    if status in (401, 403) and "invalid credentials" in texts:
        return f"the Hugging Face token was refused while fetching {name!r}: run `hf auth login` again or fix HF_TOKEN"
    if status in (401, 403) or (any(isinstance(x, RepositoryNotFoundError) for x in chain) and "private" in texts):
        return (
            f"teacher {name!r} was not found on the Hugging Face Hub, or it is private or gated: check the id; "
            "for private or gated models run `hf auth login` or set HF_TOKEN"
        )
    return None
