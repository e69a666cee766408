"""One JSON-over-HTTP helper for the HTTP reward backends, mapping failures for retries.

Timeouts, refused connections and 429/502/503/504 answers become
:class:`~reward_clients.backend.TransientBackendError` (retried by the backend base); any
other error status becomes :class:`~reward_clients.base.RewardClientError` at once.
"""

from __future__ import annotations

from typing import Any

import httpx
from ttalign.reward_clients.backend import TransientBackendError
from ttalign.reward_clients.base import RewardClientError

#: Statuses that mean "busy or restarting", which a retry may get past.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
#: How much of an error body goes into the message.
ERROR_BODY_CHARS = 300


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
        if response.status_code in RETRYABLE_STATUSES:
            raise TransientBackendError("unavailable", f"{url} answered {response.status_code}")
        if response.status_code >= 400:
            body = response.text[:ERROR_BODY_CHARS]
            raise RewardClientError(self.client, f"{url} answered {response.status_code}: {body}")
        try:
            return response.json()
        except ValueError as exc:
            raise RewardClientError(self.client, f"{url} answered with invalid JSON") from exc

    async def close(self) -> None:
        await self._http.aclose()
