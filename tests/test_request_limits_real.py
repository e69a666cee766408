"""Hostile but ordinary input against the real server: every case is a 4xx naming the param,
and nothing a request sends can stall the event loop for the other streams."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.servers import RunningServer

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Name three colors."}]


def _post(server: RunningServer, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            f"{server.api_url}/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=60,
        )
    return httpx.post(f"{server.api_url}/chat/completions", json=body, timeout=60)


def _error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    return error


def _chat(**fields: object) -> dict:
    return {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **fields}


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 50_000,
        b'{"model": "smollm2", "messages": ' + b"[" * 50_000 + b"}",
        b'{"model": "smollm2", "messages": [], "n": ' + b"9" * 5000 + b"}",
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], '
        b'"temperature": NaN}',
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
        b"\xff\xfe{}",
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "a \xed\xa0\x80 b"}]}',
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}',
    ],
    ids=[
        "deep-array",
        "deep-messages",
        "huge-int",
        "nan",
        "infinity",
        "bad-utf8",
        "encoded-surrogate",
        "escaped-surrogate",
    ],
)
def test_hostile_json_is_a_400(real_server: RunningServer, body: bytes) -> None:
    response = _post(real_server, body)
    assert response.status_code == 400, response.text
    assert _error(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**30])
def test_seed_beyond_int64_is_a_400_naming_seed(real_server: RunningServer, seed: int) -> None:
    response = _post(real_server, _chat(seed=seed))
    assert response.status_code == 400
    assert _error(response)["param"] == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_extreme_seeds_work_for_every_step_of_a_search(
    real_server: RunningServer, seed: int
) -> None:
    # TPO seeds its k-th engine call with seed + k: that must wrap, not overflow.
    body = _chat(
        seed=seed,
        max_tokens=8,
        strategy="tpo",
        reward="rules",
        constraints=[{"type": "word_count", "max": 50}],
        strategy_config={"depth": 1, "width": 2, "max_tokens": {"loss": 8, "gradient": 8}},
    )
    response = _post(real_server, body)
    assert response.status_code == 200, response.text
    assert response.json()["alignment"]["rounds"] == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_fields_that_change_meaning_are_refused_not_ignored(
    real_server: RunningServer, fields: dict, param: str
) -> None:
    response = _post(real_server, _chat(**fields))
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == param and error["code"] == "unsupported_parameter"


def test_harmless_openai_fields_are_accepted(real_server: RunningServer) -> None:
    body = _chat(tool_choice="none", tools=[], user="u1", store=False, metadata={"a": "b"})
    assert _post(real_server, body).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"42": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"constraints": [{"type": "json"}] * 65, "reward": "rules"}, "constraints"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_caps_and_field_ranges_are_400s_naming_the_param(
    real_server: RunningServer, fields: dict, param: str
) -> None:
    response = _post(real_server, _chat(**fields))
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == param


def test_message_count_cap(serve_on_real_engine) -> None:
    with serve_on_real_engine(max_messages=3) as server:
        many = [{"role": "user", "content": f"m{i}"} for i in range(4)]
        response = _post(server, {"model": MODEL, "messages": many, "max_tokens": 2})
        assert response.status_code == 400
        assert _error(response)["param"] == "messages"
        assert _post(server, {"model": MODEL, "messages": many[:3], "max_tokens": 2}).is_success


def test_score_candidates_are_capped(real_server: RunningServer) -> None:
    response = httpx.post(
        f"{real_server.api_url}/rewards/score",
        json={
            "reward": "rules",
            "messages": QUESTION,
            "candidates": ["x" * 65_537],
            "constraints": [{"type": "json"}],
        },
    )
    assert response.status_code == 400
    assert _error(response)["param"] == "candidates[0]"


async def test_a_near_limit_request_never_stalls_other_streams(
    real_server: RunningServer,
) -> None:
    # ~3.8 MB of prompt: rendered and tokenized off the event loop, then refused as longer
    # than the context. Meanwhile a token stream on the same server must keep flowing.
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * 320_000}]}
    client = openai.AsyncOpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)
    # One stream after another until the refusal is answered: the refusal can take longer
    # than the longest stream the server allows (max_tokens_cap) on a slow machine.
    stop = asyncio.Event()
    arrivals: list[float] = []
    gaps: list[float] = []  # between the chunks of one stream, from its first chunk on

    async def keep_streaming() -> None:
        while not stop.is_set():
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                max_tokens=512,
                temperature=1.0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            previous = None
            async with stream:
                async for _chunk in stream:
                    now = time.monotonic()
                    if previous is not None:
                        gaps.append(now - previous)
                    previous = now
                    arrivals.append(now)
                    if stop.is_set():
                        break

    reader = asyncio.create_task(keep_streaming())
    await asyncio.sleep(1.0)  # let the stream get going first
    async with httpx.AsyncClient(timeout=120) as http:
        started = time.monotonic()
        response = await http.post(f"{real_server.api_url}/chat/completions", json=huge)
        answered = time.monotonic()
    await asyncio.sleep(1.0)  # and a little after
    stop.set()
    await asyncio.wait_for(reader, timeout=60)
    assert response.status_code == 400
    assert _error(response)["param"] == "messages"
    refused_after = answered - started
    during = [t for t in arrivals if started <= t <= answered]
    assert len(during) > 10, f"{len(during)} chunks while the refusal took {refused_after:.1f} s"
    # The stream must never pause > ~1 s, however long the refusal takes.
    assert max(gaps) < 1.0, f"longest pause {max(gaps):.2f} s ({refused_after=:.1f} s)"
