"""Write an evaluation's result: the JSON document, a markdown table and a PNG plot.

The table and the plot are drawn from the JSON document alone, so they can be redrawn
from a committed result without a server
(``python -m ttalign.benchmarks.evaluate --render X.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from ttalign.benchmarks.quality.suites import Metric

#: Rows every suite's table ends with: (key, description, percent).
REWARD_ROWS = (
    ("mean_reward", "mean reward of the outputs (score reward)", False),
    ("strategy_reward", "reward of the returned choice, as the strategy scored it", False),
)
COST_ROWS = (
    ("mean_wall_seconds", "wall time per prompt, client side (s)"),
    ("mean_elapsed_seconds", "alignment time per prompt, server side (s)"),
    ("mean_engine_calls", "engine calls per prompt"),
    ("mean_candidates_generated", "candidates generated per prompt"),
    ("mean_candidates_scored", "candidates scored per prompt"),
    ("mean_reward_calls", "reward calls per prompt"),
    ("mean_reward_seconds", "reward scoring time per prompt (s)"),
    ("mean_engine_completion_tokens", "completion tokens generated per prompt"),
    ("mean_engine_total_tokens", "engine tokens per prompt (prompt + generated, all calls)"),
    ("run_wall_seconds", "wall time of the whole run (s)"),
    ("stopped_early", "prompts stopped early at a deadline"),
)


def metric_legend(metrics: Iterable[Metric]) -> list[dict[str, Any]]:
    """The suite's metrics as the JSON document records them."""
    return [{"key": m.key, "description": m.description, "percent": m.percent} for m in metrics]


def format_value(value: float | int | None, percent: bool = False) -> str:
    """``45.0%``, ``0.512``, ``3`` or ``n/a`` for a value that was not measured."""
    if value is None:
        return "n/a"
    if percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}"


def format_interval(
    value: float | int | None, interval: list[float] | None, percent: bool = False
) -> str:
    """``45.0% [38.1–52.0]``, or the value alone where no interval was measured."""
    shown = format_value(value, percent)
    if value is None or not interval:
        return shown
    low, high = (f"{100 * x:.1f}" if percent else f"{x:.3f}" for x in interval)
    return f"{shown} [{low}–{high}]"


def markdown_table(document: dict[str, Any]) -> str:
    """A table with one column per run: quality metrics (with their 95 % intervals where the
    result has them), rewards, then cost per prompt."""
    runs = document["runs"]
    header = "| metric | " + " | ".join(_cell(r["label"]) for r in runs) + " |"
    rule = "|---|" + "---:|" * len(runs)
    lines = [f"# {document['suite']}: {document['server']['model']}", "", header, rule]

    def row(name: str, values: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    def cell(run: dict[str, Any], key: str, percent: bool) -> str:
        interval = (run.get("intervals") or {}).get(key)
        return format_interval(run["metrics"].get(key), interval, percent)

    for metric in document["metrics"]:
        row(metric["description"], [cell(r, metric["key"], metric["percent"]) for r in runs])
    scored = document["settings"]["scored"]
    for key, description, percent in REWARD_ROWS:
        if (key == "mean_reward" and scored) or any(
            r["metrics"].get(key) is not None for r in runs
        ):
            row(description, [cell(r, key, percent) for r in runs])
    row("prompts (failed requests)", [_count(r["cost"]) for r in runs])
    if scored:
        row("outputs the score reward failed on", [str(r["cost"]["n_reward_errors"]) for r in runs])
    for key, description in COST_ROWS:
        row(description, [format_value(r["cost"].get(key)) for r in runs])

    settings = document["settings"]
    if any(r.get("intervals") for r in runs):
        lines += ["", "Brackets: 95 % confidence intervals over the prompts."]
    lines += [
        "",
        f"Data: `{document['data_file']}`"
        + _subset(document)
        + f". Server: {document['server']['base_url']}. Created {document['created']}.",
        "Sampling: "
        + ", ".join(f"{k}={v}" for k, v in settings["sampling"].items())
        + f"; concurrency {settings['concurrency']}; score reward: "
        + f"{settings['score_reward'] or ('server default' if settings['scored'] else 'none')}.",
        "",
        "Runs (ttalign request fields):",
        "",
    ]
    lines += [f"- `{r['label']}`: `{json.dumps(r['request'], sort_keys=True)}`" for r in runs]
    if document.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in document["notes"]]
    return "\n".join(lines) + "\n"


def _subset(document: dict[str, Any]) -> str:
    seed, offset, limit = (document.get(k) for k in ("sample_seed", "offset", "limit"))
    split = document.get("split")
    half = f" of the {split} half (`--split {split}`)" if split else ""
    if seed is None and not offset and not limit:
        return half and f", the items{half}"
    order = "file order" if seed is None else f"random order of seed {seed}"
    span = f"{limit} items" if limit else "the items"
    return f", {span}{half} from position {offset or 0} in {order}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _count(cost: dict[str, Any]) -> str:
    return f"{cost['n_prompts']} ({cost['n_errors']})"


def plot(document: dict[str, Any], path: Path) -> None:
    """Each plotted metric against candidates generated per prompt, one point per run.

    Runs of one strategy are joined by a line, so a strategy's curve over its sample counts
    can be read against the baseline's point at one candidate. Error bars are the 95 %
    intervals, where the result has them.
    """
    legend = {m["key"]: m for m in document["metrics"]}
    keys = document["plot_metrics"]
    figure = Figure(figsize=(5.5 * len(keys), 4.2), layout="constrained")
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        percent = legend.get(key, {}).get("percent", False)
        scale = 100.0 if percent else 1.0
        by_strategy: dict[str, list[tuple[float, float, str, list[float] | None]]] = {}
        for run in document["runs"]:
            x = run["cost"].get("mean_candidates_generated")
            y = run["metrics"].get(key)
            if x is None or y is None:
                continue
            interval = (run.get("intervals") or {}).get(key)
            by_strategy.setdefault(run["strategy"], []).append(
                (x, y * scale, run["label"], interval)
            )
        for strategy, points in by_strategy.items():
            points.sort(key=lambda point: point[:2])
            line = ax.plot(
                [p[0] for p in points], [p[1] for p in points], marker="o", label=strategy
            )[0]
            for x, y, _, interval in points:
                if interval:
                    low, high = (scale * v for v in interval)
                    ax.errorbar(
                        x, y, yerr=[[y - low], [high - y]], color=line.get_color(), capsize=3
                    )
            for x, y, label, _ in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        xs = [p[0] for points in by_strategy.values() for p in points]
        if xs and min(xs) > 0:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
        if percent:
            ax.set_ylim(0, 100)
        ax.set_xlabel("candidates generated per prompt")
        ax.set_ylabel(legend.get(key, {}).get("description", key) + (" (%)" if percent else ""))
        ax.set_title(f"{document['suite']}: {key}")
        ax.margins(x=0.15)
        ax.grid(alpha=0.3)
        if by_strategy:
            ax.legend(fontsize=8)
    figure.suptitle(document["server"]["model"], fontsize=9)
    figure.savefig(path, dpi=120)


def write_result(document: dict[str, Any], output_dir: Path, name: str) -> dict[str, Path]:
    """Write ``NAME.json``, ``NAME.md`` and ``NAME.png`` under ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: output_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    paths["md"].write_text(markdown_table(document))
    plot(document, paths["png"])
    return paths
