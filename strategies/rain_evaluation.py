"""How RAIN values a partial reply: a number in ``[-1, 1]`` per text.

Two evaluators share one interface:

- :class:`SelfEvaluator`, the paper's: the policy answers a two-option question about
  its own partial reply, asked twice with the options swapped (concurrent engine calls).
  The answer is read from the two option letters' log-probabilities, each letter
  tokenized by the serving tokenizer. ``vote`` gives the reference's discrete value in
  ``{-1, 0, 1}``; ``probability`` a smooth one.
- :class:`RewardEvaluator`: any configured reward client, scoring partial replies with
  ``partial=True`` in one batched call, its scores mapped onto ``[-1, 1]``.

:class:`CachedEvaluator` wraps either so that a text is evaluated once per request.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ttalign.engine.base import Completion, SamplingSettings
from ttalign.strategies.base import StrategyContext
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.rain_prompts import LETTERS, EvaluationPrompts

#: Alternatives read at the answer position: the most the engine returns.
ANSWER_LOGPROBS = 20


class Evaluator(Protocol):
    """Values partial replies; one call evaluates a whole batch."""

    async def evaluate(self, replies: Sequence[str]) -> list[float]:
        """One value in ``[-1, 1]`` per reply (higher is better)."""
        ...


async def option_token_ids(engine: Any) -> tuple[int, int]:
    """The token ids of the letters A and B as an answer begins, from the serving tokenizer."""
    ids = []
    for letter in LETTERS:
        tokens = await engine.tokenize(letter)
        if len(tokens) != 1:
            raise InvalidStrategyRequest(
                f"self-evaluation needs the option letter {letter!r} to be one token, but "
                f"this model's tokenizer makes it {len(tokens)}; use evaluator 'reward'.",
                param="strategy_config.evaluator",
            )
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise InvalidStrategyRequest(
            "the option letters tokenize to the same id; use evaluator 'reward'.",
            param="strategy_config.evaluator",
        )
    return ids[0], ids[1]


def letter_logprobs(completion: Completion, letters: tuple[int, int]) -> tuple[float, float]:
    """The log-probabilities of the two letters at the answer position.

    A letter missing from the top alternatives gets the lowest listed value: an upper
    bound, so the other letter's share is a lower bound.
    """
    if not completion.logprobs:
        raise ValueError("the evaluation call returned no log-probabilities")
    position = completion.logprobs[0]
    known = dict(zip(position.top_ids, (lp for _, lp in position.top), strict=True))
    if position.token_id is not None:
        known.setdefault(position.token_id, position.logprob)
    floor = min(known.values()) if known else 0.0
    return known.get(letters[0], floor), known.get(letters[1], floor)


@dataclass
class SelfEvaluator:
    """The policy judges its own partial reply under a rubric."""

    ctx: StrategyContext
    prompts: EvaluationPrompts
    query: str
    letters: tuple[int, int]
    score: Literal["vote", "probability"] = "vote"

    async def evaluate(self, replies: Sequence[str]) -> list[float]:
        return list(await asyncio.gather(*(self._evaluate(reply) for reply in replies)))

    async def _evaluate(self, reply: str) -> float:
        good_first, good_second = await asyncio.gather(
            self._ask(reply, good_first=True), self._ask(reply, good_first=False)
        )
        # Under "good first" the good option is A (letter 0); swapped, it is B (letter 1).
        parts = [(good_first, 0), (good_second, 1)]
        if self.score == "vote":
            votes = [
                completion.token_ids[:1] == (self.letters[good],) for completion, good in parts
            ]
            return float(sum(votes)) - 1.0
        shares = []
        for completion, good in parts:
            logprobs = letter_logprobs(completion, self.letters)
            shares.append(_share(logprobs[good], logprobs[1 - good]))
        return sum(shares) - 1.0

    async def _ask(self, reply: str, *, good_first: bool) -> Completion:
        messages = self.prompts.messages(self.query, reply, good_first=good_first)
        sampling = SamplingSettings(
            n=1,
            temperature=0.0,
            max_tokens=1,
            allowed_token_ids=self.letters,
            logprobs=ANSWER_LOGPROBS if self.score == "probability" else None,
        )
        generation = await self.ctx.generate(await self.ctx.chat_prompt(messages), sampling)
        return generation.completions[0]


def _share(good: float, bad: float) -> float:
    """``p(good) / (p(good) + p(bad))`` from log-probabilities, without overflow."""
    return 1.0 / (1.0 + math.exp(bad - good))


@dataclass
class RewardEvaluator:
    """A configured reward client values partial replies; its range maps onto ``[-1, 1]``."""

    ctx: StrategyContext
    reward: Any
    conversation: Sequence[dict[str, str]]
    low: float = 0.0
    high: float = 1.0

    async def evaluate(self, replies: Sequence[str]) -> list[float]:
        scores = await self.ctx.score(self.reward, self.conversation, replies, partial=True)
        return [self.to_value(score) for score in scores]

    def to_value(self, score: float) -> float:
        scaled = 2.0 * (score - self.low) / (self.high - self.low) - 1.0
        return min(1.0, max(-1.0, scaled))


@dataclass
class CachedEvaluator:
    """Evaluates each distinct text once per request; counts calls and texts."""

    inner: Evaluator
    calls: int = 0
    evaluated: int = 0
    cache_hits: int = 0

    def __post_init__(self) -> None:
        self._values: dict[str, float] = {}

    async def evaluate(self, replies: Sequence[str]) -> list[float]:
        missing = list(dict.fromkeys(r for r in replies if r not in self._values))
        self.cache_hits += len(replies) - len(missing)
        if missing:
            self.calls += 1
            self.evaluated += len(missing)
            values = await self.inner.evaluate(missing)
            self._values.update(zip(missing, values, strict=True))
        return [self._values[r] for r in replies]
