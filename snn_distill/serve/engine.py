"""The request engine: admission (bounded concurrency + bounded wait queue), per-request decoding.

Each admitted request runs `LLMBackend.stream` in a worker thread on a shallow copy of the backend:
the weights, session and tokenizer are shared, while the decode state (KV cache, sampler RNG, stop
filter) lives in that call's own frames and the per-call attributes (`last_token_ids`) on the copy,
so no request sees another's tokens. Pieces cross to the event loop through an asyncio queue.

Admission runs on the event loop only (no locks): at most `max_concurrency` requests decode, at most
`max_queue` wait (each for at most `queue_timeout` seconds); anything beyond gets `Saturated` (503).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import inspect
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import LLMBackend

OPTIONAL_STREAM_ARGS = ("min_tokens", "repetition_penalty")


class Saturated(Exception):
    """Every decode slot is busy and the wait queue is full (or the wait timed out)."""


class RequestError(ValueError):
    """A request the backend cannot serve as asked (HTTP 400); `code` is OpenAI's error code."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass
class GenerationParams:
    """One request's decoding settings, in `LLMBackend.stream` terms."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # min_tokens / repetition_penalty when set


@dataclass
class Generation:
    """The live state of one admitted request; `finish_reason`/`completion_tokens` are set at the end."""

    params: GenerationParams
    prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


_DONE = object()


class Engine:
    """Serve `backend` to concurrent requests (see the module docstring)."""

    def __init__(
        self,
        backend: LLMBackend,
        max_concurrency: int = 4,
        max_queue: int = 64,
        queue_timeout: float = 60.0,
        max_tokens_cap: int = 512,
    ) -> None:
        if max_concurrency < 1 or max_queue < 0 or queue_timeout < 0 or max_tokens_cap < 1:
            raise ValueError(
                "max_concurrency and max_tokens_cap must be >= 1, max_queue and queue_timeout >= 0; "
                f"got {max_concurrency}, {max_tokens_cap}, {max_queue}, {queue_timeout}"
            )
        self.backend = backend
        self.max_concurrency = int(max_concurrency)
        self.max_queue = int(max_queue)
        self.queue_timeout = float(queue_timeout)
        self.max_tokens_cap = int(max_tokens_cap)
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._executor = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="snn-serve")
        params = inspect.signature(backend.stream).parameters
        self._supported = {name for name in OPTIONAL_STREAM_ARGS if name in params}
        # Backends that format prompts themselves (chat template) take raw=True: the server already did.
        self._raw = {"raw": True} if "raw" in params else {}

    def warm_up(self) -> None:
        """One short generation before serving: first-call costs (allocator, graph optimisation) and
        lazily built tables the per-request copies then share (the blank-token list of `min_tokens`)."""
        extra = {"min_tokens": 1} if "min_tokens" in self._supported else {}
        self.backend.generate("Hello", max_tokens=2, temperature=0, **extra, **self._raw)

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    @property
    def max_context(self) -> int | None:
        return self.backend.max_context

    # ---- request preparation (event loop thread; cheap) -------------------------------------
    def count_prompt_tokens(self, prompt: str) -> int:
        ids = self.backend._encode(prompt)
        return len(ids) if ids else len(self.backend._empty_prompt_ids())

    def resolve_max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        """Clamp to `max_tokens_cap`; refuse (400) what does not fit the context instead of truncating."""
        ctx = self.max_context
        if ctx and prompt_tokens >= ctx:
            raise RequestError(
                f"This model's maximum context length is {ctx} tokens; the prompt alone has {prompt_tokens}. "
                "Shorten the prompt.",
                code="context_length_exceeded",
                param="messages",
            )
        if requested is None:
            return min(self.max_tokens_cap, ctx - prompt_tokens) if ctx else self.max_tokens_cap
        max_tokens = min(int(requested), self.max_tokens_cap)
        if ctx and prompt_tokens + max_tokens > ctx:
            raise RequestError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
                "completion). Reduce the length of the prompt or max_tokens.",
                code="context_length_exceeded",
                param="max_tokens",
            )
        return max_tokens

    def check_extras(self, extra: dict[str, Any]) -> None:
        for name in extra:
            if name not in self._supported:
                raise RequestError(f"{name} is not supported by this backend", param=name)

    # ---- admission (event loop only) --------------------------------------------------------
    async def acquire(self) -> None:
        """Take a decode slot, waiting in the bounded queue if needed; `Saturated` when there is none."""
        if self.active < self.max_concurrency and not self.waiting:
            self.active += 1
            return
        if self.waiting >= self.max_queue:
            raise Saturated(
                f"server is saturated: {self.active} requests decoding and {self.waiting} waiting; retry later"
            )
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, self.queue_timeout)  # release() hands its slot over to us
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            if fut in self._waiters:
                self._waiters.remove(fut)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise Saturated(f"server is saturated: no decode slot freed within {self.queue_timeout:g} s") from None

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1

    # ---- decoding ---------------------------------------------------------------------------
    def start(self, params: GenerationParams, prompt_tokens: int) -> Generation:
        """Begin decoding on an acquired slot; the slot is released when the worker thread ends."""
        gen = Generation(params, prompt_tokens)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._work, gen, loop)
        future.add_done_callback(lambda _f: self.release())
        return gen

    def _work(self, gen: Generation, loop: asyncio.AbstractEventLoop) -> None:
        p = gen.params
        backend = copy.copy(self.backend)  # shares the weights; per-call attributes stay per request
        put = gen.queue.put_nowait
        try:
            pieces = backend.stream(
                p.prompt, max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                stop=p.stop or None, seed=p.seed, **p.extra, **self._raw,
            )  # fmt: skip
            for piece in pieces:
                if gen.cancelled.is_set():
                    break
                loop.call_soon_threadsafe(put, piece)
            gen.completion_tokens = len(backend.last_token_ids)
            gen.finish_reason = self._finish_reason(backend, p, gen.completion_tokens)
        except BaseException as e:  # reported to the client; the server keeps running
            gen.error = e
        finally:
            loop.call_soon_threadsafe(put, _DONE)

    @staticmethod
    def _finish_reason(backend: LLMBackend, p: GenerationParams, n: int) -> str:
        if n < p.max_tokens:
            return "stop"  # EOS or a stop string
        text = backend._decode(backend.last_token_ids)
        return "stop" if any(s in text for s in p.stop) else "length"

    async def pieces(self, gen: Generation) -> AsyncIterator[str]:
        """The text pieces of `gen` as they are decoded; raises the worker's error at the end."""
        try:
            while True:
                item = await gen.queue.get()
                if item is _DONE:
                    break
                if gen.first_token is None:
                    gen.first_token = time.perf_counter()
                yield item
        finally:
            gen.cancelled.set()  # client gone or done: the worker stops at its next piece
        if gen.error is not None:
            raise gen.error

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
