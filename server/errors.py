"""Errors in OpenAI's shape, and the one place exceptions become HTTP statuses.

Error tree::

    APIError                       any error a client should see, with status and param
    ├── InvalidRequestError        400: the request is malformed or out of range
    ├── ModelNotFoundError         404: the request names a model this server does not serve
    ├── RateLimitError             429: too many requests in flight (sent with Retry-After)
    ├── ServiceUnavailableError    503: the server is shutting down or the engine is unhealthy
    └── UpstreamError              502/503: a reward backend failed (names the client)
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ttalign.engine.base import EngineUnavailableError
from ttalign.reward_clients.base import RewardClientError, RewardTimeout, RewardUnavailable
from ttalign.reward_clients.registry import UnknownRewardError
from ttalign.reward_clients.rules import InvalidConstraintsError
from ttalign.strategies.errors import BudgetExhausted, InvalidStrategyRequest

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error reported to the client as ``{"error": {message, type, param, code}}``."""

    status_code: int = 500
    error_type: str = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str, served: str) -> None:
        super().__init__(
            f"The model {model!r} does not exist. This server serves {served!r}.",
            param="model",
            code="model_not_found",
        )


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, code="too_many_requests")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable_error"


class UpstreamError(APIError):
    """A reward backend failed; ``status_code`` is set per instance (502 or 503)."""

    error_type = "upstream_error"

    def __init__(self, message: str, *, status_code: int, code: str, client: str) -> None:
        super().__init__(message, param="reward", code=code)
        self.status_code = status_code
        self.client = client


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the :class:`APIError` the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RewardClientError):
        code = (
            "reward_timeout"
            if isinstance(exc, RewardTimeout)
            else "reward_unavailable"
            if isinstance(exc, RewardUnavailable)
            else "reward_error"
        )
        return UpstreamError(str(exc), status_code=exc.status_code, code=code, client=exc.client)
    if isinstance(exc, UnknownRewardError):
        return InvalidRequestError(str(exc), param="reward", code="unknown_reward")
    if isinstance(exc, InvalidConstraintsError):
        return InvalidRequestError(str(exc), param=exc.param, code="invalid_constraints")
    if isinstance(exc, InvalidStrategyRequest):
        return InvalidRequestError(str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, BudgetExhausted):
        # A step no strategy could stop short of (scoring the candidates it already has).
        return InvalidRequestError(
            f"The request needs more compute than its budget allows: {exc} "
            "(--max-request-engine-tokens, --max-request-candidates). Lower n, max_tokens or "
            "the strategy's size.",
            code="budget_exceeded",
        )
    if isinstance(exc, RequestValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, EngineUnavailableError):
        logger.error("engine unavailable: %s", exc, exc_info=exc.__cause__)
        return ServiceUnavailableError(str(exc), code="engine_unavailable")
    logger.error("unhandled error", exc_info=exc)
    # The message names the type but never the traceback: internals stay in the log.
    return APIError(
        f"The server hit an internal error ({type(exc).__name__}). It has been logged.",
        code="internal_error",
    )


def validation_error(errors: Any) -> InvalidRequestError:
    """Turn pydantic's error list into one 400 naming the first offending parameter."""
    if not errors:
        return InvalidRequestError("Invalid request.")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = _param_path(location) or None
    message = first.get("msg", "Invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InvalidRequestError(message, param=param, code="invalid_value")


def _param_path(location: list[str]) -> str:
    path = ""
    for part in location:
        if part.isdigit():
            path += f"[{part}]"
        elif part.startswith(("function-", "tagged-union", "literal[")) or "[" in part:
            continue  # pydantic's internal union labels mean nothing to clients
        else:
            path += f".{part}" if path else part
    return path


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for any exception."""
    api_error = to_api_error(exc)
    return JSONResponse(
        api_error.body(), status_code=api_error.status_code, headers=api_error.headers()
    )


def status_phrase(status: int) -> str:
    return HTTPStatus(status).phrase
