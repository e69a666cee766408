"""Micro-batching: concurrent ``submit`` calls within a short window share one backend call.

Each caller submits a list of items and gets back one result per item. Items that arrive
within ``window_seconds`` of the first pending one are flushed together, split into chunks
of at most ``max_batch_size`` that run concurrently. A flush also starts as soon as
``max_batch_size`` items are pending. A failed chunk fails only the callers with items in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    items: Sequence[T]
    future: asyncio.Future[list[R]]


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
        self._pending: list[_Pending[T, R]] = []
        self._pending_items = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for ``items``, in order, from one or more shared backend calls."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        pending = _Pending[T, R](items, loop.create_future())
        self._pending.append(pending)
        self._pending_items += len(items)
        if self._pending_items >= self._max or self._window == 0:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._flush)
        return await pending.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        groups, self._pending, self._pending_items = self._pending, [], 0
        if groups:
            task = asyncio.ensure_future(self._execute(groups))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, groups: list[_Pending[T, R]]) -> None:
        try:
            await self._settle(groups)
        finally:
            for group in groups:
                if not group.future.done():
                    group.future.cancel()

    async def _settle(self, groups: list[_Pending[T, R]]) -> None:
        # Flatten callers' items, remembering which caller and position each belongs to.
        flat: list[T] = []
        owners: list[tuple[int, int]] = []
        for g, group in enumerate(groups):
            for position, item in enumerate(group.items):
                flat.append(item)
                owners.append((g, position))
        chunks = [
            range(start, min(start + self._max, len(flat)))
            for start in range(0, len(flat), self._max)
        ]
        outcomes = await asyncio.gather(
            *(self._run([flat[i] for i in chunk]) for chunk in chunks), return_exceptions=True
        )
        results: list[list[R | None]] = [[None] * len(g.items) for g in groups]
        failures: dict[int, BaseException] = {}
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            for offset, i in enumerate(chunk):
                g, position = owners[i]
                if isinstance(outcome, BaseException):
                    failures.setdefault(g, outcome)
                else:
                    results[g][position] = outcome[offset]
        for g, group in enumerate(groups):
            if group.future.done():
                continue  # the caller was cancelled
            if g in failures:
                group.future.set_exception(failures[g])
            else:
                group.future.set_result(results[g])  # type: ignore[arg-type]

    async def close(self) -> None:
        """Cancel batches in flight; their callers see ``CancelledError``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for group in self._pending:
            group.future.cancel()
        self._pending, self._pending_items = [], 0
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
