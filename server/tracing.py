"""OpenTelemetry spans for requests: one per request, a child per engine and reward call.

Off unless ``--otlp-traces-endpoint`` is set (vLLM's flag, with vLLM's
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``: ``grpc``, the default, or ``http/protobuf``). Off,
no span is built and no call timeline is kept for it; the only work left is passing a
client's W3C ``traceparent`` on to the replicas of a fleet, so that vLLM can still join the
client's trace.

On, a request's span starts as it runs and ends with its status. Its engine and reward
calls are already noted in the request's :class:`~ttalign.engine.timeline.CallTimeline`
(start, end, tokens, replica, stop reasons); their child spans are built from it once the
request ends, so tracing adds nothing to the strategies' hot paths. The client's
``traceparent`` becomes the request span's parent, and the request span's own context is
what a fleet's replicas receive.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from ttalign.engine.timeline import CallTimeline, EngineCallRecord, RewardCallRecord

#: The W3C trace-context headers, the only ones passed on to replicas.
TRACE_HEADERS = ("traceparent", "tracestate")
#: vLLM's variable for the exporter's protocol.
PROTOCOL_VARIABLE = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
_PROPAGATOR = TraceContextTextMapPropagator()


def trace_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace-context headers among ``headers`` (a client's, to pass on)."""
    return {name: headers[name] for name in TRACE_HEADERS if name in headers}


def otlp_exporter(endpoint: str) -> SpanExporter:
    """An OTLP span exporter to ``endpoint``, on the protocol vLLM's variable names."""
    protocol = os.environ.get(PROTOCOL_VARIABLE, "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    else:
        raise ValueError(f"{PROTOCOL_VARIABLE} is {protocol!r}; use grpc or http/protobuf.")
    return OTLPSpanExporter(endpoint=endpoint)


class RequestTracing:
    """Builds and exports the spans of requests through one tracer provider."""

    def __init__(self, processor: SpanProcessor) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": "ttalign"}))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("ttalign")

    def start(self, name: str, client_headers: Mapping[str, str], attributes: dict) -> Span:
        """Start a request's span, as a child of the client's trace if it sent one."""
        parent = _PROPAGATOR.extract(client_headers) if client_headers else None
        return self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )

    @staticmethod
    def outgoing_headers(span: Span) -> dict[str, str]:
        """The ``traceparent`` (and ``tracestate``) that makes ``span`` an upstream's parent."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
        return carrier

    def finish(
        self,
        span: Span,
        timeline: CallTimeline | None,
        status: int,
        attributes: Mapping[str, Any],
        child_attributes: Mapping[str, Any],
    ) -> None:
        """End a request's span with its status, after a child span for each of its calls
        (each with ``child_attributes`` too)."""
        if timeline is not None:
            parent = trace.set_span_in_context(span)
            for call in timeline.calls():
                self._child(parent, timeline, call, child_attributes)
        span.set_attributes(dict(attributes))
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        span.end()

    def refused(self, name: str, client_headers: Mapping[str, str], status: int, error: str):
        """Export the span of a request refused before it ran (invalid, over capacity)."""
        span = self.start(name, client_headers, {"error.type": error})
        span.set_attribute("http.response.status_code", status)
        span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def _child(
        self, parent: Any, timeline: CallTimeline, call: Any, common: Mapping[str, Any]
    ) -> None:
        start = timeline.wall_ns(call.start)
        # A call still running when the request ended (a cancelled straggler) ends with it.
        end = timeline.wall_ns(call.end if call.end is not None else timeline.now())
        if isinstance(call, EngineCallRecord):
            name, attributes = "engine.generate", _engine_attributes(call)
        else:
            name, attributes = f"reward {call.reward}", _reward_attributes(call)
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=start,
            attributes={**common, **attributes},
        )
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop."""
        self.provider.shutdown()


def _engine_attributes(call: EngineCallRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "ttalign.call.kind": "engine",
        "gen_ai.request.max_tokens": call.max_tokens,
        "gen_ai.request.temperature": call.temperature,
        "gen_ai.request.top_p": call.top_p,
        "gen_ai.request.choice.count": call.n,
        "gen_ai.usage.input_tokens": call.prompt_tokens,
        "gen_ai.usage.output_tokens": call.completion_tokens,
        "gen_ai.response.finish_reasons": sorted(Counter(call.finish_reasons)),
        "ttalign.call.aborted": call.aborted,
    }
    if call.replica is not None:
        attributes["ttalign.replica"] = call.replica
    return attributes


def _reward_attributes(call: RewardCallRecord) -> dict[str, Any]:
    return {
        "ttalign.call.kind": "reward",
        "ttalign.reward": call.reward,
        "ttalign.reward.candidates": call.candidates,
        "ttalign.reward.partial": call.partial,
    }


def build_request_tracing(endpoint: str | None) -> RequestTracing | None:
    """Tracing to ``endpoint`` over OTLP, or ``None`` (off) without one."""
    return None if not endpoint else RequestTracing(BatchSpanProcessor(otlp_exporter(endpoint)))
