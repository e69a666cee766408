"""Soak test: a mixed load for a fixed time, then proof that the server came through it.

    python -m ttalign.benchmarks.soak --minutes 10 --concurrency 16

Starts ttalign on the embedded model as a subprocess (or loads a running one with
``--url``) and keeps ``--concurrency`` clients busy for ``--minutes`` with every strategy
that ``GET /v1/strategies`` lists (streamed and not; small configs from a table, schema
defaults for strategies the table does not know; the ``rules`` reward with simple
constraints for most searches, the ``judge`` for the rest). About 10 % of the requests
disconnect mid-way (streams closed after their first bytes, other requests cancelled
after a random delay) and about 10 % are malformed (a rotating set that must be refused
with a 4xx).

It records status counts, the body of every 5xx, p50/p99 latency per strategy (successful
requests), the output tokens per second of a fixed batch of plain requests sent after the
warm-up and again after the load (the throughput probe), the server's resident memory (the
server process and its engine children) after a warm-up (one request of each kind, then
``--warm-up-minutes`` of the same load) and at the end, and the engine's
unfinished requests once the load has stopped and a short settle period has passed. Results
go to ``benchmarks/results/soak/`` as JSON and a markdown table. The exit status is 1 when a
goal is missed: any 5xx, a request left unanswered (dropped connection or client timeout), a
malformed request not refused with a 4xx, resident memory growing more than 10 %, or engine
work left unfinished.

``--allocator default tcmalloc`` soaks a fresh server on each allocator in turn, with the
same seed, and writes a comparison: RSS growth, and the probe's throughput and the requests
answered per minute as ratios against the first allocator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from ttalign.benchmarks.processes import (
    allocator_env,
    free_port,
    running_server,
    ttalign_server_command,
)
from ttalign.engine.sse_lines import sse_lines
from ttalign.server.model_prep import prepare_embedded_model

RESULTS_DIR = Path(__file__).parent / "results" / "soak"
MODEL_NAME = "smollm2"
MAX_RSS_GROWTH = 0.10
#: Distinct server error bodies kept in the results (all are counted).
KEPT_ERROR_BODIES = 20
RSS_SAMPLE_SECONDS = 10.0
#: How long a client waits for an answer before counting the request as unanswered.
CLIENT_TIMEOUT_SECONDS = 600.0
#: The throughput probe: plain requests of a fixed length, sent before and after the load.
PROBE_REQUESTS = 24
PROBE_CONCURRENCY = 8
PROBE_MAX_TOKENS = 48
#: Error types that a stream reports for what would have been a 5xx.
SERVER_ERROR_TYPES = {"internal_server_error", "upstream_error", "service_unavailable_error"}

PROMPTS = [
    "Give me three tips for better sleep.",
    "Write a haiku about autumn.",
    "Explain what a hash table is in two sentences.",
    "Suggest a name for a grey cat.",
]
#: Rule-verifier constraints, rotated over the searches that use the ``rules`` reward.
CONSTRAINT_SETS = [
    [{"type": "word_count", "max": 40}],
    [{"type": "keywords", "required": ["the"]}],
    [{"type": "case", "case": "lower"}, {"type": "char_count", "max": 300}],
]
JUDGE_SHARE = 0.2
#: Small settings per strategy; a strategy missing here runs on its schema defaults.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "best_of_n": {"n": 3},
    "tpo": {"depth": 1, "width": 2, "max_tokens": {"loss": 24, "gradient": 24}},
    # The searches' defaults take minutes per request on two cores under this load; a soak
    # wants many requests through the server, not a few long ones.
    "rain": {"max_iterations": 8},
    "darwin": {"cycles": 1, "mutations": 2},
}
MAX_TOKENS = {"none": 32}
DEFAULT_MAX_TOKENS = 16
#: Requests that must be refused with a 4xx: raw bytes, or changes to a valid body.
MALFORMED: list[tuple[str, bytes | dict[str, Any]]] = [
    ("bad_json", b'{"model": "m", "messages": [{"role": "user"'),
    ("bad_param", {"temperature": 7}),
    ("unknown_strategy", {"strategy": "no_such_strategy"}),
    ("over_cap_max_tokens", {"max_tokens": 10**7}),
    ("over_cap_n", {"n": 10**4}),
    ("bad_strategy_config", {"strategy": "best_of_n", "strategy_config": {"n": 0}}),
    (
        "bad_constraints",
        {
            "strategy": "best_of_n",
            "reward": "rules",
            "constraints": [{"type": "word_count", "min": 10, "max": 2}],
        },
    ),
    (
        "unknown_constraint",
        {"strategy": "best_of_n", "reward": "rules", "constraints": [{"type": "no_such_check"}]},
    ),
    ("missing_constraints", {"strategy": "best_of_n", "reward": "rules"}),
    ("unknown_reward", {"strategy": "best_of_n", "reward": "no_such_reward"}),
    ("address_as_reward", {"strategy": "best_of_n", "reward": "http://127.0.0.1:1/"}),
    ("unknown_model", {"model": "no-such-model"}),
    ("empty_messages", {"messages": []}),
]


# --- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request to send: what it is, its body, and how the client behaves."""

    label: str
    body: bytes
    stream: bool = False
    malformed: bool = False
    disconnect: bool = False


