"""How long vLLM's engine processes busy-wait for each other between messages.

vLLM's engine-core process and its workers hand every step over through shared-memory
queues. A reader that has read within the last second does not sleep on the queue's
notification socket: it spins, calling ``sched_yield`` in a loop, so the engine core uses
most of a core for as long as its worker computes (95 % measured on 2 cores). Capping the
spin frees that CPU at the price of a wake-up per hand-over. On a 2-core machine with the
judge engine beside the policy the wake-ups cost more than the spin (a judge-heavy
evaluation ran at 0.64x the throughput; ``benchmarks/results/engine_spin/``): a spinning
reader yields to every runnable thread, and a sleeping one waits for a busy core. So the
cap is off unless set, for hosts where a spinning core is a cost to others.

vLLM loads this module in each of its processes as a general plugin (the
``vllm.general_plugins`` entry point ``ttalign_engine_spin``); :func:`register` caps the
spin at :data:`SPIN_VARIABLE` seconds when that variable is set. An engine sets it only
while it spawns its processes (:func:`spinning`), so a process that never started a
ttalign engine keeps vLLM's behaviour.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import AbstractContextManager
from typing import Any

from ttalign.engine.spawn_environment import spawned_with

logger = logging.getLogger(__name__)

#: The cap, in seconds, that :func:`register` reads in each engine process.
SPIN_VARIABLE = "TTALIGN_ENGINE_SPIN_SECONDS"


def spinning(seconds: float | None) -> AbstractContextManager[None]:
    """Spawn an engine inside this block to cap its processes' busy-waiting at ``seconds``
    (``None``: vLLM's own, one second)."""
    return spawned_with(SPIN_VARIABLE, None if seconds is None else repr(float(seconds)))


def register() -> None:
    """vLLM's plugin hook: apply the cap in :data:`SPIN_VARIABLE`, if one is set."""
    value = os.environ.get(SPIN_VARIABLE, "").strip()
    if not value:
        return
    try:
        cap_spin(float(value))
    except (ImportError, AttributeError, ValueError) as exc:
        # A plugin that raises kills the engine; spinning is only slower.
        logger.warning("%s=%r not applied, vLLM keeps spinning: %s", SPIN_VARIABLE, value, exc)


def cap_spin(seconds: float) -> None:
    """Make every shared-memory queue reader created from now on in this process spin at
    most ``seconds`` after its last read before it sleeps on its socket."""
    if seconds < 0:
        raise ValueError("the spin cap must not be negative")
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    original = getattr(SpinCondition.__init__, "__wrapped__", SpinCondition.__init__)

    @functools.wraps(original)
    def capped_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = min(self.busy_loop_s, seconds)

    SpinCondition.__init__ = capped_init
