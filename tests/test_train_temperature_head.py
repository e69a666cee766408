"""The head-training script's prompt sets and sample cache (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# The training script imports torch at the top.
pytest.importorskip("torch", reason="needs torch")

from ttalign.benchmarks.evaluate import DEFAULT_DATA_DIR
from ttalign.benchmarks.train_temperature_head import (
    Reply,
    arithmetic_prompts,
    file_prompts,
    ifeval_prompts,
    load_samples,
    save_samples,
)
from ttalign.reward_clients.rules import RuleVerifierReward


async def test_arithmetic_prompts_are_deterministic_and_their_regex_checks_the_answer() -> None:
    prompts = arithmetic_prompts(5, seed=3)
    assert prompts == arithmetic_prompts(5, seed=3)
    first = prompts[0]
    a, op, b = first.text.removeprefix("What is ").split("?")[0].split()
    answer = eval(f"{a} {op} {b}")
    reward = RuleVerifierReward().bind(first.constraints)
    conversation = [{"role": "user", "content": first.text}]
    right, wrong = await reward.score(conversation, [f"It is {answer}.", f"It is {answer}1."])
    assert (right, wrong) == (1.0, 0.0)


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "ifeval_dev.jsonl").is_file(), reason="no dev set")
def test_ifeval_training_prompts_never_include_the_evaluated_rows() -> None:
    rows = (DEFAULT_DATA_DIR / "ifeval_dev.jsonl").read_text().splitlines()
    evaluated = {f"ifeval-{json.loads(line)['key']}" for line in rows[:100]}
    training = ifeval_prompts(DEFAULT_DATA_DIR / "ifeval_dev.jsonl", 100, 200, seed=0)
    assert len(training) == 200
    assert not evaluated & {p.id for p in training}
    assert all(c["type"] == "ifeval" for p in training for c in p.constraints)


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "ifeval_dev.jsonl").is_file(), reason="no dev set")
def test_training_on_the_tune_half_never_sees_a_report_prompt() -> None:
    from ttalign.benchmarks.quality.agreement import split_of

    training = ifeval_prompts(DEFAULT_DATA_DIR / "ifeval_dev.jsonl", 0, 500, seed=0, split="tune")
    assert len(training) > 100
    assert {split_of(p.id.removeprefix("ifeval-")) for p in training} == {"tune"}


def test_a_prompt_file_and_the_sample_cache_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text(
        json.dumps({"id": "x", "prompt": "Say hi.", "constraints": [{"type": "json"}]})
        + "\n\n"
        + json.dumps({"prompt": "Count."})
        + "\n"
    )
    prompts = file_prompts(source)
    assert [(p.id, p.text, p.constraints) for p in prompts] == [
        ("x", "Say hi.", [{"type": "json"}]),
        ("2", "Count.", []),
    ]
    sampled = [(prompts[0], [1, 2], [Reply([5, 6], [0.2, 1.0], 0.5)])]
    cache = tmp_path / "cache" / "samples.json"
    save_samples(cache, sampled, 12.5)
    assert load_samples(cache, prompts) == (sampled, 12.5)
