"""Win rates of adaptive-temperature runs against every fixed temperature, and the
temperatures they chose per task family.

Reads one result file of the quality harness whose runs include fixed temperatures
(``strategy_config.mode: fixed``) and challengers (every other run). For each challenger,
each fixed run and each metric, the win rate over the prompts both answered counts a win as
1, a tie as ½ and a loss as 0, with a 95 % percentile bootstrap interval over prompts.
Metrics: ``rules`` (the fraction of the prompt's IFEval instructions met strictly: the reward
the heads were trained on) and ``reward`` (the harness's ``--score-reward``, here the LLM
judge: a different reward).

    python -m ttalign.benchmarks.quality.win_rates \\
        benchmarks/results/quality/adaptive-temperature-ifeval-judge.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ttalign.benchmarks.quality.paired import (
    RESAMPLES,
    SEED,
    bootstrap_interval,
    per_prompt,
    shared_prompts,
)

METRICS = {
    "rules": "IFEval instructions met (strict), the training reward",
    "reward": "LLM judge score, a reward the heads never saw",
}
#: A run that puts this much of its mass on one temperature has collapsed to it.
COLLAPSE = 0.95


def rule_scores(run: Mapping[str, Any]) -> dict[str, float]:
    """Each answered prompt's fraction of instructions met strictly."""
    return {
        output["id"]: sum(output["scores"]["strict"]) / len(output["scores"]["strict"])
        for output in run["outputs"]
        if not output.get("error") and output.get("scores", {}).get("strict")
    }


def scores(run: Mapping[str, Any], metric: str) -> dict[str, float]:
    return rule_scores(run) if metric == "rules" else per_prompt(run, metric)


def win_rate(
    a: Mapping[str, float], b: Mapping[str, float], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, Any]:
    """How often ``a`` beats ``b`` prompt by prompt (ties count ½), with a bootstrap interval."""
    shared = shared_prompts(a, b)
    outcomes = np.array([1.0 if a[k] > b[k] else 0.5 if a[k] == b[k] else 0.0 for k in shared])
    low, high = bootstrap_interval(outcomes, resamples, seed)
    return {
        "win_rate": float(outcomes.mean()),
        "low": low,
        "high": high,
        "wins": int((outcomes == 1.0).sum()),
        "ties": int((outcomes == 0.5).sum()),
        "losses": int((outcomes == 0.0).sum()),
        "n": len(shared),
    }


def is_fixed(run: Mapping[str, Any]) -> bool:
    return (run.get("strategy_config") or {}).get("mode") == "fixed"


def families(output: Mapping[str, Any]) -> set[str]:
    """The IFEval instruction categories of a prompt (the part of each id before ':')."""
    return {iid.split(":")[0] for iid in output.get("scores", {}).get("instructions", [])}


def temperature_distribution(run: Mapping[str, Any]) -> dict[str, Any]:
    """Per family (and ``all``): the share of each temperature, the mean, and a collapse flag.

    Example level counts one choice per reply; token level sums the tokens' histograms.
    """
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for output in run["outputs"]:
        alignment = output.get("alignment") or {}
        if "temperature_histogram" in alignment:
            chosen = Counter({k: int(v) for k, v in alignment["temperature_histogram"].items()})
        elif alignment.get("temperature") is not None:
            chosen = Counter({f"{alignment['temperature']:g}": 1})
        else:
            continue
        for family in {"all", *families(output)}:
            counts[family].update(chosen)
    table: dict[str, Any] = {}
    for family, counter in sorted(counts.items()):
        total = sum(counter.values())
        if not total:
            continue
        shares = {t: counter[t] / total for t in sorted(counter, key=float)}
        top, top_share = max(shares.items(), key=lambda item: item[1])
        table[family] = {
            "count": total,
            "shares": shares,
            "mean": sum(float(t) * s for t, s in shares.items()),
            "collapsed_to": float(top) if top_share >= COLLAPSE else None,
        }
    return table


def analyse(result: Mapping[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    fixed = [r for r in runs if is_fixed(r)]
    challengers = [r for r in runs if not is_fixed(r)]
    levels = {}
    for run in runs:
        levels[run["label"]] = {}
        for metric in METRICS:
            values = scores(run, metric)
            levels[run["label"]][metric] = {
                "mean": float(np.mean(list(values.values()))) if values else None,
                "n": len(values),
            }
    wins = {
        challenger["label"]: {
            base["label"]: {
                metric: win_rate(scores(challenger, metric), scores(base, metric))
                for metric in METRICS
                if scores(challenger, metric) and scores(base, metric)
            }
            for base in fixed
        }
        for challenger in challengers
    }
    return {
        "suite": result.get("suite"),
        "metrics": METRICS,
        "levels": levels,
        "win_rates": wins,
        "temperatures": {r["label"]: temperature_distribution(r) for r in challengers},
    }


def markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# Adaptive temperature: win rates on {report['suite']}", ""]
    for metric, meaning in report["metrics"].items():
        lines += [f"- `{metric}`: {meaning}"]
    lines += ["", "## Levels", "", "| run | rules | judge reward | n |", "|---|---|---|---|"]
    for label, level in report["levels"].items():
        rules, reward = level["rules"], level["reward"]
        lines.append(
            f"| {label} | {_number(rules['mean'])} | {_number(reward['mean'])} | {rules['n']} |"
        )
    for metric in report["metrics"]:
        fixed = sorted({b for row in report["win_rates"].values() for b in row})
        lines += [
            "",
            f"## Win rate under `{metric}` (ties ½; 95 % bootstrap interval; W/T/L)",
            "",
            "| challenger | " + " | ".join(fixed) + " |",
            "|---|" + "---|" * len(fixed),
        ]
        for challenger, row in report["win_rates"].items():
            cells = []
            for base in fixed:
                cell = row.get(base, {}).get(metric)
                cells.append(
                    "-"
                    if cell is None
                    else f"{cell['win_rate']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}] "
                    f"{cell['wins']}/{cell['ties']}/{cell['losses']}"
                )
            lines.append(f"| {challenger} | " + " | ".join(cells) + " |")
    lines += ["", "## Chosen temperatures per task family (share of choices; mean)", ""]
    for label, table in report["temperatures"].items():
        lines += [
            f"### {label}",
            "",
            "| family | n | shares | mean | collapsed |",
            "|---|---|---|---|---|",
        ]
        for family, row in table.items():
            shares = ", ".join(f"{t}: {s:.2f}" for t, s in row["shares"].items())
            collapsed = "-" if row["collapsed_to"] is None else f"to {row['collapsed_to']:g}"
            lines.append(
                f"| {family} | {row['count']} | {shares} | {row['mean']:.2f} | {collapsed} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a result JSON of the quality harness")
    parser.add_argument("--output", type=Path, help="file stem (default: RESULT-winrates)")
    args = parser.parse_args(argv)
    report = analyse(json.loads(args.result.read_text()))
    stem = args.output or args.result.with_name(args.result.stem + "-winrates")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
