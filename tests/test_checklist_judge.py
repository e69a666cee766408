"""The checklist judge: requirements written once per request, each reply checked on each."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from ttalign.engine.metering import EngineUsage, ScoringMeter
from ttalign.engine.routing import request_routing
from ttalign.reward_clients.backend import BackendSettings
from ttalign.reward_clients.checklist import CATCH_ALL, ChecklistJudge, parse_checklist
from ttalign.reward_clients.config import (
    RewardConfigError,
    load_reward_registry,
    read_reward_config,
)

from tests.fakes import FakeEngine, Scripted

REQUEST = "Write two sentences about tea, in lowercase."
CHECKLIST = " Exactly two sentences.\n2. About tea.\n3) All lowercase.\n\nThat is all."


def judge_script(prompt: str, sampling) -> list:
    """Writes the checklist; says Yes (p=0.9) to a requirement the reply names, else No."""
    if prompt.endswith("<assistant>1."):
        return [CHECKLIST]
    requirement = prompt.split("Requirement:\n")[1].split("\n")[0]
    reply = prompt.split("Reply:\n")[1].split("\n\nDoes")[0]
    met = requirement.split()[-1].strip(".").lower() in reply.lower()
    p_yes = 0.9 if met else 0.1
    return [Scripted(" Yes", top=[{" Yes": math.log(p_yes), " No": math.log(1 - p_yes)}])]


def judge_on(engine: FakeEngine) -> ChecklistJudge:
    return ChecklistJudge("checklist", engine=engine, settings=BackendSettings(batch_window_ms=0))


def test_the_checklist_is_the_numbered_lines():
    assert parse_checklist(CHECKLIST) == ("Exactly two sentences.", "About tea.", "All lowercase.")
    assert parse_checklist(" A.\n2. A.\n" + "".join(f"{n}. x{n}\n" for n in range(3, 20))) == (
        "A.", *(f"x{n}" for n in range(3, 10))
    )  # fmt: skip
    assert parse_checklist(" \nno list here") == ()


async def test_each_reply_scores_the_mean_verdict_over_the_checklist():
    engine = FakeEngine(script=judge_script)
    judge = judge_on(engine)
    chat = [{"role": "user", "content": REQUEST}]
    scores = await judge.score(chat, ["sentences about tea, lowercase", "tea"])
    assert scores == [pytest.approx(0.9), pytest.approx((0.1 + 0.9 + 0.1) / 3)]
    writes = [c for c in engine.calls if c.prompt.endswith("<assistant>1.")]
    assert len(writes) == 1 and writes[0].sampling.temperature == 0.0
    await judge.score(chat, ["again"])
    assert len([c for c in engine.calls if c.prompt.endswith("<assistant>1.")]) == 1


async def test_every_call_is_metered_into_the_request():
    engine = FakeEngine(script=judge_script)
    judge = judge_on(engine)
    usage = EngineUsage()
    with request_routing("r") as scope:
        scope.scoring_meter = ScoringMeter(usage)
        await judge.score([{"role": "user", "content": REQUEST}], ["a", "b"])
    assert usage.reward_engine_calls == 1 + 2 * 3 == len(engine.calls)


async def test_no_requirement_means_one_catch_all_check():
    def script(prompt: str, sampling) -> list:
        if prompt.endswith("<assistant>1."):
            return ["\n"]
        assert CATCH_ALL in prompt
        return [Scripted(" No", top=[{" No": math.log(0.75), " Yes": math.log(0.25)}])]

    judge = judge_on(FakeEngine(script=script))
    assert await judge.score([{"role": "user", "content": "Hi"}], ["x"]) == [pytest.approx(0.25)]


async def test_concurrent_scorings_of_one_request_share_one_checklist():
    engine = FakeEngine(script=judge_script, delay=0.02)
    judge = judge_on(engine)
    chat = [{"role": "user", "content": REQUEST}]
    await asyncio.gather(*(judge.score(chat, [f"reply {i}"]) for i in range(4)))
    assert len([c for c in engine.calls if c.prompt.endswith("<assistant>1.")]) == 1


def test_checklist_mode_is_configured_on_an_engine_only(tmp_path):
    path = tmp_path / "rewards.json"
    spec = {"type": "judge", "mode": "checklist", "engine": "judge"}
    path.write_text(json.dumps({"clients": {"list": spec}}))
    judging = FakeEngine(model_name="judge")
    registry = load_reward_registry(path, None, engine=FakeEngine(), judge_engine=judging)
    assert isinstance(registry.get("list"), ChecklistJudge)
    assert registry.get("list").engine is judging
    path.write_text(json.dumps({"clients": {"list": {**spec, "url": "http://127.0.0.1:1"}}}))
    with pytest.raises(RewardConfigError, match="not a url"):
        read_reward_config(path, judge_engine=True)
