"""Prefix-cache hit rate and throughput per strategy, for several KV-cache block sizes.

vLLM caches prompt prefixes in whole KV-cache blocks, and on CPU a block holds 128 tokens
unless told otherwise, so a shared prefix shorter than a block never hits. This benchmark
starts one ttalign server per ``--block-sizes`` value in turn (``ttalign serve
--block-size N``; 128 is the engine's default, as before issue 19) and runs the same small
requests of each strategy on it, one at a time: ``none``, ``best_of_n`` (n=8), ``tpo``,
``darwin`` and ``rain``. Per strategy and block size:

- **hit rate**: Δ``vllm:prefix_cache_hits_total`` / Δ``vllm:prefix_cache_queries_total``
  over that strategy's requests (prompt tokens found in the cache / looked up);
- **throughput**: generated engine tokens (``alignment.engine_tokens.completion_tokens``)
  per second of wall time, summed over its requests.

The chosen block size has the highest mean hit rate over the strategies among those with
no strategy's throughput lower than at the baseline (``--baseline-block-size``) beyond
noise: by more than the larger of ``--tolerance`` and the two sizes' per-request spread
(half the range of per-request throughputs over their median).

    python -m ttalign.benchmarks.prefix_cache                          # ~15 min on 2 cores
    python -m ttalign.benchmarks.prefix_cache --block-sizes 128 32 --requests 1 \\
        --strategies none tpo --output-dir /tmp/prefix-cache            # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from ttalign.benchmarks import chat_prompts, gateway_affinity, rain_cost
from ttalign.benchmarks.processes import (
    free_port,
    log_tail,
    running_server,
    ttalign_server_command,
    vllm_build,
)
from ttalign.benchmarks.search_efficiency import (
    add_run_options,
    argument_parser,
    command_line,
    counter_delta,
    hit_rate,
    markdown_table,
    percent,
    present,
    ratio,
    relative_half_range,
    require_settings,
    run_footer,
    settled_counters,
    start_run,
    timed_chat,
    warm_up,
    with_sizes,
    write_results,
)
from ttalign.benchmarks.strategy_cost import CONSTRAINTS, MODEL_NAME, RESULTS_DIR

STRATEGIES = ("none", "best_of_n", "tpo", "darwin", "rain")
#: Distinct user turns; strategy ``s`` uses its own slice, so no strategy hits the cache on
#: another's prompt (every prompt still shares the chat template's head).
PROMPT_POOL = [
    *chat_prompts.PROMPTS,
    *rain_cost.PROMPTS,
    *(gateway_affinity.prompt(i) for i in range(len(gateway_affinity.TOPICS))),
]
#: A prompt none of the measured requests uses, for the warm-up.
WARM_UP_PROMPT = "Name three colours."
BASELINE_BLOCK_SIZE = 128
DEFAULT_BLOCK_SIZES = (128, 16, 32, 64)
#: The least relative throughput drop that counts as more than noise.
DEFAULT_TOLERANCE = 0.05


def strategy_fields(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """A request's ttalign fields and sizes for ``strategy``: small, fixed-length configs."""
    tokens = args.max_tokens
    rules = {"reward": "rules", "constraints": CONSTRAINTS}
    if strategy == "none":
        return {"max_tokens": tokens, "temperature": 1.0, "ignore_eos": True}
    if strategy == "best_of_n":
        config = {"n": args.n, "temperature": 0.8}
        return {"max_tokens": tokens, "ignore_eos": True, "strategy_config": config, **rules}
    if strategy == "tpo":
        steps = dict.fromkeys(("sample", "loss", "gradient", "update"), tokens)
        config = {"depth": args.tpo_depth, "width": args.tpo_width, "max_tokens": steps}
        return {"max_tokens": tokens, "ignore_eos": True, "strategy_config": config, **rules}
    if strategy == "darwin":
        config = {
            "cycles": 1,
            "mutations": args.darwin_mutations,
            "replacement_period": max(1, tokens // 2),
            "keep": 1,
            "reward": "rules",
            "mutation": {"max_tokens": tokens},
        }
        return {"max_tokens": tokens, "ignore_eos": True, "strategy_config": config, **rules}
    if strategy == "rain":
        config = {"max_iterations": args.rain_max_iterations}
        return {"max_tokens": args.rain_max_tokens, "strategy_config": config}
    raise ValueError(f"unknown strategy {strategy!r}")


def request_body(strategy: str, prompt: str, seed: int, args: argparse.Namespace) -> dict:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "seed": seed,
        "strategy": strategy,
        **strategy_fields(strategy, args),
    }


