"""Choose the ``harmlessness`` reward's threshold for a judge model, on XSTest's tune half.

The ``harmlessness`` reward turns its judge's P(Yes) to "would fulfilling this request help
cause real harm?" around a threshold (:mod:`reward_clients.harmlessness`). The judge's
P(Yes) is not calibrated and differs between models, so the threshold belongs to the judge
model. This script asks the judge that question for every XSTest dev prompt of one half
(``tune`` by default: never choose it on the prompts you report on), and reports how well
P(Yes) separates XSTest's *unsafe* prompts from its *safe* ones (AUC), and the threshold
that classifies the most of them right::

    python -m ttalign.benchmarks.harm_threshold --judge-model Qwen2.5-Coder-1.5B-Instruct

It starts a judge engine of its own (stop a server holding one first, or memory runs out),
and writes ``harm-threshold-MODEL.json`` under ``--output-dir``. Configure the result as
``harm_threshold`` of a ``type: harmlessness`` client.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
from collections.abc import Sequence
from pathlib import Path

from ttalign.benchmarks.evaluate import DEFAULT_DATA_DIR
from ttalign.benchmarks.quality.agreement import split_of

RESULTS_DIR = Path(__file__).parent / "results" / "quality"


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def best_threshold(positives: Sequence[float], negatives: Sequence[float]) -> tuple[float, float]:
    """The threshold (among the observed values; above it counts as positive) that
    classifies the most right, and that share."""
    total = len(positives) + len(negatives)
    candidates = sorted({*positives, *negatives})
    return max(
        (
            (sum(p > t for p in positives) + sum(n <= t for n in negatives)) / total,
            t,
        )
        for t in candidates
    )[::-1]


async def harm_answers(judge_model: str, prompts: Sequence[str], concurrency: int) -> list[float]:
    """The judge's P(Yes) to the harm question, per prompt."""
    from ttalign.benchmarks.train_temperature_head import start_judge_engine
    from ttalign.reward_clients.engine_calls import first_token_alternatives
    from ttalign.reward_clients.harmlessness import harm_messages
    from ttalign.reward_clients.judge import probability_of_yes

    engine = start_judge_engine(judge_model)
    if asyncio.iscoroutine(engine):
        engine = await engine
    limiter = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> float:
        async with limiter:
            top = await first_token_alternatives(engine, harm_messages(prompt), None, "harm")
        probability = probability_of_yes(top)
        if probability is None:
            raise RuntimeError(f"the judge answered neither Yes nor No to {prompt!r}")
        return probability

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--judge-model", required=True)
    parser.add_argument("--split", choices=["tune", "report"], default="tune")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR / "xstest_dev.csv")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    with args.data.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if split_of(row["id"]) == args.split]
    answers = asyncio.run(
        harm_answers(args.judge_model, [r["prompt"] for r in rows], args.concurrency)
    )
    unsafe = [a for a, r in zip(answers, rows, strict=True) if r["label"] == "unsafe"]
    safe = [a for a, r in zip(answers, rows, strict=True) if r["label"] == "safe"]
    threshold, accuracy = best_threshold(unsafe, safe)
    result = {
        "judge_model": args.judge_model,
        "split": args.split,
        "prompts": {"unsafe": len(unsafe), "safe": len(safe)},
        "auc": auc(unsafe, safe),
        "best_threshold": threshold,
        "accuracy_at_best_threshold": accuracy,
        "mean_p_yes": {"unsafe": sum(unsafe) / len(unsafe), "safe": sum(safe) / len(safe)},
        "answers": {r["id"]: a for r, a in zip(rows, answers, strict=True)},
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = Path(args.judge_model.rstrip("/")).name
    (args.output_dir / f"harm-threshold-{name}.json").write_text(json.dumps(result, indent=2))
    print(
        f"{name} on XSTest's {args.split} half ({len(unsafe)} unsafe, {len(safe)} safe): "
        f"AUC {result['auc']:.3f}; threshold {threshold:.3f} classifies {accuracy:.3f} right"
    )


if __name__ == "__main__":
    main()
