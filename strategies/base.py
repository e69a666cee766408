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
from ttalign.engine.base import (
    CompletionDelta,
    FinishReason,
    Generation,
    Prompt,
    SamplingSettings,
    TemperatureHeadInfo,
    TokenLogprob,
)
from ttalign.engine.metering import MeteredEngine
from ttalign.engine.timeline import CallTimeline
from ttalign.strategies.budget import ComputeBudget
from ttalign.strategies.errors import DeadlineReached, InvalidStrategyRequest
from ttalign.strategies.sampling import END, generate_until, next_before

#: How long scoring may run past the deadline, so that cut-short candidates can be ranked.
SCORING_GRACE_SECONDS = 0.5


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
    #: The server's cap on tokens per generation step (every step of every strategy).
    max_tokens_cap: int = 2048
    budget: ComputeBudget = field(default_factory=ComputeBudget)
    #: The temperature heads the engine has loaded, by name; ``None`` when the engine
    #: cannot pick temperatures per row (``adaptive_temperature`` then refuses).
    temperature_heads: Mapping[str, TemperatureHeadInfo] | None = None
    #: A ``/v1/completions`` request's own prompt (text or token ids), sent to the engine
    #: as it is; ``messages`` then hold its text as one user turn, for reward clients.
    #: ``None`` for a chat request, whose prompt is its rendered messages.
    raw_prompt: Prompt | None = None

    def check_step_tokens(self, tokens: int, param: str) -> None:
        """Refuse a per-step token limit above the server's cap (a 400 on ``param``)."""
        if tokens > self.max_tokens_cap:
            raise InvalidStrategyRequest(
                f"{param} is {tokens}, but this server allows at most {self.max_tokens_cap} "
                "tokens per generation step (--max-tokens-cap).",
                param=param,
            )


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
    #: Strategy-specific counts added to the response's ``alignment`` object.
    metadata: dict[str, Any] = field(default_factory=dict)


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
    """Delegates to a reward client, adding each call's cost to a shared :class:`RewardUsage`.

    With a :class:`~ttalign.engine.timeline.CallTimeline`, each call is noted there too.
    """

    def __init__(
        self, client: Any, usage: RewardUsage, timeline: CallTimeline | None = None
    ) -> None:
        self._client = client
        self._usage = usage
        self._timeline = timeline
        self.name: str = client.name

    async def score(
        self,
        conversation: Sequence[dict[str, str]],
        candidates: Sequence[str],
        *,
        partial: bool = False,
    ) -> list[float]:
        timeline = self._timeline
        record = (
            None
            if timeline is None
            else timeline.reward_call(self.name, len(candidates), partial=partial)
        )
        started = time.monotonic()
        try:
            return await self._client.score(conversation, candidates, partial=partial)
        finally:
            self._usage.calls += 1
            self._usage.candidates += len(candidates)
            self._usage.seconds += time.monotonic() - started
            if timeline is not None and record is not None:
                timeline.finish_reward(record)


