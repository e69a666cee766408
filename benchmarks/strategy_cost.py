"""What reward-guided strategies cost in wall time, against plain vLLM calls, side by side.

Both a plain vLLM OpenAI server and ttalign run the same model with the same engine
settings; requests alternate between them in one run. Every call uses ``ignore_eos`` so
each candidate is exactly ``max_tokens`` long on both sides and the comparison is of
serving work, not of how soon the model happened to stop.

    python -m ttalign.benchmarks.strategy_cost bon    # BoN-8 vs one vLLM request with n=8
    python -m ttalign.benchmarks.strategy_cost tpo    # TPO vs its critical-path bound;
                                                      # 8 vs 1 at once
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
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


# --- TPO ----------------------------------------------------------------------------------


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

    async def tpo_once() -> tuple[float, dict[str, Any]]:
        return await ep.chat(ep.ttalign_url, body)

    async def plain(n: int) -> float:
        seconds, _ = await ep.chat(ep.vllm_url, {"max_tokens": tokens, "n": n, "temperature": 0.7})
        return seconds

    rows = []
    for _ in range(args.repeats):
        tpo_seconds, response = await tpo_once()
        alignment = response["alignment"]
        assert alignment["engine_calls"] == 1 + 3 * depth, alignment
        # The critical path: sample, then loss -> gradient -> update per round, each as a
        # plain vLLM call of the same n and max_tokens, plus the reward calls TPO made.
        steps = [await plain(width)]
        for _round in range(depth):
            steps += [await plain(1), await plain(1), await plain(width)]
        bound = sum(steps) + alignment["reward_seconds"]
        rows.append(
            {
                "tpo_seconds": tpo_seconds,
                "bound_seconds": bound,
                "reward_seconds": alignment["reward_seconds"],
                "ratio": tpo_seconds / bound,
            }
        )

    single_started = time.perf_counter()
    await tpo_once()
    single = time.perf_counter() - single_started
    concurrent_started = time.perf_counter()
    await asyncio.gather(*(tpo_once() for _ in range(args.concurrency)))
    concurrent = time.perf_counter() - concurrent_started
    return {
        "depth": depth,
        "width": width,
        "max_tokens_per_step": tokens,
        "repeats": args.repeats,
        "median_tpo_seconds": statistics.median(r["tpo_seconds"] for r in rows),
        "median_bound_seconds": statistics.median(r["bound_seconds"] for r in rows),
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "rows": rows,
        "single_request_seconds": single,
        "concurrent_requests": args.concurrency,
        "concurrent_seconds": concurrent,
        "throughput_gain": (args.concurrency / concurrent) / (1 / single),
    }


def tpo_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# TPO (D={r['depth']}, N={r['width']}) vs its critical-path bound",
        "",
        f"{r['max_tokens_per_step']} tokens per step (ignore_eos), reward: rule verifiers. "
        "Bound = one plain vLLM call per sequential step (sample n=N; per round: loss n=1, "
        "gradient n=1, update n=N) + TPO's own reward time.",
        "",
        "| run | TPO s | bound s | reward s | TPO / bound |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(r["rows"]):
        lines.append(
            f"| {i} | {row['tpo_seconds']:.2f} | {row['bound_seconds']:.2f} | "
            f"{row['reward_seconds']:.3f} | {row['ratio']:.3f} |"
        )
    lines += [
        "",
        f"**Median TPO / bound: {r['median_ratio']:.3f}** (goal ≤ 1.2)",
        "",
        f"Concurrency: 1 request took {r['single_request_seconds']:.1f} s; "
        f"{r['concurrent_requests']} at once took {r['concurrent_seconds']:.1f} s — "
        f"**{r['throughput_gain']:.2f}× the throughput** of one at a time.",
        "",
    ]
    return "\n".join(lines)


# --- driver -------------------------------------------------------------------------------


BENCHMARKS: dict[str, tuple[Callable[..., Awaitable[dict[str, Any]]], Callable[..., str]]] = {
    "bon": (bon_benchmark, bon_markdown),
    "tpo": (tpo_benchmark, tpo_markdown),
}


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
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent TPO requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

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
                ttalign_server_command(model, ttalign_port, name=MODEL_NAME),
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
