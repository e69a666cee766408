"""RAIN's search efficiency before and after issue 19, per committed token and against bounds.

RAIN with its default configuration (self-evaluation; each tree's own ``RainConfig``
defaults) on each prompt, measured in two phases of one invocation: ``before`` (ttalign
from the baseline commit, ``--before-ref``, in a temporary git worktree, or an existing
tree, ``--before-tree``, through ``benchmarks/run_from_tree.py``) and ``after`` (this
tree, on its new defaults). Each phase runs in two steps, one server at a time:

1. ttalign (``--trace-engine-prompts``, per-request budget raised as in ``rain_cost``):
   per prompt, RAIN with ``return_trace``, then plain generation of as many tokens on the
   same server (strategy ``none``, temperature 1, ``ignore_eos``, ``max_tokens`` = the
   tokens RAIN committed). vLLM's prefix-cache counters are read around each RAIN request.
2. a plain vLLM server with that ttalign's KV-cache block size: each RAIN request's call
   timeline replayed as plain ``/v1/completions`` calls (``benchmarks/critical_path.py``),
   its **exact bound**.

Per committed token it reports engine calls, generated engine tokens, prompt tokens, and
prefill computed and found cached (``alignment.engine_prefill`` when the server reports it,
else the delta of ``vllm:prefix_cache_*`` around the request, else null, as before the
issue); per request, RAIN wall / plain and RAIN wall / exact bound; medians over prompts.
The goal: after, RAIN ≤ 1.2× its exact bound and ≤ 40× plain generation.

    python -m ttalign.benchmarks.rain_efficiency                     # 5 prompts, both phases
    python -m ttalign.benchmarks.rain_efficiency --bound-phases after  # no bound for before
    python -m ttalign.benchmarks.rain_efficiency --phases after --prompts 1 \\
        --max-iterations 4 --max-tokens 8 --output-dir /tmp/rain-eff  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx
from ttalign.benchmarks import chat_prompts, rain_cost, search_efficiency
from ttalign.benchmarks.critical_path import critical_path_seconds, replay
from ttalign.benchmarks.processes import (
    free_port,
    running_server,
    ttalign_server_command,
    vllm_build,
    vllm_server_command,
)
from ttalign.benchmarks.search_efficiency import (
    add_rain_options,
    add_run_options,
    argument_parser,
    baseline_tree,
    command_line,
    counter_delta,
    from_tree,
    markdown_table,
    median,
    per_token,
    plain_body,
    ratio,
    request_prefill,
    run_footer,
    setting_default,
    settled_counters,
    start_run,
    timed_chat,
    warm_up,
    with_sizes,
    write_results,
)
from ttalign.benchmarks.strategy_cost import MODEL_NAME, RESULTS_DIR

#: RAIN's prompts first, then the throughput prompts: the default takes the first five.
PROMPTS = [*rain_cost.PROMPTS, *chat_prompts.PROMPTS]
DEFAULT_PROMPTS = 5
PHASES = ("before", "after")
#: The last commit before issue 19's changes.
BEFORE_REF = "480a53e"
#: The issue's goals for the ``after`` phase (medians over prompts).
GOAL_OVER_EXACT_BOUND = 1.2
GOAL_OVER_PLAIN = 40.0
#: The ratio RAIN had before the issue (``results/rain/rain_cost.md``), for the report.
BEFORE_OVER_PLAIN = 97.0

#: Per-request numbers whose medians the summary reports, with their table headings.
COLUMNS = {
    "rain_seconds": "RAIN s",
    "plain_seconds": "plain s",
    "exact_bound_seconds": "exact bound s",
    "over_plain": "RAIN / plain",
    "over_exact_bound": "RAIN / exact bound",
    "committed_tokens": "committed tokens",
    "engine_calls_per_token": "engine calls / token",
    "engine_tokens_per_token": "generated engine tokens / token",
    "prompt_tokens_per_token": "engine prompt tokens / token (once per call)",
    "computed_prefill_per_token": "computed prefill / token",
    "cached_prefill_per_token": "cached prefill / token",
}

#: The per-request table's columns: row key -> heading.
REQUEST_COLUMNS = {
    "phase": "phase",
    "prompt": "prompt",
    "rain_seconds": "RAIN s",
    "plain_seconds": "plain s",
    "exact_bound_seconds": "exact bound s",
    "over_plain": "RAIN / plain",
    "over_exact_bound": "RAIN / exact bound",
    "committed_tokens": "tokens",
    "finish_reason": "finish",
    "stopped_early": "stopped early",
    "engine_calls": "engine calls",
    "engine_completion_tokens": "engine tokens",
    "computed_prefill_tokens": "computed prefill",
    "cached_prefill_tokens": "cached prefill",
}


# --- requests -------------------------------------------------------------------------------


def rain_body(prompt: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """RAIN as served, on its tree's default configuration, with the call timeline.

    Its plain twin is :func:`~search_efficiency.plain_body` of as many tokens.
    """
    return search_efficiency.rain_body(prompt, seed, args, return_trace=True)


def measurement(
    rain_seconds: float,
    body: dict[str, Any],
    plain_seconds: float | None,
    delta: dict[str, float | None] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """One RAIN request and its plain twin as a row, and the request's call timeline."""
    alignment = dict(body["alignment"])
    trace = alignment.pop("trace", None) or {}
    timeline = trace.get("timeline")
    committed = body["usage"]["completion_tokens"]
    engine_tokens = alignment.get("engine_tokens") or {}
    prefill = request_prefill(alignment, delta)
    row = {
        "rain_seconds": rain_seconds,
        "plain_seconds": plain_seconds,
        "exact_bound_seconds": None,
        "over_plain": ratio(rain_seconds, plain_seconds),
        "over_exact_bound": None,
        "committed_tokens": committed,
        "finish_reason": body["choices"][0]["finish_reason"],
        "stopped_early": bool(alignment.get("stopped_early")),
        "engine_calls": alignment.get("engine_calls"),
        "engine_completion_tokens": engine_tokens.get("completion_tokens"),
        "engine_prompt_tokens": engine_tokens.get("prompt_tokens"),
        "computed_prefill_tokens": prefill["computed_tokens"],
        "cached_prefill_tokens": prefill["cached_tokens"],
        "prefill_source": prefill["source"],
        "engine_calls_per_token": per_token(alignment.get("engine_calls"), committed),
        "engine_tokens_per_token": per_token(engine_tokens.get("completion_tokens"), committed),
        "prompt_tokens_per_token": per_token(engine_tokens.get("prompt_tokens"), committed),
        "computed_prefill_per_token": per_token(prefill["computed_tokens"], committed),
        "cached_prefill_per_token": per_token(prefill["cached_tokens"], committed),
        "timeline_engine_calls": None,
        "recorded_critical_path_seconds": None,
        "counter_delta": delta,
        "alignment": alignment,
    }
    if timeline is not None:
        row["timeline_engine_calls"] = sum(call["kind"] == "engine" for call in timeline)
        row["recorded_critical_path_seconds"] = critical_path_seconds(timeline)
    return row, timeline


