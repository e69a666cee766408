"""The replica pool's routing, pins, retries and health checks (no engine, no vLLM)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from ttalign.engine import replicas
from ttalign.engine.replicas import (
    Replica,
    ReplicaFailure,
    ReplicaPool,
    ReplicasExhausted,
    is_retryable_status,
    rendezvous_rank,
    transport_failure,
)
from ttalign.engine.routing import current_routing, request_routing

from tests.servers import serve_in_thread, wait_until

URLS = ["http://replica-a:8000", "http://replica-b:8000", "http://replica-c:8000"]
KEYS = [f"request-{i}" for i in range(2000)]


def chosen(pool: ReplicaPool) -> tuple[Replica, dict[str, str]]:
    """The first replica (and headers) the pool would try for a call made here."""
    return next(pool.attempts())


def owners(pool: ReplicaPool, keys: list[str]) -> dict[str, str]:
    """Each key's replica, every key routed in a scope of its own (closed before the next)."""
    result = {}
    for key in keys:
        with request_routing(key):
            result[key] = chosen(pool)[0].url
    return result


async def serve_url(replica: Replica, headers: dict[str, str]) -> str:
    """An attempt that always succeeds, answering which replica served it."""
    return replica.url


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., ReplicaPool]]:
    """Builds pools (no backoff, health checks far apart) and closes them after the test."""
    made: list[ReplicaPool] = []

    def make(urls: list[str] | None = None, **options: Any) -> ReplicaPool:
        options.setdefault("backoff_seconds", 0.0)
        options.setdefault("health_interval", 3600.0)
        pool = ReplicaPool(options.pop("name", "engine"), urls or URLS, **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pool's backoff sleeps, recorded and skipped (the health loop's still sleep)."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    class RecordingAsyncio:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(seconds: float) -> None:
            if seconds >= 1:  # the health loop's interval: leave it alone
                await real_sleep(seconds)
                return
            recorded.append(seconds)
            await real_sleep(0)

    monkeypatch.setattr(replicas, "asyncio", RecordingAsyncio())
    return recorded


# --- consistent hashing -------------------------------------------------------------------


def test_rendezvous_ranking_is_the_same_in_every_process() -> None:
    """blake2b, not the salted hash(): gateways with different hash seeds rank alike."""
    keys = KEYS[:50]
    script = (
        "import json, sys\n"
        "from ttalign.engine.replicas import Replica, rendezvous_rank\n"
        "urls, keys = json.loads(sys.stdin.read())\n"
        "replicas = [Replica(u) for u in urls]\n"
        "print(json.dumps([[r.url for r in rendezvous_rank(k, replicas)] for k in keys]))\n"
    )
    here = [[r.url for r in rendezvous_rank(k, [Replica(u) for u in URLS])] for k in keys]
    for seed in ("1", "987654"):
        ranked = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps([URLS, keys]),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
        )
        assert json.loads(ranked.stdout) == here
    # The ranking depends on the replicas' URLs, not on their order in the list.
    reordered = [Replica(u) for u in reversed(URLS)]
    assert [[r.url for r in rendezvous_rank(k, reordered)] for k in keys] == here


def test_keys_spread_evenly_over_the_replicas() -> None:
    counts = Counter(owners(ReplicaPool("engine", URLS), KEYS).values())
    assert set(counts) == set(URLS)
    for url in URLS:
        assert 0.28 < counts[url] / len(KEYS) < 0.39, counts


def test_only_the_departed_replicas_keys_move() -> None:
    pool = ReplicaPool("engine", URLS)
    before = owners(pool, KEYS)
    departed = pool.replicas[2]
    departed.healthy = False
    after = owners(pool, KEYS)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == departed.url}
    # Its keys spread over both remaining replicas rather than piling onto one.
    landed = Counter(after[k] for k in moved)
    assert set(landed) == {URLS[0], URLS[1]}
    assert min(landed.values()) > 0.3 * len(moved)
    # When it comes back, exactly its keys return to it.
    departed.healthy = True
    assert owners(pool, KEYS) == before


