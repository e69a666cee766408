"""``none``: the baseline. The request goes straight to the engine, tokens stream as made."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from server.engine.base import CompletionDelta, FinishReason, SamplingSettings
from strategies.base import (
    ChoiceResult,
    DeltaEvent,
    ResultEvent,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
    StreamEvent,
)
from strategies.registry import register_strategy


class NoneConfig(StrategyConfig):
    """The baseline takes no settings."""


@register_strategy
class PassThrough(Strategy[NoneConfig]):
    name = "none"
    description = "No alignment: one engine call with the request's own sampling settings."
    config_model = NoneConfig
    streams_tokens = True

    def _sampling(self, ctx: StrategyContext) -> SamplingSettings:
        return replace(ctx.request.sampling, n=ctx.request.n)

    async def run(self, ctx: StrategyContext, config: NoneConfig) -> StrategyResult:
        generation = await ctx.sample(ctx.request.messages, self._sampling(ctx))
        return StrategyResult(
            choices=[
                ChoiceResult(c.text, c.finish_reason, c.num_tokens, logprobs=c.logprobs)
                for c in generation.completions
            ],
            prompt_tokens=generation.prompt_tokens,
        )

    async def stream(self, ctx: StrategyContext, config: NoneConfig) -> AsyncIterator[StreamEvent]:
        prompt = await ctx.chat_prompt(ctx.request.messages)
        collected: dict[int, _ChoiceAccumulator] = {}
        prompt_tokens = 0
        async for delta in ctx.engine.stream(prompt, self._sampling(ctx)):
            prompt_tokens = delta.prompt_tokens
            collected.setdefault(delta.index, _ChoiceAccumulator()).add(delta)
            yield DeltaEvent(delta)
        choices = [collected[i].result() for i in sorted(collected)]
        result = StrategyResult(choices=choices, prompt_tokens=prompt_tokens)
        yield ResultEvent(result, streamed=True)


class _ChoiceAccumulator:
    """Rebuilds a choice from its streamed deltas."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None

    def add(self, delta: CompletionDelta) -> None:
        self.parts.append(delta.text)
        self.num_tokens += delta.num_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def result(self) -> ChoiceResult:
        return ChoiceResult("".join(self.parts), self.finish_reason or "stop", self.num_tokens)
