"""Keep a quiet event stream alive while a search runs.

A streamed search sends nothing until it has an answer, which can take minutes; proxies
and clients with read timeouts drop such a connection as dead. :func:`with_keepalive`
sends a keep-alive frame at once and again whenever ``interval`` seconds pass without a
frame of the stream's own. The caller picks the frame (see ``server.app`` for why ttalign
sends an empty chunk rather than an SSE comment).

The inner stream runs in one producer task from start to end (so its cancel scopes and
context variables stay in one task) and hands its frames over one at a time. Closing or
cancelling the wrapper cancels that task, which closes the inner stream with ``aclose()``
and so aborts its engine work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class _Failed:
    error: Exception


_END = object()


async def with_keepalive(
    frames: AsyncIterator[str], interval: float, keepalive: str
) -> AsyncIterator[str]:
    """Yield ``frames``, sending ``keepalive`` first and after each ``interval`` s of silence."""
    handoff: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
    producer = asyncio.ensure_future(_produce(frames, handoff))
    getter: asyncio.Future[object] | None = None
    try:
        yield keepalive
        while True:
            # One pending get() is reused across timeouts, so no frame is ever lost.
            getter = getter or asyncio.ensure_future(handoff.get())
            done, _ = await asyncio.wait({getter}, timeout=interval)
            if not done:
                yield keepalive
                continue
            item, getter = getter.result(), None
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        if getter is not None:
            getter.cancel()
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


async def _produce(frames: AsyncIterator[str], handoff: asyncio.Queue[object]) -> None:
    """Move every frame of ``frames`` into ``handoff``, then the end marker or the error."""
    try:
        async for frame in frames:
            await handoff.put(frame)
    except Exception as exc:
        await handoff.put(_Failed(exc))
    else:
        await handoff.put(_END)
    finally:
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()
