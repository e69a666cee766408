"""Real vLLM OpenAI servers on 127.0.0.1 that tests can start, kill and restart."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from ttalign.benchmarks.processes import free_port, vllm_server_command, wait_healthy
from ttalign.engine.adaptive_replicas import vllm_serve_flags
from ttalign.engine.remote_engine import metric_sum
from ttalign.engine.vllm_engine import resolve_dtype
from ttalign.server.settings import SHIPPED_TEMPERATURE_HEADS, ServerSettings

#: Each replica's KV cache, in bytes (never a fraction: node memory differs by machine).
REPLICA_KV_CACHE_BYTES = 256 << 20


@dataclass
class VllmReplica:
    """One ``python -m vllm.entrypoints.openai.api_server`` process and its port."""

    model: str
    name: str
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = vllm_server_command(self.model, self.port, name=self.name, eager=True)
        # The benchmarks' 1 GiB cache is more than two test replicas need.
        at = command.index("--kv-cache-memory-bytes")
        command[at + 1] = str(REPLICA_KV_CACHE_BYTES)
        # The dtype the suite was asked for (TTALIGN_DTYPE), as the in-process engine uses.
        command[command.index("--dtype") + 1] = resolve_dtype(ServerSettings().dtype)
        # ttalign's processor and routes, so the gateway serves adaptive_temperature.
        return command + vllm_serve_flags(SHIPPED_TEMPERATURE_HEADS)

    def launch(self) -> None:
        """Start the process (its own process group, so killing it kills its engine too)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
            )

    def wait_ready(self, timeout: float = 600) -> None:
        assert self.process is not None
        wait_healthy(self.url, self.process, timeout, self.log_path)

    def kill(self) -> None:
        """SIGKILL the server and its engine process at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def metric(self, name: str) -> float:
        """The sum of metric ``name``'s samples on this replica's ``/metrics``."""
        return metric_sum(httpx.get(f"{self.url}/metrics", timeout=10).text, name)

    def unfinished_requests(self) -> float:
        """Requests this replica is running or has waiting, by its own gauges."""
        return self.metric("vllm:num_requests_running") + self.metric("vllm:num_requests_waiting")

    def finished_requests(self) -> float:
        """Requests this replica generated to their end (a stop or the length limit).

        Aborted requests are left out: vLLM counts an abort under the same counter, and an
        earlier test's aborted call may be counted only when the next traffic arrives.
        """
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm:request_success_total{")
            and any(f'finished_reason="{reason}"' in line for reason in ("stop", "length"))
        )
