"""What RAIN costs in wall time, against plain generation of as many tokens, side by side.

One ttalign server, one engine. For every repeat, prompt and evaluator setting, in this
order: RAIN with parallel leaves (``parallel_leaves=4``, the default), plain generation,
RAIN sequential (``parallel_leaves=1``, the reference's loop), plain generation again.
Each plain request is strategy ``none`` on the same prompt at temperature 1 with
``ignore_eos`` and ``max_tokens`` set to the tokens the RAIN request just before it
committed, so both produced exactly as many tokens. The issue's goal: with the default
configuration and parallel leaves, RAIN takes at most 4× the wall time of plain
generation of the same number of tokens.

    python -m ttalign.benchmarks.rain_cost                      # the defaults (slow on CPU)
    python -m ttalign.benchmarks.rain_cost --prompts 2 --max-iterations 20 --repeats 2

On SmolLM2-135M the self-evaluation's vote is mostly 0, so RAIN seldom commits early
and runs ``max_iterations`` per commit; ``--max-iterations``, ``--prompts`` and
``--max-tokens`` size a run. The server's per-request compute budget is raised (see
``--max-request-candidates``): at the default budget a default RAIN search stops early
after about one commit, and this benchmark measures the search, not the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from ttalign.benchmarks.processes import free_port, running_server, ttalign_server_command
from ttalign.benchmarks.search_efficiency import command_line, write_results
from ttalign.benchmarks.strategy_cost import MODEL_NAME, RESULTS_DIR, Endpoints
from ttalign.server.model_prep import prepare_embedded_model
from ttalign.strategies.rain import RainConfig

#: Short open questions, and one that sounds unsafe but has a harmless answer.
PROMPTS = [
    "What makes a good neighbour?",
    "How can I get into my own house if I locked myself out?",
    "Why do people enjoy walking in the rain?",
    "What should I pack for a weekend of hiking?",
]

#: Evaluator settings: (RAIN's strategy_config, the request's other ttalign fields).
#: ``self`` is RAIN's default configuration (self-evaluation, harmless rubric, vote).
#: ``rules`` scores partial replies with a constraint a prefix can already break.
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "self": ({}, {}),
    "rules": (
        {"evaluator": "reward", "reward": "rules"},
        {"constraints": [{"type": "case", "case": "lower"}]},
    ),
}

#: The issue's goal for the default configuration with parallel leaves.
GOAL_RATIO = 4.0
#: RainConfig's defaults: the goal is stated for them.
DEFAULT_PARALLEL_LEAVES = RainConfig.model_fields["parallel_leaves"].default
DEFAULT_MAX_ITERATIONS = RainConfig.model_fields["max_iterations"].default

#: The server's per-request compute budget here: far above what any sized run uses.
MAX_REQUEST_CANDIDATES = 1_000_000
MAX_REQUEST_ENGINE_TOKENS = 1_000_000_000


def budget_flags(
    candidates: int = MAX_REQUEST_CANDIDATES, engine_tokens: int = MAX_REQUEST_ENGINE_TOKENS
) -> list[str]:
    """``ttalign serve``'s per-request budget flags (by default, a budget RAIN never reaches)."""
    return [
        "--max-request-candidates", str(candidates),
        "--max-request-engine-tokens", str(engine_tokens),
    ]  # fmt: skip


#: Per-request numbers whose medians the summary reports, with their table headings.
COLUMNS = {
    "rain_seconds": "RAIN s",
    "plain_seconds": "plain s",
    "ratio": "RAIN / plain",
    "committed_tokens": "committed tokens",
    "commits": "commits",
    "iterations_per_commit": "iterations / commit",
    "rounds": "rounds",
    "engine_calls_per_token": "engine calls / token",
    "engine_tokens_per_token": "engine tokens / token",
    "rewinds": "rewinds",
    "evaluator_calls": "evaluator calls",
}


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def rain_once(
    ep: Endpoints, prompt: str, setting: str, leaves: int, seed: int, args: argparse.Namespace
) -> tuple[float, dict[str, Any]]:
    config, extra = SETTINGS[setting]
    strategy_config = {**config, "parallel_leaves": leaves}
    if args.max_iterations is not None:
        strategy_config["max_iterations"] = args.max_iterations
    return await ep.chat(
        ep.ttalign_url,
        {
            "messages": messages(prompt),
            "max_tokens": args.max_tokens,
            "ignore_eos": False,  # RAIN as served: it may end the reply itself
            "seed": seed,
            "strategy": "rain",
            "strategy_config": strategy_config,
            **extra,
        },
    )