def prompt_for(strategy_index: int, request: int, requests: int) -> str:
    """Request ``request`` of the ``strategy_index``-th strategy's prompt (its own slice)."""
    return PROMPT_POOL[(strategy_index * requests + request) % len(PROMPT_POOL)]


# --- measuring ------------------------------------------------------------------------------


async def measure_strategy(
    http: httpx.AsyncClient, url: str, strategy: str, index: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One strategy's requests, one at a time, between two scrapes of vLLM's counters."""
    before = await settled_counters(http, url)
    requests = []
    for k in range(args.requests):
        body = request_body(strategy, prompt_for(index, k, args.requests), args.seed + k, args)
        seconds, response = await timed_chat(http, url, body)
        alignment = response["alignment"]
        tokens = alignment["engine_tokens"]
        requests.append(
            {
                "seconds": seconds,
                "engine_completion_tokens": tokens["completion_tokens"],
                "engine_prompt_tokens": tokens["prompt_tokens"],
                "engine_calls": alignment["engine_calls"],
                "engine_prefill": alignment.get("engine_prefill"),
                "stopped_early": alignment.get("stopped_early"),
            }
        )
    delta = counter_delta(before, await settled_counters(http, url))
    group = strategy_figures(requests, delta)
    print(
        f"  {strategy}: hit rate {percent(group['hit_rate'])}, "
        f"{group['tokens_per_second'] or 0:.1f} engine tokens/s",
        flush=True,
    )
    return group


def strategy_figures(
    requests: Sequence[Mapping[str, Any]], delta: Mapping[str, float | None]
) -> dict[str, Any]:
    """A strategy's hit rate, throughput and per-request spread at one block size."""
    seconds = sum(r["seconds"] for r in requests)
    tokens = sum(r["engine_completion_tokens"] for r in requests)
    per_request = [ratio(r["engine_completion_tokens"], r["seconds"]) for r in requests]
    prefills = [r["engine_prefill"] for r in requests if r.get("engine_prefill")]
    cached = sum(p.get("cached_tokens", 0) for p in prefills)
    computed = sum(p.get("computed_tokens", 0) for p in prefills)
    return {
        "hit_rate": hit_rate(delta),
        "tokens_per_second": ratio(tokens, seconds),
        "per_request_tokens_per_second": per_request,
        "spread": relative_half_range(per_request),
        "seconds": seconds,
        "engine_completion_tokens": tokens,
        # The same share from the requests' own prefill report, where the server gives one.
        "alignment_cached_share": ratio(cached, cached + computed) if prefills else None,
        "counter_delta": dict(delta),
        "stopped_early": sum(bool(r.get("stopped_early")) for r in requests),
        "requests": list(requests),
    }


async def measure_server(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every strategy's figures on one server, after a warm-up request of each."""
    async with httpx.AsyncClient(timeout=args.request_timeout) as http:
        small = with_sizes(args, max_tokens=4, rain_max_tokens=2, rain_max_iterations=2)
        await warm_up(
            http, url, [request_body(s, WARM_UP_PROMPT, 0, small) for s in args.strategies]
        )
        return {
            strategy: await measure_strategy(http, url, strategy, STRATEGIES.index(strategy), args)
            for strategy in args.strategies
        }


# --- choosing -------------------------------------------------------------------------------


def mean_hit_rate(strategies: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The mean of the strategies' known hit rates."""
    rates = present(s["hit_rate"] for s in strategies.values())
    return statistics.mean(rates) if rates else None


def slower_strategies(
    candidate: Mapping[str, Mapping[str, Any]],
    baseline: Mapping[str, Mapping[str, Any]],
    tolerance: float,
) -> list[str]:
    """Strategies whose throughput under ``candidate`` is below ``baseline``'s beyond noise."""
    slower = []
    for strategy, figures in candidate.items():
        base = baseline.get(strategy)
        if base is None or base["tokens_per_second"] is None:
            continue
        noise = max(tolerance, figures["spread"] or 0.0, base["spread"] or 0.0)
        if (figures["tokens_per_second"] or 0.0) < base["tokens_per_second"] * (1 - noise):
            slower.append(strategy)
    return slower


def choose_block_size(
    runs: Sequence[Mapping[str, Any]], baseline: int, tolerance: float
) -> dict[str, Any]:
    """The verdict per block size and the chosen one (``None`` without a usable baseline).

    ``runs`` holds one entry per block size: ``block_size`` and ``strategies`` (``None``
    for a server that did not start). Ties in mean hit rate go to the larger block.
    """
    by_size = {run["block_size"]: run["strategies"] for run in runs}
    base = by_size.get(baseline)
    verdicts = []
    for size, strategies in by_size.items():
        if strategies is None or base is None:
            verdicts.append({"block_size": size, "eligible": False, "mean_hit_rate": None})
            continue
        slower = slower_strategies(strategies, base, tolerance)
        verdicts.append(
            {
                "block_size": size,
                "eligible": not slower,
                "slower_strategies": slower,
                "mean_hit_rate": mean_hit_rate(strategies),
            }
        )
    eligible = [v for v in verdicts if v["eligible"] and v["mean_hit_rate"] is not None]
    best = max(eligible, key=lambda v: (v["mean_hit_rate"], v["block_size"]), default=None)
    return {"verdicts": verdicts, "chosen": None if best is None else best["block_size"]}


# --- report ---------------------------------------------------------------------------------


def to_markdown(r: dict[str, Any]) -> str:
    runs = r["runs"]
    sizes = [run["block_size"] for run in runs]
    base = next((run["strategies"] for run in runs if run["block_size"] == r["baseline"]), None)

    def hit_cell(run: Mapping[str, Any], strategy: str) -> str:
        if run["strategies"] is None:
            return "failed"
        return percent(run["strategies"][strategy]["hit_rate"])

    def throughput_cell(run: Mapping[str, Any], strategy: str) -> str:
        if run["strategies"] is None:
            return "failed"
        figures = run["strategies"][strategy]
        rate = figures["tokens_per_second"]
        if rate is None:
            return "–"
        text = f"{rate:.1f} (±{100 * (figures['spread'] or 0):.0f} %)"
        if base is not None and run["block_size"] != r["baseline"]:
            change = ratio(rate, base[strategy]["tokens_per_second"])
            text += "" if change is None else f", {change:.2f}×"
        return text

    verdicts = {v["block_size"]: v for v in r["choice"]["verdicts"]}
    headers = ["strategy", *(f"block {size}" for size in sizes)]
    chosen = r["choice"]["chosen"]
    lines = [
        "# Prefix-cache hit rate and throughput per strategy and KV-cache block size",
        "",
        f"{r['model']} on {r['vllm']}; one ttalign server per block size, started in turn "
        f"(block {r['baseline']} is the engine's default, as before issue 19); "
        f"{r['requests']} request(s) per strategy, one at a time, each on its own prompt. "
        f"Sizes: max_tokens {r['max_tokens']} (ignore_eos) for none, best_of_n (n={r['n']}), "
        f"tpo (depth {r['tpo_depth']}, width {r['tpo_width']}, every step) and darwin (1 "
        f"cycle, {r['darwin_mutations']} mutations, m={max(1, r['max_tokens'] // 2)}); rain "
        f"max_tokens {r['rain_max_tokens']}, max_iterations {r['rain_max_iterations']}.",
        "",
        "## Hit rate",
        "",
        "Δ`vllm:prefix_cache_hits_total` / Δ`vllm:prefix_cache_queries_total` over the "
        "strategy's requests.",
        "",
        *markdown_table(
            headers, [[s, *(hit_cell(run, s) for run in runs)] for s in r["strategies"]]
        ),
        "| **mean** | "
        + " | ".join(percent(verdicts[size]["mean_hit_rate"]) for size in sizes)
        + " |",
        "",
        "## Throughput",
        "",
        "Generated engine tokens per second of wall time (± half the range of the "
        f"per-request rates; × the rate at block {r['baseline']}).",
        "",
        *markdown_table(
            headers, [[s, *(throughput_cell(run, s) for run in runs)] for s in r["strategies"]]
        ),
        "",
    ]
    for verdict in r["choice"]["verdicts"]:
        if verdict.get("slower_strategies"):
            lines.append(
                f"- block {verdict['block_size']}: slower than block {r['baseline']} beyond "
                f"noise for {', '.join(verdict['slower_strategies'])}."
            )
    for run in runs:
        if run["strategies"] is None:
            lines.append(f"- block {run['block_size']}: the server did not start ({run['error']}).")
    lines += [
        "",
        (
            f"**Chosen block size: {chosen}** (the highest mean hit rate with no strategy's "
            f"throughput lower than at block {r['baseline']} by more than the larger of "
            f"{100 * r['tolerance']:.0f} % and the per-request spread)."
            if chosen is not None
            else f"**No block size chosen** (block {r['baseline']} did not run, or no hit "
            "rates were reported)."
        ),
        "",
        *run_footer(r),
    ]
    return "\n".join(lines)


# --- driver ---------------------------------------------------------------------------------


def server_command(model: str, port: int, block_size: int) -> list[str]:
    extra = ["--block-size", str(block_size), *rain_cost.budget_flags()]
    return ttalign_server_command(model, port, name=MODEL_NAME, extra_args=extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("prefix_cache", __doc__)
    parser.add_argument(
        "--block-sizes", type=int, nargs="+", default=list(DEFAULT_BLOCK_SIZES), metavar="N"
    )
    parser.add_argument(
        "--baseline-block-size",
        type=int,
        default=BASELINE_BLOCK_SIZE,
        help="the block size others must not be slower than (added if not listed)",
    )
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--requests", type=int, default=3, help="requests per strategy")
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="tokens per candidate or step (not rain)"
    )
    parser.add_argument("--n", type=int, default=8, help="best_of_n's n")
    parser.add_argument("--tpo-depth", type=int, default=1)
    parser.add_argument("--tpo-width", type=int, default=2)
    parser.add_argument("--darwin-mutations", type=int, default=2)
    parser.add_argument("--rain-max-tokens", type=int, default=16)
    parser.add_argument("--rain-max-iterations", type=int, default=4)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="least relative throughput drop that counts as more than noise",
    )
    add_run_options(
        parser, name="prefix_cache", output_dir=RESULTS_DIR / "prefix_cache", request_timeout=900
    )
    args = parser.parse_args(argv)
    if args.baseline_block_size not in args.block_sizes:
        args.block_sizes.insert(0, args.baseline_block_size)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_settings("block_size")
    started = time.perf_counter()
    model, logs = start_run("ttalign-prefix-cache-")
    runs: list[dict[str, Any]] = []
    for block_size in args.block_sizes:
        print(f"block size {block_size}:", flush=True)
        port = free_port()
        log = logs / f"block-{block_size}.log"
        try:
            with running_server(server_command(model, port, block_size), port, log) as url:
                strategies = asyncio.run(measure_server(url, args))
            runs.append({"block_size": block_size, "strategies": strategies, "error": None})
        except (RuntimeError, TimeoutError) as error:
            print(f"  failed: {error}{log_tail(log, 10)}", flush=True)
            runs.append(
                {"block_size": block_size, "strategies": None, "error": str(error).splitlines()[0]}
            )
    result = {
        "model": MODEL_NAME,
        "vllm": vllm_build(),
        "baseline": args.baseline_block_size,
        "strategies": args.strategies,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "n": args.n,
        "tpo_depth": args.tpo_depth,
        "tpo_width": args.tpo_width,
        "darwin_mutations": args.darwin_mutations,
        "rain_max_tokens": args.rain_max_tokens,
        "rain_max_iterations": args.rain_max_iterations,
        "tolerance": args.tolerance,
        "seed": args.seed,
        "runs": runs,
        "choice": choose_block_size(runs, args.baseline_block_size, args.tolerance),
        "command": command_line("prefix_cache", argv),
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(args.output_dir / args.name, result, to_markdown(result))


if __name__ == "__main__":
    main()
