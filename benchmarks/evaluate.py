"""Quality evaluation: run a prompt set through a ttalign server under several strategies.

Examples (server on port 8011)::

    python -m ttalign.benchmarks.evaluate ifeval --base-url http://127.0.0.1:8011 --reward rules \\
        --run none --run 'best_of_n:{"n":2}' --run 'best_of_n:{"n":4}' --run 'best_of_n:{"n":8}'
    python -m ttalign.benchmarks.evaluate xstest --base-url http://127.0.0.1:8011 --run none \\
        --limit 100 --sample-seed 0
    python -m ttalign.benchmarks.evaluate ifeval-prefix --reward rules --score-reward rules \\
        --run none --run 'rain:{"evaluator":"reward"}'
    python -m ttalign.benchmarks.evaluate alpaca --score-reward judge \\
        --run none --run 'best_of_n:{"n":4}'

Chunks of one long evaluation (``--offset``/``--limit``) merge into one result::

    python -m ttalign.benchmarks.evaluate --merge part1.json part2.json --name ifeval-bon

Each invocation writes ``NAME.json`` (settings, per-prompt outputs, metrics and cost),
``NAME.md`` (the runs side by side) and ``NAME.png`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ttalign.benchmarks.quality.agreement import split_of
from ttalign.benchmarks.quality.client import TtalignClient
from ttalign.benchmarks.quality.harness import EvalSettings, RunResult, evaluate_run
from ttalign.benchmarks.quality.merge import MergeError, merge_documents
from ttalign.benchmarks.quality.report import metric_legend, write_result
from ttalign.benchmarks.quality.runs import RunSpec, RunSpecError, check_unique_labels, parse_run
from ttalign.benchmarks.quality.suites import Item, Suite, suites

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "eval"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results" / "quality"

RUN_HELP = """\
a configuration to evaluate, repeatable (default: a single none). Grammar:
[LABEL=]STRATEGY[@REWARD][:CONFIG_JSON], e.g. none, 'best_of_n:{"n":4}',
'bon8-judge=best_of_n@judge:{"n":8}', 'tpo:{"depth":2,"width":5,"mode":"revision"}'.
CONFIG_JSON is sent as strategy_config; @REWARD overrides --reward for this run"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ttalign.benchmarks.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", nargs="?", choices=sorted(suites()), help="prompt set")
    parser.add_argument("--run", action="append", dest="runs", metavar="SPEC", help=RUN_HELP)
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="ttalign server (%(default)s)"
    )
    parser.add_argument("--model", help="model id (default: the first of /v1/models)")
    parser.add_argument("--api-key", default="EMPTY", help="sent as the bearer token")
    parser.add_argument(
        "--reward",
        help="reward client for runs whose strategy uses one and whose spec names none",
    )
    parser.add_argument(
        "--score-reward",
        help="also score every output with this server reward client (reported as "
        "mean_reward); alpaca always scores, with the server's default reward if unset",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="prompt files (%(default)s)"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N items")
    parser.add_argument(
        "--offset", type=int, default=0, help="skip the first K items (after --sample-seed)"
    )
    parser.add_argument(
        "--sample-seed",
        type=int,
        metavar="SEED",
        help="take the items in a seeded random order (then --offset and --limit), for "
        "files ordered by category (XSTest is, by prompt type); consecutive --offset "
        "chunks of one seed never overlap",
    )
    parser.add_argument(
        "--split",
        choices=["tune", "report"],
        help="only one half of the prompts: tune judges and prompts on 'tune', report "
        "figures on 'report' (a fixed, salted hash of each prompt's id)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (%(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="per reply (%(default)s)")
    parser.add_argument("--temperature", type=float, help="default: the server's")
    parser.add_argument("--top-p", type=float, help="default: the server's")
    parser.add_argument("--seed", type=int, help="sampling seed of every request")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="per request, seconds (%(default)s)"
    )
    parser.add_argument(
        "--max-retries", type=int, default=2, help="of the openai client (%(default)s)"
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="(%(default)s)")
    parser.add_argument(
        "--name", help="file name stem of the results (default: SUITE or SUITE-REWARD)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="merge result files of one evaluation run in chunks (disjoint prompts) into "
        "--name, recomputing every metric and interval",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only redraw the markdown table and plot of an existing JSON result",
    )
    return parser


async def evaluate(
    suite: Suite,
    specs: list[RunSpec],
    settings: EvalSettings,
    *,
    base_url: str,
    data_file: Path,
    limit: int | None = None,
    sample_seed: int | None = None,
    offset: int = 0,
    split: str | None = None,
    model: str | None = None,
    api_key: str = "EMPTY",
    timeout: float = 900.0,
    max_retries: int = 2,
) -> dict[str, object]:
    """Every run of ``specs`` over ``suite``, one after another; returns the JSON document."""
    items = select_items(suite.load(data_file), limit, sample_seed, offset, split)
    client = TtalignClient(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
    try:
        model = model or await client.model()
        served = await client.strategies_using_reward()
        unknown = sorted({s.strategy for s in specs} - served.keys())
        if unknown:
            raise RunSpecError(
                f"the server has no strategy {', '.join(unknown)}; it serves {', '.join(served)}"
            )
        results: list[RunResult] = []
        for spec in specs:
            result = await evaluate_run(
                client, model, suite, items, spec, settings, uses_reward=served[spec.strategy]
            )
            _warn_failures(result)
            results.append(result)
    finally:
        await client.close()
    return {
        "suite": suite.name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "server": {"base_url": client.base_url, "model": model},
        "data_file": _shown_path(data_file),
        "limit": limit,
        "sample_seed": sample_seed,
        "split": split,
        "offset": offset,
        "settings": {
            "sampling": settings.sampling(),
            **{k: v for k, v in asdict(settings).items() if k != "progress"},
            "scored": settings.score_reward is not None or settings.always_score,
        },
        "metrics": metric_legend(suite.metrics),
        "plot_metrics": list(suite.plot_metrics),
        "runs": [r.to_json() for r in results],
    }


def select_items(
    items: list[Item],
    limit: int | None,
    sample_seed: int | None,
    offset: int = 0,
    split: str | None = None,
) -> list[Item]:
    """``limit`` items from ``offset`` on, in file order or in a random order of ``sample_seed``;
    with ``split``, only that half of the prompts (see :func:`quality.agreement.split_of`)."""
    if split is not None:
        items = [item for item in items if split_of(str(item.id)) == split]
    if sample_seed is not None:
        items = random.Random(sample_seed).sample(items, len(items))
    items = items[offset:]
    return items if limit is None else items[:limit]


def _shown_path(path: Path) -> str:
    # Relative to the repository, so committed results do not name this machine's folders.
    try:
        return os.path.relpath(path.resolve(), REPO_ROOT)
    except ValueError:
        return str(path)


def _warn_failures(result: RunResult) -> None:
    for key, what in (("error", "requests"), ("reward_error", "reward scorings")):
        errors = [r[key] for r in result.records if r.get(key)]
        if errors:
            print(
                f"{result.spec.label}: {len(errors)} of {len(result.records)} {what} failed; "
                f"first: {errors[0]}",
                file=sys.stderr,
            )


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Run the command; returns the paths it wrote (json, md, png)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render:
        document = json.loads(args.render.read_text())
        return write_result(document, args.output_dir, args.name or args.render.stem)
    if args.merge:
        if not args.name:
            parser.error("--merge needs --name for the merged result")
        try:
            document = merge_documents(
                [json.loads(path.read_text()) for path in args.merge],
                [_shown_path(path) for path in args.merge],
            )
        except MergeError as exc:
            parser.error(str(exc))
        return write_result(document, args.output_dir, args.name)
    if args.suite is None:
        parser.error("a suite is required (or --render)")
    suite = suites()[args.suite]
    try:
        specs = [parse_run(text) for text in args.runs or ["none"]]
        check_unique_labels(specs)
    except RunSpecError as exc:
        parser.error(str(exc))
    settings = EvalSettings(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        concurrency=args.concurrency,
        reward=args.reward,
        score_reward=args.score_reward,
        always_score=suite.needs_reward_scores,
        progress=not args.no_progress,
    )
    try:
        document = asyncio.run(
            evaluate(
                suite,
                specs,
                settings,
                base_url=args.base_url,
                data_file=args.data_dir / suite.filename,
                limit=args.limit,
                sample_seed=args.sample_seed,
                split=args.split,
                offset=args.offset,
                model=args.model,
                api_key=args.api_key,
                timeout=args.timeout,
                max_retries=args.max_retries,
            )
        )
    except RunSpecError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    name = args.name or "-".join(filter(None, (suite.name, args.reward)))
    paths = write_result(document, args.output_dir, name)
    for path in paths.values():
        print(path)
    return paths


if __name__ == "__main__":
    main()