@dataclass(frozen=True)
class Variant:
    """A well-formed request shape: a strategy with its config, streamed or not."""

    strategy: str
    config: dict[str, Any]
    uses_reward: bool
    stream: bool

    @property
    def label(self) -> str:
        return f"{self.strategy}/stream" if self.stream else self.strategy


class Workload:
    """Draws calls: well-formed variants, disconnecting clients and malformed requests."""

    def __init__(
        self,
        model: str,
        strategies: list[dict[str, Any]],
        rng: random.Random,
        *,
        disconnect_share: float,
        malformed_share: float,
    ) -> None:
        self.variants = [
            Variant(s["name"], SMALL_CONFIGS.get(s["name"], {}), s["uses_reward"], stream)
            for s in strategies
            for stream in (False, True)
        ]
        self.model = model
        self.rng = rng
        self.disconnect_share = disconnect_share
        self.malformed_share = malformed_share
        self._malformed_sent = 0

    def next(self) -> Call:
        draw = self.rng.random()
        if draw < self.malformed_share:
            return self.malformed()
        return self.well_formed(
            self.rng.choice(self.variants),
            disconnect=draw < self.malformed_share + self.disconnect_share,
        )

    def well_formed(self, variant: Variant, *, disconnect: bool = False) -> Call:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
            "max_tokens": MAX_TOKENS.get(variant.strategy, DEFAULT_MAX_TOKENS),
            "strategy": variant.strategy,
            "stream": variant.stream,
        }
        if variant.config:
            body["strategy_config"] = variant.config
        if variant.uses_reward:
            if self.rng.random() < JUDGE_SHARE:
                body["reward"] = "judge"
            else:
                body["reward"] = "rules"
                body["constraints"] = self.rng.choice(CONSTRAINT_SETS)
        return Call(variant.label, json.dumps(body).encode(), variant.stream, disconnect=disconnect)

    def malformed(self) -> Call:
        name, change = MALFORMED[self._malformed_sent % len(MALFORMED)]
        self._malformed_sent += 1
        if isinstance(change, bytes):
            return Call(f"malformed/{name}", change, malformed=True)
        base = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": DEFAULT_MAX_TOKENS,
        }
        return Call(f"malformed/{name}", json.dumps({**base, **change}).encode(), malformed=True)


# --- recording -----------------------------------------------------------------------------


@dataclass
class Tally:
    """Everything observed during the load."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    server_errors: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    server_error_count: int = 0
    unanswered: list[dict[str, Any]] = field(default_factory=list)
    malformed_accepted: list[dict[str, Any]] = field(default_factory=list)

    def server_error(self, call: Call, status: int | str, body: str) -> None:
        """Count a server error; keep the first request of each distinct status and body."""
        self.server_error_count += 1
        key = (str(status), body[:2000])
        if key in self.server_errors:
            self.server_errors[key]["count"] += 1
        elif len(self.server_errors) < KEPT_ERROR_BODIES:
            self.server_errors[key] = {
                "status": key[0],
                "body": key[1],
                "first_call": call.label,
                "count": 1,
            }


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile; ``None`` without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def stream_error(line: str) -> dict[str, Any] | None:
    """The ``error`` object of an SSE ``data:`` line, if it carries one."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return None
    return json.loads(payload).get("error")


