"""A reward model run in-process with transformers' ``AutoModelForSequenceClassification``.

The model loads from a local folder on first use, in a worker thread, and every batch runs
in a worker thread too, so scoring never blocks the event loop. Inputs are the same chat
template token ids the vLLM pooling client sends, left-padded into one tensor per batch;
like transformers itself, the score is read at the last token that is not the pad token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from ttalign.reward_clients.backend import BackendReward, BackendSettings, ScoringItem
from ttalign.reward_clients.rendering import load_tokenizer, render_ids


class TransformersReward(BackendReward):
    """Scores with a local sequence-classification model on CPU or GPU."""

    def __init__(
        self,
        name: str,
        *,
        path: str,
        device: str = "auto",
        dtype: str = "float32",
        label_index: int = 0,
        settings: BackendSettings | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(name, settings, metrics)
        self.path = path
        self.device = device
        self.dtype = dtype
        self.label_index = label_index
        self._model: Any = None
        self._load_lock = threading.Lock()
        # One forward pass at a time: concurrent passes would only fight over the cores.
        self._run_lock = asyncio.Lock()

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        async with self._run_lock:
            return await asyncio.to_thread(self._forward, list(items))

    def _forward(self, items: list[ScoringItem]) -> list[float]:
        import torch

        model = self._loaded()
        tokenizer = load_tokenizer(self.path)
        ids = [render_ids(tokenizer, item) for item in items]
        width = max(len(row) for row in ids)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        # Left padding keeps every sequence's last token at the end (where the classifier
        # pools); explicit positions keep the padding from shifting the real tokens.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                position_ids=positions.to(model.device),
            ).logits
        return logits[:, self.label_index].float().cpu().tolist()

    def _loaded(self) -> Any:
        with self._load_lock:
            if self._model is None:
                import torch
                from transformers import AutoModelForSequenceClassification

                device = self.device
                if device == "auto":
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.path, dtype=getattr(torch, self.dtype)
                )
                self._model = model.to(device).eval()
            return self._model
