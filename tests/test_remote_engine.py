"""The remote engine against fake vLLM OpenAI servers (tests/fake_vllm_server.py).

No vLLM engine runs: the fakes answer like vLLM 0.32's OpenAI server, with the embedded
model's real tokenizer, and can be scripted to fail, hang or cut connections.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ttalign.benchmarks.processes import free_port
from ttalign.engine import replicas
from ttalign.engine.base import (
    CompletionDelta,
    EngineRequestError,
    EngineStartupError,
    EngineUnavailableError,
    SamplingSettings,
    StructuredOutput,
)
from ttalign.engine.local_tokenizer import LocalTokenizer
from ttalign.engine.remote_engine import TOKENIZER_PROBE, RemoteEngine
from ttalign.engine.replicas import ReplicaPool, rendezvous_rank
from ttalign.engine.routing import request_routing
from ttalign.server.app import create_app

from tests.conftest import fake_settings
from tests.fake_vllm_server import (
    MAX_MODEL_LEN,
    MODEL_NAME,
    Failure,
    FakeVllm,
    hf_tokenizer,
    model_folder,
    refused_url,
    reply_text,
    serve_fake,
)
from tests.servers import serve_in_thread, wait_until

CHAT = [{"role": "user", "content": "Say something."}]
EOS = 2


@cache
def local_tokenizer() -> LocalTokenizer:
    """The engine side's tokenizer (its own instance: the fakes use theirs in other threads)."""
    from transformers import AutoTokenizer

    return LocalTokenizer(AutoTokenizer.from_pretrained(model_folder(), local_files_only=True))


@dataclass
class Fleet:
    fakes: list[FakeVllm]
    urls: list[str]

    def fake(self, url: str) -> FakeVllm:
        return self.fakes[self.urls.index(url)]

    def served_by(self) -> list[int]:
        """How many completion calls each fake received."""
        return [len(f.completions) for f in self.fakes]


@pytest.fixture(scope="module")
def module_fleet() -> Iterator[Fleet]:
    fakes = [FakeVllm(hf_tokenizer()) for _ in range(3)]
    with ExitStack() as stack:
        urls = [stack.enter_context(serve_fake(fake)) for fake in fakes]
        yield Fleet(fakes, urls)


@pytest.fixture
def fleet(module_fleet: Fleet) -> Iterator[Fleet]:
    """Three fake replicas, serving normally and with nothing recorded."""
    for fake in module_fleet.fakes:
        fake.reset()
        fake.model, fake.max_model_len, fake.extra_models = MODEL_NAME, MAX_MODEL_LEN, ()
    yield module_fleet
    for fake in module_fleet.fakes:
        fake.reset()


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[..., RemoteEngine]]:
    """Builds engines over given URLs (no backoff, no health rounds); shuts them down."""
    made: list[RemoteEngine] = []

    def make(urls: list[str], **options: Any) -> RemoteEngine:
        pool = ReplicaPool(
            "engine",
            urls,
            routing=options.pop("routing", "consistent_hash"),
            retries=options.pop("retries", 1),
            backoff_seconds=0.0,
            health_interval=options.pop("health_interval", 3600.0),
        )
        engine = RemoteEngine(
            pool,
            local_tokenizer(),
            model_name=MODEL_NAME,
            max_model_len=MAX_MODEL_LEN,
            sampling_defaults={},
            eos_token_ids=frozenset({EOS}),
            read_timeout=options.pop("read_timeout", None),
        )
        assert not options, options
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.shutdown()


