"""Fair sharing: how slow a plain request gets while searches run, per scheduling policy.

One ttalign server per policy, started in turn; on each, ``--rounds`` times:

1. **idle**: ``--idle-probes`` plain probes, one after another (strategy ``none``,
   ``ignore_eos``, ``max_tokens`` 16, a pause of ``--probe-gap`` seconds between them);
2. **loaded**: two RAIN searches at once (default configuration, self-evaluation,
   ``max_tokens`` 32, two prompts), and the same probes one after another for as long as
   both searches run. A probe counts as loaded when both searches were running from its
   start to its end (or, when no probe was, at least one at its start; the report says so).

The policies (``ttalign serve`` flags): ``fcfs`` (first come, first served, no cap: as
before issue 19), ``cap`` (``--max-engine-calls-in-flight K``: a request's search keeps at
most K engine calls in flight), ``priority`` (``--scheduling-policy priority``: vLLM runs
plain requests' engine calls before searches'), ``priority+cap``, the fair gate (``gate``,
``gate-16``, ``gate-linger``: search calls held back while plain requests run) and
``preempt`` (the gate also aborts the search calls in the engine when a plain request
arrives, and runs them again after it). ``--probe-gap`` sets how busy the probes keep the
engine: 0.25 s keeps it busy almost all the time; 10 s is sparse plain traffic. Per
policy it reports the probe's median and p90 latency idle and loaded, the share of the
searches' time a probe was in the engine, and the two searches' wall times. The
goals: (a) probe p50 loaded / idle ≤ 2× (7.0× before the issue) and (b) RAIN's wall time at
most 20 % above its wall time under ``fcfs``.

    python -m ttalign.benchmarks.fair_sharing                       # 4 policies, K=4
    python -m ttalign.benchmarks.fair_sharing --policies fcfs priority+cap --idle-probes 4 \\
        --max-iterations 4 --max-tokens 8 --output-dir /tmp/fair   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from ttalign.benchmarks import rain_cost
from ttalign.benchmarks.processes import (
    free_port,
    running_server,
    ttalign_server_command,
    vllm_build,
)
from ttalign.benchmarks.search_efficiency import (
    add_rain_options,
    add_run_options,
    argument_parser,
    command_line,
    markdown_table,
    median,
    percentile,
    plain_body,
    rain_body,
    ratio,
    require_settings,
    run_footer,
    start_run,
    timed_chat,
    warm_up,
    with_sizes,
    write_results,
)
from ttalign.benchmarks.strategy_cost import MODEL_NAME, RESULTS_DIR

#: Policy name -> (``--scheduling-policy``, whether ``--max-engine-calls-in-flight`` is K).
#: Policy name: (scheduling policy, capped, the fair gate's sequences beside plain or None).
POLICIES: dict[str, tuple[str, bool, int | None]] = {
    "fcfs": ("fcfs", False, None),
    "cap": ("fcfs", True, None),
    "priority": ("priority", False, None),
    "priority+cap": ("priority", True, None),
    "gate": ("priority", False, 0),
    "gate-16": ("priority", False, 16),
    "gate-linger": ("priority", False, 0),
    "preempt": ("priority", False, 0),
    "preempt-young": ("priority", False, 0),
    "preempt-1s": ("priority", False, 0),
    "preempt-2s": ("priority", False, 0),
}
#: Policy name -> ``--plain-exclusive-seconds`` for the policies whose gate preempts search
#: calls (``--preempt-search-calls``); the other gates neither preempt nor keep searches
#: out (an exclusive spell of 0: one search call always runs), as before preemption.
#: Policy name -> ``--preempt-within-seconds`` (the others preempt every search call).
PREEMPT_WITHIN: dict[str, float] = {"preempt-young": 0.5, "preempt-1s": 1.0, "preempt-2s": 2.0}
PREEMPTING: dict[str, float] = {"preempt": 5.0, **dict.fromkeys(PREEMPT_WITHIN, 5.0)}
#: Policy name -> ``--plain-linger-seconds`` (the others leave the gate's default of 0):
#: longer than the probe's gap, so the probes keep the gate closed between them.
LINGER_SECONDS: dict[str, float] = {"gate-linger": 1.0}
#: The policy before issue 19, which RAIN's wall time is compared with.
BASELINE_POLICY = "fcfs"
PROBE_TOKENS = 16
PROBE_PROMPT = "Describe a quiet morning in a small town."
#: The searches' prompts (one each).
SEARCH_PROMPTS = rain_cost.PROMPTS[:2]
#: The goals: probe p50 loaded / idle, and RAIN's wall time over its wall time under fcfs.
GOAL_PROBE_RATIO = 2.0
GOAL_RAIN_GROWTH = 1.2
#: The probe's loaded / idle ratio before the issue.
BEFORE_PROBE_RATIO = 7.0


def probe_body(seed: int) -> dict[str, Any]:
    """The plain probe; the searches are :func:`~search_efficiency.rain_body`."""
    return plain_body(PROBE_PROMPT, PROBE_TOKENS, seed)


# --- measuring ------------------------------------------------------------------------------


async def search(
    http: httpx.AsyncClient, url: str, prompt: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One RAIN request: its wall time and what it did."""
    seconds, body = await timed_chat(http, url, rain_body(prompt, seed, args))
    alignment = body["alignment"]
    return {
        "seconds": seconds,
        "committed_tokens": body["usage"]["completion_tokens"],
        "engine_calls": alignment.get("engine_calls"),
        "engine_completion_tokens": (alignment.get("engine_tokens") or {}).get("completion_tokens"),
        "stopped_early": alignment.get("stopped_early"),
    }


