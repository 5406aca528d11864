"""`LLMBackend`: the text-generation interface shared by every backend.

Subclasses implement five small hooks (`_encode`, `_decode`, `_start`, `_advance`, `eos_token_id`)
and get `generate()` / `stream()` with greedy or seeded sampling, stop strings, context truncation
and incremental UTF-8-safe decoding. The decode loop is stateful: `_start(prompt_ids)` returns an
opaque state (e.g. a KV cache) plus the logits for the next token, `_advance(state, token)` feeds one
token, so a backend pays one position of work per generated token.

Nothing here imports torch at module level: `sample_next_token` works on torch tensors (with a
`torch.Generator`) and, for the torch-free stub path, on plain sequences / numpy arrays (with a
`random.Random`).
"""

from __future__ import annotations

import abc
import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded together with the new ones, so tokenizers that strip a leading space
# (SentencePiece) or merge across token boundaries still produce the right text.
_DECODE_CONTEXT_TOKENS = 5


def _is_torch_tensor(x: Any) -> bool:
    t = type(x)
    return t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter")


def _validate_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    if temperature is not None and (math.isnan(temperature) or temperature < 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None disables it), got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 or None disables it), got {top_p}")


def sample_next_token(
    logits: Any,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Any = None,
) -> int:
    """Pick the next token id from `logits` [V].

    temperature 0 or None -> greedy argmax (first index on ties). Otherwise logits / temperature,
    then keep the `top_k` largest (ties at the k-th value are kept), then the smallest set whose
    probability reaches `top_p` (always at least one token), then sample with `generator`
    (`torch.Generator` for tensors, `random.Random` for other sequences; a fresh OS-seeded one when
    None). NaN logits are treated as -inf. Pure function: never touches the global RNGs.
    """
    _validate_sampling(temperature, top_k, top_p)
    if _is_torch_tensor(logits):
        return _sample_torch(logits, temperature, top_k, top_p, generator)
    return _sample_py(logits, temperature, top_k, top_p, generator)


def _sample_torch(logits: Any, temperature, top_k, top_p, generator) -> int:
    import torch

    x = logits.detach().reshape(-1).to(torch.float32)
    if x.numel() == 0:
        raise ValueError("logits are empty")
    if not temperature:
        i = int(torch.argmax(x).item())  # argmax ranks NaN highest: only then take the slow path
        if not math.isnan(float(x[i].item())):
            return i
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if not temperature or not bool(torch.isfinite(x).any()):
        return int(torch.argmax(x).item())
    x = (x - x.max()) / float(temperature)  # shift first: a tiny temperature cannot overflow to +inf
    if top_k and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly better tokens
        drop_sorted = before >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if generator is None:
        generator = torch.Generator(device=probs.device)
        generator.seed()
    if generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _sample_py(logits: Any, temperature, top_k, top_p, generator) -> int:
    if hasattr(logits, "tolist"):
        logits = logits.tolist()
    x = [float(v) for v in logits]
    x = [float("-inf") if math.isnan(v) else min(v, sys.float_info.max) for v in x]
    if not x:
        raise ValueError("logits are empty")
    best = max(range(len(x)), key=lambda i: (x[i], -i))
    if not temperature or x[best] == float("-inf"):
        return best
    m = x[best]
    x = [(v - m) / float(temperature) for v in x]
    if top_k and top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else float("-inf") for v in x]
    w = [math.exp(v) if v != float("-inf") else 0.0 for v in x]
    total = sum(w)
    probs = [v / total for v in w]
    if top_p is not None and top_p < 1.0:
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        keep, acc = set(), 0.0
        for i in order:
            if acc >= top_p and keep:
                break
            keep.add(i)
            acc += probs[i]
        probs = [p if i in keep else 0.0 for i, p in enumerate(probs)]
    rng = generator if generator is not None else random.Random(os.urandom(16))
    r = rng.random() * sum(probs)
    acc = 0.0
    last = best
    for i, p in enumerate(probs):
        if p <= 0.0:
            continue
        acc += p
        last = i
        if r < acc:
            return i
    return last


