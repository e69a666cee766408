"""The gateway over two real vLLM servers: affinity, balance, failover and rejoin.

Runs only under ``--fleet`` (``./run test`` runs that suite after the main one). The
replicas' own ``/metrics`` counters are the evidence, not the gateway's bookkeeping.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.fleet import VllmReplica
from tests.servers import RunningServer

pytestmark = [pytest.mark.real_engine, pytest.mark.fleet_only]

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Name three colors."}]
TPO_DEPTH = 2
TPO_REQUEST: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Describe the sea in one short sentence."}],
    "max_tokens": 32,
    "seed": 3,
    "extra_body": {
        "strategy": "tpo",
        "strategy_config": {
            "depth": TPO_DEPTH,
            "width": 3,
            "max_tokens": {"loss": 32, "gradient": 32},
        },
        "reward": "rules",
        "constraints": [{"type": "word_count", "max": 30}],
    },
}


def client_for(server: RunningServer, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, **options)


def finished(replicas: list[VllmReplica]) -> list[float]:
    """Each replica's finished requests, once no call of an earlier test is left on them
    (a slow float32 replica may still be finishing one when a test starts)."""
    wait_for(
        lambda: all(r.unfinished_requests() == 0 for r in replicas),
        120,
        "replicas idle",
        lambda: f"unfinished {[r.unfinished_requests() for r in replicas]}",
    )
    return [r.finished_requests() for r in replicas]


def replica_health(server: RunningServer) -> list[bool]:
    body = httpx.get(f"{server.base_url}/health", timeout=10).json()
    return [r["healthy"] for r in body["engine"]["replicas"]]


def wait_for(predicate, timeout: float, what: str, state=lambda: "") -> None:
    """Poll ``predicate`` until it holds; on timeout, fail with ``what`` and ``state()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s {state()}"
        time.sleep(0.2)


def test_every_engine_call_of_a_tpo_request_reaches_one_replica(
    real_server: RunningServer, policy_replicas: list[VllmReplica]
) -> None:
    before = finished(policy_replicas)
    hits_before = [r.metric("vllm:prefix_cache_hits_total") for r in policy_replicas]
    response = client_for(real_server).chat.completions.create(**TPO_REQUEST)
    calls = response.model_extra["alignment"]["engine_calls"]
    assert calls == 1 + 3 * TPO_DEPTH
    served = [a - b for a, b in zip(finished(policy_replicas), before, strict=True)]
    # One replica finished every call (vLLM counts each of a call's n samples); the other
    # saw none of them.
    assert sorted(served)[0] == 0, served
    assert sorted(served)[1] >= calls, served
    chosen = served.index(max(served))
    hits = policy_replicas[chosen].metric("vllm:prefix_cache_hits_total")
    assert hits > hits_before[chosen], "TPO's later rounds should reuse the cached prefix"


def test_forty_requests_spread_over_both_replicas(
    serve_on_real_engine, policy_replicas: list[VllmReplica]
) -> None:
    before = finished(policy_replicas)
    with serve_on_real_engine(max_concurrent_requests=64) as server:
        client = client_for(server)

        def ask(i: int) -> str:
            answer = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=16,
                extra_body={"ignore_eos": True},
            )
            return answer.choices[0].finish_reason

        with ThreadPoolExecutor(40) as pool:
            reasons = list(pool.map(ask, range(40)))
    assert reasons == ["length"] * 40
    served = [a - b for a, b in zip(finished(policy_replicas), before, strict=True)]
    assert sum(served) == 40
    assert all(14 <= count <= 26 for count in served), f"40 requests split {served}"


def ask(client: openai.OpenAI, i: int, max_tokens: int = 320) -> int:
    """One non-streamed chat request's status (nothing reaches the client until the end).

    The default is long (320 tokens) because a loaded replica's ``/metrics`` can take
    seconds to answer: shorter requests could finish between two polls of it.
    """
    answer = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Tell story number {i}."}],
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
    )
    answer.parse()
    return answer.status_code


def gateway_view(server: RunningServer, field: str) -> list[Any]:
    """``field`` of each engine replica, as the gateway's ``/health`` reports it."""
    body = httpx.get(f"{server.base_url}/health", timeout=10).json()
    return [r[field] for r in body["engine"]["replicas"]]


def start_requests_running_on(
    client: openai.OpenAI, watched: VllmReplica, pool: ThreadPoolExecutor
) -> list[Future]:
    """Send batches of eight long requests until ``watched`` is seen generating one.

    Whether a poll catches a replica mid-generation depends on the CPU: a fast one (bf16 on
    AMX) can finish a batch between two polls of a loaded replica's ``/metrics``. A batch
    that ends unseen is followed by one twice as long, so the wait adapts to the machine.
    """
    max_tokens = 320
    for attempt in range(4):
        running = [pool.submit(ask, client, 1000 * attempt + i, max_tokens) for i in range(8)]
        while not all(f.done() for f in running):
            if watched.metric("vllm:num_requests_running") > 0:
                return running
            time.sleep(0.1)
        assert [f.result() for f in running] == [200] * 8
        max_tokens *= 2
    pytest.fail(f"four batches of requests ended before {watched.url} was seen generating")


def test_killed_replica_fails_over_and_rejoins_after_restart(
    real_server: RunningServer, serve_on_real_engine, policy_replicas: list[VllmReplica]
) -> None:
    victim, survivor = policy_replicas
    with serve_on_real_engine(max_concurrent_requests=64) as server:
        client = client_for(server, timeout=300)
        retried_before = gateway_view(server, "retries")[0]
        survivor_before = survivor.finished_requests()
        with ThreadPoolExecutor(16) as pool:
            running = start_requests_running_on(client, victim, pool)
            victim.kill()
            after = [pool.submit(ask, client, 100 + i, 8) for i in range(8)]
            assert [f.result() for f in running] == [200] * 8
            assert [f.result() for f in after] == [200] * 8
        # Calls that failed on the victim (cut, or refused before the gateway evicted it)
        # were retried; the survivor finished at least every request sent after the kill.
        assert gateway_view(server, "retries")[0] > retried_before
        assert survivor.finished_requests() - survivor_before >= 8

        wait_for(lambda: replica_health(real_server) == [False, True], 10, "victim evicted")
        victim.launch()
        victim.wait_ready()
        wait_for(lambda: replica_health(real_server) == [True, True], 30, "victim rejoined")
        rejoined_before = victim.finished_requests()
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda i: ask(client, 200 + i, 8), range(10)))
        assert statuses == [200] * 10
        assert victim.finished_requests() > rejoined_before, (
            "no request reached the rejoined replica"
        )
