"""Scripted stand-ins for the engine and the reward client, for fast unit tests.

``FakeEngine`` renders chats as plain text, records every call, and answers each one with
a script: a function from the prompt's text and the sampling settings to the ``n``
completions, each a string or a :class:`Scripted` completion.

Its tokenizer is simple and exact, so token-native search can be tested on it: prompt
text is UTF-8 bytes (ids below 256), and generated text is split into words with their
leading whitespace, each word an id of its own (from 1000 up). ``decode`` inverts both, and
prompts built from rendered ids plus generated ids read back as the text they stand for.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ttalign.engine.adaptive_replicas import EXTRA_ARGS_KEY
from ttalign.engine.base import (
    Completion,
    CompletionDelta,
    EngineHealth,
    EngineRequestError,
    FinishReason,
    Generation,
    Prompt,
    SamplingSettings,
    StopReason,
    TemperatureHeadInfo,
    TokenLogprob,
)

#: The fake model's end-of-sequence token (a control byte no text contains).
EOS = 3
FIRST_WORD_ID = 1000
#: A word with its leading whitespace (trailing whitespace stays with the last word).
WORD = re.compile(r"\s*\S+(?:\s+$)?|\s+$")


@dataclass(frozen=True)
class Scripted:
    """One scripted completion, with what a plain string cannot say."""

    text: str
    #: End with the end-of-sequence token (its id ends ``token_ids``, as in vLLM).
    eos: bool = False
    #: The log-probability of each word (default: -1.0 each).
    logprobs: Sequence[float] | None = None
    #: Per position, alternatives as ``{word: logprob}`` for top-k log-probabilities.
    top: Sequence[Mapping[str, float]] | None = None


Output = str | Scripted
Script = Callable[[str, SamplingSettings], Sequence[Output]]


def echo_script(prompt: str, sampling: SamplingSettings) -> list[str]:
    """Answer ``candidate i`` for each of the n completions."""
    return [f"candidate {i}" for i in range(sampling.n)]


@dataclass
class EngineCall:
    prompt: str
    sampling: SamplingSettings
    outputs: list[str]
    #: The prompt exactly as the engine got it (text, or token ids).
    raw_prompt: Prompt = ""


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
    eos_token_ids: frozenset[int] = frozenset({EOS})
    vocabulary: dict[str, int] = field(default_factory=dict)

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

    async def tokenize(self, text: str) -> list[int]:
        return self.word_ids(text)

    async def decode(self, token_ids: Sequence[int]) -> str:
        return self.text_of(token_ids)

    @staticmethod
    def word_count(text: str) -> int:
        return len(text.split())

    def word_ids(self, text: str) -> list[int]:
        """The ids of ``text``'s words (each with its leading whitespace)."""
        return [self._word_id(word) for word in WORD.findall(text)]

    def _word_id(self, word: str) -> int:
        if word not in self.vocabulary:
            self.vocabulary[word] = FIRST_WORD_ID + len(self.vocabulary)
        return self.vocabulary[word]

    def text_of(self, token_ids: Sequence[int]) -> str:
        words = {i: w for w, i in self.vocabulary.items()}
        parts: list[str] = []
        pending = bytearray()
        for token in token_ids:
            if token < 256:
                if token != EOS:
                    pending.append(token)
                continue
            if pending:
                parts.append(pending.decode())
                pending.clear()
            parts.append(words[token])
        if pending:
            parts.append(pending.decode())
        return "".join(parts)

    def prompt_text(self, prompt: Prompt) -> str:
        return self.text_of(prompt) if isinstance(prompt, list) else prompt

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        if sampling.min_tokens > sampling.max_tokens:
            # As vLLM refuses it, so a strategy that asks for it fails here too.
            raise EngineRequestError(
                f"min_tokens must be less than or equal to max_tokens={sampling.max_tokens}, "
                f"got {sampling.min_tokens}",
                param="min_tokens",
            )
        text = self.prompt_text(prompt)
        outputs = list(self.script(text, sampling))
        if len(outputs) != sampling.n:
            raise AssertionError(f"script gave {len(outputs)} outputs for n={sampling.n}")
        texts = [o if isinstance(o, str) else o.text for o in outputs]
        self.calls.append(EngineCall(text, sampling, texts, prompt))
        self.running += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        completions = tuple(self._complete(i, out, sampling) for i, out in enumerate(outputs))
        return Generation(prompt_tokens=len(text.split()), completions=completions)

    def _complete(self, index: int, output: Output, sampling: SamplingSettings) -> Completion:
        """Apply the settings a real engine would to one scripted completion."""
        scripted = output if isinstance(output, Scripted) else Scripted(output)
        words = WORD.findall(scripted.text)
        finish: FinishReason = "stop"
        stop_reason: StopReason = None
        eos = scripted.eos
        for position, word in enumerate(words):
            ended = self._stop_in(word, sampling)
            if ended is not None:
                stop_reason = ended
                kept = word if sampling.include_stop_str_in_output or isinstance(ended, int) else ""
                if isinstance(ended, str) and not sampling.include_stop_str_in_output:
                    kept = word[: word.index(ended)]
                words = [*words[:position], kept] if kept else words[:position]
                eos = False
                break
        if len(words) >= sampling.max_tokens and stop_reason is None:
            words, eos = words[: sampling.max_tokens], False
            finish = "length"
        ids = [self._word_id(w) for w in words]
        if sampling.allowed_token_ids is not None:
            stray = set(ids) - set(sampling.allowed_token_ids)
            if stray:
                raise AssertionError(f"script answered tokens {stray} outside allowed_token_ids")
        if eos:
            ids.append(EOS)
        logprobs = self._logprobs(scripted, ids, sampling)
        cumulative = None if logprobs is None else math.fsum(lp.logprob for lp in logprobs)
        return Completion(
            index=index,
            text="".join(words),
            token_ids=tuple(ids),
            finish_reason=finish,
            logprobs=logprobs,
            stop_reason=stop_reason,
            cumulative_logprob=cumulative,
        )

    def _stop_in(self, word: str, sampling: SamplingSettings) -> StopReason:
        if sampling.stop_token_ids and self._word_id(word) in sampling.stop_token_ids:
            return self._word_id(word)
        return next((stop for stop in sampling.stop if stop in word), None)

    def _logprobs(
        self, scripted: Scripted, ids: list[int], sampling: SamplingSettings
    ) -> tuple[TokenLogprob, ...] | None:
        if sampling.logprobs is None:
            return None
        result = []
        for position, token in enumerate(ids):
            chosen = (
                scripted.logprobs[position]
                if scripted.logprobs is not None and position < len(scripted.logprobs)
                else -1.0
            )
            alternatives = (
                dict(scripted.top[position])
                if scripted.top and position < len(scripted.top)
                else {}
            )
            ranked = sorted(alternatives.items(), key=lambda item: -item[1])[: sampling.logprobs]
            result.append(
                TokenLogprob(
                    self.text_of([token]),
                    chosen,
                    tuple(ranked),
                    token_id=token,
                    top_ids=tuple(self._word_id(w) for w, _ in ranked),
                )
            )
        return tuple(result)

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        generation = await self.generate(prompt, sampling)
        for completion in generation.completions:
            ids = completion.token_ids or (None,)
            for position, token in enumerate(ids):
                last = position == len(ids) - 1
                yield CompletionDelta(
                    index=completion.index,
                    text=self.text_of([token]) if token is not None else "",
                    num_tokens=0 if token is None else 1,
                    token_ids=() if token is None else (token,),
                    finish_reason=completion.finish_reason if last else None,
                    prompt_tokens=generation.prompt_tokens,
                    stop_reason=completion.stop_reason if last else None,
                    logprobs=(
                        completion.logprobs[position : position + 1]
                        if completion.logprobs is not None and token is not None
                        else None
                    ),
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


#: ``extra_args`` key of the adaptive-temperature logits processor.
TEMPERATURE_KEY = EXTRA_ARGS_KEY


def temperature_spec(sampling: SamplingSettings) -> dict | None:
    """The processor's spec a call carries (one JSON string, as ``vllm_xargs`` needs it)."""
    raw = (sampling.extra_args or {}).get(TEMPERATURE_KEY)
    return json.loads(raw) if isinstance(raw, str) else raw


def constant_record(prompt: str, sampling: SamplingSettings, num_tokens: int) -> list[float]:
    """Every token sampled at 1.0."""
    return [1.0] * num_tokens


@dataclass
class AdaptiveFakeEngine(FakeEngine):
    """A :class:`FakeEngine` that is also an
    :class:`~ttalign.engine.base.AdaptiveTemperatureEngine`, simulating the processor.

    A call whose ``extra_args`` opt in with ``choose`` returns one token whose id is
    :attr:`chosen_index` (the probe of example level); one with ``record`` answers by the
    script and stores ``record_script(prompt, sampling, num_tokens)`` under the key, read
    once through :meth:`temperature_records` (the real records may hold more entries than
    tokens: the reader takes the last ones).
    """

    temperature_heads: dict[str, TemperatureHeadInfo] = field(default_factory=dict)
    chosen_index: int = 0
    record_script: Callable[[str, SamplingSettings, int], list[float]] = constant_record
    records: dict[str, list[float]] = field(default_factory=dict)

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        spec = temperature_spec(sampling)
        if not isinstance(spec, Mapping):
            return await super().generate(prompt, sampling)
        text = self.prompt_text(prompt)
        if spec.get("choose"):
            if sampling.n != 1 or sampling.max_tokens != 1:
                raise AssertionError("a choose probe must be n=1, max_tokens=1")
            self.calls.append(EngineCall(text, sampling, [""], prompt))
            choice = Completion(0, "", (self.chosen_index,), "length")
            return Generation(prompt_tokens=len(text.split()), completions=(choice,))
        generation = await super().generate(prompt, sampling)
        key = spec.get("record")
        if key is not None:
            if sampling.n != 1:
                raise AssertionError("a recorded call must be n=1 (one record per request)")
            tokens = generation.completions[0].num_tokens
            self.records[str(key)] = list(self.record_script(text, sampling, tokens))
        return generation

    async def temperature_records(self, keys: Sequence[str]) -> dict[str, list[float]]:
        return {key: self.records.pop(key) for key in keys if key in self.records}
