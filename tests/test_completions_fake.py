"""``POST /v1/completions`` through the official client, on the scripted fake engine."""

from __future__ import annotations

import openai
import pytest

from tests.fakes import FakeEngine
from tests.servers import RunningServer

MODEL = "fake-model"


@pytest.fixture
def client(fake_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_server.api_url, api_key="x", max_retries=0)


def error_of(caught: pytest.ExceptionInfo) -> dict:
    return caught.value.response.json()["error"]


def test_text_prompt_reaches_the_engine_as_sent(
    client: openai.OpenAI, fake_engine: FakeEngine
) -> None:
    answer = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert [c.text for c in answer.choices] == ["candidate 0"]
    assert answer.choices[0].finish_reason == "stop"
    # No chat template: the engine got the prompt itself.
    assert [call.raw_prompt for call in fake_engine.calls] == ["Once upon a time"]
    assert answer.usage.prompt_tokens == 4 and answer.usage.completion_tokens == 2
    assert answer.model_extra["alignment"]["strategy"] == "none"


def test_token_id_prompt_reaches_the_engine_as_ids(
    client: openai.OpenAI, fake_engine: FakeEngine
) -> None:
    answer = client.completions.create(model=MODEL, prompt=[72, 105], max_tokens=5)
    assert answer.choices[0].text == "candidate 0"
    assert fake_engine.calls[-1].raw_prompt == [72, 105]


def test_a_batch_of_prompts_gives_n_choices_each_in_order(
    client: openai.OpenAI, fake_engine: FakeEngine
) -> None:
    answer = client.completions.create(
        model=MODEL, prompt=["first prompt", "second one here"], n=2, max_tokens=5
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert [c.text for c in answer.choices] == ["candidate 0", "candidate 1"] * 2
    assert sorted(call.raw_prompt for call in fake_engine.calls) == [
        "first prompt",
        "second one here",
    ]
    alignment = answer.model_extra["alignment"]
    assert isinstance(alignment, list) and len(alignment) == 2
    assert answer.usage.prompt_tokens == 2 + 3
    assert answer.usage.completion_tokens == 4 * 2


def test_echo_starts_each_choice_with_its_prompt(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="Say:", echo=True, max_tokens=5)
    assert answer.choices[0].text == "Say:candidate 0"
    chunks = list(
        client.completions.create(model=MODEL, prompt="Say:", echo=True, max_tokens=5, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Say:candidate 0"


def test_streamed_chunks_concatenate_per_choice(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=["a b", "c d"],
            n=2,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "candidate 0", 1: "candidate 1", 2: "candidate 0", 3: "candidate 1"}
    assert finishes == dict.fromkeys(range(4), "stop")
    assert chunks[-1].usage.completion_tokens == 8
    assert len(chunks[-1].model_extra["alignment"]) == 2


def test_logprobs_in_the_completions_shape(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="hi", logprobs=2, max_tokens=5)
    logprobs = answer.choices[0].logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.text_offset)
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])
    pairs = zip(logprobs.tokens, logprobs.top_logprobs, strict=True)
    assert all(token in top for token, top in pairs)


def test_best_of_n_serves_a_raw_prompt_under_a_reward(
    client: openai.OpenAI, fake_engine: FakeEngine
) -> None:
    answer = client.completions.create(
        model=MODEL,
        prompt="Write two words:",
        max_tokens=5,
        extra_body={
            "strategy": "best_of_n",
            "strategy_config": {"n": 4},
            "reward": "rules",
            "constraints": [{"type": "word_count", "max": 2}],
        },
    )
    alignment = answer.model_extra["alignment"]
    assert alignment["strategy"] == "best_of_n" and alignment["candidates_generated"] == 4
    assert alignment["rewards"][0] is not None
    assert fake_engine.calls[-1].raw_prompt == "Write two words:"


@pytest.mark.parametrize("strategy", ["tpo", "rain", "darwin"])
def test_strategies_that_rewrite_the_conversation_are_refused(
    client: openai.OpenAI, strategy: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=4, extra_body={"strategy": strategy}
        )
    error = error_of(caught)
    assert error["param"] == "strategy" and error["code"] == "unsupported_strategy"
    assert "/v1/chat/completions" in error["message"] and "best_of_n" in error["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["ok", ""]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "suffix": "tail"}, "suffix"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": ["x"] * 17}, "prompt"),
        ({"prompt": "x", "n": 17}, "n"),
    ],
)
def test_invalid_requests_are_400_naming_the_param(
    client: openai.OpenAI, kwargs: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, max_tokens=4, **kwargs)
    assert error_of(caught)["param"] == param


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
