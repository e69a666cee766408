"""Environment variables that an engine's processes inherit when they are spawned.

vLLM reads some settings from the environment of the processes it spawns (the engine core
and its workers), not from its engine arguments. An in-process engine gets them by setting
the variable while it spawns, and restoring it after, so that a second engine in the same
server can be spawned with a value of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def spawned_with(name: str, value: str | None) -> Iterator[None]:
    """Spawn inside this block to give the spawned processes ``name=value`` (``None``:
    leave the variable as it is)."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
