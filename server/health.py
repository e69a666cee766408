"""``GET /health``: cheap, bounded in time, and never an exception.

Load balancers poll it every few seconds, so it only asks the engine whether it is alive
(no generation) and waits at most :data:`ENGINE_CHECK_SECONDS` for the answer. Any failure
is reported as an unhealthy engine, never as a 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ttalign.engine.base import EngineClient, EngineHealth
from ttalign.server.admission import Admission

logger = logging.getLogger(__name__)

ENGINE_CHECK_SECONDS = 5.0


async def health_report(engine: EngineClient, admission: Admission) -> tuple[int, dict[str, Any]]:
    """The status code (200 or 503) and body of ``/health``."""
    engine_health = await _engine_health(engine)
    healthy = engine_health.healthy and not admission.draining
    body = {
        "status": "ok" if healthy else "unavailable",
        "engine": {
            "healthy": engine_health.healthy,
            "running_requests": engine_health.running_requests,
            "detail": engine_health.detail,
            **engine_health.extra,
        },
        "requests_in_flight": admission.in_flight,
        "draining": admission.draining,
    }
    return (200 if healthy else 503), body


async def _engine_health(engine: EngineClient) -> EngineHealth:
    try:
        return await asyncio.wait_for(engine.health(), ENGINE_CHECK_SECONDS)
    except TimeoutError:
        return EngineHealth(False, 0, detail=f"no answer within {ENGINE_CHECK_SECONDS} s")
    except Exception as exc:
        logger.warning("engine health check failed", exc_info=exc)
        return EngineHealth(False, 0, detail=type(exc).__name__)
