"""What reward-guided strategies cost in wall time, against plain vLLM calls, side by side.

Both a plain vLLM OpenAI server and ttalign run the same model with the same engine
settings; requests alternate between them in one run. Every call uses ``ignore_eos`` so
each candidate is exactly ``max_tokens`` long on both sides and the comparison is of
serving work, not of how soon the model happened to stop.

    python -m benchmarks.strategy_cost bon    # BoN-8 vs one vLLM request with n=8
    python -m benchmarks.strategy_cost tpo    # TPO vs its critical-path bound; 8 vs 1 at once
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

from benchmarks.processes import (
    free_port,
    running_server,
    ttalign_server_command,
    vllm_server_command,
)
from server.model_prep import prepare_embedded_model

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


# --- driver -------------------------------------------------------------------------------


BENCHMARKS: dict[str, tuple[Callable[..., Awaitable[dict[str, Any]]], Callable[..., str]]] = {
    "bon": (bon_benchmark, bon_markdown),
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
    result["command"] = "python -m benchmarks.strategy_cost " + " ".join(sys.argv[1:])
    _, to_markdown = BENCHMARKS[args.benchmark]
    out = args.output_dir / f"{args.benchmark}_cost"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result) + f"\nCommand: `{result['command']}`\n")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
