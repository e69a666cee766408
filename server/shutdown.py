"""Graceful shutdown that clients can see.

uvicorn's own shutdown closes the listener first, so a client never learns that the
server is going away: its next connection is simply refused. :class:`DrainingServer`
changes the order. On the first SIGTERM or SIGINT it keeps listening and runs ``drain``
(which refuses new requests with 503 ``shutting_down``, turns ``/health`` to 503, and
waits for the requests in flight up to the grace period); only then does uvicorn close
the listener, cancel whatever is still running and run the app's lifespan shutdown, which
stops the engine. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)

#: After draining, how long uvicorn lets finished responses flush before cancelling.
FLUSH_SECONDS = 1.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the app before the listener closes."""

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], Awaitable[object]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only set flags here; the event loop acts on them.
        self._captured_signals.append(sig)
        if self._drain_requested:
            logger.warning("second exit signal: exiting without waiting")
            self.force_exit = True
            self.should_exit = True
        else:
            self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        logger.info("shutting down: refusing new requests, finishing those in flight")
        try:
            await self._drain()
        except Exception:
            logger.exception("draining failed; shutting down now")
        finally:
            self.should_exit = True
