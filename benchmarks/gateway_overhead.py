"""What a ttalign gateway (remote engine, ``strategy=none``) adds in front of a vLLM server.

One vLLM OpenAI server runs the model; a ttalign gateway in remote mode serves the same
model through it. ``vllm bench serve`` loads the server directly and then through the
gateway with the same random prompts, seed and concurrency, alternating A/B for several
rounds so drift on a shared machine hits both alike. Reports per-round and median output
throughput ratio (gateway / direct) and median-TTFT overhead (gateway - direct).

    python -m ttalign.benchmarks.gateway_overhead --concurrency 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from ttalign.benchmarks.overhead import bench_serve
from ttalign.benchmarks.processes import (
    KV_CACHE_BYTES,
    free_port,
    gateway_server_command,
    running_server,
    vllm_build,
    vllm_server_command,
)
from ttalign.benchmarks.smoke_option import add_smoke_and_out, apply_smoke_and_out, write_report
from ttalign.engine.remote_engine import metric_sum

MODEL_NAME = "smollm2"
#: Goals: the gateway keeps this share of direct output throughput ...
THROUGHPUT_RATIO_GOAL = 0.95
#: ... and adds at most this much to the median time to first token.
TTFT_OVERHEAD_GOAL_MS = 15.0
#: What one ``vllm bench serve`` run reports, per side.
KEYS = (
    "output_throughput",
    "median_ttft_ms",
    "mean_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "mean_tpot_ms",
    "p99_tpot_ms",
    "median_e2el_ms",
    "completed",
    "total_output_tokens",
)
#: The gateway's own histogram of time not spent waiting on replicas.
GATEWAY_OVERHEAD_METRIC = "ttalign_gateway_overhead_seconds"
#: Sizes of ``--smoke``: a check that the script runs end to end, not a measurement.
SMOKE = {"concurrency": 2, "num_prompts": 4, "input_len": 16, "output_len": 8, "rounds": 1}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The :data:`KEYS` of one ``vllm bench serve`` result (``None`` where missing)."""
    return {key: raw.get(key) for key in KEYS}


def compare(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, float]:
    """One round's gateway-vs-direct figures from the two summaries."""
    return {
        "throughput_ratio": gateway["output_throughput"] / direct["output_throughput"],
        "median_ttft_overhead_ms": gateway["median_ttft_ms"] - direct["median_ttft_ms"],
        "mean_ttft_overhead_ms": gateway["mean_ttft_ms"] - direct["mean_ttft_ms"],
        "median_tpot_overhead_ms": gateway["median_tpot_ms"] - direct["median_tpot_ms"],
    }


def scrape(base_url: str) -> str:
    """A server's ``/metrics`` text."""
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def gateway_overhead_ms(before: str, after: str) -> float | None:
    """Mean gateway-measured overhead per request between two ``/metrics`` scrapes, in ms."""
    count = metric_sum(after, f"{GATEWAY_OVERHEAD_METRIC}_count") - metric_sum(
        before, f"{GATEWAY_OVERHEAD_METRIC}_count"
    )
    if count <= 0:
        return None
    total = metric_sum(after, f"{GATEWAY_OVERHEAD_METRIC}_sum") - metric_sum(
        before, f"{GATEWAY_OVERHEAD_METRIC}_sum"
    )
    return 1000 * total / count


def report_of(
    rounds: Sequence[dict[str, Any]], settings: dict[str, Any], command: str
) -> dict[str, Any]:
    """The full report: settings, every round, and the medians over rounds against goals."""
    throughput = statistics.median(r["throughput_ratio"] for r in rounds)
    ttft = statistics.median(r["median_ttft_overhead_ms"] for r in rounds)
    return {
        "benchmark": "ttalign gateway (remote engine, strategy=none) vs the vLLM server "
        "behind it (vllm bench serve)",
        "command": command,
        "settings": settings,
        "engine": {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "build": vllm_build(),
            "enforce_eager": True,
            "kv_cache_memory_bytes": KV_CACHE_BYTES,
            "replicas": 1,
        },
        "rounds": list(rounds),
        "median_throughput_ratio": throughput,
        "median_ttft_overhead_ms": ttft,
        "goals": {
            "throughput_ratio_min": THROUGHPUT_RATIO_GOAL,
            "ttft_overhead_ms_max": TTFT_OVERHEAD_GOAL_MS,
            "throughput_met": throughput >= THROUGHPUT_RATIO_GOAL,
            "ttft_met": ttft <= TTFT_OVERHEAD_GOAL_MS,
        },
    }


