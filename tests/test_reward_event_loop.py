"""CPU-heavy reward work (rule checks, chat rendering) runs off the event loop."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from typing import Any

import pytest
from ttalign.reward_clients import rendering
from ttalign.reward_clients.backend import BackendSettings
from ttalign.reward_clients.rules import RuleVerifierReward
from ttalign.reward_clients.tei import TeiReward
from ttalign.reward_clients.vllm_pooling import VllmPoolingReward

CHAT = [{"role": "user", "content": "Write a long essay."}]
#: The loop must never stall this long while reward work runs.
MAX_LAG = 0.5


async def worst_lag(work: Awaitable[Any]) -> tuple[float, float]:
    """Run ``work`` beside a 50 ms ticker; the ticker's worst lag and the work's duration."""
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            expected = loop.time() + 0.05
            await asyncio.sleep(0.05)
            lags.append(loop.time() - expected)

    ticker = asyncio.ensure_future(tick())
    started = time.monotonic()
    try:
        await work
    finally:
        duration = time.monotonic() - started
        done.set()
        await ticker
    return max(lags), duration


def essay(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [
        "Alpha",
        "beta",
        "GAMMA",
        "delta.",
        "Epsilon",
        "zeta,",
        "eta",
        "THETA!",
        "iota",
        "kappa?",
        "lambda",
        "mu",
    ]
    return " ".join(rng.choice(words) for _ in range(chars // 5))[:chars]


async def test_rule_checks_leave_the_loop_responsive() -> None:
    client = RuleVerifierReward().bind(
        [
            {
                "type": "ifeval",
                "instruction_id": "length_constraints:number_sentences",
                "kwargs": {"num_sentences": 3, "relation": "at least"},
            },
            {
                "type": "ifeval",
                "instruction_id": "change_case:capital_word_frequency",
                "kwargs": {"capital_frequency": 3, "capital_relation": "at least"},
            },
            {"type": "regex", "pattern": r"(\w+\s?)+$"},
            {"type": "keywords", "required": ["zeta"], "forbidden": ["omega"]},
        ]
    )
    candidates = [essay(65_536, seed) for seed in range(6)]
    lag, duration = await worst_lag(client.score(CHAT, candidates))
    assert duration > 2 * MAX_LAG, "the work is too small to show a blocked loop"
    assert lag < MAX_LAG


class SlowTokenizer:
    """A tokenizer whose every rendering blocks its thread for 0.1 s."""

    def apply_chat_template(self, messages: list[dict[str, str]], **options: Any) -> Any:
        time.sleep(0.1)
        if options.get("tokenize"):
            return {"input_ids": [1, 2, 3]}
        return "rendered"


@pytest.fixture
def slow_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendering, "load_tokenizer", lambda path: SlowTokenizer())


@pytest.mark.usefixtures("slow_tokenizer")
async def test_pooling_client_renders_off_the_loop() -> None:
    client = VllmPoolingReward(
        "pooling", url="http://127.0.0.1:9", tokenizer="/unused", settings=BackendSettings()
    )

    async def classify(body: dict[str, Any]) -> dict[str, Any]:
        return {"data": [{"index": i, "probs": [0.5]} for i in range(len(body["input"]))]}

    client._classify = classify  # type: ignore[method-assign]
    try:
        lag, duration = await worst_lag(client.score(CHAT, [f"reply {i}" for i in range(12)]))
    finally:
        await client.close()
    assert duration > 2 * MAX_LAG
    assert lag < MAX_LAG


@pytest.mark.usefixtures("slow_tokenizer")
async def test_tei_client_renders_off_the_loop() -> None:
    client = TeiReward("tei", url="http://127.0.0.1:9", tokenizer="/unused")

    async def predict(path: str, payload: dict[str, Any]) -> list[list[dict[str, Any]]]:
        return [[{"label": "LABEL_0", "score": 0.5}] for _ in payload["inputs"]]

    client._http.post = predict  # type: ignore[method-assign]
    try:
        lag, duration = await worst_lag(client.score(CHAT, [f"reply {i}" for i in range(12)]))
    finally:
        await client.close()
    assert duration > 2 * MAX_LAG
    assert lag < MAX_LAG


async def test_a_cancelled_rules_call_stops_its_worker_thread() -> None:
    client = RuleVerifierReward().bind(
        [
            {
                "type": "ifeval",
                "instruction_id": "change_case:capital_word_frequency",
                "kwargs": {"capital_frequency": 3, "capital_relation": "at least"},
            }
        ]
        * 8
    )
    checks: list[float] = []
    constraint = type(client.constraints[0])
    original = constraint.satisfied

    def counted(self: Any, text: str, prompt: str) -> bool:
        checks.append(time.monotonic())
        return original(self, text, prompt)

    candidates = [essay(65_536, seed) for seed in range(4)]  # 32 checks of ~0.1-0.5 s
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constraint, "satisfied", counted)
        call = asyncio.ensure_future(client.score(CHAT, candidates))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        cancelled_at = time.monotonic()
        await asyncio.sleep(2.0)
    assert checks, "the scoring never started"
    # The check under way may finish (and one may slip past the stop flag as it is set);
    # no more start.
    assert sum(started > cancelled_at for started in checks) <= 1
    assert len(checks) < 32
