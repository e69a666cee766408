"""Call timelines: what the metered engine and rewards note, what the trace carries, and the
critical path read from them (``benchmarks/critical_path.py``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from ttalign.benchmarks.critical_path import (
    completion_body,
    critical_path_seconds,
    dependency_graph,
    replay,
    replay_concurrently,
)
from ttalign.engine.base import SamplingSettings
from ttalign.engine.metering import MeteredEngine
from ttalign.engine.timeline import CallTimeline
from ttalign.reward_clients.registry import RewardRegistry
from ttalign.server.app import create_app
from ttalign.strategies.base import AlignmentRequest, RewardResolver, StrategyContext

from tests.conftest import fake_settings
from tests.fakes import FakeEngine, FakeReward
from tests.servers import RunningServer, serve_in_thread

QUESTION = [{"role": "user", "content": "Name a fruit."}]


# --- the metered engine and rewards -----------------------------------------------------------


async def test_generate_and_stream_are_noted_in_order_with_their_counts() -> None:
    engine = FakeEngine(delay=0.01)
    timeline = CallTimeline()
    metered = MeteredEngine(engine, timeline)

    first = await metered.generate("one two three", SamplingSettings(n=2, max_tokens=7))
    deltas = [
        d
        async for d in metered.stream(
            [104, 105], SamplingSettings(n=3, max_tokens=5, top_k=4, ignore_eos=True)
        )
    ]
    calls = timeline.export()

    assert [c["kind"] for c in calls] == ["engine", "engine"]
    generate, stream = calls
    assert generate["n"] == 2 and generate["max_tokens"] == 7
    assert generate["prompt_tokens"] == first.prompt_tokens == 3
    assert generate["completion_tokens"] == first.completion_tokens == 4  # "candidate i" x2
    assert stream["n"] == 3 and stream["top_k"] == 4 and stream["ignore_eos"] is True
    assert stream["completion_tokens"] == sum(d.num_tokens for d in deltas) == 6
    assert stream["prompt_tokens"] == deltas[0].prompt_tokens
    assert not generate["aborted"] and not stream["aborted"]
    assert 0 <= generate["start"] < generate["end"] <= stream["start"] < stream["end"]
    assert generate["end"] - generate["start"] >= 0.009  # the engine's delay is inside
    # No prompts unless asked; the whole export is JSON.
    assert "prompt_token_ids" not in stream and "prompt_text" not in generate
    assert json.loads(json.dumps(calls)) == calls


async def test_an_aborted_stream_ends_when_it_closes() -> None:
    timeline = CallTimeline()
    metered = MeteredEngine(FakeEngine(), timeline)
    stream = metered.stream([1, 2, 3], SamplingSettings(n=2, max_tokens=5))
    await anext(stream)
    (running,) = timeline.export()
    assert running["end"] is None  # still in flight
    closed_at = timeline.now()
    await stream.aclose()
    (call,) = timeline.export()
    assert call["aborted"] is True
    assert call["completion_tokens"] == 1
    assert call["end"] >= closed_at


async def test_a_cancelled_generate_is_noted_as_aborted() -> None:
    timeline = CallTimeline()
    metered = MeteredEngine(FakeEngine(delay=5), timeline)
    task = asyncio.ensure_future(metered.generate("x", SamplingSettings()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (call,) = timeline.export()
    assert call["aborted"] is True and call["end"] is not None and call["end"] < 1


async def test_prompts_are_noted_only_when_asked_as_ids_or_text() -> None:
    timeline = CallTimeline(record_prompts=True)
    metered = MeteredEngine(FakeEngine(), timeline)
    ids = [104, 105]
    await metered.generate(ids, SamplingSettings())
    ids.append(33)  # a trajectory growing later does not change what was sent
    await metered.generate("plain text", SamplingSettings())
    by_ids, by_text = timeline.export()
    assert by_ids["prompt_token_ids"] == [104, 105] and "prompt_text" not in by_ids
    assert by_text["prompt_text"] == "plain text" and "prompt_token_ids" not in by_text


async def test_concurrent_calls_and_reward_calls_share_one_timeline() -> None:
    timeline = CallTimeline()
    engine = FakeEngine(delay=0.02)
    reward = FakeReward(name="length")
    ctx = StrategyContext(
        request=AlignmentRequest(messages=tuple(QUESTION), sampling=SamplingSettings()),
        engine=MeteredEngine(engine, timeline),
        rewards=RewardResolver(lambda name: reward, timeline),
    )
    # Two beams at once, one reward call on both, then one more step.
    beams = await asyncio.gather(
        ctx.generate("a", SamplingSettings()), ctx.generate("b", SamplingSettings(n=2))
    )
    texts = [c.text for g in beams for c in g.completions]
    await ctx.score(ctx.rewards.get(), QUESTION, texts, partial=True)
    await ctx.generate("c", SamplingSettings())

    calls = timeline.export()
    assert [c["kind"] for c in calls] == ["engine", "engine", "reward", "engine"]
    assert calls[2] == {
        **calls[2],
        "reward": "length",
        "candidates": 3,
        "partial": True,
    }
    assert ctx.rewards.usage.calls == 1
    graph = dependency_graph(calls)
    assert graph == [[], [], [0, 1], [0, 1, 2]]


# --- the trace through the API ----------------------------------------------------------------


def _server(**settings: object) -> Iterator[tuple[RunningServer, FakeEngine]]:
    engine = FakeEngine()
    reward = FakeReward(name="length")

    def rewards(settings, engine, metrics, judge_engine) -> RewardRegistry:
        return RewardRegistry({"length": reward}, default="length")

    app = create_app(
        fake_settings(**settings), engine_factory=lambda _: engine, reward_factory=rewards
    )
    with serve_in_thread(app) as running:
        yield running, engine


@pytest.fixture
def server() -> Iterator[tuple[RunningServer, FakeEngine]]:
    yield from _server()


@pytest.fixture
def prompt_server() -> Iterator[tuple[RunningServer, FakeEngine]]:
    yield from _server(trace_engine_prompts=True)


TPO_BODY = {
    "strategy": "tpo",
    "strategy_config": {"depth": 1, "width": 3},
    "max_tokens": 16,
}


def _alignment(running: RunningServer, **extra_body: object) -> dict:
    client = openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0)
    response = client.chat.completions.create(
        model="fake-model", messages=QUESTION, extra_body=extra_body
    )
    return response.model_extra["alignment"]


def test_the_trace_carries_the_timeline_only_with_return_trace(
    server: tuple[RunningServer, FakeEngine],
) -> None:
    running, _ = server
    alignment = _alignment(running, **TPO_BODY, return_trace=True)
    timeline = alignment["trace"]["timeline"]
    engine_calls = [c for c in timeline if c["kind"] == "engine"]
    assert len(engine_calls) == alignment["engine_calls"] == 4  # sample; loss, gradient, update
    assert [c["n"] for c in engine_calls] == [3, 1, 1, 3]
    assert sum(c["kind"] == "reward" for c in timeline) == alignment["reward_calls"]
    assert [c["start"] for c in timeline] == sorted(c["start"] for c in timeline)
    assert all("prompt_token_ids" not in c for c in engine_calls)  # the setting is off
    # TPO's steps are sequential: each call waits for every call before it.
    assert dependency_graph(timeline) == [list(range(j)) for j in range(len(timeline))]

    assert "trace" not in _alignment(running, **TPO_BODY)
    # best_of_n always traces its rewards; the timeline still needs return_trace.
    bon = _alignment(running, strategy="best_of_n", strategy_config={"n": 2})
    assert "rewards" in bon["trace"] and "timeline" not in bon["trace"]
    bon = _alignment(running, strategy="best_of_n", strategy_config={"n": 2}, return_trace=True)
    assert [c["kind"] for c in bon["trace"]["timeline"]] == ["engine", "reward"]


def test_a_streamed_request_gets_its_timeline_too(
    server: tuple[RunningServer, FakeEngine],
) -> None:
    running, _ = server
    client = openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=QUESTION,
            stream=True,
            extra_body={**TPO_BODY, "return_trace": True},
        )
    )
    alignment = chunks[-1].model_extra["alignment"]
    assert sum(c["kind"] == "engine" for c in alignment["trace"]["timeline"]) == 4


def test_trace_engine_prompts_adds_each_calls_prompt_ids(
    prompt_server: tuple[RunningServer, FakeEngine],
) -> None:
    running, engine = prompt_server
    timeline = _alignment(running, **TPO_BODY, return_trace=True)["trace"]["timeline"]
    recorded = [c["prompt_token_ids"] for c in timeline if c["kind"] == "engine"]
    assert recorded == [call.raw_prompt for call in engine.calls]
    assert len({tuple(ids) for ids in recorded}) == 4  # loss/gradient/update quote responses


# --- the critical path ------------------------------------------------------------------------


def _engine(start: float, end: float | None, **fields: object) -> dict:
    return {
        "kind": "engine",
        "start": start,
        "end": end,
        "n": 1,
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": None,
        "ignore_eos": True,
        "prompt_token_ids": [1, 2],
        **fields,
    }


def _reward(start: float, end: float) -> dict:
    return {"kind": "reward", "start": start, "end": end}


def test_dependency_graph_of_a_sequential_chain() -> None:
    chain = [_engine(0.0, 1.0), _reward(1.0, 1.2), _engine(1.2005, 2.0), _engine(2.5, 3.0)]
    assert dependency_graph(chain) == [[], [0], [0, 1], [0, 1, 2]]
    assert critical_path_seconds(chain) == pytest.approx(1.0 + 0.2 + 0.7995 + 0.5)


def test_dependency_graph_parallel_calls_share_predecessors() -> None:
    timeline = [
        _engine(0.0, 1.0),  # seed
        _engine(0.0001, 0.5),  # mutation, beside the seed
        _engine(0.6, 1.6),  # three beams, after the mutation only
        _engine(0.6001, 1.5),
        _engine(0.6002, 1.7),
        _reward(1.7, 1.8),  # scores every beam
        _engine(1.9, None),  # still running when exported: nobody waits for it
        _reward(1.95, 2.0),
    ]
    graph = dependency_graph(timeline)
    assert graph[0] == [] and graph[1] == []
    assert graph[2] == graph[3] == graph[4] == [1]
    assert graph[5] == [0, 1, 2, 3, 4]
    assert graph[6] == [0, 1, 2, 3, 4, 5]
    assert graph[7] == [0, 1, 2, 3, 4, 5]
    # Within the tolerance an end "after" a start still counts as before it.
    assert dependency_graph([_engine(0, 1.0005), _engine(1.0, 2)]) == [[], [0]]
    assert dependency_graph([_engine(0, 1.01), _engine(1.0, 2)]) == [[], []]


def test_completion_body_repeats_the_call_and_needs_its_prompt() -> None:
    body = completion_body(_engine(0, 1, n=5, top_k=40, max_tokens=48), "m")
    assert body == {
        "model": "m",
        "prompt": [1, 2],
        "n": 5,
        "max_tokens": 48,
        "temperature": 1.0,
        "top_p": 1.0,
        "ignore_eos": True,
        "top_k": 40,
    }
    # A call that could stop early is replayed with the tokens it generated, to the token.
    early = completion_body(
        _engine(0, 1, n=2, max_tokens=48, ignore_eos=False, completion_tokens=45), "m"
    )
    assert (early["max_tokens"], early["ignore_eos"]) == (23, True)
    text = _engine(0, 1, prompt_text="hi")
    del text["prompt_token_ids"]
    assert completion_body(text, "m")["prompt"] == "hi"
    bare = _engine(0, 1)
    del bare["prompt_token_ids"]
    with pytest.raises(ValueError, match="--trace-engine-prompts"):
        completion_body(bare, "m")


async def test_replay_runs_the_graph_as_plain_completions() -> None:
    served: list[tuple[float, float, dict]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        body = json.loads(request.content)
        await asyncio.sleep(0.05)
        served.append((started, time.perf_counter(), body))
        return httpx.Response(200, json={"choices": []})

    # Two parallel calls, a 0.1 s reward call after both, then one more call.
    timeline = [
        _engine(0.0, 3.0, n=2, prompt_token_ids=[7]),
        _engine(0.0, 3.0, n=3, prompt_token_ids=[8]),
        _reward(3.0, 3.1),
        _engine(3.1, 6.0, prompt_token_ids=[9]),
    ]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        seconds = await replay(timeline, http, "http://vllm", "m")
        assert [body["prompt"] for _, _, body in served] in ([[7], [8], [9]], [[8], [7], [9]])
        assert sorted(body["n"] for _, _, body in served[:2]) == [2, 3]
        (a_start, a_end, _), (b_start, b_end, _), (c_start, _, _) = served
        assert abs(a_start - b_start) < 0.03  # the parallel pair went out together
        assert c_start - max(a_end, b_end) >= 0.09  # after both, and the reward's sleep
        assert 0.19 <= seconds < 0.5  # 0.05 + 0.1 + 0.05, not the recorded 6 s

        served.clear()
        together = await replay_concurrently([timeline, timeline], http, "http://vllm", "m")
        assert len(served) == 6
        assert 0.19 <= together < 0.5  # two requests side by side, not one after the other


async def test_a_failed_replay_call_fails_the_replay() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "bad"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(httpx.HTTPStatusError):
            await replay([_engine(0, 1), _engine(2, 3)], http, "http://vllm", "m")