def add_bound(row: dict[str, Any], exact_bound_seconds: float) -> None:
    """Record a request's exact bound and its wall time over it."""
    row["exact_bound_seconds"] = exact_bound_seconds
    row["over_exact_bound"] = ratio(row["rain_seconds"], exact_bound_seconds)


async def measure_phase(
    url: str, phase: str, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]] | None]]:
    """Every prompt's RAIN request and plain twin on one ttalign server; rows and timelines."""
    rows: list[dict[str, Any]] = []
    timelines: list[list[dict[str, Any]] | None] = []
    async with httpx.AsyncClient(timeout=args.request_timeout) as http:
        small = with_sizes(args, max_tokens=3, max_iterations=2)
        await warm_up(
            http, url, [{**plain_body(PROMPTS[-1], 8, 0), "n": 2}, rain_body(PROMPTS[-1], 0, small)]
        )
        for index, prompt in enumerate(PROMPTS[: args.prompts]):
            seed = args.seed + index
            before = await settled_counters(http, url)
            rain_seconds, body = await timed_chat(http, url, rain_body(prompt, seed, args))
            delta = counter_delta(before, await settled_counters(http, url))
            committed = body["usage"]["completion_tokens"]
            plain_seconds = None
            if committed:
                twin = plain_body(prompt, committed, seed)
                plain_seconds, plain = await timed_chat(http, url, twin)
                produced = plain["usage"]["completion_tokens"]
                assert produced == committed, f"plain made {produced} tokens, not {committed}"
            row, timeline = measurement(rain_seconds, body, plain_seconds, delta)
            rows.append({"phase": phase, "prompt": index, "seed": seed, **row})
            timelines.append(timeline)
            print(
                f"{phase} prompt {index}: RAIN {rain_seconds:.1f} s, {committed} tokens, "
                f"{row['engine_calls']} engine calls | plain {plain_seconds or 0:.2f} s",
                flush=True,
            )
    return rows, timelines


