"""When one request's engine and reward calls ran: its call timeline.

A :class:`CallTimeline` is opt-in, per request. It notes each engine call (its sampling
shape, the tokens it read and wrote, and, when asked, the prompt itself) and each reward
call, with start and end offsets from the timeline's creation. Which calls overlapped and
which waited for others is then visible, so the request's critical path can be computed,
or replayed as plain engine calls (``benchmarks/critical_path.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ttalign.engine.base import Prompt, SamplingSettings

#: Offsets are exported rounded to microseconds.
_DIGITS = 6


def _offset(value: float | None) -> float | None:
    return None if value is None else round(value, _DIGITS)


@dataclass
class EngineCallRecord:
    """One engine call (``generate`` or ``stream``); ``end`` stays ``None`` while it runs."""

    start: float
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    ignore_eos: bool
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    end: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Cancelled, failed, or closed before the engine finished it.
    aborted: bool = False
    #: Each completion's finish reason (``stop``, ``length``, ...), in index order.
    finish_reasons: list[str] = field(default_factory=list)
    #: The fleet replica that answered (gateway mode); ``None`` for the in-process engine.
    replica: str | None = None
    #: Prompt tokens read from the prefix cache, over the call's sequences.
    cached_tokens: int = 0

    def export(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "kind": "engine",
            "start": _offset(self.start),
            "end": _offset(self.end),
            "n": self.n,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "ignore_eos": self.ignore_eos,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "aborted": self.aborted,
            "finish_reasons": self.finish_reasons,
        }
        if self.replica is not None:
            entry["replica"] = self.replica
        if self.prompt_token_ids is not None:
            entry["prompt_token_ids"] = self.prompt_token_ids
        if self.prompt_text is not None:
            entry["prompt_text"] = self.prompt_text
        return entry


@dataclass
class RewardCallRecord:
    """One reward client call."""

    start: float
    reward: str
    candidates: int
    partial: bool
    end: float | None = None

    def export(self) -> dict[str, Any]:
        return {
            "kind": "reward",
            "start": _offset(self.start),
            "end": _offset(self.end),
            "reward": self.reward,
            "candidates": self.candidates,
            "partial": self.partial,
        }


@dataclass
class CallTimeline:
    """The engine and reward calls of one request, timed from this object's creation."""

    #: Also note each engine call's prompt (token ids, or text if it was sent as text).
    record_prompts: bool = False
    clock: Callable[[], float] = time.monotonic
    origin: float = field(init=False)
    #: The wall-clock time of :attr:`origin`, in nanoseconds since the epoch.
    wall_origin_ns: int = field(init=False)
    _calls: list[EngineCallRecord | RewardCallRecord] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.origin = self.clock()
        self.wall_origin_ns = time.time_ns()

    def now(self) -> float:
        """Seconds since the timeline was created."""
        return self.clock() - self.origin

    def wall_ns(self, offset: float) -> int:
        """The wall-clock time, in nanoseconds since the epoch, of an offset on this timeline."""
        return self.wall_origin_ns + round(offset * 1e9)

    def engine_call(self, prompt: Prompt, sampling: SamplingSettings) -> EngineCallRecord:
        """Note an engine call starting now; the caller ends it with :meth:`finish_engine`."""
        record = EngineCallRecord(
            start=self.now(),
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            ignore_eos=sampling.ignore_eos,
        )
        if self.record_prompts:
            if isinstance(prompt, str):
                record.prompt_text = prompt
            else:
                record.prompt_token_ids = list(prompt)  # a copy: trajectories grow in place
        self._calls.append(record)
        return record

    def finish_engine(
        self,
        record: EngineCallRecord,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        aborted: bool = False,
        finish_reasons: list[str] | None = None,
        replica: str | None = None,
        cached_tokens: int = 0,
    ) -> None:
        record.end = self.now()
        record.cached_tokens = cached_tokens
        record.prompt_tokens = prompt_tokens
        record.completion_tokens = completion_tokens
        record.aborted = aborted
        record.finish_reasons = finish_reasons or []
        record.replica = replica

    def reward_call(self, reward: str, candidates: int, *, partial: bool) -> RewardCallRecord:
        """Note a reward call starting now; the caller ends it with :meth:`finish_reward`."""
        record = RewardCallRecord(self.now(), reward, candidates, partial)
        self._calls.append(record)
        return record

    def finish_reward(self, record: RewardCallRecord) -> None:
        record.end = self.now()

    def calls(self) -> list[EngineCallRecord | RewardCallRecord]:
        """Every call noted so far, ordered by start (a running call has ``end = None``)."""
        return sorted(self._calls, key=lambda call: call.start)

    def export(self) -> list[dict[str, Any]]:
        """Every call as a JSON-able dict, ordered by start (a running call has ``end: None``)."""
        return [call.export() for call in self.calls()]
