"""The tasks a RAIN search has in flight, each with a label, taken out as they finish.

:class:`TaskPool` has no round barrier: :meth:`TaskPool.next` returns the first task to
finish (the earliest started among those already finished, so a run is reproducible
when the engine is), and the search backs it up and starts another while the rest go on.
Nothing is left dangling: :meth:`TaskPool.cancel_where` and :meth:`TaskPool.aclose`
cancel tasks and wait until they have stopped, and a task's exception comes out of
:meth:`TaskPool.next` for the caller, whose cleanup closes the pool (cancelling the
siblings).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

L = TypeVar("L")


class TaskPool(Generic[L]):
    """Tasks in flight, each labelled; the first to finish comes out first."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[Any], L] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def labels(self) -> list[L]:
        """The labels of the tasks in flight, oldest first."""
        return list(self._tasks.values())

    def start(self, work: Coroutine[Any, Any, Any], label: L) -> None:
        """Run ``work`` as a task of the pool."""
        self._tasks[asyncio.ensure_future(work)] = label

    async def next(self) -> tuple[L, Any]:
        """Wait for a task to finish; its label and result (or its exception, raised)."""
        if not self._tasks:
            raise RuntimeError("no task in flight")
        await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        task = next(task for task in self._tasks if task.done())
        label = self._tasks.pop(task)
        return label, task.result()

    async def cancel_where(self, condition: Callable[[L], bool]) -> list[L]:
        """Cancel the tasks whose label meets ``condition``; their labels, once they stopped."""
        chosen = [task for task, label in self._tasks.items() if condition(label)]
        labels = [self._tasks.pop(task) for task in chosen]
        for task in chosen:
            task.cancel()
        # Their results and errors are of no use any more; retrieving them keeps asyncio
        # from reporting them as never retrieved.
        await asyncio.gather(*chosen, return_exceptions=True)
        return labels

    async def aclose(self) -> None:
        """Cancel every task and wait until all have stopped."""
        await self.cancel_where(lambda label: True)
