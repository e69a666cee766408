"""What reward-guided strategies cost in wall time, against plain vLLM calls, side by side.

Both a plain vLLM OpenAI server and ttalign run the same model with the same engine
settings; requests alternate between them in one run. Every call uses ``ignore_eos`` so
each candidate is exactly ``max_tokens`` long on both sides and the comparison is of
serving work, not of how soon the model happened to stop.

    python -m ttalign.benchmarks.strategy_cost bon    # BoN-8 vs one vLLM request with n=8
    python -m ttalign.benchmarks.strategy_cost tpo    # TPO vs its critical-path bounds;
                                                      # 8 vs 1 and vs 8 replays at once
    python -m ttalign.benchmarks.strategy_cost darwin # DARWIN, the same way

A multi-call strategy has two bounds: its sequential steps replayed as plain calls on the
original prompt, and the exact one: its own recorded calls (from the request's call
timeline) replayed as plain calls with the same prompts (``benchmarks/critical_path.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from ttalign.benchmarks.critical_path import (
    critical_path_seconds,
    replay,
    replay_concurrently,
)
from ttalign.benchmarks.processes import (
    free_port,
    running_server,
    ttalign_server_command,
    vllm_server_command,
)
from ttalign.server.model_prep import prepare_embedded_model

RESULTS_DIR = Path(__file__).parent / "results"
MODEL_NAME = "smollm2"
PROMPT = [
    {
        "role": "user",
        "content": "Write a short note to a neighbour asking them to water my plants while "
        "I am away. Answer in all lowercase letters and in fewer than 60 words.",
    }
]
#: The prompt's own instructions, as rule-verifier constraints.
CONSTRAINTS = [{"type": "case", "case": "lower"}, {"type": "word_count", "max": 59}]


class Endpoints:
    """A plain vLLM server and a ttalign server on the same model, and a client for both."""

    def __init__(self, vllm_url: str, ttalign_url: str) -> None:
        self.vllm_url, self.ttalign_url = vllm_url, ttalign_url
        self.http = httpx.AsyncClient(timeout=600)

    async def chat(self, base_url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """POST a chat completion; return (wall seconds, response JSON)."""
        payload = {"model": MODEL_NAME, "messages": PROMPT, "ignore_eos": True, **body}
        started = time.perf_counter()
        response = await self.http.post(f"{base_url}/v1/chat/completions", json=payload)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        return elapsed, response.json()


# --- best-of-N ---------------------------------------------------------------------------


async def bon_benchmark(ep: Endpoints, args: argparse.Namespace) -> dict[str, Any]:
    n, max_tokens = args.n, args.max_tokens
    sampling = {"max_tokens": max_tokens, "temperature": 0.8}

    async def plain() -> dict[str, float]:
        seconds, _ = await ep.chat(ep.vllm_url, {**sampling, "n": n})
        return {"seconds": seconds}

    def bon(reward: str) -> Callable[[], Awaitable[dict[str, float]]]:
        async def measure() -> dict[str, float]:
            seconds, body = await ep.chat(
                ep.ttalign_url,
                {
                    **sampling,
                    "strategy": "best_of_n",
                    "reward": reward,
                    "strategy_config": {"n": n, "temperature": 0.8},
                    "constraints": CONSTRAINTS,
                },
            )
            alignment = body["alignment"]
            assert alignment["engine_calls"] == 1, alignment
            return {"seconds": seconds, "reward_seconds": alignment["reward_seconds"]}

        return measure

    rows: dict[str, dict[str, float]] = {"vllm_n": {}, "bon_rules": {}, "bon_judge": {}}
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in rows}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        samples["vllm_n"].append(await plain())
        samples["bon_rules"].append(await bon("rules")())
        samples["bon_judge"].append(await bon("judge")())
    for key, values in samples.items():
        rows[key] = {m: statistics.median(v[m] for v in values) for m in values[0]}
    plain_seconds = rows["vllm_n"]["seconds"]
    judge = rows["bon_judge"]
    return {
        "n": n,
        "max_tokens": max_tokens,
        "repeats": args.repeats,
        "median_seconds": {k: v["seconds"] for k, v in rows.items()},
        "bon_rules_over_vllm": rows["bon_rules"]["seconds"] / plain_seconds,
        "bon_judge_over_vllm": judge["seconds"] / plain_seconds,
        "judge_share_of_bon_judge": judge["reward_seconds"] / judge["seconds"],
        "rules_reward_seconds": rows["bon_rules"]["reward_seconds"],
        "judge_reward_seconds": judge["reward_seconds"],
        "samples": samples,
    }


def bon_markdown(r: dict[str, Any]) -> str:
    s = r["median_seconds"]
    return "\n".join(
        [
            f"# Best-of-{r['n']} cost vs one plain vLLM request with n={r['n']}",
            "",
            f"max_tokens={r['max_tokens']} (ignore_eos); medians of {r['repeats']} "
            "interleaved runs.",
            "",
            "| variant | median wall s | × plain vLLM | reward s |",
            "|---|---|---|---|",
            f"| plain vLLM, n={r['n']} | {s['vllm_n']:.2f} | 1.00 | – |",
            f"| ttalign BoN-{r['n']}, rule verifiers | {s['bon_rules']:.2f} | "
            f"{r['bon_rules_over_vllm']:.3f} | {r['rules_reward_seconds']:.3f} |",
            f"| ttalign BoN-{r['n']}, LLM judge | {s['bon_judge']:.2f} | "
            f"{r['bon_judge_over_vllm']:.3f} | {r['judge_reward_seconds']:.3f} |",
            "",
            f"Goal: BoN with rule verifiers ≤ 1.3× plain vLLM. The LLM judge takes "
            f"{100 * r['judge_share_of_bon_judge']:.0f}% of BoN-judge's wall time.",
            "",
        ]
    )


# --- multi-call strategies: TPO and DARWIN against their critical-path bounds -------------


async def plain_call(ep: Endpoints, n: int, max_tokens: int, sampling: dict[str, Any]) -> float:
    """One plain vLLM chat completion on the original prompt; its wall seconds."""
    seconds, _ = await ep.chat(ep.vllm_url, {**sampling, "max_tokens": max_tokens, "n": n})
    return seconds


async def against_bounds(
    ep: Endpoints,
    args: argparse.Namespace,
    body: dict[str, Any],
    prompt_bound: Callable[[dict[str, Any]], Awaitable[float]],
    check: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Time a strategy request against both of its bounds, alone and N at a time.

    Per repeat: the request (with its call timeline), then ``prompt_bound(alignment)`` (the
    strategy's sequential shape as plain calls on the original prompt, plus its reward
    time), then the exact bound (its own recorded calls replayed as plain vLLM calls).
    Then one request alone, N at once, and those N requests' timelines replayed at once.
    """
    body = {**body, "return_trace": True}

    async def once() -> tuple[float, dict[str, Any]]:
        seconds, response = await ep.chat(ep.ttalign_url, body)
        check(response["alignment"])
        return seconds, response["alignment"]

    def timeline_of(alignment: dict[str, Any]) -> list[dict[str, Any]]:
        timeline = alignment["trace"]["timeline"]
        engine_calls = sum(call["kind"] == "engine" for call in timeline)
        assert engine_calls == alignment["engine_calls"], (engine_calls, alignment)
        return timeline

    rows = []
    for repeat in range(args.repeats):  # interleaved, so drift hits every variant alike
        seconds, alignment = await once()
        timeline = timeline_of(alignment)
        prompt_seconds = await prompt_bound(alignment)
        exact_seconds = await replay(timeline, ep.http, ep.vllm_url, MODEL_NAME)
        rows.append(
            {
                "seconds": seconds,
                "prompt_bound_seconds": prompt_seconds,
                "exact_bound_seconds": exact_seconds,
                "reward_seconds": alignment["reward_seconds"],
                "engine_calls": alignment["engine_calls"],
                "recorded_critical_path_seconds": critical_path_seconds(timeline),
                "over_prompt_bound": seconds / prompt_seconds,
                "over_exact_bound": seconds / exact_seconds,
            }
        )
        print(
            f"repeat {repeat}: {seconds:.2f} s; original-prompt bound {prompt_seconds:.2f} s; "
            f"exact bound {exact_seconds:.2f} s",
            flush=True,
        )

    single, _ = await once()
    started = time.perf_counter()
    results = await asyncio.gather(*(once() for _ in range(args.concurrency)))
    concurrent = time.perf_counter() - started
    timelines = [timeline_of(alignment) for _, alignment in results]
    concurrent_bound = await replay_concurrently(timelines, ep.http, ep.vllm_url, MODEL_NAME)

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    return {
        "repeats": args.repeats,
        "median_seconds": median("seconds"),
        "median_prompt_bound_seconds": median("prompt_bound_seconds"),
        "median_exact_bound_seconds": median("exact_bound_seconds"),
        "median_over_prompt_bound": median("over_prompt_bound"),
        "median_over_exact_bound": median("over_exact_bound"),
        "rows": rows,
        "single_request_seconds": single,
        "concurrent_requests": args.concurrency,
        "concurrent_seconds": concurrent,
        "concurrent_exact_bound_seconds": concurrent_bound,
        "concurrent_over_exact_bound": concurrent / concurrent_bound,
        "throughput_gain": (args.concurrency / concurrent) / (1 / single),
    }


