"""Chat completion serving: validate a request, run its strategy, shape the answer.

Built once at start-up and kept on ``app.state``; routes only call into it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ttalign.engine.base import (
    AdaptiveTemperatureEngine,
    EngineClient,
    EngineRequestError,
    Prompt,
    SamplingSettings,
    StructuredOutput,
)
from ttalign.engine.fair_gate import FairGate
from ttalign.engine.metering import MeteredEngine, ScoringMeter
from ttalign.engine.routing import RequestRouting, request_routing
from ttalign.engine.timeline import CallTimeline
from ttalign.reward_clients.registry import RewardRegistry, UnknownRewardError
from ttalign.server.errors import (
    APIError,
    InvalidRequestError,
    ModelNotFoundError,
    to_api_error,
    validation_error,
)
from ttalign.server.metrics import Metrics
from ttalign.server.protocol import ChatCompletionRequest, ResponseFormat, SamplingRequest
from ttalign.server.responses import DONE_FRAME, ResponseHeader, delta_choice, sse, usage
from ttalign.server.settings import ServerSettings
from ttalign.server.tracing import RequestTracing
from ttalign.strategies import all_strategies, get_strategy, strategy_names
from ttalign.strategies.base import (
    AlignmentRequest,
    DeltaEvent,
    ProgressEvent,
    ResultEvent,
    RewardResolver,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
    StreamEvent,
)
from ttalign.strategies.budget import ComputeBudget
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.prompt_overrides import check_prompt_overrides

logger = logging.getLogger(__name__)

BodyT = TypeVar("BodyT", bound=BaseModel)

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
#: Status recorded for requests whose client disconnected (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
#: The engine priority of a search's calls under priority scheduling; plain requests' is 0,
#: and vLLM runs lower values first.
SEARCH_PRIORITY = 1


@dataclass
class PreparedRequest:
    """A validated request, ready to run."""

    request: SamplingRequest
    strategy: Strategy[Any]
    config: StrategyConfig
    context: StrategyContext
    header: ResponseHeader
    started: float
    #: The request's engine and reward calls, kept when it asked for a trace.
    timeline: CallTimeline | None = None
    #: What a remote engine routes the request's calls by (the client's session header,
    #: else the response id).
    affinity_key: str = ""
    #: The client's W3C trace-context headers (``traceparent``, ``tracestate``).
    client_trace: Mapping[str, str] = field(default_factory=dict)
    #: The request's OpenTelemetry span while it runs (tracing on).
    span: Any = None


def scoring_meter(prepared: PreparedRequest) -> ScoringMeter:
    """Meters the engine calls of the request's reward clients (a judge on the serving
    engine) into its usage, each admitted by its compute budget first. Carried by the
    request's routing scope, so every task of the request finds it."""
    context = prepared.context
    usage = context.engine.usage

    def admit(tokens: int) -> None:
        context.request.budget.admit(usage, candidates=0, tokens=tokens)

    return ScoringMeter(usage, admit)


