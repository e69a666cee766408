"""API keys: every ``/v1`` route requires ``Authorization: Bearer <key>`` when keys are set.

Keys come from ``--api-key`` and ``--api-key-file`` (one key per line, ``#`` starts a
comment). They are compared as SHA-256 digests in constant time, against every accepted key
so that timing reveals neither a key nor which one matched, and they never appear in logs or
error messages. ``/health`` and ``/metrics`` stay open unless ``auth_health_and_metrics``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from ttalign.server.errors import APIError, error_response
from ttalign.server.settings import ServerSettings

PROTECTED_PREFIX = "/v1"
OPERATIONS_PATHS = frozenset({"/health", "/metrics"})


class ApiKeyConfigError(ValueError):
    """The configured API keys cannot be used (unreadable or empty key file)."""


class AuthenticationError(APIError):
    """401, in the shape OpenAI sends for a missing or wrong key."""

    status_code = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


def load_api_keys(settings: ServerSettings) -> tuple[str, ...]:
    """Every accepted key: ``api_key`` plus the lines of ``api_key_file``. Empty: no auth."""
    keys = [settings.api_key.get_secret_value()] if settings.api_key else []
    if settings.api_key_file is not None:
        keys += _read_key_file(settings.api_key_file)
    if any(not key for key in keys):
        raise ApiKeyConfigError("the API key must not be empty")
    return tuple(keys)


def _read_key_file(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ApiKeyConfigError(f"cannot read the API key file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise ApiKeyConfigError(f"the API key file {path} holds no keys")
    return keys


class ApiKeyMiddleware:
    """Pure ASGI middleware answering 401 to protected requests without a valid key."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], *, protect_operations: bool) -> None:
        self.app = app
        self._digests = [_digest(key) for key in keys]
        self.protect_operations = protect_operations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._protects(scope["path"]):
            error = self._check(Headers(scope=scope).get("authorization"))
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _protects(self, path: str) -> bool:
        if path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"):
            return True
        return self.protect_operations and path in OPERATIONS_PATHS

    def _check(self, authorization: str | None) -> AuthenticationError | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthenticationError(
                "Missing API key. Send it in the Authorization header: 'Bearer <key>'."
            )
        digest = _digest(token.strip())
        matched = False
        for accepted in self._digests:
            matched |= hmac.compare_digest(digest, accepted)
        return None if matched else AuthenticationError("Incorrect API key provided.")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
