"""JSON-over-HTTP helpers for the HTTP reward backends, mapping failures for retries.

Both retry on the same answers (:func:`~engine.replicas.is_retryable_status`: a 429 or a
5xx) and on timeouts and refused connections; any other error status becomes
:class:`~reward_clients.base.RewardClientError` at once. Each call has one owner of its
retry policy:

- :class:`JsonHttp` talks to one base URL and raises
  :class:`~reward_clients.backend.TransientBackendError`, which the backend base retries.
- :class:`ReplicaJsonHttp` talks to a set of replicas through a
  :class:`~engine.replicas.ReplicaPool`, which owns the policy: each attempt, bounded by its
  own timeout, goes to another replica where one is left (one that refused the connection
  leaves the rotation until its health route answers). When the pool runs out of attempts,
  the call fails for good (:class:`~reward_clients.base.RewardUnavailable`): nothing retries
  it again on top.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from ttalign.engine.replicas import (
    ERROR_BODY_CHARS,
    Replica,
    ReplicaFailure,
    ReplicaPool,
    ReplicasExhausted,
    is_retryable_status,
    transport_failure,
)
from ttalign.reward_clients.backend import TransientBackendError
from ttalign.reward_clients.base import RewardClientError, RewardUnavailable


class JsonHttp:
    """POSTs JSON to one base URL with a pooled connection."""

    def __init__(
        self, client: str, base_url: str, *, headers: dict[str, str] | None = None
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        # The backend base enforces the per-call timeout; httpx's own is only a backstop.
        self._http = httpx.AsyncClient(timeout=None, headers=headers)

    async def post(self, path: str, payload: dict[str, Any]) -> Any:
        """The decoded JSON answer of ``POST base_url + path``."""
        url = f"{self.base_url}{path}"
        try:
            response = await self._http.post(url, json=payload)
        except httpx.TimeoutException as exc:
            raise TransientBackendError("timeout", f"{url}: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise TransientBackendError(
                "unavailable", f"{url}: {exc or type(exc).__name__}"
            ) from exc
        if is_retryable_status(response.status_code):
            raise TransientBackendError("unavailable", f"{url} answered {response.status_code}")
        return _decoded(self.client, url, response)

    async def close(self) -> None:
        await self._http.aclose()


class ReplicaJsonHttp:
    """POSTs JSON to whichever replica of ``pool`` serves the call."""

    def __init__(
        self,
        client: str,
        pool: ReplicaPool,
        *,
        attempt_timeout: float | None = None,
        connect_timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.pool = pool
        self._attempt_timeout = attempt_timeout
        # The backend base bounds the whole call. A connect timeout of its own lets a call
        # to an unreachable replica move on to another one within that bound.
        timeout = httpx.Timeout(None, connect=connect_timeout)
        self._http = httpx.AsyncClient(timeout=timeout, headers=headers)

    async def post(self, path: str, payload: dict[str, Any]) -> Any:
        """The decoded JSON answer of ``POST path`` from the first replica to serve it."""

        async def attempt(replica: Replica, headers: dict[str, str]) -> Any:
            url = f"{replica.url}{path}"
            try:
                response = await asyncio.wait_for(
                    self._http.post(url, json=payload, headers=headers), self._attempt_timeout
                )
            except httpx.HTTPError as exc:
                raise transport_failure(replica.url, exc) from exc
            except TimeoutError:
                raise ReplicaFailure(f"{url}: no answer within {self._attempt_timeout} s") from None
            if is_retryable_status(response.status_code):
                body = response.text[:ERROR_BODY_CHARS]
                raise ReplicaFailure(f"{url} answered {response.status_code}: {body}")
            return _decoded(self.client, url, response)

        try:
            return await self.pool.call(attempt)
        except ReplicasExhausted as exc:
            raise RewardUnavailable(self.client, str(exc)) from None

    async def close(self) -> None:
        """Close the connections (the pool is its owner's to close)."""
        await self._http.aclose()


def _decoded(client: str, url: str, response: httpx.Response) -> Any:
    """The JSON body of a non-retryable answer; a ``RewardClientError`` for an error status."""
    if response.status_code >= 400:
        body = response.text[:ERROR_BODY_CHARS]
        raise RewardClientError(client, f"{url} answered {response.status_code}: {body}")
    try:
        return response.json()
    except ValueError as exc:
        raise RewardClientError(client, f"{url} answered with invalid JSON") from exc
