"""Server-wide fair sharing of the engine between plain requests and searches.

On a CPU the engine is compute-bound: every sequence in a batch slows every step, and a
search's calls bring prefills of hundreds of tokens each. A plain request batched with two
searches' dozens of sequences took 10x its idle latency (``benchmarks/fair_sharing.py``),
and vLLM's priority scheduling alone did not help: it orders the queue, but a plain
request still decodes in the same steps as every running search sequence.

:class:`FairGate` holds new search calls back while plain requests are in the engine:
searches together keep at most ``sequences_beside_plain`` sequences in flight then, and
after ``exclusive_seconds`` of a closed gate at least one call runs again, so a steady
stream of plain requests cannot starve them.

With ``preempt``, a plain request that arrives also aborts the newest search calls already
in the engine beyond ``sequences_beside_plain`` (they would prefill and decode in its
steps), and :meth:`FairGate.run_search` runs them again once the gate admits them. A call
is preempted at most once, so every search call finishes, and its retry finds its prompt in
the prefix cache. With ``preempt_within_seconds``, only calls that started that recently
are aborted: an older call has decoded more, and an abort throws its decoding away.

``linger_seconds`` keeps the gate closed that long after the last plain request leaves.
Without it, every search call held back is released the moment a plain request ends, and
a client's next request, sent a fraction of a second later, lands among all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")


class FairGate:
    """Admits search calls by the number of sequences they run, plain requests at once."""

    def __init__(
        self,
        sequences_beside_plain: int = 0,
        linger_seconds: float = 0.0,
        *,
        preempt: bool = False,
        exclusive_seconds: float = 0.0,
        preempt_within_seconds: float = 0.0,
    ) -> None:
        self.sequences_beside_plain = sequences_beside_plain
        self.linger_seconds = linger_seconds
        self.preempt = preempt
        self.exclusive_seconds = exclusive_seconds
        self.preempt_within_seconds = preempt_within_seconds
        #: Search calls aborted for a plain request (and run again), since the start.
        self.preemptions = 0
        self._plain = 0
        self._plain_until = 0.0
        self._closed_since = 0.0
        self._search_sequences = 0
        #: Calls a plain request may abort, oldest first: their sequences and start times.
        self._preemptible: dict[asyncio.Task[object], tuple[int, float]] = {}
        self._preempted: set[asyncio.Task[object]] = set()
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
        if not self._closed():
            self._closed_since = time.monotonic()
        self._plain += 1
        if self.preempt:
            self._preempt_searches()
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
                wake_in = self._next_change_in()
                if wake_in is None:
                    await changed.wait()
                else:
                    # Nothing notifies when a linger or an exclusive spell ends: look then.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), wake_in)
            self._search_sequences += sequences
        try:
            yield
        finally:
            self._search_sequences -= sequences
            async with changed:
                changed.notify_all()

    async def run_search(self, sequences: int, call: Callable[[], Awaitable[T]]) -> T:
        """Run one search call at its turn. With :attr:`preempt`, a plain request arriving
        aborts it once, and it runs again, unpreemptible, at its next turn."""
        preemptible = self.preempt
        while True:
            async with self.search(sequences):
                attempt: asyncio.Task[T] = asyncio.ensure_future(call())
                if preemptible:
                    self._preemptible[attempt] = (sequences, time.monotonic())
                try:
                    return await attempt
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if attempt not in self._preempted or (current and current.cancelling()):
                        raise
                finally:
                    self._preemptible.pop(attempt, None)
                    self._preempted.discard(attempt)
            preemptible = False

    def _preempt_searches(self) -> None:
        """Abort the newest search calls until what is left fits beside plain requests."""
        excess = self._search_sequences - self.sequences_beside_plain
        window = self.preempt_within_seconds
        now = time.monotonic()
        for attempt, (sequences, started) in reversed(list(self._preemptible.items())):
            if excess <= 0 or (window > 0 and now - started > window):
                break  # older calls have done work an abort would throw away
            del self._preemptible[attempt]
            if attempt.cancel():
                self._preempted.add(attempt)
                self.preemptions += 1
                excess -= sequences

    def _admits(self, sequences: int) -> bool:
        if not self._closed():
            return True
        if self._search_sequences + sequences <= self.sequences_beside_plain:
            return True
        return self._search_sequences == 0 and self._exclusive_left() <= 0

    def _closed(self) -> bool:
        return self._plain > 0 or self._linger_left() > 0

    def _next_change_in(self) -> float | None:
        """Seconds until the gate may admit more without being notified (``None``: never)."""
        waits = []
        if self._plain == 0 and self._linger_left() > 0:
            waits.append(self._linger_left())
        if self._search_sequences == 0 and self._exclusive_left() > 0:
            waits.append(self._exclusive_left())
        return min(waits, default=None)

    def _linger_left(self) -> float:
        return self._plain_until - time.monotonic()

    def _exclusive_left(self) -> float:
        return self._closed_since + self.exclusive_seconds - time.monotonic()

    def _condition(self) -> asyncio.Condition:
        # Made on first use, inside the server's event loop.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed
