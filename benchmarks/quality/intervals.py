"""95 % confidence intervals of the harness's metrics, over the prompts of one run.

Two methods, each where it fits:

- :func:`wilson`, for a share of prompts (one pass or fail per prompt: IFEval's prompt-level
  accuracy, XSTest's refusal rates). Unlike the normal approximation it stays inside
  [0, 1] and does not collapse to a point at 0 % or 100 %, which small samples hit often.
- :func:`bootstrap_ratio`, for everything else: a ratio of sums over prompts (IFEval's
  instruction-level accuracy, whose instructions are clustered in prompts, so prompts are
  resampled, not instructions) and a mean over prompts (rewards). Percentile bootstrap,
  2000 resamples, seeded, so a result file redraws the same intervals.

Both treat the prompts as a sample from the prompt set; they say nothing of the sampling
noise of one prompt's reply (each prompt is answered once per run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: The two-sided 95 % quantile of the standard normal.
Z95 = 1.959963984540054
RESAMPLES = 2000
SEED = 0

Interval = tuple[float, float]


def wilson(successes: float, n: int, z: float = Z95) -> Interval | None:
    """Wilson's score interval of ``successes`` out of ``n``; ``None`` for ``n == 0``."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ratio(
    numerators: Sequence[float],
    denominators: Sequence[float] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval | None:
    """Percentile interval of ``sum(numerators) / sum(denominators)`` over resampled prompts.

    Without ``denominators`` it is the mean of ``numerators``. ``None`` without prompts.
    """
    top = np.asarray(numerators, dtype=float)
    bottom = np.ones_like(top) if denominators is None else np.asarray(denominators, float)
    if top.size == 0 or bottom.sum() <= 0:
        return None
    picks = np.random.default_rng(seed).integers(0, top.size, size=(resamples, top.size))
    sums = bottom[picks].sum(axis=1)
    keep = sums > 0  # a resample of prompts with no instructions has no ratio
    ratios = top[picks].sum(axis=1)[keep] / sums[keep]
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)


def bootstrap_mean(values: Sequence[float]) -> Interval | None:
    """Percentile bootstrap interval of the mean of ``values``."""
    return bootstrap_ratio(values)
