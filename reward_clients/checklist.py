"""Checklist judge: the judge lists a request's requirements once, then checks each reply
against each requirement.

Per request text, the judge writes a numbered list of what a reply must do (greedy, cached
and shared like extracted rules, see :mod:`reward_clients.request_cache`). Every reply is
then checked against every requirement with a yes/no verdict, all verdicts of a call at once
so the engine batches them, and scores the mean probability of "Yes" (0 to 1). A request
from which no requirement comes out is checked against a single catch-all requirement. Every
engine call is metered into the request it scores for.
"""

from __future__ import annotations

import re
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
from ttalign.reward_clients.judge import MAX_TRANSCRIPT_CHARS, VERDICT_PREFIX, probability_of_yes
from ttalign.reward_clients.request_cache import SharedCache, text_key

MAX_REQUIREMENTS = 8
CATCH_ALL = "The reply does what the request asks, following all of its instructions."

CHECKLIST_INSTRUCTIONS = (
    "Before replies to a request are graded, list what a reply must do to satisfy it: each "
    "explicit instruction about the content, length, format, wording or structure of the "
    "reply, one short and checkable requirement per numbered line. Keep the request's own "
    "numbers and words exactly. Add nothing the request does not ask for, and write at most "
    f"{MAX_REQUIREMENTS} lines."
)
CHECK_INSTRUCTIONS = (
    "You check one requirement against an assistant's reply. Answer Yes if the reply meets "
    "the requirement and No if it does not, with the single word Yes or No."
)
_NUMBERED = re.compile(r"^\s*\d{1,2}\s*[.)]\s*(\S.*?)\s*$")


def checklist_messages(request: str) -> list[dict[str, str]]:
    """The chat in which the judge writes the request's checklist, begun at item 1."""
    return [
        {"role": "system", "content": CHECKLIST_INSTRUCTIONS},
        {"role": "user", "content": f"Request:\n{request[-MAX_TRANSCRIPT_CHARS:]}"},
        {"role": "assistant", "content": "1."},
    ]


def parse_checklist(continuation: str) -> tuple[str, ...]:
    """The requirements in the judge's continuation of ``1.`` (deduplicated, at most
    :data:`MAX_REQUIREMENTS`)."""
    items: list[str] = []
    for line in ("1." + continuation).splitlines():
        match = _NUMBERED.match(line)
        if match and match.group(1) not in items:
            items.append(match.group(1))
    return tuple(items[:MAX_REQUIREMENTS])


def check_messages(request: str, requirement: str, item: ScoringItem) -> list[dict[str, str]]:
    """The chat in which the judge checks one reply against one requirement."""
    reply = "Unfinished reply" if item.partial else "Reply"
    return [
        {"role": "system", "content": CHECK_INSTRUCTIONS},
        {
            "role": "user",
            "content": f"Request:\n{request[-MAX_TRANSCRIPT_CHARS:]}\n\n"
            f"Requirement:\n{requirement}\n\n{reply}:\n{item.candidate}\n\n"
            "Does the reply meet the requirement?",
        },
        {"role": "assistant", "content": VERDICT_PREFIX},
    ]


class ChecklistJudge(BackendReward):
    """Scores each reply by the mean P(Yes) over the request's checklist."""

    def __init__(
        self,
        name: str,
        *,
        engine: Any,
        max_tokens: int = 160,
        cache_size: int = 1024,
        settings: BackendSettings | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(name, settings, metrics)
        self.engine = engine
        self.max_tokens = max_tokens
        self._checklists: SharedCache[tuple[str, ...]] = SharedCache(cache_size)

    async def checklist(self, request: str, meter: Any = None) -> tuple[str, ...]:
        """The requirements of ``request`` (written once per request text)."""
        return await self._checklists.get(
            text_key(request), lambda: self._write_checklist(request, meter)
        )

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        return list(await gather_or_cancel(*(self._score_one(item) for item in items)))

    async def _score_one(self, item: ScoringItem) -> float:
        request = last_user_text(item.conversation)
        requirements = await self.checklist(request, item.meter) or (CATCH_ALL,)
        verdicts = await gather_or_cancel(
            *(
                first_token_alternatives(
                    self.engine, check_messages(request, requirement, item), item.meter, self.name
                )
                for requirement in requirements
            )
        )
        probabilities = [probability_of_yes(top) for top in verdicts]
        if any(p is None for p in probabilities):
            raise RewardClientError(self.name, "the judge put no Yes or No among its top tokens")
        return sum(p for p in probabilities if p is not None) / len(probabilities)

    async def _write_checklist(self, request: str, meter: Any) -> tuple[str, ...]:
        text = await greedy_continuation(
            self.engine, checklist_messages(request), max_tokens=self.max_tokens, meter=meter
        )
        return parse_checklist(text)
