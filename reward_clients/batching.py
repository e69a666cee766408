"""Micro-batching: concurrent ``submit`` calls within a short window share one backend call.

Each caller submits a list of items and gets back one result per item. Items that arrive
within ``window_seconds`` of the first pending one are flushed together, split into chunks
of at most ``max_batch_size`` that run concurrently, each as its own task. A flush also
starts as soon as ``max_batch_size`` items are pending.

A chunk of one caller's items runs in that caller's context (its request's routing scope);
a chunk shared by several callers runs outside every request's scope.

A caller gets its results once every chunk holding its items is done; a failed chunk fails
only the callers with items in it. Work nobody waits for is not done: a caller cancelled
before the flush is left out of it, and a chunk is cancelled as soon as every caller with
items in it has been cancelled (a client that disconnects thus aborts its backend work,
judge calls on the engine included). A chunk shared with a caller still waiting runs on.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Caller(Generic[T, R]):
    """One ``submit`` call: its items, and its results as chunks deliver them."""

    items: Sequence[T]
    future: asyncio.Future[list[R]]
    #: The context the caller submitted from (its request's routing scope).
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    results: list[R | None] = field(init=False)
    missing: int = field(init=False)
    chunks: list[_Chunk[T, R]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.missing = len(self.items)

    def deliver(self, position: int, result: R) -> None:
        self.results[position] = result
        self.missing -= 1
        if self.missing == 0 and not self.future.done():
            self.future.set_result(self.results)  # type: ignore[arg-type]

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(eq=False)
class _Chunk(Generic[T, R]):
    """Up to ``max_batch_size`` items, each with the caller and position it came from."""

    slots: list[tuple[_Caller[T, R], int]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def callers(self) -> list[_Caller[T, R]]:
        return list({id(caller): caller for caller, _ in self.slots}.values())

    def abandoned(self) -> bool:
        """Every caller with items here has stopped waiting (cancelled, or already failed)."""
        return all(caller.future.done() for caller, _ in self.slots)


class MicroBatcher(Generic[T, R]):
    """Coalesces concurrent submissions into calls of ``run(batch) -> results``."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        window_seconds: float,
        max_batch_size: int,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run = run
        self._window = max(window_seconds, 0.0)
        self._max = max_batch_size
        self._pending: list[_Caller[T, R]] = []
        self._pending_items = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for ``items``, in order, from one or more shared backend calls."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        caller = _Caller[T, R](items, loop.create_future())
        self._pending.append(caller)
        self._pending_items += len(items)
        if self._pending_items >= self._max or self._window == 0:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._flush)
        return await caller.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        callers = [c for c in self._pending if not c.future.done()]
        self._pending, self._pending_items = [], 0
        loop = asyncio.get_running_loop()
        for chunk in self._chunks(callers):
            chunk.task = loop.create_task(self._execute(chunk), context=self._context_of(chunk))
            self._tasks.add(chunk.task)
            chunk.task.add_done_callback(self._tasks.discard)
        for caller in callers:
            caller.future.add_done_callback(functools.partial(self._cancel_abandoned, caller))

    @staticmethod
    def _context_of(chunk: _Chunk[T, R]) -> contextvars.Context:
        """A chunk of one caller's items runs in that caller's context (its request's
        routing); a chunk shared by several runs in none of theirs. Never the context the
        flush happens to run in: a timer keeps the context of whoever started the window,
        who may have left since."""
        callers = chunk.callers()
        return callers[0].context.copy() if len(callers) == 1 else contextvars.Context()

    def _chunks(self, callers: list[_Caller[T, R]]) -> list[_Chunk[T, R]]:
        chunks: list[_Chunk[T, R]] = []
        for caller in callers:
            for position in range(len(caller.items)):
                if not chunks or len(chunks[-1].slots) == self._max:
                    chunks.append(_Chunk())
                chunk = chunks[-1]
                chunk.slots.append((caller, position))
                if not caller.chunks or caller.chunks[-1] is not chunk:
                    caller.chunks.append(chunk)
        return chunks

    @staticmethod
    def _cancel_abandoned(caller: _Caller[T, R], _: asyncio.Future[list[R]]) -> None:
        for chunk in caller.chunks:
            if chunk.task is not None and not chunk.task.done() and chunk.abandoned():
                chunk.task.cancel()

    async def _execute(self, chunk: _Chunk[T, R]) -> None:
        try:
            results = await self._run([caller.items[i] for caller, i in chunk.slots])
            if len(results) != len(chunk.slots):
                raise ValueError(f"{len(results)} results for a batch of {len(chunk.slots)}")
        except asyncio.CancelledError:
            for caller in chunk.callers():
                caller.future.cancel()
            raise
        except Exception as exc:
            for caller in chunk.callers():
                caller.fail(exc)
            return
        for (caller, position), result in zip(chunk.slots, results, strict=True):
            if not caller.future.done():
                caller.deliver(position, result)

    async def close(self) -> None:
        """Cancel batches in flight; their callers see ``CancelledError``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for caller in self._pending:
            caller.future.cancel()
        self._pending, self._pending_items = [], 0
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
