"""The FastAPI application: OpenAI routes, OpenAI-style error JSON, API key, body limit, request log.

`create_app(engine, model_name, api_key=None, max_body_bytes=1 MiB)` builds an app with no module-level
state: everything a request touches hangs off `app.state` (engine, metrics) or the request itself.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import format_chat
from .engine import OPTIONAL_STREAM_ARGS, Engine, Generation, GenerationParams, RequestError, Saturated
from .metrics import Metrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
    error_body,
    new_id,
)

log = logging.getLogger("snn_distill.serve")

# pydantic error types that mean "well-formed but out of range" (422); anything else is malformed (400)
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "value_error"}  # fmt: skip
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 503: "server_error"}  # fmt: skip


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with `status`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    body = error_body(message, ERROR_TYPES.get(status, "server_error"), code, param)
    return JSONResponse(body, status_code=status)


# ---- ASGI middleware: request log + metrics (outer), API key + body size (inner) ---------------


class RequestLog:
    """One log line per request (id, route, status, tokens in/out, time to first token, latency)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500

        async def send_logged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            latency = time.perf_counter() - t0
            info = state.get("generation", {})
            self.metrics.observe(scope["path"], status, latency, info)
            log.info(
                "%s %s %s %d prompt_tokens=%s completion_tokens=%s ttft_ms=%s latency_ms=%.1f",
                info.get("id", "req-" + uuid.uuid4().hex[:8]), scope["method"], scope["path"], status,
                info.get("prompt_tokens", 0), info.get("completion_tokens", 0),
                f"{info['ttft'] * 1e3:.1f}" if info.get("ttft") is not None else "-", latency * 1e3,
            )  # fmt: skip


