"""Search primitives without a real engine: the token-native :class:`Trajectory`, the fake
engine's stop, length, end-of-sequence, allowed-token and log-probability semantics, a
segment-by-segment continuation, and vLLM's request extensions on their way from the API
to the engine."""

from __future__ import annotations

import itertools

import httpx
import openai
import pytest
from fastapi import FastAPI
from ttalign.engine.base import SamplingSettings
from ttalign.server.app import create_app
from ttalign.strategies.trajectory import Trajectory

from tests.conftest import fake_settings
from tests.fakes import EOS, FIRST_WORD_ID, FakeEngine, Scripted
from tests.servers import RunningServer, serve_in_thread

CONTEXT = (60, 97, 62)  # "<a>" as UTF-8 bytes, ids below 256 as the fake renders prompts


def constant(*outputs: str | Scripted):
    """A script answering every call with ``outputs`` (one per completion)."""
    return lambda prompt, sampling: list(outputs)


# --- Trajectory ---------------------------------------------------------------------------


def test_a_new_trajectory_is_its_context() -> None:
    trajectory = Trajectory.start([1, 2, 3])
    assert trajectory.context == (1, 2, 3)
    assert trajectory.tokens == () and trajectory.num_tokens == 0
    assert not trajectory.finished
    assert trajectory.prompt() == [1, 2, 3]


def test_extend_commits_segments_in_order() -> None:
    trajectory = Trajectory.start(CONTEXT)
    trajectory.extend([1000, 1001])
    trajectory.extend(iter([1002]))  # any iterable; stored as a tuple
    trajectory.extend([])
    assert trajectory.segments == [(1000, 1001), (1002,), ()]
    assert trajectory.tokens == (1000, 1001, 1002)
    assert trajectory.num_tokens == 3
    assert trajectory.prompt() == [*CONTEXT, 1000, 1001, 1002]


def test_prompt_appends_candidates_without_committing_them() -> None:
    trajectory = Trajectory.start(CONTEXT)
    trajectory.extend([1000])
    prompt = trajectory.prompt([1001, 1002], (1003,))
    assert prompt == [*CONTEXT, 1000, 1001, 1002, 1003]
    prompt.append(9999)  # the caller owns the list it got
    assert trajectory.prompt() == [*CONTEXT, 1000]
    assert trajectory.tokens == (1000,)


def test_a_finished_trajectory_refuses_more_until_rewound() -> None:
    trajectory = Trajectory.start(CONTEXT)
    trajectory.extend([1000])
    trajectory.extend([1001, EOS], finished=True)
    assert trajectory.finished
    with pytest.raises(ValueError, match="ended"):
        trajectory.extend([1002])
    assert trajectory.tokens == (1000, 1001, EOS)  # the refused segment left no trace
    assert trajectory.rewind() == [(1001, EOS)]
    assert not trajectory.finished
    trajectory.extend([1002])
    assert trajectory.tokens == (1000, 1002)


def test_rewind_returns_the_taken_segments_oldest_first() -> None:
    trajectory = Trajectory.start(CONTEXT)
    for segment in ([1000], [1001, 1002], [1003]):
        trajectory.extend(segment)
    assert trajectory.rewind(0) == []
    assert trajectory.num_tokens == 4
    assert trajectory.rewind(2) == [(1001, 1002), (1003,)]
    assert trajectory.segments == [(1000,)]
    assert trajectory.rewind(1) == [(1000,)]
    assert trajectory.prompt() == list(CONTEXT)


@pytest.mark.parametrize("k", [-1, 3])
def test_rewinding_more_than_was_committed_is_refused(k: int) -> None:
    trajectory = Trajectory.start(CONTEXT)
    trajectory.extend([1000])
    trajectory.extend([1001], finished=True)
    with pytest.raises(ValueError, match=f"cannot rewind {k} of 2"):
        trajectory.rewind(k)
    assert trajectory.segments == [(1000,), (1001,)] and trajectory.finished


