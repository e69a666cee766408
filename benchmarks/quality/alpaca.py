"""AlpacaEval instructions (Li et al., 2023), scored by a reward client of the server.

There is no reference answer here: the metric is the mean score of the outputs under the
reward client chosen with ``--score-reward`` (the server's default reward without it),
taken through ``POST /v1/rewards/score``. Scores from different reward clients are on
different scales; compare runs only under one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ttalign.benchmarks.quality.suites import Item, Suite


class AlpacaEval(Suite):
    name = "alpaca"
    filename = "alpaca_eval_dev.jsonl"
    # The harness fills ``mean_reward`` in for every suite; here it is the only metric.
    metrics = ()
    plot_metrics = ("mean_reward",)
    needs_reward_scores = True

    def load(self, path: Path) -> list[Item]:
        with path.open(encoding="utf-8") as lines:
            rows = [json.loads(line) for line in lines if line.strip()]
        return [
            Item(str(i), row["instruction"], {"dataset": row.get("dataset")})
            for i, row in enumerate(rows)
        ]

    def score(self, item: Item, output: str) -> dict[str, Any]:
        return {}

    def aggregate(self, scored: list[dict[str, Any]]) -> dict[str, float | None]:
        return {}