# --- clients -------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, call: Call, rng: random.Random, tally: Tally) -> None:
    """Send one call the way its client behaves, and record what happened."""
    started = time.monotonic()
    try:
        if call.disconnect and call.stream:
            await _read_first_bytes(client, call)
            tally.statuses["disconnected"] += 1
            return
        if call.disconnect:
            task = asyncio.create_task(_post(client, call, tally, started))
            done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.05, 1.5))
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                tally.statuses["disconnected"] += 1
            return
        if call.stream:
            await _stream(client, call, tally, started)
        else:
            await _post(client, call, tally, started)
    except httpx.TransportError as exc:  # timeouts included: a stalled request is unanswered
        kind = "client_timeout" if isinstance(exc, httpx.TimeoutException) else "dropped"
        tally.statuses[kind] += 1
        tally.unanswered.append({"call": call.label, "error": repr(exc)})


async def _read_first_bytes(client: httpx.AsyncClient, call: Call) -> None:
    async with client.stream("POST", "/v1/chat/completions", content=call.body) as response:
        async for _ in response.aiter_bytes():
            break  # leaving the block closes the connection mid-stream


async def _post(client: httpx.AsyncClient, call: Call, tally: Tally, started: float) -> None:
    response = await client.post("/v1/chat/completions", content=call.body)
    _record(call, response.status_code, response.text, tally, time.monotonic() - started)


async def _stream(client: httpx.AsyncClient, call: Call, tally: Tally, started: float) -> None:
    async with client.stream("POST", "/v1/chat/completions", content=call.body) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            _record(call, response.status_code, body, tally, time.monotonic() - started)
            return
        finished = False
        async for line in sse_lines(response.aiter_bytes()):
            error = stream_error(line)
            if error is not None:
                status = "stream_error" if error.get("type") in SERVER_ERROR_TYPES else "stream_4xx"
                tally.statuses[status] += 1
                if status == "stream_error":
                    tally.server_error(call, status, json.dumps(error))
                return
            finished = finished or line.strip() == "data: [DONE]"
    if not finished:
        tally.statuses["stream_unfinished"] += 1
        tally.server_error(call, "stream_unfinished", "the stream ended without data: [DONE]")
        return
    _record(call, 200, "", tally, time.monotonic() - started)


def _record(call: Call, status: int, body: str, tally: Tally, seconds: float) -> None:
    tally.statuses[str(status)] += 1
    if status >= 500:
        tally.server_error(call, status, body)
    elif call.malformed and status < 400:
        tally.malformed_accepted.append({"call": call.label, "status": status})
    elif status == 200:
        tally.latencies[call.label].append(seconds)


async def run_load(
    base_url: str, workload: Workload, *, seconds: float, concurrency: int, memory: ServerMemory
) -> Tally:
    """Keep ``concurrency`` clients busy for ``seconds``; sample memory along the way."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=CLIENT_TIMEOUT_SECONDS, limits=limits
    ) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                await send(client, workload.next(), workload.rng, tally)

        async def sample_memory() -> None:
            while time.monotonic() < deadline:
                memory.sample()
                await asyncio.sleep(RSS_SAMPLE_SECONDS)

        await asyncio.gather(sample_memory(), *(worker() for _ in range(concurrency)))
    return tally


async def warm_up(base_url: str, workload: Workload) -> None:
    """Send every variant once, so that first-use allocations are not counted as growth."""
    tally = Tally()
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_SECONDS) as client:
        for variant in workload.variants:
            await send(client, workload.well_formed(variant), workload.rng, tally)


async def probe_throughput(base_url: str, model: str) -> float:
    """Output tokens per second of a fixed batch of plain requests (``ignore_eos``, so every
    request generates exactly ``PROBE_MAX_TOKENS``): the same work before and after the load,
    and under each allocator."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": PROBE_MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }
    gate = asyncio.Semaphore(PROBE_CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_SECONDS) as client:

        async def one() -> int:
            async with gate:
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                return int(response.json()["usage"]["completion_tokens"])

        started = time.monotonic()
        tokens = await asyncio.gather(*(one() for _ in range(PROBE_REQUESTS)))
    return sum(tokens) / (time.monotonic() - started)


