"""A reward model served by vLLM's pooling runner, over its ``/classify`` endpoint.

``vllm serve <reward-model> --runner pooling`` serves ``POST /classify``. It accepts either
prompts (text or token ids, in a batch) or one chat (``messages``) per request. With a
configured tokenizer the client renders every candidate with the reward model's chat
template (in a worker thread) and sends the whole batch as token ids in one request;
without one it sends one ``messages`` request per candidate, concurrently, and lets the
server render them. ``use_activation: false`` makes vLLM return the raw logit instead of a
sigmoid/softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ttalign.reward_clients.backend import (
    BackendReward,
    BackendSettings,
    ScoringItem,
    gather_or_cancel,
)
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.http import JsonHttp
from ttalign.reward_clients.rendering import render_batch, render_ids


class VllmPoolingReward(BackendReward):
    """Scores with a sequence-classification reward model behind ``vllm serve --runner pooling``."""

    def __init__(
        self,
        name: str,
        *,
        url: str,
        model: str | None = None,
        tokenizer: str | None = None,
        label_index: int = 0,
        settings: BackendSettings | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(name, settings, metrics)
        self.model = model
        self.label_index = label_index
        self._tokenizer_path = tokenizer
        self._http = JsonHttp(name, url)

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
