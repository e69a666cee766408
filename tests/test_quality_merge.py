"""Merging chunked evaluation results gives the figures of the whole run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from ttalign.benchmarks import evaluate
from ttalign.benchmarks.quality.merge import MergeError, merge_documents

WHOLE = Path(evaluate.__file__).parent / "results" / "quality" / "darwin-ifeval-rules.json"


def chunks(document: dict, cut: int) -> tuple[dict, dict]:
    """The document as two chunks: its first ``cut`` prompts and the rest."""
    first, second = copy.deepcopy(document), copy.deepcopy(document)
    for head, tail in zip(first["runs"], second["runs"], strict=True):
        head["outputs"] = head["outputs"][:cut]
        tail["outputs"] = tail["outputs"][cut:]
        head["cost"]["run_wall_seconds"] = tail["cost"]["run_wall_seconds"] = 10.0
    first["offset"], second["offset"] = 0, cut
    return first, second


def test_merged_chunks_report_the_whole_runs_figures():
    whole = json.loads(WHOLE.read_text())
    merged = merge_documents(chunks(whole, 37), ["a.json", "b.json"])
    assert [r["label"] for r in merged["runs"]] == [r["label"] for r in whole["runs"]]
    for mine, theirs in zip(merged["runs"], whole["runs"], strict=True):
        for key in ("prompt_strict", "prompt_loose", "instruction_strict"):
            assert mine["metrics"][key] == pytest.approx(theirs["metrics"][key])
            assert mine["intervals"][key] == pytest.approx(theirs["intervals"][key])
        assert mine["cost"]["n_prompts"] == theirs["cost"]["n_prompts"]
        assert mine["cost"]["run_wall_seconds"] == 20.0
    assert merged["merged_from"][1] == {"file": "b.json", "offset": 37, "limit": whole["limit"]}


def test_chunks_that_overlap_or_differ_are_refused():
    whole = json.loads(WHOLE.read_text())
    first, second = chunks(whole, 50)
    with pytest.raises(MergeError, match=r"in both a\.json and b\.json"):
        merge_documents([first, first], ["a.json", "b.json"])
    other = copy.deepcopy(second)
    other["settings"]["max_tokens"] = 1
    with pytest.raises(MergeError, match="'settings'"):
        merge_documents([first, other], ["a.json", "b.json"])
    other = copy.deepcopy(second)
    other["runs"] = other["runs"][:1]
    with pytest.raises(MergeError, match="other runs"):
        merge_documents([first, other], ["a.json", "b.json"])
    other = copy.deepcopy(second)
    other["split"] = "tune"
    with pytest.raises(MergeError, match="'split'"):
        merge_documents([first, other], ["a.json", "b.json"])


def test_merged_chunks_keep_the_half_of_the_prompts_they_came_from():
    first, second = chunks(json.loads(WHOLE.read_text()), 30)
    first["split"] = second["split"] = "report"
    first["sample_seed"] = second["sample_seed"] = 7
    merged = merge_documents([first, second], ["a.json", "b.json"])
    assert (merged["split"], merged["sample_seed"]) == ("report", 7)


def test_the_command_writes_the_merged_result(tmp_path):
    whole = json.loads(WHOLE.read_text())
    paths = []
    for number, chunk in enumerate(chunks(whole, 20)):
        paths.append(tmp_path / f"chunk{number}.json")
        paths[-1].write_text(json.dumps(chunk))
    written = evaluate.main(
        ["--merge", *map(str, paths), "--name", "merged", "--output-dir", str(tmp_path)]
    )
    merged = json.loads(written["json"].read_text())
    assert len(merged["runs"][0]["outputs"]) == len(whole["runs"][0]["outputs"])
    assert written["md"].read_text().count("|") > 10
