"""The win-rate and temperature-distribution analysis of adaptive-temperature runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ttalign.benchmarks.quality.win_rates import (
    analyse,
    main,
    temperature_distribution,
    win_rate,
)


def output(key: str, strict: list[bool], reward: float, alignment: dict, ids: list[str]) -> dict:
    return {
        "id": key,
        "error": None,
        "scores": {"instructions": ids, "strict": strict, "loose": strict},
        "reward": reward,
        "alignment": alignment,
    }


FAMILIES = {"a": ["punctuation:no_comma"], "b": ["length_constraints:number_words"]}


def run(label: str, config: dict, rows: dict[str, tuple[list[bool], float, dict]]) -> dict:
    return {
        "label": label,
        "strategy": "adaptive_temperature",
        "strategy_config": config,
        "outputs": [
            output(k, s, r, a, FAMILIES.get(k, ["change_case:english_lowercase"]))
            for k, (s, r, a) in rows.items()
        ],
    }


def test_win_rate_counts_ties_as_half() -> None:
    result = win_rate({"a": 1.0, "b": 0.5, "c": 0.0}, {"a": 0.0, "b": 0.5, "c": 1.0})
    assert result["win_rate"] == 0.5
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (1, 1, 1, 3)
    assert result["low"] <= 0.5 <= result["high"]
    assert win_rate({"a": 1.0, "b": 0.5, "c": 0.0}, {"a": 0.0, "b": 0.5, "c": 1.0}) == result


def test_win_rate_uses_only_shared_prompts_and_refuses_none() -> None:
    assert win_rate({"a": 1.0, "b": 1.0}, {"a": 0.0})["n"] == 1
    with pytest.raises(ValueError):
        win_rate({"a": 1.0}, {"b": 0.0})


def test_example_and_token_distributions_per_family() -> None:
    example = run(
        "learned-example",
        {"level": "example"},
        {"a": ([True], 3.0, {"temperature": 0.2}), "b": ([False], 2.0, {"temperature": 0.6})},
    )
    table = temperature_distribution(example)
    assert table["all"]["shares"] == {"0.2": 0.5, "0.6": 0.5}
    assert table["punctuation"]["shares"] == {"0.2": 1.0}
    assert table["all"]["collapsed_to"] is None
    assert table["punctuation"]["collapsed_to"] == 0.2
    token = run(
        "learned-token",
        {"level": "token"},
        {"a": ([True], 1.0, {"temperature_histogram": {"0": 3, "1": 1}})},
    )
    row = temperature_distribution(token)["all"]
    assert row["shares"] == {"0": 0.75, "1": 0.25}
    assert row["mean"] == pytest.approx(0.25)


def test_analysis_compares_every_challenger_with_every_fixed_run(tmp_path: Path) -> None:
    fixed = run(
        "fixed-0", {"mode": "fixed"}, {"a": ([True, False], 5.0, {}), "b": ([False], 1.0, {})}
    )
    learned = run(
        "learned-example",
        {"mode": "learned"},
        {"a": ([True, True], 4.0, {"temperature": 0}), "b": ([False], 1.0, {"temperature": 0})},
    )
    report = analyse({"suite": "ifeval", "runs": [fixed, learned]})
    cell = report["win_rates"]["learned-example"]["fixed-0"]
    assert cell["rules"]["win_rate"] == 0.75  # a: 1.0 > 0.5 wins, b: tie
    assert cell["reward"]["win_rate"] == 0.25  # a: 4 < 5 loses, b: tie
    assert report["levels"]["fixed-0"]["rules"]["mean"] == 0.25
    assert report["temperatures"]["learned-example"]["all"]["collapsed_to"] == 0.0
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"suite": "ifeval", "runs": [fixed, learned]}))
    main([str(path)])
    written = json.loads((tmp_path / "r-winrates.json").read_text())
    assert written["win_rates"]["learned-example"]["fixed-0"]["rules"]["win_rate"] == 0.75
    assert "collapsed" in (tmp_path / "r-winrates.md").read_text()