def test_branches_are_independent() -> None:
    trunk = Trajectory.start(CONTEXT)
    trunk.extend([1000])
    left, right = trunk.branch(), trunk.branch()
    left.extend([1001], finished=True)
    right.extend([1002])
    right.rewind(2)
    assert trunk.tokens == (1000,) and not trunk.finished
    assert left.tokens == (1000, 1001) and left.finished
    assert right.tokens == ()
    assert left.context == right.context == trunk.context
    # A branch of a finished trajectory is finished too.
    assert left.branch().finished
    trunk.extend([1003])
    assert left.tokens == (1000, 1001)


# --- the fake engine's semantics ----------------------------------------------------------


async def test_stop_string_ends_with_that_string_as_the_reason() -> None:
    engine = FakeEngine(constant("one two. three four"))
    cut = await engine.generate([1], SamplingSettings(stop=("x", ".")))
    kept = await engine.generate(
        [1], SamplingSettings(stop=(".",), include_stop_str_in_output=True)
    )
    (c,), (k,) = cut.completions, kept.completions
    assert (c.text, c.finish_reason, c.stop_reason) == ("one two", "stop", ".")
    assert (k.text, k.finish_reason, k.stop_reason) == ("one two.", "stop", ".")
    assert await engine.decode(c.token_ids) == c.text
    assert await engine.decode(k.token_ids) == k.text


async def test_stop_token_id_ends_with_that_id_kept() -> None:
    engine = FakeEngine(constant(Scripted("alpha beta gamma delta", eos=True)))
    (beta,) = await engine.tokenize(" beta")
    (c,) = (await engine.generate([1], SamplingSettings(stop_token_ids=(beta,)))).completions
    assert c.token_ids[-1] == beta and c.stop_reason == beta
    assert (c.text, c.finish_reason) == ("alpha beta", "stop")
    assert EOS not in c.token_ids


async def test_max_tokens_truncates_with_finish_length() -> None:
    engine = FakeEngine(constant(Scripted("a b c d e", eos=True)))
    (c,) = (await engine.generate([1], SamplingSettings(max_tokens=3))).completions
    assert (c.text, c.finish_reason, c.stop_reason, c.num_tokens) == ("a b c", "length", None, 3)
    assert EOS not in c.token_ids


async def test_eos_ends_token_ids_but_not_the_text() -> None:
    engine = FakeEngine(constant(Scripted("a b", eos=True)))
    (c,) = (await engine.generate([1], SamplingSettings())).completions
    assert c.token_ids[-1] == EOS and EOS in engine.eos_token_ids
    assert (c.text, c.finish_reason, c.stop_reason, c.num_tokens) == ("a b", "stop", None, 3)
    assert await engine.decode(c.token_ids) == "a b"


async def test_allowed_token_ids_are_enforced_on_the_script() -> None:
    engine = FakeEngine(constant(" yes"))
    yes, no = await engine.tokenize(" yes"), await engine.tokenize(" no")
    ok = await engine.generate([1], SamplingSettings(max_tokens=1, allowed_token_ids=(*yes, *no)))
    assert ok.completions[0].token_ids == tuple(yes)
    with pytest.raises(AssertionError, match="outside allowed_token_ids"):
        await engine.generate([1], SamplingSettings(max_tokens=1, allowed_token_ids=tuple(no)))


async def test_logprobs_carry_token_ids_top_ids_and_their_sum() -> None:
    scripted = Scripted(
        "red green",
        eos=True,
        logprobs=[-0.5, -0.25, -0.125],
        top=[{"red": -0.5, " blue": -1.5, " pink": -2.0}, {" green": -0.25, " grey": -3.0}],
    )
    engine = FakeEngine(constant(scripted))
    (c,) = (await engine.generate([1], SamplingSettings(logprobs=2))).completions
    assert c.logprobs is not None
    assert [lp.token_id for lp in c.logprobs] == list(c.token_ids)
    assert [lp.logprob for lp in c.logprobs] == [-0.5, -0.25, -0.125]
    assert c.cumulative_logprob == pytest.approx(-0.875)
    first = c.logprobs[0]
    assert first.top == (("red", -0.5), (" blue", -1.5))  # the top 2 of 3
    assert [await engine.decode([i]) for i in first.top_ids] == ["red", " blue"]
    assert c.logprobs[2].token_id == EOS and c.logprobs[2].top == ()


