"""The routes ttalign adds to a vLLM replica (``--middleware``) for adaptive_temperature,
and the flags that load them, without starting vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from ttalign.engine.adaptive_replicas import (
    HEADS_CONFIG_KEY,
    HEADS_PATH,
    PROCESSOR_FQCN,
    RECORDS_PATH,
    RECORDS_RPC,
    ROUTES_MIDDLEWARE,
    AdaptiveTemperatureRoutes,
    vllm_serve_flags,
)
from ttalign.engine.temperature_head_manifest import SHIPPED_HEADS


class StubEngineClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[dict]:
        self.calls.append((method, args))
        return [{key: [0.5, 1.0] for key in args[0] if key.startswith("known")}]


def replica_app(processors: list[str] | None, heads: dict | None) -> Starlette:
    app = Starlette(routes=[Route("/v1/models", lambda _: PlainTextResponse("models"))])
    app.add_middleware(AdaptiveTemperatureRoutes)
    app.state.vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(logits_processors=processors),
        additional_config={HEADS_CONFIG_KEY: heads} if heads is not None else {},
    )
    app.state.engine_client = StubEngineClient()
    return app


async def call(app: Starlette, method: str, path: str, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        return await client.request(method, path, **kwargs)


async def test_heads_route_describes_the_loaded_heads() -> None:
    shipped = {name: str(path) for name, path in SHIPPED_HEADS.items()}
    answer = await call(replica_app([PROCESSOR_FQCN], shipped), "GET", HEADS_PATH)
    body = answer.json()
    assert body["processor"] is True
    assert body["heads"]["smollm2-example"]["level"] == "example"
    assert body["heads"]["smollm2-token"]["level"] == "token"
    assert all(spec["temperatures"] for spec in body["heads"].values())


async def test_a_replica_without_the_processor_says_so() -> None:
    answer = await call(replica_app(None, None), "GET", HEADS_PATH)
    assert answer.json() == {"processor": False, "heads": {}}


async def test_records_route_reads_the_workers_records() -> None:
    app = replica_app([PROCESSOR_FQCN], {})
    answer = await call(app, "POST", RECORDS_PATH, json={"keys": ["known-1", "other"]})
    assert answer.json() == {"records": {"known-1": [0.5, 1.0]}}
    assert app.state.engine_client.calls == [(RECORDS_RPC, (["known-1", "other"],))]


@pytest.mark.parametrize("body", [b"{}", b"not json", b'{"keys": [1]}'])
async def test_records_route_refuses_a_malformed_body(body: bytes) -> None:
    answer = await call(replica_app([PROCESSOR_FQCN], {}), "POST", RECORDS_PATH, content=body)
    assert answer.status_code == 400


async def test_other_routes_pass_through() -> None:
    answer = await call(replica_app([PROCESSOR_FQCN], {}), "GET", "/v1/models")
    assert answer.text == "models"


def test_flags_load_the_processor_extension_heads_and_routes() -> None:
    flags = vllm_serve_flags({"h": "/heads/h"})
    assert flags[flags.index("--logits-processors") + 1] == PROCESSOR_FQCN
    assert flags[flags.index("--middleware") + 1] == ROUTES_MIDDLEWARE
    config = json.loads(flags[flags.index("--additional-config") + 1])
    assert config == {HEADS_CONFIG_KEY: {"h": "/heads/h"}}
    printed = subprocess.run(
        [sys.executable, "-m", "ttalign.engine.adaptive_replicas", "none"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert printed == vllm_serve_flags({})
