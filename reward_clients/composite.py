"""A weighted sum of other configured reward clients, each normalized to a common scale.

Reward models answer on unrelated scales (a logit, a 1-9 rating, a 0-1 fraction), so each
component's scores are first normalized, then weighted::

    composite[i] = sum(weight_c * normalize_c(scores_c)[i])

Normalizations (:mod:`reward_clients.normalization`): ``zscore`` (default), ``minmax`` or
``none`` (raw scores).

**Calibration is per request.** The registry binds a composite once per request lookup
(:meth:`CompositeReward.bind`), and the bound composite keeps one
:class:`~reward_clients.normalization.Scaler` per component for all of its calls. Each
scaler fixes its center on the component's first call (mean for ``zscore``, minimum for
``minmax``) and its scale on the first call in which the component's scores differ from
that center (their root mean square, or largest, distance from it); both then stay fixed.
So within a request equal raw component scores always give equal composite scores, and a
multi-round strategy (TPO) can compare candidates scored in different calls. When the first
call has spread, the parameters are exactly that call's z-score (population standard
deviation) or min-max ones; a lone candidate, or a call where all tie, scores 0 until a
later call brings spread. ``POST /v1/rewards/score`` is one call, calibrated on itself.

An unbound composite (one not obtained from :meth:`CompositeReward.bind`) calibrates each
call afresh on that call alone. Components are scored concurrently; any component's
failure fails the call (and cancels the other components' work).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ttalign.reward_clients.backend import RewardMetrics, gather_or_cancel
from ttalign.reward_clients.base import Message, RewardClient
from ttalign.reward_clients.normalization import Normalization, Scaler, normalize
from ttalign.reward_clients.registry import ConstraintAware

__all__ = ["CompositeReward", "Normalization", "normalize"]


class CompositeReward:
    """``sum(weight * normalize(component scores))`` over named component clients."""

    def __init__(
        self,
        name: str,
        components: Mapping[str, tuple[RewardClient, float]],
        normalization: Normalization = "zscore",
        *,
        metrics: Any = None,
        per_request: bool = False,
    ) -> None:
        """``per_request``: keep one calibration for every call (what :meth:`bind` makes)."""
        if not components:
            raise ValueError("a composite reward needs at least one component")
        self.name = name
        self.components = dict(components)
        self.normalization = normalization
        self._metrics = metrics
        self._scalers = (
            {key: Scaler(normalization) for key in self.components} if per_request else None
        )

    def bind(self, constraints: Sequence[dict[str, Any]]) -> CompositeReward:
        """A per-request composite: one calibration for all its calls, components bound.

        Constraint-aware components (rule verifiers, nested composites) are bound to
        ``constraints``; the others are shared as they are.
        """
        bound = {
            key: (
                client.bind(constraints) if isinstance(client, ConstraintAware) else client,
                weight,
            )
            for key, (client, weight) in self.components.items()
        }
        return CompositeReward(
            self.name, bound, self.normalization, metrics=self._metrics, per_request=True
        )

    async def score(
        self, conversation: Sequence[Message], candidates: Sequence[str], *, partial: bool = False
    ) -> list[float]:
        started = time.monotonic()
        parts = await gather_or_cancel(
            *(
                client.score(conversation, candidates, partial=partial)
                for client, _ in self.components.values()
            )
        )
        scalers = self._scalers or {key: Scaler(self.normalization) for key in self.components}
        total = [0.0] * len(candidates)
        for (key, (_, weight)), scores in zip(self.components.items(), parts, strict=True):
            for i, value in enumerate(scalers[key](scores)):
                total[i] += weight * value
        RewardMetrics(self._metrics).record(
            self.name, "ok", time.monotonic() - started, len(candidates)
        )
        return total

    async def close(self) -> None:
        return None  # the components are closed by the registry that owns them
