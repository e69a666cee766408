"""Admission control: a cap on requests in flight, and draining for graceful shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ttalign.server.errors import RateLimitError, ServiceUnavailableError


class Admission:
    """Admits up to ``limit`` concurrent requests; refuses the rest at once with a 429."""

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        """Admit one request or raise; pair every success with :meth:`release`."""
        if self.draining:
            raise ServiceUnavailableError(
                "The server is shutting down and accepts no new requests.", code="shutting_down"
            )
        if self.in_flight >= self.limit:
            raise RateLimitError(
                f"Too many requests in flight (limit {self.limit}). Retry after "
                f"{self.retry_after} s.",
                retry_after=self.retry_after,
            )
        self.in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait for those in flight; False if time ran out."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