async def test_without_logprobs_there_is_no_cumulative_logprob() -> None:
    engine = FakeEngine(constant("a b"))
    (c,) = (await engine.generate([1], SamplingSettings())).completions
    assert c.logprobs is None and c.cumulative_logprob is None


async def test_stream_reports_the_stop_reason_on_the_last_delta() -> None:
    engine = FakeEngine(constant("one two. three"))
    deltas = [d async for d in engine.stream([1], SamplingSettings(stop=(".",)))]
    assert [d.stop_reason for d in deltas] == [None, "."]
    assert deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == "one two"


# --- token-native continuation ------------------------------------------------------------

REPLY = "The quick brown fox jumps over the lazy dog, then sleeps under an old oak tree."


def continue_reply(prompt: str, sampling: SamplingSettings) -> list[Scripted]:
    """The rest of REPLY after what the prompt's assistant turn already says."""
    said = prompt.split("<assistant>", 1)[1]
    assert REPLY.startswith(said), f"the prompt does not continue the reply: {said!r}"
    return [Scripted(REPLY[len(said) :], eos=True)] * sampling.n


async def test_committing_segments_reproduces_one_whole_generation() -> None:
    engine = FakeEngine(continue_reply)
    context = await engine.render_chat([{"role": "user", "content": "Tell me a story."}])
    whole = (await engine.generate(context, SamplingSettings(max_tokens=64))).completions[0]
    assert whole.finish_reason == "stop" and whole.token_ids[-1] == EOS

    trajectory = Trajectory.start(context)
    size = 1
    while not trajectory.finished:
        prompt = trajectory.prompt()
        assert prompt == [*context, *trajectory.tokens]
        (segment,) = (await engine.generate(prompt, SamplingSettings(max_tokens=size))).completions
        assert engine.calls[-1].raw_prompt == prompt  # token ids, never re-rendered text
        trajectory.extend(segment.token_ids, finished=segment.finish_reason == "stop")
        size *= 2

    assert [len(s) for s in trajectory.segments] == [1, 2, 4, 8, 2]  # 16 words + EOS
    assert trajectory.tokens == whole.token_ids
    assert await engine.decode(trajectory.tokens) == whole.text == REPLY
    assert all(token >= FIRST_WORD_ID for token in trajectory.tokens[:-1])
    # Every call's prompt began with the previous call's prompt: one shared prefix.
    prompts = [call.raw_prompt for call in engine.calls[1:]]
    for shorter, longer in itertools.pairwise(prompts):
        assert longer[: len(shorter)] == shorter


async def test_rewound_branches_continue_from_their_own_prefix() -> None:
    engine = FakeEngine(continue_reply)
    context = await engine.render_chat([{"role": "user", "content": "Tell me a story."}])
    trunk = Trajectory.start(context)
    for size in (2, 3):
        (c,) = (
            await engine.generate(trunk.prompt(), SamplingSettings(max_tokens=size))
        ).completions
        trunk.extend(c.token_ids)
    branch = trunk.branch()
    branch.rewind()
    (again,) = (await engine.generate(branch.prompt(), SamplingSettings(max_tokens=3))).completions
    assert again.token_ids == trunk.segments[-1]
    assert await engine.decode(branch.prompt(again.token_ids)) == await engine.decode(
        trunk.prompt()
    )


# --- vLLM's request extensions, from the API to the engine --------------------------------


@pytest.fixture
def client(fake_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_server.api_url, api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "yes or no?"}]


