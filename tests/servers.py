"""Run a real uvicorn server on 127.0.0.1 in a background thread, for API tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from benchmarks.processes import free_port


@dataclass
class RunningServer:
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"


@contextmanager
def serve_in_thread(
    app: FastAPI, *, startup_timeout: float = 300, graceful_timeout: int | None = None
) -> Iterator[RunningServer]:
    """Serve ``app`` until the block exits; lifespan start-up errors fail the block."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=graceful_timeout,
    )
    server = uvicorn.Server(config)
    # Signal handlers can only be installed on the main thread; pytest owns that one.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the test server did not start in {startup_timeout} s")
        time.sleep(0.05)
    running = RunningServer(app, server, thread, port)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=120)