def _ms(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: tables per round, then the goal lines."""
    goals = report["goals"]
    lines = [
        "# Gateway overhead: ttalign remote engine (`strategy=none`) vs direct vLLM",
        "",
        f"Command: `{report['command']}`  ",
        f"Settings: {report['settings']}  ",
        f"Engine: {report['engine']}",
        "",
        "| round | direct out tok/s | gateway out tok/s | ratio | direct median TTFT ms "
        "| gateway median TTFT ms | TTFT overhead ms | gateway-measured overhead ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["rounds"]):
        d, g = r["direct"], r["gateway"]
        lines.append(
            f"| {i} | {d['output_throughput']:.1f} | {g['output_throughput']:.1f} | "
            f"{r['throughput_ratio']:.3f} | {_ms(d['median_ttft_ms'])} | "
            f"{_ms(g['median_ttft_ms'])} | {_ms(r['median_ttft_overhead_ms'], sign=True)} | "
            f"{_ms(r.get('gateway_measured_overhead_ms'))} |"
        )
    lines += [
        "",
        "| round | side | mean TTFT ms | p99 TTFT ms | median TPOT ms | mean TPOT ms "
        "| p99 TPOT ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["rounds"]):
        for side in ("direct", "gateway"):
            s = r[side]
            lines.append(
                f"| {i} | {side} | {_ms(s['mean_ttft_ms'])} | {_ms(s['p99_ttft_ms'])} | "
                f"{_ms(s['median_tpot_ms'])} | {_ms(s['mean_tpot_ms'])} | "
                f"{_ms(s['p99_tpot_ms'])} |"
            )
    met = {True: "met", False: "not met"}
    lines += [
        "",
        f"**Median throughput ratio (gateway / direct): {report['median_throughput_ratio']:.3f}"
        f"** (goal ≥ {goals['throughput_ratio_min']}: {met[goals['throughput_met']]})  ",
        f"**Median TTFT overhead: {report['median_ttft_overhead_ms']:+.1f} ms** "
        f"(goal ≤ {goals['ttft_overhead_ms_max']:.0f} ms: {met[goals['ttft_met']]})",
        "",
        "The gateway-measured overhead is the mean of the gateway's own "
        f"`{GATEWAY_OVERHEAD_METRIC}` per request during the round (warm-up requests "
        "included): its time not spent waiting on the replica.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    add_smoke_and_out(parser, SMOKE, "gateway_overhead")
    args = parser.parse_args(argv)
    return apply_smoke_and_out(args, SMOKE, "gateway_overhead")


def main() -> None:
    from ttalign.server.model_prep import prepare_embedded_model

    args = parse_args()
    model = str(prepare_embedded_model())
    logs = Path(tempfile.mkdtemp(prefix="ttalign-gateway-overhead-"))
    vllm_port, gateway_port = free_port(), free_port()
    rounds: list[dict[str, Any]] = []
    # The replica first: the gateway checks the fleet's model and tokenizer at start.
    with (
        running_server(
            vllm_server_command(model, vllm_port, name=MODEL_NAME), vllm_port, logs / "vllm.log"
        ) as vllm_url,
        running_server(
            gateway_server_command(model, gateway_port, [vllm_url], name=MODEL_NAME),
            gateway_port,
            logs / "gateway.log",
        ) as gateway_url,
    ):
        for i in range(args.rounds):
            order = [("direct", vllm_url, None), ("gateway", gateway_url, {"strategy": "none"})]
            if i % 2:
                order.reverse()
            result: dict[str, Any] = {"order": [label for label, _, _ in order]}
            for label, url, extra in order:
                before = scrape(gateway_url)
                raw = bench_serve(url, model, args, logs / f"{label}-{i}.json", extra)
                result[label] = summarize(raw)
                if label == "gateway":
                    overhead = gateway_overhead_ms(before, scrape(gateway_url))
                    result["gateway_measured_overhead_ms"] = overhead
            result.update(compare(result["direct"], result["gateway"]))
            rounds.append(result)
            print(json.dumps(result, indent=2), flush=True)

    settings = {
        k: getattr(args, k) for k in ("concurrency", "num_prompts", "input_len", "output_len")
    }
    settings["rounds"] = args.rounds
    command = "python -m ttalign.benchmarks.gateway_overhead " + " ".join(sys.argv[1:])
    report = report_of(rounds, settings, command.strip())
    write_report(args.out, "gateway_overhead", report, markdown(report), logs)


if __name__ == "__main__":
    main()