async def plain_once(ep: Endpoints, prompt: str, tokens: int, seed: int) -> float:
    seconds, body = await ep.chat(
        ep.ttalign_url,
        {
            "messages": messages(prompt),
            "max_tokens": tokens,
            "temperature": 1.0,
            "ignore_eos": True,
            "seed": seed,
            "strategy": "none",
        },
    )
    produced = body["usage"]["completion_tokens"]
    assert produced == tokens, f"plain generation made {produced} tokens, not {tokens}"
    return seconds


def measurement(rain_seconds: float, body: dict[str, Any], plain_seconds: float | None) -> dict:
    """One RAIN request and its plain twin: the raw numbers and the per-token ratios."""
    alignment = body["alignment"]
    committed = body["usage"]["completion_tokens"]
    per_token = (lambda x: x / committed) if committed else (lambda x: None)
    commits = alignment["commits"]
    return {
        "rain_seconds": rain_seconds,
        "plain_seconds": plain_seconds,
        "ratio": rain_seconds / plain_seconds if plain_seconds else None,
        "committed_tokens": committed,
        "finish_reason": body["choices"][0]["finish_reason"],
        "stopped_early": alignment["stopped_early"],
        "commits": commits,
        "iterations": alignment["iterations"],
        "iterations_per_commit": alignment["iterations"] / commits if commits else None,
        "rounds": alignment["rounds"],
        "rewinds": alignment["rewinds"],
        "engine_calls": alignment["engine_calls"],
        "engine_calls_per_token": per_token(alignment["engine_calls"]),
        "engine_completion_tokens": alignment["engine_tokens"]["completion_tokens"],
        "engine_tokens_per_token": per_token(alignment["engine_tokens"]["completion_tokens"]),
        "evaluator_calls": alignment["evaluator_calls"],
        "search_seconds": alignment["search_seconds"],
        "elapsed_seconds": alignment["elapsed_seconds"],
        "alignment": alignment,
        "content": body["choices"][0]["message"]["content"],
    }


def variants(args: argparse.Namespace) -> dict[str, int]:
    return {"parallel": args.parallel_leaves, "sequential": 1}


