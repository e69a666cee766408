"""The vLLM pooling reward client over several replicas: balancing, retries, health checks.

Fake pooling servers (tiny FastAPI apps answering ``/classify`` in vLLM's shape and
``/health``) stand in for ``vllm serve --runner pooling``; one test at the end uses the real
one beside a dead URL.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ttalign.benchmarks.processes import free_port
from ttalign.engine.routing import request_routing
from ttalign.reward_clients import rendering
from ttalign.reward_clients.backend import BackendSettings
from ttalign.reward_clients.base import RewardClientError, RewardUnavailable
from ttalign.reward_clients.config import (
    RewardConfigError,
    VllmPoolingConfig,
    load_reward_registry,
    read_reward_config,
)
from ttalign.reward_clients.vllm_pooling import VllmPoolingReward

from tests import servers
from tests.servers import RunningServer, serve_in_thread, wait_until

CHAT = [{"role": "user", "content": "Name a prime number."}]
FAST = BackendSettings(timeout_seconds=10, max_retries=1, backoff_seconds=0.001, batch_window_ms=0)


class FakePooling:
    """A stand-in for a pooling server; a reply's score is its length.

    ``classify_status`` and ``health_status`` script its answers; it counts the
    ``/classify`` calls it served and those it turned away, and records the session
    header of each.
    """

    def __init__(self) -> None:
        self.classify_status = 200
        self.health_status = 200
        #: Seconds each /classify call waits before answering.
        self.delay = 0.0
        self.served = 0
        self.turned_away = 0
        self.sessions: list[str | None] = []
        self.app = FastAPI()
        self.app.post("/classify")(self._classify)
        self.app.get("/health")(self._health)

    async def _classify(self, request: Request) -> JSONResponse:
        self.sessions.append(request.headers.get("x-session-id"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.classify_status != 200:
            self.turned_away += 1
            return JSONResponse({"error": "scripted"}, status_code=self.classify_status)
        body = await request.json()
        if "messages" in body:
            lengths = [len(body["messages"][-1]["content"])]
        else:
            lengths = [len(ids) for ids in body["input"]]
        self.served += 1
        # Listed in reverse: the client must order the data by index.
        data = [{"index": i, "probs": [float(n), -1.0]} for i, n in enumerate(lengths)]
        return JSONResponse({"object": "list", "data": data[::-1]})

    async def _health(self) -> JSONResponse:
        return JSONResponse({}, status_code=self.health_status)


@contextmanager
def serve_on(fake: FakePooling, port: int | None = None) -> Iterator[RunningServer]:
    """Serve ``fake`` until the block exits, on ``port`` if given (to restart it there)."""
    with pytest.MonkeyPatch.context() as patch:
        if port is not None:
            patch.setattr(servers, "free_port", lambda: port)
        with serve_in_thread(fake.app) as running:
            patch.undo()
            yield running


@pytest.fixture
def fleet() -> Iterator[tuple[list[FakePooling], list[RunningServer], ExitStack]]:
    """Two fake pooling servers; the exit stack stops them (tests may stop one earlier)."""
    fakes = [FakePooling(), FakePooling()]
    with ExitStack() as stack:
        running = [stack.enter_context(serve_on(f)) for f in fakes]
        yield fakes, running, stack


def pooled(urls: list[str], **options: Any) -> VllmPoolingReward:
    return VllmPoolingReward("rm", urls=urls, settings=FAST, **options)


def urls_of(running: list[RunningServer]) -> list[str]:
    return [r.base_url for r in running]


def replica(client: VllmPoolingReward, url: str) -> dict[str, Any]:
    (state,) = [s for s in client.pool.snapshot() if s["url"] == url]
    return state


# --- balancing ---------------------------------------------------------------------------


async def test_calls_outside_a_request_rotate_over_the_replicas(fleet) -> None:
    fakes, running, _ = fleet
    client = pooled(urls_of(running))
    try:
        scores = [await client.score(CHAT, ["x" * n]) for n in range(1, 11)]
    finally:
        await client.close()
    assert scores == [[float(n)] for n in range(1, 11)]
    assert [f.served for f in fakes] == [5, 5]


async def test_every_call_of_one_request_reaches_one_replica(fleet) -> None:
    fakes, running, _ = fleet
    client = pooled(urls_of(running))
    used = set()
    try:
        for request in range(24):
            before = [f.served for f in fakes]
            with request_routing(f"request-{request}"):
                for _ in range(3):
                    assert await client.score(CHAT, ["ab", "abcd"]) == [2.0, 4.0]
            served = [f.served - b for f, b in zip(fakes, before, strict=True)]
            assert sorted(served) == [0, 6], served
            used.add(served.index(6))
            # The request's key travels as the session header (for routers and logs).
            assert fakes[served.index(6)].sessions[-1] == f"request-{request}"
    finally:
        await client.close()
    assert used == {0, 1}, "rendezvous hashing sent every request to one replica"
    assert [s["active_requests"] for s in client.pool.snapshot()] == [0, 0]


async def test_a_caller_leaving_inside_the_batch_window_leaves_no_pin_behind(fleet) -> None:
    _, running, _ = fleet
    windowed = BackendSettings(timeout_seconds=10, max_retries=0, batch_window_ms=200)
    client = VllmPoolingReward("rm", urls=urls_of(running), settings=windowed)

    async def leaving() -> None:
        with request_routing("leaves"):
            await client.score(CHAT, ["abc"])

    try:
        first = asyncio.ensure_future(leaving())  # opens the window, in its request's scope
        await asyncio.sleep(0.05)
        first.cancel()  # the client disconnects: its scope closes before the flush
        await asyncio.gather(first, return_exceptions=True)
        with request_routing("stays"):
            assert await client.score(CHAT, ["ab"]) == [2.0]  # flushed by the first's timer
        assert [s["active_requests"] for s in client.pool.snapshot()] == [0, 0]
    finally:
        await client.close()


async def test_token_id_batches_go_through_the_pool(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tokenizer:
        def apply_chat_template(self, messages: list[dict[str, str]], **options: Any) -> Any:
            return {"input_ids": list(range(len(messages[-1]["content"])))}

    monkeypatch.setattr(rendering, "load_tokenizer", lambda path: Tokenizer())
    fakes, running, _ = fleet
    client = pooled(urls_of(running), tokenizer="/unused")
    try:
        assert await client.score(CHAT, ["a", "abc", "ab"]) == [1.0, 3.0, 2.0]
        assert await client.score(CHAT, ["abcd"]) == [4.0]
    finally:
        await client.close()
    assert [f.served for f in fakes] == [1, 1]


# --- failures ----------------------------------------------------------------------------


async def test_a_replica_answering_503_is_passed_over(fleet) -> None:
    fakes, running, _ = fleet
    fakes[0].classify_status = 503
    client = pooled(urls_of(running))
    try:
        scores = [await client.score(CHAT, ["x" * n]) for n in range(1, 7)]
    finally:
        await client.close()
    assert scores == [[float(n)] for n in range(1, 7)]
    assert fakes[0].served == 0 and fakes[0].turned_away > 0
    assert fakes[1].served == 6
    busy = replica(client, running[0].base_url)
    # A 503 is the server's answer, not its absence: it stays in the rotation.
    assert busy["healthy"] and busy["errors"] == fakes[0].turned_away
    assert busy["retries"] == busy["errors"]


async def test_a_stopped_replica_leaves_the_rotation_and_rejoins(fleet) -> None:
    fakes, running, _ = fleet
    first = running[0]
    client = pooled(urls_of(running), health_check_interval=0.1)
    port = first.port
    try:
        assert await client.score(CHAT, ["ab"]) == [2.0]
        assert await client.score(CHAT, ["abc"]) == [3.0]
        assert [f.served for f in fakes] == [1, 1]
        # Stop the first server (the fixture's exit stack then finds it stopped).
        first.server.should_exit = True
        first.thread.join(timeout=30)
        scores = [await client.score(CHAT, ["x" * n]) for n in range(1, 7)]
        assert scores == [[float(n)] for n in range(1, 7)]
        assert fakes[1].served == 7
        gone = replica(client, first.base_url)
        assert not gone["healthy"]
        # Out of the rotation, it is not even tried any more.
        errors = gone["errors"]
        for _ in range(4):
            await client.score(CHAT, ["ab"])
        assert replica(client, first.base_url)["errors"] == errors
        with serve_on(fakes[0], port):
            await wait_until(lambda: replica(client, first.base_url)["healthy"], timeout=10)
            for _ in range(4):
                assert await client.score(CHAT, ["ab"]) == [2.0]
            assert fakes[0].served == 1 + 2
    finally:
        await client.close()


@pytest.mark.parametrize("how", ["stopped", "503"])
async def test_all_replicas_down_raises_the_backend_error(fleet, how: str) -> None:
    fakes, running, _ = fleet
    if how == "stopped":
        urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    else:
        urls = urls_of(running)
        for fake in fakes:
            fake.classify_status = 503
    client = pooled(urls)
    try:
        with pytest.raises(RewardUnavailable) as raised:
            await client.score(CHAT, ["ab"])
    finally:
        await client.close()
    assert "reward:rm" in str(raised.value)
    attempts = FAST.max_retries + 1
    assert f"after {attempts} attempts" in str(raised.value)
    states = client.pool.snapshot()
    # One owner of the policy: the pool's attempts, alternating replicas, and no more.
    assert sum(s["errors"] for s in states) == attempts
    assert sorted(s["errors"] for s in states) == [attempts // 2, attempts - attempts // 2]
    assert all(s["healthy"] == (how == "503") for s in states)


async def test_a_refusal_is_not_retried_on_another_replica(fleet) -> None:
    fakes, running, _ = fleet
    fakes[0].classify_status = 400
    client = pooled(urls_of(running))
    try:
        with pytest.raises(RewardClientError) as raised:
            await client.score(CHAT, ["ab"])
    finally:
        await client.close()
    assert not isinstance(raised.value, RewardUnavailable)
    assert "400" in str(raised.value)
    assert fakes[0].turned_away == 1 and fakes[1].served == 0


async def test_close_stops_the_health_loop(fleet) -> None:
    _, running, _ = fleet
    client = pooled(urls_of(running), health_check_interval=0.05)
    await client.score(CHAT, ["ab"])
    name = f"health-{client.pool.name}"
    assert any(t.get_name() == name and not t.done() for t in asyncio.all_tasks())
    await client.close()
    assert not any(t.get_name() == name and not t.done() for t in asyncio.all_tasks())


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "servers_given",
    [
        {"url": "http://a:8000", "urls": ["http://b:8000"]},
        {},
        {"urls": []},
        {"urls": ["http://a:8000", "http://a:8000/"]},
    ],
    ids=["both", "neither", "empty", "twice"],
)
def test_config_needs_exactly_one_way_to_the_servers(servers_given: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r"url"):
        VllmPoolingConfig.model_validate({"type": "vllm_pooling", **servers_given})


def test_config_file_with_both_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "rewards.json"
    spec = {"type": "vllm_pooling", "url": "http://a:1", "urls": ["http://b:1"]}
    path.write_text(json.dumps({"clients": {"rm": spec}}))
    with pytest.raises(RewardConfigError, match="exactly one of url and urls"):
        read_reward_config(path)


def test_client_needs_exactly_one_way_to_the_servers() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        VllmPoolingReward("rm")
    with pytest.raises(ValueError, match="exactly one"):
        VllmPoolingReward("rm", url="http://a:1", urls=["http://b:1"])


async def test_the_registry_builds_pools_and_lists_them(tmp_path: Path) -> None:
    path = tmp_path / "rewards.json"
    clients = {
        "fleet": {
            "type": "vllm_pooling",
            "urls": ["http://a:1", "http://b:1/"],
            "health_check_interval": 2.5,
            "max_retries": 5,
            "backoff_seconds": 0.05,
        },
        "single": {"type": "vllm_pooling", "url": "http://c:1"},
        "mix": {"type": "composite", "components": {"fleet": 1, "rules": 1}},
    }
    path.write_text(json.dumps({"clients": clients}))
    registry = load_reward_registry(path, None)
    try:
        pools = registry.replica_pools()
        assert [p.name for p in pools] == ["reward:fleet", "reward:single"]
        fleet_pool, single_pool = pools
        assert [r.url for r in fleet_pool.replicas] == ["http://a:1", "http://b:1"]
        assert fleet_pool.health_interval == 2.5
        assert fleet_pool.backoff_seconds == 0.05
        # The pool owns the retry policy, one URL or several.
        assert fleet_pool.retries == 5 and single_pool.retries == 2
        assert registry.get("fleet").pool is fleet_pool  # type: ignore[attr-defined]
    finally:
        await registry.close()


def test_the_retired_replica_retries_setting_is_refused_with_its_replacement(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rewards.json"
    clients = {"rm": {"type": "vllm_pooling", "url": "http://a:1", "replica_retries": 1}}
    path.write_text(json.dumps({"clients": clients}))
    with pytest.raises(RewardConfigError, match="replica_retries is gone: max_retries"):
        load_reward_registry(path, None)


async def test_a_replica_that_never_answers_costs_one_attempt_timeout(fleet) -> None:
    fakes, running, _ = fleet
    fakes[0].delay = 3  # accepts the call, answers long after the attempt's timeout
    settings = BackendSettings(timeout_seconds=0.5, max_retries=1, backoff_seconds=0.0)
    client = VllmPoolingReward("rm", urls=urls_of(running), settings=settings)
    try:
        started = time.monotonic()
        for _ in range(2):  # whichever replica a call starts on, it ends on the other
            assert await client.score(CHAT, ["ab"]) == [2.0]
        assert time.monotonic() - started < 2 * 0.5 + 1.0
    finally:
        await client.close()


# --- the real pooling server -------------------------------------------------------------


@pytest.mark.real_engine
async def test_real_pooling_server_beside_a_dead_replica(pooling_server: str) -> None:
    candidates = ["Seven.", "Two is the only even prime.", "Nine, I think."]
    settings = BackendSettings(timeout_seconds=60)
    dead = f"http://127.0.0.1:{free_port()}"
    single = VllmPoolingReward("single", url=pooling_server, model="test-rm", settings=settings)
    pair = VllmPoolingReward(
        "pair", urls=[dead, pooling_server], model="test-rm", settings=settings
    )
    try:
        expected = await single.score(CHAT, candidates)
        together = await pair.score(CHAT, candidates)
        one_by_one = [(await pair.score(CHAT, [c]))[0] for c in candidates]
    finally:
        await single.close()
        await pair.close()
    assert together == pytest.approx(expected, abs=1e-5)
    assert one_by_one == pytest.approx(expected, abs=1e-5)
    gone, live = pair.pool.snapshot()
    assert not gone["healthy"] and gone["errors"] >= 1
    assert live["healthy"] and live["errors"] == 0
    assert live["requests"] == 2 * len(candidates)