def load_prompt_overrides(path: Path | None) -> dict[str, str]:
    """Template name -> replacement text, from a JSON object file (empty without one).

    Raises ``ValueError`` for an unreadable file, one that is not an object of strings, or
    a template name no strategy has (the message lists the valid names).
    """
    if path is None:
        return {}
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read prompt overrides: {exc}") from None
    if not isinstance(overrides, dict) or not all(isinstance(v, str) for v in overrides.values()):
        raise ValueError(f"{path}: prompt overrides must be a JSON object of strings")
    try:
        check_prompt_overrides(overrides)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return overrides


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat completion body; every failure is a 400 naming the param."""
    return parse_body(body, ChatCompletionRequest)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _has_lone_surrogate(payload: Any) -> bool:
    """Whether any string in ``payload`` holds a lone surrogate (a ``\\ud800`` escape).

    Python's JSON parser accepts them, but they are not Unicode text: tokenizers and the
    engine fail on them deep inside. Iterative, so deep nesting costs no recursion.
    """
    pending = [payload]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def parse_body(body: bytes, schema: type[BodyT]) -> BodyT:
    """Parse JSON ``body`` into ``schema``; every failure is a 400 naming the param.

    Beyond malformed JSON this refuses what Python's parser would let through or choke on:
    ``NaN`` and ``Infinity`` literals, integers too long to convert, and nesting deep
    enough to exhaust the interpreter's recursion limit.
    """
    try:
        # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates through.
        payload = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequestError(
            "The request body is nested too deeply.", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidRequestError(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    if _has_lone_surrogate(payload):
        raise InvalidRequestError(
            "The request body holds a string with a lone UTF-16 surrogate (e.g. \\ud800), "
            "which is not valid Unicode text.",
            code="invalid_json",
        )
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    except RecursionError:
        raise InvalidRequestError(
            "The request body is nested too deeply.", code="invalid_json"
        ) from None


class ChatCompletionService:
    """Serves ``/v1/chat/completions`` for one engine."""

    def __init__(
        self,
        engine: EngineClient,
        settings: ServerSettings,
        metrics: Metrics,
        rewards: RewardRegistry,
        embedder: Any = None,
        tracing: RequestTracing | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.rewards = rewards
        #: The sentence embedder search strategies use (``None``: none configured).
        self.embedder = embedder
        self.prompt_overrides = load_prompt_overrides(settings.prompt_overrides)
        #: Whether the engine is a fleet behind this server (then its overhead is measured).
        self.gateway = settings.engine == "remote"
        #: Exports a span per request (``None``: tracing is off).
        self.tracing = tracing
        #: Holds searches' calls back while plain requests are in the engine.
        self.fair_gate = (
            FairGate(
                settings.search_sequences_beside_plain,
                settings.plain_linger_seconds,
                preempt=settings.preempt_search_calls,
                exclusive_seconds=settings.plain_exclusive_seconds,
                preempt_within_seconds=settings.preempt_within_seconds,
            )
            if settings.resolved_fair_gate()
            else None
        )
        if self.fair_gate is not None:
            metrics.watch_fair_gate(self.fair_gate)

    # --- validation -------------------------------------------------------------------------

    def prepare(
        self,
        request: SamplingRequest,
        affinity_key: str | None = None,
        *,
        completion: tuple[str, Prompt] | None = None,
        header: ResponseHeader | None = None,
        client_trace: Mapping[str, str] | None = None,
    ) -> PreparedRequest:
        """Check the request against server policy and build its strategy context.

        ``affinity_key`` (the client's session header) keeps a conversation's requests on
        one replica in remote mode; without it each request is its own key. A
        ``/v1/completions`` request passes ``completion``: one prompt's text and the prompt
        as the engine gets it (that text, or token ids). ``client_trace`` holds the
        client's W3C trace-context headers.
        """
        started = time.monotonic()
        if request.model != self.engine.model_name:
            raise ModelNotFoundError(request.model, self.engine.model_name)
        strategy = self._strategy(request.strategy)
        config = self._strategy_config(strategy, request.strategy_config)
        self._check_limits(request)
        if completion is None:
            assert isinstance(request, ChatCompletionRequest)
            self._check_chat(request)
            messages = tuple({"role": m.role, "content": m.text()} for m in request.messages)
            raw_prompt = None
        else:
            _check_completes_raw_prompts(strategy)
            text, raw_prompt = completion
            messages = ({"role": "user", "content": text},)
        if strategy.needs_reward(config) or request.reward is not None:
            self._check_reward(
                request.reward, getattr(config, "reward", None), tuple(request.constraints or ())
            )

        deadlines = [
            d
            for d in (request.deadline_seconds, self.settings.request_timeout_seconds)
            if d is not None
        ]
        timeline = (
            CallTimeline(record_prompts=self.settings.trace_engine_prompts)
            if request.return_trace or self.tracing is not None
            else None
        )
        context = StrategyContext(
            request=self._alignment_request(request, messages, raw_prompt),
            engine=self._metered_engine(strategy, timeline),
            rewards=RewardResolver(
                lambda name: self.rewards.get(name, constraints=tuple(request.constraints or ())),
                timeline,
            ),
            prompt_overrides=self.prompt_overrides,
            deadline=started + min(deadlines) if deadlines else None,
            embedder=self.embedder,
        )
        try:
            strategy.check(context.request, config)
        except InvalidStrategyRequest as exc:
            raise to_api_error(exc) from None
        header = header or ResponseHeader(self.engine.model_name)
        return PreparedRequest(
            request, strategy, config, context, header, started, timeline,
            affinity_key=affinity_key or header.id, client_trace=dict(client_trace or {}),
        )  # fmt: skip

    def _metered_engine(
        self, strategy: Strategy[Any], timeline: CallTimeline | None
    ) -> MeteredEngine:
        """The request's view of the engine: a search's calls run after plain requests'
        (priority scheduling), at most ``max_engine_calls_in_flight`` at a time, and few
        while plain requests are in the engine (the fair gate)."""
        if not strategy.searches:
            return MeteredEngine(self.engine, timeline, fair_gate=self.fair_gate)
        prioritized = self.settings.resolved_scheduling_policy() == "priority"
        return MeteredEngine(
            self.engine,
            timeline,
            priority=SEARCH_PRIORITY if prioritized else 0,
            max_in_flight=self.settings.max_engine_calls_in_flight or None,
            fair_gate=self.fair_gate,
            searches=True,
        )

    def _strategy(self, name: str | None) -> Strategy[Any]:
        name = name or self.settings.default_strategy
        strategy = get_strategy(name)
        if strategy is None:
            raise InvalidRequestError(
                f"Unknown strategy {name!r}. Valid strategies: {', '.join(strategy_names())}.",
                param="strategy",
                code="unknown_strategy",
            )
        return strategy

    @staticmethod
    def _strategy_config(strategy: Strategy[Any], raw: dict[str, Any] | None) -> StrategyConfig:
        try:
            return strategy.config_model.model_validate(raw or {})
        except ValidationError as exc:
            error = validation_error(exc.errors())
            error.param = "strategy_config" + (f".{error.param}" if error.param else "")
            error.message = f"Invalid strategy_config for {strategy.name!r}: {error.message}"
            raise error from None

    def _check_chat(self, request: ChatCompletionRequest) -> None:
        if len(request.messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"{len(request.messages)} messages were sent, but this server accepts at most "
                f"{self.settings.max_messages} per request.",
                param="messages",
                code="invalid_value",
            )
        if request.top_logprobs and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true.", param="top_logprobs"
            )

    def _check_limits(self, request: SamplingRequest) -> None:
        s = self.settings
        unsupported = request.unsupported_field()
        if unsupported is not None:
            name, feature = unsupported
            raise InvalidRequestError(
                f"{name} is not supported: this server does not offer {feature}.",
                param=name,
                code="unsupported_parameter",
            )
        if request.n > s.max_n:
            raise InvalidRequestError(
                f"n is {request.n}, but this server allows at most {s.max_n}.",
                param="n",
                code="invalid_value",
            )
        max_tokens = request.requested_max_tokens()
        if max_tokens is not None and max_tokens > s.max_tokens_cap:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise InvalidRequestError(
                f"{param} is {max_tokens}, but this server allows at most {s.max_tokens_cap}.",
                param=param,
                code="invalid_value",
            )
        if request.stream_options is not None and not request.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )

    def _check_reward(
        self, requested: str | None, configured: str | None, constraints: tuple[dict, ...]
    ) -> None:
        # Binding validates the constraints too, so bad ones are a 400 before any work.
        try:
            self.rewards.get(configured or requested, constraints=constraints)
        except UnknownRewardError as exc:
            param = "strategy_config.reward" if configured else "reward"
            raise InvalidRequestError(str(exc), param=param, code="unknown_reward") from None

    def _alignment_request(
        self,
        request: SamplingRequest,
        messages: tuple[dict[str, str], ...],
        raw_prompt: Prompt | None,
    ) -> AlignmentRequest:
        s = self.settings
        sampling = request_sampling(
            # The engine applies --generation-config: under "vllm" it reports no defaults.
            request,
            self.engine.sampling_defaults,
            s.default_max_tokens,
            s.max_tokens_cap,
        )
        return AlignmentRequest(
            messages=messages,
            raw_prompt=raw_prompt,
            sampling=sampling,
            n=request.n,
            return_trace=request.return_trace,
            reward=request.reward,
            max_candidates=s.max_candidates,
            constraints=tuple(request.constraints or ()),
            max_tokens_cap=s.max_tokens_cap,
            budget=ComputeBudget(s.max_request_engine_tokens, s.max_request_candidates),
            temperature_heads=(
                self.engine.temperature_heads
                if isinstance(self.engine, AdaptiveTemperatureEngine)
                else None
            ),
        )

    # --- running ----------------------------------------------------------------------------

    async def run(self, prepared: PreparedRequest) -> StrategyResult:
        """Run a request's strategy to its result; failures are raised as API errors."""
        status = 200
        try:
            with request_routing(prepared.affinity_key) as scope:
                scope.scoring_meter = scoring_meter(prepared)
                scope.trace_headers = self._start_span(prepared)
                result = await prepared.strategy.run(prepared.context, prepared.config)
                self._record_overhead(prepared, scope)
            return result
        except Exception as exc:
            error = client_error(exc, prompt_param(prepared))
            status = error.status_code
            raise error from exc
        except BaseException:
            status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            self._record(prepared, status)

    async def complete(self, prepared: PreparedRequest) -> dict[str, Any]:
        """Run a non-streaming chat request to its JSON response."""
        result = await self.run(prepared)
        return prepared.header.completion(
            result.choices,
            await self.response_usage(prepared, result),
            self.alignment(prepared, result),
            want_logprobs=prepared.request.logprob_count() is not None,
        )

    async def events(self, prepared: PreparedRequest) -> AsyncIterator[StreamEvent]:
        """The strategy's stream events, ending with its :class:`ResultEvent`.

        A failure is raised as an :class:`APIError` (the caller sends it as a frame).
        """
        status = 200
        with request_routing(prepared.affinity_key) as scope:
            scope.scoring_meter = scoring_meter(prepared)
            scope.trace_headers = self._start_span(prepared)
            try:
                async for event in prepared.strategy.stream(prepared.context, prepared.config):
                    if isinstance(event, ResultEvent):
                        self._record_overhead(prepared, scope)
                    yield event
            except Exception as exc:
                error = client_error(exc, prompt_param(prepared))
                status = error.status_code
                raise error from exc
            except BaseException:
                status = CLIENT_CLOSED_REQUEST  # nobody is left to read an error frame
                raise
            finally:
                self._record(prepared, status)

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[str]:
        """Run a streaming chat request, yielding SSE frames up to and including ``[DONE]``."""
        header, request = prepared.header, prepared.request
        include_usage = request.include_usage()
        want_logprobs = request.logprob_count() is not None
        usage_field = {"usage": None} if include_usage else {}
        started_choices: set[int] = set()
        try:
            async with aclosing(self.events(prepared)) as events:
                async for event in events:
                    if isinstance(event, ProgressEvent):
                        yield sse(header.chunk([], alignment_progress=event.data, **usage_field))
                    elif isinstance(event, DeltaEvent):
                        delta = event.delta
                        if delta.index not in started_choices:
                            started_choices.add(delta.index)
                            yield sse(
                                header.chunk(
                                    [
                                        delta_choice(
                                            delta.index, {"role": "assistant", "content": ""}
                                        )
                                    ],
                                    **usage_field,
                                )
                            )
                        finish = delta.finish_reason
                        yield sse(
                            header.chunk(
                                [
                                    delta_choice(
                                        delta.index,
                                        {"content": delta.text} if delta.text else {},
                                        None if finish == "abort" else finish,
                                        delta.logprobs if want_logprobs else None,
                                    )
                                ],
                                **usage_field,
                            )
                        )
                    else:
                        result = event.result
                        if not event.streamed:
                            for frame in self._final_answer_frames(prepared, result, usage_field):
                                yield frame
                        tail: dict[str, Any] = {"alignment": self.alignment(prepared, result)}
                        if include_usage:
                            tail["usage"] = await self.response_usage(prepared, result)
                        yield sse(header.chunk([], **tail))
        except Exception as exc:  # the strategy's (already API errors) or shaping the tail's
            yield sse(client_error(exc).body())
        yield DONE_FRAME

    def _final_answer_frames(
        self, prepared: PreparedRequest, result: StrategyResult, usage_field: dict[str, Any]
    ) -> list[str]:
        header = prepared.header
        want_logprobs = prepared.request.logprob_count() is not None
        frames = []
        for i, choice in enumerate(result.choices):
            frames.append(
                sse(
                    header.chunk(
                        [delta_choice(i, {"role": "assistant", "content": ""})], **usage_field
                    )
                )
            )
            frames.append(
                sse(
                    header.chunk(
                        [
                            delta_choice(
                                i,
                                {"content": choice.text},
                                choice.finish_reason,
                                choice.logprobs if want_logprobs else None,
                            )
                        ],
                        **usage_field,
                    )
                )
            )
        return frames

    # --- bookkeeping ------------------------------------------------------------------------

    async def response_usage(
        self, prepared: PreparedRequest, result: StrategyResult
    ) -> dict[str, int]:
        """The request's OpenAI ``usage``: its prompt once, and its choices' tokens."""
        prompt_tokens = result.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = await self._prompt_tokens(prepared.context.request)
        return usage(prompt_tokens, sum(c.num_tokens for c in result.choices))

    async def _prompt_tokens(self, request: AlignmentRequest) -> int:
        prompt = request.raw_prompt
        if isinstance(prompt, str):
            return await self.engine.count_tokens(prompt)
        if prompt is None:
            prompt = await self.engine.render_chat(request.messages)
        return len(prompt)

    def alignment(self, prepared: PreparedRequest, result: StrategyResult) -> dict[str, Any]:
        """The response's ``alignment`` object: the search's cost, rewards and trace."""
        engine_usage = prepared.context.engine.usage
        reward_usage = prepared.context.rewards.usage
        alignment: dict[str, Any] = {
            "strategy": prepared.strategy.name,
            "rounds": result.rounds,
            "candidates_generated": engine_usage.candidates_generated,
            "candidates_scored": result.candidates_scored,
            "engine_calls": engine_usage.engine_calls,
            "elapsed_seconds": round(time.monotonic() - prepared.started, 4),
            "rewards": [c.reward for c in result.choices],
            "stopped_early": result.stopped_early or prepared.context.deadline_reached,
            "engine_tokens": usage(engine_usage.prompt_tokens, engine_usage.completion_tokens),
            "engine_prefill": {
                "computed_tokens": engine_usage.prefill_computed_tokens,
                "cached_tokens": engine_usage.prefill_cached_tokens,
            },
            "reward_calls": reward_usage.calls,
            "reward_engine_calls": engine_usage.reward_engine_calls,
            "reward_seconds": round(reward_usage.seconds, 4),
        }
        for key, value in result.metadata.items():
            alignment.setdefault(key, value)
        if result.trace is not None:
            if prepared.timeline is not None:
                result.trace["timeline"] = prepared.timeline.export()
            alignment["trace"] = result.trace
        return alignment

    def record_refusal(
        self,
        strategy: str | None,
        error: APIError,
        client_trace: Mapping[str, str] | None = None,
    ) -> None:
        """Count a request refused before it ran (invalid, over the limit, shutting down)."""
        label = strategy or self.settings.default_strategy
        if get_strategy(label) is None:
            label = "unknown"  # never let clients mint new label values
        self.metrics.requests.labels(label, str(error.status_code)).inc()
        if error.status_code in (429, 503):
            self.metrics.rejected.labels(error.code or "refused").inc()
        if self.tracing is not None:
            self.tracing.refused(
                "refused", client_trace or {}, error.status_code, error.code or error.type
            )

    # --- tracing ----------------------------------------------------------------------------

    def _start_span(self, prepared: PreparedRequest) -> dict[str, str]:
        """Start the request's span (tracing on); the trace headers its upstream calls carry:
        the span's own, or else the client's, passed on unchanged."""
        if self.tracing is None:
            return dict(prepared.client_trace)
        request = prepared.request
        operation = "chat" if prepared.header.chunk_object.startswith("chat") else "text_completion"
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": request.model,
            "gen_ai.response.id": prepared.header.id,
            "ttalign.strategy": prepared.strategy.name,
            "ttalign.stream": bool(request.stream),
        }
        reward = getattr(prepared.config, "reward", None) or request.reward
        if reward is not None:
            attributes["ttalign.reward"] = reward
        prepared.span = self.tracing.start(
            f"{operation} {request.model}", prepared.client_trace, attributes
        )
        return self.tracing.outgoing_headers(prepared.span)

    def _end_span(self, prepared: PreparedRequest, status: int) -> None:
        if self.tracing is None or prepared.span is None:
            return
        usage = prepared.context.engine.usage
        span, prepared.span = prepared.span, None
        self.tracing.finish(
            span,
            prepared.timeline,
            status,
            {
                "ttalign.engine.calls": usage.engine_calls,
                "ttalign.engine.input_tokens": usage.prompt_tokens,
                "ttalign.engine.output_tokens": usage.completion_tokens,
                "ttalign.reward.calls": prepared.context.rewards.usage.calls,
            },
            {"ttalign.strategy": prepared.strategy.name},
        )

    def _record_overhead(self, prepared: PreparedRequest, scope: RequestRouting) -> None:
        """In remote mode: the request's time not spent waiting on an upstream server."""
        if self.gateway:
            overhead = scope.overhead_seconds()
            self.metrics.gateway_overhead.labels(prepared.strategy.name).observe(overhead)

    def _record(self, prepared: PreparedRequest, status: int) -> None:
        self._end_span(prepared, status)
        m, name = self.metrics, prepared.strategy.name
        engine_usage = prepared.context.engine.usage
        m.requests.labels(name, str(status)).inc()
        m.request_latency.labels(name).observe(time.monotonic() - prepared.started)
        m.engine_calls.labels(name).observe(engine_usage.engine_calls)
        m.candidates.labels(name).inc(engine_usage.candidates_generated)
        m.prompt_tokens.labels(name).inc(engine_usage.prompt_tokens)
        m.completion_tokens.labels(name).inc(engine_usage.completion_tokens)


