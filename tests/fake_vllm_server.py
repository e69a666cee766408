"""A fake vLLM OpenAI server, shaped like vLLM 0.32's, that tests can script to fail.

It answers the routes the remote engine uses: ``/v1/models`` (with ``max_model_len``),
``/tokenize``, ``/health``, ``/metrics`` (the running and waiting gauges) and
``/v1/completions``, streamed and not, with ``token_ids`` (``return_token_ids``) and
completions-format log-probabilities whose tokens read ``token_id:N``
(``return_tokens_as_token_ids``). Its tokenizer is the real model's, so what it generates
decodes the same way on both sides.

Every completion is deterministic: choice ``i`` is :func:`reply_text` ``(i)`` followed by
the end-of-sequence token, cut at ``max_tokens``. Queued :class:`Failure` s replace the next
completion calls one by one. The fake records each request it received (path, body,
headers) and counts the streams and calls whose client went away before the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from ttalign.benchmarks.processes import free_port

MODEL_NAME = "fake-smollm"
MAX_MODEL_LEN = 2048
#: What vLLM 0.32 names the error type for each status it sends.
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


@cache
def model_folder() -> str:
    """The embedded model's folder (its tokenizer files; converted once per machine)."""
    from ttalign.server.model_prep import prepare_embedded_model

    return str(prepare_embedded_model())


@cache
def hf_tokenizer() -> Any:
    """The embedded model's Hugging Face tokenizer, for the fakes (loaded once)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder(), local_files_only=True)


def reply_text(index: int) -> str:
    """The text the fake generates for choice ``index``."""
    return f"Reply {index}: the quick brown fox jumps."


@dataclass
class Failure:
    """How the fake answers one ``/v1/completions`` call instead of serving it.

    - ``status``: answer ``status`` with vLLM's error body.
    - ``drop``: send ``after_chunks`` streamed chunks (0 when not streamed), then close the
      connection mid-response.
    - ``stream_error``: stream ``after_chunks`` chunks, then an error chunk and ``[DONE]``.
    - ``hang``: stream ``after_chunks`` chunks (none when not streamed), then never answer.
    - ``no_done``: stream ``after_chunks`` chunks, then end the body cleanly without
      ``[DONE]``.
    - ``bad_chunk``: stream ``after_chunks`` chunks, then one that is not JSON.
    """

    kind: Literal["status", "drop", "stream_error", "hang", "no_done", "bad_chunk"]
    status: int = 500
    message: str = "scripted failure"
    param: str | None = None
    after_chunks: int = 0


@dataclass
class Received:
    """One request the fake received."""

    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    #: How it ended: served, failed (as scripted), or disconnected (the client went away).
    outcome: str = "open"


class _Dropped(Exception):
    """Raised inside the app to make uvicorn cut the connection."""


@dataclass
class FakeVllm:
    """One fake replica. Tests change its fields between calls to script its behaviour."""

    tokenizer: Any = field(default_factory=hf_tokenizer)
    model: str = MODEL_NAME
    max_model_len: int = MAX_MODEL_LEN
    #: More models listed by ``/v1/models`` besides ``model``.
    extra_models: tuple[str, ...] = ()
    #: Replaces ``/tokenize``'s answer (a tokenizer that disagrees), or its status.
    tokenize_tokens: list[int] | None = None
    tokenize_status: int = 200
    health_status: int = 200
    #: Seconds ``/health`` takes to answer (a hung server never answers in time).
    health_delay: float = 0.0
    #: The ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` gauges.
    running: float = 0.0
    waiting: float = 0.0
    #: Seconds between streamed chunks.
    chunk_delay: float = 0.0
    failures: deque[Failure] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
            ]
        )

    # --- scripting and inspection ----------------------------------------------------------

    def fail(self, *failures: Failure) -> None:
        """Answer the next completion calls with ``failures``, one each, in order."""
        self.failures.extend(failures)

    def reset(self) -> None:
        """Back to serving every call, with nothing recorded."""
        self.tokenize_tokens = None
        self.tokenize_status = 200
        self.health_status = 200
        self.health_delay = 0.0
        self.running = self.waiting = 0.0
        self.chunk_delay = 0.0
        self.failures.clear()
        self.received.clear()

    @property
    def completions(self) -> list[Received]:
        """The ``/v1/completions`` requests received so far."""
        return [r for r in self.received if r.path == "/v1/completions"]

    @property
    def disconnects(self) -> int:
        """Completion calls whose client went away before the answer ended."""
        return sum(r.outcome == "disconnected" for r in self.completions)

    def reply_ids(self, index: int) -> list[int]:
        """The token ids of choice ``index`` before the end-of-sequence token."""
        return list(self.tokenizer.encode(reply_text(index), add_special_tokens=False))

    # --- routes -----------------------------------------------------------------------------

    async def _record(self, request: Request) -> Received:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        received = Received(request.url.path, body, dict(request.headers))
        self.received.append(received)
        return received

    async def _models(self, request: Request) -> Response:
        await self._record(request)
        data = [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": "/models/smollm",
                "parent": None,
                "max_model_len": self.max_model_len,
            }
            for name in (self.model, *self.extra_models)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _tokenize(self, request: Request) -> Response:
        received = await self._record(request)
        if self.tokenize_status != 200:
            return error_response(self.tokenize_status, "no tokenizer here")
        body = received.body or {}
        tokens = self.tokenize_tokens
        if tokens is None:
            tokens = self.tokenizer.encode(
                body["prompt"], add_special_tokens=body.get("add_special_tokens", True)
            )
        return JSONResponse(
            {
                "count": len(tokens),
                "max_model_len": self.max_model_len,
                "tokens": list(tokens),
                "token_strs": None,
            }
        )

    async def _health(self, request: Request) -> Response:
        await self._record(request)
        await asyncio.sleep(self.health_delay)
        return Response(status_code=self.health_status)

    async def _metrics(self, request: Request) -> Response:
        await self._record(request)
        labels = f'{{engine="0",model_name="{self.model}"}}'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {self.running}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {self.waiting}\n"
            "# HELP vllm:num_requests_waiting_by_reason Requests waiting, by reason.\n"
            "# TYPE vllm:num_requests_waiting_by_reason gauge\n"
            f'vllm:num_requests_waiting_by_reason{{engine="0",reason="capacity"}} {self.waiting}\n'
        )
        return PlainTextResponse(text)

    async def _completions(self, request: Request) -> Response:
        received = await self._record(request)
        body = received.body or {}
        failure = self.failures.popleft() if self.failures else None
        if failure is not None and failure.kind == "status":
            received.outcome = "failed"
            return error_response(failure.status, failure.message, failure.param)
        choices = self._choices(body)
        if body.get("stream"):
            frames = self._stream(request, received, body, choices, failure)
            return StreamingResponse(frames, media_type="text/event-stream")
        if failure is not None and failure.kind == "drop":
            received.outcome = "failed"
            return StreamingResponse(_cut(), media_type="application/json")
        if failure is not None and failure.kind == "hang":
            await self._wait_for_disconnect(request, received)
            return Response(status_code=499)
        received.outcome = "served"
        prompt_tokens = len(body["prompt"])
        completion_tokens = sum(len(c["token_ids"]) for c in choices)
        return JSONResponse(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": c["index"],
                        "text": c["text"],
                        "logprobs": self._logprobs(c["token_ids"], body),
                        "finish_reason": c["finish_reason"],
                        "stop_reason": None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": body["prompt"],
                        "token_ids": c["token_ids"],
                    }
                    for c in choices
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    # --- generation ---------------------------------------------------------------------------

    def _choices(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        max_tokens = body.get("max_tokens") or 16
        choices = []
        for index in range(body.get("n") or 1):
            ids = [*self.reply_ids(index), self.tokenizer.eos_token_id]
            finish = "stop"
            if len(ids) > max_tokens:
                ids, finish = ids[:max_tokens], "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            choices.append(
                {"index": index, "text": text, "token_ids": ids, "finish_reason": finish}
            )
        return choices

    def _logprobs(
        self, ids: list[int], body: dict[str, Any], offset: int = 0
    ) -> dict[str, Any] | None:
        """Completions-format log-probabilities of ``ids``, generated from position ``offset``.

        The sampled token at position ``p`` has log-probability ``-(p + 1) / 10``; its
        ``k`` alternatives ``id + 1 ... id + k`` each lie half a nat lower, and the
        ``top_logprobs`` dict lists them least likely first (vLLM does not sort it).
        """
        k = body.get("logprobs")
        if k is None:
            return None

        def name(token_id: int) -> str:
            if body.get("return_tokens_as_token_ids"):
                return f"token_id:{token_id}"
            return self.tokenizer.decode([token_id])

        tokens, token_logprobs, tops, offsets = [], [], [], []
        for position, token_id in enumerate(ids, start=offset):
            sampled = -(position + 1) / 10
            top = {name(token_id + j): sampled - 0.5 * j for j in range(k, 0, -1)}
            top[name(token_id)] = sampled
            tokens.append(name(token_id))
            token_logprobs.append(sampled)
            tops.append(top)
            offsets.append(position)
        return {
            "text_offset": offsets,
            "token_logprobs": token_logprobs,
            "tokens": tokens,
            "top_logprobs": tops,
        }

    async def _stream(
        self,
        request: Request,
        received: Received,
        body: dict[str, Any],
        choices: list[dict[str, Any]],
        failure: Failure | None,
    ) -> AsyncIterator[str]:
        """vLLM's chunks: one per choice per token, finish reason on each choice's last."""
        chunks = []
        longest = max(len(c["token_ids"]) for c in choices)
        for position in range(longest):
            for choice in choices:
                ids = choice["token_ids"]
                if position >= len(ids):
                    continue
                previous = self.tokenizer.decode(ids[:position], skip_special_tokens=True)
                text = self.tokenizer.decode(ids[: position + 1], skip_special_tokens=True)
                last = position == len(ids) - 1
                stream_choice: dict[str, Any] = {
                    "index": choice["index"],
                    "text": text[len(previous) :],
                    "logprobs": self._logprobs([ids[position]], body, position),
                    "finish_reason": choice["finish_reason"] if last else None,
                    "stop_reason": None,
                    "token_ids": [ids[position]],
                }
                if position == 0:
                    stream_choice["prompt_token_ids"] = body["prompt"]
                chunks.append(_chunk(self.model, [stream_choice]))
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = len(body["prompt"])
            completion_tokens = sum(len(c["token_ids"]) for c in choices)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            chunks.append(_chunk(self.model, [], usage=usage))
        if failure is not None:
            chunks = chunks[: failure.after_chunks]
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if failure is not None:
                received.outcome = "failed"
                if failure.kind == "drop":
                    raise _Dropped("scripted: connection cut mid-stream")
                if failure.kind == "hang":
                    await self._wait_for_disconnect(request, received)
                    return
                if failure.kind == "no_done":
                    return
                if failure.kind == "bad_chunk":
                    yield 'data: {"choices": [{"index": 0, "text": "cut\n\n'
                    return
                error = error_body(failure.status, failure.message, failure.param)
                yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"
            if failure is None:
                received.outcome = "served"
        except (asyncio.CancelledError, GeneratorExit):
            received.outcome = "disconnected"
            raise

    async def _wait_for_disconnect(self, request: Request, received: Received) -> None:
        """Hang until the client goes away (then record it)."""
        try:
            while not await request.is_disconnected():
                await asyncio.sleep(0.01)
        finally:
            received.outcome = "disconnected"


def _chunk(model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


async def _cut() -> AsyncIterator[bytes]:
    raise _Dropped("scripted: connection cut before the body")
    yield b""  # pragma: no cover - makes this an async generator


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


@contextlib.contextmanager
def serve_fake(fake: FakeVllm, port: int | None = None) -> Iterator[str]:
    """Serve ``fake`` on 127.0.0.1 (``port``, or a free one) until the block exits; its URL."""
    config = uvicorn.Config(
        fake.app, host="127.0.0.1", port=port or free_port(), log_level="critical", lifespan="off"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name=f"fake-vllm-{config.port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the fake vLLM server did not start on port {config.port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"
