"""API behaviour that needs no real engine: the scripted fake engine behind a real uvicorn."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest
from ttalign.server.app import create_app
from ttalign.strategies.base import (
    ChoiceResult,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
)
from ttalign.strategies.registry import _REGISTRY, register_strategy

from tests.conftest import fake_settings
from tests.fakes import FakeEngine
from tests.servers import RunningServer, serve_in_thread, wait_until, wait_until_sync

QUESTION = [{"role": "user", "content": "hello"}]


class RoundsConfig(StrategyConfig):
    rounds: int = 3


class ScriptedRounds(Strategy[RoundsConfig]):
    """A multi-round strategy that reports progress after each round."""

    name = "test_rounds"
    description = "test only"
    config_model = RoundsConfig

    async def run(self, ctx: StrategyContext, config: RoundsConfig) -> StrategyResult:
        best = ""
        for round_number in range(1, config.rounds + 1):
            generation = await ctx.sample(ctx.request.messages, ctx.request.sampling)
            best = generation.completions[0].text
            ctx.report(round=round_number, best_score=float(round_number))
        return StrategyResult([ChoiceResult(best, "stop", 2, reward=1.5)], rounds=config.rounds)


class Exploding(Strategy[StrategyConfig]):
    name = "test_exploding"
    description = "test only"
    config_model = StrategyConfig

    async def run(self, ctx: StrategyContext, config: StrategyConfig) -> StrategyResult:
        raise RuntimeError("secret internal detail")


@pytest.fixture(scope="module", autouse=True)
def test_strategies():
    for cls in (ScriptedRounds, Exploding):
        register_strategy(cls)
    yield
    for cls in (ScriptedRounds, Exploding):
        _REGISTRY.pop(cls.name, None)


@pytest.fixture
def client(fake_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_server.api_url, api_key="x", max_retries=0)


def test_progress_chunks_come_before_the_answer(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"strategy": "test_rounds", "strategy_config": {"rounds": 3}},
        )
    )
    progress = [
        c.model_extra["alignment_progress"]
        for c in chunks
        if c.model_extra.get("alignment_progress")
    ]
    assert [p["round"] for p in progress] == [1, 2, 3]
    first_content = next(
        i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content
    )
    last_progress = max(i for i, c in enumerate(chunks) if c.model_extra.get("alignment_progress"))
    assert last_progress < first_content
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "candidate 0"
    assert chunks[-1].usage.completion_tokens == 2
    assert chunks[-1].model_extra["alignment"]["rounds"] == 3
    assert chunks[-1].model_extra["alignment"]["engine_calls"] == 3


def test_non_streamed_alignment_metadata(client: openai.OpenAI, fake_engine: FakeEngine) -> None:
    fake_engine.delay = 0.2  # two engine calls: the request takes at least 0.4 s
    response = client.chat.completions.create(
        model="fake-model",
        messages=QUESTION,
        extra_body={"strategy": "test_rounds", "strategy_config": {"rounds": 2}},
    )
    alignment = response.model_extra["alignment"]
    assert alignment["strategy"] == "test_rounds"
    assert alignment["rounds"] == 2
    assert alignment["engine_calls"] == 2
    assert alignment["candidates_generated"] == 2
    assert alignment["rewards"] == [1.5]
    assert 0.4 <= alignment["elapsed_seconds"] < 30


def test_strategy_config_type_error_names_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fake-model",
            messages=QUESTION,
            extra_body={"strategy": "test_rounds", "strategy_config": {"rounds": "many"}},
        )
    assert caught.value.response.json()["error"]["param"] == "strategy_config.rounds"


def test_internal_errors_are_500_without_internals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="fake-model", messages=QUESTION, extra_body={"strategy": "test_exploding"}
        )
    error = caught.value.response.json()["error"]
    assert "secret" not in error["message"] and "Traceback" not in error["message"]


def test_stream_failure_sends_error_then_done(fake_server: RunningServer) -> None:
    with httpx.stream(
        "POST",
        f"{fake_server.api_url}/chat/completions",
        json={
            "model": "fake-model",
            "messages": QUESTION,
            "stream": True,
            "strategy": "test_exploding",
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2]


def test_default_strategy_comes_from_settings() -> None:
    engine = FakeEngine()
    app = create_app(fake_settings(default_strategy="test_rounds"), engine_factory=lambda _: engine)
    with serve_in_thread(app) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0)
        response = client.chat.completions.create(model="fake-model", messages=QUESTION)
    assert response.model_extra["alignment"]["strategy"] == "test_rounds"
    assert len(engine.calls) == 3


def test_graceful_shutdown_finishes_in_flight_and_refuses_new() -> None:
    engine = FakeEngine(delay=1.5)
    app = create_app(fake_settings(), engine_factory=lambda _: engine)
    results: dict[str, object] = {}
    with serve_in_thread(app, graceful_timeout=10) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0)

        def slow_request() -> None:
            results["response"] = client.chat.completions.create(
                model="fake-model", messages=QUESTION
            )

        worker = threading.Thread(target=slow_request)
        worker.start()
        wait_until_sync(lambda: engine.running > 0, timeout=10)
        running.server.should_exit = True
        worker.join(timeout=10)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="fake-model", messages=QUESTION)
    assert results["response"].choices[0].message.content == "candidate 0"


async def test_disconnect_cancels_the_strategy(
    fake_server: RunningServer, fake_engine: FakeEngine
) -> None:
    fake_engine.delay = 30
    client = openai.AsyncOpenAI(base_url=fake_server.api_url, api_key="x", max_retries=0)
    task = asyncio.create_task(
        client.chat.completions.create(model="fake-model", messages=QUESTION)
    )
    await wait_until(lambda: fake_engine.running > 0, timeout=10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(200):
        if fake_engine.running == 0:
            break
        await asyncio.sleep(0.01)
    assert fake_engine.running == 0


@pytest.mark.parametrize(
    ("generation_config", "request_fields", "expected"),
    [
        ("auto", {}, {"temperature": 0.3, "top_k": 20, "repetition_penalty": 1.1}),
        ("auto", {"temperature": 1.2, "top_k": 5}, {"temperature": 1.2, "top_k": 5}),
        ("vllm", {}, {"temperature": 1.0, "top_k": None, "repetition_penalty": 1.0}),
    ],
)
def test_sampling_defaults_follow_the_models_generation_config(
    generation_config: str, request_fields: dict, expected: dict
) -> None:
    engine = FakeEngine()
    if generation_config == "auto":  # as the vLLM engine does: "vllm" means no model defaults
        engine.sampling_defaults = {"temperature": 0.3, "top_k": 20, "repetition_penalty": 1.1}
    app = create_app(
        fake_settings(generation_config=generation_config), engine_factory=lambda _: engine
    )
    with serve_in_thread(app) as server:
        response = httpx.post(
            f"{server.api_url}/chat/completions",
            json={"model": "fake-model", "messages": QUESTION, **request_fields},
        )
    assert response.status_code == 200
    sampling = engine.calls[-1].sampling
    for name, value in expected.items():
        assert getattr(sampling, name) == value, name