def bounds_markdown(r: dict[str, Any], name: str) -> list[str]:
    """The per-run table and the concurrency lines, shared by TPO and DARWIN."""
    lines = [
        f"| run | {name} s | original-prompt bound s | exact bound s | reward s | "
        f"{name} / original-prompt bound | {name} / exact bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(r["rows"]):
        lines.append(
            f"| {i} | {row['seconds']:.2f} | {row['prompt_bound_seconds']:.2f} | "
            f"{row['exact_bound_seconds']:.2f} | {row['reward_seconds']:.3f} | "
            f"{row['over_prompt_bound']:.3f} | {row['over_exact_bound']:.3f} |"
        )
    n = r["concurrent_requests"]
    lines += [
        "",
        f"**Median {name} / exact bound: {r['median_over_exact_bound']:.3f}**; "
        f"{name} / original-prompt bound: {r['median_over_prompt_bound']:.3f}.",
        "",
        f"Concurrency: {n} {name} requests at once took {r['concurrent_seconds']:.1f} s; "
        f"their {n} recorded timelines replayed at once took "
        f"{r['concurrent_exact_bound_seconds']:.1f} s — **{r['concurrent_over_exact_bound']:.3f}× "
        f"the bound replayed {n} at a time**. One request alone took "
        f"{r['single_request_seconds']:.1f} s, so {n} at once give "
        f"{r['throughput_gain']:.2f}× the throughput of one at a time.",
        "",
    ]
    return lines


EXACT_BOUND_TEXT = (
    "The **exact bound** replays the request's own engine calls, recorded in its call "
    "timeline (`return_trace`, served with `--trace-engine-prompts`), as plain vLLM "
    "`/v1/completions` calls: the same prompt token ids (mutated instructions, quoted "
    "responses, critiques), the same n, max_tokens and sampling; each reward call is a "
    "sleep of its measured duration. A call starts as soon as every call that had ended "
    "before it started in the request has ended in the replay "
    "(`benchmarks/critical_path.py`). What remains is ttalign's own cost."
)


async def tpo_benchmark(ep: Endpoints, args: argparse.Namespace) -> dict[str, Any]:
    depth, width, tokens = args.depth, args.width, args.max_tokens
    config = {
        "depth": depth,
        "width": width,
        "max_tokens": {"sample": tokens, "loss": tokens, "gradient": tokens, "update": tokens},
    }
    body = {
        "max_tokens": tokens,
        "strategy": "tpo",
        "strategy_config": config,
        "reward": "rules",
        "constraints": CONSTRAINTS,
    }
    sampling = {"temperature": 0.7}

    def check(alignment: dict[str, Any]) -> None:
        assert alignment["engine_calls"] == 1 + 3 * depth, alignment

    async def prompt_bound(alignment: dict[str, Any]) -> float:
        # Sample, then loss -> gradient -> update per round, each as a plain vLLM call of
        # the same n and max_tokens on the original prompt, plus the reward calls TPO made.
        seconds = await plain_call(ep, width, tokens, sampling)
        for _round in range(depth):
            seconds += await plain_call(ep, 1, tokens, sampling)
            seconds += await plain_call(ep, 1, tokens, sampling)
            seconds += await plain_call(ep, width, tokens, sampling)
        return seconds + alignment["reward_seconds"]

    result = await against_bounds(ep, args, body, prompt_bound, check)
    return {"depth": depth, "width": width, "max_tokens_per_step": tokens, **result}


def tpo_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# TPO (D={r['depth']}, N={r['width']}) vs its critical-path bounds",
        "",
        f"{r['max_tokens_per_step']} tokens per step (ignore_eos), reward: rule verifiers.",
        "",
        "The **original-prompt bound** is one plain vLLM chat call per sequential step on "
        "the user's original prompt (sample n=N; per round: loss n=1, gradient n=1, update "
        "n=N) + TPO's own reward time. TPO's loss, gradient and update prompts are longer "
        "(they quote the chosen and rejected responses), so this bound leaves their prefill "
        "out. " + EXACT_BOUND_TEXT,
        "",
        *bounds_markdown(r, "TPO"),
    ]
    return "\n".join(lines)


