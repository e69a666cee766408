"""What a prompt set is to the harness, and the prompt sets by name.

A :class:`Suite` loads its items, says which verifiable constraints (if any) travel with
each request, scores one output without I/O, and folds per-item scores into metrics.
Reward-model scores (``mean_reward``) are not a suite's business: the harness asks the
server's ``/v1/rewards/score`` for them, for any suite.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ttalign.benchmarks.quality.intervals import Interval


@dataclass(frozen=True)
class Item:
    """One prompt of a set: a stable id, the user turn, and whatever scoring needs."""

    id: str
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """A metric a suite reports: its key in the JSON and its description in the table."""

    key: str
    description: str
    percent: bool = True


class Suite(ABC):
    """A prompt set and its scoring. Subclasses are stateless and register in ``SUITES``."""

    name: ClassVar[str]
    #: File under the data directory.
    filename: ClassVar[str]
    #: Metrics in table order; the first is the headline.
    metrics: ClassVar[tuple[Metric, ...]]
    #: Metrics drawn on the plot.
    plot_metrics: ClassVar[tuple[str, ...]]
    #: Whether the suite is meaningless without reward scores (then they are always taken).
    needs_reward_scores: ClassVar[bool] = False

    @abstractmethod
    def load(self, path: Path) -> list[Item]:
        """Every item of the file, in file order."""

    def constraints(self, item: Item) -> list[dict[str, Any]] | None:
        """Verifiable constraints sent with the item's requests (for rule-verifier rewards)."""
        return None

    @abstractmethod
    def score(self, item: Item, output: str) -> dict[str, Any]:
        """Per-item scores of ``output``; pure and fast (no I/O)."""

    @abstractmethod
    def aggregate(self, scored: list[dict[str, Any]]) -> dict[str, float | None]:
        """The suite's metrics over the per-item scores of one run."""

    def intervals(self, scored: list[dict[str, Any]]) -> dict[str, Interval | None]:
        """95 % confidence intervals of the metrics, by key (:mod:`.intervals`)."""
        return {}


def suites() -> dict[str, Suite]:
    """The prompt sets by name."""
    from ttalign.benchmarks.quality.alpaca import AlpacaEval
    from ttalign.benchmarks.quality.ifeval import IFEval, IFEvalPrefixCheckable
    from ttalign.benchmarks.quality.xstest import XSTest

    every = (IFEval(), IFEvalPrefixCheckable(), XSTest(), AlpacaEval())
    return {suite.name: suite for suite in every}


def mean(values: list[float]) -> float | None:
    """Arithmetic mean; ``None`` for no values (a metric that could not be measured)."""
    return sum(values) / len(values) if values else None
