"""rain on the real engine, through the official openai client: self-evaluation and rules."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.servers import RunningServer, wait_until

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Name one thing people like about the sea."}]
#: Small enough for CI: a few commits of 1, 2, 4 and 10 tokens.
MAX_TOKENS = 12
FAST = {"max_iterations": 8, "simulation_max_tokens": 8}
PREFIX_RULES = [{"type": "keywords", "forbidden": ["the"]}, {"type": "case", "case": "lower"}]


@pytest.fixture(scope="module")
def client(real_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)


def body(config: dict, *, stream: bool, **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": MAX_TOKENS,
        "seed": 5,
        "stream": stream,
        "strategy": "rain",
        "strategy_config": {**FAST, **config},
        "return_trace": True,
        **extra,
    }


def rain(client: openai.OpenAI, config: dict, **extra: object) -> ChatCompletion:
    payload = body(config, stream=False, **extra)
    standard = {k: payload.pop(k) for k in ("model", "messages", "max_tokens", "seed")}
    return client.chat.completions.create(**standard, extra_body=payload)


def streamed(client: openai.OpenAI, config: dict, **extra: object) -> list[ChatCompletionChunk]:
    payload = body(config, stream=True, **extra)
    standard = {k: payload.pop(k) for k in ("model", "messages", "max_tokens", "seed", "stream")}
    return list(client.chat.completions.create(**standard, extra_body=payload))


CASES = {
    "self": ({"evaluator": "self", "rubric": "harmless"}, {}),
    "rules": ({"evaluator": "reward", "reward": "rules"}, {"constraints": PREFIX_RULES}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_rain_equals_the_answer_and_the_trace_shows_the_search(
    client: openai.OpenAI, real_server: RunningServer, case: str
) -> None:
    config, extra = CASES[case]
    answer = rain(client, config, **extra)
    chunks = streamed(client, config, **extra)

    alignment = answer.model_extra["alignment"]
    assert alignment["strategy"] == "rain"
    assert alignment["commits"] >= 3 and alignment["iterations"] >= alignment["commits"]
    assert alignment["evaluator_calls"] >= 1 and alignment["engine_calls"] > alignment["commits"]
    search = alignment["trace"]["searches"][0]
    assert len(search["commits"]) == alignment["commits"]
    assert [c["committed_tokens"] for c in search["commits"][:3]] == [1, 2, 4]
    assert alignment["rewinds"] == sum(c["rewinds"] for c in search["commits"])
    for commit in search["commits"]:
        visits = [c["visits"] for c in commit["candidates"]]
        assert len(commit["candidates"]) >= 1 and max(visits) > 0
    content = answer.choices[0].message.content
    assert (content and answer.usage.completion_tokens == MAX_TOKENS) or (
        answer.choices[0].finish_reason == "stop"
    )

    # Streaming: the committed segments arrive as content deltas while the search goes on,
    # with progress chunks in between, and add up to the same answer for the same seed.
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3
    assert "".join(texts) == content
    assert any("alignment_progress" in (c.model_extra or {}) for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == answer.choices[0].finish_reason
    # The first content arrives before the last progress report: true streaming.
    first_content = next(
        i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content
    )
    last_progress = max(
        i for i, c in enumerate(chunks) if "alignment_progress" in (c.model_extra or {})
    )
    assert first_content < last_progress


def test_raw_rain_bodies_validate_against_the_sdk_models(real_server: RunningServer) -> None:
    payload = body({"evaluator": "self"}, stream=False)
    response = httpx.post(f"{real_server.api_url}/chat/completions", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())
    with httpx.stream(
        "POST", f"{real_server.api_url}/chat/completions",
        json=body({"evaluator": "self"}, stream=True), timeout=300,
    ) as streaming:  # fmt: skip
        lines = [line for line in streaming.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        ChatCompletionChunk.model_validate_json(line.removeprefix("data: "))


def test_the_rules_reward_steers_rain_away_from_the_likeliest_start(
    client: openai.OpenAI,
) -> None:
    # The model's likeliest reply starts "One thing ..."; with "one" forbidden, every
    # partial reply that contains it is worth -1, and the search commits another start.
    plain = (
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
        .choices[0]
        .message.content
    )
    assert plain.lower().startswith("one")
    answer = rain(
        client,
        {"evaluator": "reward", "reward": "rules", "max_iterations": 30},
        constraints=[{"type": "keywords", "forbidden": ["one"]}],
    )
    first = answer.model_extra["alignment"]["trace"]["searches"][0]["commits"][0]
    candidates = {c["text"]: c for c in first["candidates"]}
    assert first["committed"] != "One" and "One" in candidates
    assert candidates["One"]["value"] < candidates[first["committed"]]["value"]
    assert candidates["One"]["prior"] == max(c["prior"] for c in candidates.values())


def test_rain_refuses_what_it_cannot_honour(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=8, logprobs=True,
            extra_body={"strategy": "rain"},
        )  # fmt: skip
    assert caught.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        rain(client, {"evaluator": "reward", "reward": "no-such-reward"})
    assert caught.value.body["param"] == "strategy_config.reward"


async def test_a_disconnect_aborts_the_whole_search(real_server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)
    engine = real_server.app.state.engine

    payload = body({"evaluator": "self"}, stream=False)
    standard = {k: payload.pop(k) for k in ("model", "messages", "seed")}
    standard["max_tokens"] = 200
    payload.pop("max_tokens")
    payload.pop("stream")  # each call below says whether it streams
    task = asyncio.create_task(client.chat.completions.create(**standard, extra_body=payload))
    await wait_until(lambda: engine.engine_running_requests() > 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(lambda: engine.engine_running_requests() == 0, timeout=10)

    stream = await client.chat.completions.create(**standard, stream=True, extra_body=payload)
    seen = []
    async for chunk in stream:
        seen.append(chunk)
        progress = (chunk.model_extra or {}).get("alignment_progress") or {}
        if progress.get("iterations", 0) > 4 and engine.engine_running_requests() > 0:
            break
        assert not (chunk.choices and chunk.choices[0].finish_reason), seen
    else:
        raise AssertionError(f"the stream ended before the search got going: {seen}")
    await stream.close()
    await wait_until(lambda: engine.engine_running_requests() == 0, timeout=10)
    await client.close()


def test_at_the_deadline_rain_returns_what_it_committed_plus_its_best_guess(
    client: openai.OpenAI,
) -> None:
    started = time.monotonic()
    # Long enough for the first expansion to finish on a float32 CPU under load (else there
    # is nothing to return yet); far shorter than the 50 iterations a commit would take.
    answer = rain(client, {"evaluator": "self", "max_iterations": 50}, deadline_seconds=8.0)
    assert time.monotonic() - started < 20
    alignment = answer.model_extra["alignment"]
    assert alignment["stopped_early"] is True
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content
