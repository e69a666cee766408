"""An engine wrapper that counts what one request costs, and optionally times each call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing, nullcontext
from dataclasses import dataclass, replace
from functools import partial

from ttalign.engine.base import (
    AdaptiveTemperatureEngine,
    CompletionDelta,
    EngineClient,
    EngineHealth,
    Generation,
    Prompt,
    SamplingSettings,
)
from ttalign.engine.fair_gate import FairGate
from ttalign.engine.routing import current_routing, noting_call
from ttalign.engine.timeline import CallTimeline


@dataclass
class EngineUsage:
    """Engine work done on behalf of one request, across all of its rounds."""

    engine_calls: int = 0
    candidates_generated: int = 0
    #: Prompt and completion tokens of every call, reward clients' (a judge's) included.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Engine calls reward clients made to score for the request (a judge's ratings).
    reward_engine_calls: int = 0
    #: Prefill over every sequence the engine ran (each child of an ``n > 1`` call
    #: prefills the prompt): the part it computed, and the part its prefix cache held.
    prefill_computed_tokens: int = 0
    prefill_cached_tokens: int = 0

    def add_generation(self, generation: Generation) -> None:
        """Count one finished engine call's tokens."""
        self.prompt_tokens += generation.prompt_tokens
        self.completion_tokens += generation.completion_tokens
        self.prefill_computed_tokens += generation.computed_prefill_tokens
        self.prefill_cached_tokens += generation.cached_prefill_tokens

    def add_sequence_prefill(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one streamed sequence's prefill."""
        self.prefill_cached_tokens += cached_tokens
        self.prefill_computed_tokens += max(0, prompt_tokens - cached_tokens)


class MeteredEngine:
    """Delegates to an :class:`EngineClient`, adding every call's cost to :attr:`usage`.

    With a :class:`~ttalign.engine.timeline.CallTimeline`, every ``generate`` and ``stream``
    call is also noted there, from its start until it returns, fails, or its stream closes.

    Fair sharing: every call carries the request's ``priority`` (see
    :attr:`SamplingSettings.priority`), and with ``max_in_flight`` at most that many of the
    request's calls run in the engine at once; the others wait here, not in the engine's
    queue, so one search cannot fill the engine's batch ahead of other requests. With a
    server-wide :class:`~ttalign.engine.fair_gate.FairGate`, a search's calls also wait
    while plain requests (``searches=False``) are in the engine.
    """

    def __init__(
        self,
        engine: EngineClient,
        timeline: CallTimeline | None = None,
        *,
        priority: int = 0,
        max_in_flight: int | None = None,
        fair_gate: FairGate | None = None,
        searches: bool = False,
    ) -> None:
        self._engine = engine
        self.usage = EngineUsage()
        self.timeline = timeline
        self.priority = priority
        self._gate = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._fair_gate = fair_gate
        self._searches = searches

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def sampling_defaults(self) -> Mapping[str, float | int]:
        return self._engine.sampling_defaults

    @property
    def adaptive_temperature(self) -> AdaptiveTemperatureEngine | None:
        """The wrapped engine, when it supports per-row temperatures."""
        engine = self._engine
        return engine if isinstance(engine, AdaptiveTemperatureEngine) else None

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
        sampling = self._prioritized(sampling)
        async with self._gate or nullcontext():
            self._count_call(sampling)
            if self._searches and self._fair_gate is not None:
                # A plain request may abort the call (preemption) and have it run again.
                call = partial(self._generate, prompt, sampling)
                return await self._fair_gate.run_search(sampling.n, call)
            async with self._turn(sampling):
                return await self._generate(prompt, sampling)

    async def _generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        timeline = self.timeline
        if timeline is None:
            generation = await self._engine.generate(prompt, sampling)
        else:
            record = timeline.engine_call(prompt, sampling)
            with noting_call() as note:
                try:
                    generation = await self._engine.generate(prompt, sampling)
                except BaseException:
                    timeline.finish_engine(record, 0, 0, aborted=True, replica=note.replica)
                    raise
            timeline.finish_engine(
                record,
                generation.prompt_tokens,
                generation.completion_tokens,
                finish_reasons=[c.finish_reason for c in generation.completions],
                replica=note.replica,
                cached_tokens=generation.cached_prefill_tokens,
            )
        self.usage.add_generation(generation)
        return generation

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        sampling = self._prioritized(sampling)
        async with AsyncExitStack() as stack:
            if self._gate is not None:
                await stack.enter_async_context(self._gate)
            await stack.enter_async_context(self._turn(sampling))
            async with aclosing(self._stream(prompt, sampling)) as deltas:
                async for delta in deltas:
                    yield delta

    async def _stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        self._count_call(sampling)
        timeline = self.timeline
        record = None if timeline is None else timeline.engine_call(prompt, sampling)
        prompt_tokens = completion_tokens = cached_tokens = 0
        counted_prompt = finished = False
        finish_reasons: dict[int, str] = {}
        prefilled: set[int] = set()
        with noting_call() as note:
            try:
                # Closing this stream closes the engine's at once (which aborts its request),
                # rather than whenever the garbage collector finalizes it.
                async with aclosing(self._engine.stream(prompt, sampling)) as deltas:
                    async for delta in deltas:
                        if not counted_prompt:
                            prompt_tokens = delta.prompt_tokens
                            self.usage.prompt_tokens += prompt_tokens
                            counted_prompt = True
                        if delta.index not in prefilled:
                            prefilled.add(delta.index)
                            cached_tokens += delta.cached_prefill_tokens
                            self.usage.add_sequence_prefill(
                                delta.prompt_tokens, delta.cached_prefill_tokens
                            )
                        completion_tokens += delta.num_tokens
                        self.usage.completion_tokens += delta.num_tokens
                        if delta.finish_reason is not None:
                            finish_reasons[delta.index] = delta.finish_reason
                        yield delta
                finished = True
            finally:
                if timeline is not None and record is not None:
                    # Noted once the engine's stream has closed: an abort ends the call too.
                    timeline.finish_engine(
                        record,
                        prompt_tokens,
                        completion_tokens,
                        aborted=not finished,
                        finish_reasons=[finish_reasons[i] for i in sorted(finish_reasons)],
                        replica=note.replica,
                        cached_tokens=cached_tokens,
                    )

    async def health(self) -> EngineHealth:
        return await self._engine.health()

    def _turn(self, sampling: SamplingSettings) -> AbstractAsyncContextManager[None]:
        """Wait for this call's turn at the server-wide gate, and hold it while it runs."""
        if self._fair_gate is None:
            return nullcontext()
        if self._searches:
            return self._fair_gate.search(sampling.n)
        return self._fair_gate.plain()

    def _prioritized(self, sampling: SamplingSettings) -> SamplingSettings:
        if self.priority == sampling.priority:
            return sampling
        return replace(sampling, priority=self.priority)

    def _count_call(self, sampling: SamplingSettings) -> None:
        self.usage.engine_calls += 1
        self.usage.candidates_generated += sampling.n


class ScoringMeter:
    """Meters the engine calls a reward client makes for one request (a judge on the serving
    engine) into that request's usage, and asks the request's budget before each one.

    ``admit(tokens)`` raises (a :class:`~ttalign.engine.base.CallNotAdmitted`) when a call
    of ``tokens`` prompt and completion tokens could exceed the budget. Scoring calls count
    in :attr:`EngineUsage.reward_engine_calls` and in the tokens, never as the strategy's
    own engine calls or as generated candidates.
    """

    def __init__(self, usage: EngineUsage, admit: Callable[[int], None] | None = None) -> None:
        self.usage = usage
        self._admit = admit

    def before(self, prompt_tokens: int, max_tokens: int) -> None:
        if self._admit is not None:
            self._admit(prompt_tokens + max_tokens)

    def after(self, generation: Generation) -> None:
        self.usage.reward_engine_calls += 1
        self.usage.add_generation(generation)


def current_scoring_meter() -> ScoringMeter | None:
    """The meter of the request this task serves (``None`` outside one): the one its
    routing scope carries."""
    routing = current_routing()
    return None if routing is None or routing.closed else routing.scoring_meter
