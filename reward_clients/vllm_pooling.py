"""A reward model served by vLLM's pooling runner, over its ``/classify`` endpoint.

``vllm serve <reward-model> --runner pooling`` serves ``POST /classify``. It accepts either
prompts (text or token ids, in a batch) or one chat (``messages``) per request. With a
configured tokenizer the client renders every candidate with the reward model's chat
template (in a worker thread) and sends the whole batch as token ids in one request;
without one it sends one ``messages`` request per candidate, concurrently, and lets the
server render them. ``use_activation: false`` makes vLLM return the raw logit instead of a
sigmoid/softmax.

The client may be given several replicas of the pooling server. Its calls then go through
a :class:`~engine.replicas.ReplicaPool`, balanced, retried and health-checked exactly as
the remote engine's: every call of one user request reaches one replica (round robin for
calls outside a request), a call that fails on one replica is tried on another, and a
replica that refuses connections leaves the rotation until its ``/health`` answers again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ttalign.engine.replicas import ReplicaPool
from ttalign.reward_clients.backend import (
    BackendReward,
    BackendSettings,
    ScoringItem,
    gather_or_cancel,
)
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.http import ReplicaJsonHttp
from ttalign.reward_clients.rendering import render_batch, render_ids

#: Seconds to wait for a connection to one replica before trying another (several URLs only).
CONNECT_TIMEOUT_SECONDS = 5.0


class VllmPoolingReward(BackendReward):
    """Scores with a sequence-classification reward model behind ``vllm serve --runner pooling``.

    Give exactly one of ``url`` (one server, or a router in front of several) and ``urls``
    (replicas this client balances over itself). The pool owns the retry policy: a failed
    attempt (refused, 429/5xx, or no answer within ``timeout_seconds``) is retried up to
    ``max_retries`` times after ``backoff_seconds`` (doubling), on another replica when one
    is left untried, and nothing repeats the call on top. ``health_check_interval`` is the seconds
    between checks of every replica's ``/health``. :attr:`pool` holds the replicas' state.
    """

    transport_retries = True

    def __init__(
        self,
        name: str,
        *,
        url: str | None = None,
        urls: Sequence[str] | None = None,
        model: str | None = None,
        tokenizer: str | None = None,
        label_index: int = 0,
        health_check_interval: float = 5.0,
        settings: BackendSettings | None = None,
        metrics: Any = None,
    ) -> None:
        if (url is None) == (urls is None):
            raise ValueError(f"{name}: give exactly one of url and urls")
        replicas = [u.rstrip("/") for u in ([url] if url is not None else urls or [])]
        super().__init__(name, settings, metrics)
        self.model = model
        self.label_index = label_index
        self._tokenizer_path = tokenizer
        self.pool = ReplicaPool(
            f"reward:{name}",
            replicas,
            retries=self.settings.max_retries,
            backoff_seconds=self.settings.backoff_seconds,
            health_interval=health_check_interval,
        )
        connect_timeout = CONNECT_TIMEOUT_SECONDS if len(replicas) > 1 else None
        self._http = ReplicaJsonHttp(
            name,
            self.pool,
            attempt_timeout=self.settings.timeout_seconds,
            connect_timeout=connect_timeout,
        )

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        if self._tokenizer_path is None:
            answers = await gather_or_cancel(
                *(
                    self._classify(
                        {"messages": item.messages(), "continue_final_message": item.partial}
                    )
                    for item in items
                )
            )
            return [self._label_score(a["data"][0]) for a in answers]
        ids = await render_batch(self._tokenizer_path, items, render_ids)
        answer = await self._classify({"input": ids})
        data = sorted(answer["data"], key=lambda d: d["index"])
        return [self._label_score(d) for d in data]

    async def _classify(self, body: dict[str, Any]) -> Any:
        payload: dict[str, Any] = {**body, "use_activation": False}
        if self.model is not None:
            payload["model"] = self.model
        if "messages" in body:
            payload["add_generation_prompt"] = False
        answer = await self._http.post("/classify", payload)
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            raise RewardClientError(self.name, "/classify answered without a data list")
        return answer

    def _label_score(self, datum: dict[str, Any]) -> float:
        probs = datum.get("probs") or []
        if len(probs) <= self.label_index:
            raise RewardClientError(
                self.name, f"/classify gave {len(probs)} labels; label_index is {self.label_index}"
            )
        return float(probs[self.label_index])

    async def close(self) -> None:
        await super().close()
        await self._http.close()
        await self.pool.close()
