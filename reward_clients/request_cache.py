"""A bounded cache of per-request work (an extracted rule list, a checklist), shared while
it is computed: concurrent callers with the same key wait for one computation.

A computation that fails for the caller that started it (its budget refused the call, its
request was cancelled) is not the other callers' failure: each of them then computes for
itself. Entries leave least recently used first.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def text_key(text: str) -> str:
    """A cache key for a text of any size (lone surrogates included)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class SharedCache(Generic[T]):
    """Values by key, computed once by whichever caller asks first."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._values: OrderedDict[str, T] = OrderedDict()
        self._pending: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._values)

    async def get(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """The value of ``key``, awaiting ``compute()`` when nobody has it or computes it."""
        while True:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            pending = self._pending.get(key)
            if pending is None:
                return await self._compute(key, compute)
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise

    async def _compute(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await compute()
        except BaseException:
            future.cancel()  # the callers sharing it compute for themselves
            raise
        finally:
            del self._pending[key]
        future.set_result(value)
        self._values[key] = value
        while len(self._values) > self.size:
            self._values.popitem(last=False)
        return value
