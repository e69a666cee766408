"""Throughput of token-level adaptive decoding against plain sampling, side by side.

One ttalign server (the embedded SmolLM2 with its shipped heads) serves both arms, so the
ratio isolates what adaptive decoding adds: the logits processor's head on every step of
every opted-in row, and the record read after each request. Arms alternate within each
round (plain, then adaptive) at each concurrency, with ``ignore_eos`` so both generate the
same number of tokens.

    python -m ttalign.benchmarks.adaptive_temperature_cost --concurrency 1 8 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from ttalign.benchmarks.chat_prompts import PROMPTS
from ttalign.benchmarks.processes import free_port, running_server, ttalign_server_command
from ttalign.server.model_prep import prepare_embedded_model

RESULTS_DIR = Path(__file__).parent / "results"
MODEL_NAME = "smollm2"
ARMS: dict[str, dict[str, Any]] = {
    "plain": {"strategy": "none", "temperature": 1.0},
    "adaptive_token_learned": {
        "strategy": "adaptive_temperature",
        "strategy_config": {"level": "token", "mode": "learned"},
    },
    "adaptive_token_entropy": {
        "strategy": "adaptive_temperature",
        "strategy_config": {"level": "token", "mode": "entropy"},
    },
}


async def one_batch(
    client: httpx.AsyncClient, arm: dict[str, Any], concurrency: int, max_tokens: int, seed: int
) -> dict[str, float]:
    async def one(i: int) -> int:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "seed": seed + i,
            **arm,
        }
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    started = time.monotonic()
    tokens = await asyncio.gather(*(one(i) for i in range(concurrency)))
    seconds = time.monotonic() - started
    return {"seconds": seconds, "tokens": sum(tokens), "tokens_per_second": sum(tokens) / seconds}


async def measure(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await one_batch(client, ARMS["plain"], 2, 8, 0)  # warm-up
        results: dict[str, Any] = {}
        for concurrency in args.concurrency:
            rounds = []
            for round_index in range(args.rounds):
                row = {}
                for name in args.arms:
                    row[name] = await one_batch(
                        client, ARMS[name], concurrency, args.max_tokens, 100 * round_index
                    )
                rounds.append(row)
            ratios = {
                name: [
                    r[name]["tokens_per_second"] / r["plain"]["tokens_per_second"] for r in rounds
                ]
                for name in args.arms
                if name != "plain"
            }
            results[str(concurrency)] = {
                "rounds": rounds,
                "ratio_to_plain": ratios,
                "median_ratio_to_plain": {n: statistics.median(v) for n, v in ratios.items()},
            }
        return results


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Token-level adaptive decoding vs plain sampling (throughput)",
        "",
        f"Command: `{report['command']}`. {report['conditions']}",
        "",
        "| concurrency | arm | tokens/s per round | ratio to plain per round | median ratio |",
        "|---|---|---|---|---|",
    ]
    for concurrency, result in report["results"].items():
        for name in report["arms"]:
            speeds = ", ".join(f"{r[name]['tokens_per_second']:.1f}" for r in result["rounds"])
            ratios = result["ratio_to_plain"].get(name)
            per_round = ", ".join(f"{x:.3f}" for x in ratios) if ratios else "-"
            median = result["median_ratio_to_plain"].get(name)
            lines.append(
                f"| {concurrency} | {name} | {speeds} | {per_round} | "
                f"{'-' if median is None else f'**{median:.3f}**'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "adaptive_temperature_cost")
    args = parser.parse_args()
    if "plain" not in args.arms:
        args.arms.insert(0, "plain")
    model = str(prepare_embedded_model())
    port = free_port()
    command = ttalign_server_command(model, port, name=MODEL_NAME)
    with running_server(command, port, args.output.with_suffix(".log")) as base_url:
        results = asyncio.run(measure(base_url, args))
    report = {
        "command": " ".join(
            ["python -m ttalign.benchmarks.adaptive_temperature_cost", *sys.argv[1:]]
        ),
        "conditions": (
            f"One ttalign server, eager SmolLM2-135M, {args.max_tokens} tokens per request with "
            "ignore_eos, arms alternating within each round; 2 CPU cores, nothing else running."
        ),
        "arms": args.arms,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