def request_sampling(
    request: SamplingRequest,
    defaults: Mapping[str, Any],
    default_max_tokens: int,
    max_tokens_cap: int,
) -> SamplingSettings:
    """The request's sampling settings; fields it leaves unset take the model's defaults.

    Raises :class:`InvalidRequestError` for a ``min_tokens`` beyond ``max_tokens_cap``.
    """

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(request, name)
        return value if value is not None else defaults.get(name, fallback)

    # A model's own max_tokens default is used like --default-max-tokens: never beyond the
    # cap a request may ask for. A request that names no limit but asks for min_tokens gets
    # at least that many (the protocol already checked min_tokens against a named limit).
    max_tokens = request.requested_max_tokens()
    if max_tokens is None:
        if request.min_tokens > max_tokens_cap:
            raise InvalidRequestError(
                f"min_tokens is {request.min_tokens}, but this server generates at most "
                f"{max_tokens_cap} tokens per reply.",
                param="min_tokens",
                code="invalid_value",
            )
        default = min(defaults.get("max_tokens") or default_max_tokens, max_tokens_cap)
        max_tokens = max(default, request.min_tokens)
    allowed = request.allowed_token_ids
    return SamplingSettings(
        n=1,
        temperature=pick("temperature", DEFAULT_TEMPERATURE),
        top_p=pick("top_p", DEFAULT_TOP_P),
        max_tokens=max_tokens,
        stop=request.stop_sequences(),
        seed=request.seed,
        logprobs=request.logprob_count(),
        ignore_eos=request.ignore_eos,
        top_k=pick("top_k", None),
        min_p=pick("min_p", 0.0),
        presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        logit_bias=tuple((int(t), b) for t, b in (request.logit_bias or {}).items()),
        structured=_structured_output(request.response_format),
        min_tokens=request.min_tokens,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        include_stop_str_in_output=request.include_stop_str_in_output,
        allowed_token_ids=tuple(allowed) if allowed is not None else None,
    )


