"""Scripted stand-ins for the engine and the reward client, for fast unit tests.

``FakeEngine`` renders chats as plain text (token ids are the UTF-8 bytes of that text),
records every call, and answers each one with a script: a function from the rendered
prompt text and the sampling settings to the ``n`` completion texts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ttalign.engine.base import (
    Completion,
    CompletionDelta,
    EngineHealth,
    Generation,
    Prompt,
    SamplingSettings,
)

Script = Callable[[str, SamplingSettings], list[str]]


def echo_script(prompt: str, sampling: SamplingSettings) -> list[str]:
    """Answer ``candidate i`` for each of the n completions."""
    return [f"candidate {i}" for i in range(sampling.n)]


@dataclass
class EngineCall:
    prompt: str
    sampling: SamplingSettings
    outputs: list[str]


@dataclass
class FakeEngine:
    """An :class:`~ttalign.engine.base.EngineClient` driven by a script."""

    script: Script = echo_script
    model_name: str = "fake-model"
    max_model_len: int = 4096
    #: Seconds each call takes; lets tests cancel calls that are in flight.
    delay: float = 0.0
    calls: list[EngineCall] = field(default_factory=list)
    running: int = 0
    healthy: bool = True
    #: The model's sampling defaults (``generation_config.json``); none unless a test sets them.
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)

    async def render_chat(
        self, messages: Sequence[dict[str, str]], *, continue_final_message: bool = False
    ) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        if continue_final_message:
            text = text.rsplit("</", 1)[0]
        else:
            text += "<assistant>"
        return list(text.encode())

    async def count_tokens(self, text: str) -> int:
        return self.word_count(text)

    @staticmethod
    def word_count(text: str) -> int:
        return len(text.split())

    def prompt_text(self, prompt: Prompt) -> str:
        return bytes(prompt).decode() if isinstance(prompt, list) else prompt

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        text = self.prompt_text(prompt)
        outputs = self.script(text, sampling)
        if len(outputs) != sampling.n:
            raise AssertionError(f"script gave {len(outputs)} outputs for n={sampling.n}")
        self.calls.append(EngineCall(text, sampling, outputs))
        self.running += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        completions = tuple(
            Completion(
                index=i,
                text=out,
                token_ids=tuple(range(self.word_count(out))),
                finish_reason="length" if self.word_count(out) >= sampling.max_tokens else "stop",
            )
            for i, out in enumerate(outputs)
        )
        return Generation(prompt_tokens=len(text.split()), completions=completions)

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        generation = await self.generate(prompt, sampling)
        for completion in generation.completions:
            words = completion.text.split(" ")
            for position, word in enumerate(words):
                last = position == len(words) - 1
                yield CompletionDelta(
                    index=completion.index,
                    text=word if position == 0 else " " + word,
                    num_tokens=1,
                    token_ids=(position,),
                    finish_reason=completion.finish_reason if last else None,
                    prompt_tokens=generation.prompt_tokens,
                )

    async def health(self) -> EngineHealth:
        return EngineHealth(self.healthy, self.running)

    async def shutdown(self) -> None:
        return None


@dataclass
class FakeReward:
    """A deterministic reward client: ``scorer(candidate)``, recording every batch."""

    scorer: Callable[[str], float] = len
    name: str = "fake"
    batches: list[list[str]] = field(default_factory=list)

    async def score(
        self,
        conversation: Sequence[dict[str, str]],
        candidates: Sequence[str],
        *,
        partial: bool = False,
    ) -> list[float]:
        self.batches.append(list(candidates))
        return [float(self.scorer(c)) for c in candidates]

    async def close(self) -> None:
        return None
