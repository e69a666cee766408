"""A weighted sum of other configured reward clients, each normalized within the batch.

Reward models answer on unrelated scales (a logit, a 1-9 rating, a 0-1 fraction), so each
component's scores are first normalized across the candidates of the call, then weighted::

    composite[i] = sum(weight_c * normalize(scores_c)[i])

Normalizations:

- ``zscore`` (default): ``(s - mean) / std``; all zeros when every candidate ties;
- ``minmax``: ``(s - min) / (max - min)``, into [0, 1]; all zeros when every candidate ties;
- ``none``: raw scores.

Normalizing within a batch makes the composite a ranking signal for the candidates of one
call: a lone candidate scores 0 under ``zscore`` and ``minmax``. Components are scored
concurrently; any component's failure fails the call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from reward_clients.backend import RewardMetrics
from reward_clients.base import Message, RewardClient
from reward_clients.registry import ConstraintAware

Normalization = Literal["zscore", "minmax", "none"]


def normalize(scores: Sequence[float], method: Normalization) -> list[float]:
    """``scores`` normalized within the batch by ``method``."""
    if method == "none" or not scores:
        return list(scores)
    if method == "minmax":
        low, high = min(scores), max(scores)
        span = high - low
        return [(s - low) / span if span > 0 else 0.0 for s in scores]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / std if std > 0 else 0.0 for s in scores]


def _bound(client: RewardClient, constraints: Sequence[dict[str, Any]]) -> RewardClient:
    return client.bind(constraints) if isinstance(client, ConstraintAware) else client


class CompositeReward:
    """``sum(weight * normalize(component scores))`` over named component clients."""

    def __init__(
        self,
        name: str,
        components: Mapping[str, tuple[RewardClient, float]],
        normalization: Normalization = "zscore",
        *,
        metrics: Any = None,
    ) -> None:
        if not components:
            raise ValueError("a composite reward needs at least one component")
        self.name = name
        self.components = dict(components)
        self.normalization = normalization
        self._metrics = metrics

    def bind(self, constraints: Sequence[dict[str, Any]]) -> CompositeReward:
        """This composite with constraint-aware components bound to ``constraints``."""
        bound = {
            key: (
                client.bind(constraints) if isinstance(client, ConstraintAware) else client,
                weight,
            )
            for key, (client, weight) in self.components.items()
        }
        return CompositeReward(self.name, bound, self.normalization, metrics=self._metrics)

    async def score(
        self, conversation: Sequence[Message], candidates: Sequence[str], *, partial: bool = False
    ) -> list[float]:
        started = time.monotonic()
        parts = await asyncio.gather(
            *(
                client.score(conversation, candidates, partial=partial)
                for client, _ in self.components.values()
            )
        )
        total = [0.0] * len(candidates)
        for (_, weight), scores in zip(self.components.values(), parts, strict=True):
            for i, value in enumerate(normalize(scores, self.normalization)):
                total[i] += weight * value
        RewardMetrics(self._metrics).record(
            self.name, "ok", time.monotonic() - started, len(candidates)
        )
        return total

    async def close(self) -> None:
        return None  # the components are closed by the registry that owns them
