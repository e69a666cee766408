"""Merge result files of one evaluation run in chunks (``--offset``/``--limit``) into one.

Long evaluations are split into chunks over disjoint prompts. Merging checks that the chunks
belong together (the same suite, data file, settings, and runs with the same requests), joins
each run's outputs, and recomputes every metric, interval and cost over the whole set, so the
merged file reads exactly as if it had been run at once (its wall time is the chunks' sum).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from ttalign.benchmarks.quality.harness import run_cost, run_metrics
from ttalign.benchmarks.quality.suites import suites

#: What the chunks of one evaluation must agree on.
SHARED_KEYS = ("suite", "data_file", "split", "sample_seed", "settings", "metrics", "plot_metrics")


class MergeError(ValueError):
    """The files are not chunks of one evaluation."""


def merge_documents(documents: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict:
    """One result document from ``documents`` (chunks, named ``names`` in messages)."""
    if len(documents) < 2:
        raise MergeError("merging needs at least two result files")
    first = documents[0]
    for name, document in zip(names[1:], documents[1:], strict=True):
        for key in SHARED_KEYS:
            if document.get(key) != first.get(key):
                raise MergeError(f"{name} differs from {names[0]} in {key!r}")
        if _run_requests(document) != _run_requests(first):
            raise MergeError(f"{name} has other runs than {names[0]}")
    suite = suites()[first["suite"]]
    scored = bool(first["settings"].get("scored"))
    runs = []
    for position, run in enumerate(first["runs"]):
        records: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        wall = 0.0
        for name, document in zip(names, documents, strict=True):
            chunk = document["runs"][position]
            for record in chunk["outputs"]:
                key = str(record["id"])
                if key in seen:
                    raise MergeError(
                        f"prompt {key} of run {run['label']!r} is in both {seen[key]} and {name}"
                    )
                seen[key] = name
                records.append(record)
            wall += chunk["cost"].get("run_wall_seconds") or 0.0
        metrics, intervals = run_metrics(suite, records, scored=scored)
        runs.append(
            {
                **{k: run[k] for k in ("label", "strategy", "strategy_config", "reward")},
                "request": run["request"],
                "metrics": metrics,
                "intervals": {k: list(v) if v else None for k, v in intervals.items()},
                "cost": run_cost(records, wall),
                "outputs": records,
            }
        )
    return {
        **{key: first.get(key) for key in SHARED_KEYS},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "server": first.get("server"),
        "merged_from": [
            {"file": name, "offset": d.get("offset"), "limit": d.get("limit")}
            for name, d in zip(names, documents, strict=True)
        ],
        "limit": sum(len(d["runs"][0]["outputs"]) for d in documents) if first["runs"] else 0,
        "offset": None,
        "runs": runs,
    }


def _run_requests(document: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(run["label"], run["request"]) for run in document["runs"]]
