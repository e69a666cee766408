"""What the docs promise about reproducibility, as numbers the real-engine tests use.

Measured with ``benchmarks/determinism.py`` (docs/reproducibility.md):

- ``--deterministic`` (float32, no prefix-cache reads): a seeded request's text and rewards
  were bit-identical across calls, alone or beside other traffic, on every CPU measured.
- Default mode, float32, or bfloat16 on a CPU without AMX: judge scores of the same
  candidates were identical across calls too; float32 reduction order may still move the
  last digits, which :data:`EXACT_ENOUGH` leaves room for.
- Default mode, bfloat16 on a CPU with AMX: a judge score moved by 0.14 on the 1-9 scale
  between two identical calls (batch company and prefix-cache hits change the AMX kernels'
  arithmetic). :data:`AMX_HALF_SCORE_DRIFT` is that, with a margin.
"""

from __future__ import annotations

import functools

#: Default mode, half precision on an AMX CPU: how far one judge score may move.
AMX_HALF_SCORE_DRIFT = 0.5
#: Everywhere else: room for float32 reduction order, far below any real difference.
EXACT_ENOUGH = 1e-3


@functools.cache
def cpu_has_amx() -> bool:
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


def score_drift_bound(engine: object) -> float:
    """How far the same judge score may move between calls on ``engine``.

    A deterministic engine promises exact equality (0). An engine whose dtype is unknown
    (a gateway over ``vllm serve`` replicas) is taken to serve the model's bfloat16.
    """
    if getattr(engine, "deterministic", False):
        return 0.0
    dtype = getattr(engine, "dtype", None) or "bfloat16"
    if dtype == "float32" or not cpu_has_amx():
        return EXACT_ENOUGH
    return AMX_HALF_SCORE_DRIFT