# --- the server ----------------------------------------------------------------------------


class ServerMemory:
    """Resident memory of the server process plus all of its children (the engine)."""

    def __init__(self, pid: int | None) -> None:
        self.process = psutil.Process(pid) if pid is not None else None
        self.samples: list[tuple[float, int]] = []
        self.marks: dict[str, dict[str, int]] = {}
        self._started = time.monotonic()

    def by_process(self) -> dict[str, int]:
        """Resident bytes of each process, keyed ``name[pid]``."""
        if self.process is None:
            return {}
        sizes = {}
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                sizes[f"{process.name()}[{process.pid}]"] = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return sizes

    def rss(self) -> int | None:
        return sum(self.by_process().values()) if self.process is not None else None

    def mark(self, name: str) -> int | None:
        """Record each process's resident memory under ``name``; return the total."""
        if self.process is None:
            return None
        self.marks[name] = self.by_process()
        return sum(self.marks[name].values())

    def sample(self) -> int | None:
        rss = self.rss()
        if rss is not None:
            self.samples.append((round(time.monotonic() - self._started, 1), rss))
        return rss


def listening_pid(base_url: str) -> int | None:
    """The process listening on ``base_url``'s port on this machine, if it can be found."""
    port = urlsplit(base_url).port
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return connection.pid
    return None


async def settle(base_url: str, seconds: float) -> tuple[dict[str, Any], float]:
    """Poll ``/health`` until the engine and the server hold no requests (or time runs out).

    Returns the last health body and how long settling took.
    """
    started = time.monotonic()
    body: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while True:
            try:
                body = (await client.get("/health")).json()
            except httpx.HTTPError as exc:
                body = {"error": repr(exc)}  # a server that stopped answering is not idle
            if _idle(body) or time.monotonic() - started > seconds:
                return body, time.monotonic() - started
            await asyncio.sleep(0.5)


def _idle(health: dict[str, Any]) -> bool:
    engine = health.get("engine", {})
    return (
        engine.get("engine_unfinished_requests", engine.get("running_requests")) == 0
        and engine.get("running_requests") == 0
        and health.get("requests_in_flight") == 0
    )


@contextmanager
def soak_target(url: str | None, log_path: Path, allocator: str = "default") -> Iterator[str]:
    """The server under load: the one at ``url``, or a fresh ttalign subprocess (on
    ``allocator``: glibc's ``default``, or ``tcmalloc`` preloaded as ``./run serve`` does)."""
    if url is not None:
        yield url.rstrip("/")
        return
    port = free_port()
    command = ttalign_server_command(str(prepare_embedded_model()), port, name=MODEL_NAME)
    env = allocator_env(allocator)
    with running_server(command, port, log_path, env=env) as base_url:
        yield base_url


# --- results -------------------------------------------------------------------------------


def summarize(
    args: argparse.Namespace,
    tally: Tally,
    memory: ServerMemory,
    health: dict[str, Any],
    settle_seconds: float,
) -> dict[str, Any]:
    rss_end = memory.mark("end")
    rss_start = sum(memory.marks["start"].values()) if "start" in memory.marks else None
    growth = (rss_end - rss_start) / rss_start if rss_start and rss_end else None
    first = memory.marks.get("after_first_requests")
    growth_since_first = (
        (rss_end - sum(first.values())) / sum(first.values()) if first and rss_end else None
    )
    engine = health.get("engine", {})
    unfinished = engine.get("engine_unfinished_requests")
    goals = {
        "no_server_errors": tally.server_error_count == 0,
        "every_request_answered": not tally.unanswered,
        "malformed_refused": not tally.malformed_accepted,
        "rss_growth_within_10_percent": growth is not None and growth <= MAX_RSS_GROWTH,
        "engine_idle_at_end": unfinished == 0 and health.get("requests_in_flight") == 0,
    }
    return {
        "command": " ".join(["python -m ttalign.benchmarks.soak", *sys.argv[1:]]),
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": sum(tally.statuses.values()),
        "statuses": dict(sorted(tally.statuses.items())),
        "disconnects": tally.statuses["disconnected"],
        "answered_per_minute": tally.statuses["200"] / args.minutes,
        "latency_seconds": {
            label: {
                "count": len(values),
                "p50": percentile(values, 0.5),
                "p99": percentile(values, 0.99),
            }
            for label, values in sorted(tally.latencies.items())
        },
        "server_error_count": tally.server_error_count,
        "server_errors": list(tally.server_errors.values()),
        "unanswered": tally.unanswered,
        "malformed_accepted": tally.malformed_accepted,
        "warm_up_minutes": args.warm_up_minutes,
        "rss_bytes": {
            "start": rss_start,
            "end": rss_end,
            "growth": growth,
            "growth_since_first_requests": growth_since_first,
        },
        "rss_bytes_by_process": memory.marks,
        "rss_samples": memory.samples,
        "health_at_end": health,
        "settle_seconds": round(settle_seconds, 2),
        "engine_unfinished_requests_at_end": unfinished,
        "goals": goals,
    }


