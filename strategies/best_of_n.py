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
from ttalign.reward_clients.registry import RewardName
from ttalign.strategies.base import (
    AlignmentRequest,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
)
from ttalign.strategies.errors import DeadlineReached, InvalidStrategyRequest
from ttalign.strategies.registry import register_strategy
from ttalign.strategies.selection import (
    ScoredCandidate,
    check_candidate_cap,
    score_completions,
    top_distinct,
    unscored,
)


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


@register_strategy
class BestOfN(Strategy[BestOfNConfig]):
    name = "best_of_n"
    completes_raw_prompts = True
    description = (
        "Sample N candidates in one engine call, score them with a reward client in one "
        "batch, and return the best (the top-n distinct ones for n > 1)."
    )
    config_model = BestOfNConfig
    uses_reward = True

    def check(self, request: AlignmentRequest, config: BestOfNConfig) -> None:
        check_candidate_cap(config.n, request, "strategy_config.n")
        if request.n > config.n:
            raise InvalidStrategyRequest(
                f"n is {request.n}, but best_of_n samples only {config.n} candidates "
                "(raise strategy_config.n).",
                param="n",
            )
        request.budget.check(
            config.n, config.n * request.sampling.max_tokens, param="strategy_config.n"
        )

    async def run(self, ctx: StrategyContext, config: BestOfNConfig) -> StrategyResult:
        request = ctx.request
        reward = ctx.rewards.get(config.reward or request.reward)
        sampling = replace(
            request.sampling,
            n=config.n,
            temperature=config.temperature,
            top_p=config.top_p if config.top_p is not None else request.sampling.top_p,
        )
        generation = await ctx.generate(await ctx.request_prompt(), sampling)
        ctx.report(stage="scoring", candidates=len(generation.completions))
        try:
            scored = await score_completions(ctx, reward, request.messages, generation.completions)
        except DeadlineReached:
            # Out of time before any ranking: the first distinct candidates, unscored.
            chosen = unscored(generation.completions, request.n)
            return StrategyResult(
                choices=[candidate.choice() for candidate in chosen],
                stopped_early=True,
                trace=_trace(reward.name, chosen, chosen, request.return_trace),
                prompt_tokens=generation.prompt_tokens,
            )
        chosen = top_distinct(scored, request.n)
        return StrategyResult(
            choices=[candidate.choice() for candidate in chosen],
            candidates_scored=len(scored),
            trace=_trace(reward.name, scored, chosen, request.return_trace),
            prompt_tokens=generation.prompt_tokens,
        )


def _trace(
    reward_name: str,
    scored: list[ScoredCandidate],
    chosen: list[ScoredCandidate],
    with_candidates: bool,
) -> dict[str, Any]:
    positions = [next(i for i, c in enumerate(scored) if c is pick) for pick in chosen]
    trace: dict[str, Any] = {
        "reward": reward_name,
        "rewards": [c.reward for c in scored],
        "chosen": positions,
    }
    if with_candidates:
        trace["candidates"] = [
            {
                "text": c.text,
                "reward": c.reward,
                "finish_reason": c.finish_reason,
                "tokens": c.num_tokens,
            }
            for c in scored
        ]
    return trace
