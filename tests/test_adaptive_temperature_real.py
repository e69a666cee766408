"""adaptive_temperature on the real engine, through the official openai client.

The session server loads the heads shipped for the embedded SmolLM2 (engine/heads), so
``learned`` runs the trained heads inside vLLM's sampler. Under ``--fleet`` the tests marked
``FLEET`` run through the gateway, on replicas started with ttalign's processor and routes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.servers import RunningServer, validated_chunks

pytestmark = pytest.mark.real_engine
#: Also served through the gateway (``--fleet``): the replicas run ttalign's processor. The
#: tests that compare texts across calls stay in-process, where every call shares one engine.
FLEET = pytest.mark.fleet

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Write two sentences about a lighthouse keeper."}]
TEMPERATURES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def client(real_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)


def request(config: dict[str, Any], *, n: int = 1, seed: int = 3, **extra: Any) -> dict:
    return {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": MAX_TOKENS,
        "seed": seed,
        "n": n,
        "extra_body": {
            "strategy": "adaptive_temperature",
            "strategy_config": config,
            "return_trace": True,
            **extra,
        },
    }


def whole(client: openai.OpenAI, config: dict[str, Any], **kwargs: Any) -> ChatCompletion:
    """A non-streamed request; the raw body is validated against the SDK's model."""
    raw = client.chat.completions.with_raw_response.create(**request(config, **kwargs))
    return ChatCompletion.model_validate(raw.http_response.json())


def streamed(client: openai.OpenAI, config: dict[str, Any]) -> list[ChatCompletionChunk]:
    """A streamed request; every raw SSE event is validated against the SDK's chunk model."""
    return validated_chunks(client, request(config))


def alignment_of(chunks: list[ChatCompletionChunk]) -> dict[str, Any]:
    found = [c.model_extra["alignment"] for c in chunks if (c.model_extra or {}).get("alignment")]
    assert len(found) == 1
    return found[0]


@FLEET
def test_the_shipped_heads_are_loaded(client: openai.OpenAI) -> None:
    reply = whole(client, {"level": "example", "mode": "learned"})
    alignment = reply.model_extra["alignment"]
    assert alignment["temperature_head"] == "smollm2-example"
    reply = whole(client, {"level": "token", "mode": "learned"})
    assert reply.model_extra["alignment"]["temperature_head"] == "smollm2-token"


@FLEET
@pytest.mark.parametrize("mode", ["learned", "entropy"])
def test_example_level_picks_one_temperature_from_the_set(client: openai.OpenAI, mode: str) -> None:
    reply = whole(client, {"level": "example", "mode": mode})
    alignment = reply.model_extra["alignment"]
    assert alignment["strategy"] == "adaptive_temperature"
    assert alignment["temperature_level"] == "example"
    assert alignment["temperature"] in TEMPERATURES
    assert alignment["trace"]["probe_token_id"] == TEMPERATURES.index(alignment["temperature"])
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == MAX_TOKENS or reply.choices[0].finish_reason == "stop"
    # One probe plus the reply.
    assert alignment["engine_calls"] == 2


@FLEET
def test_example_level_streams_tokens(client: openai.OpenAI) -> None:
    chunks = streamed(client, {"level": "example", "mode": "entropy"})
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3  # real token streaming, not one chunk at the end
    alignment = alignment_of(chunks)
    assert alignment["temperature"] in TEMPERATURES


@FLEET
@pytest.mark.parametrize("mode", ["learned", "entropy"])
def test_token_level_traces_each_tokens_temperature(client: openai.OpenAI, mode: str) -> None:
    reply = whole(client, {"level": "token", "mode": mode})
    alignment = reply.model_extra["alignment"]
    per_token = alignment["trace"]["choices"][0]["token_temperatures"]
    assert len(per_token) == reply.usage.completion_tokens
    assert set(per_token) <= set(TEMPERATURES)
    histogram = alignment["temperature_histogram"]
    assert sum(histogram.values()) == len(per_token)
    assert alignment["temperature_mean"] == pytest.approx(sum(per_token) / len(per_token))
    if mode == "entropy":
        # Confident and uncertain positions get different temperatures.
        assert len(set(per_token)) > 1, per_token


@FLEET
def test_token_level_streams_and_reports_the_histogram(client: openai.OpenAI) -> None:
    chunks = streamed(client, {"level": "token", "mode": "entropy"})
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3
    alignment = alignment_of(chunks)
    per_token = alignment["trace"]["choices"][0]["token_temperatures"]
    assert len(per_token) == sum(alignment["temperature_histogram"].values()) > 0


@FLEET
def test_token_level_n_gives_each_choice_its_own_record(client: openai.OpenAI) -> None:
    reply = whole(client, {"level": "token", "mode": "entropy"}, n=2)
    choices = reply.model_extra["alignment"]["trace"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    total = sum(len(c["token_temperatures"]) for c in choices)
    assert total == reply.usage.completion_tokens


def test_temperature_zero_at_every_token_is_greedy(client: openai.OpenAI) -> None:
    greedy = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0.0
    )
    reply = whole(client, {"level": "token", "mode": "entropy", "temperatures": [0.0]})
    assert reply.choices[0].message.content == greedy.choices[0].message.content


async def _concurrently(client: openai.OpenAI, plain: dict[str, Any]) -> str:
    adaptive = request({"level": "token", "mode": "learned"}, seed=11)
    adaptive["max_tokens"] = 48
    with ThreadPoolExecutor(4) as pool:
        loop = asyncio.get_running_loop()
        others = [
            loop.run_in_executor(pool, lambda: client.chat.completions.create(**adaptive))
            for _ in range(3)
        ]
        mine = loop.run_in_executor(pool, lambda: client.chat.completions.create(**plain))
        results = await asyncio.gather(mine, *others)
    return results[0].choices[0].message.content


def test_a_request_that_did_not_opt_in_is_untouched_by_its_neighbours(
    client: openai.OpenAI,
) -> None:
    plain = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 32,
        "temperature": 0.9,
        "seed": 1234,
    }
    alone = client.chat.completions.create(**plain).choices[0].message.content
    beside = asyncio.run(_concurrently(client, plain))
    assert beside == alone


@FLEET
@pytest.mark.parametrize(
    ("config", "extra", "param"),
    [
        ({"level": "token", "mode": "learned"}, {"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"level": "token", "mode": "entropy"}, {"presence_penalty": 0.5}, "presence_penalty"),
        ({"level": "example", "mode": "learned", "head": "nope"}, {}, "strategy_config.head"),
        (
            {"level": "token", "mode": "learned", "head": "smollm2-example"},
            {},
            "strategy_config.head",
        ),
        (
            {"level": "example", "mode": "learned", "temperatures": [0.3]},
            {},
            "strategy_config.temperatures",
        ),
    ],
)
def test_bad_combinations_are_400s_naming_the_parameter(
    client: openai.OpenAI, config: dict, extra: dict, param: str
) -> None:
    arguments = request(config)
    for key, value in extra.items():
        arguments[key] = value
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**arguments)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
