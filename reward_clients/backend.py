"""The shared base of reward clients that call a backend (HTTP servers, local models, judges).

Everything that is not I/O is written once here:

- micro-batching of concurrent ``score`` calls (:mod:`reward_clients.batching`);
- a timeout per backend call, and bounded retries with exponential backoff when the backend
  timed out or refused the connection; after the last retry, :class:`RewardTimeout` or
  :class:`RewardUnavailable` naming the client;
- checks that the backend returned one finite score per candidate (a partial answer raises
  :class:`RewardClientError`, it is never scored as zero);
- the ``ttalign_reward_*`` metrics (outcome ``cancelled`` when every caller of a batch
  went away and the batch was abandoned).

A subclass implements only :meth:`BackendReward.score_items`.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from ttalign.engine.base import CallNotAdmitted, EngineUnavailableError
from ttalign.engine.metering import ScoringMeter, current_scoring_meter
from ttalign.reward_clients.base import Message, RewardClientError, RewardTimeout, RewardUnavailable
from ttalign.reward_clients.batching import MicroBatcher

T = TypeVar("T")


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """Await ``awaitables`` concurrently; on the first failure cancel the rest and raise it.

    Unlike :func:`asyncio.gather`, no sibling is left running after one has failed, so a
    failed or timed-out backend call leaves no orphaned work behind (engine requests
    included).
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the finished ones


class BackendSettings(BaseModel):
    """Reliability and batching settings every backend client accepts in the config file."""

    model_config = ConfigDict(extra="forbid")

    timeout_seconds: float = Field(30.0, gt=0, description="Limit of one backend call.")
    max_retries: int = Field(2, ge=0, description="Retries after a timeout or refusal.")
    backoff_seconds: float = Field(
        0.2, ge=0, description="Wait before the first retry; doubles on each retry."
    )
    batch_window_ms: float = Field(
        5.0, ge=0, description="How long concurrent scoring calls are gathered into one batch."
    )
    max_batch_size: int = Field(64, ge=1, description="Most candidates per backend call.")

    def attempts(self) -> int:
        """How many times one call may reach the backend: the first try and its retries."""
        return self.max_retries + 1

    def call_seconds(self) -> float:
        """The longest one call may take: every attempt's timeout and every backoff wait."""
        waits = sum(self.backoff_seconds * 2**k for k in range(self.max_retries))
        return self.attempts() * self.timeout_seconds + waits


@dataclass(frozen=True)
class ScoringItem:
    """One candidate reply with the conversation it answers."""

    conversation: tuple[Message, ...]
    candidate: str
    #: The candidate is an unfinished reply: render its turn open, not closed.
    partial: bool = False
    #: Where engine calls made to score this item are metered: the requesting task's
    #: :class:`~ttalign.engine.metering.ScoringMeter`, captured when it was submitted (a batch
    #: may hold items of several requests). ``None``: not metered.
    meter: ScoringMeter | None = field(default=None, compare=False)

    def messages(self) -> list[Message]:
        """The conversation with the candidate as the final assistant turn."""
        return [*self.conversation, {"role": "assistant", "content": self.candidate}]


