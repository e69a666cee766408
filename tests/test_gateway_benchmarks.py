"""The gateway benchmarks' pure parts: commands, metric parsing, ratios and reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from ttalign.benchmarks import gateway_affinity as affinity
from ttalign.benchmarks import gateway_overhead as overhead
from ttalign.benchmarks import smoke_option
from ttalign.benchmarks.processes import gateway_server_command
from ttalign.engine.replicas import ReplicaPool
from ttalign.server.cli import build_parser, settings_from_args
from ttalign.server.metrics import ReplicaCollector

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def side(throughput: float, ttft: float, tpot: float = 20.0) -> dict[str, float]:
    return {
        "output_throughput": throughput,
        "median_ttft_ms": ttft,
        "mean_ttft_ms": ttft + 5,
        "p99_ttft_ms": ttft * 2,
        "median_tpot_ms": tpot,
        "mean_tpot_ms": tpot + 1,
        "p99_tpot_ms": tpot * 2,
        "median_e2el_ms": 900.0,
        "completed": 64,
        "total_output_tokens": 4096,
    }


# --- shared: the gateway command ----------------------------------------------------------


def test_the_gateway_command_is_a_valid_remote_ttalign_serve() -> None:
    command = gateway_server_command("/models/x", 8123, URLS, name="smollm2", routing="round_robin")
    assert command[1:4] == ["-m", "ttalign.server.cli", "serve"]
    settings = settings_from_args(build_parser().parse_args(command[3:]))
    assert settings.engine == "remote"
    assert settings.engine_url_list() == URLS
    assert settings.engine_routing == "round_robin"
    assert (settings.model, settings.served_model_name) == ("/models/x", "smollm2")
    assert (settings.host, settings.port, settings.warmup) == ("127.0.0.1", 8123, False)
    assert settings.max_concurrent_requests == 1024


# --- gateway_overhead ---------------------------------------------------------------------


def test_summarize_keeps_the_reported_keys_and_marks_missing_ones() -> None:
    raw = {**side(50.0, 100.0), "unrelated": 1}
    del raw["p99_tpot_ms"]
    summary = overhead.summarize(raw)
    assert set(summary) == set(overhead.KEYS)
    assert summary["p99_tpot_ms"] is None
    assert summary["output_throughput"] == 50.0


def test_compare_is_gateway_over_direct_and_gateway_minus_direct() -> None:
    figures = overhead.compare(side(50.0, 100.0, tpot=20.0), side(48.0, 112.5, tpot=21.0))
    assert figures["throughput_ratio"] == pytest.approx(0.96)
    assert figures["median_ttft_overhead_ms"] == pytest.approx(12.5)
    assert figures["mean_ttft_overhead_ms"] == pytest.approx(12.5)
    assert figures["median_tpot_overhead_ms"] == pytest.approx(1.0)


def test_gateway_measured_overhead_is_the_mean_between_scrapes() -> None:
    def scrape(total: float, count: float) -> str:
        name = overhead.GATEWAY_OVERHEAD_METRIC
        return (
            f'{name}_sum{{strategy="none"}} {total}\n{name}_count{{strategy="none"}} {count}\n'
            f'{name}_sum{{strategy="tpo"}} 9.0\n{name}_count{{strategy="tpo"}} 3.0\n'
        )

    assert overhead.gateway_overhead_ms(scrape(0.5, 10), scrape(0.7, 110)) == pytest.approx(2.0)
    assert overhead.gateway_overhead_ms(scrape(0.5, 10), scrape(0.5, 10)) is None


def rounds_of(pairs: list[tuple[float, float]]) -> list[dict]:
    rounds = []
    for ratio, ttft_overhead in pairs:
        direct, gateway = side(100.0, 200.0), side(100.0 * ratio, 200.0 + ttft_overhead)
        rounds.append(
            {
                "order": ["direct", "gateway"],
                "direct": direct,
                "gateway": gateway,
                "gateway_measured_overhead_ms": 1.25,
                **overhead.compare(direct, gateway),
            }
        )
    return rounds


def test_the_overhead_report_takes_medians_and_checks_both_goals() -> None:
    rounds = rounds_of([(0.90, 30.0), (0.97, 10.0), (0.99, 5.0)])
    report = overhead.report_of(rounds, {"rounds": 3}, "python -m x --rounds 3")
    assert report["median_throughput_ratio"] == pytest.approx(0.97)
    assert report["median_ttft_overhead_ms"] == pytest.approx(10.0)
    assert report["goals"]["throughput_met"] and report["goals"]["ttft_met"]

    worse = overhead.report_of(rounds_of([(0.9, 20.0)]), {}, "c")
    assert not worse["goals"]["throughput_met"] and not worse["goals"]["ttft_met"]


def test_the_overhead_markdown_has_every_round_the_goals_and_the_command() -> None:
    report = overhead.report_of(rounds_of([(0.96, 3.0), (1.01, -2.0)]), {"rounds": 2}, "CMD")
    text = overhead.markdown(report)
    assert "Command: `CMD`" in text
    assert "| 0 | 100.0 | 96.0 | 0.960 | 200.0 | 203.0 | +3.0 | 1.2 |" in text
    assert "| 1 | gateway | 203.0 | 396.0 | 20.0 | 21.0 | 40.0 |" in text
    assert "(gateway / direct): 0.985** (goal ≥ 0.95: met)" in text
    assert "Median TTFT overhead: +0.5 ms** (goal ≤ 15 ms: met)" in text


def test_overhead_smoke_shrinks_the_run_and_keeps_results_out_of_the_repo() -> None:
    args = overhead.parse_args(["--smoke", "--rounds", "5"])
    assert args.rounds == overhead.SMOKE["rounds"]
    assert args.num_prompts == overhead.SMOKE["num_prompts"]
    assert args.out != smoke_option.RESULTS_DIR and args.out.is_dir()
    args.out.rmdir()
    assert overhead.parse_args([]).out == smoke_option.RESULTS_DIR
    assert overhead.parse_args(["--smoke", "--out", "x"]).out == Path("x")


# --- gateway_affinity ---------------------------------------------------------------------


def test_prefix_counters_sum_vllms_label_sets() -> None:
    text = (
        "# TYPE vllm:prefix_cache_queries_total counter\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1024.0\n'
        'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 256.0\n'
        'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 384.0\n'
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 99.0\n'
    )
    assert affinity.prefix_counters(text) == {"queries": 1280.0, "hits": 384.0}


def test_gateway_calls_reads_the_gateways_own_replica_counter() -> None:
    engines = ReplicaPool("engine", URLS)
    rewards = ReplicaPool("reward:rm", ["http://127.0.0.1:9100"])
    engines.replicas[0].requests, engines.replicas[1].requests = 7, 3
    rewards.replicas[0].requests = 11
    registry = CollectorRegistry()
    registry.register(ReplicaCollector(lambda: [engines, rewards]))
    text = generate_latest(registry).decode()
    assert affinity.gateway_calls(text) == {URLS[0]: 7.0, URLS[1]: 3.0}
    assert affinity.gateway_calls("") == {}


def test_delta_and_hit_rate() -> None:
    assert affinity.delta({"a": 1.0, "b": 2.0}, {"a": 4.0, "b": 2.0, "c": 5.0}) == {
        "a": 3.0,
        "b": 0.0,
        "c": 5.0,
    }
    assert affinity.hit_rate(30.0, 120.0) == pytest.approx(0.25)
    assert affinity.hit_rate(0.0, 0.0) is None


def test_arm_figures_pools_both_replicas_and_keeps_each() -> None:
    figures = affinity.arm_figures(
        URLS,
        [{"queries": 100.0, "hits": 10.0}, {"queries": 50.0, "hits": 0.0}],
        [{"queries": 500.0, "hits": 310.0}, {"queries": 450.0, "hits": 100.0}],
        {URLS[0]: 5.0},
        {URLS[0]: 19.0, URLS[1]: 14.0},
    )
    assert (figures["queries"], figures["hits"]) == (800.0, 400.0)
    assert figures["hit_rate"] == pytest.approx(0.5)
    assert figures["gateway_calls"] == 28.0
    first, second = figures["replicas"]
    assert (first["url"], first["hit_rate"], first["gateway_calls"]) == (URLS[0], 0.75, 14.0)
    assert (second["hit_rate"], second["gateway_calls"]) == (0.25, 14.0)


def arm(wall: float, hits: float, queries: float) -> dict:
    replica = {
        "url": URLS[0],
        "queries": queries,
        "hits": hits,
        "hit_rate": affinity.hit_rate(hits, queries),
        "gateway_calls": 7.0,
    }
    idle = {**replica, "url": URLS[1], "queries": 0.0, "hits": 0.0, "hit_rate": None}
    return {
        "wall_seconds": wall,
        "engine_calls": 7,
        "queries": queries,
        "hits": hits,
        "hit_rate": affinity.hit_rate(hits, queries),
        "gateway_calls": 14.0,
        "replicas": [replica, idle],
    }


def affinity_rounds() -> list[dict]:
    first = {"consistent_hash": arm(80.0, 60, 100), "round_robin": arm(100.0, 20, 100)}
    second = {"consistent_hash": arm(90.0, 50, 100), "round_robin": arm(90.0, 30, 100)}
    return [
        {"order": list(affinity.ARMS), **first},
        {"order": list(reversed(affinity.ARMS)), **second},
    ]


def test_the_affinity_summary_compares_medians_and_wall_ratios() -> None:
    summary = affinity.summary(affinity_rounds())
    assert summary["arms"]["consistent_hash"]["median_hit_rate"] == pytest.approx(0.55)
    assert summary["arms"]["round_robin"]["median_hit_rate"] == pytest.approx(0.25)
    assert summary["hit_rate_gain"] == pytest.approx(0.30)
    assert summary["median_wall_ratio"] == pytest.approx((0.8 + 1.0) / 2)
    assert summary["arms"]["round_robin"]["median_wall_seconds"] == pytest.approx(95.0)


def test_the_affinity_markdown_lists_every_arm_and_the_summary() -> None:
    rounds = affinity_rounds()
    settings = {"prompts": 8, "concurrency": 4, "depth": 2, "width": 4, "max_tokens": 48}
    report = {
        "command": "CMD",
        "settings": settings,
        "engine": {},
        "replica_urls": URLS,
        "rounds": rounds,
        "summary": affinity.summary(rounds),
    }
    text = affinity.markdown(report)
    assert "Command: `CMD`" in text
    assert "| 0 | consistent_hash | 80.0 | 60.0% | 60 / 100 | 7 / 7 | 60.0% / – |" in text
    assert "| 1 | round_robin | 90.0 | 30.0% |" in text
    assert text.index("| 1 | round_robin") < text.index("| 1 | consistent_hash")
    assert "consistent_hash 55.0%, round_robin 25.0% (+30.0 points)" in text
    assert "(consistent_hash / round_robin): 0.900**" in text


def test_tpo_bodies_are_distinct_seeded_and_sized() -> None:
    args = affinity.parse_args(["--prompts", "3", "--depth", "1", "--width", "3"])
    bodies = [affinity.tpo_body(i, args) for i in range(args.prompts)]
    assert len({b["messages"][0]["content"] for b in bodies}) == 3
    assert [b["seed"] for b in bodies] == [0, 1, 2]
    config = bodies[0]["strategy_config"]
    assert (config["depth"], config["width"]) == (1, 3)
    assert set(config["max_tokens"].values()) == {48}
    assert bodies[0]["strategy"] == "tpo" and bodies[0]["reward"] == "rules"
    assert bodies[0]["ignore_eos"] is True


def test_affinity_arguments_bound_the_prompts_and_smoke_stays_out_of_the_repo() -> None:
    with pytest.raises(SystemExit):
        affinity.parse_args(["--prompts", str(len(affinity.TOPICS) + 1)])
    args = affinity.parse_args(["--smoke"])
    assert (args.prompts, args.depth) == (affinity.SMOKE["prompts"], affinity.SMOKE["depth"])
    assert args.out != smoke_option.RESULTS_DIR and args.out.is_dir()
    args.out.rmdir()
    assert affinity.parse_args([]).out == smoke_option.RESULTS_DIR
