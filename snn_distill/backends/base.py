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
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded together with the new ones, so tokenizers that strip a leading space
# (SentencePiece) or merge across token boundaries still produce the right text.
_DECODE_CONTEXT_TOKENS = 5


def torch_or_none() -> Any:
    """The torch module, or None where it is not installed (the backends' stub path runs without it)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install is as good as none here
        return None
    return torch


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


def _vocab_len(logits: Any) -> int:
    return int(logits.numel()) if _is_torch_tensor(logits) else len(logits)


class _Shaping:
    """Logit changes before each pick: EOS (and blank tokens) suppressed early, repetition penalty."""

    def __init__(self, min_tokens: int, penalty: float) -> None:
        self.min_tokens = min_tokens
        self.penalty = penalty

    def active(self, produced: int) -> bool:
        return produced < self.min_tokens or self.penalty != 1.0

    def apply(self, logits: Any, seen: set[int], suppress: list[int]) -> Any:
        """A changed copy of `logits` [V] (torch tensor or sequence); ids outside [0, V) are ignored."""
        n = _vocab_len(logits)
        seen_ids = [i for i in seen if 0 <= i < n] if self.penalty != 1.0 else []
        drop = [i for i in suppress if 0 <= i < n]
        if _is_torch_tensor(logits):
            import torch

            x = logits.detach().reshape(-1).to(torch.float32).clone()
            if seen_ids:
                idx = torch.tensor(seen_ids, dtype=torch.long, device=x.device)
                v = x[idx]
                x[idx] = torch.where(v > 0, v / self.penalty, v * self.penalty)
            if drop:
                x[torch.tensor(drop, dtype=torch.long, device=x.device)] = float("-inf")
            return x
        x = [float(v) for v in (logits.tolist() if hasattr(logits, "tolist") else logits)]
        for i in seen_ids:
            x[i] = x[i] / self.penalty if x[i] > 0 else x[i] * self.penalty
        for i in drop:
            x[i] = float("-inf")
        return x


class LLMBackend(abc.ABC):
    """Common interface: `generate(prompt, ...) -> continuation` and `stream(prompt, ...) -> pieces`.

    Attributes subclasses may set: `max_context` (int or None: longest sequence the model sees; longer
    prompts are left-truncated), `is_stub` (True for placeholder backends).
    After each call `last_token_ids` holds the ids generated (EOS excluded).
    """

    max_context: int | None = None
    is_stub: bool = False
    default_min_tokens: int = 0  # used when generate/stream get min_tokens=None
    default_repetition_penalty: float = 1.0  # used when they get repetition_penalty=None

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
        *,
        min_tokens: int | None = None,
        repetition_penalty: float | None = None,
        raw: bool = False,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece, as soon as each piece decodes cleanly.

        Same arguments as `generate`. Pieces never end in a half-decoded character (trailing U+FFFD
        is held back until the next token completes it) and never contain a stop string.
        """
        if max_tokens is None or int(max_tokens) < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        _validate_sampling(temperature, top_k, top_p)
        min_tokens = self.default_min_tokens if min_tokens is None else min_tokens
        penalty = self.default_repetition_penalty if repetition_penalty is None else repetition_penalty
        if int(min_tokens) < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        if math.isnan(penalty) or penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = none), got {penalty}")
        self.last_token_ids = []
        shaping = _Shaping(int(min_tokens), float(penalty))
        stops = _normalize_stops(stop)
        return self._stream(prompt, int(max_tokens), temperature, top_k, top_p, stops, seed, shaping, raw)

    def _prompt_ids(self, prompt: str, raw: bool) -> list[int]:
        """Token ids of `prompt` as the model gets them; backends that format prompts (a chat
        template) do it here unless `raw`."""
        return [int(i) for i in self._encode(prompt)]

    def _stream(self, prompt, max_tokens, temperature, top_k, top_p, stops, seed, shaping, raw) -> Iterator[str]:
        if max_tokens == 0:
            return
        prompt_ids = self._prompt_ids(prompt if prompt is not None else "", raw)
        if not prompt_ids:
            prompt_ids = self._empty_prompt_ids()
        prompt_ids = self._fit_prompt(prompt_ids, max_tokens)
        yield from self._run(prompt_ids, max_tokens, temperature, top_k, top_p, stops, seed, shaping)

    def _blank_token_ids(self, vocab: int) -> list[int]:
        """Ids (< vocab) whose text is empty or whitespace only (cached per instance)."""
        cached = getattr(self, "_blank_ids", None)
        if cached is None or cached[0] != vocab:
            cached = (vocab, [i for i, t in enumerate(self._decode_each(range(vocab))) if not t.strip()])
            self._blank_ids = cached
        return cached[1]

    def _decode_each(self, ids: Sequence[int]) -> list[str]:
        """The text of each id on its own."""
        return [self._decode([i]) for i in ids]

    def _run(self, prompt_ids, max_tokens, temperature, top_k, top_p, stops, seed, shaping=None) -> Iterator[str]:
        shaping = shaping or _Shaping(0, 1.0)
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
        seen = set(ctx_ids)  # the repetition penalty covers the prompt too, as in Hugging Face generate
        visible = False  # whether the reply has any non-whitespace text yet
        for step in range(max_tokens):
            x = _fast_logits(logits)
            early = len(generated) < shaping.min_tokens
            if shaping.active(len(generated)):
                x = shaping.apply(x, seen, list(eos_ids) if early else [])
            tok = sample_next_token(x, temperature, top_k, top_p, generator)
            if early and not visible and not self._decode([*generated, tok]).strip():
                # a blank first piece: pick again among tokens with visible text (the blank set is
                # only computed when this happens)
                x = shaping.apply(x, set(), self._blank_token_ids(_vocab_len(x)))
                tok = sample_next_token(x, temperature, top_k, top_p, generator)
            if tok in eos_ids:
                break
            generated.append(tok)
            all_ids.append(tok)
            seen.add(tok)
            if not visible and shaping.min_tokens:
                visible = bool(self._decode(generated).strip())
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
        *,
        min_tokens: int | None = None,
        repetition_penalty: float | None = None,
        raw: bool = False,
    ) -> str:
        """Return ONLY the continuation of `prompt` (at most `max_tokens` tokens).

        temperature 0 / None: greedy. Otherwise sampling with optional top_k / top_p, reproducible
        when `seed` is given (a private generator; the global RNGs are untouched). Generation ends at
        EOS, after `max_tokens`, or just before the first `stop` string (never included).

        min_tokens: EOS is suppressed until that many tokens are generated, and so are tokens that
        decode to whitespace only while the reply has no visible text yet (so min_tokens=1 never
        gives an empty or blank reply when max_tokens >= 1). repetition_penalty: as in Hugging Face
        `generate` (CTRL): the logit of every token already in the prompt or the reply is divided by
        it when positive, multiplied when negative; 1 is off. None takes the backend's defaults
        (`default_min_tokens`, `default_repetition_penalty`). raw=True: the prompt is fed as is,
        without the formatting a backend may apply (a chat template).
        """
        return "".join(
            self.stream(
                prompt,
                max_tokens,
                temperature,
                top_k,
                top_p,
                stop,
                seed,
                min_tokens=min_tokens,
                repetition_penalty=repetition_penalty,
                raw=raw,
            )
        )


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
        return self._in_vocab([int(i) for i in self.tokenizer.encode(text)])

    # ---- prompt format of a student distilled on replies ----------------------------------------
    chat_template: str | None = None

    def _setup_prompt_format(self, metadata: dict[str, Any]) -> None:
        """Read metadata's `prompt_format` (written when the student distilled the teacher's replies): the
        chat template its training prompts were written in, and generation defaults (min_tokens=1: never an
        empty or blank reply). Without it, prompts are fed as they are and the defaults stay off."""
        fmt = metadata.get("prompt_format") if isinstance(metadata, dict) else None
        fmt = fmt if isinstance(fmt, dict) else {}
        tmpl = fmt.get("chat_template")
        usable = isinstance(tmpl, str) and tmpl.strip() and not self.is_stub
        self.chat_template = tmpl if usable else None
        defaults = fmt.get("generation_defaults")
        defaults = defaults if isinstance(defaults, dict) else {}
        try:
            min_tokens = max(0, int(defaults.get("min_tokens", type(self).default_min_tokens)))
            penalty = float(defaults.get("repetition_penalty", type(self).default_repetition_penalty))
        except (TypeError, ValueError):
            warnings.warn(f"ignoring malformed prompt_format.generation_defaults {defaults!r}", RuntimeWarning, 3)
            return
        self.default_min_tokens = min_tokens
        self.default_repetition_penalty = penalty if penalty > 0 else 1.0

    def format_prompt(self, prompt: str) -> str:
        """`prompt` as the student saw prompts in training (the recorded chat template), else unchanged."""
        if self.chat_template is None:
            return prompt
        try:
            from ..responses import format_prompt

            return format_prompt(self.tokenizer, prompt, self.chat_template)
        except Exception as e:  # noqa: BLE001 - a tokenizer without templating: feed the prompt as is
            warnings.warn(f"cannot apply the recorded chat template ({e}); using raw prompts", RuntimeWarning, 2)
            self.chat_template = None
            return prompt

    def _prompt_ids(self, prompt: str, raw: bool) -> list[int]:
        if raw or self.chat_template is None:
            return super()._prompt_ids(prompt, raw)
        text = self.format_prompt(prompt)
        if self.chat_template is None:  # the template could not be applied
            return super()._prompt_ids(prompt, raw)
        # the template writes the special tokens itself, as in training
        return self._in_vocab([int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)])

    def _in_vocab(self, ids: list[int]) -> list[int]:
        """Ids the model cannot take replaced by EOS (or 0)."""
        v = self.vocab_size
        if any(i >= v or i < 0 for i in ids):
            repl = self.eos_token_id if self.eos_token_id is not None else 0
            ids = [i if 0 <= i < v else repl for i in ids]
        return ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _decode_each(self, ids: Sequence[int]) -> list[str]:
        batch = getattr(self.tokenizer, "batch_decode", None)
        if not callable(batch):
            return super()._decode_each(ids)
        n = len(self.tokenizer)  # ids past the tokenizer (a padded logit row) decode to nothing
        known = iter(batch([[i] for i in ids if 0 <= i < n], skip_special_tokens=True))
        return [next(known) if 0 <= i < n else "" for i in ids]
