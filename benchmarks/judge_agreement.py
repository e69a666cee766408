"""Pairwise agreement of reward clients with IFEval's checkers, side by side.

    python -m ttalign.benchmarks.judge_agreement \\
        --replies benchmarks/results/quality/adaptive-temperature-ifeval.json \\
        --reward judge --reward judge-strong --split report --name judge-agreement

Scores every distinct reply of the ``--replies`` result files (harness runs over the same
IFEval prompts) with each ``--reward`` of a running ttalign server, through
``/v1/rewards/score``, and reports how often each reward prefers the reply that follows more
of the prompt's instructions (see :mod:`benchmarks.quality.agreement`). The reward sees the
prompt and the replies only, never the checkers' verdicts or IFEval's instruction ids.
Writes ``NAME.json`` and ``NAME.md`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from ttalign.benchmarks.quality.agreement import (
    PromptReplies,
    agreement_report,
    collect_replies,
)
from ttalign.benchmarks.quality.client import TtalignClient

RESULTS_DIR = Path(__file__).parent / "results" / "quality"


async def score_all(
    client: TtalignClient, reward: str, prompts: list[PromptReplies], concurrency: int
) -> tuple[dict[str, list[float]], float]:
    """Each prompt's reply scores under ``reward``, and the wall seconds it took."""
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: PromptReplies) -> tuple[str, list[float]]:
        async with gate:
            texts = [reply.text for reply in prompt.replies]
            return prompt.prompt_id, await client.score(reward, prompt.prompt, texts)

    started = time.monotonic()
    scored = await asyncio.gather(*(one(p) for p in prompts if p.pairs()))
    return dict(scored), time.monotonic() - started


async def measure(args: argparse.Namespace, prompts: list[PromptReplies]) -> dict[str, Any]:
    client = TtalignClient(args.base_url, api_key=args.api_key)
    try:
        rewards = {}
        for reward in args.rewards:
            scores, seconds = await score_all(client, reward, prompts, args.concurrency)
            rewards[reward] = {
                **agreement_report(prompts, scores),
                "wall_seconds": round(seconds, 1),
                "scores": scores,
            }
            print(f"{reward}: {rewards[reward]['agreement']}", file=sys.stderr, flush=True)
        return rewards
    finally:
        await client.close()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Pairwise agreement with IFEval's checkers",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Replies from {', '.join(result['replies'])}; split `{result['split']}`: "
        f"{result['prompts']} prompts. A pair is two replies to one prompt that follow "
        "different shares of its instructions (strict); a tie counts as half. Intervals: "
        "95 % bootstrap over prompts.",
        "",
        "| reward | pairs | agreement | 95 % interval | ties | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["rewards"].items():
        low, high = row["interval"] or (float("nan"), float("nan"))
        lines.append(
            f"| {name} | {row['pairs']} | {row['agreement']:.3f} | [{low:.3f}, {high:.3f}] "
            f"| {row['ties']} | {row['wall_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ttalign.benchmarks.judge_agreement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--replies", type=Path, action="append", required=True)
    parser.add_argument("--reward", dest="rewards", action="append", required=True)
    parser.add_argument(
        "--run", dest="runs", action="append", help="only the replies of this run label"
    )
    parser.add_argument("--split", choices=["tune", "report", "all"], default="report")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N prompts (in id order)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="judge-agreement")
    args = parser.parse_args()

    documents = [json.loads(path.read_text()) for path in args.replies]
    prompts = collect_replies(documents, args.split, args.runs)[: args.limit]
    rewards = asyncio.run(measure(args, prompts))
    result = {
        "command": " ".join(["python -m ttalign.benchmarks.judge_agreement", *sys.argv[1:]]),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "replies": [str(path) for path in args.replies],
        "runs": args.runs,
        "split": args.split,
        "prompts": len(prompts),
        "rewards": rewards,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
