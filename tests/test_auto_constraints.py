"""Constraint extraction and the auto_constraints reward, on the scripted fake engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from ttalign.engine.metering import EngineUsage, ScoringMeter
from ttalign.reward_clients.auto_constraints import AutoConstraintsReward
from ttalign.reward_clients.config import load_reward_registry, read_reward_config
from ttalign.reward_clients.constraint_extraction import (
    EXAMPLE_RULES,
    ConstraintExtractor,
    extraction_messages,
    parse_extracted,
)
from ttalign.reward_clients.rules import parse_constraints

from tests.fakes import FakeEngine, FakeReward

REQUEST = "Write a haiku about rain in lowercase letters, without the word wet."
#: What the model writes after the pre-filled "[".
RULES = (
    '{"type": "case", "case": "lower"}, '
    '{"type": "regex", "pattern": "(?i)\\\\bwet\\\\b", "must_match": false}]'
)


def conversation(text: str = REQUEST) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_the_worked_example_is_valid_rules():
    assert len(parse_constraints(EXAMPLE_RULES)) == len(EXAMPLE_RULES)


def test_the_request_is_asked_last_and_the_answer_is_begun_with_a_bracket():
    messages = extraction_messages(REQUEST)
    assert messages[-2] == {"role": "user", "content": f"Request:\n{REQUEST}"}
    assert messages[-1] == {"role": "assistant", "content": "["}


def test_parsing_keeps_valid_generic_rules_only():
    continuation = json.dumps(
        [
            {"type": "word_count", "max": 50},
            {"type": "ifeval", "instruction_id": "punctuation:no_comma", "kwargs": {}},
            {"type": "regex", "pattern": "(a)\\1"},
            {"type": "word_count", "max": 50},
            "not an object",
            {"type": "colour"},
            {"type": "case", "case": "upper"},
        ]
    )[1:]
    kinds = [c.type for c in parse_extracted(continuation)]
    assert kinds == ["word_count", "case"]


def test_an_array_cut_short_keeps_its_complete_items():
    cut = '{"type": "json"}, {"type": "word_count", "min": 3}, {"type": "keywo'
    assert [c.type for c in parse_extracted(cut)] == ["json", "word_count"]


@pytest.mark.parametrize("garbage", ["", "]", "I cannot do that.", "{}]"])
def test_nothing_checkable_is_an_empty_tuple(garbage):
    assert parse_extracted(garbage) == ()


async def test_extraction_is_greedy_metered_cached_and_shared():
    engine = FakeEngine(script=lambda prompt, s: [RULES], delay=0.05)
    extractor = ConstraintExtractor(engine, max_tokens=128)
    usage = EngineUsage()
    meter = ScoringMeter(usage)
    first, second = await asyncio.gather(
        extractor.extract(REQUEST, meter), extractor.extract(REQUEST, meter)
    )
    assert first == second and [c.type for c in first] == ["case", "regex"]
    assert len(engine.calls) == 1
    (call,) = engine.calls
    assert call.sampling.temperature == 0.0 and call.sampling.max_tokens == 128
    assert call.prompt.endswith("<assistant>[")
    assert usage.reward_engine_calls == 1 and usage.completion_tokens > 0
    await extractor.extract(REQUEST, meter)
    assert len(engine.calls) == 1


async def test_a_cancelled_extraction_does_not_fail_the_callers_sharing_it():
    engine = FakeEngine(script=lambda prompt, s: [RULES], delay=0.1)
    extractor = ConstraintExtractor(engine)
    owner = asyncio.create_task(extractor.extract(REQUEST))
    await asyncio.sleep(0.01)
    follower = asyncio.create_task(extractor.extract(REQUEST))
    await asyncio.sleep(0.01)
    owner.cancel()
    assert [c.type for c in await follower] == ["case", "regex"]
    assert len(engine.calls) == 2


async def test_replies_score_the_share_of_extracted_rules_they_meet():
    reward = AutoConstraintsReward(
        "auto", ConstraintExtractor(FakeEngine(script=lambda p, s: [RULES]))
    )
    scores = await reward.score(
        conversation(), ["soft rain on the roof", "Wet Rain", "the wet street"]
    )
    assert scores == [1.0, 0.0, 0.5]


async def test_the_fallback_breaks_ties_and_never_overturns_a_rule():
    fallback = FakeReward(scorer=len)
    reward = AutoConstraintsReward(
        "auto", ConstraintExtractor(FakeEngine(script=lambda p, s: [RULES])), fallback=fallback
    )
    replies = ["rain", "soft rain on the roof", "WET RAIN ON EVERYTHING AROUND"]
    scores = await reward.score(conversation(), replies)
    assert scores[1] > scores[0] > scores[2]  # the longest reply breaks both rules
    assert 1.0 <= scores[0] < scores[1] < 1.0 + 1 / 3


async def test_without_tie_breaking_the_fallback_only_scores_requests_without_rules():
    engine = FakeEngine(script=lambda prompt, s: ["]" if "Tell me a joke." in prompt else RULES])
    reward = AutoConstraintsReward(
        "auto", ConstraintExtractor(engine), fallback=FakeReward(scorer=len), break_ties=False
    )
    replies = ["rain", "soft rain on the roof", "WET RAIN ON EVERYTHING AROUND"]
    assert await reward.score(conversation(), replies) == [1.0, 1.0, 0.0]
    assert await reward.score(conversation("Tell me a joke."), ["a", "bb"]) == [1.0, 2.0]


async def test_a_request_with_nothing_checkable_degrades_to_the_fallback_or_a_tie():
    engine = FakeEngine(script=lambda p, s: ["]"])
    plain = AutoConstraintsReward("auto", ConstraintExtractor(engine))
    assert await plain.score(conversation("Tell me a joke."), ["a", "bb"]) == [0.0, 0.0]
    backed = AutoConstraintsReward(
        "auto", ConstraintExtractor(engine), fallback=FakeReward(scorer=len)
    )
    assert await backed.score(conversation("Tell me a joke."), ["a", "bb"]) == [1.0, 2.0]


def test_the_judge_engine_brings_judge_strong_and_auto_constraints():
    serving, judging = FakeEngine(), FakeEngine(model_name="judge")
    registry = load_reward_registry(None, None, engine=serving, judge_engine=judging)
    builtins = {"judge", "judge-strong", "judge-strong-yes-no", "auto_constraints", "rules"}
    assert builtins <= set(registry.names())
    yes_no = registry.get("judge-strong-yes-no")
    assert yes_no.engine is judging
    strong, auto = registry.get("judge-strong"), registry.get("auto_constraints")
    assert strong.extractor.engine is judging and strong.fallback is yes_no
    assert not strong.break_ties
    assert auto.extractor.engine is judging and auto.fallback is yes_no and auto.break_ties
    assert "judge-strong" not in load_reward_registry(None, None, engine=serving).names()


def test_a_config_on_the_judge_engine_needs_one(tmp_path):
    path = tmp_path / "rewards.json"
    path.write_text(json.dumps({"clients": {"mine": {"type": "auto_constraints"}}}))
    with pytest.raises(ValueError, match="start it with --judge-model"):
        read_reward_config(path)
    assert "mine" in read_reward_config(path, judge_engine=True).clients
    path.write_text(
        json.dumps({"clients": {"mine": {"type": "auto_constraints", "fallback": "nope"}}})
    )
    with pytest.raises(ValueError, match="unknown client 'nope'"):
        read_reward_config(path, judge_engine=True)


def test_the_benchmark_judge_variants_are_a_valid_reward_config():
    from pathlib import Path

    import ttalign.benchmarks

    path = Path(ttalign.benchmarks.__file__).parent / "judges.yaml"
    config = read_reward_config(path, judge_engine=True)
    registry = load_reward_registry(
        path, None, engine=FakeEngine(), judge_engine=FakeEngine(model_name="judge")
    )
    assert set(config.clients) <= set(registry.names())
