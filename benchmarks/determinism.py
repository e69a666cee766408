"""What reproducibility costs: bfloat16 against float32, and ``--deterministic`` against the
default, measured side by side in one run, with how reproducible each arm really was.

Every arm is its own ttalign server on the embedded SmolLM2 (eager), all started at once
and measured in turn within each round, so no arm gets a quieter machine than another.
Per round and arm:

- plain throughput: ``concurrency`` requests of ``max_tokens`` tokens with ``ignore_eos``;
- best-of-8 under the judge: two concurrent requests (generation plus judging);
- reproducibility: one seeded best-of-8 request under the judge sent alone, and the same
  request again while another (untimed) plain batch runs beside it. Every answer (text, candidates,
  rewards) is compared with the first, and the largest reward difference is reported.

On a CPU with AMX, deterministic bfloat16 is refused at start, so that arm is left out.

    python -m ttalign.benchmarks.determinism --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from ttalign.benchmarks.chat_prompts import PROMPTS
from ttalign.benchmarks.processes import (
    Server,
    free_port,
    running_servers,
    ttalign_server_command,
    vllm_build,
)
from ttalign.server.model_prep import prepare_embedded_model

RESULTS_DIR = Path(__file__).parent / "results"
MODEL_NAME = "smollm2"
PROBE = [{"role": "user", "content": "Give one tip for staying focused while studying."}]


class Arm(NamedTuple):
    name: str
    dtype: str
    deterministic: bool


ARMS = [
    Arm("bfloat16", "bfloat16", False),
    Arm("float32", "float32", False),
    Arm("deterministic float32", "auto", True),
    Arm("deterministic bfloat16", "bfloat16", True),
]


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text()
    return sorted({flag for flag in ("amx_bf16", "amx_tile", "avx512_bf16") if flag in text})


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def best_of_8(prompt: list[dict[str, str]], seed: int) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": prompt,
        "max_tokens": 32,
        "seed": seed,
        "strategy": "best_of_n",
        "strategy_config": {"n": 8, "temperature": 1.0},
        "reward": "judge",
        "return_trace": True,
    }


async def plain_batch(client: httpx.AsyncClient, concurrency: int, max_tokens: int) -> float:
    """Output tokens per second of ``concurrency`` plain requests sent at once."""

    async def one(i: int) -> int:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 1.0,
            "seed": i,
        }
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    started = time.monotonic()
    tokens = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(tokens) / (time.monotonic() - started)


async def judged_batch(client: httpx.AsyncClient) -> float:
    """Seconds for two concurrent best-of-8 requests under the judge."""
    started = time.monotonic()
    bodies = [best_of_8([{"role": "user", "content": p}], i) for i, p in enumerate(PROMPTS[:2])]
    for response in await asyncio.gather(
        *(client.post("/v1/chat/completions", json=b) for b in bodies)
    ):
        response.raise_for_status()
    return time.monotonic() - started


async def probe(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post("/v1/chat/completions", json=best_of_8(PROBE, 7))
    response.raise_for_status()
    body = response.json()
    trace = body["alignment"]["trace"]
    return {
        "text": body["choices"][0]["message"]["content"],
        "candidates": [c["text"] for c in trace["candidates"]],
        "rewards": trace["rewards"],
    }


async def one_round(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=1800) as client:
        alone = await probe(client)
        tokens_per_second = await plain_batch(client, args.concurrency, args.max_tokens)
        judged_seconds = await judged_batch(client)
        # The probe again, joining the batches of a plain batch already running (not timed).
        traffic = asyncio.create_task(plain_batch(client, args.concurrency, args.max_tokens))
        await asyncio.sleep(0.5)
        beside = await probe(client)
        await traffic
    return {
        "plain_tokens_per_second": tokens_per_second,
        "best_of_8_judge_seconds": judged_seconds,
        "probes": [alone, beside],
    }


def reproducibility(probes: list[dict[str, Any]]) -> dict[str, Any]:
    first = probes[0]
    drift = max(
        abs(a - b) for p in probes for a, b in zip(p["rewards"], first["rewards"], strict=True)
    )
    return {
        "probes": len(probes),
        "identical_to_first": sum(p == first for p in probes),
        "different_texts": len({p["text"] for p in probes}),
        "max_reward_difference": drift,
    }


async def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    async with httpx.AsyncClient(timeout=600) as client:
        for url in urls.values():  # warm-up, not measured
            await client.post(
                f"{url}/v1/chat/completions",
                json={"model": MODEL_NAME, "messages": PROBE, "max_tokens": 8},
            )
    for _ in range(args.rounds):
        for name, url in urls.items():
            rounds[name].append(await one_round(url, args))
    results = {}
    for name, measured in rounds.items():
        results[name] = {
            "rounds": [{k: v for k, v in r.items() if k != "probes"} for r in measured],
            "median_plain_tokens_per_second": statistics.median(
                r["plain_tokens_per_second"] for r in measured
            ),
            "median_best_of_8_judge_seconds": statistics.median(
                r["best_of_8_judge_seconds"] for r in measured
            ),
            "reproducibility": reproducibility([p for r in measured for p in r["probes"]]),
        }
    return results


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    pairs = {
        "bfloat16 / float32 (default mode)": ("bfloat16", "float32"),
        "deterministic float32 / default float32": ("deterministic float32", "float32"),
        "deterministic float32 / default bfloat16": ("deterministic float32", "bfloat16"),
        "deterministic bfloat16 / default bfloat16": ("deterministic bfloat16", "bfloat16"),
    }
    out = {}
    for label, (a, b) in pairs.items():
        if a in results and b in results:
            out[label] = {
                "plain_throughput": results[a]["median_plain_tokens_per_second"]
                / results[b]["median_plain_tokens_per_second"],
                "best_of_8_judge_speed": results[b]["median_best_of_8_judge_seconds"]
                / results[a]["median_best_of_8_judge_seconds"],
            }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Reproducibility and its cost: dtype and --deterministic, side by side",
        "",
        f"Command: `{report['command']}`. {report['conditions']}",
        f"CPU flags: {', '.join(report['cpu_flags']) or 'none of amx/avx512_bf16'}; "
        f"{report['vllm']}.",
        "",
        "| arm | plain tok/s (median) | BoN-8 judge, 2 requests (s, median) | seeded BoN-8 "
        "probes identical to the first | distinct texts | max reward difference |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in report["results"].items():
        rep = result["reproducibility"]
        lines.append(
            f"| {name} | {result['median_plain_tokens_per_second']:.1f} | "
            f"{result['median_best_of_8_judge_seconds']:.2f} | "
            f"{rep['identical_to_first']}/{rep['probes']} | {rep['different_texts']} | "
            f"{rep['max_reward_difference']:.3g} |"
        )
    lines += ["", "| ratio | plain throughput | BoN-8 judge speed |", "|---|---|---|"]
    for label, ratio in report["ratios"].items():
        lines.append(
            f"| {label} | **{ratio['plain_throughput']:.3f}** | "
            f"**{ratio['best_of_8_judge_speed']:.3f}** |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "determinism")
    args = parser.parse_args()
    model = str(prepare_embedded_model())
    arms = [
        a
        for a in ARMS
        if not (a.deterministic and a.dtype == "bfloat16" and "amx_tile" in cpu_flags())
    ]
    servers, names = [], []
    for arm in arms:
        port = free_port()
        flags = ["--dtype", arm.dtype, "--kv-cache-memory", "512MiB"]
        if arm.deterministic:
            flags.append("--deterministic")
        command = ttalign_server_command(model, port, name=MODEL_NAME, extra_args=flags)
        log = args.output.parent / f"determinism-{arm.name.replace(' ', '-')}.log"
        servers.append(Server(command, port, log))
        names.append(arm.name)
    with running_servers(servers) as urls:
        results = asyncio.run(measure(dict(zip(names, urls, strict=True)), args))
    report = {
        "command": " ".join(["python -m ttalign.benchmarks.determinism", *sys.argv[1:]]),
        "conditions": (
            f"One ttalign server per arm (eager SmolLM2-135M, 512 MiB KV cache), all started "
            f"at once and measured in turn in each of {args.rounds} rounds; plain batches of "
            f"{args.concurrency} x {args.max_tokens} tokens with ignore_eos; best-of-8 under "
            "the built-in judge, 32 tokens; 2 CPU cores, nothing else running."
        ),
        "cpu_flags": cpu_flags(),
        "cpu_model": cpu_model(),
        "vllm": vllm_build(),
        "results": results,
        "ratios": ratios(results),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
