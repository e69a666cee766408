"""How RAIN values a partial reply: a number in ``[-1, 1]`` per :class:`Reply`.

Two evaluators share one interface:

- :class:`SelfEvaluator`, the paper's: the policy answers a two-option question about
  its own partial reply, asked twice with the options swapped (concurrent engine calls).
  The question is token-native: per request and ordering, the text before the reply
  (rubric, the user's query, the question, the options) and what follows it (the end of
  the user turn, the assistant header) are rendered to token ids once
  (:func:`render_around_reply`); each evaluation splices the reply's token ids, which the
  search already holds, in between. Every evaluation of a request shares the prefix, so
  the engine's prefix cache serves all of it but the reply. The answer is read from the
  two option letters' log-probabilities, each letter tokenized by the serving tokenizer.
  ``vote`` gives the reference's discrete value in ``{-1, 0, 1}``; ``probability`` a
  smooth one.
- :class:`RewardEvaluator`: any configured reward client, scoring the replies' text with
  ``partial=True`` in one batched call, its scores mapped onto ``[-1, 1]``.

:class:`CachedEvaluator` wraps either so that a text is evaluated once per request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ttalign.engine.base import Completion, SamplingSettings
from ttalign.reward_clients.backend import gather_or_cancel
from ttalign.strategies.base import StrategyContext
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.rain_memo import BatchMemo
from ttalign.strategies.rain_prompts import LETTERS, EvaluationPrompts

#: Alternatives read at the answer position: the most the engine returns.
ANSWER_LOGPROBS = 20


@dataclass(frozen=True)
class Reply:
    """A partial reply: its text (for reward clients, caches and people) and its token ids."""

    text: str
    token_ids: tuple[int, ...]


class Evaluator(Protocol):
    """Values partial replies; one call evaluates a whole batch."""

    async def evaluate(self, replies: Sequence[Reply]) -> list[float]:
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


@dataclass(frozen=True)
class QuestionIds:
    """One ordering's question as token ids: ``before`` + reply + ``after``."""

    before: tuple[int, ...]
    after: tuple[int, ...]

    def around(self, reply: Sequence[int]) -> list[int]:
        return [*self.before, *reply, *self.after]


async def render_around_reply(engine: Any, before: str, after: str) -> QuestionIds:
    """The token ids of a one-turn user question whose text is ``before`` + reply + ``after``.

    The turn rendered open (``continue_final_message``) ends where the reply goes; the
    turn rendered closed, with the assistant header, tells what follows the user's text.
    Text after the reply, if any, is tokenized on its own.
    """
    turn = [{"role": "user", "content": before}]
    opened = await engine.render_chat(turn, continue_final_message=True)
    closed = await engine.render_chat(turn)
    shared = _common_prefix(opened, closed)
    # Where the template's own tokens merge with the end of ``before`` the shared prefix
    # stops short of it; dropping that bit of text beats repeating it after the reply.
    head = opened if shared == len(opened) else closed[:shared]
    tail = await engine.tokenize(after) if after else []
    return QuestionIds(tuple(head), (*tail, *closed[shared:]))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


@dataclass
class SelfEvaluator:
    """The policy judges its own partial reply under a rubric.

    Build it with :meth:`prepare`, which renders both orderings' questions once.
    """

    ctx: StrategyContext
    letters: tuple[int, int]
    #: The question with the good option first (A) and with it second (B).
    good_first: QuestionIds
    good_second: QuestionIds
    score: Literal["vote", "probability"] = "vote"
    eos: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    async def prepare(
        cls,
        ctx: StrategyContext,
        prompts: EvaluationPrompts,
        query: str,
        letters: tuple[int, int],
        score: Literal["vote", "probability"] = "vote",
    ) -> SelfEvaluator:
        """An evaluator for one request: both orderings rendered to token ids, once."""
        questions = []
        for good_first in (True, False):
            before, after = prompts.around_reply(query, good_first=good_first)
            questions.append(await render_around_reply(ctx.engine, before, after))
        return cls(ctx, letters, *questions, score=score, eos=ctx.engine.eos_token_ids)

    async def evaluate(self, replies: Sequence[Reply]) -> list[float]:
        return await gather_or_cancel(*(self._evaluate(reply) for reply in replies))

    async def _evaluate(self, reply: Reply) -> float:
        # End-of-sequence ids would end the question's turn early; the text never has them.
        ids = [token for token in reply.token_ids if token not in self.eos]
        good_first, good_second = await gather_or_cancel(
            self._ask(self.good_first.around(ids)), self._ask(self.good_second.around(ids))
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

    async def _ask(self, prompt: list[int]) -> Completion:
        sampling = SamplingSettings(
            n=1,
            temperature=0.0,
            max_tokens=1,
            allowed_token_ids=self.letters,
            logprobs=ANSWER_LOGPROBS if self.score == "probability" else None,
        )
        generation = await self.ctx.generate(prompt, sampling)
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

    async def evaluate(self, replies: Sequence[Reply]) -> list[float]:
        texts = [reply.text for reply in replies]
        scores = await self.ctx.score(self.reward, self.conversation, texts, partial=True)
        return [self.to_value(score) for score in scores]

    def to_value(self, score: float) -> float:
        scaled = 2.0 * (score - self.low) / (self.high - self.low) - 1.0
        return min(1.0, max(-1.0, scaled))


@dataclass
class CachedEvaluator:
    """Evaluates each distinct text once per request (concurrent askers share the call)."""

    inner: Evaluator
    memo: BatchMemo[str, float] = field(default_factory=BatchMemo)

    @property
    def calls(self) -> int:
        return self.memo.calls

    @property
    def evaluated(self) -> int:
        return self.memo.computed

    @property
    def cache_hits(self) -> int:
        return self.memo.hits

    async def evaluate(self, replies: Sequence[Reply]) -> list[float]:
        by_text = {reply.text: reply for reply in replies}

        async def compute(texts: list[str]) -> Sequence[float]:
            return await self.inner.evaluate([by_text[text] for text in texts])

        return await self.memo.get_many([reply.text for reply in replies], compute)