async def one_round(
    http: httpx.AsyncClient, url: str, round_: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Idle probes, then two searches at once with probes beside them."""
    seed = args.seed + 1000 * round_
    idle = []
    for k in range(args.idle_probes):
        seconds, _ = await timed_chat(http, url, probe_body(seed + k))
        idle.append(seconds)
        await asyncio.sleep(args.probe_gap)
    searches = [
        asyncio.ensure_future(search(http, url, prompt, seed + i, args))
        for i, prompt in enumerate(SEARCH_PROMPTS)
    ]
    probes = []
    k = args.idle_probes
    try:
        while not all(task.done() for task in searches):
            running_at_start = sum(not task.done() for task in searches)
            seconds, _ = await timed_chat(http, url, probe_body(seed + k))
            k += 1
            running = {"running_at_start": running_at_start}
            running["running_at_end"] = sum(not task.done() for task in searches)
            probes.append({"seconds": seconds, **running})
            await asyncio.wait(searches, timeout=args.probe_gap)
        results = [task.result() for task in searches]
    finally:
        for task in searches:
            task.cancel()
        await asyncio.gather(*searches, return_exceptions=True)
    return {"idle_probes": idle, "loaded_probes": probes, "searches": results}


async def measure_policy(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=args.request_timeout) as http:
        small = with_sizes(args, max_tokens=3, max_iterations=2)
        await warm_up(http, url, [probe_body(0), rain_body(SEARCH_PROMPTS[0], 0, small)])
        rounds = []
        for round_ in range(args.rounds):
            rounds.append(await one_round(http, url, round_, args))
            summary = policy_figures(rounds[-1:])
            print(
                f"  round {round_}: probe p50 idle {summary['idle_p50'] or 0:.2f} s, loaded "
                f"{summary['loaded_p50'] or 0:.2f} s ({summary['loaded_probes']} probes); RAIN "
                + ", ".join(f"{s:.1f} s" for s in summary["rain_seconds"]),
                flush=True,
            )
        return rounds


# --- summary --------------------------------------------------------------------------------


def loaded_latencies(probes: Sequence[Mapping[str, Any]]) -> tuple[list[float], str]:
    """The loaded probes' latencies and which probes they are.

    Those during which both searches ran throughout; when there is none, those that
    started while at least one ran.
    """
    both = [p["seconds"] for p in probes if p["running_at_start"] == p["running_at_end"] == 2]
    if both:
        return both, "both searches running throughout"
    some = [p["seconds"] for p in probes if p["running_at_start"] >= 1]
    return some, "at least one search running at the start"


def policy_figures(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One policy's probe latencies (idle, loaded) and search wall times over its rounds."""
    idle = [s for r in rounds for s in r["idle_probes"]]
    loaded, selection = loaded_latencies([p for r in rounds for p in r["loaded_probes"]])
    rain = [s["seconds"] for r in rounds for s in r["searches"]]
    return {
        "idle_probes": len(idle),
        "idle_p50": median(idle),
        "idle_p90": percentile(idle, 90),
        "loaded_probes": len(loaded),
        "loaded_selection": selection,
        "loaded_p50": median(loaded),
        "loaded_p90": percentile(loaded, 90),
        "probe_ratio": ratio(median(loaded), median(idle)),
        "probe_share": probe_share(rounds),
        "rain_seconds": rain,
        "rain_mean_seconds": statistics.mean(rain) if rain else None,
        "rain_engine_calls": [s["engine_calls"] for r in rounds for s in r["searches"]],
        "rain_stopped_early": sum(bool(s["stopped_early"]) for r in rounds for s in r["searches"]),
    }


def probe_share(rounds: Sequence[Mapping[str, Any]]) -> float | None:
    """The fraction of the searches' time a probe was in the engine: every probe's latency
    while a search ran, over the longer search's wall time (summed over rounds)."""
    probing = sum(p["seconds"] for r in rounds for p in r["loaded_probes"])
    searching = sum(max((s["seconds"] for s in r["searches"]), default=0.0) for r in rounds)
    return ratio(probing, searching)


def verdicts(figures: Mapping[str, dict[str, Any]], baseline: str = BASELINE_POLICY) -> dict:
    """Each policy's RAIN growth over ``baseline`` and whether it meets both goals."""
    base = figures.get(baseline, {}).get("rain_mean_seconds")
    out: dict[str, Any] = {}
    for policy, f in figures.items():
        growth = ratio(f["rain_mean_seconds"], base)
        probe_ok = f["probe_ratio"] is not None and f["probe_ratio"] <= GOAL_PROBE_RATIO
        rain_ok = growth is not None and growth <= GOAL_RAIN_GROWTH
        out[policy] = {
            "rain_growth": growth,
            "probe_goal_met": probe_ok,
            "rain_goal_met": rain_ok,
            "meets_both": probe_ok and rain_ok,
        }
    return out


def best_policy(figures: Mapping[str, Mapping[str, Any]], verdict: Mapping[str, Any]) -> str | None:
    """The policy meeting both goals with the lowest probe ratio (``None`` if none does)."""
    meeting = [p for p, v in verdict.items() if v["meets_both"]]
    return min(meeting, key=lambda p: figures[p]["probe_ratio"], default=None)


#: The policy table's headings.
TABLE_HEADINGS = (
    "policy", "flags", "idle p50 s", "idle p90 s", "loaded p50 s", "loaded p90 s",
    "loaded probes", "p50 loaded / idle", "probe share", "RAIN s", "RAIN mean s",
    f"RAIN / {BASELINE_POLICY}", "meets both",
)  # fmt: skip


def policy_row(policy: str, r: Mapping[str, Any]) -> list[Any]:
    """A policy's cells, in the order of :data:`TABLE_HEADINGS`."""
    f, v = r["figures"][policy], r["verdicts"][policy]
    rain = ", ".join(f"{s:.1f}" for s in f["rain_seconds"])
    return [
        policy, r["flags"][policy], f["idle_p50"], f["idle_p90"], f["loaded_p50"],
        f["loaded_p90"], f["loaded_probes"], f["probe_ratio"], f.get("probe_share"), rain,
        f["rain_mean_seconds"], v["rain_growth"], v["meets_both"],
    ]  # fmt: skip


def to_markdown(r: dict[str, Any]) -> str:
    rows = [policy_row(policy, r) for policy in r["figures"]]
    selections = {f["loaded_selection"] for f in r["figures"].values()}
    best = r["best_policy"]
    lines = [
        "# Fair sharing: a plain probe's latency beside two RAIN searches, per policy",
        "",
        f"{r['model']} on {r['vllm']}; one ttalign server per policy, started in turn; "
        f"{r['rounds']} round(s) each. Probe: strategy none, ignore_eos, max_tokens "
        f"{PROBE_TOKENS}, one at a time with {r['probe_gap']} s between probes; "
        f"{r['idle_probes']} idle probes per round, then probes for as long as two RAIN "
        f"searches (max_tokens {r['max_tokens']}, max_iterations "
        f"{r['max_iterations'] or 'its default'}, self-evaluation) run at once. Loaded probes: "
        f"{'; '.join(sorted(selections))}. Cap K={r['cap']}.",
        "",
        *markdown_table(list(TABLE_HEADINGS), rows),
        "",
        f"Goals: (a) probe p50 loaded / idle ≤ {GOAL_PROBE_RATIO:g}× (was "
        f"{BEFORE_PROBE_RATIO:g}×); (b) RAIN's mean wall time ≤ {GOAL_RAIN_GROWTH:g}× its "
        f"wall time under `{BASELINE_POLICY}` (+{100 * (GOAL_RAIN_GROWTH - 1):.0f} %).",
        "",
        (
            f"**Policy meeting both: `{best}`** ({r['flags'][best]})."
            if best is not None
            else "**No policy meets both goals.**"
        ),
        "",
        *run_footer(r),
    ]
    return "\n".join(lines)


# --- driver ---------------------------------------------------------------------------------


def policy_flags(policy: str, cap: int) -> list[str]:
    scheduling, capped, beside_plain = POLICIES[policy]
    gate = (
        ["--no-fair-gate"]
        if beside_plain is None
        else ["--fair-gate", "--search-sequences-beside-plain", str(beside_plain)]
    )
    if policy in LINGER_SECONDS:
        gate += ["--plain-linger-seconds", str(LINGER_SECONDS[policy])]
    if beside_plain is not None:
        exclusive = PREEMPTING.get(policy, 0.0)
        preempt = "--preempt-search-calls" if policy in PREEMPTING else "--no-preempt-search-calls"
        gate += [preempt, "--plain-exclusive-seconds", f"{exclusive:g}"]
        if policy in PREEMPT_WITHIN:
            gate += ["--preempt-within-seconds", f"{PREEMPT_WITHIN[policy]:g}"]
    return [
        "--scheduling-policy", scheduling,
        "--max-engine-calls-in-flight", str(cap if capped else 0), *gate,
    ]  # fmt: skip


def server_command(model: str, port: int, policy: str, cap: int) -> list[str]:
    extra = [*policy_flags(policy, cap), *rain_cost.budget_flags()]
    return ttalign_server_command(model, port, name=MODEL_NAME, extra_args=extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser("fair_sharing", __doc__)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--cap", type=int, default=4, help="K of the capped policies")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle-probes", type=int, default=10, help="idle probes per round")
    parser.add_argument("--probe-gap", type=float, default=0.25, help="seconds between probes")
    add_rain_options(parser, own_iterations="its own")
    add_run_options(
        parser, name="fair_sharing", output_dir=RESULTS_DIR / "fair_sharing", request_timeout=1800
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    policies = [p for p in POLICIES if p in args.policies]
    require_settings("scheduling_policy", "max_engine_calls_in_flight")
    started = time.perf_counter()
    model, logs = start_run("ttalign-fair-sharing-")
    raw: dict[str, list[dict[str, Any]]] = {}
    for policy in policies:
        print(f"policy {policy}:", flush=True)
        port = free_port()
        command = server_command(model, port, policy, args.cap)
        with running_server(command, port, logs / f"{policy}.log") as url:
            raw[policy] = asyncio.run(measure_policy(url, args))
    figures = {policy: policy_figures(rounds) for policy, rounds in raw.items()}
    verdict = verdicts(figures)
    result = {
        "model": MODEL_NAME,
        "vllm": vllm_build(),
        "cap": args.cap,
        "rounds": args.rounds,
        "idle_probes": args.idle_probes,
        "probe_gap": args.probe_gap,
        "max_tokens": args.max_tokens,
        "max_iterations": args.max_iterations,
        "seed": args.seed,
        "flags": {policy: " ".join(policy_flags(policy, args.cap)) for policy in policies},
        "figures": figures,
        "verdicts": verdict,
        "best_policy": best_policy(figures, verdict),
        "rounds_raw": raw,
        "command": command_line("fair_sharing", argv),
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(args.output_dir / args.name, result, to_markdown(result))


if __name__ == "__main__":
    main()
