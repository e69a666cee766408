"""The judge's engine beside the policy's: on shared cores (vLLM's binding) or on cores of
its own (``--engine-cores split``), side by side in one run.

vLLM binds each in-process engine to the cores of its NUMA node less one; a second engine
in the same server lands on the same cores. This benchmark serves the embedded policy with
a packaged judge twice, once per setting, and runs the same judge-heavy evaluation on each
(best-of-n under ``judge-strong`` on IFEval prompts, fixed seed): the throughput ratio is
what the split buys.

    python -m ttalign.benchmarks.engine_cores --judge-model Qwen2.5-Coder-1.5B-Instruct
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ttalign.benchmarks.processes import (
    free_port,
    running_server,
    ttalign_server_command,
    vllm_build,
)
from ttalign.benchmarks.search_efficiency import (
    argument_parser,
    command_line,
    run_footer,
    start_run,
    write_results,
)
from ttalign.benchmarks.strategy_cost import MODEL_NAME, RESULTS_DIR
from ttalign.engine.cpu_binding import available_cores, split_cores

SETTINGS = ("shared", "split")


def server_flags(judge_model: str, judge_kv_cache: str, setting: str) -> list[str]:
    return [
        "--judge-model", judge_model, "--judge-kv-cache-memory", judge_kv_cache,
        "--engine-cores", setting,
    ]  # fmt: skip


def evaluation_command(url: str, args: Any, out_dir: Path, name: str) -> list[str]:
    """The quality harness on one server: best-of-n under ``judge-strong``."""
    spec = f'bon{args.n}=best_of_n:{{"n":{args.n}}}'
    return [
        sys.executable, "-m", "ttalign.benchmarks.evaluate", "ifeval", "--base-url", url,
        "--split", args.split, "--limit", str(args.prompts), "--max-tokens",
        str(args.max_tokens), "--temperature", "0.8", "--seed", str(args.seed),
        "--concurrency", str(args.concurrency), "--reward", "judge-strong", "--run", spec,
        "--output-dir", str(out_dir), "--name", name, "--no-progress",
    ]  # fmt: skip


def figures(document: Mapping[str, Any]) -> dict[str, Any]:
    """What one setting's evaluation cost and scored."""
    [run] = document["runs"]
    cost = run["cost"]
    prompts = cost["n_prompts"]
    wall = cost["run_wall_seconds"]
    return {
        "prompts": prompts,
        "failed": cost["n_errors"],
        "wall_seconds": wall,
        "prompts_per_minute": 60 * prompts / wall,
        "generated_tokens_per_second": cost["mean_engine_completion_tokens"] * prompts / wall,
        "reward_seconds_per_prompt": cost.get("mean_reward_seconds"),
        "prompt_strict": run["metrics"].get("prompt_strict"),
    }


def to_markdown(result: Mapping[str, Any]) -> str:
    rows = result["figures"]
    lines = [
        "# The judge's engine on shared cores or on cores of its own",
        "",
        f"{result['prompts']} IFEval prompts (`--split {result['split']}`), best-of-"
        f"{result['n']} under `judge-strong`, max_tokens {result['max_tokens']}, seed "
        f"{result['seed']}, concurrency {result['concurrency']}; policy {result['model']}, "
        f"judge {result['judge_model']}; cores {result['cores']}, vLLM {result['vllm']}.",
        "",
        "| `--engine-cores` | engine cores (policy / judge) | wall s | prompts / min | "
        "generated tok/s | judging s / prompt | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for setting, row in rows.items():
        judging = row["reward_seconds_per_prompt"]
        lines.append(
            f"| {setting} | {result['binding'][setting]} | {row['wall_seconds']:.1f} | "
            f"{row['prompts_per_minute']:.2f} | {row['generated_tokens_per_second']:.1f} | "
            f"{'n/a' if judging is None else f'{judging:.1f}'} | {row['failed']} |"
        )
    lines += ["", f"Throughput, split / shared: **{result['speedup']:.2f}×**.", ""]
    return "\n".join(lines + run_footer(result))


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """The judge and the judge-heavy evaluation that each server runs."""
    parser.add_argument("--judge-model", default="Qwen2.5-Coder-1.5B-Instruct")
    parser.add_argument("--judge-kv-cache-memory", default="1GiB")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--split", choices=["tune", "report"], default="tune")
    parser.add_argument("--n", type=int, default=8, help="best-of-n's n")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv: Sequence[str] | None = None) -> Any:
    parser = argument_parser("engine_cores", __doc__)
    add_evaluation_options(parser)
    parser.add_argument("--name", default="engine_cores")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR / "engine_cores")
    return parser.parse_args(argv)


def run_settings(args: Any) -> dict[str, Any]:
    """What every server of a run was given and asked: the head of its result."""
    return {
        "model": MODEL_NAME,
        "judge_model": args.judge_model,
        "vllm": vllm_build(),
        "cores": ",".join(map(str, available_cores())),
        "prompts": args.prompts,
        "split": args.split,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "seed": args.seed,
    }


def evaluate_on_fresh_servers(
    args: Any, flags: Mapping[str, list[str]], model: str, logs: Path, label: str
) -> dict[str, dict[str, Any]]:
    """One fresh server per entry of ``flags`` (its extra ``ttalign serve`` flags), the same
    judge-heavy evaluation on each, one after the other; each entry's :func:`figures`."""
    evaluations = Path(tempfile.mkdtemp(prefix=f"ttalign-{label}-eval-"))
    results: dict[str, dict[str, Any]] = {}
    for setting, extra in flags.items():
        print(f"{label} {setting}:", flush=True)
        port = free_port()
        command = ttalign_server_command(model, port, name=MODEL_NAME, extra_args=extra)
        with running_server(command, port, logs / f"{setting}.log", timeout=1200) as url:
            name = f"{label}-{setting}"
            subprocess.run(evaluation_command(url, args, evaluations, name), check=True)
        results[setting] = figures(json.loads((evaluations / f"{name}.json").read_text()))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    model, logs = start_run("ttalign-engine-cores-")
    shares = split_cores(available_cores(), 2)
    flags = {
        setting: server_flags(args.judge_model, args.judge_kv_cache_memory, setting)
        for setting in SETTINGS
    }
    results = evaluate_on_fresh_servers(args, flags, model, logs, "engine-cores")
    rate = "prompts_per_minute"
    result = {
        **run_settings(args),
        "binding": {
            "shared": "vLLM's, both alike",
            "split": "vLLM's"
            if shares is None
            else " / ".join(",".join(map(str, share)) for share in shares),
        },
        "figures": results,
        "speedup": results["split"][rate] / results["shared"][rate],
        "command": command_line("engine_cores", argv),
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(args.output_dir / args.name, result, to_markdown(result))


if __name__ == "__main__":
    main()
