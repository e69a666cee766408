"""Agreement with IFEval's checkers: pairs, ties, splits and the clustered interval."""

from __future__ import annotations

import json
import sys

import pytest
from ttalign.benchmarks.quality.agreement import (
    agreement_report,
    collect_replies,
    pair_agreement,
    split_of,
)
from ttalign.benchmarks.quality.harmlessness import harmlessness_report, labelled_pairs


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


def xstest_document(outputs: dict[str, tuple[str, str]]) -> dict:
    """An XSTest result file: {prompt id: (label, reply)}."""
    return {
        "suite": "xstest",
        "runs": [
            {
                "label": "none",
                "outputs": [
                    {
                        "id": key,
                        "prompt": f"prompt {key}",
                        "output": reply,
                        "error": None,
                        "scores": {"label": label},
                    }
                    for key, (label, reply) in outputs.items()
                ],
            }
        ],
    }


def test_harmlessness_pairs_a_compliant_reply_with_a_refusal():
    doc = xstest_document(
        {
            "1": ("safe", "To stop a Python process, call kill with its id."),
            "2": ("unsafe", "I'm sorry, but I can't help with that."),  # refused: no pair
            "3": ("unsafe", "Step one: find the address."),
        }
    )
    pairs = labelled_pairs([doc])
    assert [(p.prompt_id, p.label) for p in pairs] == [("1", "safe"), ("3", "unsafe")]
    assert pairs[0].refusal != pairs[1].refusal
    report = harmlessness_report(pairs, {"1": [0.2, 0.9], "3": [0.1, 0.8]})
    assert report["over_refusal_detected"]["share"] == 0.0
    assert report["unsafe_compliance_detected"]["share"] == 1.0


def test_the_command_scores_through_the_server(tmp_path, monkeypatch):
    from ttalign.benchmarks import judge_agreement
    from ttalign.reward_clients.registry import RewardRegistry
    from ttalign.server.app import create_app

    from tests.conftest import fake_settings
    from tests.fakes import FakeEngine, FakeReward
    from tests.servers import serve_in_thread

    doc = document(
        ("a", {str(k): ("a long and careful reply", [True, True]) for k in range(4)}),
        ("b", {str(k): ("short", [True, False]) for k in range(4)}),
    )
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps(doc))
    app = create_app(
        fake_settings(),
        engine_factory=lambda _: FakeEngine(),
        reward_factory=lambda *_: RewardRegistry({"len": FakeReward(len, name="len")}),
    )
    with serve_in_thread(app) as server:
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "judge_agreement", "--replies", str(replies), "--reward", "len",
                "--split", "all", "--base-url", server.base_url,
                "--output-dir", str(tmp_path), "--name", "agreement",
            ],
        )  # fmt: skip
        judge_agreement.main()
    result = json.loads((tmp_path / "agreement.json").read_text())
    assert result["rewards"]["len"]["agreement"] == 1.0
    assert result["rewards"]["len"]["pairs"] == 4
    assert "| len | 4 | 1.000 |" in (tmp_path / "agreement.md").read_text()
