"""A judge on the serving engine spends the engine on behalf of the request it scores for:
its calls count in that request's usage and are admitted by that request's budget."""

from __future__ import annotations

import asyncio

import openai
import pytest
from ttalign.engine.metering import EngineUsage, ScoringMeter
from ttalign.engine.routing import request_routing
from ttalign.reward_clients.backend import BackendSettings
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.judge import JudgeReward
from ttalign.server.app import create_app
from ttalign.strategies.budget import ComputeBudget
from ttalign.strategies.errors import BudgetExhausted

from tests.conftest import fake_settings
from tests.fakes import FakeEngine
from tests.servers import serve_in_thread

CHAT = [{"role": "user", "content": "Name a colour."}]


def judge_or_candidates(prompt: str, sampling) -> list[str]:
    """Rate every reply 7; answer ``candidate i`` to anything else."""
    if prompt.endswith("Rating: "):
        return ["7"] * sampling.n
    return [f"candidate {i}" for i in range(sampling.n)]


def judge_on(engine: FakeEngine) -> JudgeReward:
    return JudgeReward("judge", engine=engine, settings=BackendSettings(batch_window_ms=0))


async def test_judge_calls_count_in_the_usage_of_the_request_they_score_for() -> None:
    engine = FakeEngine(script=judge_or_candidates)
    judge = judge_on(engine)
    mine, theirs = EngineUsage(), EngineUsage()

    async def score_for(usage: EngineUsage, candidates: list[str]) -> list[float]:
        with request_routing("r") as scope:
            scope.scoring_meter = ScoringMeter(usage)
            return await judge.score(CHAT, candidates)

    scores = await asyncio.gather(score_for(mine, ["a", "b", "c"]), score_for(theirs, ["d"]))
    assert scores == [[7.0, 7.0, 7.0], [7.0]]
    assert (mine.reward_engine_calls, theirs.reward_engine_calls) == (3, 1)
    assert mine.engine_calls == theirs.engine_calls == 0  # the strategy's own calls only
    assert (mine.completion_tokens, theirs.completion_tokens) == (3, 1)
    judge_prompts = [c.prompt for c in engine.calls]
    assert mine.prompt_tokens + theirs.prompt_tokens == sum(len(p.split()) for p in judge_prompts)
    assert mine.candidates_generated == theirs.candidates_generated == 0  # ratings, not samples
    await judge.score(CHAT, ["e"])  # outside any request: nothing is metered
    assert mine.reward_engine_calls + theirs.reward_engine_calls == 4
    await judge.close()


async def test_a_budget_refusal_inside_the_judge_reaches_the_caller_before_the_engine() -> None:
    engine = FakeEngine(script=judge_or_candidates)
    judge = judge_on(engine)
    usage = EngineUsage(engine_calls=1, prompt_tokens=95)
    budget = ComputeBudget(max_engine_tokens=100)
    meter = ScoringMeter(usage, lambda tokens: budget.admit(usage, candidates=0, tokens=tokens))
    with request_routing("r") as scope, pytest.raises(BudgetExhausted, match="budget of 100"):
        scope.scoring_meter = meter
        await judge.score(CHAT, ["a", "b"])
    assert engine.calls == []
    await judge.close()


def test_a_judge_heavy_request_hits_its_budget_through_the_api() -> None:
    engine = FakeEngine(script=judge_or_candidates)
    # Enough for the eight candidates, not for judging them as well.
    settings = fake_settings(max_request_engine_tokens=300, max_n=16)
    app = create_app(settings, engine_factory=lambda _: engine)
    with serve_in_thread(app) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0)
        request = dict(
            model="fake-model",
            messages=CHAT,
            max_tokens=4,
            extra_body={"strategy": "best_of_n", "strategy_config": {"n": 8}, "reward": "judge"},
        )
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**request)
        error = refused.value.body
        assert error["code"] == "budget_exceeded"
        assert "--max-request-engine-tokens" in error["message"]

        # With room for both, the judge's calls show in the request's engine tokens.
        roomy = create_app(fake_settings(max_n=16), engine_factory=lambda _: engine)
    with serve_in_thread(roomy) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0)
        engine.calls.clear()
        response = client.chat.completions.create(**request)
        alignment = response.model_extra["alignment"]
        assert alignment["engine_calls"] == 1  # the strategy's own sampling call
        assert alignment["reward_engine_calls"] == 8  # the judge's ratings
        judged = sum(len(c.prompt.split()) for c in engine.calls[1:])
        sampled = len(engine.calls[0].prompt.split())
        assert alignment["engine_tokens"]["prompt_tokens"] == sampled + judged


async def test_a_yes_no_judge_scores_the_probability_of_yes() -> None:
    import math

    from tests.fakes import Scripted

    def verdicts(prompt: str, sampling) -> list:
        assert prompt.endswith("Verdict:")
        top = {" Yes": math.log(0.6), " No": math.log(0.2), " yes": math.log(0.1), "x": -1.0}
        if "ignored" in prompt:
            return [Scripted(" Maybe", top=[{" Maybe": -0.1}])] * sampling.n
        return [Scripted(" Yes", top=[top])] * sampling.n

    judge = JudgeReward(
        "verdict",
        engine=FakeEngine(script=verdicts),
        mode="yes_no",
        settings=BackendSettings(batch_window_ms=0),
    )
    (score,) = await judge.score(CHAT, ["Blue."])
    assert score == pytest.approx(0.7 / 0.9)
    with pytest.raises(RewardClientError, match="no Yes or No in its top-20"):
        await judge.score(CHAT, ["ignored"])