def _make_generator(seed: int | None, like: Any) -> Any:
    """A private RNG for one generation: torch.Generator for tensor logits, random.Random otherwise."""
    if _is_torch_tensor(like):
        import torch

        g = torch.Generator(device=like.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        return g
    return random.Random(seed if seed is not None else os.urandom(16))


def _fast_logits(logits: Any) -> Any:
    """numpy logits (e.g. from ONNX Runtime) -> torch tensor when torch is installed (fast sampling)."""
    if _is_torch_tensor(logits) or type(logits).__module__ != "numpy":
        return logits
    try:
        import torch
    except Exception:
        return logits
    return torch.from_numpy(logits.astype("float32", copy=False).reshape(-1))


def _normalize_stops(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    return [s for s in stop if isinstance(s, str) and s]


class _StopFilter:
    """Releases streamed text, holding back any tail that could still become a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            self.stopped = True
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class LLMBackend(abc.ABC):
    """Common interface: `generate(prompt, ...) -> continuation` and `stream(prompt, ...) -> pieces`.

    Attributes subclasses may set: `max_context` (int or None: longest sequence the model sees; longer
    prompts are left-truncated), `is_stub` (True for placeholder backends).
    After each call `last_token_ids` holds the ids generated (EOS excluded).
    """

    max_context: int | None = None
    is_stub: bool = False

    def __init__(self) -> None:
        self.last_token_ids: list[int] = []

    # ---- hooks ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Text -> token ids (with whatever special tokens the model was trained with)."""

    @abc.abstractmethod
    def _decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, skipping special tokens."""

    @abc.abstractmethod
    def _start(self, prompt_ids: list[int]) -> tuple[Any, Any]:
        """Run the prompt; return (state, logits [V] for the next token)."""

    @abc.abstractmethod
    def _advance(self, state: Any, token_id: int) -> tuple[Any, Any]:
        """Feed one token; return (new state, logits [V] for the next token)."""

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int | list[int] | None:
        """Id (or ids) that end generation; None when the vocabulary has none."""

    @property
    def bos_token_id(self) -> int | None:
        return None

    # ---- helpers ----------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        eos = self.eos_token_id
        if eos is None:
            return set()
        if isinstance(eos, int):
            return {eos}
        return {int(e) for e in eos}

    def _empty_prompt_ids(self) -> list[int]:
        if self.bos_token_id is not None:
            return [int(self.bos_token_id)]
        eos = self.eos_token_id
        if isinstance(eos, int):
            return [eos]
        if eos:
            return [int(next(iter(eos)))]
        return [0]

    def _fit_prompt(self, ids: list[int], max_tokens: int) -> list[int]:
        """Left-truncate so prompt + max_tokens fits `max_context` (keep at least half when it cannot)."""
        ctx = self.max_context
        if not ctx or len(ids) + max_tokens <= ctx:
            return ids
        keep = ctx - max_tokens if max_tokens < ctx else max(1, ctx // 2)
        return ids[-keep:] if len(ids) > keep else ids

    # ---- public API -------------------------------------------------------------------------
    def stream(
        self,
        prompt: str,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece, as soon as each piece decodes cleanly.

        Same arguments as `generate`. Pieces never end in a half-decoded character (trailing U+FFFD
        is held back until the next token completes it) and never contain a stop string.
        """
        if max_tokens is None or int(max_tokens) < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        _validate_sampling(temperature, top_k, top_p)
        self.last_token_ids = []
        return self._stream(prompt, int(max_tokens), temperature, top_k, top_p, _normalize_stops(stop), seed)

    def _stream(self, prompt, max_tokens, temperature, top_k, top_p, stops, seed) -> Iterator[str]:
        if max_tokens == 0:
            return
        prompt_ids = [int(i) for i in self._encode(prompt if prompt is not None else "")]
        if not prompt_ids:
            prompt_ids = self._empty_prompt_ids()
        prompt_ids = self._fit_prompt(prompt_ids, max_tokens)
        yield from self._run(prompt_ids, max_tokens, temperature, top_k, top_p, stops, seed)

    def _run(self, prompt_ids, max_tokens, temperature, top_k, top_p, stops, seed) -> Iterator[str]:
        eos_ids = self._eos_ids()
        ctx_ids = list(prompt_ids)  # what the model currently sees (for the sliding window)
        state, logits = self._start(list(ctx_ids))
        logits = _fast_logits(logits)
        generator = None if not temperature else _make_generator(seed, logits)
        all_ids = list(prompt_ids[-_DECODE_CONTEXT_TOKENS:])
        prefix_offset, read_offset = 0, len(all_ids)
        filt = _StopFilter(stops)
        generated: list[int] = []
        self.last_token_ids = generated
        for step in range(max_tokens):
            tok = sample_next_token(_fast_logits(logits), temperature, top_k, top_p, generator)
            if tok in eos_ids:
                break
            generated.append(tok)
            all_ids.append(tok)
            prefix_text = self._decode(all_ids[prefix_offset:read_offset])
            new_text = self._decode(all_ids[prefix_offset:])
            if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
                piece = new_text[len(prefix_text) :]
                prefix_offset, read_offset = read_offset, len(all_ids)
                out = filt.push(piece)
                if out:
                    yield out
                if filt.stopped:
                    return
            if step + 1 == max_tokens:
                break
            ctx_ids.append(tok)
            if self.max_context and len(ctx_ids) > self.max_context:
                # Context full: restart on the most recent half of the window (one recomputation
                # every max_context/2 tokens instead of one per token).
                ctx_ids = ctx_ids[-max(1, self.max_context // 2) :]
                state, logits = self._start(list(ctx_ids))
            else:
                state, logits = self._advance(state, tok)
        # Flush what is still held back: an incomplete character at the very end, or a stop prefix.
        if read_offset < len(all_ids):
            prefix_text = self._decode(all_ids[prefix_offset:read_offset])
            new_text = self._decode(all_ids[prefix_offset:])
            if len(new_text) > len(prefix_text):
                out = filt.push(new_text[len(prefix_text) :])
                if out:
                    yield out
                if filt.stopped:
                    return
        tail = filt.flush()
        if tail:
            yield tail

    def generate(
        self,
        prompt: str,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> str:
        """Return ONLY the continuation of `prompt` (at most `max_tokens` tokens).

        temperature 0 / None: greedy. Otherwise sampling with optional top_k / top_p, reproducible
        when `seed` is given (a private generator; the global RNGs are untouched). Generation ends at
        EOS, after `max_tokens`, or just before the first `stop` string (never included).
        """
        return "".join(self.stream(prompt, max_tokens, temperature, top_k, top_p, stop, seed))


__all__ = ["LLMBackend", "REPLACEMENT_CHAR", "sample_next_token"]


class TokenizerVocabBackend(LLMBackend):
    """Hooks shared by backends whose model has a fixed logit width `self.vocab_size` and an HF-style
    `self.tokenizer` that may not match it exactly: special ids outside the logits count as absent,
    and ids the model cannot take are replaced by EOS (or 0)."""

    tokenizer: Any
    vocab_size: int

    def _special_id(self, name: str) -> int | None:
        tid = getattr(self.tokenizer, name, None)
        return int(tid) if isinstance(tid, int) and 0 <= tid < self.vocab_size else None

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token_id")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token_id")

    def _encode(self, text: str) -> list[int]:
        ids = [int(i) for i in self.tokenizer.encode(text)]
        v = self.vocab_size
        if any(i >= v or i < 0 for i in ids):
            repl = self.eos_token_id if self.eos_token_id is not None else 0
            ids = [i if 0 <= i < v else repl for i in ids]
        return ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
