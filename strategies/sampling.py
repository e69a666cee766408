"""Engine calls bounded by a request's deadline: at the deadline, keep what was generated.

With a deadline, a call streams its output and gathers it, so that when the deadline
passes the engine request is aborted (closing the stream aborts it) and the partial
completions are returned with ``finish_reason: length``. Without one, it is a plain
batched ``generate``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any, Final

from ttalign.engine.base import (
    SEED_MAX,
    SEED_MIN,
    Completion,
    CompletionDelta,
    FinishReason,
    Generation,
    Prompt,
    SamplingSettings,
    StopReason,
    TokenLogprob,
)

#: Returned by :func:`next_before` when the iterator is exhausted.
END: Final = object()


def offset_seed(seed: int | None, offset: int) -> int | None:
    """``seed + offset`` wrapped into int64, so per-step seeds never overflow the engine."""
    if seed is None:
        return None
    return (seed + offset - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


async def next_before(iterator: AsyncIterator[Any], deadline: float | None) -> Any:
    """The iterator's next item, or :data:`END`; ``TimeoutError`` once ``deadline`` passes.

    ``deadline`` is a ``time.monotonic()`` value (the event loop's clock). A timeout
    cancels the pending step, which aborts the engine request behind the iterator.
    """
    try:
        if deadline is None:
            return await anext(iterator)
        async with asyncio.timeout_at(deadline):
            return await anext(iterator)
    except StopAsyncIteration:
        return END


class PartialCompletion:
    """Rebuilds one completion from its streamed deltas."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.num_tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.has_logprobs = False
        self.finish_reason: FinishReason | None = None
        self.stop_reason: StopReason = None

    def add(self, delta: CompletionDelta) -> None:
        self.parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.num_tokens += delta.num_tokens
        if delta.logprobs is not None:
            self.has_logprobs = True
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def completion(self, index: int) -> Completion:
        """The completion so far; one cut short by the deadline finished for ``length``."""
        return Completion(
            index=index,
            text=self.text,
            token_ids=tuple(self.token_ids),
            finish_reason=self.finish_reason or "length",
            logprobs=tuple(self.logprobs) if self.has_logprobs else None,
            stop_reason=self.stop_reason,
            cumulative_logprob=(
                math.fsum(lp.logprob for lp in self.logprobs) if self.has_logprobs else None
            ),
        )


async def generate_until(
    engine: Any, prompt: Prompt, sampling: SamplingSettings, deadline: float | None
) -> tuple[Generation, bool]:
    """Sample like ``engine.generate``; at ``deadline`` stop and return the partial output.

    Returns the generation and whether the deadline cut it short.
    """
    if deadline is None:
        return await engine.generate(prompt, sampling), False
    partial: dict[int, PartialCompletion] = {}
    prompt_tokens = 0
    cut = False
    stream = engine.stream(prompt, sampling)
    try:
        while (delta := await next_before(stream, deadline)) is not END:
            prompt_tokens = delta.prompt_tokens
            partial.setdefault(delta.index, PartialCompletion()).add(delta)
    except TimeoutError:
        cut = True
    finally:
        await stream.aclose()
    completions = tuple(
        partial.get(i, PartialCompletion()).completion(i) for i in range(sampling.n)
    )
    if not prompt_tokens and isinstance(prompt, list):
        prompt_tokens = len(prompt)
    return Generation(prompt_tokens=prompt_tokens, completions=completions), cut
