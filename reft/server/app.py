"""The HTTP routes: OpenAI-compatible /v1 API, tokenizer routes, health, metrics, the chat page.

A server runs one plan: a generate plan answers chat and completions, an embed plan
/v1/embeddings (embeddings.py); each refuses the other's routes with a 400 naming why.

Every error leaves as an OpenAI error body (`{"error": {message, type, param, code}}`) with a 4xx
status for the client's mistakes: malformed JSON and wrong field types are 400 (not FastAPI's
422), unknown routes 404, a full server 429; guards.py refuses a wrong Host (421) or Origin (403),
a missing or wrong API key (401) and an oversized body (413) before any route runs. Anything
unexpected is a 500 with the same shape, and the server goes on serving.

Blocking work on request inputs (chat template, tokenizer) runs in worker threads, so the event
loop keeps answering (/health, streams) while a long prompt is tokenized.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .embeddings import EmbeddingServing, embeddings_refused, generation_refused
from .guards import GuardConfig, Guards
from .metrics import ServerMetrics
from .openai_serving import ApiError, OpenAIServing
from .responses import collect, sse_events
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest,
                       error_body)

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.5


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _is_union_tag(part) -> bool:
    """A loc element naming a union member ('str', 'list[int]', 'TextPart'), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    # invalid Unicode or an unsupported feature is the one thing wrong however a union reads the value; say that
    e = next((x for x in errs if x.get("type") in ("invalid_unicode", "unsupported")), errs[0])
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _is_union_tag(x)]
    if e.get("type") in ("invalid_unicode", "unsupported"):   # raised on the whole body, naming the field
        loc.append(e["ctx"]["field"])
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})", None
    if e.get("type") == "missing" and not loc:
        return "the request needs a JSON body", None
    param = ".".join(loc) or None
    return (f"{param}: {e.get('msg')}" if param else str(e.get("msg"))), param


class _CountRequests:
    """ASGI middleware counting responses by route and status (pure ASGI: streamed events pass
    straight through, unlike with BaseHTTPMiddleware)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status[0])).inc()


def build_app(serving: OpenAIServing, metrics: ServerMetrics, guards: GuardConfig = GuardConfig(),
              embeddings: EmbeddingServing | None = None) -> FastAPI:
    """embeddings: given for an embed plan (then `serving`'s engine runs the embedding engine)."""
    engine = serving.engine

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="reft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # --- errors ------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on"
                   f" {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")

    app.add_middleware(Guards, config=guards)
    app.add_middleware(_CountRequests, metrics=metrics)   # outermost: refusals are counted too

    # --- generation --------------------------------------------------------------------------------
    async def run(request: Request, job, chat: bool, stream: bool, include_usage: bool):
        handle = serving.submit(job.reqs)
        if stream:
            async def body():
                try:
                    async for event in sse_events(serving, job, handle, chat, include_usage):
                        yield event
                finally:
                    handle.close()
            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        task = asyncio.ensure_future(collect(serving, job, handle, chat))
        try:
            while True:  # a client that hangs up cancels its request
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return JSONResponse(task.result())
                if await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
        finally:
            handle.close()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if embeddings is not None:
            raise generation_refused("/v1/chat/completions")
        job = await to_thread.run_sync(serving.chat_requests, body)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, job, True, body.stream, usage)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if embeddings is not None:
            raise generation_refused("/v1/completions")
        job = await to_thread.run_sync(serving.completion_requests, body)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, job, False, body.stream, usage)

    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request):
        if embeddings is None:
            raise embeddings_refused()
        result = await embeddings.create(body, request)
        return result if isinstance(result, Response) else JSONResponse(result)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": serving.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return serving.model_card(model_id)

    # --- tokenizer ---------------------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await to_thread.run_sync(serving.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await to_thread.run_sync(serving.detokenize, body)

    # --- operations --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, f"the engine loop has stopped ({engine.step_error or 'not started'})")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app