def test_a_new_replica_takes_keys_only_for_itself() -> None:
    before = owners(ReplicaPool("engine", URLS), KEYS)
    grown = ReplicaPool("engine", [*URLS, "http://replica-d:8000"])
    after = owners(grown, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(after[k] == "http://replica-d:8000" for k in moved)
    assert 0.18 < len(moved) / len(KEYS) < 0.32


# --- bounded loads and pins ---------------------------------------------------------------


async def _hold_scopes(
    pool: ReplicaPool, keys: list[str]
) -> tuple[list[asyncio.Task[str]], asyncio.Event]:
    """One request scope per key, each pinned by a call that waits for the returned event."""
    gate = asyncio.Event()

    async def attempt(replica: Replica, headers: dict[str, str]) -> str:
        await gate.wait()
        return replica.url

    async def request(key: str) -> str:
        with request_routing(key) as scope:
            url = await pool.call(attempt)
            assert scope.pins[pool.name].url == url
            return url

    tasks = [asyncio.create_task(request(key)) for key in keys]
    await wait_until(lambda: sum(r.active for r in pool.replicas) == len(keys), timeout=5)
    return tasks, gate


async def test_bounded_loads_cap_a_replica_every_key_prefers(make_pool) -> None:
    pool = make_pool(URLS[:2])
    hot = pool.replicas[0]
    keys = [k for k in KEYS if rendezvous_rank(k, pool.replicas)[0] is hot][:40]
    assert len(keys) == 40
    tasks, gate = await _hold_scopes(pool, keys)
    bound = math.ceil(1.25 * 40 / 2)
    assert hot.active == bound and pool.replicas[1].active == 40 - bound
    gate.set()
    urls = await asyncio.gather(*tasks)
    assert Counter(urls) == {hot.url: bound, pool.replicas[1].url: 40 - bound}
    # Every scope closed: its pin was released.
    assert [r.active for r in pool.replicas] == [0, 0]


async def test_bounded_loads_hold_for_any_mix_of_keys(make_pool) -> None:
    pool = make_pool(URLS[:2])
    tasks, gate = await _hold_scopes(pool, [f"mixed-{i}" for i in range(40)])
    assert max(r.active for r in pool.replicas) <= math.ceil(1.25 * 40 / 2)
    gate.set()
    await asyncio.gather(*tasks)
    assert [r.active for r in pool.replicas] == [0, 0]


async def test_a_pin_keeps_every_call_of_a_request_on_one_replica(make_pool) -> None:
    pool = make_pool()
    with request_routing("conversation-1") as scope:
        first = await pool.call(serve_url)
        pinned = scope.pins["engine"]
        assert pinned.url == first and pinned.active == 1
        # Load piled onto the pinned replica by other requests does not move this one.
        pinned.active += 50
        assert [await pool.call(serve_url) for _ in range(5)] == [first] * 5
        pinned.active -= 50
        assert sorted(r.active for r in pool.replicas) == [0, 0, 1]
    assert [r.active for r in pool.replicas] == [0, 0, 0]
    assert scope.pins == {}


async def test_pools_pin_independently_within_one_request(make_pool) -> None:
    engine, rewards = make_pool(), make_pool(name="rewards")
    with request_routing("conversation-2") as scope:
        await engine.call(serve_url)
        await rewards.call(serve_url)
        assert set(scope.pins) == {"engine", "rewards"}
        assert sum(r.active for r in engine.replicas) == 1
        assert sum(r.active for r in rewards.replicas) == 1
    assert sum(r.active for r in engine.replicas + rewards.replicas) == 0


async def test_a_failed_call_moves_the_pin_to_the_replica_that_served_it(make_pool) -> None:
    pool = make_pool()
    failed: list[str] = []

    async def fails_first(replica: Replica, headers: dict[str, str]) -> str:
        if not failed:
            failed.append(replica.url)
            raise ReplicaFailure(f"{replica.url} answered 503")
        return replica.url

    with request_routing("conversation-3") as scope:
        served = await pool.call(fails_first)
        assert served != failed[0]
        assert scope.pins["engine"].url == served
        by_url = {r.url: r for r in pool.replicas}
        assert by_url[failed[0]].active == 0 and by_url[served].active == 1
        # The next call goes where the prefix cache is warm now, not back to the first.
        assert await pool.call(serve_url) == served
    assert [r.active for r in pool.replicas] == [0, 0, 0]


async def test_calls_outside_a_request_are_not_pinned(make_pool) -> None:
    pool = make_pool()
    assert current_routing() is None
    urls = [await pool.call(serve_url) for _ in range(6)]
    assert set(urls) == set(URLS)  # no key: spread, not stuck on one replica
    assert [r.active for r in pool.replicas] == [0, 0, 0]


async def test_round_robin_rotates_per_call_even_within_a_request(make_pool) -> None:
    pool = make_pool(routing="round_robin")
    with request_routing("conversation-4") as scope:
        urls = [await pool.call(serve_url) for _ in range(6)]
        assert scope.pins == {}
    assert urls[:3] == urls[3:] and sorted(urls[:3]) == sorted(URLS)
    assert [r.active for r in pool.replicas] == [0, 0, 0]


# --- headers ------------------------------------------------------------------------------


def test_headers_carry_the_session_key_and_a_request_id_per_call() -> None:
    pool = ReplicaPool("engine", URLS)
    with request_routing("conversation-5"):
        _, first = chosen(pool)
        _, second = chosen(pool)
    assert first["X-Session-ID"] == second["X-Session-ID"] == "conversation-5"
    assert first["X-Request-Id"].startswith("conversation-5-")
    assert second["X-Request-Id"].startswith("conversation-5-")
    assert first["X-Request-Id"] != second["X-Request-Id"]


def test_the_session_header_name_is_configurable_or_off() -> None:
    with request_routing("conversation-6"):
        _, renamed = chosen(ReplicaPool("engine", URLS, session_header="X-Affinity"))
        _, off = chosen(ReplicaPool("engine", URLS, session_header=None))
    assert renamed["X-Affinity"] == "conversation-6" and "X-Session-ID" not in renamed
    assert set(off) == {"X-Request-Id"}


def test_a_call_outside_a_request_gets_a_session_of_its_own() -> None:
    pool = ReplicaPool("engine", URLS)
    _, first = chosen(pool)
    _, second = chosen(pool)
    assert first["X-Session-ID"] != second["X-Session-ID"]
    assert first["X-Request-Id"].startswith(first["X-Session-ID"] + "-")


def test_a_session_key_that_is_not_ascii_is_sent_as_a_stable_digest() -> None:
    pool = ReplicaPool("engine", URLS)
    sent = []
    for key in ("café ☕", "café ☕", "two\nlines"):
        with request_routing(key):
            sent.append(chosen(pool)[1])
    assert sent[0]["X-Session-ID"] == sent[1]["X-Session-ID"] != sent[2]["X-Session-ID"]
    for headers in sent:
        assert headers["X-Session-ID"].isascii() and headers["X-Session-ID"].isprintable()
        httpx.Request("POST", "http://replica-a:8000/v1/completions", headers=headers)


def test_every_attempt_keeps_the_session_but_gets_its_own_request_id() -> None:
    pool = ReplicaPool("engine", URLS, retries=2)
    with request_routing("conversation-7"):
        attempts = list(pool.attempts())
    assert len(attempts) == 3
    assert len({r.url for r, _ in attempts}) == 3  # each retry on another replica
    assert {headers["X-Session-ID"] for _, headers in attempts} == {"conversation-7"}
    # A retry may come back to a replica still holding an earlier attempt's id.
    assert len({headers["X-Request-Id"] for _, headers in attempts}) == 3


# --- retries and failures -----------------------------------------------------------------


async def test_a_retry_goes_to_another_replica_after_a_backoff(make_pool, sleeps) -> None:
    pool = make_pool(backoff_seconds=0.2, retries=2)
    tried: list[str] = []

    async def fails_twice(replica: Replica, headers: dict[str, str]) -> str:
        tried.append(replica.url)
        if len(tried) < 3:
            raise ReplicaFailure(f"{replica.url} answered 500")
        return replica.url

    with request_routing("conversation-8"):
        assert await pool.call(fails_twice) == tried[-1]
    assert len(set(tried)) == 3
    assert sleeps == [0.2, 0.4]  # exponential backoff before each retry
    by_url = {r.url: r for r in pool.replicas}
    assert [by_url[u].errors for u in tried] == [1, 1, 0]
    assert [by_url[u].retries for u in tried] == [1, 1, 0]
    assert [by_url[u].requests for u in tried] == [1, 1, 1]
    # Not "down" failures: nothing left the rotation.
    assert all(r.healthy for r in pool.replicas)


@pytest.mark.parametrize(("retries", "attempts"), [(0, 1), (1, 2), (2, 3), (4, 5)])
async def test_retries_are_bounded_and_the_error_names_the_pool(
    make_pool, sleeps, retries: int, attempts: int
) -> None:
    pool = make_pool(name="rewards-fleet", retries=retries)
    tried: list[str] = []

    async def always_fails(replica: Replica, headers: dict[str, str]) -> str:
        tried.append(replica.url)
        raise ReplicaFailure(f"{replica.url} answered 502 (attempt {len(tried)})")

    with pytest.raises(ReplicasExhausted) as caught:
        await pool.call(always_fails)
    assert len(tried) == attempts
    message = str(caught.value)
    assert "rewards-fleet" in message
    assert f"after {attempts} attempt{'s' if attempts > 1 else ''} " in message
    assert f"{tried[-1]} answered 502 (attempt {attempts})" in message
    # The last attempt is not counted as retried: nothing came after it.
    assert sum(r.retries for r in pool.replicas) == attempts - 1
    assert sum(r.errors for r in pool.replicas) == attempts
    assert sleeps == [0.0] * (attempts - 1)


async def test_other_errors_propagate_without_a_retry(make_pool) -> None:
    pool = make_pool(retries=2)
    tried: list[str] = []

    async def refuses(replica: Replica, headers: dict[str, str]) -> str:
        tried.append(replica.url)
        raise ValueError("the request itself is invalid")

    with pytest.raises(ValueError, match="invalid"):
        await pool.call(refuses)
    assert len(tried) == 1
    assert sum(r.errors for r in pool.replicas) == 0


async def test_a_down_replica_leaves_the_rotation_at_once(make_pool) -> None:
    pool = make_pool(retries=1)
    with request_routing("conversation-9"):
        gone = chosen(pool)[0]

    async def first_is_gone(replica: Replica, headers: dict[str, str]) -> str:
        if replica is gone:
            raise ReplicaFailure(f"{replica.url}: ConnectError", down=True)
        return replica.url

    with request_routing("conversation-9"):
        assert await pool.call(first_is_gone) != gone.url
    assert not gone.healthy and gone.last_error.endswith("ConnectError")
    assert pool.healthy_count == 2
    # No later call is sent there while others are healthy, pinned or not.
    for key in KEYS[:100]:
        with request_routing(key):
            assert chosen(pool)[0] is not gone


async def test_with_every_replica_out_the_calls_still_try_them(make_pool) -> None:
    pool = make_pool(retries=1)
    for replica in pool.replicas:
        replica.healthy = False
    with request_routing("conversation-10"):
        assert await pool.call(serve_url) in URLS


class HungReplica:
    """Attempts that never finish on ``hung`` (until cancelled) and serve elsewhere."""

    def __init__(self, hung: Replica) -> None:
        self.hung = hung
        self.waiting = asyncio.Event()
        self.cancelled = 0

    async def _hang(self) -> None:
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def call(self, replica: Replica, headers: dict[str, str]) -> str:
        if replica is self.hung:
            await self._hang()
        return replica.url

    async def stream(self, replica: Replica, headers: dict[str, str]) -> AsyncIterator[str]:
        if replica is self.hung:
            await self._hang()
        for part in ("a", "b"):
            yield f"{replica.url}/{part}"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_call_waiting_on_a_replica_that_leaves_the_rotation_moves_on(
    make_pool, streamed: bool
) -> None:
    # What the health loop does to a replica that hangs: the calls it holds must not wait
    # for a read timeout sized for long generations.
    pool = make_pool(retries=1)
    with request_routing("hung-1"):
        hung = HungReplica(chosen(pool)[0])
    with request_routing("hung-1"):
        if streamed:
            task = asyncio.create_task(collect_stream(pool.stream(hung.stream)))
        else:
            task = asyncio.create_task(pool.call(hung.call))
        await asyncio.wait_for(hung.waiting.wait(), 5)
        await asyncio.sleep(0.05)
        assert not task.done()
        hung.hung.healthy = False
        served = await asyncio.wait_for(task, 5)
    other = [r.url for r in pool.replicas if r is not hung.hung]
    if streamed:
        assert served[0].rsplit("/", 1)[0] in other and len(served) == 2
    else:
        assert served in other
    assert hung.cancelled == 1  # the hung attempt was closed, not left running
    assert hung.hung.errors == 1 and hung.hung.retries == 1
    assert "left the rotation while the call waited" in hung.hung.last_error


async def test_a_stream_already_under_way_is_not_cut_when_its_replica_leaves(make_pool) -> None:
    pool = make_pool(retries=1)
    with request_routing("under-way"):
        replica = chosen(pool)[0]
        released = asyncio.Event()

        async def slow_second_item(replica: Replica, headers: dict[str, str]):
            yield "first"
            await released.wait()
            yield "second"

        items = pool.stream(slow_second_item)
        assert await anext(items) == "first"
        replica.healthy = False  # output has gone out: no other replica can continue it
        released.set()
        assert [item async for item in items] == ["second"]
    assert replica.errors == 0


async def test_cancelling_a_call_cancels_its_attempt(make_pool) -> None:
    pool = make_pool()
    with request_routing("cancelled"):
        hung = HungReplica(chosen(pool)[0])
        task = asyncio.create_task(pool.call(hung.call))
        await asyncio.wait_for(hung.waiting.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hung.cancelled == 1
    assert hung.hung.healthy and hung.hung.errors == 0


async def collect_stream(items: AsyncIterator[str]) -> list[str]:
    return [item async for item in items]


def test_transport_errors_that_mean_the_server_is_gone() -> None:
    request = httpx.Request("POST", "http://replica-a:8000/v1/completions")
    gone = [
        httpx.ConnectError("refused", request=request),
        httpx.RemoteProtocolError("peer closed connection", request=request),
        httpx.ReadError("reset", request=request),
    ]
    slow = [httpx.ReadTimeout("", request=request), httpx.ConnectTimeout("", request=request)]
    for exc in gone:
        failure = transport_failure("http://replica-a:8000", exc)
        assert failure.down and str(failure).startswith("http://replica-a:8000: ")
    for exc in slow:
        assert not transport_failure("http://replica-a:8000", exc).down
    assert str(transport_failure("http://a", slow[0])) == "http://a: ReadTimeout"
    assert [is_retryable_status(s) for s in (500, 502, 503, 429, 400, 404, 422)] == [
        True, True, True, True, False, False, False,
    ]  # fmt: skip


def test_pool_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="no replica URLs"):
        ReplicaPool("engine", [])
    with pytest.raises(ValueError, match="listed twice"):
        ReplicaPool("engine", [URLS[0], URLS[0]])
    with pytest.raises(ValueError, match="balance_factor"):
        ReplicaPool("engine", URLS, balance_factor=0.9)
    pool = ReplicaPool("engine", ["http://replica-a:8000/"])
    assert pool.replicas[0].url == "http://replica-a:8000"
    assert pool.snapshot() == [
        {
            "url": "http://replica-a:8000",
            "healthy": True,
            "requests": 0,
            "errors": 0,
            "retries": 0,
            "active_requests": 0,
            "last_error": "",
        }
    ]


# --- upstream time accounting ------------------------------------------------------------


async def test_upstream_time_counts_overlapping_calls_once(make_pool) -> None:
    pool = make_pool()

    async def slow(replica: Replica, headers: dict[str, str]) -> str:
        await asyncio.sleep(0.1)
        return replica.url

    with request_routing("conversation-11") as scope:
        await asyncio.gather(pool.call(slow), pool.call(slow))
        upstream = scope.upstream_seconds
        overhead = scope.overhead_seconds()
    assert 0.1 <= upstream < 0.19
    assert 0 <= overhead < 0.1


# --- health checks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[str, dict[str, int]]]:
    """A server whose ``/<name>/health`` answers the status set for ``name`` (200 unset).

    A name listed under :data:`SLOW_REPLICA` answers after a second instead.
    """
    statuses: dict[str, int] = {}
    app = FastAPI()

    @app.get("/{name}/health")
    async def health(name: str) -> Response:
        if statuses.get(name) == SLOW_REPLICA:
            await asyncio.sleep(1.0)
            return Response(status_code=200)
        return Response(status_code=statuses.get(name, 200))

    with serve_in_thread(app, startup_timeout=30) as running:
        yield running.base_url, statuses


#: A ``health_server`` status meaning "answer 200, but only after a second".
SLOW_REPLICA = -1


async def test_the_health_loop_brings_a_down_replica_back(make_pool, health_server) -> None:
    base, statuses = health_server
    statuses.clear()
    urls = [f"{base}/r0", f"{base}/r1"]
    statuses["r0"] = 503  # still restarting
    pool = make_pool(urls, health_interval=0.05, retries=1)
    r0 = pool.replicas[0]

    async def r0_is_gone(replica: Replica, headers: dict[str, str]) -> str:
        if replica is r0:
            raise ReplicaFailure(f"{replica.url}: RemoteProtocolError", down=True)
        return replica.url

    for key in KEYS:  # a request routed to r0 first
        if rendezvous_rank(key, pool.replicas)[0] is r0:
            break
    with request_routing(key):
        assert await pool.call(r0_is_gone) == urls[1]
    assert not r0.healthy
    await asyncio.sleep(0.2)  # several health rounds while r0 answers 503
    assert not r0.healthy and pool.replicas[1].healthy
    statuses["r0"] = 200
    await wait_until(lambda: r0.healthy, timeout=5)
    with request_routing(key):
        assert await pool.call(serve_url) == urls[0]


async def test_the_health_loop_evicts_failing_and_unreachable_replicas(
    make_pool, health_server
) -> None:
    from tests.fake_vllm_server import refused_url

    base, statuses = health_server
    statuses.clear()
    statuses["r1"] = 500
    pool = make_pool([f"{base}/r0", f"{base}/r1", refused_url()], health_interval=0.05)
    await pool.call(serve_url)  # the first call starts the health loop
    await wait_until(lambda: pool.healthy_count == 1, timeout=5)
    assert [r.healthy for r in pool.replicas] == [True, False, False]
    assert pool.replicas[1].last_error == "health 500"
    assert pool.replicas[2].last_error == "health check: ConnectError"
    await pool.close()
    assert pool._health_task is not None and pool._health_task.done()


async def test_a_replica_whose_health_check_times_out_leaves_only_after_three_misses(
    make_pool, health_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loaded replica answers its health route late but still serves; one late answer
    # must not take it out of the rotation (and move every request pinned to it).
    monkeypatch.setattr(replicas, "HEALTH_TIMEOUT_SECONDS", 0.1)
    base, statuses = health_server
    statuses.clear()
    pool = make_pool([f"{base}/r0", f"{base}/r1"])
    slow, steady = pool.replicas
    statuses["r0"] = SLOW_REPLICA
    await pool.check_health()
    statuses.pop("r0")
    await pool.check_health()  # an answer in time clears the misses
    assert slow.healthy and slow.health_misses == 0
    statuses["r0"] = SLOW_REPLICA
    for misses in (1, 2):
        await pool.check_health()
        assert slow.healthy and slow.health_misses == misses
    await pool.check_health()
    assert not slow.healthy and steady.healthy
    assert slow.last_error == "health check: ReadTimeout 3 times in a row"
    await pool.check_health()  # still late: stays out
    assert not slow.healthy
    statuses.pop("r0")
    await pool.check_health()
    assert slow.healthy and slow.health_misses == 0


async def test_health_checks_can_start_before_any_call(make_pool, health_server) -> None:
    base, statuses = health_server
    statuses.clear()
    statuses["r0"] = 503
    pool = make_pool([f"{base}/r0", f"{base}/r1"], health_interval=0.05)
    pool.start_health_checks()
    pool.start_health_checks()  # idempotent: still one loop
    await wait_until(lambda: not pool.replicas[0].healthy, timeout=5)
    assert pool.replicas[1].healthy
