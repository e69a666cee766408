"""Does request affinity pay? Prefix-cache hits of TPO through a gateway over two replicas.

Two vLLM OpenAI servers serve the model (with ``VLLM_SERVER_DEV_MODE=1``, so
``POST /reset_prefix_cache`` exists), and two ttalign gateways in remote mode sit over
both: one routes with ``consistent_hash`` (every engine call of one request reaches one
replica), the other with ``round_robin`` (calls rotate, no affinity). Each round runs both
arms, in alternating order; an arm empties both replicas' prefix caches, runs the same TPO
requests (same prompts, seeds and sizes) at a fixed concurrency, and reads the replicas'
``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total`` (prompt tokens
looked up and found) and the gateway's ``ttalign_replica_requests_total`` before and after.

    python -m ttalign.benchmarks.gateway_affinity --prompts 8 --concurrency 4 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from ttalign.benchmarks.processes import (
    KV_CACHE_BYTES,
    Server,
    free_port,
    gateway_server_command,
    running_servers,
    vllm_build,
    vllm_server_command,
)
from ttalign.benchmarks.smoke_option import add_smoke_and_out, apply_smoke_and_out, write_report
from ttalign.benchmarks.strategy_cost import CONSTRAINTS
from ttalign.engine.remote_engine import metric_sum

MODEL_NAME = "smollm2"
#: The two gateways' routing, in the order of a round's first arm.
ARMS = ("consistent_hash", "round_robin")
QUERIES_METRIC = "vllm:prefix_cache_queries_total"
HITS_METRIC = "vllm:prefix_cache_hits_total"
#: The gateway's per-replica call counter (a counter family, so exposed with ``_total``).
GATEWAY_CALLS_METRIC = "ttalign_replica_requests_total"
#: One distinct request per topic; the instructions match :data:`CONSTRAINTS`.
TOPICS = (
    "asking a neighbour to water my plants while I am away",
    "thanking a colleague for covering my shift last weekend",
    "inviting my team to a picnic in the park on friday",
    "telling my landlord that the kitchen tap is leaking",
    "reminding my book club that we meet on tuesday",
    "apologising to a friend for missing their birthday dinner",
    "asking my manager for a day off next month",
    "welcoming a new member to our chess club",
    "telling a teacher that my son will miss school tomorrow",
    "asking a cafe owner whether they host live music",
    "congratulating my cousin on her new job",
    "asking the library to hold a book for me",
)
#: Sizes of ``--smoke``: a check that the script runs end to end, not a measurement.
SMOKE = {"prompts": 2, "concurrency": 2, "depth": 1, "width": 2, "max_tokens": 8, "rounds": 1}
#: Tries of ``/reset_prefix_cache``, which fails while blocks are still held.
RESET_TRIES = 20


def prompt(index: int) -> str:
    """The user turn of request ``index``."""
    return (
        f"Write a short note {TOPICS[index]}. Answer in all lowercase letters and in fewer "
        "than 60 words."
    )


def tpo_body(index: int, args: argparse.Namespace) -> dict[str, Any]:
    """The chat completion body of TPO request ``index`` (fixed seed, fixed lengths)."""
    tokens = args.max_tokens
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt(index)}],
        "max_tokens": tokens,
        "temperature": 0.7,
        # Every candidate and critique is exactly max_tokens long in both arms, so the
        # arms do the same engine work and differ only in where it runs.
        "ignore_eos": True,
        "seed": args.seed + index,
        "strategy": "tpo",
        "strategy_config": {
            "depth": args.depth,
            "width": args.width,
            "max_tokens": {"sample": tokens, "loss": tokens, "gradient": tokens, "update": tokens},
        },
        "reward": "rules",
        "constraints": CONSTRAINTS,
    }


def prefix_counters(metrics_text: str) -> dict[str, float]:
    """A replica's prefix-cache counters (tokens queried and hit), summed over label sets."""
    return {
        "queries": metric_sum(metrics_text, QUERIES_METRIC),
        "hits": metric_sum(metrics_text, HITS_METRIC),
    }


