"""Adaptive temperature on ``vllm serve`` replicas, for a gateway in remote mode.

A replica serves ``adaptive_temperature`` when it runs with :func:`vllm_serve_flags`: the
logits processor, the worker extension that keeps its per-token records, the heads to load,
and :class:`AdaptiveTemperatureRoutes` (vLLM's ``--middleware``), which adds two routes to
the replica's own API server:

- ``GET /ttalign/temperature_heads``: whether the processor is loaded, and the heads it
  loaded (name, level, temperatures), so the gateway offers exactly what its replicas serve;
- ``POST /ttalign/temperature_records`` with ``{"keys": [...]}``: the records of those
  requests, read from the worker (each finished record once), as the in-process engine reads
  them with ``collective_rpc``.

Nothing here imports torch or vLLM: the gateway imports it too. A replica's entry point
gets the flags from ``python -m ttalign.engine.adaptive_replicas [HEADS]``, one per line
(HEADS: ``shipped``, the default, for the embedded model's heads; ``none``; or a JSON
object of head name to path).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from ttalign.engine.temperature_head_manifest import SHIPPED_HEADS, HeadFileError, read_manifest

#: Key of the processor's spec in a request's ``extra_args`` (``vllm_xargs`` on a server).
EXTRA_ARGS_KEY = "ttalign_temperature"
#: Key of ``additional_config`` naming the heads to load: ``{name: head path}``.
HEADS_CONFIG_KEY = "ttalign_temperature_heads"
PROCESSOR_FQCN = "ttalign.engine.vllm_adaptive_temperature:AdaptiveTemperatureProcessor"
EXTENSION_FQCN = "ttalign.engine.vllm_adaptive_temperature.TemperatureRecordsExtension"
#: vLLM's ``--middleware`` takes ``module.attribute``.
ROUTES_MIDDLEWARE = "ttalign.engine.adaptive_replicas.AdaptiveTemperatureRoutes"
HEADS_PATH = "/ttalign/temperature_heads"
RECORDS_PATH = "/ttalign/temperature_records"
RECORDS_RPC = "ttalign_temperature_records"


def vllm_serve_flags(heads: Mapping[str, str | Path]) -> list[str]:
    """``vllm serve`` flags that make a replica serve ``adaptive_temperature``."""
    config = {HEADS_CONFIG_KEY: {name: str(path) for name, path in heads.items()}}
    return [
        "--logits-processors", PROCESSOR_FQCN,
        "--worker-extension-cls", EXTENSION_FQCN,
        "--additional-config", json.dumps(config),
        "--middleware", ROUTES_MIDDLEWARE,
    ]  # fmt: skip


def head_descriptions(configured: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The level and temperatures of each configured head, from its manifest."""
    described = {}
    for name, path in configured.items():
        try:
            manifest = read_manifest(path)
        except HeadFileError:
            continue  # the replica would not have started with it: nothing to offer
        described[name] = {"level": manifest.level, "temperatures": list(manifest.temperatures)}
    return described


class AdaptiveTemperatureRoutes:
    """Pure ASGI middleware adding the two routes above to a vLLM API server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        if path == HEADS_PATH and scope["method"] == "GET":
            await _send_json(send, 200, self._heads(scope))
        elif path == RECORDS_PATH and scope["method"] == "POST":
            await self._records(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def _heads(scope: Scope) -> dict[str, Any]:
        config = getattr(scope["app"].state, "vllm_config", None)
        processors = getattr(getattr(config, "model_config", None), "logits_processors", None)
        loaded = PROCESSOR_FQCN in [p for p in processors or () if isinstance(p, str)]
        additional = getattr(config, "additional_config", None) or {}
        configured = additional.get(HEADS_CONFIG_KEY) or {}
        return {"processor": loaded, "heads": head_descriptions(configured) if loaded else {}}

    @staticmethod
    async def _records(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            keys = json.loads(body)["keys"]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            await _send_json(send, 400, {"error": 'the body must be {"keys": [strings]}'})
            return
        engine = scope["app"].state.engine_client
        results = await engine.collective_rpc(RECORDS_RPC, args=(keys,))
        await _send_json(send, 200, {"records": dict(results[0]) if results else {}})


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str]) -> None:
    """Print :func:`vllm_serve_flags` one per line, for a shell entry point."""
    choice = argv[0] if argv else "shipped"
    if choice == "shipped":
        heads: Mapping[str, str | Path] = SHIPPED_HEADS
    elif choice == "none":
        heads = {}
    else:
        heads = json.loads(choice)
    print("\n".join(vllm_serve_flags(heads)))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