class TransientBackendError(Exception):
    """A backend failure worth retrying: it timed out or could not be reached."""

    def __init__(self, kind: Literal["timeout", "unavailable"], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class RewardMetrics:
    """Records reward calls into the server's metrics; does nothing without them."""

    def __init__(self, metrics: Any | None) -> None:
        self._metrics = metrics

    def record(self, client: str, outcome: str, seconds: float, batch_size: int) -> None:
        m = self._metrics
        if m is None:
            return
        m.reward_calls.labels(client, outcome).inc()
        m.reward_latency.labels(client).observe(seconds)
        m.reward_batch_size.labels(client).observe(batch_size)


class BackendReward(ABC):
    """A :class:`~reward_clients.base.RewardClient` over a batched, fallible backend.

    One owner applies the retry policy of a call (``max_retries`` retries, ``timeout_seconds``
    per attempt, ``backoff_seconds`` doubling). By default that is this base: it repeats a
    call whose :meth:`score_items` raised :class:`TransientBackendError` or timed out. A
    client whose transport spreads the attempts over replicas itself sets
    :attr:`transport_retries`; then this base makes one attempt, bounded only by the whole
    policy's time (:meth:`BackendSettings.call_seconds`), and never repeats it.
    """

    #: The transport applies the retry policy (over a replica pool); see the class doc.
    transport_retries: bool = False

    def __init__(
        self, name: str, settings: BackendSettings | None = None, metrics: Any | None = None
    ) -> None:
        self.name = name
        self.settings = settings or BackendSettings()
        self._metrics = RewardMetrics(metrics)
        self._batcher: MicroBatcher[ScoringItem, float] = MicroBatcher(
            self._score_batch,
            window_seconds=self.settings.batch_window_ms / 1000,
            max_batch_size=self.settings.max_batch_size,
        )

    async def score(
        self, conversation: Sequence[Message], candidates: Sequence[str], *, partial: bool = False
    ) -> list[float]:
        """Score every candidate; concurrent calls may share one backend batch."""
        frozen = tuple(dict(m) for m in conversation)
        meter = current_scoring_meter()
        return await self._batcher.submit(
            [ScoringItem(frozen, c, partial, meter) for c in candidates]
        )

    @abstractmethod
    async def score_items(self, items: Sequence[ScoringItem]) -> Sequence[float]:
        """One backend call scoring ``items``; raise :class:`TransientBackendError` to retry."""

    async def close(self) -> None:
        await self._batcher.close()

    async def _score_batch(self, items: list[ScoringItem]) -> list[float]:
        started = time.monotonic()
        try:
            return await self._score_with_retries(items, started)
        except asyncio.CancelledError:
            # Every caller of this batch went away (or the client is closing).
            self._record("cancelled", started, len(items))
            raise

    async def _score_with_retries(self, items: list[ScoringItem], started: float) -> list[float]:
        s = self.settings
        retries, timeout = (
            (0, s.call_seconds()) if self.transport_retries else (s.max_retries, s.timeout_seconds)
        )
        attempt = 0
        while True:
            try:
                raw = await asyncio.wait_for(self.score_items(items), timeout)
                scores = self._checked(raw, len(items))
            except (TransientBackendError, TimeoutError) as exc:
                kind = exc.kind if isinstance(exc, TransientBackendError) else "timeout"
                if attempt < retries:
                    await asyncio.sleep(s.backoff_seconds * 2**attempt)
                    attempt += 1
                    continue
                self._record(kind, started, len(items))
                raise self._final_error(kind, exc, attempt + 1) from exc
            except CallNotAdmitted:
                # The request's own budget refused an engine call: not the backend's failure.
                self._record("refused", started, len(items))
                raise
            except (RewardClientError, EngineUnavailableError):
                # A dead serving engine (under the judge) is the engine's 503, not the reward's.
                self._record("error", started, len(items))
                raise
            except Exception as exc:
                self._record("error", started, len(items))
                raise RewardClientError(self.name, f"{type(exc).__name__}: {exc}") from exc
            self._record("ok", started, len(items))
            return scores

    def _checked(self, raw: Sequence[float], expected: int) -> list[float]:
        scores = [float(s) for s in raw]
        if len(scores) != expected:
            raise RewardClientError(
                self.name, f"the backend returned {len(scores)} scores for {expected} candidates"
            )
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise RewardClientError(
                self.name, f"the backend returned non-finite scores at positions {bad}"
            )
        return scores

    def _final_error(self, kind: str, exc: BaseException, attempts: int) -> RewardClientError:
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if kind == "timeout":
            detail = str(exc) or f"no answer within {self.settings.timeout_seconds} s"
            return RewardTimeout(self.name, f"timed out after {tries} ({detail})")
        return RewardUnavailable(self.name, f"unavailable after {tries} ({exc})")

    def _record(self, outcome: str, started: float, batch_size: int) -> None:
        self._metrics.record(self.name, outcome, time.monotonic() - started, batch_size)
