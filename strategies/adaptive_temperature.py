"""``adaptive_temperature``: the sampling temperature chosen per reply or per token
(Adaptive Decoding, Dhuliawala et al., 2024).

- ``level: example``: one temperature for the whole reply, chosen from the prompt by a probe
  (one ``max_tokens=1`` engine call in which the engine's adaptive-temperature processor
  reads the logits at the last prompt position, picks, and returns the choice as the probe's
  token id), then one ordinary engine call at that ``temperature``. The probe's prompt is
  the reply's, so vLLM's prefix cache serves the second prefill.
- ``level: token``: one engine call whose rows opt in to the processor, which picks a new
  temperature at every step; tokens stream as they are made, as for ``none``. Each of the
  ``n`` choices is its own engine call, so each has its own record of temperatures.

``mode``: ``learned`` (a head trained with LPO and configured on the server, named by
``head``), ``entropy`` (DynaTemp's normalized-entropy rule over the temperature set) or
``fixed`` (``fixed_temperature``, for ablations). The response's ``alignment`` reports the
chosen temperature (example level) or the histogram and mean of the tokens' temperatures;
``return_trace`` adds each token's temperature.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field
from ttalign.engine.adaptive_replicas import EXTRA_ARGS_KEY
from ttalign.engine.base import (
    CompletionDelta,
    EngineUnavailableError,
    SamplingSettings,
    TemperatureHeadInfo,
)
from ttalign.strategies.base import (
    AlignmentRequest,
    ChoiceResult,
    DeltaEvent,
    ResultEvent,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
    StreamEvent,
)
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.merging import merge_tagged
from ttalign.strategies.registry import register_strategy
from ttalign.strategies.sampling import PartialCompletion, offset_seed

#: The paper's temperature set, used by ``entropy`` when the request names none.
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_TEMPERATURES = 16


class AdaptiveTemperatureConfig(StrategyConfig):
    """``strategy_config`` of ``adaptive_temperature``."""

    level: Literal["example", "token"] = Field(
        "example", description="One temperature per reply, or a new one at every token."
    )
    mode: Literal["learned", "entropy", "fixed"] = Field(
        "learned", description="The trained head, the entropy heuristic, or a fixed value."
    )
    head: str | None = Field(
        None,
        description="A head configured on the server (default: the server's head for this "
        "level). Never a path.",
    )
    temperatures: list[float] | None = Field(
        None,
        description="The set to choose from (default: the head's set; for entropy, "
        "0, 0.2, ..., 1). For learned, a subset of the head's set.",
    )
    fixed_temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="mode fixed: the temperature (default: the request's)."
    )
    entropy_exponent: float = Field(
        1.0, gt=0.0, le=10.0, description="mode entropy: the exponent applied to the entropy."
    )


class AdaptiveTemperatureUnavailable(EngineUnavailableError):
    """The engine did not apply the adaptive-temperature processor to a request."""


@dataclass(frozen=True)
class _Plan:
    """A validated config: what the engine is asked to do."""

    level: str
    mode: str
    head: str | None
    temperatures: tuple[float, ...]
    fixed: float | None
    exponent: float

    def describe(self) -> dict[str, Any]:
        """The ``alignment`` fields naming what chose the temperature."""
        described: dict[str, Any] = {"temperature_level": self.level, "temperature_mode": self.mode}
        if self.head is not None:
            described["temperature_head"] = self.head
        return described

    def extra_args(self, *, choose: bool = False, record: str | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "mode": self.mode,
            "temperatures": list(self.temperatures),
            "entropy_exponent": self.exponent,
        }
        if self.head is not None:
            spec["head"] = self.head
        if choose:
            spec["choose"] = True
        if record is not None:
            spec["record"] = record
        # One JSON string: vLLM servers take only flat values in ``vllm_xargs``.
        return {EXTRA_ARGS_KEY: json.dumps(spec, separators=(",", ":"))}


def default_head(
    heads: Mapping[str, TemperatureHeadInfo], level: str
) -> TemperatureHeadInfo | None:
    """The server's head for ``level``: the first configured head trained at that level."""
    for info in heads.values():
        if info.level == level:
            return info
    return None


