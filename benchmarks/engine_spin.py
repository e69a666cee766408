"""vLLM's engine processes spinning while they wait for each other, or sleeping
(``--engine-spin-seconds``), side by side in one run.

vLLM's engine core busy-waits on its shared-memory queue for up to a second after each
message, so it spins for as long as its worker computes a step. With the judge engine beside
the policy, each on a core of its own (``--engine-cores split``), that spin lands on a core
a worker computes on. This benchmark serves the embedded policy with a packaged judge once
per setting, vLLM's one second and ttalign's 0, and runs the same judge-heavy evaluation on
each (best-of-n under ``judge-strong`` on IFEval prompts, fixed seed): the throughput ratio
is what sleeping buys.

    python -m ttalign.benchmarks.engine_spin --judge-model Qwen2.5-Coder-1.5B-Instruct
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ttalign.benchmarks.engine_cores import (
    add_evaluation_options,
    evaluate_on_fresh_servers,
    run_settings,
    server_flags,
)
from ttalign.benchmarks.search_efficiency import (
    argument_parser,
    command_line,
    run_footer,
    start_run,
    write_results,
)
from ttalign.benchmarks.strategy_cost import RESULTS_DIR

#: ``--engine-spin-seconds`` per setting: vLLM's own, then ttalign's default.
SETTINGS = {"spin": 1.0, "sleep": 0.0}


def to_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "# vLLM's engine processes spinning or sleeping between messages",
        "",
        f"{result['prompts']} IFEval prompts (`--split {result['split']}`), best-of-"
        f"{result['n']} under `judge-strong`, max_tokens {result['max_tokens']}, seed "
        f"{result['seed']}, concurrency {result['concurrency']}; policy {result['model']}, "
        f"judge {result['judge_model']}, `--engine-cores split`; cores {result['cores']}, "
        f"vLLM {result['vllm']}.",
        "",
        "| setting | `--engine-spin-seconds` | wall s | prompts / min | generated tok/s | "
        "judging s / prompt | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, row in result["figures"].items():
        judging = row["reward_seconds_per_prompt"]
        lines.append(
            f"| {setting} | {SETTINGS[setting]:g} | {row['wall_seconds']:.1f} | "
            f"{row['prompts_per_minute']:.2f} | {row['generated_tokens_per_second']:.1f} | "
            f"{'n/a' if judging is None else f'{judging:.1f}'} | {row['failed']} |"
        )
    lines += ["", f"Throughput, sleep / spin: **{result['speedup']:.2f}×**.", ""]
    return "\n".join(lines + run_footer(result))


def parse_args(argv: Sequence[str] | None = None) -> Any:
    parser = argument_parser("engine_spin", __doc__)
    add_evaluation_options(parser)
    parser.add_argument("--name", default="engine_spin")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR / "engine_spin")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    model, logs = start_run("ttalign-engine-spin-")
    split = server_flags(args.judge_model, args.judge_kv_cache_memory, "split")
    flags = {
        setting: [*split, "--engine-spin-seconds", str(seconds)]
        for setting, seconds in SETTINGS.items()
    }
    results = evaluate_on_fresh_servers(args, flags, model, logs, "engine-spin")
    rate = "prompts_per_minute"
    result = {
        **run_settings(args),
        "figures": results,
        "speedup": results["sleep"][rate] / results["spin"][rate],
        "command": command_line("engine_spin", argv),
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(args.output_dir / args.name, result, to_markdown(result))


if __name__ == "__main__":
    main()
