"""DARWIN's population rules, as pure functions: beams, replacement, and the archive.

A beam is a partial response decoded under one instruction's own chat prompt. Every
``replacement_period`` tokens the low-reward beams take over the tokens of high-reward
ones but keep their own instruction, so the copied response goes on under a different
prompt. The archive maps instructions to the best reward a beam under them reached, and
cycles draw the instruction to mutate from it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ttalign.strategies.trajectory import Trajectory


@dataclass
class Beam:
    """One partial response and the instruction it is decoded under."""

    #: Index of the instruction among this cycle's variants.
    instruction_index: int
    instruction: str
    trajectory: Trajectory
    #: How many replacement steps this beam was among the kept ones.
    times_kept: int = 0
    #: The final segment's text when a stop string ended it (the text drops the stop
    #: string, the tokens do not).
    stop_tail: str | None = None
    #: Tokens of the segment ``stop_tail`` stands for.
    stop_tail_tokens: int = 0
    #: What ended the response (``stop`` or ``length``), once it has ended.
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.trajectory.finished

    @property
    def num_tokens(self) -> int:
        return self.trajectory.num_tokens

    def take_response_of(self, other: Beam) -> None:
        """Overwrite this beam's response with ``other``'s; its own instruction stays."""
        copied = other.trajectory
        self.trajectory = Trajectory(self.trajectory.context, list(copied.segments))
        self.trajectory.finished = copied.finished
        self.stop_tail = other.stop_tail
        self.stop_tail_tokens = other.stop_tail_tokens
        self.finish_reason = other.finish_reason


@dataclass(frozen=True)
class Replacement:
    """Beam ``target`` took over the response of beam ``source``."""

    target: int
    source: int


def _rank(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def kept_beams(scores: Sequence[float], finished: Sequence[bool], keep: int) -> list[int]:
    """The indices of the top ``keep`` scores (earlier wins a tie) plus every finished beam."""
    order = sorted(range(len(scores)), key=lambda i: _rank(scores[i]), reverse=True)
    kept = set(order[:keep]) | {i for i, done in enumerate(finished) if done}
    return sorted(kept)


def plan_replacements(count: int, kept: Sequence[int], rng: random.Random) -> list[Replacement]:
    """Each beam not kept takes the response of a kept beam drawn uniformly at random."""
    kept_set = set(kept)
    return [
        Replacement(target, rng.choice(list(kept)))
        for target in range(count)
        if target not in kept_set
    ]


def most_kept(times_kept: Sequence[int], count: int) -> list[int]:
    """The ``count`` beams kept most often, most first (the earlier beam wins a tie)."""
    order = sorted(range(len(times_kept)), key=lambda i: times_kept[i], reverse=True)
    return order[:count]


@dataclass
class Archive:
    """Instructions and the best reward reached under each, in the order they entered."""

    rewards: dict[str, float] = field(default_factory=dict)

    def draw(self, rng: random.Random) -> str:
        """An instruction drawn uniformly at random."""
        return rng.choice(list(self.rewards))

    def update(self, drawn: str, contenders: Sequence[tuple[str, float]]) -> list[str]:
        """Admit each contender whose reward beats the drawn instruction's; return them.

        If any entered, the drawn instruction leaves, unless it re-entered itself with the
        better reward (a variant may be the drawn instruction, as a fallback).
        """
        bar = _rank(self.rewards[drawn])
        entered: list[str] = []
        for instruction, reward in contenders:
            if _rank(reward) > bar and instruction not in entered:
                previous = self.rewards.get(instruction, -math.inf)
                self.rewards[instruction] = max(previous, reward, key=_rank)
                entered.append(instruction)
        if entered and drawn not in entered:
            del self.rewards[drawn]
        return entered

    def snapshot(self) -> list[dict[str, object]]:
        """The archive as trace entries."""
        return [
            {"instruction": text, "reward": None if math.isnan(r) else r}
            for text, r in self.rewards.items()
        ]
