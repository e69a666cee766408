"""``POST /v1/rewards/score``: score candidate replies with a configured reward client.

Built once at start-up and kept on ``app.state``. A scoring call is admitted like a chat
completion (it can cost as much: the judge runs on the serving engine), is counted in the
request metrics, and is cancelled when its client disconnects.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from ttalign.reward_clients.base import RewardClient
from ttalign.reward_clients.registry import RewardRegistry
from ttalign.server.admission import Admission
from ttalign.server.disconnect import ClientDisconnected, cancel_on_disconnect
from ttalign.server.errors import APIError, InvalidRequestError, to_api_error
from ttalign.server.metrics import SCORE_ROUTE_LABEL, Metrics
from ttalign.server.protocol import ScoreRequest
from ttalign.server.serving import CLIENT_CLOSED_REQUEST, parse_body


class ScoreService:
    """Serves ``/v1/rewards/score`` for one server's reward registry."""

    def __init__(
        self,
        rewards: RewardRegistry,
        admission: Admission,
        metrics: Metrics,
        *,
        max_candidates: int,
    ) -> None:
        self.rewards = rewards
        self.admission = admission
        self.metrics = metrics
        self.max_candidates = max_candidates

    async def score(self, body: bytes, request: Request) -> dict[str, Any]:
        """Validate, admit and score one call; raises an APIError or ClientDisconnected."""
        started = time.monotonic()
        status = 200
        try:
            parsed = parse_body(body, ScoreRequest)
            client = self._client(parsed)
            self._admit()
            try:
                conversation = [{"role": m.role, "content": m.text()} for m in parsed.messages]
                scores = await cancel_on_disconnect(
                    request, client.score(conversation, parsed.candidates)
                )
            finally:
                self.admission.release()
                self.metrics.request_latency.labels(SCORE_ROUTE_LABEL).observe(
                    time.monotonic() - started
                )
            return {"object": "reward.scores", "reward": client.name, "scores": scores}
        except ClientDisconnected:
            status = CLIENT_CLOSED_REQUEST
            raise
        except Exception as exc:
            error = to_api_error(exc)
            status = error.status_code
            if error is exc:
                raise
            raise error from exc
        finally:
            self.metrics.requests.labels(SCORE_ROUTE_LABEL, str(status)).inc()

    def _client(self, parsed: ScoreRequest) -> RewardClient:
        if len(parsed.candidates) > self.max_candidates:
            raise InvalidRequestError(
                f"at most {self.max_candidates} candidates per call", param="candidates"
            )
        # Binding checks the constraints, so bad ones are a 400 before any admission.
        return self.rewards.get(parsed.reward, constraints=tuple(parsed.constraints or ()))

    def _admit(self) -> None:
        try:
            self.admission.acquire()
        except APIError as refusal:
            self.metrics.rejected.labels(refusal.code or "refused").inc()
            raise
