"""``best_of_n``: sample N candidates in one engine call, score them in one reward call, keep
the best.

With request ``n > 1`` the top-n *distinct* candidates are returned, best first (duplicates
fill in only when fewer than n candidates differ). Every candidate's reward is reported in
``alignment.trace.rewards``; with ``return_trace`` the candidates themselves come too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import Field

from reward_clients.base import RewardClientError
from server.engine.base import Completion
from server.errors import InvalidRequestError
from server.protocol import RewardName
from strategies.base import (
    ChoiceResult,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
)
from strategies.registry import register_strategy


class BestOfNConfig(StrategyConfig):
    """Settings of ``best_of_n``."""

    n: int = Field(4, ge=1, description="Candidates sampled (N); capped by the server.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(
        None, gt=0, le=1, description="Nucleus sampling; unset: the request's top_p."
    )
    reward: RewardName = Field(
        None, description="Configured reward client; unset: the request's, else the default."
    )


def rank_distinct(scores: list[float], texts: list[str], k: int) -> list[int]:
    """Indices of the ``k`` best candidates, distinct texts first; ties keep sample order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    seen: set[str] = set()
    distinct = [i for i in order if not (texts[i] in seen or seen.add(texts[i]))]
    fill = [i for i in order if i not in distinct]
    return (distinct + fill)[:k]


@register_strategy
class BestOfN(Strategy[BestOfNConfig]):
    name = "best_of_n"
    description = (
        "Sample N candidates in one engine call, score them with a reward client in one "
        "batch, and return the best (the top-n distinct ones for n > 1)."
    )
    config_model = BestOfNConfig
    uses_reward = True

    async def run(self, ctx: StrategyContext, config: BestOfNConfig) -> StrategyResult:
        request = ctx.request
        if config.n > request.max_candidates:
            raise InvalidRequestError(
                f"strategy_config.n is {config.n}, but this server samples at most "
                f"{request.max_candidates} candidates.",
                param="strategy_config.n",
                code="invalid_value",
            )
        if request.n > config.n:
            raise InvalidRequestError(
                f"n is {request.n}, but best_of_n samples only {config.n} candidates "
                "(raise strategy_config.n).",
                param="n",
                code="invalid_value",
            )
        reward = ctx.rewards.get(config.reward or request.reward)
        sampling = replace(
            request.sampling,
            n=config.n,
            temperature=config.temperature,
            top_p=config.top_p if config.top_p is not None else request.sampling.top_p,
        )
        generation = await ctx.sample(request.messages, sampling)
        candidates = list(generation.completions)
        ctx.report(stage="scoring", candidates=len(candidates))
        texts = [c.text for c in candidates]
        scores = list(await reward.score(request.messages, texts))
        if len(scores) != len(texts):
            raise RewardClientError(
                reward.name, f"returned {len(scores)} scores for {len(texts)} candidates"
            )
        chosen = rank_distinct(scores, texts, request.n)
        return StrategyResult(
            choices=[_choice(candidates[i], scores[i]) for i in chosen],
            candidates_scored=len(texts),
            trace=_trace(reward.name, candidates, scores, chosen, request.return_trace),
            prompt_tokens=generation.prompt_tokens,
        )


def _choice(completion: Completion, reward: float) -> ChoiceResult:
    return ChoiceResult(
        completion.text,
        completion.finish_reason,
        completion.num_tokens,
        reward=reward,
        logprobs=completion.logprobs,
    )


def _trace(
    reward_name: str,
    candidates: list[Completion],
    scores: list[float],
    chosen: list[int],
    with_candidates: bool,
) -> dict[str, Any]:
    trace: dict[str, Any] = {"reward": reward_name, "rewards": scores, "chosen": chosen}
    if with_candidates:
        trace["candidates"] = [
            {"text": c.text, "reward": s, "finish_reason": c.finish_reason, "tokens": c.num_tokens}
            for c, s in zip(candidates, scores, strict=True)
        ]
    return trace
