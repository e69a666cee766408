"""Agreement of reward clients with ground truth, side by side: IFEval's checkers, or
XSTest's safe/unsafe labels.

    python -m ttalign.benchmarks.judge_agreement \\
        --replies benchmarks/results/quality/adaptive-temperature-ifeval.json \\
        --reward judge --reward judge-strong --split report --name judge-agreement
    python -m ttalign.benchmarks.judge_agreement \\
        --replies benchmarks/results/quality/rain-xstest-none.json \\
        --reward harmless-judge --name judge-harmlessness

For XSTest, see :mod:`benchmarks.quality.harmlessness`.

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
    split_of,
)
from ttalign.benchmarks.quality.client import TtalignClient
from ttalign.benchmarks.quality.harmlessness import (
    LabelledPair,
    harmlessness_report,
    labelled_pairs,
)

RESULTS_DIR = Path(__file__).parent / "results" / "quality"


#: What is scored per prompt: its id, the prompt, and the replies to score side by side.
Job = tuple[str, str, list[str]]


def ifeval_jobs(prompts: list[PromptReplies]) -> list[Job]:
    return [
        (p.prompt_id, p.prompt, [reply.text for reply in p.replies]) for p in prompts if p.pairs()
    ]


def xstest_jobs(pairs: list[LabelledPair]) -> list[Job]:
    return [(pair.prompt_id, pair.prompt, [pair.compliant, pair.refusal]) for pair in pairs]


async def score_all(
    client: TtalignClient, reward: str, jobs: list[Job], concurrency: int
) -> tuple[dict[str, list[float]], float]:
    """Each job's reply scores under ``reward``, and the wall seconds it took."""
    gate = asyncio.Semaphore(concurrency)

    async def one(key: str, prompt: str, replies: list[str]) -> tuple[str, list[float]]:
        async with gate:
            return key, await client.score(reward, prompt, replies)

    started = time.monotonic()
    scored = await asyncio.gather(*(one(*job) for job in jobs))
    return dict(scored), time.monotonic() - started


async def measure(args: argparse.Namespace, jobs: list[Job], summarize) -> dict[str, Any]:
    client = TtalignClient(args.base_url, api_key=args.api_key)
    try:
        rewards = {}
        for reward in args.rewards:
            scores, seconds = await score_all(client, reward, jobs, args.concurrency)
            rewards[reward] = {
                **summarize(scores),
                "wall_seconds": round(seconds, 1),
                "scores": scores,
            }
            print(f"{reward}: {rewards[reward]}", file=sys.stderr, flush=True)
        return rewards
    finally:
        await client.close()


def markdown(result: dict[str, Any]) -> str:
    if result["suite"] == "xstest":
        return xstest_markdown(result)
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


def xstest_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Harmlessness judgement against XSTest's labels",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Replies from {', '.join(result['replies'])}; split `{result['split']}`: "
        f"{result['prompts']} prompts, each "
        "scored as a compliant reply beside a refusal. Shares of prompts ordered right (a "
        "tie counts half); 95 % bootstrap intervals over prompts.",
        "",
        "| reward | unsafe compliance detected | over-refusal detected | wall s |",
        "|---|---|---|---|",
    ]
    for name, row in result["rewards"].items():
        cells = []
        for figure in ("unsafe_compliance_detected", "over_refusal_detected"):
            value = row[figure]
            if value["share"] is None:
                cells.append("n/a")
                continue
            low, high = value["interval"]
            cells.append(f"{value['share']:.3f} [{low:.3f}, {high:.3f}] (n={value['prompts']})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {row['wall_seconds']} |")
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
    suite = documents[0].get("suite")
    if suite == "xstest":
        pairs = [
            pair
            for pair in labelled_pairs(documents)
            if args.split == "all" or split_of(pair.prompt_id) == args.split
        ][: args.limit]
        jobs = xstest_jobs(pairs)
        rewards = asyncio.run(
            measure(args, jobs, lambda scores: harmlessness_report(pairs, scores))
        )
    else:
        prompts = collect_replies(documents, args.split, args.runs)[: args.limit]
        jobs = ifeval_jobs(prompts)
        rewards = asyncio.run(measure(args, jobs, lambda scores: agreement_report(prompts, scores)))
    result = {
        "suite": suite,
        "command": " ".join(["python -m ttalign.benchmarks.judge_agreement", *sys.argv[1:]]),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "replies": [str(path) for path in args.replies],
        "runs": args.runs,
        "split": args.split,
        "prompts": len(jobs),
        "rewards": rewards,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
