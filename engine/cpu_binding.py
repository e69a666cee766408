"""Which CPU cores the threads of each in-process vLLM engine run on.

On CPU, vLLM binds an engine's compute threads to the cores of its NUMA node, less one core
that it leaves to the serving process (``VLLM_CPU_OMP_THREADS_BIND=auto``). It knows of one
engine per process only: a second in-process engine (the judge beside the policy) is bound
to the very same cores, so the two engines take turns on them while the left-over core
idles. On a 2-core machine both engines ran on core 0.

:func:`split_cores` gives each engine a disjoint share of the cores instead, and
:func:`bound_to` hands an engine its share through vLLM's own variable while the engine's
processes are spawned (they inherit the environment then; nothing else reads it later).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager

from ttalign.engine.spawn_environment import spawned_with

#: vLLM's variable: ``auto``, ``nobind``, or a core list such as ``0,2-3``.
BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def split_cores(cores: Sequence[int], engines: int) -> list[list[int]] | None:
    """Disjoint core lists, one per engine, in order; ``None`` when there is nothing to
    split (one engine, or fewer cores than engines).

    One core stays with the serving process, as vLLM's own binding leaves one, when every
    engine can still have two; the last engine (the judge, the larger model so far) takes
    the cores an even split leaves over.
    """
    usable = sorted(cores)
    if engines < 2 or len(usable) < engines:
        return None
    if len(usable) >= 2 * engines + 1:
        usable = usable[:-1]
    share = len(usable) // engines
    shares = [usable[index * share : (index + 1) * share] for index in range(engines - 1)]
    shares.append(usable[(engines - 1) * share :])
    return shares


def available_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def user_binding() -> str | None:
    """The binding the user set for vLLM, if any (``auto`` counts as none)."""
    value = os.environ.get(BIND_VARIABLE, "").strip()
    return None if value in ("", "auto") else value


def bound_to(cores: Sequence[int] | None) -> AbstractContextManager[None]:
    """Spawn an engine inside this block to bind its threads to ``cores`` (``None``: as
    vLLM would)."""
    return spawned_with(BIND_VARIABLE, None if cores is None else ",".join(map(str, cores)))
