"""Per-request memos for RAIN: each distinct key is computed once, in batches.

RAIN evaluates and embeds the same texts again and again (a leaf revisited, the suffixes
of paths that share nodes). :class:`BatchMemo` holds the value of every key computed so
far and computes the missing ones of a call in one batch. Keys that another caller is
computing at that moment are awaited, not computed again. A computation that fails or is
cancelled for the caller that started it is not the others' failure: each of them then
computes those keys for itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchMemo(Generic[K, V]):
    """Values by key, computed once per key by whichever caller asks first."""

    def __init__(self) -> None:
        self._values: dict[K, V] = {}
        self._pending: dict[K, asyncio.Future[None]] = {}
        #: Batches computed, keys computed, and keys served without computing them.
        self.calls = 0
        self.computed = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._values)

    async def get_many(
        self, keys: Sequence[K], compute: Callable[[list[K]], Awaitable[Sequence[V]]]
    ) -> list[V]:
        """The value of every key; ``compute(missing)`` returns one value per missing key."""
        unique = list(dict.fromkeys(keys))
        own = [k for k in unique if k not in self._values and k not in self._pending]
        computed = len(own)
        if own:
            await self._compute(own, compute)
        for key in unique:
            while key not in self._values:
                pending = self._pending.get(key)
                if pending is None:  # its computation failed for the caller that started it
                    computed += 1
                    await self._compute([key], compute)
                else:
                    await asyncio.wait([pending])  # raises only if this caller is cancelled
        self.hits += len(keys) - computed
        return [self._values[k] for k in keys]

    async def _compute(
        self, keys: list[K], compute: Callable[[list[K]], Awaitable[Sequence[V]]]
    ) -> None:
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in keys}
        self._pending.update(futures)
        try:
            values = list(await compute(keys))
            if len(values) != len(keys):
                raise ValueError(f"computed {len(values)} values for {len(keys)} keys")
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise
        finally:
            for key in keys:
                del self._pending[key]
        self.calls += 1
        self.computed += len(keys)
        for key, value in zip(keys, values, strict=True):
            self._values[key] = value
            futures[key].set_result(None)