class RewardResolver:
    """Looks up configured reward clients by name; a request can only name, never define, one.

    Each name resolves once per request, so a client that keeps per-request state (a
    composite's normalization) scores every call of the request on the same scale.
    """

    def __init__(
        self, lookup: Callable[[str | None], Any], timeline: CallTimeline | None = None
    ) -> None:
        self._lookup = lookup
        self._clients: dict[str | None, MeteredReward] = {}
        self.usage = RewardUsage()
        #: Where every reward call of the request is noted (``None``: nowhere).
        self.timeline = timeline

    def get(self, name: str | None = None) -> Any:
        """The reward client called ``name`` (server default for ``None``), metered."""
        if name not in self._clients:
            self._clients[name] = MeteredReward(self._lookup(name), self.usage, self.timeline)
        return self._clients[name]


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
    #: The server's sentence embedder (``embed(texts)`` → L2-normalized rows), if any.
    embedder: Any = None
    #: Set once the deadline has cut an engine call short or stopped a step. The server
    #: reports such a request as ``stopped_early`` whatever its strategy returned.
    deadline_reached: bool = False

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

    async def request_prompt(self) -> Prompt:
        """The request's own prompt: a completion request's as sent, else its chat rendered."""
        if self.request.raw_prompt is not None:
            return self.request.raw_prompt
        return await self.chat_prompt(self.request.messages)

    async def sample(
        self, messages: Sequence[dict[str, str]], sampling: SamplingSettings
    ) -> Generation:
        """Render ``messages`` and sample ``sampling.n`` completions in one engine call."""
        return await self.generate(await self.chat_prompt(messages), sampling)

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        """One engine call within the request's budget and deadline.

        Raises :class:`~strategies.errors.BudgetExhausted` when the call could exceed the
        compute budget. At the deadline the call is aborted and its partial completions
        are returned (``finish_reason: length``), with :attr:`deadline_reached` set.
        """
        prompt_tokens = len(prompt) if isinstance(prompt, list) else 0
        self.request.budget.admit(
            self.engine.usage,
            candidates=sampling.n,
            tokens=sampling.n * (prompt_tokens + sampling.max_tokens),
        )
        generation, cut = await generate_until(self.engine, prompt, sampling, self.deadline)
        self.deadline_reached |= cut
        return generation

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        """Stream one engine call; at the deadline it ends, aborted, with :attr:`deadline_reached`.

        Every completion not finished by then gets a last empty delta with ``length``.
        """
        unfinished = set(range(sampling.n))
        stream = self.engine.stream(prompt, sampling)
        try:
            while (delta := await next_before(stream, self.deadline)) is not END:
                if delta.finish_reason is not None:
                    unfinished.discard(delta.index)
                yield delta
        except TimeoutError:
            self.deadline_reached = True
            for index in sorted(unfinished):
                yield CompletionDelta(index, "", 0, finish_reason="length")
        finally:
            await stream.aclose()

    async def score(
        self,
        reward: Any,
        conversation: Sequence[dict[str, str]],
        candidates: Sequence[str],
        *,
        partial: bool = False,
    ) -> list[float]:
        """Score in one reward call; :class:`DeadlineReached` if it would run past the deadline.

        Scoring may run :data:`SCORING_GRACE_SECONDS` past the deadline, so that candidates
        cut short at the deadline can still be ranked.
        """
        left = self.time_left()
        if left is None:
            return await reward.score(conversation, candidates, partial=partial)
        try:
            async with asyncio.timeout(max(left, 0.0) + SCORING_GRACE_SECONDS):
                return await reward.score(conversation, candidates, partial=partial)
        except TimeoutError:
            self.deadline_reached = True
            raise DeadlineReached("the deadline passed while scoring") from None


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
    #: Whether it serves a raw prompt (``/v1/completions``): only strategies that never
    #: rewrite the conversation (critiques, rewinds, mutations) can.
    completes_raw_prompts: ClassVar[bool] = False
    #: Whether it makes many engine calls per reply (a search). The server may schedule a
    #: search's calls after plain requests' and cap how many it has in flight.
    searches: ClassVar[bool] = True

    def needs_reward(self, config: ConfigT) -> bool:
        """Whether this config consults a reward client (so its name is validated up front)."""
        return self.uses_reward

    def check(self, request: AlignmentRequest, config: ConfigT) -> None:
        """Reject a request this strategy cannot serve, before any engine work.

        Called by the server while validating, so a bad combination is a 400 even for a
        streaming request. Raise :class:`~strategies.errors.InvalidStrategyRequest` naming
        the param. Check every per-step token limit against ``request.max_tokens_cap`` and
        the first round against ``request.budget``.
        """

    @abstractmethod
    async def run(self, ctx: StrategyContext, config: ConfigT) -> StrategyResult:
        """Produce the request's choices."""

    async def stream(self, ctx: StrategyContext, config: ConfigT) -> AsyncIterator[StreamEvent]:
        """Yield progress while :meth:`run` searches, then the result.

        Cancelling the consumer cancels the search, which aborts its engine requests.
        """
        task = asyncio.ensure_future(self.run(ctx, config))
        getter: asyncio.Future[ProgressEvent] | None = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(ctx.progress.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
                getter = None
            while not ctx.progress.empty():
                yield ctx.progress.get_nowait()
            yield ResultEvent(task.result())
        finally:
            # Also reached when the consumer is cancelled mid-wait: nothing may be left
            # pending (a pending task is destroyed with an error log, or keeps the search).
            pending = [t for t in (task, getter) if t is not None and not t.done()]
            for future in pending:
                future.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
