"""Paired differences between the runs of result files, with bootstrap intervals.

Every run of a result file answered the same prompts, so two runs are best compared prompt
by prompt: the difference of their per-prompt scores, resampled over prompts (percentile
bootstrap, seeded). An interval that excludes 0 is a difference the sample supports.

    python -m ttalign.benchmarks.quality.paired \\
        benchmarks/results/quality/darwin-ifeval-rules.json --against bon8

Runs evaluated at different times (a new strategy beside an old baseline) are compared by
naming several files: they must share the suite, the prompt file, the split and the
sampling settings, and their run labels must differ; only the prompts both runs answered
are paired.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 2000
SEED = 0


def per_prompt(run: Mapping[str, Any], metric: str) -> dict[str, float]:
    """Each answered prompt's score under ``metric`` (``prompt_strict`` or ``reward``)."""
    values: dict[str, float] = {}
    for output in run["outputs"]:
        if output.get("error"):
            continue
        if metric == "reward":
            if output.get("reward") is not None:
                values[output["id"]] = float(output["reward"])
        elif metric == "prompt_strict":
            values[output["id"]] = float(all(output["scores"]["strict"]))
        else:
            raise ValueError(f"unknown metric {metric!r}")
    return values


def shared_prompts(a: Mapping[str, float], b: Mapping[str, float]) -> list[str]:
    """The prompts both runs answered, sorted; a ``ValueError`` when there are none."""
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise ValueError("the runs share no answered prompt")
    return shared


def bootstrap_interval(
    values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of the mean of per-prompt ``values``."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[draws].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def paired_difference(
    a: Mapping[str, float], b: Mapping[str, float], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, float]:
    """Mean of ``a - b`` over the prompts both have, and its 95 % bootstrap interval."""
    shared = shared_prompts(a, b)
    differences = np.array([a[key] - b[key] for key in shared])
    low, high = bootstrap_interval(differences, resamples, seed)
    return {
        "prompts": len(shared),
        "difference": float(differences.mean()),
        "low": float(low),
        "high": float(high),
    }


#: What result files must agree on for their runs to be paired.
JOINED_KEYS = ("suite", "data_file", "split", "sample_seed")
JOINED_SETTINGS = ("max_tokens", "temperature", "top_p", "seed")


def join_runs(documents: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict:
    """One document holding the runs of ``documents`` (named ``names`` in messages), which
    must be evaluations of one prompt set under the same sampling settings."""
    first = documents[0]
    runs: list[Mapping[str, Any]] = list(first["runs"])
    for name, document in zip(names[1:], documents[1:], strict=True):
        for key in JOINED_KEYS:
            if document.get(key) != first.get(key):
                raise ValueError(f"{name} differs from {names[0]} in {key!r}")
        for key in JOINED_SETTINGS:
            if document["settings"].get(key) != first["settings"].get(key):
                raise ValueError(f"{name} differs from {names[0]} in the setting {key!r}")
        labels = {run["label"] for run in runs}
        for run in document["runs"]:
            if run["label"] in labels:
                raise ValueError(f"run label {run['label']!r} of {name} is taken already")
            runs.append(run)
    return {**first, "runs": runs}


def compare(document: Mapping[str, Any], against: str, metrics: Sequence[str]) -> list[dict]:
    """Every other run of ``document`` minus the run labelled ``against``, per metric."""
    runs = {run["label"]: run for run in document["runs"]}
    if against not in runs:
        raise ValueError(f"no run labelled {against!r}; the runs are {', '.join(runs)}")
    rows = []
    for label, run in runs.items():
        if label == against:
            continue
        for metric in metrics:
            reference = per_prompt(runs[against], metric)
            mine = per_prompt(run, metric)
            if not mine or not reference:
                continue
            rows.append({"run": label, "metric": metric, **paired_difference(mine, reference)})
    return rows


def markdown(rows: Sequence[Mapping[str, Any]], against: str) -> str:
    lines = [
        f"| run − {against} | metric | prompts | difference | 95 % bootstrap interval |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['metric']} | {row['prompts']} | {row['difference']:+.3f} | "
            f"[{row['low']:+.3f}, {row['high']:+.3f}] |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m ttalign.benchmarks.quality.paired",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "results",
        type=Path,
        nargs="+",
        metavar="result",
        help="result JSON of benchmarks.evaluate; several are joined (same prompts and "
        "sampling, distinct run labels)",
    )
    parser.add_argument("--against", required=True, help="the label of the reference run")
    parser.add_argument(
        "--metric",
        action="append",
        choices=["prompt_strict", "reward"],
        help="repeatable (default: both)",
    )
    args = parser.parse_args(argv)
    documents = [json.loads(path.read_text()) for path in args.results]
    document = join_runs(documents, [str(path) for path in args.results])
    table = markdown(
        compare(document, args.against, args.metric or ["prompt_strict", "reward"]), args.against
    )
    print(table)
    return table


if __name__ == "__main__":
    main()
