"""Reward clients against real backends: a vLLM pooling server, transformers, the real engine."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from reward_clients.backend import BackendSettings
from reward_clients.local_hf import TransformersReward
from reward_clients.vllm_pooling import VllmPoolingReward
from tests.servers import RunningServer

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

    from server.metrics import Metrics

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


def test_judge_on_the_real_engine(real_server: RunningServer) -> None:
    # The built-in "judge" is JudgeReward on the serving engine; the engine lives on the
    # server's event loop, so it is driven through the server.
    def judge() -> list[float]:
        response = httpx.post(
            f"{real_server.api_url}/rewards/score",
            json={"reward": "judge", "messages": CONVERSATION, "candidates": CANDIDATES[:3]},
            timeout=120,
        )
        response.raise_for_status()
        return response.json()["scores"]

    scores, again = judge(), judge()
    assert all(1.0 <= s <= 9.0 for s in scores)
    # An expectation over token probabilities, not a parsed digit: rarely a whole number.
    assert any(s != round(s) for s in scores)
    assert scores == pytest.approx(again, abs=1e-3)  # greedy, deterministic
    assert len(set(scores)) == 3  # the candidate matters
