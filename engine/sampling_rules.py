"""Rules both engines apply to sampling settings before vLLM sees them."""

from __future__ import annotations

from dataclasses import replace

from ttalign.engine.base import SEED_MAX, SEED_MIN, SamplingSettings

#: vLLM samples greedily below this temperature (its ``_SAMPLING_EPS``).
GREEDY_TEMPERATURE = 1e-5

#: Seeds passed to vLLM: signed 64-bit. vLLM fails a request whose seed is outside
#: [-2**63, 2**64) with an internal error (its msgpack encoder overflows), and torch takes
#: [2**63, 2**64) as the negative seeds' two's complement, so int64 covers every seed.
SEED_RANGE = range(SEED_MIN, SEED_MAX + 1)


def greedy_copies(sampling: SamplingSettings) -> tuple[int, SamplingSettings]:
    """How many copies of one sample to return, and the settings to sample it with.

    vLLM refuses ``n > 1`` when sampling greedily ("n must be 1 when using greedy
    sampling"): every sample would be the same. So one greedy sample is made and
    returned ``n`` times, which is what the client asked for.
    """
    if sampling.n > 1 and sampling.temperature < GREEDY_TEMPERATURE:
        return sampling.n, replace(sampling, n=1)
    return 1, sampling
