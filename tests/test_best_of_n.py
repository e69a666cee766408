"""best_of_n on the scripted fake engine and a deterministic reward."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from ttalign.engine.base import SamplingSettings
from ttalign.engine.metering import MeteredEngine
from ttalign.reward_clients.registry import RewardRegistry
from ttalign.server.app import create_app
from ttalign.server.metrics import Metrics
from ttalign.strategies.base import AlignmentRequest, RewardResolver, StrategyContext
from ttalign.strategies.best_of_n import BestOfN, BestOfNConfig
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.selection import ScoredCandidate, top_distinct

from tests.conftest import fake_settings
from tests.fakes import FakeEngine, FakeReward
from tests.servers import RunningServer, serve_in_thread

CHAT = ({"role": "user", "content": "hi"},)
SAMPLING = SamplingSettings(temperature=0.1, top_p=0.9, max_tokens=64)
TEXTS = ["mid size", "the longest candidate", "x", "the longest candidate", "short"]


def scripted(prompt: str, sampling) -> list[str]:
    return TEXTS[: sampling.n]


def context(engine: FakeEngine, reward: FakeReward, **request) -> StrategyContext:
    return StrategyContext(
        request=AlignmentRequest(messages=CHAT, sampling=SAMPLING, **request),
        engine=MeteredEngine(engine),
        rewards=RewardResolver(lambda name: reward),
    )


async def test_one_engine_call_one_reward_batch_best_wins() -> None:
    engine, reward = FakeEngine(script=scripted), FakeReward(scorer=len)
    ctx = context(engine, reward, return_trace=True)
    result = await BestOfN().run(ctx, BestOfNConfig(n=5, temperature=0.7))
    assert len(engine.calls) == 1 and engine.calls[0].sampling.n == 5
    assert engine.calls[0].sampling.temperature == 0.7 and engine.calls[0].sampling.top_p == 0.9
    assert reward.batches == [TEXTS]
    assert [c.text for c in result.choices] == ["the longest candidate"]
    assert result.choices[0].reward == float(len("the longest candidate"))
    assert result.candidates_scored == 5 and ctx.engine.usage.candidates_generated == 5
    assert result.trace["rewards"] == [float(len(t)) for t in TEXTS]
    assert [c["text"] for c in result.trace["candidates"]] == TEXTS


async def test_n_returns_distinct_candidates_best_first() -> None:
    ctx = context(FakeEngine(script=scripted), FakeReward(scorer=len), n=3)
    result = await BestOfN().run(ctx, BestOfNConfig(n=5))
    assert [c.text for c in result.choices] == ["the longest candidate", "mid size", "short"]
    assert [c.reward for c in result.choices] == [21.0, 8.0, 5.0]
    assert "candidates" not in result.trace  # texts only with return_trace


def test_top_distinct_fills_with_duplicates_only_when_needed() -> None:
    def ranked(scores: list[float], texts: list[str], k: int) -> list[str]:
        scored = [
            ScoredCandidate(t, s, "stop", 1, round=i)
            for i, (s, t) in enumerate(zip(scores, texts, strict=True))
        ]
        return [f"{c.text}@{c.round}" for c in top_distinct(scored, k)]

    assert ranked([1.0, 3.0, 3.0, 2.0], ["a", "b", "b", "c"], 3) == ["b@1", "c@3", "a@0"]
    assert ranked([1.0, 1.0], ["same", "same"], 2) == ["same@0", "same@1"]
    assert ranked([2.0, 2.0, 1.0], ["a", "b", "c"], 1) == ["a@0"]  # ties: sample order


@pytest.mark.parametrize(
    ("config", "request_n", "param"),
    [(BestOfNConfig(n=9), 1, "strategy_config.n"), (BestOfNConfig(n=2), 3, "n")],
)
async def test_limits(config: BestOfNConfig, request_n: int, param: str) -> None:
    engine = FakeEngine(script=scripted)
    ctx = context(engine, FakeReward(), n=request_n, max_candidates=8)
    with pytest.raises(InvalidStrategyRequest) as caught:
        BestOfN().check(ctx.request, config)
    assert caught.value.param == param and engine.calls == []


@pytest.fixture
def bon_server() -> Iterator[RunningServer]:
    engine = FakeEngine(script=scripted)
    reward = FakeReward(scorer=len, name="length")

    def rewards(settings, engine, metrics: Metrics, judge_engine) -> RewardRegistry:
        return RewardRegistry({"length": reward}, default="length")

    app = create_app(
        fake_settings(max_candidates=8), engine_factory=lambda _: engine, reward_factory=rewards
    )
    with serve_in_thread(app) as running:
        yield running


def test_through_the_api(bon_server: RunningServer) -> None:
    body = {
        "model": "fake-model",
        "messages": list(CHAT),
        "strategy": "best_of_n",
        "strategy_config": {"n": 5},
        "n": 2,
    }
    answer = httpx.post(f"{bon_server.api_url}/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in answer["choices"]] == [
        "the longest candidate",
        "mid size",
    ]
    alignment = answer["alignment"]
    assert alignment["strategy"] == "best_of_n" and alignment["rewards"] == [21.0, 8.0]
    assert alignment["engine_calls"] == 1 and alignment["candidates_generated"] == 5
    assert alignment["candidates_scored"] == 5
    too_many = httpx.post(
        f"{bon_server.api_url}/chat/completions",
        json={**body, "strategy_config": {"n": 9}},
    )
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "strategy_config.n"
    bad = httpx.post(
        f"{bon_server.api_url}/chat/completions", json={**body, "strategy_config": {"m": 1}}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy_config.m"


def test_streamed_request_over_the_cap_is_a_400_not_an_error_frame(
    bon_server: RunningServer,
) -> None:
    client = openai.OpenAI(base_url=bon_server.api_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fake-model",
            messages=list(CHAT),
            stream=True,
            extra_body={"strategy": "best_of_n", "strategy_config": {"n": 9}},
        )
    assert caught.value.response.json()["error"]["param"] == "strategy_config.n"