async def darwin_benchmark(ep: Endpoints, args: argparse.Namespace) -> dict[str, Any]:
    from ttalign.strategies.darwin import DarwinConfig

    length, period = args.max_tokens, args.period
    config: dict[str, Any] = {
        "cycles": args.cycles,
        "mutations": args.mutations,
        "replacement_period": period,
        "keep": args.keep,
        "beams_per_instruction": args.beams_per_instruction,
        "mode": args.mode,
        "reward": "rules",
    }
    if args.mutation_max_tokens is not None:
        config["mutation"] = {"max_tokens": args.mutation_max_tokens}
    parsed = DarwinConfig.model_validate(config)  # the strategy's own defaults fill the rest
    body = {
        "max_tokens": length,
        "strategy": "darwin",
        "strategy_config": config,
        "reward": "rules",
        "constraints": CONSTRAINTS,
    }
    beams = parsed.mutations * parsed.beams_per_instruction
    decoding = parsed.generation.model_dump()
    mutation = parsed.mutation.model_dump()
    mutation_tokens = mutation.pop("max_tokens")
    mutates = parsed.mode != "replace_only"
    step_tokens = length if parsed.mode == "mutate_only" else period
    steps = math.ceil(length / step_tokens)

    def check(alignment: dict[str, Any]) -> None:
        assert not alignment["stopped_early"], alignment
        assert alignment["engine_calls"] >= 1 + parsed.cycles * (mutates + steps), alignment

    async def prompt_bound(alignment: dict[str, Any]) -> float:
        # The formula's shape on the original prompt: the seed (n=1, L tokens), then per
        # cycle a mutation call (n=1) and ceil(L/m) steps of every beam in one call
        # (n=beams, m tokens each), plus the reward calls DARWIN made.
        seconds = await plain_call(ep, 1, length, decoding)
        for _cycle in range(parsed.cycles):
            if mutates:
                seconds += await plain_call(ep, 1, mutation_tokens, mutation)
            done = 0
            while done < length:
                tokens = min(step_tokens, length - done)
                seconds += await plain_call(ep, beams, tokens, decoding)
                done += tokens
        return seconds + alignment["reward_seconds"]

    result = await against_bounds(ep, args, body, prompt_bound, check)
    return {
        "cycles": parsed.cycles,
        "mutations": parsed.mutations,
        "beams_per_instruction": parsed.beams_per_instruction,
        "replacement_period": period,
        "keep": parsed.keep,
        "mode": parsed.mode,
        "max_tokens": length,
        "mutation_max_tokens": mutation_tokens,
        "steps_per_cycle": steps,
        **result,
    }


