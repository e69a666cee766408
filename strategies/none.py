"""``none``: the baseline. The request goes straight to the engine, tokens stream as made."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from ttalign.engine.base import SamplingSettings
from ttalign.strategies.base import (
    AlignmentRequest,
    ChoiceResult,
    DeltaEvent,
    ResultEvent,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
    StreamEvent,
)
from ttalign.strategies.registry import register_strategy
from ttalign.strategies.sampling import PartialCompletion


class NoneConfig(StrategyConfig):
    """The baseline takes no settings."""


@register_strategy
class PassThrough(Strategy[NoneConfig]):
    name = "none"
    description = "No alignment: one engine call with the request's own sampling settings."
    config_model = NoneConfig
    streams_tokens = True
    completes_raw_prompts = True
    searches = False

    def check(self, request: AlignmentRequest, config: NoneConfig) -> None:
        request.budget.check(request.n, request.n * request.sampling.max_tokens, param="n")

    def _sampling(self, ctx: StrategyContext) -> SamplingSettings:
        return replace(ctx.request.sampling, n=ctx.request.n)

    async def run(self, ctx: StrategyContext, config: NoneConfig) -> StrategyResult:
        generation = await ctx.generate(await ctx.request_prompt(), self._sampling(ctx))
        return StrategyResult(
            choices=[
                ChoiceResult(c.text, c.finish_reason, c.num_tokens, logprobs=c.logprobs)
                for c in generation.completions
            ],
            prompt_tokens=generation.prompt_tokens,
        )

    async def stream(self, ctx: StrategyContext, config: NoneConfig) -> AsyncIterator[StreamEvent]:
        prompt = await ctx.request_prompt()
        collected: dict[int, PartialCompletion] = {}
        prompt_tokens = 0
        async for delta in ctx.stream(prompt, self._sampling(ctx)):
            prompt_tokens = delta.prompt_tokens or prompt_tokens
            collected.setdefault(delta.index, PartialCompletion()).add(delta)
            yield DeltaEvent(delta)
        choices = [_choice(collected[i]) for i in sorted(collected)]
        result = StrategyResult(
            choices=choices,
            prompt_tokens=prompt_tokens or len(prompt),
        )
        yield ResultEvent(result, streamed=True)


def _choice(partial: PartialCompletion) -> ChoiceResult:
    return ChoiceResult(partial.text, partial.finish_reason or "stop", partial.num_tokens)
