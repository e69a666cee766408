"""The FastAPI application: ``create_app(settings)`` builds everything in its lifespan."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from ttalign.engine.base import EngineClient
from ttalign.reward_clients.config import load_reward_registry, read_reward_config
from ttalign.reward_clients.embeddings import Embedder, build_embedder
from ttalign.reward_clients.registry import RewardRegistry
from ttalign.server.admission import Admission
from ttalign.server.auth import ApiKeyMiddleware, load_api_keys
from ttalign.server.body_limit import BodyLimitMiddleware
from ttalign.server.completion_protocol import CompletionRequest
from ttalign.server.completions import TextCompletionService
from ttalign.server.disconnect import ClientDisconnected, cancel_on_disconnect
from ttalign.server.engine_factory import build_engine, build_judge_engine, warm_up
from ttalign.server.error_boundary import ErrorBoundaryMiddleware
from ttalign.server.errors import APIError, error_body, error_response, status_phrase
from ttalign.server.health import health_report
from ttalign.server.keepalive import with_keepalive
from ttalign.server.metrics import Metrics
from ttalign.server.openapi import install_openapi
from ttalign.server.playground import install_playground
from ttalign.server.responses import sse
from ttalign.server.scoring import ScoreService
from ttalign.server.serving import (
    ChatCompletionService,
    PreparedRequest,
    load_prompt_overrides,
    parse_body,
    parse_request,
)
from ttalign.server.settings import ServerSettings
from ttalign.server.tracing import RequestTracing, build_request_tracing, trace_headers
from ttalign.strategies import all_strategies

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ServerSettings], EngineClient | Awaitable[EngineClient]]
JudgeEngineFactory = Callable[[ServerSettings], EngineClient | Awaitable[EngineClient] | None]
#: Builds the rewards from the settings, the serving engine, the metrics and the judge
#: engine (``None`` without ``--judge-model``).
RewardFactory = Callable[
    [ServerSettings, EngineClient, Metrics, EngineClient | None], RewardRegistry
]
EmbedderFactory = Callable[[ServerSettings], Embedder | None]
TracingFactory = Callable[[ServerSettings], RequestTracing | None]

RunT = TypeVar("RunT")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def default_rewards(
    settings: ServerSettings,
    engine: EngineClient,
    metrics: Metrics,
    judge_engine: EngineClient | None = None,
) -> RewardRegistry:
    return load_reward_registry(
        settings.reward_config,
        settings.default_reward,
        engine=engine,
        judge_engine=judge_engine,
        metrics=metrics,
    )


def default_embedder(settings: ServerSettings) -> Embedder | None:
    return build_embedder(settings.embedding_model)


def default_tracing(settings: ServerSettings) -> RequestTracing | None:
    return build_request_tracing(settings.otlp_traces_endpoint)


def create_app(
    settings: ServerSettings,
    *,
    engine_factory: EngineFactory = build_engine,
    judge_engine_factory: JudgeEngineFactory = build_judge_engine,
    reward_factory: RewardFactory = default_rewards,
    embedder_factory: EmbedderFactory = default_embedder,
    tracing_factory: TracingFactory = default_tracing,
) -> FastAPI:
    """The ttalign app. The factories exist so tests can inject fakes.

    Raises :class:`~server.auth.ApiKeyConfigError`,
    :class:`~reward_clients.config.RewardConfigError` or
    :class:`~reward_clients.embeddings.EmbeddingModelError` at once for an unusable API key
    file, reward config or embedding model: a bad file fails before the engine spends half
    a minute starting.
    """
    api_keys = load_api_keys(settings)
    load_prompt_overrides(settings.prompt_overrides)  # a bad file fails before the engine starts
    if settings.reward_config is not None:
        read_reward_config(
            settings.reward_config,
            settings.default_reward,
            judge_engine=settings.judge_model is not None,
        )
    # Finds the model folder now; its weights load on the first embedding.
    embedder = embedder_factory(settings)
    tracing = tracing_factory(settings)  # a bad exporter protocol fails here, at start

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as cleanup:
            metrics = Metrics()
            built = engine_factory(settings)
            engine = await built if inspect.isawaitable(built) else built
            cleanup.push_async_callback(engine.shutdown)
            judge_built = judge_engine_factory(settings)
            judge_engine = await judge_built if inspect.isawaitable(judge_built) else judge_built
            if judge_engine is not None:
                cleanup.push_async_callback(judge_engine.shutdown)
            rewards = reward_factory(settings, engine, metrics, judge_engine)
            cleanup.push_async_callback(rewards.close)
            fleets = [getattr(e, "pool", None) for e in (engine, judge_engine)]  # remote mode
            metrics.watch_replicas(
                lambda: [p for p in (*fleets, *rewards.replica_pools()) if p is not None]
            )
            if settings.engine != "remote":
                metrics.export_engine_metrics()
            if embedder is not None:
                cleanup.push_async_callback(embedder.close)
            if tracing is not None:
                cleanup.callback(tracing.shutdown)
            if settings.warmup:
                await warm_up(engine)
                if judge_engine is not None:
                    await warm_up(judge_engine)
            admission = Admission(settings.max_concurrent_requests, settings.retry_after_seconds)
            app.state.settings = settings
            app.state.metrics = metrics
            app.state.engine = engine
            app.state.judge_engine = judge_engine
            app.state.admission = admission
            app.state.embedder = embedder
            app.state.service = ChatCompletionService(
                engine, settings, metrics, rewards, embedder, tracing
            )
            app.state.text_service = TextCompletionService(app.state.service)
            app.state.scorer = ScoreService(
                rewards, admission, metrics, max_candidates=settings.max_candidates
            )
            yield
            if not await admission.drain(settings.shutdown_grace_seconds):
                logger.warning("shutting down with %d requests in flight", admission.in_flight)

    app = FastAPI(title="ttalign", version="0.1.0", lifespan=lifespan)
    # add_middleware wraps: the last one added is the outermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_request_body))
    if api_keys:
        app.add_middleware(
            ApiKeyMiddleware, keys=api_keys, protect_operations=settings.auth_health_and_metrics
        )
    app.add_middleware(ErrorBoundaryMiddleware)
    _install_error_handlers(app)
    _install_routes(app)
    if settings.playground:
        install_playground(app)
    install_openapi(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    # Everything else reaches ErrorBoundaryMiddleware, which answers with the same shape.
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else status_phrase(exc.status_code)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(message, kind), status_code=exc.status_code, headers=exc.headers
        )


def _install_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        service: ChatCompletionService = request.app.state.service

        async def prepare(body: bytes, headers: Headers) -> PreparedRequest:
            return service.prepare(
                parse_request(body),
                headers.get(service.settings.session_header),
                client_trace=trace_headers(headers),
            )

        return await _serve(request, prepare, service.complete, service.stream, lambda r: r)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        service: TextCompletionService = request.app.state.text_service

        async def prepare(body: bytes, headers: Headers) -> list[PreparedRequest]:
            return await service.prepare(
                parse_body(body, CompletionRequest),
                headers.get(service.settings.session_header),
                client_trace=trace_headers(headers),
            )

        return await _serve(request, prepare, service.complete, service.stream, lambda r: r[0])

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        engine: EngineClient = request.app.state.engine
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "ttalign",
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    @app.get("/v1/strategies")
    async def strategies() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "name": s.name,
                    "description": s.description,
                    "uses_reward": s.uses_reward,
                    "config_schema": s.config_model.model_json_schema(),
                }
                for s in all_strategies()
            ],
        }

    @app.get("/v1/rewards")
    async def rewards(request: Request) -> dict[str, Any]:
        registry: RewardRegistry = request.app.state.service.rewards
        return {
            "object": "list",
            "data": [{"name": n, "default": n == registry.default} for n in registry.names()],
        }

    @app.post("/v1/rewards/score", response_model=None)
    async def score(request: Request) -> Response:
        scorer: ScoreService = request.app.state.scorer
        try:
            return JSONResponse(await scorer.score(await request.body(), request))
        except ClientDisconnected:
            return Response(status_code=499)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        status, body = await health_report(request.app.state.engine, request.app.state.admission)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        metrics: Metrics = request.app.state.metrics
        metrics.in_flight.set(request.app.state.admission.in_flight)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")


async def _serve(
    request: Request,
    prepare: Callable[[bytes, Headers], Awaitable[RunT]],
    complete: Callable[[RunT], Awaitable[dict[str, Any]]],
    stream: Callable[[RunT], AsyncIterator[str]],
    first: Callable[[RunT], PreparedRequest],
) -> Response:
    """Admit a completion request, then answer it whole or as a stream of SSE frames.

    ``first`` gives one prepared run of ``RunT`` (all of a batch share strategy and header).
    """
    service: ChatCompletionService = request.app.state.service
    admission: Admission = request.app.state.admission
    body = await request.body()
    try:
        run = await prepare(body, request.headers)
        admission.acquire()
    except APIError as exc:
        service.record_refusal(_named_strategy(body), exc, trace_headers(request.headers))
        raise
    prepared = first(run)
    if prepared.request.stream:
        frames = stream(run)
        if not prepared.strategy.streams_tokens:  # else the token hot path: nothing between
            frames = with_keepalive(
                frames, service.settings.stream_keepalive_seconds, _keepalive_chunk(prepared)
            )
        return StreamingResponse(
            _released_after(frames, admission), media_type="text/event-stream", headers=SSE_HEADERS
        )
    try:
        answer = await cancel_on_disconnect(request, complete(run))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        admission.release()
    return JSONResponse(answer)


def _named_strategy(body: bytes) -> str | None:
    """The strategy a refused request named, if its body says (for the refusal metrics)."""
    try:
        strategy = json.loads(body).get("strategy")
    except (ValueError, AttributeError, RecursionError):
        return None
    return strategy if isinstance(strategy, str) else None


def _keepalive_chunk(prepared: PreparedRequest) -> str:
    """A chunk of the request's stream with no choices (and no progress): a no-op to clients.

    Not an SSE comment: ``vllm bench serve`` (0.32) strips each network read before
    buffering it, so a comment arriving alone loses its blank line and glues itself to every
    later event, failing the request. It skips chunks without choices, and the official
    client parses them like the usage and progress chunks.
    """
    usage_field = {"usage": None} if prepared.request.include_usage() else {}
    return sse(prepared.header.chunk([], **usage_field))


async def _released_after(frames: AsyncIterator[str], admission: Admission) -> AsyncIterator[str]:
    """Hold the admission slot until the stream has run and been closed (its work aborted)."""
    try:
        async with aclosing(frames):
            async for frame in frames:
                yield frame
    finally:
        admission.release()