async def replay_phase(
    url: str, rows: Sequence[dict[str, Any]], timelines: Sequence[list[dict[str, Any]] | None]
) -> None:
    """Each request's exact bound: its timeline replayed on a plain vLLM server."""
    async with httpx.AsyncClient(timeout=None) as http:
        warm = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8, "n": 2}
        (await http.post(f"{url}/v1/completions", json=warm)).raise_for_status()
        for row, timeline in zip(rows, timelines, strict=True):
            if timeline is None:
                continue
            add_bound(row, await replay(timeline, http, url, MODEL_NAME))
            print(
                f"{row['phase']} prompt {row['prompt']}: exact bound "
                f"{row['exact_bound_seconds']:.1f} s, RAIN / bound {row['over_exact_bound']:.2f}",
                flush=True,
            )


# --- summary and report ---------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]], phases: Sequence[str]) -> dict[str, Any]:
    """Medians over prompts per phase, and the goal's verdict on ``after``."""
    summary: dict[str, Any] = {}
    for phase in phases:
        group = [r for r in rows if r["phase"] == phase]
        summary[phase] = {
            "requests": len(group),
            "stopped_early": sum(bool(r["stopped_early"]) for r in group),
            "prefill_sources": sorted({r["prefill_source"] or "none" for r in group}),
            **{key: median(r[key] for r in group) for key in COLUMNS},
        }
    after = summary.get("after")
    goal: dict[str, Any] = {
        "max_over_exact_bound": GOAL_OVER_EXACT_BOUND,
        "max_over_plain": GOAL_OVER_PLAIN,
        "over_exact_bound": None if after is None else after["over_exact_bound"],
        "over_plain": None if after is None else after["over_plain"],
    }
    goal["met"] = (
        goal["over_exact_bound"] is not None
        and goal["over_plain"] is not None
        and goal["over_exact_bound"] <= GOAL_OVER_EXACT_BOUND
        and goal["over_plain"] <= GOAL_OVER_PLAIN
        and not after["stopped_early"]
    )
    return {"summary": summary, "goal": goal}


def goal_line(goal: dict[str, Any]) -> str:
    """The verdict on the issue's goal, in words."""
    if goal["over_exact_bound"] is None or goal["over_plain"] is None:
        return "**Goal not measured**: the run has no complete `after` phase."
    verdict = "met" if goal["met"] else "not met"
    return (
        f"**Goal: after, RAIN ≤ {goal['max_over_exact_bound']:g}× its exact bound and ≤ "
        f"{goal['max_over_plain']:g}× plain generation (was {BEFORE_OVER_PLAIN:g}× plain). "
        f"Medians: {goal['over_exact_bound']:.2f}× the exact bound, {goal['over_plain']:.1f}× "
        f"plain: {verdict}.**"
    )


def to_markdown(r: dict[str, Any]) -> str:
    summary_rows = []
    for phase, s in r["summary"].items():
        summary_rows.append(
            [phase, s["requests"], s["stopped_early"], ", ".join(s["prefill_sources"])]
            + [s[key] for key in COLUMNS]
        )
    block_sizes = ", ".join(
        f"{phase}: {size or 'vLLM default'}" for phase, size in r["replay_block_size"].items()
    )
    lines = [
        "# RAIN's search efficiency before and after issue 19",
        "",
        f"{r['model']} on {r['vllm']}; RAIN max_tokens={r['max_tokens']}, max_iterations="
        f"{r['max_iterations'] or 'its default'}, the rest each tree's default configuration "
        f"(self-evaluation); {len(r['prompts'])} prompts, seeds from {r['seed']}. `before` is "
        f"ttalign at `{r['before_ref']}`, `after` this tree on its defaults. Plain: strategy "
        "none on the same server, temperature 1, ignore_eos, as many tokens as RAIN "
        "committed. Exact bound: the request's call timeline replayed on a plain vLLM server "
        f"with the same block size ({block_sizes}; `benchmarks/critical_path.py`). "
        "Prefill per token comes from `alignment.engine_prefill` (source `alignment`), the "
        "delta of vLLM's prefix-cache counters around the request (`counters`), or is "
        "unknown (`none`: the server reports neither). Medians over prompts; per-token "
        "numbers are per committed token.",
        "",
        *markdown_table(
            ["phase", "requests", "stopped early", "prefill source", *COLUMNS.values()],
            summary_rows,
        ),
        "",
        goal_line(r["goal"]),
        "",
        "## Requests",
        "",
        *markdown_table(
            list(REQUEST_COLUMNS.values()),
            [[q[key] for key in REQUEST_COLUMNS] for q in r["requests"]],
        ),
        "",
        *run_footer(r),
    ]
    return "\n".join(lines)