def _structured_output(response_format: ResponseFormat | None) -> StructuredOutput | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput(json_object=True)
    assert response_format.json_schema is not None  # the protocol requires it
    return StructuredOutput(json_schema=json.dumps(response_format.json_schema.schema_))


def _check_completes_raw_prompts(strategy: Strategy[Any]) -> None:
    if not strategy.completes_raw_prompts:
        serving = ", ".join(s.name for s in all_strategies() if s.completes_raw_prompts)
        raise InvalidRequestError(
            f"Strategy {strategy.name!r} rewrites the conversation between rounds, so it "
            "needs chat messages: send it to /v1/chat/completions. On /v1/completions a "
            f"prompt is used as it is, which these strategies support: {serving}.",
            param="strategy",
            code="unsupported_strategy",
        )


def prompt_param(prepared: PreparedRequest) -> str:
    """The request field holding its prompt: ``prompt`` on /v1/completions, else ``messages``."""
    return "messages" if prepared.context.request.raw_prompt is None else "prompt"


def client_error(exc: BaseException, prompt_field: str = "messages") -> APIError:
    """The API error a failure is answered with (an API error is its own). An engine's
    refusal that names no parameter is blamed on the prompt, in ``prompt_field``."""
    if isinstance(exc, EngineRequestError):
        return InvalidRequestError(str(exc), param=exc.param or prompt_field, code="invalid_value")
    return to_api_error(exc)
