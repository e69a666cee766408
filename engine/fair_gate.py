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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class FairGate:
    """Admits search calls by the number of sequences they run, plain requests at once."""

    def __init__(self, sequences_beside_plain: int = 0) -> None:
        self.sequences_beside_plain = sequences_beside_plain
        self._plain = 0
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
            async with changed:
                changed.notify_all()

    @asynccontextmanager
    async def search(self, sequences: int) -> AsyncIterator[None]:
        """Hold while a search call of ``sequences`` sequences runs; waits for its turn."""
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: self._admits(sequences))
            self._search_sequences += sequences
        try:
            yield
        finally:
            self._search_sequences -= sequences
            async with changed:
                changed.notify_all()

    def _admits(self, sequences: int) -> bool:
        if self._plain == 0 or self._search_sequences == 0:
            return True
        return self._search_sequences + sequences <= self.sequences_beside_plain

    def _condition(self) -> asyncio.Condition:
        # Made on first use, inside the server's event loop.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed
