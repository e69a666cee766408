"""Run a real uvicorn server on 127.0.0.1 in a background thread, for API tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from ttalign.benchmarks.processes import free_port

T = TypeVar("T")


@dataclass
class RunningServer:
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    #: The server's event loop: its engine must be driven from this loop only.
    loop: asyncio.AbstractEventLoop

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run ``coroutine`` on the server's event loop (where its engine lives); its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@contextmanager
def serve_in_thread(
    app: FastAPI, *, startup_timeout: float = 300, graceful_timeout: int | None = None
) -> Iterator[RunningServer]:
    """Serve ``app`` until the block exits; lifespan start-up errors fail the block.

    A failed start raises ``RuntimeError`` quoting the lifespan's exception (chained to it),
    so the cause shows in the test's own report.
    """
    startup = _record_startup(app)
    server = _server(app, graceful_timeout)
    thread = threading.Thread(
        target=_run, args=(server,), name=f"uvicorn-{server.config.port}", daemon=True
    )
    thread.start()
    _wait_started(server, startup, thread.is_alive, startup_timeout)
    assert startup.loop is not None, "uvicorn started without running the lifespan"
    try:
        yield RunningServer(app, server, thread, server.config.port, startup.loop)
    finally:
        server.should_exit = True
        thread.join(timeout=120)


@contextmanager
def serve_beside(
    neighbour: RunningServer, app: FastAPI, *, startup_timeout: float = 300
) -> Iterator[RunningServer]:
    """Serve ``app`` on ``neighbour``'s event loop (and thread) until the block exits.

    Apps that share one engine must drive it from one event loop: vLLM's ``AsyncLLM`` binds
    its output handler task and its zmq sockets to the loop that first used it, and is not
    thread-safe. ``serve_in_thread`` would give the second app a loop of its own.
    """
    startup = _record_startup(app)
    server = _server(app, None)
    serving = asyncio.run_coroutine_threadsafe(_serve(server), neighbour.loop)
    _wait_started(server, startup, lambda: not serving.done(), startup_timeout)
    try:
        yield RunningServer(app, server, neighbour.thread, server.config.port, neighbour.loop)
    finally:
        server.should_exit = True
        serving.result(timeout=120)


def _server(app: FastAPI, graceful_timeout: int | None) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        timeout_graceful_shutdown=graceful_timeout,
    )
    server = uvicorn.Server(config)
    # Signal handlers can only be installed on the main thread; pytest owns that one.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    return server


def _wait_started(
    server: uvicorn.Server, startup: _Startup, running: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not server.started:
        if not running():
            cause = startup.error
            detail = f": {type(cause).__name__}: {cause}" if cause else "; see the log above"
            raise RuntimeError(f"the test server failed to start{detail}") from cause
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the test server did not start in {timeout} s")
        time.sleep(0.05)


# uvicorn exits (SystemExit) when the app fails to start; the callers raise the cause instead.


def _run(server: uvicorn.Server) -> None:
    with contextlib.suppress(SystemExit):
        server.run()


async def _serve(server: uvicorn.Server) -> None:
    # A SystemExit escaping a task would stop the neighbour's whole event loop.
    with contextlib.suppress(SystemExit):
        await server.serve()


@dataclass
class _Startup:
    loop: asyncio.AbstractEventLoop | None = None
    error: BaseException | None = None


def _record_startup(app: FastAPI) -> _Startup:
    """Wrap ``app``'s lifespan to note the loop it runs on and any exception it starts with.

    uvicorn only logs a failed start and ends its thread; the caller raises with the cause.
    """
    startup = _Startup()
    lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def recorded(target: Any) -> AsyncIterator[Any]:
        startup.loop = asyncio.get_running_loop()
        started = False
        try:
            async with lifespan(target) as state:
                started = True
                yield state
        except BaseException as exc:
            if not started:
                startup.error = exc
            raise

    app.router.lifespan_context = recorded
    return startup


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 60.0) -> float:
    """Poll ``predicate`` every 20 ms from a plain thread until it holds; fail the test after
    ``timeout`` s. Returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


async def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def validated_chunks(client: Any, arguments: dict[str, Any]) -> list[Any]:
    """Stream ``chat.completions.create(stream=True, **arguments)`` and validate every raw SSE
    event against the openai SDK's chunk model (the client builds objects unchecked)."""
    from openai.types.chat import ChatCompletionChunk

    with client.chat.completions.with_streaming_response.create(
        stream=True, **arguments
    ) as response:
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    return [ChatCompletionChunk.model_validate_json(e.removeprefix("data: ")) for e in events[:-1]]
