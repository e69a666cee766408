"""The strategy context's guards: deadlines, the compute budget, seeds, reward lookup."""

from __future__ import annotations

import asyncio
import time

import pytest
from ttalign.engine.base import SamplingSettings
from ttalign.engine.metering import MeteredEngine
from ttalign.strategies.base import AlignmentRequest, RewardResolver, StrategyContext
from ttalign.strategies.budget import ComputeBudget
from ttalign.strategies.errors import BudgetExhausted, DeadlineReached, InvalidStrategyRequest
from ttalign.strategies.sampling import offset_seed

from tests.fakes import FakeEngine, FakeReward

QUESTION = ({"role": "user", "content": "hi"},)


def context(engine: FakeEngine, *, deadline: float | None = None, **budget: int) -> StrategyContext:
    request = AlignmentRequest(
        messages=QUESTION,
        sampling=SamplingSettings(max_tokens=8),
        budget=ComputeBudget(**budget),
    )
    return StrategyContext(
        request=request,
        engine=MeteredEngine(engine),
        rewards=RewardResolver(lambda name: FakeReward()),
        deadline=deadline,
    )


@pytest.mark.parametrize(
    ("seed", "offset", "expected"),
    [(None, 3, None), (5, 3, 8), (2**63 - 1, 1, -(2**63)), (-(2**63), -1, 2**63 - 1)],
)
def test_offset_seed_wraps_within_int64(seed, offset, expected) -> None:
    assert offset_seed(seed, offset) == expected


async def test_deadline_cuts_a_call_short_and_keeps_its_partial_output() -> None:
    engine = FakeEngine(script=lambda p, s: ["one two three"] * s.n, delay=5.0)
    ctx = context(engine, deadline=time.monotonic() + 0.2)
    started = time.monotonic()
    generation = await ctx.sample(QUESTION, SamplingSettings(n=2, max_tokens=8))
    assert time.monotonic() - started < 1.0
    assert ctx.deadline_reached
    assert [c.finish_reason for c in generation.completions] == ["length", "length"]


async def test_without_a_deadline_a_call_runs_to_the_end() -> None:
    engine = FakeEngine(delay=0.05)
    ctx = context(engine)
    generation = await ctx.sample(QUESTION, SamplingSettings(n=2, max_tokens=8))
    assert [c.text for c in generation.completions] == ["candidate 0", "candidate 1"]
    assert not ctx.deadline_reached


async def test_scoring_past_the_deadline_and_its_grace_raises() -> None:
    class SlowReward(FakeReward):
        async def score(self, conversation, candidates, *, partial=False):
            await asyncio.sleep(5)
            return [0.0] * len(candidates)

    ctx = context(FakeEngine(), deadline=time.monotonic() + 0.1)
    started = time.monotonic()
    with pytest.raises(DeadlineReached):
        await ctx.score(SlowReward(), QUESTION, ["a"])
    assert time.monotonic() - started < 1.0


async def test_the_budget_admits_the_first_call_and_refuses_what_could_exceed_it() -> None:
    ctx = context(FakeEngine(), max_candidates=5, max_engine_tokens=10_000)
    await ctx.sample(QUESTION, SamplingSettings(n=4, max_tokens=8))
    with pytest.raises(BudgetExhausted):
        await ctx.sample(QUESTION, SamplingSettings(n=2, max_tokens=8))
    await ctx.sample(QUESTION, SamplingSettings(n=1, max_tokens=8))


def test_a_first_round_that_cannot_fit_is_refused_up_front() -> None:
    budget = ComputeBudget(max_engine_tokens=100, max_candidates=4)
    with pytest.raises(InvalidStrategyRequest) as caught:
        budget.check(2, 200, param="strategy_config.n")
    assert caught.value.param == "strategy_config.n"
    assert caught.value.code == "budget_exceeded"


def test_each_reward_name_resolves_once_per_request() -> None:
    lookups: list[str | None] = []

    def lookup(name: str | None) -> FakeReward:
        lookups.append(name)
        return FakeReward(name=name or "default")

    resolver = RewardResolver(lookup)
    assert resolver.get("a") is resolver.get("a")
    assert resolver.get(None) is not resolver.get("a")
    assert lookups == ["a", None]
