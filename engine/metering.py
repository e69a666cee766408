"""An engine wrapper that counts what one request costs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from ttalign.engine.base import (
    CompletionDelta,
    EngineClient,
    EngineHealth,
    Generation,
    Prompt,
    SamplingSettings,
)


@dataclass
class EngineUsage:
    """Engine work done on behalf of one request, across all of its rounds."""

    engine_calls: int = 0
    candidates_generated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class MeteredEngine:
    """Delegates to an :class:`EngineClient`, adding every call's cost to :attr:`usage`."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine
        self.usage = EngineUsage()

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def sampling_defaults(self) -> Mapping[str, float | int]:
        return self._engine.sampling_defaults

    async def render_chat(
        self, messages: Sequence[dict[str, str]], *, continue_final_message: bool = False
    ) -> list[int]:
        return await self._engine.render_chat(
            messages, continue_final_message=continue_final_message
        )

    async def count_tokens(self, text: str) -> int:
        return await self._engine.count_tokens(text)

    async def tokenize(self, text: str) -> list[int]:
        return await self._engine.tokenize(text)

    async def decode(self, token_ids: Sequence[int]) -> str:
        return await self._engine.decode(token_ids)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._engine.eos_token_ids

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        self._count_call(sampling)
        generation = await self._engine.generate(prompt, sampling)
        self.usage.prompt_tokens += generation.prompt_tokens
        self.usage.completion_tokens += generation.completion_tokens
        return generation

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        self._count_call(sampling)
        counted_prompt = False
        # Closing this stream closes the engine's at once (which aborts its request),
        # rather than whenever the garbage collector finalizes it.
        async with aclosing(self._engine.stream(prompt, sampling)) as deltas:
            async for delta in deltas:
                if not counted_prompt:
                    self.usage.prompt_tokens += delta.prompt_tokens
                    counted_prompt = True
                self.usage.completion_tokens += delta.num_tokens
                yield delta

    async def health(self) -> EngineHealth:
        return await self._engine.health()

    def _count_call(self, sampling: SamplingSettings) -> None:
        self.usage.engine_calls += 1
        self.usage.candidates_generated += sampling.n
