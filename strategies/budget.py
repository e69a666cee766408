"""The compute budget of one request: engine tokens and sampled candidates, all rounds.

Strategies check a config against the budget before any work (:meth:`ComputeBudget.check`,
a 400 when even the first round cannot fit), and every engine call a strategy makes through
its context is admitted first (:meth:`ComputeBudget.admit`): a call whose worst case, its
prompt prefilled by each of its ``n`` sequences plus ``n * max_tokens``, would take the
request past the budget is refused with
:class:`~strategies.errors.BudgetExhausted`, and the search stops early with its best so
far. The first call is always admitted: the up-front check already vouched for it, and
without it there would be nothing to return. Engine tokens spent are the ones the engine
computed: generated tokens and the prefill its prefix cache did not hold. A judge's calls
on a served engine count too (``engine.metering.ScoringMeter``); remote reward models' do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ttalign.strategies.errors import BudgetExhausted, InvalidStrategyRequest


class Usage(Protocol):
    engine_calls: int
    candidates_generated: int
    prompt_tokens: int
    completion_tokens: int
    prefill_computed_tokens: int


@dataclass(frozen=True)
class ComputeBudget:
    """Limits on the engine work of one request."""

    max_engine_tokens: int = 4_194_304
    max_candidates: int = 65_536

    def check(self, candidates: int, completion_tokens: int, *, param: str) -> None:
        """Refuse a config whose first round alone cannot fit (``param`` names what to lower)."""
        if candidates > self.max_candidates:
            raise InvalidStrategyRequest(
                f"{param}: the first round samples {candidates} candidates, but one request "
                f"may sample at most {self.max_candidates} (--max-request-candidates).",
                param=param,
                code="budget_exceeded",
            )
        if completion_tokens > self.max_engine_tokens:
            raise InvalidStrategyRequest(
                f"{param}: the first round may generate {completion_tokens} tokens, but one "
                f"request may use at most {self.max_engine_tokens} engine tokens "
                "(--max-request-engine-tokens).",
                param=param,
                code="budget_exceeded",
            )

    def admit(self, used: Usage, *, candidates: int, tokens: int) -> None:
        """Raise :class:`BudgetExhausted` if a call of this worst case could exceed the budget."""
        if used.engine_calls == 0:
            return
        if used.candidates_generated + candidates > self.max_candidates:
            raise BudgetExhausted(
                f"{candidates} more candidates would exceed the budget of {self.max_candidates}"
            )
        spent = used.prefill_computed_tokens + used.completion_tokens
        if spent + tokens > self.max_engine_tokens:
            raise BudgetExhausted(
                f"{tokens} more engine tokens would exceed the budget of "
                f"{self.max_engine_tokens} ({spent} spent)"
            )