def darwin_markdown(r: dict[str, Any]) -> str:
    m, length, steps = r["replacement_period"], r["max_tokens"], r["steps_per_cycle"]
    beams = r["mutations"] * r["beams_per_instruction"]
    lines = [
        f"# DARWIN (mode {r['mode']}, {r['cycles']} cycle(s), {r['mutations']} mutations × "
        f"{r['beams_per_instruction']} beam(s), m={m}, keep {r['keep']}) vs its critical-path "
        "bounds",
        "",
        f"L={length} tokens per response (ignore_eos), mutation step {r['mutation_max_tokens']} "
        "tokens, reward: rule verifiers.",
        "",
        "The **original-prompt bound** is the algorithm's sequential shape "
        "(2 + cycles·(2 + 2·⌈L/m⌉) stages) as plain vLLM chat calls on the user's original "
        f"prompt: the seed (n=1, {length} tokens), then per cycle a mutation call (n=1, "
        f"{r['mutation_max_tokens']} tokens) and {steps} steps of one call with n={beams} "
        f"(the beams) and at most {m} tokens, + DARWIN's own reward time. DARWIN's beams run "
        "under mutated instructions, one call per distinct prompt, and the seed runs beside "
        "the first mutation, so this bound is only the shape. " + EXACT_BOUND_TEXT,
        "",
        *bounds_markdown(r, "DARWIN"),
    ]
    return "\n".join(lines)