def markdown(report: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value * 1000:.0f}"

    def mib(value: int | None) -> str:
        return "–" if value is None else f"{value / 2**20:.0f} MiB"

    rss = report["rss_bytes"]
    probe = report["probe_output_tokens_per_second"]
    growth = "–" if rss["growth"] is None else f"{rss['growth'] * 100:+.1f} %"
    first = rss["growth_since_first_requests"]
    since_first = "–" if first is None else f"{first * 100:+.1f} %"
    lines = [
        f"# Soak: {report['minutes']} min at concurrency {report['concurrency']}",
        "",
        f"{report['requests']} requests, {report['disconnects']} client disconnects. "
        f"Command: `{report['command']}`",
        "",
        "| strategy | successful | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for label, stats in report["latency_seconds"].items():
        lines.append(f"| {label} | {stats['count']} | {ms(stats['p50'])} | {ms(stats['p99'])} |")
    lines += ["", "| outcome | count |", "|---|---|"]
    lines += [f"| {status} | {count} |" for status, count in report["statuses"].items()]
    lines += [
        "",
        f"Server RSS (server and engine processes): {mib(rss['start'])} after warm-up "
        f"({report['warm_up_minutes']} min of the same load), {mib(rss['end'])} at the end "
        f"({growth}; {since_first} since the first request of each kind).",
        f"Throughput probe ({PROBE_REQUESTS} plain requests of {PROBE_MAX_TOKENS} tokens at "
        f"concurrency {PROBE_CONCURRENCY}): {probe['start']:.1f} output tok/s after warm-up, "
        f"{probe['end']:.1f} after the load; {report['answered_per_minute']:.1f} requests "
        "answered per minute during the load.",
        f"Engine unfinished requests {report['settle_seconds']} s after the load: "
        f"{report['engine_unfinished_requests_at_end']}.",
        "",
        "| goal | met |",
        "|---|---|",
    ]
    lines += [f"| {goal} | {'yes' if met else '**no**'} |" for goal, met in report["goals"].items()]
    return "\n".join(lines) + "\n"


# --- entry point ---------------------------------------------------------------------------


async def soak(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        strategies = (await client.get("/v1/strategies")).json()["data"]
    workload = Workload(
        model,
        strategies,
        rng,
        disconnect_share=args.disconnect_share,
        malformed_share=args.malformed_share,
    )
    memory = ServerMemory(args.pid or listening_pid(base_url))
    memory.mark("before_warm_up")
    await warm_up(base_url, workload)
    memory.mark("after_first_requests")
    if args.warm_up_minutes > 0:
        # The same load for a while first: the engine's first-use allocations (kernels for
        # each batch shape, caches that fill to their bound) are not what a soak looks for.
        await run_load(
            base_url,
            workload,
            seconds=args.warm_up_minutes * 60,
            concurrency=args.concurrency,
            memory=ServerMemory(None),
        )
        await settle(base_url, args.settle_seconds)
    probe_start = await probe_throughput(base_url, model)
    memory.mark("start")
    tally = await run_load(
        base_url,
        workload,
        seconds=args.minutes * 60,
        concurrency=args.concurrency,
        memory=memory,
    )
    health, settle_seconds = await settle(base_url, args.settle_seconds)
    probe_end = await probe_throughput(base_url, model)
    report = summarize(args, tally, memory, health, settle_seconds)
    report["probe_output_tokens_per_second"] = {"start": probe_start, "end": probe_end}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument(
        "--warm-up-minutes",
        type=float,
        default=2,
        help="the same load, unmeasured, before memory's starting point (after one request "
        "of each kind)",
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--url", help="load this running server instead of starting one")
    parser.add_argument(
        "--pid", type=int, help="server process for memory figures (default: the port's owner)"
    )
    parser.add_argument("--disconnect-share", type=float, default=0.1)
    parser.add_argument("--malformed-share", type=float, default=0.1)
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=30,
        help="how long the engine may take to go idle once the load stops",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allocator",
        choices=("default", "tcmalloc"),
        nargs="+",
        default=["default"],
        help="the server's memory allocator (tcmalloc: preloaded, as ./run serve does); "
        "name both to soak one server on each in turn and compare them",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="soak", help="file name of the results, no suffix")
    args = parser.parse_args()
    if args.url is not None and len(args.allocator) > 1:
        parser.error("--url loads one running server; it cannot compare allocators")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for allocator in args.allocator:
        name = args.name if len(args.allocator) == 1 else f"{args.name}-{allocator}"
        reports[allocator] = soak_one(args, allocator, name)
    if len(reports) > 1:
        write_comparison(args, reports)
    missed = [
        f"{allocator}: {goal}"
        for allocator, report in reports.items()
        for goal, met in report["goals"].items()
        if not met
    ]
    if missed:
        print(f"missed goals: {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)


def soak_one(args: argparse.Namespace, allocator: str, name: str) -> dict[str, Any]:
    """Soak one server on ``allocator``; write and return its report."""
    log_path = Path(tempfile.mkdtemp(prefix="ttalign-soak-")) / "ttalign.log"
    with soak_target(args.url, log_path, allocator) as base_url:
        report = asyncio.run(soak(args, base_url))
    report["allocator"] = allocator
    if args.url is None:
        report["server_log"] = str(log_path)
    (args.results_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.results_dir / f"{name}.md").write_text(table)
    print(table)
    return report


def write_comparison(args: argparse.Namespace, reports: dict[str, dict[str, Any]]) -> None:
    """RSS growth and throughput of each allocator, as ratios against the first one."""
    base_name, base = next(iter(reports.items()))

    def probe(report: dict[str, Any]) -> float:
        # Both probes, so that a server that slowed down during the load counts against it.
        figures = report["probe_output_tokens_per_second"]
        return (figures["start"] + figures["end"]) / 2

    rows = {
        allocator: {
            "rss_growth": report["rss_bytes"]["growth"],
            "probe_output_tokens_per_second": probe(report),
            "probe_ratio": probe(report) / probe(base),
            "answered_per_minute": report["answered_per_minute"],
            "answered_ratio": report["answered_per_minute"] / base["answered_per_minute"],
            "server_errors": report["server_error_count"],
        }
        for allocator, report in reports.items()
    }
    comparison = {"command": " ".join(["python -m ttalign.benchmarks.soak", *sys.argv[1:]])}
    comparison["baseline"] = base_name
    comparison["allocators"] = rows
    (args.results_dir / f"{args.name}-comparison.json").write_text(
        json.dumps(comparison, indent=2) + "\n"
    )
    lines = [
        f"# Allocators side by side: {args.minutes} min soaks at concurrency {args.concurrency}",
        "",
        f"Command: `{comparison['command']}`. Ratios are against `{base_name}`.",
        "",
        "| allocator | RSS growth | probe tok/s | probe ratio | answered/min | ratio | 5xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for allocator, row in rows.items():
        lines.append(
            f"| {allocator} | {row['rss_growth'] * 100:+.1f} % "
            f"| {row['probe_output_tokens_per_second']:.1f} | {row['probe_ratio']:.3f} "
            f"| {row['answered_per_minute']:.1f} | {row['answered_ratio']:.3f} "
            f"| {row['server_errors']} |"
        )
    table = "\n".join(lines) + "\n"
    (args.results_dir / f"{args.name}-comparison.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
