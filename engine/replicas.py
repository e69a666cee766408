"""A set of interchangeable upstream servers: routing, retries and health checks.

Used by the remote engine (vLLM OpenAI servers) and by the reward clients of vLLM pooling
servers, so both balance, retry and evict the same way.

**Routing.** ``consistent_hash`` (the default) ranks the healthy replicas for a request's
affinity key by rendezvous hashing (highest random weight) and takes the first one whose
load is under the bound of *consistent hashing with bounded loads* (Mirrokni, Thorup and
Zadimoghaddam, 2018): no replica holds more than ``balance_factor`` times the average
number of active requests. The chosen replica is pinned for the rest of the request, so
every call of one request reaches one replica and its prefix cache. When a replica leaves,
only the requests ranked on it move. The hash is ``blake2b``, not Python's salted
``hash()``, so every gateway process ranks alike and gateways scale out statelessly.
``round_robin`` ignores the key and rotates per call (the baseline the affinity benchmark
compares against).

**Failures.** A call that cannot connect, times out, or gets a 5xx is retried on the next
replica in the ranking, at most ``retries`` times, with exponential backoff. A replica that
refuses connections or drops one mid-call leaves the rotation at once; the health loop
polls every replica's health route and brings it back when it answers 200 again. A health
check that is refused or answered with an error status evicts at once, but one that only
times out counts as a miss: a replica busy enough to answer its health route late is still
serving, so it leaves after ``HEALTH_MISSES_TO_EVICT`` misses in a row. A call still waiting
on a replica when it leaves the rotation (before any of its output was passed on) is
cancelled and moves to the next replica, so a hung replica costs its callers a few health
rounds, not a read timeout sized for long generations.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Literal, TypeVar

import httpx
from ttalign.engine.routing import (
    RequestRouting,
    current_routing,
    note_replica,
    upstream_call,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Routing = Literal["consistent_hash", "round_robin"]

#: How much of an upstream error body goes into a message (engine and reward clients alike).
ERROR_BODY_CHARS = 300
#: Seconds to wait for a health route's answer. Not tied to the check interval: a loaded
#: vLLM server on few cores can take seconds to answer while it serves normally.
HEALTH_TIMEOUT_SECONDS = 5.0
#: Timed-out health checks in a row that take a replica out of the rotation.
HEALTH_MISSES_TO_EVICT = 3


class Replica:
    """One upstream server and what the pool has seen of it.

    Setting ``healthy`` to false takes it out of the rotation and wakes
    :meth:`departure`'s waiters, so calls still waiting on it can move elsewhere.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        #: Calls sent to it.
        self.requests = 0
        #: Calls that failed for the replica's reasons (connection, timeout, 5xx).
        self.errors = 0
        #: Failed calls that were then retried on another replica.
        self.retries = 0
        #: User requests pinned to it right now (the load bounded hashing balances).
        self.active = 0
        self.last_error = ""
        #: Health checks that timed out since the last answer.
        self.health_misses = 0
        self._healthy = True
        self._departed = asyncio.Event()

    @property
    def healthy(self) -> bool:
        """Whether it is in the rotation."""
        return self._healthy

    @healthy.setter
    def healthy(self, healthy: bool) -> None:
        if self._healthy and not healthy:
            self._departed.set()
        elif healthy and not self._healthy:
            self._departed = asyncio.Event()  # a new stint; old waiters stay woken
        self._healthy = healthy

    def departure(self) -> asyncio.Event:
        """Set when the replica leaves the rotation it is in now."""
        return self._departed

    def __repr__(self) -> str:
        return f"Replica({self.url!r}, healthy={self._healthy}, active={self.active})"


class ReplicaFailure(Exception):
    """A call failed for the replica's reasons; another replica may serve it.

    ``down`` means the replica itself is gone (refused or dropped the connection), so it
    leaves the rotation until its health route answers again.
    """

    def __init__(self, detail: str, *, down: bool = False) -> None:
        super().__init__(detail)
        self.down = down


class ReplicasExhausted(Exception):
    """Every attempt failed; the message names the pool and the last failure."""


class StreamInterrupted(Exception):
    """A replica failed after part of a stream had been passed on; the message says how."""


def is_retryable_status(status: int) -> bool:
    """Upstream statuses another replica may not repeat: 5xx, and 429 (busy)."""
    return status >= 500 or status == 429


def transport_failure(url: str, exc: httpx.HTTPError) -> ReplicaFailure:
    """The :class:`ReplicaFailure` for an httpx transport error talking to ``url``."""
    detail = f"{url}: {type(exc).__name__}{f': {exc}' if str(exc) else ''}"
    # Refused, reset or cut connections mean the server is gone; a timeout may be load.
    down = isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError)
    return ReplicaFailure(detail, down=down)


def header_safe(key: str) -> str:
    """``key`` as a header value: itself when it is printable ASCII, else a stable digest.

    httpx sends header values as ASCII, but a client's session header (Latin-1 on the wire)
    may hold any character; the digest keeps every call of the key on the same value.
    """
    if key.isascii() and key.isprintable():
        return key
    return hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=16).hexdigest()


