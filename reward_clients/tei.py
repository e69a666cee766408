"""A sequence-classifier reward model behind Text Embeddings Inference's ``POST /predict``.

TEI tokenizes itself, so the client renders each candidate with the reward model's chat
template as text (in a worker thread) and sends the batch as ``[[text], ...]``;
``raw_scores: true`` returns logits rather than softmax probabilities. TEI answers one list
of ``{label, score}`` per input; the configured ``label`` (or the only one) is the reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ttalign.reward_clients.backend import BackendReward, BackendSettings, ScoringItem
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.http import JsonHttp
from ttalign.reward_clients.rendering import render_batch, render_text


class TeiReward(BackendReward):
    """Scores with a classifier served by TEI (or any server speaking its ``/predict``)."""

    def __init__(
        self,
        name: str,
        *,
        url: str,
        tokenizer: str,
        label: str | None = None,
        settings: BackendSettings | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(name, settings, metrics)
        self.label = label
        self._tokenizer_path = tokenizer
        self._http = JsonHttp(name, url)

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        inputs = [[text] for text in await render_batch(self._tokenizer_path, items, render_text)]
        answer = await self._http.post(
            "/predict", {"inputs": inputs, "raw_scores": True, "truncate": True}
        )
        if not isinstance(answer, list):
            raise RewardClientError(self.name, "/predict did not answer with a list")
        return [self._pick(predictions) for predictions in answer]

    def _pick(self, predictions: Any) -> float:
        if not isinstance(predictions, list) or not predictions:
            raise RewardClientError(self.name, "/predict answered an empty prediction")
        if self.label is None:
            if len(predictions) != 1:
                raise RewardClientError(
                    self.name, "the model has several labels; configure which one is the reward"
                )
            return float(predictions[0]["score"])
        for prediction in predictions:
            if prediction.get("label") == self.label:
                return float(prediction["score"])
        raise RewardClientError(self.name, f"/predict gave no label {self.label!r}")

    async def close(self) -> None:
        await super().close()
        await self._http.close()