async def measure(ep: Endpoints, args: argparse.Namespace) -> list[dict[str, Any]]:
    prompts = PROMPTS[: args.prompts]
    total = args.repeats * len(prompts) * len(args.settings) * 2
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):  # interleaved, so drift hits every variant alike
        for index, prompt in enumerate(prompts):
            seed = args.seed + 1000 * repeat + index
            for setting in args.settings:
                for variant, leaves in variants(args).items():
                    rain_seconds, body = await rain_once(ep, prompt, setting, leaves, seed, args)
                    committed = body["usage"]["completion_tokens"]
                    plain = await plain_once(ep, prompt, committed, seed) if committed else None
                    row = {
                        "repeat": repeat,
                        "prompt": index,
                        "setting": setting,
                        "variant": variant,
                        "parallel_leaves": leaves,
                        "seed": seed,
                        **measurement(rain_seconds, body, plain),
                    }
                    rows.append(row)
                    ratio = f"{row['ratio']:.1f}×" if row["ratio"] is not None else "–"
                    stopped = " STOPPED EARLY (budget or deadline)" if row["stopped_early"] else ""
                    print(
                        f"[{len(rows)}/{total}] {setting:>5} {variant:>10} prompt {index} "
                        f"repeat {repeat}: RAIN {rain_seconds:6.1f} s, {committed} tokens, "
                        f"{row['commits']} commits, {row['iterations']} iterations | plain "
                        f"{plain or 0:5.2f} s | {ratio} | {time.perf_counter() - started:.0f} s "
                        f"so far{stopped}",
                        flush=True,
                    )
    return rows


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians per evaluator setting and variant, and the goal's verdict."""
    summary: dict[str, Any] = {}
    for setting in args.settings:
        summary[setting] = {}
        for variant in variants(args):
            group = [r for r in rows if r["setting"] == setting and r["variant"] == variant]
            medians = {}
            for key in COLUMNS:
                values = [r[key] for r in group if r[key] is not None]
                medians[key] = statistics.median(values) if values else None
            stopped = sum(r["stopped_early"] for r in group)
            summary[setting][variant] = {"requests": len(group), "stopped_early": stopped}
            summary[setting][variant].update(medians)
        parallel, sequential = summary[setting]["parallel"], summary[setting]["sequential"]
        summary[setting]["sequential_over_parallel"] = (
            sequential["rain_seconds"] / parallel["rain_seconds"]
        )
    default_config = (
        args.max_iterations in (None, DEFAULT_MAX_ITERATIONS)
        and args.parallel_leaves == DEFAULT_PARALLEL_LEAVES
    )
    headline = summary.get("self", {}).get("parallel", {}).get("ratio")
    goal = {
        "goal_ratio": GOAL_RATIO,
        "self_parallel_ratio": headline,
        "met": headline is not None and headline <= GOAL_RATIO,
        "default_configuration": default_config,
    }
    return {"summary": summary, "goal": goal}


