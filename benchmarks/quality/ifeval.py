"""IFEval (Zhou et al., 2023): prompts carrying instructions a program can verify.

Metrics, as IFEval defines them:

- prompt-level accuracy: the share of prompts whose instructions *all* pass;
- instruction-level accuracy: the share of all instructions (over every prompt) that pass;

each under IFEval's strict check and its loose one, from :mod:`reward_clients.ifeval_checks`
(the same checks the rule-verifier reward uses, so harness and reward agree on a pass).

Every request carries the prompt's instructions as ``constraints`` of type ``ifeval``, so
a rule-verifier reward (``reward="rules"``) can steer by them; other rewards ignore them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ttalign.benchmarks.quality.suites import Item, Metric, Suite, mean
from ttalign.reward_clients.ifeval_checks import check_instruction, check_loose


def _used_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    # IFEval's data lists unused kwargs as None; IFEval itself drops them.
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


class IFEval(Suite):
    name = "ifeval"
    filename = "ifeval_dev.jsonl"
    metrics = (
        Metric("prompt_strict", "prompt-level accuracy, strict"),
        Metric("prompt_loose", "prompt-level accuracy, loose"),
        Metric("instruction_strict", "instruction-level accuracy, strict"),
        Metric("instruction_loose", "instruction-level accuracy, loose"),
    )
    plot_metrics = ("prompt_strict", "instruction_strict")

    def load(self, path: Path) -> list[Item]:
        items = []
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                row = json.loads(line)
                instructions = [
                    (iid, _used_kwargs(kw))
                    for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)
                ]
                items.append(Item(str(row["key"]), row["prompt"], {"instructions": instructions}))
        return items

    def constraints(self, item: Item) -> list[dict[str, Any]]:
        return [
            {"type": "ifeval", "instruction_id": iid, "kwargs": kwargs}
            for iid, kwargs in item.meta["instructions"]
        ]

    def score(self, item: Item, output: str) -> dict[str, Any]:
        instructions = item.meta["instructions"]
        return {
            "instructions": [iid for iid, _ in instructions],
            "strict": [check_instruction(i, kw, output, item.prompt) for i, kw in instructions],
            "loose": [check_loose(i, kw, output, item.prompt) for i, kw in instructions],
        }

    def aggregate(self, scored: list[dict[str, Any]]) -> dict[str, float | None]:
        return ifeval_metrics(scored)


def ifeval_metrics(scored: list[dict[str, Any]]) -> dict[str, float | None]:
    """Prompt- and instruction-level accuracy from per-prompt ``strict``/``loose`` lists."""
    metrics: dict[str, float | None] = {}
    for mode in ("strict", "loose"):
        per_prompt = [s[mode] for s in scored]
        metrics[f"prompt_{mode}"] = mean([float(all(passes)) for passes in per_prompt])
        metrics[f"instruction_{mode}"] = mean(
            [float(passed) for passes in per_prompt for passed in passes]
        )
    return {m.key: metrics[m.key] for m in IFEval.metrics}
