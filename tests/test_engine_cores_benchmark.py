"""The shared-versus-split cores benchmark's arithmetic and report (no engine)."""

from __future__ import annotations

import argparse

from ttalign.benchmarks import engine_cores


def evaluation(wall: float, tokens: float) -> dict:
    cost = {
        "n_prompts": 4,
        "n_errors": 1,
        "run_wall_seconds": wall,
        "mean_engine_completion_tokens": tokens,
        "mean_reward_seconds": 5.0,
    }
    return {"runs": [{"cost": cost, "metrics": {"prompt_strict": 0.25}, "outputs": []}]}


def test_figures_and_report_give_the_split_against_the_shared_setting() -> None:
    shared = engine_cores.figures(evaluation(wall=120.0, tokens=900.0))
    split = engine_cores.figures(evaluation(wall=60.0, tokens=900.0))
    assert shared["prompts_per_minute"] == 2.0 and split["prompts_per_minute"] == 4.0
    assert split["generated_tokens_per_second"] == 60.0 and split["failed"] == 1
    result = {
        "model": "m", "judge_model": "j", "vllm": "v", "cores": "0,1", "prompts": 4,
        "split": "tune", "n": 8, "max_tokens": 128, "concurrency": 8, "seed": 0,
        "binding": {"shared": "vLLM's, both alike", "split": "0 / 1"},
        "figures": {"shared": shared, "split": split},
        "speedup": split["prompts_per_minute"] / shared["prompts_per_minute"],
        "command": "python -m ttalign.benchmarks.engine_cores", "wall_seconds": 300.0,
    }  # fmt: skip
    report = engine_cores.to_markdown(result)
    assert "| split | 0 / 1 | 60.0 | 4.00 | 60.0 | 5.0 | 1 |" in report
    assert "split / shared: **2.00×**" in report


def test_each_setting_is_served_and_evaluated_alike() -> None:
    assert engine_cores.server_flags("j", "1GiB", "split")[-2:] == ["--engine-cores", "split"]
    args = argparse.Namespace(n=8, split="tune", prompts=16, max_tokens=128, seed=0, concurrency=8)
    command = engine_cores.evaluation_command("http://x", args, engine_cores.RESULTS_DIR, "a")
    assert command[command.index("--reward") + 1] == "judge-strong"
    assert 'bon8=best_of_n:{"n":8}' in command


def test_the_spin_benchmark_reports_sleeping_against_vllms_spin() -> None:
    from ttalign.benchmarks import engine_spin

    spin = engine_cores.figures(evaluation(wall=90.0, tokens=900.0))
    sleep = engine_cores.figures(evaluation(wall=60.0, tokens=900.0))
    result = {
        "model": "m", "judge_model": "j", "vllm": "v", "cores": "0,1", "prompts": 4,
        "split": "tune", "n": 8, "max_tokens": 128, "concurrency": 8, "seed": 0,
        "figures": {"spin": spin, "sleep": sleep},
        "speedup": sleep["prompts_per_minute"] / spin["prompts_per_minute"],
        "command": "python -m ttalign.benchmarks.engine_spin", "wall_seconds": 300.0,
    }  # fmt: skip
    report = engine_spin.to_markdown(result)
    assert "| spin | 1 | 90.0 | 2.67 | 40.0 | 5.0 | 1 |" in report
    assert "| sleep | 0 | 60.0 | 4.00 | 60.0 | 5.0 | 1 |" in report
    assert "sleep / spin: **1.50×**" in report
    assert engine_spin.parse_args(["--prompts", "2"]).prompts == 2
