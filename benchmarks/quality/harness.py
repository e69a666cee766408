"""Run one :class:`~benchmarks.quality.runs.RunSpec` over a suite's items and measure it.

A run has three phases, so that scoring never competes with generation for the engine
(that would distort the wall times being measured):

1. generate: every item through ``/v1/chat/completions``, ``concurrency`` at a time;
2. check: the suite's own scoring of each output (pure, in-process);
3. reward: optionally, each output's score under a server reward client
   (``/v1/rewards/score``), reported as ``mean_reward``.

Every metric comes with a 95 % confidence interval over the prompts (the suite's own, see
:mod:`.intervals`; rewards by a bootstrap of their mean).

A request that fails is recorded with its error and left out of the quality metrics;
``n_errors`` in the cost block says how many there were (``n_reward_errors`` likewise for
reward scoring, whose failures are left out of ``mean_reward``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
from tqdm import tqdm
from ttalign.benchmarks.quality.client import TtalignClient
from ttalign.benchmarks.quality.intervals import Interval, bootstrap_mean
from ttalign.benchmarks.quality.runs import RunSpec
from ttalign.benchmarks.quality.suites import Item, Suite, mean

T = TypeVar("T")


@dataclass(frozen=True)
class EvalSettings:
    """What every run of one invocation shares."""

    max_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    concurrency: int = 4
    #: Reward for runs whose strategy uses one and whose spec names none.
    reward: str | None = None
    #: Reward client whose scores of the outputs become ``mean_reward``.
    score_reward: str | None = None
    #: Take ``mean_reward`` even without ``score_reward`` (with the server's default reward).
    always_score: bool = False
    progress: bool = True

    def sampling(self) -> dict[str, Any]:
        """The OpenAI sampling arguments of each request."""
        values = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class RunResult:
    """One run's outputs, metrics and cost, as they go into the JSON result."""

    spec: RunSpec
    fields: dict[str, Any]
    records: list[dict[str, Any]]
    metrics: dict[str, float | None]
    cost: dict[str, float | int | None]
    #: 95 % confidence intervals of ``metrics``, by key, as [low, high].
    intervals: dict[str, Interval | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.spec.label,
            "strategy": self.spec.strategy,
            "strategy_config": self.spec.config,
            "reward": self.fields.get("reward"),
            "request": self.fields,
            "metrics": self.metrics,
            "intervals": {k: list(v) if v else None for k, v in self.intervals.items()},
            "cost": self.cost,
            "outputs": self.records,
        }


async def evaluate_run(
    client: TtalignClient,
    model: str,
    suite: Suite,
    items: list[Item],
    spec: RunSpec,
    settings: EvalSettings,
    *,
    uses_reward: bool,
) -> RunResult:
    """Generate, check and (optionally) reward-score ``items`` under ``spec``."""
    fields = spec.request_fields(settings.reward, uses_reward)
    sampling = settings.sampling()

    async def generate(item: Item) -> dict[str, Any]:
        body = dict(fields)
        constraints = suite.constraints(item)
        if constraints:
            body["constraints"] = constraints
        record: dict[str, Any] = {"id": item.id, "prompt": item.prompt}
        try:
            answer = await client.chat(model, item.prompt, sampling, body)
        except openai.APIError as exc:
            return record | {"output": None, "error": f"{type(exc).__name__}: {exc}"}
        alignment = {k: v for k, v in answer.alignment.items() if k != "trace"}
        return record | {
            "output": answer.text,
            "finish_reason": answer.finish_reason,
            "wall_seconds": round(answer.wall_seconds, 4),
            "alignment": alignment,
            "error": None,
        }

    started = time.perf_counter()
    records = await _gather(
        [generate(item) for item in items],
        settings.concurrency,
        f"{spec.label}: generate",
        settings.progress,
    )
    run_wall = time.perf_counter() - started

    answered = [(item, r) for item, r in zip(items, records, strict=True) if r["error"] is None]
    for item, record in answered:
        record["scores"] = suite.score(item, record["output"])
    scored = settings.score_reward is not None or settings.always_score
    if scored:

        async def reward(item: Item, record: dict[str, Any]) -> None:
            try:
                scores = await client.score(
                    settings.score_reward, item.prompt, [record["output"]], suite.constraints(item)
                )
            except openai.APIError as exc:
                record["reward"] = None
                record["reward_error"] = f"{type(exc).__name__}: {exc}"
            else:
                record["reward"] = scores[0]

        await _gather(
            [reward(item, record) for item, record in answered],
            settings.concurrency,
            f"{spec.label}: score",
            settings.progress,
        )
    metrics, intervals = run_metrics(suite, records, scored=scored)
    return RunResult(spec, fields, records, metrics, run_cost(records, run_wall), intervals)


