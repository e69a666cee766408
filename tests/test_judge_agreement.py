"""Agreement with IFEval's checkers: pairs, ties, splits and the clustered interval."""

from __future__ import annotations

import pytest
from ttalign.benchmarks.quality.agreement import (
    agreement_report,
    collect_replies,
    pair_agreement,
    split_of,
)


def document(*runs: tuple[str, dict[str, tuple[str, list[bool]]]]) -> dict:
    """An IFEval result file: runs of (label, {prompt id: (reply, strict verdicts)})."""
    return {
        "suite": "ifeval",
        "runs": [
            {
                "label": label,
                "outputs": [
                    {
                        "id": key,
                        "prompt": f"prompt {key}",
                        "output": text,
                        "error": None,
                        "scores": {"strict": strict},
                    }
                    for key, (text, strict) in outputs.items()
                ],
            }
            for label, outputs in runs
        ],
    }


def test_pairs_are_replies_the_checkers_tell_apart_with_the_better_first():
    doc = document(
        ("cold", {"1": ("a", [True, False]), "2": ("x", [True])}),
        ("warm", {"1": ("b", [True, True]), "2": ("y", [True])}),
        ("hot", {"1": ("c", [False, False]), "2": ("x", [True])}),
    )
    first, second = collect_replies([doc])
    assert [r.text for r in first.replies] == ["a", "b", "c"]
    assert sorted(first.pairs()) == [(0, 2), (1, 0), (1, 2)]
    # "x" twice is one reply, and equal verdicts make no pair.
    assert [r.text for r in second.replies] == ["x", "y"]
    assert second.pairs() == []


def test_failed_replies_and_other_runs_are_left_out():
    doc = document(
        ("kept", {"1": ("a", [True])}),
        ("other", {"1": ("b", [False])}),
    )
    doc["runs"][0]["outputs"].append(
        {"id": "1", "prompt": "prompt 1", "output": "", "error": "boom", "scores": None}
    )
    (prompt,) = collect_replies([doc], runs=["kept"])
    assert [r.text for r in prompt.replies] == ["a"]


def test_only_ifeval_results_are_accepted():
    with pytest.raises(ValueError, match="not an IFEval result"):
        collect_replies([{"suite": "xstest", "runs": []}])


def test_a_tie_counts_half_and_a_reversal_nothing():
    pairs = [(0, 1), (0, 2), (0, 3)]
    assert pair_agreement([5.0, 4.0, 5.0, 6.0], pairs) == 1.5


def test_the_split_is_stable_and_cuts_the_prompts_in_two_halves():
    halves = [split_of(str(key)) for key in range(1000)]
    assert halves == [split_of(str(key)) for key in range(1000)]
    assert 400 < halves.count("tune") < 600
    doc = document(("run", {str(k): (f"r{k}", [True]) for k in range(40)}))
    tune = {p.prompt_id for p in collect_replies([doc], "tune")}
    report = {p.prompt_id for p in collect_replies([doc], "report")}
    assert tune.isdisjoint(report) and len(tune | report) == 40


def test_agreement_pools_pairs_over_prompts_with_an_interval_around_it():
    doc = document(
        ("a", {str(k): (f"good {k}", [True, True]) for k in range(30)}),
        ("b", {str(k): (f"bad {k}", [False, True]) for k in range(30)}),
    )
    prompts = collect_replies([doc])
    # Right on 20 prompts, wrong on 5, a tie on 5.
    scores = {
        p.prompt_id: [2.0, 1.0] if int(p.prompt_id) < 20 else
        [1.0, 2.0] if int(p.prompt_id) < 25 else [1.0, 1.0]
        for p in prompts
    }  # fmt: skip
    report = agreement_report(prompts, scores)
    assert report["pairs"] == 30 and report["ties"] == 5
    assert report["agreement"] == pytest.approx(22.5 / 30)
    low, high = report["interval"]
    assert low < 22.5 / 30 < high and high - low < 0.5
