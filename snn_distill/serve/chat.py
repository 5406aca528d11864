"""Chat messages -> one prompt string: the artifacts' chat template, else a plain-text transcript.

The template is, in order: the one recorded in `metadata.json` (`prompt_format.chat_template`, written
when the student was distilled on its teacher's replies, so it is prompted exactly as in training),
then the tokenizer's own (the teacher's tokenizer files are saved with the artifacts). Tokenizers
without one (base models, the whitespace stub) get `Role: text` lines ending in `Assistant:`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def chat_template(backend: Any) -> str | None:
    """The template a backend's prompts should be written in, or None for the plain fallback."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        return None
    recorded = getattr(backend, "chat_template", None)
    if not recorded:
        fmt = (getattr(backend, "metadata", None) or {}).get("prompt_format")
        recorded = fmt.get("chat_template") if isinstance(fmt, dict) else None
    template = recorded or getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def plain_transcript(messages: Sequence[dict[str, str]]) -> str:
    """`System: ...\\nUser: ...\\nAssistant:` (the reply continues after the final colon)."""
    lines = [f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def format_chat(backend: Any, messages: Sequence[dict[str, str]]) -> str:
    """messages [{"role", "content"}] -> the prompt text whose continuation is the assistant's reply.

    The text is fed to the backend raw; a BOS the template writes is dropped when the tokenizer adds
    its own, so the model never sees two."""
    template = chat_template(backend)
    if template is None:
        return plain_transcript(messages)
    tokenizer = backend.tokenizer
    text = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and text.startswith(bos):
        adds_bos = tokenizer.encode("")[:1] == [getattr(tokenizer, "bos_token_id", None)]
        if adds_bos:
            text = text[len(bos) :]
    return text
