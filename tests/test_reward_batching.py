"""Micro-batching and cancellation: work nobody waits for any more is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from ttalign.reward_clients.backend import (
    BackendReward,
    BackendSettings,
    ScoringItem,
    gather_or_cancel,
)
from ttalign.reward_clients.batching import MicroBatcher
from ttalign.reward_clients.judge import JudgeReward
from ttalign.server.metrics import Metrics

from tests.fakes import FakeEngine

CHAT = [{"role": "user", "content": "hi"}]


class SlowBackend(BackendReward):
    """Scores by length after ``delay`` seconds; records started, finished and cancelled calls."""

    def __init__(self, delay: float, metrics: Metrics | None = None, **settings: float) -> None:
        values = {"timeout_seconds": 300.0, "batch_window_ms": 50.0, **settings}
        super().__init__("slow", BackendSettings(**values), metrics)
        self.delay = delay
        self.started: list[list[str]] = []
        self.finished: list[list[str]] = []
        self.cancelled: list[list[str]] = []

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        batch = [i.candidate for i in items]
        self.started.append(batch)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.append(batch)
            raise
        self.finished.append(batch)
        return [float(len(c)) for c in batch]


async def _until(predicate, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def _cancel(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)


async def test_a_batch_whose_callers_all_left_is_cancelled() -> None:
    metrics = Metrics()
    backend = SlowBackend(delay=30, metrics=metrics)
    first = asyncio.ensure_future(backend.score(CHAT, ["a"]))
    second = asyncio.ensure_future(backend.score(CHAT, ["bb"]))
    await _until(lambda: backend.started)
    assert backend.started == [["a", "bb"]]  # one shared batch

    await _cancel(first)
    await asyncio.sleep(0.05)
    assert backend.cancelled == []  # the second caller still waits for it

    await _cancel(second)
    await _until(lambda: backend.cancelled)
    assert backend.cancelled == [["a", "bb"]] and backend.finished == []
    assert metrics.reward_calls.labels("slow", "cancelled")._value.get() == 1


async def test_a_batch_shared_with_a_live_caller_runs_on() -> None:
    backend = SlowBackend(delay=0.2)
    leaving = asyncio.ensure_future(backend.score(CHAT, ["a"]))
    staying = asyncio.ensure_future(backend.score(CHAT, ["bbb"]))
    await _until(lambda: backend.started)
    await _cancel(leaving)
    assert await staying == [3.0]
    assert backend.finished == [["a", "bbb"]] and backend.cancelled == []


async def test_only_the_chunks_nobody_waits_for_are_cancelled() -> None:
    backend = SlowBackend(delay=0.3, max_batch_size=2)
    staying = asyncio.ensure_future(backend.score(CHAT, ["a"]))
    await asyncio.sleep(0)
    leaving = asyncio.ensure_future(backend.score(CHAT, ["bb", "ccc", "dddd"]))
    await _until(lambda: len(backend.started) == 2)
    # Chunks of two: ["a", "bb"] is shared, ["ccc", "dddd"] belongs to the leaving caller.
    assert backend.started == [["a", "bb"], ["ccc", "dddd"]]
    await _cancel(leaving)
    await _until(lambda: backend.cancelled)
    assert backend.cancelled == [["ccc", "dddd"]]
    assert await staying == [1.0]
    assert backend.finished == [["a", "bb"]]


async def test_a_caller_cancelled_before_the_flush_is_left_out() -> None:
    backend = SlowBackend(delay=0, batch_window_ms=100)
    gone = asyncio.ensure_future(backend.score(CHAT, ["a"]))
    await asyncio.sleep(0.01)
    await _cancel(gone)
    assert await backend.score(CHAT, ["bb"]) == [2.0]
    assert backend.started == [["bb"]]


async def test_a_failed_caller_abandons_its_other_chunks() -> None:
    class FailingFirst(SlowBackend):
        async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
            if items[0].candidate == "boom":
                raise ValueError("boom")
            return await super().score_items(items)

    backend = FailingFirst(delay=30, max_batch_size=1, max_retries=0)
    with pytest.raises(Exception, match="boom"):
        await backend.score(CHAT, ["boom", "b"])
    await _until(lambda: backend.cancelled)
    assert backend.cancelled == [["b"]]


async def test_micro_batcher_rejects_a_short_answer() -> None:
    async def short(items: list[str]) -> list[int]:
        return [1]

    batcher: MicroBatcher[str, int] = MicroBatcher(short, window_seconds=0, max_batch_size=8)
    with pytest.raises(ValueError, match="1 results for a batch of 2"):
        await batcher.submit(["a", "b"])


async def test_gather_or_cancel_cancels_the_siblings_of_a_failure() -> None:
    sibling_cancelled = asyncio.Event()

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("first failure")

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            sibling_cancelled.set()
            raise

    with pytest.raises(RuntimeError, match="first failure"):
        await gather_or_cancel(fails(), slow())
    await asyncio.wait_for(sibling_cancelled.wait(), 1)


async def test_cancelling_a_judge_call_aborts_its_engine_requests() -> None:
    engine = FakeEngine(script=lambda prompt, sampling: ["7"], delay=30)
    judge = JudgeReward("judge", engine=engine, settings=BackendSettings(batch_window_ms=0))
    call = asyncio.ensure_future(judge.score(CHAT, ["one", "two", "three"]))
    await _until(lambda: engine.running == 3)
    await _cancel(call)
    await _until(lambda: engine.running == 0, timeout=1.0)