class Guard:
    """`Authorization: Bearer KEY` on /v1 and /metrics (when a key is set); bodies over the limit -> 413."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, int(max_body_bytes)

    def _authorized(self, scope: dict) -> bool:
        path = scope["path"]
        if not self.api_key or not (path.startswith("/v1") or path == "/metrics"):
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            msg = "Incorrect or missing API key: send the server's --api-key as 'Authorization: Bearer KEY'"
            return await error_response(401, msg, "invalid_api_key")(scope, receive, send)
        too_large = error_response(
            413, f"request body exceeds {self.max_body_bytes} bytes", "request_too_large"
        )  # fmt: skip
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the (bounded) body here, then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] == "POST" and scope["path"].startswith("/v1"):
            # These routes take JSON only: read it as JSON whatever the client labelled it (curl -d says form).
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- request -> generation ---------------------------------------------------------------------


def _prepare(
    engine: Engine, body: SamplingFields, prompt: str, requested_max: int | None
) -> tuple[GenerationParams, int]:
    """Validate what the backend must decide (support, context length); -> (params, prompt tokens)."""
    msg = body.unsupported()
    if msg:
        raise RequestError(msg)
    extra = {k: getattr(body, k) for k in OPTIONAL_STREAM_ARGS if getattr(body, k) is not None}
    engine.check_extras(extra)
    prompt_tokens = engine.count_prompt_tokens(prompt)
    return GenerationParams(
        prompt=prompt,
        max_tokens=engine.resolve_max_tokens(requested_max, prompt_tokens),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,
        top_p=body.top_p,
        stop=list(body.stop or []),
        seed=body.seed,
        extra=extra,
    ), prompt_tokens


def _usage(gen: Generation) -> Usage:
    return Usage(
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens,
        total_tokens=gen.prompt_tokens + gen.completion_tokens,
    )


def _record(request: Request, rid: str, gen: Generation) -> None:
    """What the request log line and /metrics report for this request."""
    ttft = None if gen.first_token is None else gen.first_token - gen.started
    request.state.generation = {
        "id": rid, "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens, "ttft": ttft,
    }  # fmt: skip


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


class _Completions:
    """Shapes of /v1/completions responses."""

    prefix = "cmpl"

    @staticmethod
    def opening(rid: str, model: str) -> list[Any]:
        return []

    @staticmethod
    def piece(rid: str, model: str, text: str, finish: str | None = None) -> Any:
        return CompletionResponse(id=rid, model=model, choices=[CompletionChoice(text=text, finish_reason=finish)])

    @staticmethod
    def usage_chunk(rid: str, model: str, usage: Usage) -> Any:
        return CompletionResponse(id=rid, model=model, choices=[], usage=usage)

    @staticmethod
    def whole(rid: str, model: str, text: str, gen: Generation) -> Any:
        choice = CompletionChoice(text=text, finish_reason=gen.finish_reason)
        return CompletionResponse(id=rid, model=model, choices=[choice], usage=_usage(gen))


class _Chat:
    """Shapes of /v1/chat/completions responses."""

    prefix = "chatcmpl"

    @staticmethod
    def opening(rid: str, model: str) -> list[Any]:
        delta = DeltaMessage(role="assistant", content="")
        return [ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(delta=delta)])]

    @staticmethod
    def piece(rid: str, model: str, text: str, finish: str | None = None) -> Any:
        delta = DeltaMessage(content=text or None)
        return ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])

    @staticmethod
    def usage_chunk(rid: str, model: str, usage: Usage) -> Any:
        return ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage)

    @staticmethod
    def whole(rid: str, model: str, text: str, gen: Generation) -> Any:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=gen.finish_reason)
        return ChatCompletionResponse(id=rid, model=model, choices=[choice], usage=_usage(gen))


async def _respond(request: Request, body: SamplingFields, prompt: str, requested_max: int | None, shape) -> Any:
    app = request.app
    engine: Engine = app.state.engine
    model = app.state.model_name
    if body.model != model:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model}'",
                       "model_not_found", "model")  # fmt: skip
    params, prompt_tokens = _prepare(engine, body, prompt, requested_max)
    rid = new_id(shape.prefix)
    arrived = time.perf_counter()
    await engine.acquire()
    gen = engine.start(params, prompt_tokens)
    gen.started = arrived  # time to first token includes the wait for a slot, as the client sees it
    _record(request, rid, gen)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(request, engine, gen, rid, model, shape, include_usage), media_type="text/event-stream"
        )
    text = "".join([piece async for piece in engine.pieces(gen)])
    _record(request, rid, gen)
    return JSONResponse(shape.whole(rid, model, text, gen).model_dump())


async def _stream(request, engine: Engine, gen: Generation, rid: str, model: str, shape, include_usage: bool):
    try:
        for chunk in shape.opening(rid, model):
            yield _sse(chunk)
        async for piece in engine.pieces(gen):
            yield _sse(shape.piece(rid, model, piece))
        yield _sse(shape.piece(rid, model, "", gen.finish_reason))
        if include_usage:
            yield _sse(shape.usage_chunk(rid, model, _usage(gen)))
    except Exception as e:  # headers are out: report in-band, as OpenAI does
        log.exception("%s failed while streaming", rid)
        yield _sse(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"))
    finally:
        _record(request, rid, gen)
    yield "data: [DONE]\n\n"


# ---- the app ------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        status = 422 if errors and all(e.get("type") in RANGE_ERRORS for e in errors) else 400
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON ({detail})", "invalid_json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request body")
        return error_response(status, msg, "invalid_value" if status == 422 else "invalid_request", where or None)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.code, exc.param)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(400, str(exc), exc.code or "unsupported", exc.param)

    @app.exception_handler(Saturated)
    async def _busy(request: Request, exc: Saturated) -> JSONResponse:
        response = error_response(503, str(exc), "server_overloaded")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # logged by uvicorn with its traceback
        return error_response(500, f"generation failed: {type(exc).__name__}: {exc}", "internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else None)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The server for `engine` under the model id `model_name` (see the module docstring)."""
    app = FastAPI(title="snn-distill", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.model_name = model_name
    app.state.metrics = Metrics(engine)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": engine.active, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=model_name)]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str) -> dict[str, Any]:
        if model != model_name:
            raise APIError(404, f"The model '{model}' does not exist", "model_not_found", "model")
        return ModelCard(id=model_name).model_dump()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _respond(request, body, body.prompt_text(), body.max_tokens, _Completions)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = format_chat(engine.backend, messages)
        return await _respond(request, body, prompt, body.requested_max_tokens(), _Chat)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestLog, metrics=app.state.metrics)  # added last = outermost
    return app