async def run(args: argparse.Namespace, ttalign_url: str) -> dict[str, Any]:
    # No plain vLLM server here: the baseline is ttalign's own "none" on the same engine.
    endpoints = Endpoints(ttalign_url, ttalign_url)
    endpoints.http.timeout = httpx.Timeout(args.request_timeout)
    try:
        # Warm the engine and RAIN's paths (first requests on CPU are slow).
        await endpoints.chat(ttalign_url, {"max_tokens": 8, "n": 2, "temperature": 1.0})
        for setting in args.settings:
            warm = argparse.Namespace(**{**vars(args), "max_tokens": 3, "max_iterations": 2})
            await rain_once(endpoints, PROMPTS[0], setting, args.parallel_leaves, 0, warm)
        rows = await measure(endpoints, args)
    finally:
        await endpoints.http.aclose()
    return {
        "model": MODEL_NAME,
        "prompts": PROMPTS[: args.prompts],
        "settings": {name: SETTINGS[name] for name in args.settings},
        "max_tokens": args.max_tokens,
        "max_iterations": args.max_iterations or DEFAULT_MAX_ITERATIONS,
        "parallel_leaves": args.parallel_leaves,
        "repeats": args.repeats,
        "seed": args.seed,
        "server_budget": {
            "max_request_candidates": args.max_request_candidates,
            "max_request_engine_tokens": args.max_request_engine_tokens,
        },
        **summarize(rows, args),
        "requests": rows,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def to_markdown(r: dict[str, Any]) -> str:
    goal = r["goal"]
    lines = [
        "# RAIN's cost vs plain generation of as many tokens",
        "",
        f"One ttalign server ({r['model']}, one engine). Per prompt, RAIN with "
        f"parallel_leaves={r['parallel_leaves']} and sequential (parallel_leaves=1), each "
        "followed by plain generation (strategy none, temperature 1, ignore_eos) of exactly "
        f"the tokens it committed. RAIN max_tokens={r['max_tokens']}, max_iterations="
        f"{r['max_iterations']}; {len(r['prompts'])} prompts × {r['repeats']} repeats, "
        "interleaved. Medians over the requests of each row; per-token numbers are per "
        "committed token. Server budget per request: "
        f"{r['server_budget']['max_request_candidates']} candidates, "
        f"{r['server_budget']['max_request_engine_tokens']} engine tokens.",
        "",
        "| evaluator | variant | requests | stopped early | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for setting, by_variant in r["summary"].items():
        for variant in ("parallel", "sequential"):
            row = by_variant[variant]
            cells = [_cell(row[key]) for key in COLUMNS]
            lines.append(
                f"| {setting} | {variant} | {row['requests']} | {row['stopped_early']} | "
                + " | ".join(cells)
                + " |"
            )
    lines += [""]
    for setting, by_variant in r["summary"].items():
        lines.append(
            f"- {setting}: sequential RAIN takes {by_variant['sequential_over_parallel']:.2f}× "
            "the wall time of parallel RAIN."
        )
    ratio = goal["self_parallel_ratio"]
    if ratio is not None:
        verdict = "met" if goal["met"] else "not met"
        caveat = (
            ""
            if goal["default_configuration"]
            else " (this run is not RAIN's default configuration, see max_iterations and "
            "parallel_leaves above: indicative only)"
        )
        if r["summary"]["self"]["parallel"]["stopped_early"]:
            caveat += " Some of these requests stopped early (budget or deadline): not valid."
        lines += [
            "",
            f"**Goal: RAIN (self-evaluation, default configuration, parallel leaves) ≤ "
            f"{goal['goal_ratio']:g}× plain generation. Median ratio {ratio:.2f}: "
            f"{verdict}**{caveat}.",
        ]
    lines += [
        "",
        "## Requests",
        "",
        "| evaluator | variant | prompt | repeat | RAIN s | plain s | RAIN / plain | tokens | "
        "finish | stopped early | commits | iterations | rewinds | engine calls | "
        "evaluator calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for q in r["requests"]:
        cells = [
            q["setting"], q["variant"], q["prompt"], q["repeat"], q["rain_seconds"],
            q["plain_seconds"], q["ratio"], q["committed_tokens"], q["finish_reason"],
            "yes" if q["stopped_early"] else "no", q["commits"], q["iterations"], q["rewinds"],
            q["engine_calls"], q["evaluator_calls"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        f"Whole run (server start included): {r['wall_seconds']:.0f} s.",
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ttalign.benchmarks.rain_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=len(PROMPTS),
        choices=range(1, len(PROMPTS) + 1),
        metavar=f"1..{len(PROMPTS)}",
        help="how many of the built-in prompts to use (default: all)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=sorted(SETTINGS),
        default=list(SETTINGS),
        help="evaluator settings to measure (default: all)",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="RAIN's max_tokens")
    parser.add_argument(
        "--max-iterations",
        type=int,
        default=None,
        help=f"RAIN's max_iterations (default: its own, {DEFAULT_MAX_ITERATIONS})",
    )
    parser.add_argument(
        "--parallel-leaves",
        type=int,
        default=DEFAULT_PARALLEL_LEAVES,
        help="parallel_leaves of the parallel variant",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--request-timeout", type=float, default=1800, help="seconds one request may take"
    )
    parser.add_argument(
        "--max-request-candidates",
        type=int,
        default=MAX_REQUEST_CANDIDATES,
        help="the server's per-request candidate budget",
    )
    parser.add_argument(
        "--max-request-engine-tokens",
        type=int,
        default=MAX_REQUEST_ENGINE_TOKENS,
        help="the server's per-request engine-token budget",
    )
    parser.add_argument("--name", default="rain_cost", help="stem of the result files")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR / "rain")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the server below is stopped with its engine.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.perf_counter()
    model = str(prepare_embedded_model())
    logs = Path(tempfile.mkdtemp(prefix="ttalign-rain-cost-"))
    port = free_port()
    command = [
        *ttalign_server_command(model, port, name=MODEL_NAME),
        *budget_flags(args.max_request_candidates, args.max_request_engine_tokens),
    ]
    with running_server(command, port, logs / "ttalign.log") as url:
        print(
            f"ttalign ready at {url} ({time.perf_counter() - started:.0f} s); logs in {logs}",
            flush=True,
        )
        result = asyncio.run(run(args, url))
    result["command"] = command_line("rain_cost", argv)
    result["wall_seconds"] = time.perf_counter() - started
    write_results(args.output_dir / args.name, result, to_markdown(result))


if __name__ == "__main__":
    main()