# --- servers and driver ---------------------------------------------------------------------


def after_block_size(args: argparse.Namespace) -> int | None:
    """The ``after`` server's KV block size: ``--after-block-size``, else the one this tree's
    engine resolves its default to (``None``: vLLM's own default)."""
    if args.after_block_size is not None:
        return args.after_block_size
    from ttalign.engine import vllm_engine

    _, configured = setting_default("block_size")
    resolve = getattr(vllm_engine, "resolve_block_size", None)
    return configured if resolve is None else resolve(configured)


def ttalign_command(
    phase: str, model: str, port: int, tree: Path | None, args: argparse.Namespace
) -> list[str]:
    """ttalign for ``phase``: call timelines with prompts, and a budget RAIN never reaches."""
    extra = ["--trace-engine-prompts", *rain_cost.budget_flags()]
    if phase == "after" and args.after_block_size is not None:
        extra += ["--block-size", str(args.after_block_size)]
    command = ttalign_server_command(model, port, name=MODEL_NAME, extra_args=extra)
    if phase == "before":
        assert tree is not None
        return from_tree(command, tree)
    return command


def with_block_size(command: Sequence[str], block_size: int | None) -> list[str]:
    """``command`` with its ``--block-size`` (if any) replaced: ``None`` leaves vLLM's default."""
    words = list(command)
    while "--block-size" in words:
        at = words.index("--block-size")
        del words[at : at + 2]
    return words if block_size is None else [*words, "--block-size", str(block_size)]


def vllm_command(model: str, port: int, block_size: int | None) -> list[str]:
    """A plain vLLM server like ttalign's engine, on ``block_size`` (None: vLLM's default)."""
    return with_block_size(vllm_server_command(model, port, name=MODEL_NAME), block_size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("rain_efficiency", __doc__)
    parser.add_argument(
        "--prompts",
        type=int,
        default=DEFAULT_PROMPTS,
        choices=range(1, len(PROMPTS) + 1),
        metavar=f"1..{len(PROMPTS)}",
        help=f"how many of the built-in prompts to use (default: {DEFAULT_PROMPTS})",
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument(
        "--bound-phases",
        nargs="*",
        choices=PHASES,
        default=list(PHASES),
        help="phases whose exact bound is measured (a replay as long as the phase itself)",
    )
    add_rain_options(parser, own_iterations="each tree's own")
    parser.add_argument("--before-ref", default=BEFORE_REF, help="baseline commit (%(default)s)")
    parser.add_argument(
        "--before-tree",
        type=Path,
        default=None,
        help="an existing source tree of the baseline (default: a temporary git worktree "
        "of --before-ref)",
    )
    parser.add_argument(
        "--after-block-size",
        type=int,
        default=None,
        help="--block-size of the after server (default: none given, its own default)",
    )
    add_run_options(
        parser, name="rain_efficiency", output_dir=RESULTS_DIR / "rain", request_timeout=1800
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    phases = [phase for phase in PHASES if phase in args.phases]
    started = time.perf_counter()
    model, logs = start_run("ttalign-rain-efficiency-")
    # Before issue 19 ttalign had no --block-size: vLLM's default (128 tokens on CPU).
    replay_block = {"before": None, "after": after_block_size(args)}
    rows: list[dict[str, Any]] = []
    tree_context = (
        baseline_tree(args.before_tree, args.before_ref) if "before" in phases else nullcontext()
    )
    with tree_context as tree:
        for phase in phases:
            port = free_port()
            command = ttalign_command(phase, model, port, tree, args)
            with running_server(command, port, logs / f"{phase}-ttalign.log") as url:
                phase_rows, timelines = asyncio.run(measure_phase(url, phase, args))
            if phase in args.bound_phases:
                port = free_port()
                command = vllm_command(model, port, replay_block[phase])
                with running_server(command, port, logs / f"{phase}-vllm.log") as url:
                    asyncio.run(replay_phase(url, phase_rows, timelines))
            rows += phase_rows
    result = {
        "model": MODEL_NAME,
        "vllm": vllm_build(),
        "prompts": PROMPTS[: args.prompts],
        "max_tokens": args.max_tokens,
        "max_iterations": args.max_iterations,
        "seed": args.seed,
        "before_ref": str(args.before_tree or args.before_ref),
        "replay_block_size": {phase: replay_block[phase] for phase in phases},
        **summarize(rows, phases),
        "requests": rows,
        "command": command_line("rain_efficiency", argv),
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(args.output_dir / args.name, result, to_markdown(result))


if __name__ == "__main__":
    main()