def test_vllm_extensions_reach_the_engine(client: openai.OpenAI, fake_engine: FakeEngine) -> None:
    fake_engine.script = constant(" yes")
    client.chat.completions.create(
        model="fake-model",
        messages=QUESTION,
        max_tokens=4,
        stop=["."],
        extra_body={
            "min_tokens": 1,
            "stop_token_ids": [7, 8],
            "include_stop_str_in_output": True,
            "allowed_token_ids": [FIRST_WORD_ID, 2000],
            "top_k": 5,
            "min_p": 0.1,
        },
    )
    sampling = fake_engine.calls[-1].sampling
    assert sampling.min_tokens == 1
    assert sampling.stop_token_ids == (7, 8)
    assert sampling.include_stop_str_in_output is True
    assert sampling.allowed_token_ids == (FIRST_WORD_ID, 2000)
    assert (sampling.top_k, sampling.min_p, sampling.max_tokens) == (5, 0.1, 4)


def test_without_extensions_the_engine_gets_vllm_defaults(
    client: openai.OpenAI, fake_engine: FakeEngine
) -> None:
    client.chat.completions.create(model="fake-model", messages=QUESTION, max_tokens=4)
    sampling = fake_engine.calls[-1].sampling
    assert sampling.min_tokens == 0 and sampling.stop_token_ids == ()
    assert sampling.include_stop_str_in_output is False
    assert sampling.allowed_token_ids is None


def test_min_tokens_raises_an_unnamed_default_limit(
    client: openai.OpenAI, fake_engine: FakeEngine, fake_server: RunningServer
) -> None:
    default = fake_server.app.state.settings.default_max_tokens
    client.chat.completions.create(
        model="fake-model", messages=QUESTION, extra_body={"min_tokens": default + 1}
    )
    sampling = fake_engine.calls[-1].sampling
    assert sampling.min_tokens == sampling.max_tokens == default + 1


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens", "max_tokens (4)"),
        (
            {"max_tokens": 64, "max_completion_tokens": 4, "min_tokens": 5},
            "min_tokens",
            "max_completion_tokens (4)",
        ),
        ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"min_tokens": 10**6}, "min_tokens", "at most"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids[1]", "greater than or equal to 0"),
        ({"stop_token_ids": [True]}, "stop_token_ids[0]", "integer"),
        ({"allowed_token_ids": []}, "allowed_token_ids", "at least 1"),
        ({"allowed_token_ids": [-5]}, "allowed_token_ids[0]", "greater than or equal to 0"),
        ({"include_stop_str_in_output": "maybe"}, "include_stop_str_in_output", "boolean"),
    ],
)
def test_bad_extension_values_are_400s_naming_the_param(
    fake_server: RunningServer, fake_engine: FakeEngine, fields: dict, param: str, words: str
) -> None:
    response = httpx.post(
        f"{fake_server.api_url}/chat/completions",
        json={"model": "fake-model", "messages": QUESTION, **fields},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert not fake_engine.calls


def test_min_tokens_checks_use_the_server_cap() -> None:
    engine = FakeEngine()
    app = create_app_with_cap(engine, cap=16)
    with serve_in_thread(app) as server:
        ok = httpx.post(
            f"{server.api_url}/chat/completions",
            json={"model": "fake-model", "messages": QUESTION, "min_tokens": 16},
        )
        over = httpx.post(
            f"{server.api_url}/chat/completions",
            json={"model": "fake-model", "messages": QUESTION, "min_tokens": 17},
        )
    assert ok.status_code == 200 and engine.calls[-1].sampling.max_tokens == 16
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "min_tokens"
    assert "at most 16" in over.json()["error"]["message"]
    assert len(engine.calls) == 1


def create_app_with_cap(engine: FakeEngine, cap: int) -> FastAPI:
    settings = fake_settings(max_tokens_cap=cap, default_max_tokens=min(8, cap))
    return create_app(settings, engine_factory=lambda _: engine)
