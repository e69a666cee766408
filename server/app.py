"""The FastAPI application: ``create_app(settings)`` builds everything in its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_clients.config import load_reward_registry
from reward_clients.registry import RewardRegistry
from server.admission import Admission
from server.disconnect import ClientDisconnected, cancel_on_disconnect
from server.engine.base import EngineClient
from server.engine.factory import build_engine, warm_up
from server.errors import (
    APIError,
    InvalidRequestError,
    error_body,
    error_response,
    status_phrase,
)
from server.metrics import Metrics
from server.protocol import ScoreRequest
from server.serving import ChatCompletionService, parse_body, parse_request
from server.settings import ServerSettings
from strategies import all_strategies

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ServerSettings], EngineClient]
RewardFactory = Callable[[ServerSettings, EngineClient, Metrics], RewardRegistry]


def default_rewards(
    settings: ServerSettings, engine: EngineClient, metrics: Metrics
) -> RewardRegistry:
    return load_reward_registry(
        settings.reward_config, settings.default_reward, engine=engine, metrics=metrics
    )


def create_app(
    settings: ServerSettings,
    *,
    engine_factory: EngineFactory = build_engine,
    reward_factory: RewardFactory = default_rewards,
) -> FastAPI:
    """The ttalign app. The factories exist so tests can inject fakes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        engine = engine_factory(settings)
        rewards = reward_factory(settings, engine, metrics)
        try:
            if settings.warmup:
                await warm_up(engine)
            app.state.settings = settings
            app.state.metrics = metrics
            app.state.engine = engine
            app.state.admission = Admission(
                settings.max_concurrent_requests, settings.retry_after_seconds
            )
            app.state.service = ChatCompletionService(engine, settings, metrics, rewards)
            yield
            finished = await app.state.admission.drain(settings.shutdown_grace_seconds)
            if not finished:
                logger.warning(
                    "shutting down with %d requests still in flight", app.state.admission.in_flight
                )
        finally:
            await rewards.close()
            await engine.shutdown()

    app = FastAPI(title="ttalign", version="0.1.0", lifespan=lifespan)
    _install_error_handlers(app)
    _install_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)


def _install_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        service: ChatCompletionService = request.app.state.service
        admission: Admission = request.app.state.admission
        parsed = None
        try:
            parsed = parse_request(await request.body())
            prepared = service.prepare(parsed)
            admission.acquire()
        except APIError as exc:
            service.record_refusal(parsed.strategy if parsed else None, exc)
            raise
        if parsed.stream:
            return StreamingResponse(
                _released_after(service.stream(prepared), admission),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            body = await cancel_on_disconnect(request, service.complete(prepared))
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            admission.release()
        return JSONResponse(body)

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

    @app.post("/v1/rewards/score")
    async def score(request: Request) -> dict[str, Any]:
        service: ChatCompletionService = request.app.state.service
        parsed = parse_body(await request.body(), ScoreRequest)
        if len(parsed.candidates) > service.settings.max_candidates:
            raise InvalidRequestError(
                f"at most {service.settings.max_candidates} candidates per call",
                param="candidates",
            )
        constraints = tuple(parsed.constraints or ())
        client = service.rewards.get(parsed.reward, constraints=constraints)
        conversation = [{"role": m.role, "content": m.text()} for m in parsed.messages]
        scores = await cancel_on_disconnect(request, client.score(conversation, parsed.candidates))
        return {"object": "reward.scores", "reward": client.name, "scores": scores}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        engine_health = await request.app.state.engine.health()
        admission: Admission = request.app.state.admission
        healthy = engine_health.healthy and not admission.draining
        body = {
            "status": "ok" if healthy else "unavailable",
            "engine": {
                "healthy": engine_health.healthy,
                "running_requests": engine_health.running_requests,
                "detail": engine_health.detail,
                **engine_health.extra,
            },
            "requests_in_flight": admission.in_flight,
            "draining": admission.draining,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        metrics: Metrics = request.app.state.metrics
        metrics.in_flight.set(request.app.state.admission.in_flight)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")


async def _released_after(frames: AsyncIterator[str], admission: Admission) -> AsyncIterator[str]:
    """Hold the admission slot for as long as the stream runs."""
    try:
        async for frame in frames:
            yield frame
    finally:
        admission.release()
