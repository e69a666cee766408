"""The pairwise judge: each reply against the judge's own reference, in both orders."""

from __future__ import annotations

import json
import math

import pytest
from ttalign.engine.metering import EngineUsage, ScoringMeter
from ttalign.engine.routing import request_routing
from ttalign.reward_clients.backend import BackendSettings
from ttalign.reward_clients.config import load_reward_registry
from ttalign.reward_clients.pairwise import PairwiseJudge, probability_of_a

from tests.fakes import FakeEngine, Scripted

REFERENCE = "Green tea, brewed cool."


def judge_script(prompt: str, sampling) -> list:
    """The reference for a new turn; A/B choices favouring the longer reply, with a pull
    towards A (position bias) of 0.1."""
    if prompt.endswith("<assistant>"):
        return [REFERENCE]
    first = prompt.split("Reply A:\n")[1].split("\n\nReply B:")[0]
    second = prompt.split("Reply B:\n")[1].split("\n\nWhich")[0]
    p_a = (0.7 if len(first) > len(second) else 0.3) + 0.1
    return [Scripted(" A", top=[{" A": math.log(p_a), " B": math.log(1 - p_a)}])]


def test_the_choice_is_read_from_the_letters():
    assert probability_of_a([(" A", math.log(0.3)), ("B", math.log(0.1)), ("C", 0.0)]) == (
        pytest.approx(0.75)
    )
    assert probability_of_a([("x", 0.0)]) is None


async def test_both_orders_cancel_the_position_bias_and_calls_are_metered():
    engine = FakeEngine(script=judge_script)
    judge = PairwiseJudge("pairwise", engine=engine, settings=BackendSettings(batch_window_ms=0))
    usage = EngineUsage()
    with request_routing("r") as scope:
        scope.scoring_meter = ScoringMeter(usage)
        better, worse = await judge.score(
            [{"role": "user", "content": "Suggest a tea."}],
            ["A long and careful answer about green tea.", "Tea."],
        )
    assert better == pytest.approx(0.7) and worse == pytest.approx(0.3)
    references = [c for c in engine.calls if c.prompt.endswith("<assistant>")]
    assert len(references) == 1 and references[0].sampling.temperature == 0.0
    assert usage.reward_engine_calls == 1 + 2 * 2 == len(engine.calls)


def test_pairwise_mode_is_configured_on_an_engine(tmp_path):
    path = tmp_path / "rewards.json"
    path.write_text(json.dumps({"clients": {"vs": {"type": "judge", "mode": "pairwise"}}}))
    registry = load_reward_registry(path, None, engine=FakeEngine())
    assert isinstance(registry.get("vs"), PairwiseJudge)
