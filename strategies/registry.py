"""Maps strategy names to strategy instances.

Built-in strategies register themselves with :func:`register_strategy` when their module
is imported; third-party packages add theirs through the ``ttalign.strategies`` entry
point group (each entry point names a :class:`~strategies.base.Strategy` subclass).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from ttalign.strategies.base import Strategy

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, Strategy[Any]] = {}


def register_strategy(cls: type[Strategy[Any]]) -> type[Strategy[Any]]:
    """Class decorator: make ``cls`` available under ``cls.name``. Names must be unique."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and type(existing) is not cls:
        raise ValueError(
            f"strategy name {cls.name!r} is already registered by {type(existing).__qualname__}"
        )
    _REGISTRY[cls.name] = cls()
    return cls


def load_plugins() -> None:
    """Import strategies that installed packages expose through entry points."""
    for entry in entry_points(group="ttalign.strategies"):
        try:
            register_strategy(entry.load())
        except Exception:
            logger.exception("could not load strategy plugin %s", entry.name)


def get_strategy(name: str) -> Strategy[Any] | None:
    """The strategy registered as ``name``, or ``None``."""
    return _REGISTRY.get(name)


def strategy_names() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


def all_strategies() -> list[Strategy[Any]]:
    """All registered strategies, sorted by name."""
    return [_REGISTRY[name] for name in strategy_names()]
