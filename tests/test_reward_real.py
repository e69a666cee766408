"""Reward clients against real backends: a vLLM pooling server, transformers, the real engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from ttalign.reward_clients.backend import BackendSettings
from ttalign.reward_clients.config import load_reward_registry
from ttalign.reward_clients.judge import JudgeReward
from ttalign.reward_clients.limits import MAX_KEYWORDS
from ttalign.reward_clients.local_hf import TransformersReward
from ttalign.reward_clients.normalization import normalize
from ttalign.reward_clients.vllm_pooling import VllmPoolingReward

from tests.determinism import score_drift_bound
from tests.servers import RunningServer, wait_until_sync

pytestmark = pytest.mark.real_engine

CONVERSATION = [
    {"role": "system", "content": "You are concise."},
    {"role": "user", "content": "What is the capital of France?"},
]
CANDIDATES = [
    "Paris.",
    "The capital of France is Paris, a city on the Seine known for its museums.",
    "I am not sure, maybe Lyon?",
    "",
]


@pytest.fixture(scope="module")
async def local_scores(reward_model_dir: Path) -> list[float]:
    """The in-process transformers client's scores: the reference for the HTTP client."""
    client = TransformersReward("local", path=str(reward_model_dir), device="cpu")
    try:
        return await client.score(CONVERSATION, CANDIDATES)
    finally:
        await client.close()


async def test_local_transformers_scores_are_real_and_distinct(local_scores: list[float]) -> None:
    assert len(local_scores) == len(CANDIDATES)
    assert len({round(s, 5) for s in local_scores}) == len(CANDIDATES)


@pytest.mark.parametrize("with_tokenizer", [True, False])
async def test_vllm_pooling_client_matches_transformers(
    pooling_server: str, reward_model_dir: Path, local_scores: list[float], with_tokenizer: bool
) -> None:
    client = VllmPoolingReward(
        "pooling",
        url=pooling_server,
        model="test-rm",
        tokenizer=str(reward_model_dir) if with_tokenizer else None,
        settings=BackendSettings(timeout_seconds=60),
    )
    try:
        scores = await client.score(CONVERSATION, CANDIDATES)
    finally:
        await client.close()
    # Same folder, same rendering, raw logits on both sides: equal up to float32 noise.
    assert scores == pytest.approx(local_scores, abs=1e-3)


async def test_vllm_pooling_micro_batches_concurrent_calls(
    pooling_server: str, reward_model_dir: Path, local_scores: list[float]
) -> None:
    import asyncio

    from ttalign.server.metrics import Metrics

    metrics = Metrics()
    client = VllmPoolingReward(
        "pooling",
        url=pooling_server,
        tokenizer=str(reward_model_dir),
        settings=BackendSettings(timeout_seconds=60, batch_window_ms=50),
        metrics=metrics,
    )
    try:
        results = await asyncio.gather(*(client.score(CONVERSATION, [c]) for c in CANDIDATES))
    finally:
        await client.close()
    assert [r[0] for r in results] == pytest.approx(local_scores, abs=1e-3)
    assert metrics.reward_calls.labels("pooling", "ok")._value.get() == 1
    assert metrics.reward_batch_size.labels("pooling")._sum.get() == len(CANDIDATES)


@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_judge_on_the_real_engine(request: pytest.FixtureRequest, mode: str) -> None:
    # The built-in "judge" is JudgeReward on the serving engine; the engine lives on the
    # server's event loop, so it is driven through the server.
    server = request.getfixturevalue("real_server" if mode == "default" else "deterministic_server")

    def judge() -> list[float]:
        response = httpx.post(
            f"{server.api_url}/rewards/score",
            json={"reward": "judge", "messages": CONVERSATION, "candidates": CANDIDATES[:3]},
            timeout=120,
        )
        response.raise_for_status()
        return response.json()["scores"]

    scores, again = judge(), judge()
    assert all(1.0 <= s <= 9.0 for s in scores)
    # An expectation over token probabilities, not a parsed digit: rarely a whole number.
    assert any(s != round(s) for s in scores)
    # Greedy; exact in deterministic mode, within what was measured otherwise.
    assert scores == pytest.approx(again, abs=score_drift_bound(server.app.state.engine))
    assert len(set(scores)) == 3  # the candidate matters


# --- hardening on the real stack ------------------------------------------------------------

