"""OpenTelemetry spans: one per request, a child per engine and reward call, and W3C trace
context honoured from the client and passed on to a fleet's replicas.

The spans go to opentelemetry-sdk's in-memory exporter, except in the test that checks the
OTLP export itself: there a collector in this process receives them over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from ttalign.benchmarks.otlp_collector import OtlpCollector
from ttalign.server.app import create_app
from ttalign.server.tracing import PROTOCOL_VARIABLE, RequestTracing

from tests.conftest import fake_settings
from tests.fake_vllm_server import MODEL_NAME, FakeVllm, model_folder, serve_fake
from tests.fakes import FakeEngine
from tests.servers import RunningServer, serve_in_thread, wait_until_sync

CHAT = [{"role": "user", "content": "Name three colours."}]
CONSTRAINTS = [{"type": "word_count", "max": 40}]
#: A client's trace: its trace id and the id of its span that sent the request.
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"


class Spans:
    """Tracing into opentelemetry-sdk's in-memory exporter, exported as each span ends."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracing = RequestTracing(SimpleSpanProcessor(self.exporter))

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def roots(self) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.kind == SpanKind.SERVER]

    def children(self, root: ReadableSpan) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.parent and s.parent.span_id == root.context.span_id]


@pytest.fixture
def spans() -> Spans:
    return Spans()


@pytest.fixture
def traced_server(spans: Spans) -> Iterator[RunningServer]:
    """ttalign over the fake engine, with every request traced into ``spans``."""
    app = create_app(
        fake_settings(),
        engine_factory=lambda _: FakeEngine(),
        tracing_factory=lambda _: spans.tracing,
    )
    with serve_in_thread(app) as running:
        yield running


def client_of(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


def best_of_n(client: openai.OpenAI, **extra: object) -> object:
    return client.chat.completions.create(
        model="fake-model",
        messages=CHAT,
        max_tokens=16,
        extra_body={
            "strategy": "best_of_n",
            "strategy_config": {"n": 3},
            "reward": "rules",
            "constraints": CONSTRAINTS,
            "return_trace": True,
        },
        **extra,
    )


def assert_spans_match_the_timeline(spans: Spans, root: ReadableSpan, timeline: list[dict]) -> None:
    """One child per timeline call, in order, each as long as the call it stands for."""
    children = sorted(spans.children(root), key=lambda s: s.start_time)
    assert [c.attributes["ttalign.call.kind"] for c in children] == [t["kind"] for t in timeline]
    for child, call in zip(children, timeline, strict=True):
        assert child.context.trace_id == root.context.trace_id
        assert child.kind == SpanKind.CLIENT
        seconds = (child.end_time - child.start_time) / 1e9
        # The timeline's offsets are rounded to the microsecond; the spans' are not.
        assert seconds == pytest.approx(call["end"] - call["start"], abs=2e-6)
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time


def test_a_request_exports_one_span_with_a_child_per_engine_and_reward_call(
    traced_server: RunningServer, spans: Spans
) -> None:
    reply = best_of_n(client_of(traced_server))
    timeline = reply.model_extra["alignment"]["trace"]["timeline"]
    assert [t["kind"] for t in timeline].count("engine") >= 1
    assert [t["kind"] for t in timeline].count("reward") >= 1

    [root] = spans.roots()
    assert root.name == "chat fake-model" and root.parent is None
    assert root.attributes["ttalign.strategy"] == "best_of_n"
    assert root.attributes["ttalign.reward"] == "rules"
    assert root.attributes["gen_ai.response.id"] == reply.id
    assert root.attributes["http.response.status_code"] == 200
    assert root.status.status_code == StatusCode.UNSET
    alignment = reply.model_extra["alignment"]
    assert root.attributes["ttalign.engine.calls"] == alignment["engine_calls"]
    assert (
        root.attributes["ttalign.engine.output_tokens"]
        == (alignment["engine_tokens"]["completion_tokens"])
    )
    assert_spans_match_the_timeline(spans, root, timeline)

    engine_spans = [c for c in spans.children(root) if c.name == "engine.generate"]
    engine_calls = [t for t in timeline if t["kind"] == "engine"]
    for span, call in zip(engine_spans, engine_calls, strict=True):
        assert span.attributes["gen_ai.usage.output_tokens"] == call["completion_tokens"]
        assert span.attributes["gen_ai.request.choice.count"] == call["n"]
        assert list(span.attributes["gen_ai.response.finish_reasons"]) == sorted(
            set(call["finish_reasons"])
        )
        assert span.attributes["ttalign.strategy"] == "best_of_n"
        assert "ttalign.replica" not in span.attributes  # the in-process engine
    [reward_span] = [c for c in spans.children(root) if c.name == "reward rules"]
    assert reward_span.attributes["ttalign.reward.candidates"] == 3


def test_a_streamed_request_is_traced_too(traced_server: RunningServer, spans: Spans) -> None:
    chunks = list(
        client_of(traced_server).chat.completions.create(
            model="fake-model", messages=CHAT, max_tokens=8, stream=True
        )
    )
    assert chunks
    [root] = spans.roots()
    assert root.attributes["ttalign.stream"] is True
    assert root.attributes["ttalign.strategy"] == "none"
    [call] = spans.children(root)
    assert call.name == "engine.generate"
    assert call.attributes["gen_ai.usage.output_tokens"] > 0


def test_the_clients_traceparent_is_the_request_spans_parent(
    traced_server: RunningServer, spans: Spans
) -> None:
    best_of_n(client_of(traced_server), extra_headers={"traceparent": TRACEPARENT})
    [root] = spans.roots()
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN_ID
    assert all(format(c.context.trace_id, "032x") == CLIENT_TRACE_ID for c in spans.children(root))


def test_a_refused_request_exports_an_error_span(
    traced_server: RunningServer, spans: Spans
) -> None:
    with pytest.raises(openai.BadRequestError):
        client_of(traced_server).chat.completions.create(
            model="fake-model",
            messages=CHAT,
            extra_body={"strategy": "no_such_strategy"},
            extra_headers={"traceparent": TRACEPARENT},
        )
    [span] = spans.finished()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 400
    assert span.attributes["error.type"] == "unknown_strategy"
    assert format(span.context.trace_id, "032x") == CLIENT_TRACE_ID


def test_a_failed_request_ends_its_span_as_an_error(spans: Spans) -> None:
    def broken(*_: object) -> object:
        raise RuntimeError("engine fell over")

    engine = FakeEngine(script=broken)
    app = create_app(
        fake_settings(), engine_factory=lambda _: engine, tracing_factory=lambda _: spans.tracing
    )
    with serve_in_thread(app) as running, pytest.raises(openai.InternalServerError):
        client_of(running).chat.completions.create(model="fake-model", messages=CHAT)
    [root] = spans.roots()
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["http.response.status_code"] == 500
    [call] = spans.children(root)
    assert call.attributes["ttalign.call.aborted"] is True


# --- a fleet's replicas join the trace ------------------------------------------------------


@pytest.fixture
def replica() -> Iterator[tuple[FakeVllm, str]]:
    fake = FakeVllm()
    with serve_fake(fake) as url:
        yield fake, url


def gateway(url: str, spans: Spans | None) -> object:
    settings = fake_settings(
        engine="remote",
        engine_urls=url,
        model=model_folder(),
        served_model_name=MODEL_NAME,
        engine_start_timeout=10,
        embedding_model="none",
    )
    factory = (lambda _: spans.tracing) if spans is not None else (lambda _: None)
    return create_app(settings, tracing_factory=factory)


def ask_through_gateway(running: RunningServer, headers: dict[str, str]) -> None:
    client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
    client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, extra_headers=headers
    )