def gateway_calls(metrics_text: str, pool: str = "engine") -> dict[str, float]:
    """The gateway's calls sent to each replica of ``pool``, by replica URL."""
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == GATEWAY_CALLS_METRIC and sample.labels.get("pool") == pool:
                calls[sample.labels["replica"]] = sample.value
    return calls


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` per key of ``after`` (a key missing before counts from 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def hit_rate(hits: float, queries: float) -> float | None:
    """Share of queried prompt tokens found in the prefix cache; ``None`` with no queries."""
    return hits / queries if queries > 0 else None


def arm_figures(
    urls: Sequence[str],
    replicas_before: Sequence[Mapping[str, float]],
    replicas_after: Sequence[Mapping[str, float]],
    calls_before: Mapping[str, float],
    calls_after: Mapping[str, float],
) -> dict[str, Any]:
    """Per-replica and total prefix-cache figures of one arm, and the gateway's calls."""
    calls = delta(calls_before, calls_after)
    replicas = []
    for url, before, after in zip(urls, replicas_before, replicas_after, strict=True):
        d = delta(before, after)
        replicas.append(
            {
                "url": url,
                "queries": d["queries"],
                "hits": d["hits"],
                "hit_rate": hit_rate(d["hits"], d["queries"]),
                "gateway_calls": calls.get(url, 0.0),
            }
        )
    queries = sum(r["queries"] for r in replicas)
    hits = sum(r["hits"] for r in replicas)
    return {
        "queries": queries,
        "hits": hits,
        "hit_rate": hit_rate(hits, queries),
        "gateway_calls": sum(r["gateway_calls"] for r in replicas),
        "replicas": replicas,
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summary(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per arm, and affinity against round-robin."""
    arms = {
        arm: {
            "median_hit_rate": _median([r[arm]["hit_rate"] for r in rounds]),
            "median_wall_seconds": statistics.median(r[arm]["wall_seconds"] for r in rounds),
        }
        for arm in ARMS
    }
    affinity, spread = arms["consistent_hash"], arms["round_robin"]
    gain = None
    if affinity["median_hit_rate"] is not None and spread["median_hit_rate"] is not None:
        gain = affinity["median_hit_rate"] - spread["median_hit_rate"]
    return {
        "arms": arms,
        "hit_rate_gain": gain,
        "median_wall_ratio": statistics.median(
            r["consistent_hash"]["wall_seconds"] / r["round_robin"]["wall_seconds"] for r in rounds
        ),
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: per-round arms, per-replica detail, then the summary."""
    s = report["settings"]
    lines = [
        "# Gateway affinity: consistent hashing vs round-robin over two vLLM replicas",
        "",
        f"Command: `{report['command']}`  ",
        f"Settings: {s}  ",
        f"Engine: {report['engine']}",
        "",
        f"{s['prompts']} distinct TPO requests (D={s['depth']}, N={s['width']}, "
        f"{s['max_tokens']} tokens per step, ignore_eos, reward: rule verifiers), "
        f"{s['concurrency']} at a time, per arm, after one warm-up TPO request through each "
        "gateway; both replicas' prefix caches emptied before each arm. Hit rate = prompt "
        "tokens found in the prefix cache / prompt tokens looked up (vLLM's "
        "`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`).",
        "",
        "| round | arm | wall s | hit rate | hits / queries (tokens) | gateway calls "
        "per replica | hit rate per replica |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["rounds"]):
        for arm in r["order"]:
            a = r[arm]
            calls = " / ".join(f"{x['gateway_calls']:.0f}" for x in a["replicas"])
            rates = " / ".join(_pct(x["hit_rate"]) for x in a["replicas"])
            lines.append(
                f"| {i} | {arm} | {a['wall_seconds']:.1f} | {_pct(a['hit_rate'])} | "
                f"{a['hits']:.0f} / {a['queries']:.0f} | {calls} | {rates} |"
            )
    summ = report["summary"]
    affinity, spread = summ["arms"]["consistent_hash"], summ["arms"]["round_robin"]
    gain = summ["hit_rate_gain"]
    gain_text = "–" if gain is None else f"{100 * gain:+.1f} points"
    lines += [
        "",
        f"**Median prefix-cache hit rate: consistent_hash {_pct(affinity['median_hit_rate'])}, "
        f"round_robin {_pct(spread['median_hit_rate'])} ({gain_text}).**  ",
        f"**Median wall time ratio (consistent_hash / round_robin): "
        f"{summ['median_wall_ratio']:.3f}** (median wall: "
        f"{affinity['median_wall_seconds']:.1f} s vs {spread['median_wall_seconds']:.1f} s).",
        "",
        "Replicas, in the per-replica columns' order: "
        + ", ".join(f"`{url}`" for url in report["replica_urls"])
        + ".",
        "",
    ]
    return "\n".join(lines)


# --- running it ---------------------------------------------------------------------------


async def reset_prefix_cache(http: httpx.AsyncClient, url: str) -> None:
    """Empty one replica's prefix cache, retrying while its blocks are still held."""
    for _ in range(RESET_TRIES):
        response = await http.post(f"{url}/reset_prefix_cache")
        response.raise_for_status()
        if response.json().get("success"):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{url}: /reset_prefix_cache kept failing")


async def replica_counters(http: httpx.AsyncClient, urls: Sequence[str]) -> list[dict[str, float]]:
    texts = await asyncio.gather(*(http.get(f"{url}/metrics") for url in urls))
    return [prefix_counters(t.raise_for_status().text) for t in texts]


async def gateway_counters(http: httpx.AsyncClient, gateway_url: str) -> dict[str, float]:
    response = await http.get(f"{gateway_url}/metrics")
    return gateway_calls(response.raise_for_status().text)


async def run_arm(
    http: httpx.AsyncClient,
    gateway_url: str,
    replica_urls: Sequence[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One arm: empty the caches, run every TPO request through ``gateway_url``, measure."""
    await asyncio.gather(*(reset_prefix_cache(http, url) for url in replica_urls))
    replicas_before = await replica_counters(http, replica_urls)
    calls_before = await gateway_counters(http, gateway_url)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(index: int) -> int:
        async with gate:
            response = await http.post(
                f"{gateway_url}/v1/chat/completions", json=tpo_body(index, args)
            )
        response.raise_for_status()
        return int(response.json()["alignment"]["engine_calls"])

    started = time.perf_counter()
    engine_calls = await asyncio.gather(*(one(i) for i in range(args.prompts)))
    wall = time.perf_counter() - started
    # vLLM publishes scheduler stats with its outputs; give the last step's a moment.
    await asyncio.sleep(1.0)
    replicas_after = await replica_counters(http, replica_urls)
    calls_after = await gateway_counters(http, gateway_url)
    figures = arm_figures(replica_urls, replicas_before, replicas_after, calls_before, calls_after)
    return {"wall_seconds": wall, "engine_calls": sum(engine_calls), **figures}


async def run(
    args: argparse.Namespace, replica_urls: Sequence[str], gateways: Mapping[str, str]
) -> list[dict[str, Any]]:
    rounds = []
    async with httpx.AsyncClient(timeout=1800) as http:
        # First requests on a CPU engine are slow: one TPO request through each gateway
        # (round-robin's calls reach both replicas) before anything is measured.
        for arm in ARMS:
            warm = {**tpo_body(0, args), "seed": args.seed + len(TOPICS)}
            response = await http.post(f"{gateways[arm]}/v1/chat/completions", json=warm)
            response.raise_for_status()
        for i in range(args.rounds):
            order = list(ARMS) if i % 2 == 0 else list(reversed(ARMS))
            result: dict[str, Any] = {"order": order}
            for arm in order:
                result[arm] = await run_arm(http, gateways[arm], replica_urls, args)
                a = result[arm]
                print(
                    f"round {i} {arm}: {a['wall_seconds']:.1f} s, hit rate "
                    f"{_pct(a['hit_rate'])}, calls per replica "
                    f"{[r['gateway_calls'] for r in a['replicas']]}",
                    flush=True,
                )
            rounds.append(result)
    return rounds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompts", type=int, default=8, help=f"distinct TPO requests per arm (≤ {len(TOPICS)})"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="TPO requests at once")
    parser.add_argument("--depth", type=int, default=2, help="TPO's D")
    parser.add_argument("--width", type=int, default=4, help="TPO's N")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per TPO step")
    parser.add_argument("--seed", type=int, default=0, help="seed of request 0 (then +1 each)")
    parser.add_argument("--rounds", type=int, default=2)
    add_smoke_and_out(parser, SMOKE, "gateway_affinity")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(TOPICS):
        parser.error(f"--prompts must be between 1 and {len(TOPICS)}")
    return apply_smoke_and_out(args, SMOKE, "gateway_affinity")


def main() -> None:
    from ttalign.server.model_prep import prepare_embedded_model

    args = parse_args()
    model = str(prepare_embedded_model())
    logs = Path(tempfile.mkdtemp(prefix="ttalign-gateway-affinity-"))
    dev_mode = {"VLLM_SERVER_DEV_MODE": "1"}
    replica_ports = [free_port(), free_port()]
    replicas = [
        Server(
            vllm_server_command(model, port, name=MODEL_NAME),
            port,
            logs / f"vllm-{i}.log",
            dev_mode,
        )
        for i, port in enumerate(replica_ports)
    ]
    # The replicas first: a gateway checks the fleet's model and tokenizer at start.
    with running_servers(replicas) as replica_urls:
        gateway_ports = {arm: free_port() for arm in ARMS}
        gateways = [
            Server(
                gateway_server_command(
                    model, gateway_ports[arm], replica_urls, name=MODEL_NAME, routing=arm
                ),
                gateway_ports[arm],
                logs / f"gateway-{arm}.log",
            )
            for arm in ARMS
        ]
        with running_servers(gateways) as gateway_urls:
            rounds = asyncio.run(
                run(args, replica_urls, dict(zip(ARMS, gateway_urls, strict=True)))
            )

    settings = {
        k: getattr(args, k)
        for k in ("prompts", "concurrency", "depth", "width", "max_tokens", "seed", "rounds")
    }
    command = "python -m ttalign.benchmarks.gateway_affinity " + " ".join(sys.argv[1:])
    report = {
        "benchmark": "prefix-cache hits of TPO through a gateway over two vLLM replicas: "
        "consistent_hash vs round_robin routing",
        "command": command.strip(),
        "settings": settings,
        "engine": {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "build": vllm_build(),
            "enforce_eager": True,
            "kv_cache_memory_bytes_per_replica": KV_CACHE_BYTES,
            "replicas": len(replica_urls),
        },
        "replica_urls": list(replica_urls),
        "rounds": rounds,
        "summary": summary(rounds),
    }
    write_report(args.out, "gateway_affinity", report, markdown(report), logs)


if __name__ == "__main__":
    main()