#: A long reply for the judge: its prompt is ~1,300 tokens, so 16 of them keep the CPU
#: engine busy for several seconds.
LONG_REPLY = " ".join(
    f"Point {i}: the capital of France is Paris, on the Seine, home of the Louvre."
    for i in range(70)
)


@contextmanager
def composite_server(engine, serve) -> Iterator[tuple]:
    """A server over ``engine`` with a judge+rules composite, its loop, and its registry."""
    captured: dict[str, object] = {}

    def rewards(settings, _engine, metrics, _judge_engine):
        captured["loop"] = asyncio.get_running_loop()  # the lifespan runs on the server's loop
        captured["registry"] = load_reward_registry(
            settings.reward_config, None, engine=engine, metrics=metrics
        )
        return captured["registry"]

    config = {
        "clients": {
            "mix": {
                "type": "composite",
                "components": {"judge": 1.0, "rules": 1.0},
                "normalization": "zscore",
            }
        }
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rewards.json"
        path.write_text(json.dumps(config))
        with serve(reward_config=path, reward_factory=rewards) as server:
            yield server, captured["loop"], captured["registry"]


@pytest.fixture(scope="module")
def server_and_loop(real_engine, serve_on_real_engine):
    """A server over the session's engine, the loop it runs on, and its reward registry."""
    with composite_server(real_engine, serve_on_real_engine) as served:
        yield served


@pytest.fixture(scope="module")
def deterministic_server_and_loop(deterministic_server, serve_on_deterministic_engine):
    """The same over the deterministic engine, for comparisons across judge calls."""
    engine = deterministic_server.app.state.engine
    with composite_server(engine, serve_on_deterministic_engine) as served:
        yield served


def on_loop(loop: asyncio.AbstractEventLoop, coroutine) -> concurrent.futures.Future:
    return asyncio.run_coroutine_threadsafe(coroutine, loop)


def test_cancelling_a_judge_call_aborts_it_in_the_engine(real_engine, server_and_loop):
    _, loop, _ = server_and_loop
    judge = JudgeReward("judge", engine=real_engine)
    call = on_loop(loop, judge.score(CONVERSATION, [f"{i}. {LONG_REPLY}" for i in range(16)]))
    wait_until_sync(lambda: real_engine.engine_running_requests() > 0, timeout=30)
    time.sleep(0.5)  # mid-way: the engine is prefilling the judge prompts
    assert not call.done()
    call.cancel()
    wait_until_sync(lambda: real_engine.engine_running_requests() == 0, timeout=2.0)
    on_loop(loop, judge.close()).result(timeout=10)


async def test_a_client_leaving_a_judge_score_call_aborts_it(real_server: RunningServer) -> None:
    engine = real_server.app.state.engine
    body = {
        "reward": "judge",
        "messages": CONVERSATION,
        "candidates": [f"{i}. {LONG_REPLY}" for i in range(16)],
    }
    async with httpx.AsyncClient(timeout=120) as client:
        call = asyncio.ensure_future(client.post(f"{real_server.api_url}/rewards/score", json=body))
        deadline = time.monotonic() + 30
        while engine.engine_running_requests() == 0:
            assert time.monotonic() < deadline and not call.done()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        call.cancel()  # the HTTP connection closes: a disconnect
        await asyncio.gather(call, return_exceptions=True)
    started = time.monotonic()
    while engine.engine_running_requests() > 0:
        assert time.monotonic() - started < 2.0, "the judge's engine work outlived the client"
        await asyncio.sleep(0.02)


def test_composite_scores_are_fixed_per_request_on_the_real_judge(
    deterministic_server_and_loop,
) -> None:
    # Compares judge scores across calls and batches: exact only in deterministic mode.
    server, loop, registry = deterministic_server_and_loop
    constraints = ({"type": "word_count", "max": 3},)
    candidates = ["Paris.", "It is Paris, the capital.", "Lyon, I think."]

    def score(reward: str, replies: list[str]) -> list[float]:
        response = httpx.post(
            f"{server.api_url}/rewards/score",
            json={
                "reward": reward,
                "messages": CONVERSATION,
                "candidates": replies,
                "constraints": list(constraints),
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return response.json()["scores"]

    # One /v1/rewards/score call is calibrated on itself: plain z-scores of each component.
    judged, ruled = score("judge", candidates), score("rules", candidates)
    pairs = zip(normalize(judged, "zscore"), normalize(ruled, "zscore"), strict=True)
    expected = [a + b for a, b in pairs]
    assert score("mix", candidates) == pytest.approx(expected, abs=1e-6)

    # Within one request (one bound client), a later call maps equal raw scores alike.
    request = registry.get("mix", constraints=constraints)
    first = on_loop(loop, request.score(CONVERSATION, candidates)).result(timeout=120)
    later = on_loop(loop, request.score(CONVERSATION, candidates[1:2])).result(timeout=120)
    assert later == [first[1]]
    assert first == pytest.approx(expected, abs=1e-6)


def test_rule_errors_and_limits_are_400s_on_the_real_server(real_server: RunningServer) -> None:
    def score(constraints: list[dict], candidates: list[str]) -> httpx.Response:
        return httpx.post(
            f"{real_server.api_url}/rewards/score",
            json={
                "reward": "rules",
                "messages": CONVERSATION,
                "candidates": candidates,
                "constraints": constraints,
            },
            timeout=60,
        )

    cases = [
        ([{"type": "regex", "pattern": r"(\w)\1"}], "constraints[0].pattern"),
        (
            [{"type": "ifeval", "instruction_id": "length_constraints:number_words"}],
            "constraints[0].kwargs.num_words",
        ),
        (
            [{"type": "keywords", "required": ["k"] * (MAX_KEYWORDS + 1)}],
            "constraints[0].required",
        ),
    ]
    for constraints, param in cases:
        response = score(constraints, ["Paris."])
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["code"] == "invalid_constraints"

    # A pattern that backtracks catastrophically in Python's re runs in linear time on RE2.
    started = time.monotonic()
    response = score([{"type": "regex", "pattern": r"^(a+)+$"}], ["a" * 65_000 + "!"])
    assert response.status_code == 200 and response.json()["scores"] == [0.0]
    assert time.monotonic() - started < 5.0


def test_ifeval_scores_are_deterministic_on_the_real_server(real_server: RunningServer) -> None:
    body = {
        "reward": "rules",
        "messages": CONVERSATION,
        "candidates": ["the die", "The capital of France is Paris."],
        "constraints": [
            {
                "type": "ifeval",
                "instruction_id": "language:response_language",
                "kwargs": {"language": "en"},
            },
            {
                "type": "ifeval",
                "instruction_id": "length_constraints:number_words",
                "kwargs": {"num_words": 3, "relation": "at least"},
            },
        ],
    }
    answers = {
        tuple(httpx.post(f"{real_server.api_url}/rewards/score", json=body).json()["scores"])
        for _ in range(20)
    }
    assert len(answers) == 1


async def _worst_tick_lag(stop: threading.Event) -> float:
    """Tick every 50 ms on the running loop until ``stop``; the worst lateness of a tick."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while not stop.is_set():
        expected = loop.time() + 0.05
        await asyncio.sleep(0.05)
        worst = max(worst, loop.time() - expected)
    return worst


def test_rule_checks_leave_the_real_server_loop_responsive(server_and_loop) -> None:
    server, loop, _ = server_and_loop
    words = ["Alpha", "beta", "GAMMA", "delta.", "Epsilon", "zeta,", "THETA!", "kappa?"]
    text = " ".join(words[(3 * j) % 8] for j in range(11_000))
    body = {
        "reward": "rules",
        "messages": CONVERSATION,
        "candidates": [f"{i} {text}"[:65_000] for i in range(6)],
        "constraints": [
            {
                "type": "ifeval",
                "instruction_id": "change_case:capital_word_frequency",
                "kwargs": {"capital_frequency": 3, "capital_relation": "at least"},
            },
            {
                "type": "ifeval",
                "instruction_id": "length_constraints:number_sentences",
                "kwargs": {"num_sentences": 3, "relation": "at least"},
            },
        ],
    }
    stop = threading.Event()
    ticker = on_loop(loop, _worst_tick_lag(stop))
    started = time.monotonic()
    response = httpx.post(f"{server.api_url}/rewards/score", json=body, timeout=120)
    duration = time.monotonic() - started
    stop.set()
    assert response.status_code == 200 and len(response.json()["scores"]) == 6
    assert duration > 1.0, "the work is too small to show a blocked loop"
    assert ticker.result(timeout=10) < 0.5