def run_metrics(
    suite: Suite, records: list[dict[str, Any]], *, scored: bool
) -> tuple[dict[str, float | None], dict[str, Interval | None]]:
    """A run's metrics and their intervals, from its checked (and maybe reward-scored)
    records; failed requests count for nothing."""
    answered = [r for r in records if r["error"] is None]
    metrics = suite.aggregate([r["scores"] for r in answered])
    intervals = suite.intervals([r["scores"] for r in answered])
    if scored:
        rewards = [r["reward"] for r in answered if r.get("reward") is not None]
        metrics["mean_reward"] = mean(rewards)
        intervals["mean_reward"] = bootstrap_mean(rewards)
    strategy_rewards = [rw for r in answered if (rw := _first_reward(r["alignment"])) is not None]
    metrics["strategy_reward"] = mean(strategy_rewards)
    intervals["strategy_reward"] = bootstrap_mean(strategy_rewards)
    return metrics, intervals


def _first_reward(alignment: dict[str, Any]) -> float | None:
    rewards = alignment.get("rewards") or [None]
    return rewards[0]


def run_cost(records: list[dict[str, Any]], run_wall: float) -> dict[str, float | int | None]:
    """Alignment cost per prompt: means over answered prompts of what the server reported."""
    answered = [r for r in records if r["error"] is None]

    def per_prompt(key: str) -> float | None:
        return mean([float(r["alignment"][key]) for r in answered if key in r["alignment"]])

    def engine_tokens(kind: str) -> float | None:
        counts = [r["alignment"].get("engine_tokens", {}).get(kind) for r in answered]
        return mean([float(t) for t in counts if t is not None])

    return {
        "n_prompts": len(records),
        "n_errors": len(records) - len(answered),
        "run_wall_seconds": round(run_wall, 3),
        "mean_wall_seconds": mean([r["wall_seconds"] for r in answered]),
        "mean_elapsed_seconds": per_prompt("elapsed_seconds"),
        "mean_engine_calls": per_prompt("engine_calls"),
        "mean_candidates_generated": per_prompt("candidates_generated"),
        "mean_candidates_scored": per_prompt("candidates_scored"),
        "mean_reward_calls": per_prompt("reward_calls"),
        "mean_reward_seconds": per_prompt("reward_seconds"),
        "mean_engine_completion_tokens": engine_tokens("completion_tokens"),
        "mean_engine_prompt_tokens": engine_tokens("prompt_tokens"),
        "mean_engine_total_tokens": engine_tokens("total_tokens"),
        "stopped_early": sum(bool(r["alignment"].get("stopped_early")) for r in answered),
        "n_reward_errors": sum(r.get("reward_error") is not None for r in answered),
    }


async def _gather(
    jobs: list[Coroutine[Any, Any, T]], concurrency: int, desc: str, progress: bool
) -> list[T]:
    """Await ``jobs`` at most ``concurrency`` at a time; results in order; a progress bar."""
    gate = asyncio.Semaphore(concurrency)
    with tqdm(total=len(jobs), desc=desc, unit="prompt", disable=not progress) as bar:

        async def one(job: Coroutine[Any, Any, T]) -> T:
            async with gate:
                result = await job
            bar.update()
            return result

        return await asyncio.gather(*(one(job) for job in jobs))
