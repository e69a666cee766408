"""The last line of error handling: every exception becomes an OpenAI-shaped response.

Starlette's ``ServerErrorMiddleware`` answers an unhandled exception and then re-raises it,
so uvicorn logs it a second time and closes the client's keep-alive connection. This
middleware sits inside it and never lets an exception escape while a response can still
be sent: the client gets :func:`server.errors.error_response` (a 500 only for real bugs,
whose traceback :func:`server.errors.to_api_error` logs once) and keeps its connection.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from ttalign.server.disconnect import ClientDisconnected
from ttalign.server.errors import error_response

logger = logging.getLogger(__name__)


class ErrorBoundaryMiddleware:
    """Pure ASGI middleware turning any exception into the client's error response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except (ClientDisconnect, ClientDisconnected):
            logger.debug("client disconnected from %s before its response", scope["path"])
        except Exception as exc:
            if response_started:
                # Half a response is on the wire: only closing the connection can end it,
                # and uvicorn does that (and logs the traceback) when the exception reaches it.
                raise
            await error_response(exc)(scope, receive, send)