@pytest.fixture
async def connect(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    """``RemoteEngine.connect`` with short timeouts and the tokenizer loaded once per run."""
    monkeypatch.setattr(
        LocalTokenizer, "load", classmethod(lambda cls, path, template=None: local_tokenizer())
    )
    made: list[RemoteEngine] = []

    async def connect(urls: list[str], **options: Any) -> RemoteEngine:
        options.setdefault("start_timeout", 5.0)
        engine = await RemoteEngine.connect(urls, options.pop("model", model_folder()), **options)
        made.append(engine)
        return engine

    yield connect
    for engine in made:
        await engine.shutdown()


async def prompt() -> list[int]:
    return await local_tokenizer().render_chat(CHAT)


def preferred(fleet: Fleet, engine: RemoteEngine, key: str) -> FakeVllm:
    """The fake that ``engine`` sends request ``key``'s first call to."""
    return fleet.fake(rendezvous_rank(key, engine.pool.replicas)[0].url)


async def collect(stream: AsyncIterator[CompletionDelta]) -> list[CompletionDelta]:
    return [delta async for delta in stream]


# --- start-up checks ----------------------------------------------------------------------


async def test_connect_reads_the_fleets_model_and_checks_its_tokenizer(fleet, connect) -> None:
    engine = await connect(fleet.urls[:2])
    assert engine.model_name == MODEL_NAME and engine.max_model_len == MAX_MODEL_LEN
    assert engine.eos_token_ids == {EOS}
    health = await engine.health()
    assert health.healthy and [r["healthy"] for r in health.extra["replicas"]] == [True, True]
    for fake in fleet.fakes[:2]:
        probe = [r for r in fake.received if r.path == "/tokenize"]
        assert [r.body for r in probe] == [
            {"model": MODEL_NAME, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        ]
    # Rendering happens here, with the local tokenizer.
    assert await engine.render_chat(CHAT) == await prompt()


async def test_connect_takes_sampling_defaults_from_the_model_folder(
    fleet, connect, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(Path(model_folder()) / name, folder / name)
    config = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 100, "eos_token_id": [2, 5]}
    (folder / "generation_config.json").write_text(json.dumps(config))
    engine = await connect(fleet.urls[:1], model=str(folder), model_name=MODEL_NAME)
    assert engine.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 100}
    assert engine.eos_token_ids == {2, 5}
    plain = await connect(fleet.urls[:1], model=str(folder), use_model_defaults=False)
    assert plain.sampling_defaults == {}


async def test_connect_refuses_a_fleet_serving_another_model(fleet, connect) -> None:
    with pytest.raises(EngineStartupError) as caught:
        await connect(fleet.urls[:2], model_name="llama-70b")
    message = str(caught.value)
    assert "does not serve 'llama-70b'" in message and MODEL_NAME in message
    assert "--served-model-name" in message


async def test_connect_needs_a_name_when_a_replica_serves_several_models(fleet, connect) -> None:
    fleet.fakes[0].extra_models = ("lora-a",)
    with pytest.raises(EngineStartupError, match="name one with --served-model-name"):
        await connect(fleet.urls[:2])
    engine = await connect(fleet.urls[:2], model_name=MODEL_NAME)
    assert engine.model_name == MODEL_NAME


async def test_connect_refuses_replicas_with_different_context_lengths(fleet, connect) -> None:
    fleet.fakes[1].max_model_len = 4096
    with pytest.raises(EngineStartupError, match="disagree on the context length"):
        await connect(fleet.urls[:2])


async def test_connect_refuses_a_replica_that_tokenizes_differently(fleet, connect) -> None:
    fleet.fakes[1].tokenize_tokens = [1, 2, 3]
    with pytest.raises(EngineStartupError) as caught:
        await connect(fleet.urls[:2])
    assert fleet.urls[1] in str(caught.value)
    assert "tokenizes differently" in str(caught.value)


async def test_connect_skips_the_tokenizer_check_behind_a_router_without_it(fleet, connect) -> None:
    fleet.fakes[0].tokenize_status = 404
    engine = await connect(fleet.urls[:1])
    assert engine.model_name == MODEL_NAME
    fleet.fakes[0].tokenize_status = 500
    with pytest.raises(EngineStartupError, match="/tokenize answered 500"):
        await connect(fleet.urls[:1])


async def test_connect_fails_helpfully_when_no_replica_answers(connect) -> None:
    urls = [refused_url(), refused_url()]
    started = time.monotonic()
    with pytest.raises(EngineStartupError) as caught:
        await connect(urls, start_timeout=0.3)
    assert time.monotonic() - started < 1.0
    message = str(caught.value)
    assert "no engine replica answered" in message
    assert all(f"{url}: ConnectError" in message for url in urls)
    assert "--engine-urls" in message and "--engine-start-timeout" in message


async def test_a_replica_down_at_start_joins_when_it_comes_up(fleet, connect) -> None:
    port = free_port()
    late = f"http://127.0.0.1:{port}"
    engine = await connect([fleet.urls[0], late], start_timeout=0.3, health_interval=0.05)
    replicas = (await engine.health()).extra["replicas"]
    assert [(r["url"], r["healthy"]) for r in replicas] == [(fleet.urls[0], True), (late, False)]
    assert "ConnectError" not in str(replicas)  # not an error: it may still be loading
    # It comes up: the health loop adds it, on an idle gateway too (no call made yet).
    newcomer = FakeVllm(hf_tokenizer())
    with serve_fake(newcomer, port=port):
        await wait_until(lambda: engine.pool.healthy_count == 2, timeout=5)
        for i in range(8):
            with request_routing(f"after-{i}"):
                await engine.generate(await prompt(), SamplingSettings(max_tokens=1))
        assert newcomer.completions and fleet.fakes[0].completions


# --- request bodies -----------------------------------------------------------------------


async def test_priority_reaches_replicas_only_when_a_request_sets_one(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    ids = await prompt()
    await engine.generate(ids, SamplingSettings(max_tokens=2))
    await engine.generate(ids, SamplingSettings(max_tokens=2, priority=1))
    plain, search = fleet.fakes[0].completions
    # A replica without priority scheduling refuses any priority field but 0.
    assert "priority" not in plain.body
    assert search.body["priority"] == 1


async def test_generate_sends_token_ids_and_every_sampling_field(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    ids = await prompt()
    sampling = SamplingSettings(
        n=3,
        temperature=0.7,
        top_p=0.9,
        max_tokens=20,
        stop=("\n\n", "END"),
        seed=42,
        logprobs=2,
        min_p=0.05,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        logit_bias=((15, 2.5), (16, -100.0)),
        structured=StructuredOutput(json_schema='{"type": "object"}'),
        min_tokens=2,
        stop_token_ids=(7,),
        include_stop_str_in_output=True,
        allowed_token_ids=(5, 6, 7),
        extra_args={"mode": "fast", "scale": 1.5, "ids": [1, 2]},
    )
    await engine.generate(ids, sampling)
    [call] = fleet.fakes[0].completions
    assert call.body == {
        "model": MODEL_NAME,
        "prompt": ids,
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "min_p": 0.05,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "repetition_penalty": 1.1,
        "max_tokens": 20,
        "min_tokens": 2,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [7],
        "include_stop_str_in_output": True,
        "ignore_eos": False,
        "seed": 42,
        "stream": False,
        "return_token_ids": True,
        "logprobs": 2,
        "return_tokens_as_token_ids": True,
        "logit_bias": {"15": 2.5, "16": -100.0},
        "allowed_token_ids": [5, 6, 7],
        "structured_outputs": {"json": {"type": "object"}},
        "vllm_xargs": {"mode": "fast", "scale": 1.5, "ids": [1, 2]},
    }


async def test_optional_fields_are_left_out_or_mapped(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    await engine.generate("Plain text prompt", SamplingSettings(top_k=5))
    json_mode = StructuredOutput(json_object=True)
    await engine.generate([1, 2, 3], SamplingSettings(structured=json_mode))
    plain, structured = (c.body for c in fleet.fakes[0].completions)
    # A text prompt is tokenized here, special tokens included as the model expects.
    assert plain["prompt"] == hf_tokenizer().encode("Plain text prompt")
    assert plain["top_k"] == 5 and plain["seed"] is None
    absent = {"logprobs", "return_tokens_as_token_ids", "logit_bias", "allowed_token_ids"}
    assert not absent & set(plain) and "structured_outputs" not in plain
    assert "vllm_xargs" not in plain
    assert structured["structured_outputs"] == {"json_object": True}


async def test_nested_engine_arguments_cannot_reach_a_remote_engine(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    for extra in ({"adaptive": {"head": "x"}}, {"flag": True}, {"ids": [1, {"a": 2}]}):
        with pytest.raises(EngineRequestError, match="in-process engine"):
            await engine.generate([1, 2], SamplingSettings(extra_args=extra))
    with pytest.raises(EngineRequestError) as caught:
        await engine.generate([1, 2], SamplingSettings(seed=2**63))
    assert caught.value.param == "seed"
    assert fleet.fakes[0].completions == []  # refused before any call


# --- answers ------------------------------------------------------------------------------


async def test_generate_parses_completions_and_logprobs(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    tokenizer = hf_tokenizer()
    ids = await prompt()
    generation = await engine.generate(ids, SamplingSettings(n=2, max_tokens=64, logprobs=2))
    assert generation.prompt_tokens == len(ids)
    assert [c.index for c in generation.completions] == [0, 1]
    for completion in generation.completions:
        expected = [*fleet.fakes[0].reply_ids(completion.index), EOS]
        assert completion.text == reply_text(completion.index)
        assert completion.token_ids == tuple(expected)
        assert completion.finish_reason == "stop" and completion.stop_reason is None
        logprobs = completion.logprobs
        assert logprobs is not None and len(logprobs) == len(expected)
        for position, (entry, token_id) in enumerate(zip(logprobs, expected, strict=True)):
            sampled = -(position + 1) / 10
            assert entry.token_id == token_id
            assert entry.token == tokenizer.decode([token_id])  # decoded here, not sent
            assert entry.logprob == pytest.approx(sampled)
            # Sorted, most likely first, and cut to the two asked for.
            assert entry.top_ids == (token_id, token_id + 1)
            assert [lp for _, lp in entry.top] == pytest.approx([sampled, sampled - 0.5])
            assert [text for text, _ in entry.top] == [
                tokenizer.decode([token_id]), tokenizer.decode([token_id + 1]),
            ]  # fmt: skip
        assert completion.cumulative_logprob == pytest.approx(sum(e.logprob for e in logprobs))


async def test_generate_reports_length_and_no_logprobs_unless_asked(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    generation = await engine.generate(await prompt(), SamplingSettings(max_tokens=4))
    [completion] = generation.completions
    reply = fleet.fakes[0].reply_ids(0)[:4]
    assert completion.finish_reason == "length" and completion.token_ids == tuple(reply)
    assert completion.text == hf_tokenizer().decode(reply)
    assert completion.logprobs is None and completion.cumulative_logprob is None
    zero = await engine.generate(await prompt(), SamplingSettings(max_tokens=4, logprobs=0))
    logprobs = zero.completions[0].logprobs
    assert logprobs is not None and all(e.top == () and e.top_ids == () for e in logprobs)


async def test_greedy_n_is_one_upstream_sample_copied(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    generation = await engine.generate(await prompt(), SamplingSettings(n=3, temperature=0.0))
    [call] = fleet.fakes[0].completions
    assert call.body["n"] == 1 and call.body["temperature"] == 0.0
    assert [c.index for c in generation.completions] == [0, 1, 2]
    assert {c.text for c in generation.completions} == {reply_text(0)}


async def test_stream_yields_token_deltas(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    ids = await prompt()
    deltas = await collect(engine.stream(ids, SamplingSettings(max_tokens=64, logprobs=1)))
    [call] = fleet.fakes[0].completions
    assert call.body["stream"] is True and call.body["prompt"] == ids
    expected = [*fleet.fakes[0].reply_ids(0), EOS]
    assert len(deltas) == len(expected)  # one delta per token, as produced
    assert "".join(d.text for d in deltas) == reply_text(0)
    assert [t for d in deltas for t in d.token_ids] == expected
    assert all(d.num_tokens == 1 and d.prompt_tokens == len(ids) for d in deltas)
    assert [d.finish_reason for d in deltas] == [None] * (len(expected) - 1) + ["stop"]
    assert [d.logprobs[0].token_id for d in deltas if d.logprobs] == expected
    assert deltas[3].logprobs is not None and deltas[3].logprobs[0].logprob == pytest.approx(-0.4)


async def test_stream_interleaves_choices_and_copies_greedy_ones(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    ids = await prompt()
    sampled = await collect(engine.stream(ids, SamplingSettings(n=2, max_tokens=5)))
    for index in (0, 1):
        mine = [d for d in sampled if d.index == index]
        assert [t for d in mine for t in d.token_ids] == fleet.fakes[0].reply_ids(index)[:5]
        assert mine[-1].finish_reason == "length"
    greedy = await collect(engine.stream(ids, SamplingSettings(n=2, temperature=0, max_tokens=3)))
    assert [c.body["n"] for c in fleet.fakes[0].completions] == [2, 1]
    assert [d.index for d in greedy] == [0, 1] * 3
    assert [d.token_ids for d in greedy[::2]] == [d.token_ids for d in greedy[1::2]]


# --- upstream errors, retries and failures ------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_refusal_is_a_request_error_naming_the_param(
    fleet, make_engine, stream: bool
) -> None:
    engine = make_engine(fleet.urls[:2])
    ids = await prompt()

    async def run(sampling: SamplingSettings) -> Any:
        if stream:
            return await collect(engine.stream(ids, sampling))
        return await engine.generate(ids, sampling)

    for fake in fleet.fakes[:2]:
        fake.fail(
            Failure("status", 400, "temperature must be non-negative, got -1.", "temperature"),
            Failure("status", 400, "top_k must be 0 (disable), or at least 1, got -3."),
            Failure("status", 400, "logprobs must be at most 20, got 50."),
        )
    with request_routing("refused"):
        with pytest.raises(EngineRequestError) as named:
            await run(SamplingSettings())
        with pytest.raises(EngineRequestError) as from_message:
            await run(SamplingSettings())
        with pytest.raises(EngineRequestError) as renamed:
            await run(SamplingSettings())
    assert str(named.value) == "temperature must be non-negative, got -1."
    assert named.value.param == "temperature"
    assert from_message.value.param == "top_k"
    assert renamed.value.param == "top_logprobs"
    assert sorted(fleet.served_by()[:2]) == [0, 3]  # refusals are not retried elsewhere


@pytest.mark.parametrize("status", [500, 503, 429, 404])
async def test_a_failing_replica_is_retried_on_another(fleet, make_engine, status) -> None:
    engine = make_engine(fleet.urls[:2])
    failing = preferred(fleet, engine, "retried")
    failing.fail(Failure("status", status, "engine busy"))
    with request_routing("retried"):
        generation = await engine.generate(await prompt(), SamplingSettings())
    assert generation.completions[0].text == reply_text(0)
    assert fleet.served_by()[:2] == [1, 1]
    [failed] = [r for r in engine.pool.snapshot() if fleet.fake(r["url"]) is failing]
    assert failed["errors"] == 1 and failed["retries"] == 1
    assert f"answered {status}: " in failed["last_error"]
    assert "engine busy" in failed["last_error"]
    assert failed["healthy"]  # it answers, so it stays in the rotation


async def test_a_refused_replica_is_retried_and_evicted(fleet, make_engine) -> None:
    gone = refused_url()
    engine = make_engine([gone, fleet.urls[0]])
    keys = [f"key-{i}" for i in range(100)]
    keys = [k for k in keys if rendezvous_rank(k, engine.pool.replicas)[0].url == gone][:3]
    for key in keys:  # each prefers the refused replica
        with request_routing(key):
            await engine.generate(await prompt(), SamplingSettings(max_tokens=2))
    assert len(fleet.fakes[0].completions) == 3
    snapshot = engine.pool.snapshot()
    assert snapshot[0]["healthy"] is False and "ConnectError" in snapshot[0]["last_error"]
    assert snapshot[0]["errors"] == 1  # evicted after the first refusal


async def test_a_dropped_connection_is_retried_and_evicts_the_replica(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:2])
    dropping = preferred(fleet, engine, "dropped")
    dropping.fail(Failure("drop"))
    with request_routing("dropped"):
        generation = await engine.generate(await prompt(), SamplingSettings())
    assert generation.completions[0].text == reply_text(0)
    assert fleet.served_by()[:2] == [1, 1]
    assert [fleet.fake(r.url) for r in engine.pool.replicas if not r.healthy] == [dropping]


async def test_a_silent_replica_times_out_and_is_retried(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:2], read_timeout=0.3)
    hung = preferred(fleet, engine, "silent")
    hung.fail(Failure("hang"))
    with request_routing("silent"):
        generation = await engine.generate(await prompt(), SamplingSettings())
    assert generation.completions[0].text == reply_text(0)
    assert fleet.served_by()[:2] == [1, 1]
    await wait_until(lambda: hung.disconnects == 1, timeout=2)  # the call was closed
    assert all(r.healthy for r in engine.pool.replicas)  # slow is not gone


async def test_a_hung_replica_is_given_up_on_when_its_health_checks_fail(
    fleet, make_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It takes the call and answers nothing, not even /health: the health loop takes it out
    # after three missed checks and the waiting call moves on, long before the read timeout.
    monkeypatch.setattr(replicas, "HEALTH_TIMEOUT_SECONDS", 0.1)
    engine = make_engine(fleet.urls[:2], read_timeout=600, health_interval=0.05)
    hung = preferred(fleet, engine, "hung")
    hung.fail(Failure("hang"))
    hung.health_delay = 1.0
    started = time.monotonic()
    with request_routing("hung"):
        generation = await engine.generate(await prompt(), SamplingSettings())
    assert time.monotonic() - started < 10
    assert generation.completions[0].text == reply_text(0)
    assert fleet.served_by()[:2] == [1, 1]
    await wait_until(lambda: hung.disconnects == 1, timeout=2)  # the call was closed
    [gone] = [r for r in engine.pool.replicas if not r.healthy]
    assert fleet.fake(gone.url) is hung and gone.health_misses >= 3
    assert "left the rotation while the call waited" in gone.last_error


async def test_every_replica_failing_is_engine_unavailable(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:2], retries=2)
    for fake in fleet.fakes[:2]:
        fake.fail(*[Failure("status", 503, "overloaded")] * 3)
    with pytest.raises(EngineUnavailableError) as caught:
        await engine.generate(await prompt(), SamplingSettings())
    message = str(caught.value)
    assert f"remote engine serving {MODEL_NAME!r}" in message
    assert "after 3 attempts" in message and "answered 503" in message
    assert sum(fleet.served_by()) == 3
    with pytest.raises(EngineUnavailableError, match="remote engine serving"):
        await collect(engine.stream(await prompt(), SamplingSettings()))


@pytest.mark.parametrize(
    "failure",
    [
        Failure("drop"),
        Failure("status", 502, "bad gateway"),
        Failure("stream_error", 500, "EngineCore died"),
        Failure("no_done"),
        Failure("bad_chunk"),
    ],
    ids=["drop", "502", "error-chunk", "no-done", "bad-chunk"],
)
async def test_a_stream_failing_before_output_is_retried(fleet, make_engine, failure) -> None:
    engine = make_engine(fleet.urls[:2])
    preferred(fleet, engine, "stream-retry").fail(failure)
    with request_routing("stream-retry"):
        deltas = await collect(engine.stream(await prompt(), SamplingSettings(max_tokens=64)))
    assert "".join(d.text for d in deltas) == reply_text(0)
    assert deltas[-1].finish_reason == "stop"
    assert fleet.served_by()[:2] == [1, 1]


@pytest.mark.parametrize(
    "failure",
    [
        Failure("drop", after_chunks=2),
        Failure("stream_error", 500, "EngineCore died", after_chunks=2),
        Failure("no_done", after_chunks=2),
    ],
    ids=["drop", "error-chunk", "no-done"],
)
async def test_a_stream_failing_after_output_is_not_retried(fleet, make_engine, failure) -> None:
    engine = make_engine(fleet.urls[:2])
    for fake in fleet.fakes[:2]:
        fake.fail(failure)
    received: list[CompletionDelta] = []
    with request_routing("stream-cut"), pytest.raises(EngineUnavailableError) as caught:
        async for delta in engine.stream(await prompt(), SamplingSettings(max_tokens=64)):
            received.append(delta)
    assert len(received) == 2
    assert "mid-stream" in str(caught.value) and MODEL_NAME in str(caught.value)
    assert sorted(fleet.served_by()[:2]) == [0, 1]  # another replica cannot continue it
    [failed] = [r for r in engine.pool.snapshot() if r["errors"]]
    assert failed["errors"] == 1 and failed["retries"] == 0
    assert (await engine.health()).running_requests == 0


# --- routing and cancellation -------------------------------------------------------------


async def test_every_call_of_a_request_reaches_one_replica(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls)
    ids = await prompt()
    with request_routing("conversation-77"):
        await engine.generate(ids, SamplingSettings(n=2, max_tokens=3))
        await collect(engine.stream(ids, SamplingSettings(max_tokens=3)))
        await asyncio.gather(*(engine.generate(ids, SamplingSettings(max_tokens=2)) for _ in "abc"))
    calls = [c for f in fleet.fakes for c in f.completions]
    assert sorted(fleet.served_by()) == [0, 0, 5]
    assert {c.headers["x-session-id"] for c in calls} == {"conversation-77"}
    request_ids = [c.headers["x-request-id"] for c in calls]
    assert all(r.startswith("conversation-77-") for r in request_ids)
    assert len(set(request_ids)) == 5
    assert [r.active for r in engine.pool.replicas] == [0, 0, 0]


async def test_different_requests_spread_over_the_fleet(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls)
    ids = await prompt()
    for i in range(30):
        with request_routing(f"user-{i}"):
            await engine.generate(ids, SamplingSettings(max_tokens=1))
    assert all(count > 0 for count in fleet.served_by())


async def test_cancelling_generate_closes_the_upstream_request(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    fleet.fakes[0].fail(Failure("hang"))
    task = asyncio.create_task(engine.generate(await prompt(), SamplingSettings()))
    await wait_until(lambda: len(fleet.fakes[0].completions) == 1, timeout=5)
    assert (await engine.health()).running_requests == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: fleet.fakes[0].disconnects == 1, timeout=2)
    assert (await engine.health()).running_requests == 0


async def test_closing_a_stream_closes_the_upstream_request(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:1])
    fleet.fakes[0].chunk_delay = 0.05
    upstream_closed: list[bool] = []
    stream_once = engine._stream_once

    async def watched(*args: Any) -> AsyncIterator[CompletionDelta]:
        try:
            async for delta in stream_once(*args):
                yield delta
        finally:
            upstream_closed.append(True)

    engine._stream_once = watched  # type: ignore[method-assign]
    stream = engine.stream(await prompt(), SamplingSettings(max_tokens=64))
    with request_routing("closed-early") as scope:
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()
        # Closed by the time aclose() returns, not whenever the collector gets to it.
        assert upstream_closed == [True]
        assert scope.pins["engine"].active == 1
    assert [d.finish_reason for d in first] == [None, None]
    await wait_until(lambda: fleet.fakes[0].disconnects == 1, timeout=2)
    assert (await engine.health()).running_requests == 0
    assert engine.pool.replicas[0].active == 0


# --- health and load ----------------------------------------------------------------------


async def test_running_requests_sum_the_replicas_gauges(fleet, make_engine) -> None:
    fleet.fakes[0].running, fleet.fakes[0].waiting = 2, 1
    fleet.fakes[1].running, fleet.fakes[1].waiting = 3, 4
    engine = make_engine([*fleet.urls[:2], refused_url()])
    assert await engine.engine_running_requests() == 10


async def test_health_reports_each_replica(fleet, make_engine) -> None:
    engine = make_engine(fleet.urls[:2])
    health = await engine.health()
    assert health.healthy and health.running_requests == 0 and health.detail == ""
    assert [r["url"] for r in health.extra["replicas"]] == fleet.urls[:2]
    for replica in engine.pool.replicas:
        replica.healthy = False
    health = await engine.health()
    assert not health.healthy and "none of the 2 replicas" in health.detail


# --- through the ttalign app ----------------------------------------------------------------


def test_the_gateway_serves_the_openai_api_over_the_fleet(fleet) -> None:
    settings = fake_settings(
        engine="remote",
        engine_urls=",".join(fleet.urls[:2]),
        model=model_folder(),
        served_model_name=MODEL_NAME,
        engine_start_timeout=10,
        engine_retries=1,
        embedding_model="none",
    )
    with serve_in_thread(create_app(settings), startup_timeout=60) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=32)
        assert reply.choices[0].message.content == reply_text(0)
        assert reply.choices[0].finish_reason == "stop"
        [call] = [c for f in fleet.fakes for c in f.completions]
        rendered = hf_tokenizer().apply_chat_template(CHAT, add_generation_prompt=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert call.body["prompt"] == list(rendered)
        assert reply.usage is not None and reply.usage.prompt_tokens == len(rendered)

        chunks = client.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, max_tokens=32, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply_text(0)

        # A client's session header keeps its requests on one replica.
        for fake in fleet.fakes:
            fake.received.clear()
        for _ in range(2):
            client.chat.completions.create(
                model=MODEL_NAME,
                messages=CHAT,
                max_tokens=4,
                extra_headers={"X-Session-ID": "conversation-e2e"},
            )
        assert sorted(fleet.served_by()[:2]) == [0, 2]
        calls = [c for f in fleet.fakes for c in f.completions]
        assert {c.headers["x-session-id"] for c in calls} == {"conversation-e2e"}
        # Any Latin-1 session header is routed too (sent upstream as a digest).
        latin = httpx.post(
            f"{running.api_url}/chat/completions",
            json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2},
            headers=[(b"X-Session-ID", "café".encode("latin-1"))],
        )
        assert latin.status_code == 200, latin.text

        metrics = httpx.get(f"{running.base_url}/metrics").text
        for name in (
            "ttalign_replica_requests",
            "ttalign_replica_healthy",
            "ttalign_gateway_overhead_seconds",
        ):
            assert name in metrics, name
        health = httpx.get(f"{running.base_url}/health").json()
        assert [r["url"] for r in health["engine"]["replicas"]] == fleet.urls[:2]

        # The adaptive-temperature processor lives inside an in-process engine only.
        for level in ("example", "token"):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model=MODEL_NAME,
                    messages=CHAT,
                    max_tokens=4,
                    extra_body={
                        "strategy": "adaptive_temperature",
                        "strategy_config": {"level": level, "mode": "entropy"},
                    },
                )
            assert refused.value.response.json()["error"]["param"].startswith("strategy")

        # Every replica failing: a 503 in OpenAI's shape that names the engine.
        for fake in fleet.fakes[:2]:
            fake.fail(*[Failure("status", 503, "overloaded")] * 2)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4)
        assert caught.value.status_code == 503
        body = caught.value.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "engine_unavailable"
        assert f"remote engine serving {MODEL_NAME!r}" in body["error"]["message"]
