"""``auto_constraints``: enforce whatever the request itself asked for.

A judge model extracts the request's explicit, checkable instructions as generic rule
constraints (:mod:`reward_clients.constraint_extraction`), once per request text, and each
reply scores the share of them it meets, as under ``rules``. The user sends no
``constraints``.

Where the rules leave replies tied (equal shares), an optional ``fallback`` client orders
them, unless ``break_ties`` is off (which saves one judge call per reply): its scores,
scaled into [0, 1) and divided by one more than the number of constraints, are added,
which is less than one constraint's worth, so the fallback can break a tie but never
overturn a rule. A request with nothing checkable in it is scored by the fallback alone;
without a fallback every reply then ties at 0 (no signal, so a search behaves like its
baseline), never an error.
"""

from __future__ import annotations

from collections.abc import Sequence

from ttalign.engine.metering import current_scoring_meter
from ttalign.reward_clients.base import Message, RewardClient
from ttalign.reward_clients.constraint_extraction import ConstraintExtractor, last_user_text
from ttalign.reward_clients.rules import RuleVerifierReward


class AutoConstraintsReward:
    """Scores replies by the share of the request's extracted constraints they meet."""

    def __init__(
        self,
        name: str,
        extractor: ConstraintExtractor,
        *,
        fallback: RewardClient | None = None,
        break_ties: bool = True,
        metrics: object = None,
    ) -> None:
        self.name = name
        self.extractor = extractor
        self.fallback = fallback
        self.break_ties = break_ties
        self._metrics = metrics

    async def constraints(self, conversation: Sequence[Message]) -> tuple[object, ...]:
        """The constraints extracted from the conversation's last user message."""
        return await self.extractor.extract(last_user_text(conversation), current_scoring_meter())

    async def score(
        self, conversation: Sequence[Message], candidates: Sequence[str], *, partial: bool = False
    ) -> list[float]:
        constraints = await self.constraints(conversation)
        if not constraints:
            if self.fallback is None:
                return [0.0] * len(candidates)
            return await self.fallback.score(conversation, candidates, partial=partial)
        rules = RuleVerifierReward(self.name, constraints, metrics=self._metrics)  # type: ignore[arg-type]
        shares = await rules.score(conversation, candidates, partial=partial)
        if self.fallback is None or not self.break_ties or len(set(shares)) == len(shares):
            return shares
        order = await self.fallback.score(conversation, candidates, partial=partial)
        low, high = min(order), max(order)
        spread = high - low
        scale = 1.0 / (len(constraints) + 1)
        return [
            share + (scale * 0.999 * (value - low) / spread if spread > 0 else 0.0)
            for share, value in zip(shares, order, strict=True)
        ]

    async def close(self) -> None:
        return None  # the fallback is a registry client of its own, closed there