def plan(request: AlignmentRequest, config: AdaptiveTemperatureConfig) -> _Plan:
    """Validate ``config`` against the request and the engine's heads (400s name the field)."""
    heads = request.temperature_heads
    if config.mode == "fixed":
        fixed = (
            config.fixed_temperature
            if config.fixed_temperature is not None
            else request.sampling.temperature
        )
        return _Plan(config.level, "fixed", None, (fixed,), fixed, config.entropy_exponent)
    if heads is None:
        raise InvalidStrategyRequest(
            "this server's engine cannot pick temperatures per row (adaptive_temperature needs "
            "the in-process vLLM engine with ttalign's logits processor)",
            param="strategy",
        )
    head = None
    if config.mode == "learned":
        head = heads.get(config.head) if config.head else default_head(heads, config.level)
        if head is None:
            available = ", ".join(sorted(heads)) or "none"
            raise InvalidStrategyRequest(
                f"no temperature head {config.head or f'for level {config.level!r}'} on this "
                f"server (configured: {available})",
                param="strategy_config.head",
            )
        if head.level != config.level:
            raise InvalidStrategyRequest(
                f"head {head.name!r} was trained at level {head.level!r}, not {config.level!r}",
                param="strategy_config.head",
            )
    temperatures = tuple(
        config.temperatures
        if config.temperatures is not None
        else (head.temperatures if head else DEFAULT_TEMPERATURES)
    )
    _check_temperatures(temperatures, head)
    return _Plan(
        config.level,
        config.mode,
        head.name if head else None,
        temperatures,
        None,
        config.entropy_exponent,
    )


def _check_temperatures(temperatures: tuple[float, ...], head: TemperatureHeadInfo | None) -> None:
    param = "strategy_config.temperatures"
    if not temperatures or len(temperatures) > MAX_TEMPERATURES:
        raise InvalidStrategyRequest(
            f"temperatures must hold 1 to {MAX_TEMPERATURES} values", param=param
        )
    if any(not 0.0 <= t <= 2.0 for t in temperatures):
        raise InvalidStrategyRequest("temperatures must lie in [0, 2]", param=param)
    if head is not None:
        missing = [t for t in temperatures if all(abs(t - h) > 1e-6 for h in head.temperatures)]
        if missing:
            raise InvalidStrategyRequest(
                f"head {head.name!r} chooses among {list(head.temperatures)}; "
                f"{missing} are not among them",
                param=param,
            )


def conflicting_sampling(sampling: SamplingSettings) -> str | None:
    """The first request setting that would corrupt the processor's input or temperature."""
    if sampling.logit_bias:
        return "logit_bias"
    if sampling.presence_penalty:
        return "presence_penalty"
    if sampling.frequency_penalty:
        return "frequency_penalty"
    if sampling.repetition_penalty != 1.0:
        return "repetition_penalty"
    if sampling.min_tokens:
        return "min_tokens"
    if sampling.allowed_token_ids is not None:
        return "allowed_token_ids"
    if sampling.structured is not None:
        return "response_format"
    return None


@register_strategy
class AdaptiveTemperature(Strategy[AdaptiveTemperatureConfig]):
    name = "adaptive_temperature"
    description = (
        "A temperature chosen per reply or per token by a learned head (LPO), an entropy "
        "heuristic, or a fixed value (Adaptive Decoding)."
    )
    config_model = AdaptiveTemperatureConfig
    streams_tokens = True
    completes_raw_prompts = True
    searches = False

    def check(self, request: AlignmentRequest, config: AdaptiveTemperatureConfig) -> None:
        chosen = plan(request, config)
        request.budget.check(request.n, request.n * request.sampling.max_tokens, param="n")
        if chosen.level == "token" and chosen.mode != "fixed":
            conflict = conflicting_sampling(request.sampling)
            if conflict is not None:
                raise InvalidStrategyRequest(
                    f"{conflict} cannot be combined with token-level adaptive temperature: the "
                    "engine applies it to the logits the temperature is chosen from",
                    param=conflict,
                )

    async def run(self, ctx: StrategyContext, config: AdaptiveTemperatureConfig) -> StrategyResult:
        events = [event async for event in self.stream(ctx, config)]
        final = events[-1]
        assert isinstance(final, ResultEvent)
        return final.result

    async def stream(
        self, ctx: StrategyContext, config: AdaptiveTemperatureConfig
    ) -> AsyncIterator[StreamEvent]:
        chosen = plan(ctx.request, config)
        prompt = await ctx.request_prompt()
        if chosen.level == "example":
            run = _ExampleLevel(ctx, chosen, prompt)
        else:
            run = _TokenLevel(ctx, chosen, prompt)
        async for event in run.events():
            yield event


