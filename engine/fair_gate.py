"""Server-wide fair sharing of the engine between plain requests and searches.

On a CPU the engine is compute-bound: every sequence in a batch slows every step, and a
search's calls bring prefills of hundreds of tokens each. A plain request batched with two
searches' dozens of sequences took 10x its idle latency (``benchmarks/fair_sharing.py``),
and vLLM's priority scheduling alone did not help: it orders the queue, but a plain
request still decodes in the same steps as every running search sequence.

:class:`FairGate` holds new search calls back while plain requests are in the engine:
searches together keep at most ``sequences_beside_plain`` sequences in flight then (and
always at least one call, so a steady stream of plain requests cannot starve them). Calls
already running finish; they are short (segments, simulations, one-token evaluations).

``linger_seconds`` keeps the gate closed that long after the last plain request leaves.
Without it, every search call held back is released the moment a plain request ends, and
a client's next request, sent a fraction of a second later, lands among all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class FairGate:
    """Admits search calls by the number of sequences they run, plain requests at once."""

    def __init__(self, sequences_beside_plain: int = 0, linger_seconds: float = 0.0) -> None:
        self.sequences_beside_plain = sequences_beside_plain
        self.linger_seconds = linger_seconds
        self._plain = 0
        self._plain_until = 0.0
        self._search_sequences = 0
        self._changed: asyncio.Condition | None = None

    @property
    def plain_in_flight(self) -> int:
        return self._plain

    @property
    def search_sequences_in_flight(self) -> int:
        return self._search_sequences

    @asynccontextmanager
    async def plain(self) -> AsyncIterator[None]:
        """Hold while a plain request's call runs: searches slow down for it."""
        changed = self._condition()
        self._plain += 1
        try:
            yield
        finally:
            self._plain -= 1
            if self._plain == 0:
                self._plain_until = time.monotonic() + self.linger_seconds
            async with changed:
                changed.notify_all()

    @asynccontextmanager
    async def search(self, sequences: int) -> AsyncIterator[None]:
        """Hold while a search call of ``sequences`` sequences runs; waits for its turn."""
        changed = self._condition()
        async with changed:
            while not self._admits(sequences):
                lingering = self._linger_left()
                if self._plain == 0 and lingering > 0:
                    # Nothing notifies when the linger runs out: look again then.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), lingering)
                else:
                    await changed.wait()
            self._search_sequences += sequences
        try:
            yield
        finally:
            self._search_sequences -= sequences
            async with changed:
                changed.notify_all()

    def _admits(self, sequences: int) -> bool:
        if self._search_sequences == 0 or not (self._plain or self._linger_left() > 0):
            return True
        return self._search_sequences + sequences <= self.sequences_beside_plain

    def _linger_left(self) -> float:
        return self._plain_until - time.monotonic()

    def _condition(self) -> asyncio.Condition:
        # Made on first use, inside the server's event loop.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed
