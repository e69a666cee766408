"""LLM-as-judge reward: an expected rating read from the log-probabilities of one token.

The judge sees a rubric, the conversation and one candidate reply, and the assistant turn
is pre-filled up to the rating, so the very next token is the rating. Instead of parsing
that token, the client asks for the top log-probabilities of that single position and
takes the expectation of the rating over the single-digit ratings among them::

    score = sum(r * p(r)) / sum(p(r))   for r in scale_min..scale_max found in the top-k

If no rating token is among the top-k, the candidate cannot be scored and the call fails
(it is never scored as zero).

In ``yes_no`` mode the judge is asked instead whether the reply does everything the user
asked, the answer turn is pre-filled up to the verdict, and the score is the probability of
"Yes" against "No" among the top-k alternatives (0 to 1).

On an engine (the serving one, or the judge engine), every call is metered into the
request it scores for (``alignment.engine_tokens``) and admitted by that request's compute
budget first (``--max-request-engine-tokens``).

All candidates of one call are requested concurrently, so the engine batches them; when
one fails, or the call is cancelled (every caller went away, see
:mod:`reward_clients.batching`), the others are cancelled too, which aborts them in the
engine.

Backends: the serving engine itself (an :class:`~ttalign.engine.base.EngineClient`), or a
remote OpenAI-compatible vLLM server (``/v1/chat/completions`` with
``continue_final_message``, a vLLM extension).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from ttalign.reward_clients.backend import (
    BackendReward,
    BackendSettings,
    ScoringItem,
    gather_or_cancel,
)
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.engine_calls import TOP_LOGPROBS, first_token_alternatives
from ttalign.reward_clients.http import JsonHttp

DEFAULT_RUBRIC = (
    "Judge how well the reply serves the user: it should do what the user asked, "
    "follow every explicit instruction about format and length, be correct, and be clear "
    "and to the point. Replies that ignore the request, invent facts or ramble rate low."
)

#: The pre-filled start of the judge's answer; the next token is the rating.
ANSWER_PREFIX = "Rating: "
#: The pre-filled start of a yes/no verdict; the next token is the verdict.
VERDICT_PREFIX = "Verdict:"
JudgeMode = Literal["rating", "yes_no"]
MAX_TRANSCRIPT_CHARS = 6000


def _transcript(item: ScoringItem) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in item.conversation)[
        -MAX_TRANSCRIPT_CHARS:
    ]


def verdict_messages(item: ScoringItem, rubric: str) -> list[dict[str, str]]:
    """The yes/no judge's chat: does the reply do everything the user asked?"""
    instructions = (
        f"You check assistant replies. {rubric}\n"
        "Say Yes only if the reply carries out the user's request and obeys every explicit "
        "instruction in it (length, format, words to use or avoid, structure); otherwise "
        "say No. Answer with the single word Yes or No."
    )
    kind = "Unfinished reply (could it still satisfy everything?)" if item.partial else "Reply"
    task = (
        f"Conversation so far:\n{_transcript(item)}\n\n{kind}:\n{item.candidate}\n\n"
        "Does the reply satisfy every instruction of the request?"
    )
    return [
        {"role": "system", "content": instructions},
        {"role": "user", "content": task},
        {"role": "assistant", "content": VERDICT_PREFIX},
    ]


def probability_of_yes(alternatives: Iterable[tuple[str, float]]) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) over the verdict tokens, or ``None`` if there are none."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in alternatives:
        word = token.strip().lower()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


def judge_messages(
    item: ScoringItem, rubric: str, scale_min: int, scale_max: int
) -> list[dict[str, str]]:
    """The judge's chat: instructions, the transcript to rate, and the open answer turn."""
    transcript = _transcript(item)
    instructions = (
        f"You grade assistant replies. {rubric}\n"
        f"Answer with one whole number from {scale_min} (worst) to {scale_max} (best), "
        "and nothing else."
    )
    kind = (
        "Unfinished reply to grade (judge how promising its beginning is)"
        if item.partial
        else "Reply to grade"
    )
    task = (
        f"Conversation so far:\n{transcript}\n\n"
        f"{kind}:\n{item.candidate}\n\n"
        f"Grade the reply from {scale_min} to {scale_max}."
    )
    return [
        {"role": "system", "content": instructions},
        {"role": "user", "content": task},
        {"role": "assistant", "content": ANSWER_PREFIX},
    ]


def expected_rating(
    alternatives: Iterable[tuple[str, float]], scale_min: int, scale_max: int
) -> float | None:
    """The probability-weighted mean rating over rating tokens, or ``None`` if there are none."""
    mass: dict[int, float] = {}
    for token, logprob in alternatives:
        text = token.strip()
        if text.isascii() and text.isdigit() and scale_min <= int(text) <= scale_max:
            # The same rating can appear as several tokens (" 7" and "7"): add them up.
            mass[int(text)] = mass.get(int(text), 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return sum(rating * p for rating, p in mass.items()) / total


class JudgeReward(BackendReward):
    """Rates each candidate with an LLM; the score is its expected rating on the scale."""

    def __init__(
        self,
        name: str,
        *,
        engine: Any = None,
        url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        rubric: str = DEFAULT_RUBRIC,
        scale_min: int = 1,
        scale_max: int = 9,
        mode: JudgeMode = "rating",
        settings: BackendSettings | None = None,
        metrics: Any = None,
    ) -> None:
        if (engine is None) == (url is None):
            raise ValueError("a judge needs exactly one of an engine or a url")
        if not 0 <= scale_min < scale_max <= 9:
            raise ValueError("the judge's scale must be single digits, 0 <= min < max <= 9")
        super().__init__(name, settings, metrics)
        self.engine = engine
        self.model = model
        self.rubric = rubric
        self.scale = (scale_min, scale_max)
        self.mode = mode
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = JsonHttp(name, url, headers=headers) if url is not None else None

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        alternatives = await gather_or_cancel(
            *(
                self._rate_remote(self._messages(item))
                if self._http is not None
                else self._rate_on_engine(self._messages(item), item)
                for item in items
            )
        )
        scores = []
        for position, top in enumerate(alternatives):
            score = (
                probability_of_yes(top)
                if self.mode == "yes_no"
                else expected_rating(top, *self.scale)
            )
            if score is None:
                what = "Yes or No" if self.mode == "yes_no" else "rating token"
                raise RewardClientError(
                    self.name,
                    f"the judge put no {what} in its top-{TOP_LOGPROBS} for candidate {position}",
                )
            scores.append(score)
        return scores

    def _messages(self, item: ScoringItem) -> list[dict[str, str]]:
        if self.mode == "yes_no":
            return verdict_messages(item, self.rubric)
        return judge_messages(item, self.rubric, *self.scale)

    async def _rate_on_engine(
        self, messages: list[dict[str, str]], item: ScoringItem
    ) -> list[tuple[str, float]]:
        return await first_token_alternatives(self.engine, messages, item.meter, self.name)

    async def _rate_remote(self, messages: list[dict[str, str]]) -> list[tuple[str, float]]:
        assert self._http is not None
        payload: dict[str, Any] = {
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
            "add_generation_prompt": False,
            "continue_final_message": True,
        }
        if self.model is not None:
            payload["model"] = self.model
        answer = await self._http.post("/v1/chat/completions", payload)
        try:
            first = answer["choices"][0]["logprobs"]["content"][0]
            return [(t["token"], t["logprob"]) for t in first["top_logprobs"]]
        except (KeyError, IndexError, TypeError) as exc:
            raise RewardClientError(self.name, "the judge answered without logprobs") from exc

    async def close(self) -> None:
        await super().close()
        if self._http is not None:
            await self._http.close()