class _ExampleLevel:
    def __init__(self, ctx: StrategyContext, chosen: _Plan, prompt: Any) -> None:
        self._ctx, self._plan, self._prompt = ctx, chosen, prompt

    async def choose(self) -> tuple[float, int | None]:
        """The reply's temperature, and the probe's token id (``None`` without a probe)."""
        if self._plan.fixed is not None:
            return self._plan.fixed, None
        probe = SamplingSettings(
            n=1, max_tokens=1, temperature=1.0, extra_args=self._plan.extra_args(choose=True)
        )
        generation = await self._ctx.generate(self._prompt, probe)
        ids = generation.completions[0].token_ids
        if len(ids) != 1 or not 0 <= ids[0] < len(self._plan.temperatures):
            raise AdaptiveTemperatureUnavailable(
                "the engine did not apply the adaptive-temperature processor to the probe"
            )
        return self._plan.temperatures[ids[0]], ids[0]

    async def events(self) -> AsyncIterator[StreamEvent]:
        ctx = self._ctx
        temperature, probe_token = await self.choose()
        sampling = replace(ctx.request.sampling, n=ctx.request.n, temperature=temperature)
        collected: dict[int, PartialCompletion] = {}
        prompt_tokens = 0
        async for delta in ctx.stream(self._prompt, sampling):
            prompt_tokens = delta.prompt_tokens or prompt_tokens
            collected.setdefault(delta.index, PartialCompletion()).add(delta)
            yield DeltaEvent(delta)
        metadata = {**self._plan.describe(), "temperature": temperature}
        trace = None
        if ctx.request.return_trace:
            trace = {
                **metadata,
                "temperatures": list(self._plan.temperatures),
                "probe_token_id": probe_token,
            }
        yield ResultEvent(
            StrategyResult(
                choices=[_choice(collected[i]) for i in sorted(collected)],
                prompt_tokens=prompt_tokens or len(self._prompt),
                metadata=metadata,
                trace=trace,
            ),
            streamed=True,
        )


class _TokenLevel:
    def __init__(self, ctx: StrategyContext, chosen: _Plan, prompt: Any) -> None:
        self._ctx, self._plan, self._prompt = ctx, chosen, prompt
        self._keys = [f"ttalign-{uuid.uuid4().hex}" for _ in range(ctx.request.n)]

    def _sampling(self, index: int) -> SamplingSettings:
        base = self._ctx.request.sampling
        seed = offset_seed(base.seed, index)
        if self._plan.fixed is not None:
            return replace(base, n=1, temperature=self._plan.fixed, seed=seed)
        extra = self._plan.extra_args(record=self._keys[index])
        return replace(base, n=1, temperature=1.0, seed=seed, extra_args=extra)

    async def events(self) -> AsyncIterator[StreamEvent]:
        ctx = self._ctx
        collected: dict[int, PartialCompletion] = {}
        prompt_tokens = 0
        async for delta in merged_streams(
            [ctx.stream(self._prompt, self._sampling(i)) for i in range(ctx.request.n)]
        ):
            prompt_tokens = delta.prompt_tokens or prompt_tokens
            collected.setdefault(delta.index, PartialCompletion()).add(delta)
            yield DeltaEvent(delta)
        per_choice = await self._temperatures(collected)
        count = len(per_choice)
        flat = [t for values in per_choice for t in values]
        histogram = Counter(flat)
        metadata: dict[str, Any] = {
            **self._plan.describe(),
            "temperature_mean": sum(flat) / len(flat) if flat else None,
            "temperature_histogram": {
                _label(t): histogram.get(t, 0) for t in self._plan.temperatures
            },
        }
        trace = None
        if ctx.request.return_trace:
            trace = {
                **metadata,
                "temperatures": list(self._plan.temperatures),
                "choices": [
                    {"index": i, "token_temperatures": values}
                    for i, values in enumerate(per_choice)
                ],
            }
        yield ResultEvent(
            StrategyResult(
                choices=[_choice(collected.get(i, PartialCompletion())) for i in range(count)],
                prompt_tokens=prompt_tokens or len(self._prompt),
                metadata=metadata,
                trace=trace,
            ),
            streamed=True,
        )

    async def _temperatures(self, collected: dict[int, PartialCompletion]) -> list[list[float]]:
        """Each choice's per-token temperatures, snapped to the set."""
        count = self._ctx.request.n
        tokens = [collected[i].num_tokens if i in collected else 0 for i in range(count)]
        if self._plan.fixed is not None:
            return [[self._plan.fixed] * n for n in tokens]
        engine = self._ctx.engine.adaptive_temperature
        if engine is None:
            raise AdaptiveTemperatureUnavailable("the engine keeps no temperature records")
        records = await engine.temperature_records(self._keys)
        return [
            _snap(records.get(key, [])[-n:] if n else [], self._plan.temperatures)
            for key, n in zip(self._keys, tokens, strict=True)
        ]


def _snap(values: Sequence[float], temperatures: tuple[float, ...]) -> list[float]:
    return [min(temperatures, key=lambda t: abs(t - v)) for v in values]


def _label(temperature: float) -> str:
    return f"{temperature:g}"


def _choice(partial: PartialCompletion) -> ChoiceResult:
    return ChoiceResult(
        partial.text,
        partial.finish_reason or "stop",
        partial.num_tokens,
        logprobs=tuple(partial.logprobs) if partial.has_logprobs else None,
    )


async def merged_streams(
    streams: Sequence[AsyncIterator[CompletionDelta]],
) -> AsyncIterator[CompletionDelta]:
    """Deltas of several one-completion streams as they come, the i-th stream's as choice i.

    Closing the merged stream (or an error in any stream) closes every stream.
    """
    async with aclosing(merge_tagged(streams)) as merged:
        async for index, delta in merged:
            yield replace(delta, index=index) if len(streams) > 1 else delta
