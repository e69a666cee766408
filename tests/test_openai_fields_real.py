"""OpenAI fields that change the answer are honoured on the real engine, in every strategy
where they make sense: response_format, logit_bias, penalties, top_k and min_p; and vLLM's
extensions min_tokens, stop_token_ids, include_stop_str_in_output and allowed_token_ids."""

from __future__ import annotations

import json
from functools import cache

import openai
import pytest
from ttalign.server.model_prep import prepare_embedded_model

from tests.servers import RunningServer

pytestmark = [pytest.mark.real_engine, pytest.mark.fleet]

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What color is the sky? Answer in JSON."}]
COLOR_SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "color", "schema": COLOR_SCHEMA, "strict": True},
}
RULES = {"reward": "rules", "constraints": [{"type": "json"}]}


@pytest.fixture(scope="module")
def client(real_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)


@cache
def _token_id(text: str) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded_model())
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    return token


def _assert_color_json(text: str) -> None:
    assert json.loads(text)["color"] in {"red", "green", "blue"}, text


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=30,
        temperature=1.0,
        n=3,
        response_format=JSON_SCHEMA_FORMAT,
    )
    for choice in response.choices:
        _assert_color_json(choice.message.content)


def test_json_object_response_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    content = response.choices[0].message.content
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    assert content.lstrip().startswith("{")


def test_every_best_of_n_candidate_obeys_response_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=30,
        response_format=JSON_SCHEMA_FORMAT,
        extra_body={
            "strategy": "best_of_n",
            "strategy_config": {"n": 4},
            "return_trace": True,
            **RULES,
        },
    )
    candidates = response.model_extra["alignment"]["trace"]["candidates"]
    assert len(candidates) == 4
    for candidate in candidates:
        _assert_color_json(candidate["text"])
    _assert_color_json(response.choices[0].message.content)


def test_tpo_sample_and_update_steps_obey_response_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=30,
        response_format=JSON_SCHEMA_FORMAT,
        extra_body={
            "strategy": "tpo",
            "strategy_config": {"depth": 1, "width": 3, "max_tokens": {"loss": 24, "gradient": 24}},
            "return_trace": True,
            "reward": "rules",
            "constraints": [{"type": "keywords", "required": ["blue"]}],
        },
    )
    trace = response.model_extra["alignment"]["trace"]
    rounds = {c["round"] for c in trace["candidates"]}
    assert 0 in rounds
    for candidate in trace["candidates"]:
        _assert_color_json(candidate["text"])
    # The critiques are free text: response_format applies to responses only.
    assert trace["rounds"][0]["loss"]


def test_logit_bias_forces_a_token(client: openai.OpenAI) -> None:
    forced = _token_id(" blue")
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=5,
        temperature=1.0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].message.content == " blue" * 5


def test_logit_bias_reaches_best_of_n_candidates(client: openai.OpenAI) -> None:
    forced = _token_id(" red")
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=3,
        logit_bias={str(forced): 100},
        extra_body={"strategy": "best_of_n", "strategy_config": {"n": 3}, **RULES},
    )
    assert response.choices[0].message.content == " red" * 3


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_and_min_p_narrow_sampling_to_the_argmax(
    client: openai.OpenAI, narrowing: dict
) -> None:
    common = dict(model=MODEL, messages=QUESTION, max_tokens=20)
    greedy = client.chat.completions.create(temperature=0, **common)
    narrowed = client.chat.completions.create(
        temperature=1.5, seed=7, extra_body=narrowing, **common
    )
    assert narrowed.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}],
)
def test_penalties_change_greedy_output(client: openai.OpenAI, penalty: dict) -> None:
    common = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Repeat the word 'apple' twenty times."}],
        max_tokens=40,
        temperature=0,
    )
    plain = client.chat.completions.create(**common).choices[0].message.content
    penalized = client.chat.completions.create(
        **common, **({"extra_body": penalty} if "repetition" in next(iter(penalty)) else penalty)
    )
    assert penalized.choices[0].message.content != plain


# --- vLLM's request extensions (sent through extra_body, as to `vllm serve`) ---------------

YES_NO = [{"role": "user", "content": "Is the sky green? Answer yes or no."}]
COUNT = [{"role": "user", "content": "Count from one to ten."}]


def test_allowed_token_ids_force_the_answer(client: openai.OpenAI) -> None:
    options = {_token_id(" yes"): " yes", _token_id(" no"): " no"}
    free = client.chat.completions.create(model=MODEL, messages=YES_NO, max_tokens=1, temperature=0)
    assert free.choices[0].message.content not in options.values()
    forced = client.chat.completions.create(
        model=MODEL,
        messages=YES_NO,
        max_tokens=1,
        temperature=1.0,
        n=4,
        extra_body={"allowed_token_ids": list(options)},
    )
    assert len(forced.choices) == 4
    assert {choice.message.content for choice in forced.choices} <= set(options.values())


def test_min_tokens_holds_off_a_stop_token(client: openai.OpenAI) -> None:
    # Greedy SmolLM2 counts "1. 1\n2. 2\n...": a stop at "." ends the reply after 2 tokens.
    common = dict(model=MODEL, messages=COUNT, max_tokens=16, temperature=0)
    stop = {"stop_token_ids": [_token_id(".")]}
    early = client.chat.completions.create(**common, extra_body=stop)
    assert early.choices[0].finish_reason == "stop"
    assert early.usage.completion_tokens == 2 and early.choices[0].message.content == "1"
    held = client.chat.completions.create(
        **common, logprobs=True, extra_body={**stop, "min_tokens": 8}
    )
    tokens = [entry.token for entry in held.choices[0].logprobs.content]
    assert held.usage.completion_tokens == len(tokens) >= 8
    assert "." not in tokens[:8] and tokens[0] == "1"


@pytest.mark.parametrize(("kind", "content"), [("string", "1. 1\n2. 2\n3"), ("token", "1.")])
def test_include_stop_str_in_output_keeps_the_stop(
    client: openai.OpenAI, kind: str, content: str
) -> None:
    stop = {"stop": ["3"]} if kind == "string" else {"stop_token_ids": [_token_id(".")]}
    common = dict(model=MODEL, messages=COUNT, max_tokens=16, temperature=0)
    cut = client.chat.completions.create(**common, extra_body=stop)
    kept = client.chat.completions.create(
        **common, extra_body={**stop, "include_stop_str_in_output": True}
    )
    assert kept.choices[0].message.content == content
    assert cut.choices[0].message.content == content[:-1]
    assert kept.choices[0].finish_reason == cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"min_tokens": 9}, "min_tokens"),  # above max_tokens
        ({"allowed_token_ids": [10**7]}, "allowed_token_ids"),  # outside the vocabulary
        ({"stop_token_ids": [10**7]}, "stop_token_ids"),
    ],
)
def test_bad_extensions_are_400s_naming_the_param(
    client: openai.OpenAI, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=8, extra_body=extra)
    error = caught.value.response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
