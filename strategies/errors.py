"""Errors strategies raise. The server maps them to HTTP in one place (``server/errors.py``).

Error tree::

    StrategyError                  base of everything a strategy raises on purpose
    ├── InvalidStrategyRequest     the request or config cannot be served (a 400 naming param)
    ├── BudgetExhausted            the next step would exceed the request's compute budget
    └── DeadlineReached            the request's wall-clock budget ran out mid-step
"""

from __future__ import annotations

from ttalign.engine.base import CallNotAdmitted


class StrategyError(Exception):
    """Base of the errors strategies raise."""


class InvalidStrategyRequest(StrategyError, ValueError):
    """The request cannot be served as configured; ``param`` names the field to change."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class BudgetExhausted(StrategyError, CallNotAdmitted):
    """A step was refused because it could exceed the request's compute budget.

    Also raised from inside reward clients whose engine calls the budget refuses (a judge on
    the serving engine), which pass it on unchanged.
    """


class DeadlineReached(StrategyError):
    """The deadline passed before a step (typically scoring) could finish."""