def rendezvous_rank(key: str, replicas: Sequence[Replica]) -> list[Replica]:
    """``replicas`` ordered by their rendezvous weight for ``key``, highest first."""

    def weight(replica: Replica) -> int:
        digest = hashlib.blake2b(f"{key}\0{replica.url}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    return sorted(replicas, key=weight, reverse=True)


class ReplicaPool:
    """Routes calls over ``urls``; see the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        *,
        routing: Routing = "consistent_hash",
        retries: int = 2,
        backoff_seconds: float = 0.2,
        health_interval: float = 5.0,
        health_path: str = "/health",
        balance_factor: float = 1.25,
        session_header: str | None = "X-Session-ID",
    ) -> None:
        if not urls:
            raise ValueError(f"{name}: no replica URLs given")
        if len(set(urls)) != len(urls):
            raise ValueError(f"{name}: a replica URL is listed twice")
        if balance_factor < 1:
            raise ValueError(f"{name}: balance_factor must be at least 1")
        self.name = name
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self.routing = routing
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.health_interval = health_interval
        self.health_path = health_path
        self.balance_factor = balance_factor
        self.session_header = session_header
        self._turn = itertools.count()
        self._health_task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    # --- routing --------------------------------------------------------------------------

    def attempts(self) -> Iterator[tuple[Replica, dict[str, str]]]:
        """The replicas to try for one call, in order, each with the headers to send.

        Yields at most ``retries + 1`` times. Re-ranks between attempts, so a replica that
        failed (and left the rotation) is not tried again while others are healthy.
        """
        self.start_health_checks()
        routing = current_routing()
        key = routing.key if routing is not None else None
        session = header_safe(key) if key is not None else uuid.uuid4().hex
        tried: set[str] = set()
        for _ in range(self.retries + 1):
            replica = self._choose(key, tried)
            tried.add(replica.url)
            note_replica(replica.url)
            yield replica, self._headers(session, routing)

    def _headers(self, session: str, routing: RequestRouting | None) -> dict[str, str]:
        # A fresh request id per attempt: a retry may reach a replica that still holds
        # the failed attempt.
        headers = {"X-Request-Id": f"{session}-{uuid.uuid4().hex[:8]}"}
        if self.session_header:
            headers[self.session_header] = session
        if routing is not None:
            headers.update(routing.trace_headers)
        return headers

    def _choose(self, key: str | None, tried: set[str]) -> Replica:
        healthy = [r for r in self.replicas if r.healthy and r.url not in tried]
        fresh = healthy or [r for r in self.replicas if r.url not in tried]
        # Health may be stale: with every replica marked down or tried, try them anyway.
        candidates = fresh or self.replicas
        if self.routing == "round_robin" or key is None:
            return candidates[next(self._turn) % len(candidates)]
        routing = current_routing()
        if routing is not None and routing.closed:
            routing = None  # its request has ended: route by key, pin nothing
        pinned = routing.pins.get(self.name) if routing is not None else None
        if pinned is not None and pinned in candidates and (pinned.healthy or not healthy):
            return pinned
        choice = self._bounded_choice(key, candidates)
        if routing is not None:
            self._pin(routing, choice)
        return choice

    def _bounded_choice(self, key: str, candidates: Sequence[Replica]) -> Replica:
        ranked = rendezvous_rank(key, candidates)
        load = sum(r.active for r in candidates)
        bound = math.ceil(self.balance_factor * (load + 1) / len(candidates))
        return next((r for r in ranked if r.active < bound), ranked[0])

    def _pin(self, routing: RequestRouting, replica: Replica) -> None:
        previous = routing.pins.get(self.name)
        if previous is not None:
            previous.active -= 1
        else:
            routing.on_exit(lambda: self._unpin(routing))
        routing.pins[self.name] = replica
        replica.active += 1

    def _unpin(self, routing: RequestRouting) -> None:
        replica = routing.pins.pop(self.name, None)
        if replica is not None:
            replica.active -= 1

    # --- calls ----------------------------------------------------------------------------

    async def call(self, attempt: Callable[[Replica, dict[str, str]], Awaitable[T]]) -> T:
        """``attempt`` on the first replica that serves it; :class:`ReplicasExhausted` if none.

        ``attempt`` raises :class:`ReplicaFailure` for failures another replica may not
        repeat; anything else propagates at once.
        """
        last: ReplicaFailure | None = None
        for number, (replica, headers) in enumerate(self.attempts()):
            await self._before_attempt(number, replica)
            try:
                with upstream_call():
                    return await self._while_in_rotation(replica, attempt(replica, headers))
            except ReplicaFailure as failure:
                self.failed(replica, failure, will_retry=number < self.retries)
                last = failure
        raise self.exhausted(last)

    async def stream(
        self, attempt: Callable[[Replica, dict[str, str]], AsyncIterator[T]]
    ) -> AsyncIterator[T]:
        """The items of ``attempt`` from the first replica that serves it.

        A :class:`ReplicaFailure` before the first item moves on to another replica, as in
        :meth:`call`; one after it is raised as :class:`StreamInterrupted`, since another
        replica would not continue what was already passed on. Closing this stream closes
        the attempt's at once (so the upstream request ends then, not at garbage collection).
        """
        last: ReplicaFailure | None = None
        for number, (replica, headers) in enumerate(self.attempts()):
            await self._before_attempt(number, replica)
            started = False
            try:
                with upstream_call():
                    async with aclosing(attempt(replica, headers)) as items:
                        # Until the first item a retry is still possible, so a replica
                        # that leaves the rotation meanwhile is given up on.
                        try:
                            first = await self._while_in_rotation(replica, anext(items))
                        except StopAsyncIteration:
                            return
                        started = True
                        yield first
                        async for item in items:
                            yield item
                return
            except ReplicaFailure as failure:
                self.failed(replica, failure, will_retry=not started and number < self.retries)
                if started:
                    raise StreamInterrupted(str(failure)) from failure
                last = failure
        raise self.exhausted(last)

    async def _while_in_rotation(self, replica: Replica, work: Awaitable[T]) -> T:
        """``work``'s result, unless ``replica`` leaves the rotation first.

        Then ``work`` is cancelled, which closes its connection (so the replica drops the
        request, if it still can), and a :class:`ReplicaFailure` lets the call move on. A
        replica that hangs is caught by its health checks long before a read timeout that
        has to allow for long generations. A call sent to a replica already out of the
        rotation (every one was) is not watched.
        """
        if not replica.healthy:
            return await work
        task = asyncio.ensure_future(work)
        departed = asyncio.ensure_future(replica.departure().wait())
        try:
            done, _ = await asyncio.wait({task, departed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            departed.cancel()
            if not task.done():  # the replica left, or this call itself was cancelled
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task in done:
            return task.result()
        raise ReplicaFailure(
            f"{replica.url}: left the rotation while the call waited ({replica.last_error})",
            down=True,
        )

    async def _before_attempt(self, number: int, replica: Replica) -> None:
        if number:
            await asyncio.sleep(self.backoff(number))
        replica.requests += 1

    def backoff(self, attempt_number: int) -> float:
        """Seconds to wait before attempt ``attempt_number`` (1 = the first retry)."""
        return self.backoff_seconds * 2 ** (attempt_number - 1)

    def failed(self, replica: Replica, failure: ReplicaFailure, *, will_retry: bool) -> None:
        """Note a failed call on ``replica`` (evicting it if it is down)."""
        replica.errors += 1
        replica.last_error = str(failure)
        if will_retry:
            replica.retries += 1
        if failure.down and replica.healthy:
            replica.healthy = False
            logger.warning("%s: replica %s left the rotation: %s", self.name, replica.url, failure)

    def exhausted(self, last: ReplicaFailure | None) -> ReplicasExhausted:
        tries = self.retries + 1
        return ReplicasExhausted(
            f"no replica of {self.name} could serve the call after {tries} attempt"
            f"{'s' if tries > 1 else ''} (last failure: {last})"
        )

    # --- health ---------------------------------------------------------------------------

    @property
    def healthy_count(self) -> int:
        return sum(r.healthy for r in self.replicas)

    async def check_health(self) -> None:
        """Poll every replica's health route once, updating the rotation."""
        http = self._client()
        await asyncio.gather(*(self._check(http, r) for r in self.replicas))

    async def _check(self, http: httpx.AsyncClient, replica: Replica) -> None:
        try:
            response = await http.get(
                f"{replica.url}{self.health_path}", timeout=HEALTH_TIMEOUT_SECONDS
            )
        except httpx.TimeoutException as exc:
            replica.health_misses += 1
            healthy = replica.health_misses < HEALTH_MISSES_TO_EVICT and replica.healthy
            detail = f"health check: {type(exc).__name__} {replica.health_misses} times in a row"
        except httpx.HTTPError as exc:
            healthy, detail = False, f"health check: {type(exc).__name__}"
        else:
            replica.health_misses = 0
            healthy, detail = response.status_code == 200, f"health {response.status_code}"
        if healthy and not replica.healthy:
            logger.info("%s: replica %s rejoined the rotation", self.name, replica.url)
        elif not healthy and replica.healthy:
            logger.warning("%s: replica %s left the rotation (%s)", self.name, replica.url, detail)
            replica.last_error = detail
        replica.healthy = healthy

    def start_health_checks(self) -> None:
        """Start the health loop on the running event loop (no-op if running or no loop)."""
        if self._health_task is not None and not self._health_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._health_task = loop.create_task(self._health_loop(), name=f"health-{self.name}")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_health()
            except Exception:  # never let one bad round stop the checks
                logger.exception("%s: health check round failed", self.name)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient()
        return self._http

    async def close(self) -> None:
        """Stop the health loop and close its connections."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    def snapshot(self) -> list[dict[str, object]]:
        """Each replica's state and counters (for ``/health`` and ``/metrics``)."""
        return [
            {
                "url": r.url,
                "healthy": r.healthy,
                "requests": r.requests,
                "errors": r.errors,
                "retries": r.retries,
                "active_requests": r.active,
                "last_error": r.last_error,
            }
            for r in self.replicas
        ]
