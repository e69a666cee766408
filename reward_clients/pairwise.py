"""Pairwise judge: each reply is compared with a reference reply to the same request.

Per request text, the judge engine writes its own reference reply once (greedy, cached and
shared, see :mod:`reward_clients.request_cache`). Each candidate is then shown beside the
reference and the judge names the reply that follows the request better, in both orders
(a judge often prefers whichever reply comes first); the score is the mean probability that
the candidate is the better one (0 to 1). Every engine call is metered into the request it
scores for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ttalign.reward_clients.backend import (
    BackendReward,
    BackendSettings,
    ScoringItem,
    gather_or_cancel,
)
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.constraint_extraction import last_user_text
from ttalign.reward_clients.engine_calls import first_token_alternatives, greedy_continuation
from ttalign.reward_clients.judge import MAX_TRANSCRIPT_CHARS
from ttalign.reward_clients.request_cache import SharedCache, text_key

COMPARE_INSTRUCTIONS = (
    "You compare two assistant replies to the same request. The better reply is the one "
    "that carries out the request more fully and obeys more of its explicit instructions "
    "(length, format, words to use or avoid, structure); correctness and clarity decide "
    "between replies that are equal on those. Answer with the single letter A or B."
)
CHOICE_PREFIX = "Better reply:"


def compare_messages(request: str, first: str, second: str) -> list[dict[str, str]]:
    """The chat in which the judge picks the better of two replies, A (first) or B."""
    return [
        {"role": "system", "content": COMPARE_INSTRUCTIONS},
        {
            "role": "user",
            "content": f"Request:\n{request[-MAX_TRANSCRIPT_CHARS:]}\n\n"
            f"Reply A:\n{first}\n\nReply B:\n{second}\n\nWhich reply is better, A or B?",
        },
        {"role": "assistant", "content": CHOICE_PREFIX},
    ]


def probability_of_a(alternatives: Sequence[tuple[str, float]]) -> float | None:
    """P(A) / (P(A) + P(B)) over the choice tokens, or ``None`` if there are none."""
    mass = {"A": 0.0, "B": 0.0}
    for token, logprob in alternatives:
        letter = token.strip()
        if letter in mass:
            mass[letter] += math.exp(logprob)
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


class PairwiseJudge(BackendReward):
    """Scores each reply by the probability that it beats the judge's own reference."""

    def __init__(
        self,
        name: str,
        *,
        engine: Any,
        reference_max_tokens: int = 256,
        cache_size: int = 1024,
        settings: BackendSettings | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(name, settings, metrics)
        self.engine = engine
        self.reference_max_tokens = reference_max_tokens
        self._references: SharedCache[str] = SharedCache(cache_size)

    async def reference(self, request: str, meter: Any = None) -> str:
        """The judge's own reply to ``request`` (written once per request text)."""
        messages = [{"role": "user", "content": request}]
        return await self._references.get(
            text_key(request),
            lambda: greedy_continuation(
                self.engine,
                messages,
                max_tokens=self.reference_max_tokens,
                meter=meter,
                continue_final=False,
            ),
        )

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        return list(await gather_or_cancel(*(self._score_one(item) for item in items)))

    async def _score_one(self, item: ScoringItem) -> float:
        request = last_user_text(item.conversation)
        reference = await self.reference(request, item.meter)
        first, second = await gather_or_cancel(
            first_token_alternatives(
                self.engine, compare_messages(request, item.candidate, reference),
                item.meter, self.name,
            ),
            first_token_alternatives(
                self.engine, compare_messages(request, reference, item.candidate),
                item.meter, self.name,
            ),
        )  # fmt: skip
        candidate_first, candidate_second = probability_of_a(first), probability_of_a(second)
        if candidate_first is None or candidate_second is None:
            raise RewardClientError(self.name, "the judge put no A or B among its top tokens")
        return (candidate_first + (1.0 - candidate_second)) / 2