def test_a_replica_receives_the_request_spans_context(
    replica: tuple[FakeVllm, str], spans: Spans
) -> None:
    fake, url = replica
    with serve_in_thread(gateway(url, spans), startup_timeout=60) as running:
        ask_through_gateway(running, {"traceparent": TRACEPARENT})
    [root] = spans.roots()
    [call] = fake.completions
    version, trace_id, parent_id, _ = call.headers["traceparent"].split("-")
    assert (version, trace_id) == ("00", CLIENT_TRACE_ID)
    assert parent_id == format(root.context.span_id, "016x")  # vLLM's spans hang under ours
    [engine_span] = spans.children(root)
    assert engine_span.attributes["ttalign.replica"] == url


def test_with_tracing_off_a_replica_still_receives_the_clients_traceparent(
    replica: tuple[FakeVllm, str],
) -> None:
    fake, url = replica
    with serve_in_thread(gateway(url, None), startup_timeout=60) as running:
        ask_through_gateway(running, {"traceparent": TRACEPARENT})
        ask_through_gateway(running, {})
    first, second = fake.completions
    assert first.headers["traceparent"] == TRACEPARENT
    assert "traceparent" not in second.headers


# --- export over OTLP -----------------------------------------------------------------------


def test_spans_reach_an_otlp_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROTOCOL_VARIABLE, "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    with OtlpCollector() as collector:
        app = create_app(
            fake_settings(otlp_traces_endpoint=collector.url),
            engine_factory=lambda _: FakeEngine(),
        )
        with serve_in_thread(app) as running:
            best_of_n(client_of(running))
            wait_until_sync(lambda: len(collector.spans) >= 3, timeout=10)
    names = sorted(s.name for s in collector.spans)
    assert names == ["chat fake-model", "engine.generate", "reward rules"]
    [root] = [s for s in collector.spans if s.name == "chat fake-model"]
    assert all(s.parent_span_id == root.span_id for s in collector.spans if s is not root)


def test_an_unknown_exporter_protocol_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROTOCOL_VARIABLE, "carrier-pigeon")
    with pytest.raises(ValueError, match="grpc or http/protobuf"):
        create_app(fake_settings(otlp_traces_endpoint="http://127.0.0.1:1"))
