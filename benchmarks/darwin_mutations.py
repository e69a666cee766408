"""How faithful are the policy's DARWIN mutations? Measured from the traces of IFEval prompts.

Sends the first N IFEval dev prompts to a running ttalign server as ``darwin`` requests
with ``return_trace`` and reads each first cycle's variants:

- the share of variants that fell back to the original instruction;
- the share that copied the mutation prompt's own example (about rain);
- the share shorter than half the original;
- for variants of prompts that contain numbers (word counts, paragraph counts, …), the mean
  share of those numbers the variant kept: a cheap proxy for "kept every requirement".

    python -m ttalign.benchmarks.darwin_mutations --base-url http://127.0.0.1:8012 --prompts 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "eval" / "ifeval_dev.jsonl"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "quality" / "darwin-mutations.json"
CONFIG = {"cycles": 1, "mutations": 5, "keep": 3, "replacement_period": 16}


def request_body(row: dict[str, Any], model: str) -> dict[str, Any]:
    constraints = [
        {
            "type": "ifeval",
            "instruction_id": instruction,
            "kwargs": {k: v for k, v in (kwargs or {}).items() if v is not None},
        }
        for instruction, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True)
    ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": row["prompt"]}],
        "max_tokens": 64,
        "temperature": 0.8,
        "seed": 0,
        "strategy": "darwin",
        "reward": "rules",
        "constraints": constraints,
        "strategy_config": CONFIG,
        "return_trace": True,
    }


def mutation_stats(pairs: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """The shares described in the module docstring, over (original, variants) pairs."""
    variants = fallback = example = short = 0
    kept_numbers: list[float] = []
    for original, produced in pairs:
        numbers = set(re.findall(r"\d+", original))
        for variant in produced:
            variants += 1
            fallback += variant == original
            example += "rain" in variant.lower() and "rain" not in original.lower()
            short += len(variant) < 0.5 * len(original)
            if numbers and variant != original:
                found = set(re.findall(r"\d+", variant))
                kept_numbers.append(len(numbers & found) / len(numbers))
    if not variants:
        raise ValueError("no variants to measure")
    return {
        "prompts": len(pairs),
        "variants": variants,
        "fallback_to_original": fallback / variants,
        "copied_the_prompt_example": example / variants,
        "shorter_than_half_the_original": short / variants,
        "numbers_kept_mean_share": statistics.mean(kept_numbers) if kept_numbers else None,
        "variants_with_numbers_measured": len(kept_numbers),
    }


async def collect(base_url: str, rows: list[dict[str, Any]], model: str, concurrency: int):
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900) as http:

        async def one(row: dict[str, Any]) -> tuple[str, list[str]]:
            async with limit:
                response = await http.post(
                    f"{base_url}/v1/chat/completions", json=request_body(row, model)
                )
            response.raise_for_status()
            trace = response.json()["alignment"]["trace"]
            return row["prompt"], trace["cycle_records"][0]["mutation"]["variants"]

        return await asyncio.gather(*(one(row) for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines()][: args.prompts]
    pairs = asyncio.run(collect(args.base_url, rows, args.model, args.concurrency))
    result = {
        **mutation_stats(pairs),
        "config": CONFIG,
        "command": f"python -m ttalign.benchmarks.darwin_mutations --prompts {args.prompts}",
        "samples": [{"original": o, "variants": v} for o, v in pairs[:5]],
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
