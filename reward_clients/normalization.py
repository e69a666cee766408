"""Put one reward component's scores on a common scale, with parameters fixed once.

A :class:`Scaler` maps a raw score ``s`` to ``(s - center) / scale``. Its parameters are set
from the first scores it sees, then never change, so equal raw scores always map to equal
normalized scores, whichever call they came in:

- ``center`` is set by the first call: its mean (``zscore``) or its minimum (``minmax``);
- ``scale`` is set by the first call in which some score differs from ``center``: the root
  mean square distance of that call's scores from ``center`` (``zscore``) or the largest
  distance (``minmax``). When the first call has spread this is exactly the familiar
  z-score (population standard deviation) or min-max normalization of that call.
- Until ``scale`` is set, every score seen equals ``center`` and maps to 0.

Scores of later calls may fall outside the range of the calibrating call (below 0 or above
1 under ``minmax``). ``none`` passes raw scores through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Normalization = Literal["zscore", "minmax", "none"]


class Scaler:
    """One component's normalization, calibrated by the first scores it is given."""

    def __init__(self, method: Normalization) -> None:
        self.method = method
        self.center: float | None = None
        self.scale: float | None = None

    def __call__(self, scores: Sequence[float]) -> list[float]:
        """``scores`` normalized; the first calls fix the parameters (see the module doc)."""
        if self.method == "none" or not scores:
            return list(scores)
        low, high = min(scores), max(scores)
        if self.center is None:
            # A tied call's center is the tied value itself, not a mean off by rounding.
            tied = low == high
            self.center = low if tied or self.method == "minmax" else sum(scores) / len(scores)
        if self.scale is None:
            self.scale = self._spread(scores, self.center) or None
        if self.scale is None:
            return [0.0] * len(scores)
        return [(s - self.center) / self.scale for s in scores]

    def _spread(self, scores: Sequence[float], center: float) -> float:
        distances = [abs(s - center) for s in scores]
        if self.method == "zscore":
            # hypot neither overflows nor underflows where squaring would.
            return math.hypot(*distances) / math.sqrt(len(distances))
        return max(distances)


def normalize(scores: Sequence[float], method: Normalization) -> list[float]:
    """``scores`` normalized within themselves (a fresh :class:`Scaler` calibrated on them)."""
    return Scaler(method)(scores)