# --- driver -------------------------------------------------------------------------------


BENCHMARKS: dict[str, tuple[Callable[..., Awaitable[dict[str, Any]]], Callable[..., str]]] = {
    "bon": (bon_benchmark, bon_markdown),
    "tpo": (tpo_benchmark, tpo_markdown),
    "darwin": (darwin_benchmark, darwin_markdown),
}

#: ``--max-tokens`` when it is not given, per benchmark.
DEFAULT_MAX_TOKENS = {"bon": 64, "tpo": 64, "darwin": 48}


async def run(args: argparse.Namespace, vllm_url: str, ttalign_url: str) -> dict[str, Any]:
    endpoints = Endpoints(vllm_url, ttalign_url)
    try:
        # Warm both servers' engines (first requests on CPU are slow).
        for url in (vllm_url, ttalign_url):
            await endpoints.chat(url, {"max_tokens": 8, "n": 2, "temperature": 1.0})
        benchmark, _ = BENCHMARKS[args.benchmark]
        return await benchmark(endpoints, args)
    finally:
        await endpoints.http.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--n", type=int, default=8, help="BoN's N")
    parser.add_argument("--depth", type=int, default=2, help="TPO's D")
    parser.add_argument("--width", type=int, default=5, help="TPO's N")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="concurrent TPO or DARWIN requests"
    )
    parser.add_argument("--cycles", type=int, default=1, help="DARWIN's cycles")
    parser.add_argument("--mutations", type=int, default=5, help="DARWIN's mutations")
    parser.add_argument("--period", type=int, default=16, help="DARWIN's replacement_period (m)")
    parser.add_argument("--keep", type=int, default=3, help="DARWIN's keep")
    parser.add_argument(
        "--beams-per-instruction", type=int, default=1, help="DARWIN's beams_per_instruction"
    )
    parser.add_argument(
        "--mode", choices=("darwin", "replace_only", "mutate_only"), default="darwin"
    )
    parser.add_argument(
        "--mutation-max-tokens",
        type=int,
        default=None,
        help="DARWIN's mutation.max_tokens (default: the strategy's)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="tokens per candidate or step (default: 64; DARWIN's L: 48)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.max_tokens is None:
        args.max_tokens = DEFAULT_MAX_TOKENS[args.benchmark]

    model = str(prepare_embedded_model())
    logs = Path(tempfile.mkdtemp(prefix="ttalign-cost-"))
    vllm_port, ttalign_port = free_port(), free_port()
    with ExitStack() as stack:
        vllm_url = stack.enter_context(
            running_server(
                vllm_server_command(model, vllm_port, name=MODEL_NAME), vllm_port, logs / "vllm.log"
            )
        )
        ttalign_url = stack.enter_context(
            running_server(
                # Call timelines with prompt token ids, for the exact critical-path bounds.
                ttalign_server_command(
                    model, ttalign_port, name=MODEL_NAME, extra_args=["--trace-engine-prompts"]
                ),
                ttalign_port,
                logs / "ttalign.log",
            )
        )
        result = asyncio.run(run(args, vllm_url, ttalign_url))
    result["command"] = "python -m ttalign.benchmarks.strategy_cost " + " ".join(sys.argv[1:])
    _, to_markdown = BENCHMARKS[args.benchmark]
    out = args.output_dir / f"{args.benchmark}_cost"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result) + f"\nCommand: `{result['command']}`\n")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
