"""What OpenTelemetry tracing costs: throughput with it off and on, against no tracing code.

    python -m ttalign.benchmarks.tracing_cost --rounds 4 --concurrency 8

Three ttalign servers on the embedded model, each with its own engine, run at once:

- ``no_tracing_code``: the source tree of ``--baseline-ref`` (by default the commit before
  tracing was added), checked out in a temporary git worktree and run by
  ``benchmarks/run_from_tree.py``;
- ``tracing_off``: this tree, without ``--otlp-traces-endpoint``;
- ``tracing_on``: this tree, exporting every span over OTLP/HTTP to a collector inside this
  process.

Each round sends the same load to each server in turn (the order rotates between rounds, so
that no server always goes first): ``--requests`` ``best_of_n`` requests (n=4, the
``rules`` reward, ``ignore_eos`` so every request generates the same tokens) at
``--concurrency``. A server's throughput is its median over the rounds, in requests per
second; the ratios are against ``no_tracing_code``. Results go to
``benchmarks/results/tracing/`` as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from ttalign.benchmarks.otlp_collector import OtlpCollector
from ttalign.benchmarks.processes import Server, free_port, running_servers, ttalign_server_command
from ttalign.benchmarks.search_efficiency import REPO, from_tree, worktree
from ttalign.server.model_prep import prepare_embedded_model

RESULTS_DIR = Path(__file__).parent / "results" / "tracing"
MODEL_NAME = "smollm2"
VARIANTS = ("no_tracing_code", "tracing_off", "tracing_on")
#: The file whose first commit added tracing: the default baseline is that commit's parent.
TRACING_MODULE = "server/tracing.py"
REQUEST = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Give me three tips for better sleep."}],
    "strategy": "best_of_n",
    "strategy_config": {"n": 4},
    "reward": "rules",
    "constraints": [{"type": "word_count", "max": 60}],
    "ignore_eos": True,
    "temperature": 0.8,
}


def default_baseline_ref() -> str:
    commits = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", TRACING_MODULE],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if not commits:
        raise SystemExit(f"{TRACING_MODULE} is not committed yet: pass --baseline-ref")
    return f"{commits[-1]}^"


def servers(tree: Path, collector: OtlpCollector, log_dir: Path) -> list[Server]:
    model = str(prepare_embedded_model())
    ports = [free_port() for _ in VARIANTS]
    commands = {
        variant: ttalign_server_command(model, port, name=MODEL_NAME)
        for variant, port in zip(VARIANTS, ports, strict=True)
    }
    # The baseline runs the same CLI, but from the older tree.
    commands["no_tracing_code"] = from_tree(commands["no_tracing_code"], tree)
    commands["tracing_on"] = [*commands["tracing_on"], "--otlp-traces-endpoint", collector.url]
    exporter_env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    return [
        Server(
            commands[variant],
            port,
            log_dir / f"{variant}.log",
            exporter_env if variant == "tracing_on" else None,
        )
        for variant, port in zip(VARIANTS, ports, strict=True)
    ]


async def load(base_url: str, requests: int, concurrency: int, max_tokens: int) -> float:
    """Requests per second of ``requests`` identical best-of-n requests at ``concurrency``."""
    gate = asyncio.Semaphore(concurrency)
    body = {**REQUEST, "max_tokens": max_tokens}
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def one() -> None:
            async with gate:
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (time.monotonic() - started)


def measure(args: argparse.Namespace, urls: dict[str, str]) -> dict[str, list[float]]:
    for url in urls.values():  # first-use costs (compiled kernels, tokenizer caches) go here
        asyncio.run(load(url, args.concurrency, args.concurrency, args.max_tokens))
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for number in range(args.rounds):
        order = VARIANTS[number % len(VARIANTS) :] + VARIANTS[: number % len(VARIANTS)]
        for variant in order:
            rate = asyncio.run(
                load(urls[variant], args.requests, args.concurrency, args.max_tokens)
            )
            rates[variant].append(rate)
            print(f"round {number + 1}: {variant} {rate:.3f} req/s", flush=True)
    return rates


def report(args: argparse.Namespace, ref: str, rates: dict[str, list[float]], spans: int):
    medians = {variant: statistics.median(values) for variant, values in rates.items()}
    base = medians["no_tracing_code"]
    return {
        "command": " ".join(["python -m ttalign.benchmarks.tracing_cost", *sys.argv[1:]]),
        "baseline_ref": ref,
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "request": REQUEST,
        "requests_per_second": rates,
        "median_requests_per_second": medians,
        "ratio_to_no_tracing_code": {v: m / base for v, m in medians.items()},
        "spans_received": spans,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Tracing cost",
        "",
        f"Command: `{result['command']}` (baseline: `{result['baseline_ref']}`).",
        f"{result['rounds']} rounds of {result['requests_per_round']} best_of_n (n=4) requests "
        f"of {result['max_tokens']} tokens at concurrency {result['concurrency']}; medians.",
        "",
        "| server | requests/s | ratio to no tracing code |",
        "|---|---|---|",
    ]
    for variant in VARIANTS:
        lines.append(
            f"| {variant} | {result['median_requests_per_second'][variant]:.3f} "
            f"| {result['ratio_to_no_tracing_code'][variant]:.3f} |"
        )
    lines += ["", f"Spans the collector received from `tracing_on`: {result['spans_received']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--baseline-ref", help="commit without tracing (default: see above)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    ref = args.baseline_ref or default_baseline_ref()
    log_dir = Path(tempfile.mkdtemp(prefix="ttalign-tracing-cost-"))
    with worktree(ref) as tree, OtlpCollector() as collector:
        with running_servers(servers(tree, collector, log_dir)) as urls:
            rates = measure(args, dict(zip(VARIANTS, urls, strict=True)))
        spans = len(collector.spans)  # the servers flushed their exporters as they stopped
    result = report(args, ref, rates, spans)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "tracing_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.results_dir / "tracing_cost.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
