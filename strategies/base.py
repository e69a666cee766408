"""The strategy interface: one async entry point per decoding-time alignment method.

A strategy receives a :class:`StrategyContext` (the request, a metered engine, reward
clients, a deadline and a progress sink) and returns a :class:`StrategyResult`. The
server never needs to know which strategy it runs.

Streaming: :meth:`Strategy.stream` yields :class:`StreamEvent` values. The default
implementation runs :meth:`Strategy.run` while forwarding progress, then emits the final
choices; strategies that can stream tokens as they are generated (``none``) override it.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from server.engine.base import (
    CompletionDelta,
    FinishReason,
    Generation,
    Prompt,
    SamplingSettings,
    TokenLogprob,
)
from server.engine.metering import MeteredEngine


class StrategyConfig(BaseModel):
    """Base of every strategy's ``strategy_config`` model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


ConfigT = TypeVar("ConfigT", bound=StrategyConfig)


@dataclass(frozen=True)
class AlignmentRequest:
    """What a strategy needs of a chat completion request, free of HTTP concerns."""

    messages: tuple[dict[str, str], ...]
    sampling: SamplingSettings
    n: int = 1
    return_trace: bool = False
    #: The reward client the request named, or ``None`` for the server default.
    reward: str | None = None
    #: The server's cap on candidates per engine call.
    max_candidates: int = 64
    #: Verifiable constraints sent with the request, for rule-verifier rewards.
    constraints: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ChoiceResult:
    """One returned choice."""

    text: str
    finish_reason: FinishReason
    num_tokens: int
    reward: float | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class StrategyResult:
    """What a strategy returns: the choices plus alignment bookkeeping."""

    choices: list[ChoiceResult]
    rounds: int = 1
    candidates_scored: int = 0
    stopped_early: bool = False
    trace: dict[str, Any] | None = None
    #: Tokens of the user's rendered conversation, when the strategy already knows it.
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class ProgressEvent:
    """A search progress report (streamed to clients as an ``alignment_progress`` chunk)."""

    data: dict[str, Any]


@dataclass(frozen=True)
class DeltaEvent:
    """New tokens of one choice."""

    delta: CompletionDelta


@dataclass(frozen=True)
class ResultEvent:
    """The last event of a stream: the whole result."""

    result: StrategyResult
    #: True when the choices' text was already streamed by :class:`DeltaEvent` values.
    streamed: bool = False


StreamEvent = ProgressEvent | DeltaEvent | ResultEvent


@dataclass
class RewardUsage:
    """Reward work done on behalf of one request."""

    calls: int = 0
    candidates: int = 0
    seconds: float = 0.0


class MeteredReward:
    """Delegates to a reward client, adding each call's cost to a shared :class:`RewardUsage`."""

    def __init__(self, client: Any, usage: RewardUsage) -> None:
        self._client = client
        self._usage = usage
        self.name: str = client.name

    async def score(
        self,
        conversation: Sequence[dict[str, str]],
        candidates: Sequence[str],
        *,
        partial: bool = False,
    ) -> list[float]:
        started = time.monotonic()
        try:
            return await self._client.score(conversation, candidates, partial=partial)
        finally:
            self._usage.calls += 1
            self._usage.candidates += len(candidates)
            self._usage.seconds += time.monotonic() - started


class RewardResolver:
    """Looks up configured reward clients by name; a request can only name, never define, one."""

    def __init__(self, lookup: Callable[[str | None], Any]) -> None:
        self._lookup = lookup
        self.usage = RewardUsage()

    def get(self, name: str | None = None) -> Any:
        """The reward client called ``name`` (server default for ``None``), metered."""
        return MeteredReward(self._lookup(name), self.usage)


@dataclass
class StrategyContext:
    """Everything one strategy run may use. Built fresh for every request."""

    request: AlignmentRequest
    engine: MeteredEngine
    rewards: RewardResolver
    #: ``time.monotonic()`` value after which the strategy should stop and return its best.
    deadline: float | None = None
    progress: asyncio.Queue[ProgressEvent] = field(default_factory=asyncio.Queue)
    #: Server-configured replacements for strategies' prompt templates, by template name.
    prompt_overrides: Mapping[str, str] = field(default_factory=dict)

    def report(self, **data: Any) -> None:
        """Publish a progress report; it reaches streaming clients between rounds."""
        self.progress.put_nowait(ProgressEvent(data))

    def time_left(self) -> float | None:
        """Seconds until the deadline, or ``None`` when there is none."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    def past_deadline(self) -> bool:
        left = self.time_left()
        return left is not None and left <= 0

    async def chat_prompt(
        self, messages: Sequence[dict[str, str]], *, continue_final_message: bool = False
    ) -> Prompt:
        return await self.engine.render_chat(
            messages, continue_final_message=continue_final_message
        )

    async def sample(
        self, messages: Sequence[dict[str, str]], sampling: SamplingSettings
    ) -> Generation:
        """Render ``messages`` and sample ``sampling.n`` completions in one engine call."""
        return await self.engine.generate(await self.chat_prompt(messages), sampling)


class Strategy(ABC, Generic[ConfigT]):
    """A decoding-time alignment strategy. Subclasses register with :func:`register_strategy`."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_model: ClassVar[type[StrategyConfig]]
    #: Whether this strategy consults a reward client (so ``reward`` names are validated).
    uses_reward: ClassVar[bool] = False
    #: Whether :meth:`stream` yields tokens as the engine makes them. Searches that send
    #: nothing until they have an answer do not, and the server keeps their streams alive.
    streams_tokens: ClassVar[bool] = False

    def check(self, request: AlignmentRequest, config: ConfigT) -> None:
        """Reject a request this strategy cannot serve, before any engine work.

        Called by the server while validating, so a bad combination is a 400 even for a
        streaming request. Raise :class:`server.errors.InvalidRequestError` naming the param.
        """

    @abstractmethod
    async def run(self, ctx: StrategyContext, config: ConfigT) -> StrategyResult:
        """Produce the request's choices."""

    async def stream(self, ctx: StrategyContext, config: ConfigT) -> AsyncIterator[StreamEvent]:
        """Yield progress while :meth:`run` searches, then the result.

        Cancelling the consumer cancels the search, which aborts its engine requests.
        """
        task = asyncio.ensure_future(self.run(ctx, config))
        try:
            while not task.done():
                getter = asyncio.ensure_future(ctx.progress.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not ctx.progress.empty():
                yield ctx.progress.get_nowait()
            yield ResultEvent(task.result())
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
