"""Scoring candidates with a reward client, and picking the best distinct ones.

Shared by the search strategies: a candidate is scored once, kept with its score, and the
returned choices are the top-scoring *distinct* texts (ties go to the earlier candidate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ttalign.engine.base import Completion, FinishReason, TokenLogprob
from ttalign.reward_clients.base import RewardClientError
from ttalign.strategies.base import AlignmentRequest, ChoiceResult, StrategyContext
from ttalign.strategies.errors import InvalidStrategyRequest


@dataclass(frozen=True)
class ScoredCandidate:
    """A generated response and its reward."""

    text: str
    score: float
    finish_reason: FinishReason
    num_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: The search round that produced it (0: the first sampling).
    round: int = 0

    @property
    def key(self) -> str:
        """What makes two candidates the same response."""
        return distinct_key(self.text)

    @property
    def reward(self) -> float | None:
        """The score, or ``None`` for a candidate never scored (NaN is not JSON)."""
        return None if math.isnan(self.score) else self.score

    def choice(self) -> ChoiceResult:
        return ChoiceResult(
            self.text,
            self.finish_reason,
            self.num_tokens,
            reward=self.reward,
            logprobs=self.logprobs,
        )

    def summary(self) -> dict[str, Any]:
        """The candidate as a trace entry."""
        return {
            "text": self.text,
            "score": self.reward,
            "finish_reason": self.finish_reason,
            "round": self.round,
        }


def distinct_key(text: str) -> str:
    """Responses that differ only in surrounding whitespace count as one."""
    return text.strip()


def _rank(score: float) -> float:
    # A reward backend that answers NaN must not win (NaN compares false both ways).
    return -math.inf if math.isnan(score) else score


async def score_texts(
    ctx: StrategyContext,
    reward: Any,
    conversation: Sequence[dict[str, str]],
    texts: Sequence[str],
    *,
    partial: bool = False,
) -> list[float]:
    """Score ``texts`` as replies to ``conversation`` in one batched reward call.

    ``partial`` says the replies may be unfinished. Bounded by the request's deadline
    (:meth:`StrategyContext.score`).
    """
    if not texts:
        return []
    scores = await ctx.score(reward, conversation, list(texts), partial=partial)
    if len(scores) != len(texts):
        raise RewardClientError(
            reward.name, f"returned {len(scores)} scores for {len(texts)} candidates"
        )
    return [float(s) for s in scores]


async def score_completions(
    ctx: StrategyContext,
    reward: Any,
    conversation: Sequence[dict[str, str]],
    completions: Sequence[Completion],
    *,
    round: int = 0,
) -> list[ScoredCandidate]:
    """Score an engine call's completions in one reward call."""
    scores = await score_texts(ctx, reward, conversation, [c.text for c in completions])
    return [
        ScoredCandidate(c.text, s, c.finish_reason, c.num_tokens, c.logprobs, round)
        for c, s in zip(completions, scores, strict=True)
    ]


def best(candidates: Iterable[ScoredCandidate]) -> ScoredCandidate:
    """The highest-scoring candidate; the earliest one wins a tie."""
    return max(candidates, key=lambda c: _rank(c.score))


def worst(candidates: Iterable[ScoredCandidate]) -> ScoredCandidate:
    """The lowest-scoring candidate; the earliest one wins a tie."""
    return min(candidates, key=lambda c: _rank(c.score))


def top_distinct(candidates: Iterable[ScoredCandidate], n: int) -> list[ScoredCandidate]:
    """The ``n`` best candidates, best first, distinct texts before any repeat.

    With fewer than ``n`` distinct texts the rest is filled by repeats in rank order, so a
    request for ``n`` choices always gets ``n``.
    """
    # sorted() is stable even in reverse, so a tie keeps generation order.
    ranked = sorted(candidates, key=lambda c: _rank(c.score), reverse=True)
    distinct: list[ScoredCandidate] = []
    repeats: list[ScoredCandidate] = []
    seen: set[str] = set()
    for candidate in ranked:
        (repeats if candidate.key in seen else distinct).append(candidate)
        seen.add(candidate.key)
    chosen = distinct + repeats
    while chosen and len(chosen) < n:
        chosen += distinct[: n - len(chosen)]
    return chosen[:n]


def unscored(completions: Sequence[Completion], n: int) -> list[ScoredCandidate]:
    """The first ``n`` distinct completions, unranked, for when scoring ran out of time."""
    candidates = [
        ScoredCandidate(c.text, math.nan, c.finish_reason, c.num_tokens, c.logprobs)
        for c in completions
    ]
    return top_distinct(candidates, n)


def check_candidate_cap(count: int, request: AlignmentRequest, param: str) -> None:
    """Reject ``count`` candidates per engine call above the server's cap (a 400 on ``param``)."""
    if count > request.max_candidates:
        raise InvalidStrategyRequest(
            f"{param} is {count}, but this server samples at most {request.max_candidates} "
            "candidates per engine call.",
            param=param,
        )
