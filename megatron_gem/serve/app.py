"""The HTTP app (FastAPI): routes, the API key, errors in the OpenAI shape, metrics. The work is in
one service class per endpoint (embeddings.py, chat.py, completions.py) over one GEMEngine.

Bodies are parsed here, not by FastAPI's automatic validation: malformed JSON and invalid fields
get OpenAI's 400 with a message naming the field, not a framework's 422. Every error leaves the
server serving; an unexpected one is a 500 in the same shape (and logged).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .api_errors import APIError, bad_request, unauthorized, unknown_model
from .batching import EmbeddingBatcher
from .chat import ChatService, wire
from .completions import CompletionService
from .config import ServeConfig
from .embeddings import EmbeddingService
from .generation import GenerationRunner
from .prometheus_metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelCard, ModelList

log = logging.getLogger("megatron_gem.serve")

ENDPOINTS = {"/v1/embeddings": "embeddings", "/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}


def validation_message(e: ValidationError) -> str:
    """'field.path: what is wrong' for each error (at most three), one line."""
    parts = []
    for err in e.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unrecognized request argument (not an OpenAI field this server implements, nor one of its extensions)"
        parts.append(f"{where}: {msg}")
    more = len(e.errors()) - 3
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def parse_body(request: Request, model_cls):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise bad_request(f"the request body is not valid JSON{where}: {getattr(e, 'msg', e)}") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise bad_request(validation_message(e)) from None


class MetricsMiddleware:
    """Counts each request by endpoint and status and times it to its last byte (streams too)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ENDPOINTS:
            return await self.app(scope, receive, send)
        endpoint, start, status = ENDPOINTS[scope["path"]], time.perf_counter(), {"code": 500}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def create_app(engine, config: ServeConfig | None = None) -> FastAPI:
    """The app serving ``engine`` (a GEMEngine) under ``config``'s limits."""
    config = config or ServeConfig()
    config.validate()
    try:  # the template and the summary tokens must leave room for text
        engine.embedder.template.text_budget(config.max_input_tokens - len(engine.embedder.special_ids))
    except ValueError as e:
        raise ValueError(f"max_input_tokens={config.max_input_tokens}: {e}") from None
    metrics = ServerMetrics()
    batcher = EmbeddingBatcher(
        engine,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_requests=config.max_batch_requests,
        max_queued_texts=config.max_queued_texts,
        metrics=metrics,
    )
    runner = GenerationRunner(
        engine,
        max_queued=config.max_queued_generations,
        max_tokens_cap=config.max_tokens_cap,
        default_max_tokens=config.default_max_tokens,
        max_model_len=config.max_model_len,
        metrics=metrics,
    )
    name = config.served_model_name or engine.name
    engine.name = name
    embeddings = EmbeddingService(engine, batcher, config, metrics)
    chat = ChatService(engine, runner, config, metrics)
    completions = CompletionService(engine, runner, config, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="megatron-gem", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.metrics, app.state.batcher, app.state.runner = engine, config, metrics, batcher, runner
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(
            {"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error", "param": None, "code": None}}, status_code=500
        )

    def check(request: Request, model: str | None) -> None:
        if config.api_key is not None:
            header = request.headers.get("authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
                raise unauthorized()
        if model is not None and model != name:
            raise unknown_model(model, name)

    def payload(obj):
        return JSONResponse(wire(obj)) if hasattr(obj, "model_dump") else obj

    @app.post("/v1/embeddings")
    async def create_embeddings(request: Request):
        check(request, None)
        req = await parse_body(request, EmbeddingRequest)
        check(request, req.model)
        batcher.start()  # no-op once running (in-process clients may skip the lifespan)
        return payload(await embeddings.create(req))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request):
        check(request, None)
        req = await parse_body(request, ChatCompletionRequest)
        check(request, req.model)
        return payload(await chat.create(req))

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        check(request, None)
        req = await parse_body(request, CompletionRequest)
        check(request, req.model)
        return payload(await completions.create(req))

    @app.get("/v1/models")
    async def list_models(request: Request):
        check(request, None)
        return payload(ModelList(data=[ModelCard(id=name, created=created)]))

    @app.get("/health")
    async def health():
        if not engine.worker.alive:
            return JSONResponse({"status": "unhealthy", "reason": "the model worker stopped"}, status_code=503)
        return {"status": "ok", "model": name, "train_mode": engine.config.train_mode}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
