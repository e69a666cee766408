"""Which user request an upstream call belongs to, and how long it waited on upstreams.

The server opens a :func:`request_routing` scope around each request. Everything the
request's strategy does runs inside it (tasks copy the context they start in), so a remote
engine or reward client can send all of one request's calls to the same replica without
any layer in between passing the key along. Calls made outside a scope (warm-up,
micro-batched reward calls shared by several requests) carry no key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRouting:
    """One user request's routing state: its affinity key, pins, and upstream time."""

    key: str
    started: float = field(default_factory=time.monotonic)
    #: The replica each pool pinned this request to (pool name -> replica), so every call
    #: of the request reaches the same one while it stays healthy.
    pins: dict[str, Any] = field(default_factory=dict)
    _in_flight: int = 0
    _busy_since: float = 0.0
    #: Seconds during which at least one upstream call of this request was in flight.
    upstream_seconds: float = 0.0
    _on_exit: list[Callable[[], None]] = field(default_factory=list)
    #: The scope has closed: its pins are released, and no new pin may be taken in it (a
    #: call still running in a copy of its context must not pin a replica for ever).
    closed: bool = False
    #: Where reward clients meter the engine calls they make for this request (a
    #: :class:`~ttalign.engine.metering.ScoringMeter`; ``None``: not metered).
    scoring_meter: Any = None
    #: W3C trace-context headers every upstream call of the request carries, so that a
    #: replica's own spans join the request's trace.
    trace_headers: dict[str, str] = field(default_factory=dict)

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the request's scope closes (e.g. to release a pin)."""
        self._on_exit.append(callback)

    @contextmanager
    def upstream_call(self) -> Iterator[None]:
        """Count the enclosed block as time spent waiting on an upstream server."""
        if self._in_flight == 0:
            self._busy_since = time.monotonic()
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.upstream_seconds += time.monotonic() - self._busy_since

    def overhead_seconds(self) -> float:
        """Time so far not covered by any upstream call: the gateway's own share."""
        busy = self.upstream_seconds
        if self._in_flight:
            busy += time.monotonic() - self._busy_since
        return max(0.0, time.monotonic() - self.started - busy)


_current: ContextVar[RequestRouting | None] = ContextVar("ttalign_request_routing", default=None)


def current_routing() -> RequestRouting | None:
    """The routing scope of the request being served here, if any."""
    return _current.get()


@contextmanager
def request_routing(key: str) -> Iterator[RequestRouting]:
    """Route every upstream call made inside the block as part of request ``key``."""
    routing = RequestRouting(key)
    token = _current.set(routing)
    try:
        yield routing
    finally:
        routing.closed = True
        for callback in routing._on_exit:
            callback()
        # A stream finalized from another context cannot reset the variable there.
        with suppress(ValueError):
            _current.reset(token)


@contextmanager
def upstream_call() -> Iterator[None]:
    """Mark an upstream call of the current request (a no-op outside a routing scope)."""
    routing = _current.get()
    if routing is None:
        yield
        return
    with routing.upstream_call():
        yield


@dataclass
class CallNote:
    """What the engine noted about one call: the replica that answered it."""

    replica: str | None = None


_call_note: ContextVar[CallNote | None] = ContextVar("ttalign_call_note", default=None)


@contextmanager
def noting_call() -> Iterator[CallNote]:
    """Collect what the engine notes about the call made inside the block."""
    note = CallNote()
    token = _call_note.set(note)
    try:
        yield note
    finally:
        # A stream finalized from another context cannot reset the variable there.
        with suppress(ValueError):
            _call_note.reset(token)


def note_replica(url: str) -> None:
    """Record that ``url`` is answering the current call (a no-op when nobody asks)."""
    note = _call_note.get()
    if note is not None:
        note.replica = url
