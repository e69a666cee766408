"""Token-native trajectories: a rendered conversation plus the assistant tokens committed so far.

Search strategies extend, rewind and branch a :class:`Trajectory` and use it as the prompt
of their next engine call. Text is never tokenized again along the way: a segment's token
ids are exactly what the engine sampled, so every call on one trajectory shares its
prefix token for token, and the engine's prefix cache reuses its KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Segment = tuple[int, ...]


@dataclass
class Trajectory:
    """``context`` (the rendered conversation, ending where the reply starts) plus segments."""

    context: tuple[int, ...]
    segments: list[Segment] = field(default_factory=list)
    #: Set once a committed segment ended the reply (end-of-sequence).
    finished: bool = False

    @classmethod
    def start(cls, context: Sequence[int]) -> Trajectory:
        return cls(tuple(context))

    @property
    def tokens(self) -> tuple[int, ...]:
        """The committed assistant tokens."""
        return tuple(token for segment in self.segments for token in segment)

    @property
    def num_tokens(self) -> int:
        return sum(len(segment) for segment in self.segments)

    def extend(self, segment: Iterable[int], *, finished: bool = False) -> None:
        """Commit ``segment``; ``finished`` marks it as the reply's last."""
        if self.finished:
            raise ValueError("the reply has ended; nothing can follow it")
        self.segments.append(tuple(segment))
        self.finished = finished

    def rewind(self, k: int = 1) -> list[Segment]:
        """Take back the last ``k`` segments and return them, oldest first."""
        if not 0 <= k <= len(self.segments):
            raise ValueError(f"cannot rewind {k} of {len(self.segments)} segments")
        if k == 0:
            return []
        removed = self.segments[-k:]
        del self.segments[-k:]
        self.finished = False
        return removed

    def branch(self) -> Trajectory:
        """An independent copy to extend without touching this one."""
        return Trajectory(self.context, list(self.segments), self.finished)

    def prompt(self, *after: Sequence[int]) -> list[int]:
        """Token ids for the next engine call: context, committed tokens, then ``after``."""
        ids = [*self.context, *self.tokens]
        for more in after:
            ids.extend(more)
        return ids
