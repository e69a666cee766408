"""Decoding-time alignment strategies, registered by name.

Importing this package registers the built-in strategies and any installed plugins.
"""

from ttalign.strategies import (
    adaptive_temperature,  # noqa: F401
    best_of_n,  # noqa: F401
    darwin,  # noqa: F401
    none,  # noqa: F401  (registers itself)
    rain,  # noqa: F401
    tpo,  # noqa: F401
)
from ttalign.strategies.base import (
    AlignmentRequest,
    ChoiceResult,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
)
from ttalign.strategies.registry import (
    all_strategies,
    get_strategy,
    load_plugins,
    register_strategy,
    strategy_names,
)

load_plugins()

__all__ = [
    "AlignmentRequest",
    "ChoiceResult",
    "Strategy",
    "StrategyConfig",
    "StrategyContext",
    "StrategyResult",
    "all_strategies",
    "get_strategy",
    "load_plugins",
    "register_strategy",
    "strategy_names",
]
