"""TPO against the scripted fake engine and reward: the exact call sequence, every fallback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from pydantic import ValidationError
from ttalign.engine.base import EngineRequestError, SamplingSettings
from ttalign.engine.metering import MeteredEngine
from ttalign.reward_clients.base import RewardTimeout
from ttalign.reward_clients.registry import RewardRegistry
from ttalign.server.app import create_app
from ttalign.strategies import get_strategy
from ttalign.strategies.base import AlignmentRequest, ProgressEvent, RewardResolver, StrategyContext
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.tpo import TestTimePreferenceOptimization as TPOStrategy
from ttalign.strategies.tpo import TPOConfig
from ttalign.strategies.tpo_prompts import DEFAULT_TEMPLATES, fill

from tests.conftest import fake_settings
from tests.fakes import EngineCall, FakeEngine, FakeReward
from tests.servers import RunningServer, serve_in_thread

QUESTION = {"role": "user", "content": "Name a fruit."}
TPO = get_strategy("tpo")


class StepScript:
    """Answers each TPO step from its own queue, and records which step each call was.

    The step is told from the rendered prompt: the user's conversation alone is a sampling
    call; otherwise the number of finished assistant turns says loss (0), gradient (1) or
    update (2).
    """

    def __init__(self, **queues: list[list[str] | str]) -> None:
        self.queues = {step: list(outputs) for step, outputs in queues.items()}
        self.steps: list[str] = []

    def __call__(self, prompt: str, sampling: SamplingSettings) -> list[str]:
        step = step_of(prompt)
        self.steps.append(step)
        outputs = self.queues[step].pop(0)
        return [outputs] if isinstance(outputs, str) else outputs


def step_of(prompt: str) -> str:
    if "<system>" not in prompt:
        return "sample"
    return ("loss", "gradient", "update")[prompt.count("</assistant>")]


def scorer(table: dict[str, float]):
    return lambda text: table[text.strip()]


def make_ctx(
    engine: FakeEngine,
    reward: FakeReward,
    *,
    n: int = 1,
    deadline: float | None = None,
    max_candidates: int = 64,
    overrides: dict[str, str] | None = None,
    messages: tuple[dict[str, str], ...] = (QUESTION,),
    seed: int | None = None,
) -> StrategyContext:
    request = AlignmentRequest(
        messages=messages,
        sampling=SamplingSettings(max_tokens=40, seed=seed, stop=("STOP",)),
        n=n,
        return_trace=True,
        reward="fake",
        max_candidates=max_candidates,
    )
    return StrategyContext(
        request=request,
        engine=MeteredEngine(engine),
        rewards=RewardResolver(lambda name: reward),
        deadline=deadline,
        prompt_overrides=overrides or {},
    )


async def run_tpo(ctx: StrategyContext, **config):
    return await TPO.run(ctx, TPOConfig.model_validate(config))


def progress(ctx: StrategyContext) -> list[dict]:
    events = []
    while not ctx.progress.empty():
        event = ctx.progress.get_nowait()
        assert isinstance(event, ProgressEvent)
        events.append(event.data)
    return events


def last_user(call: EngineCall) -> str:
    return call.prompt.rsplit("<user>", 1)[1]


# --- the algorithm ----------------------------------------------------------------------------


async def test_call_sequence_follows_the_algorithm() -> None:
    script = StepScript(
        sample=[["apple", "kiwi fruit", "fig"]],
        loss=["L1: apple beats kiwi", "L2: u1b beats u1c"],
        gradient=["G1: say more", "G2: be precise"],
        update=[["u1a", "u1b", "u1c"], ["u2a", "u2b", "u2c"]],
    )
    engine = FakeEngine(script)
    scores = {"apple": 5, "kiwi fruit": 1, "fig": 3, "u1a": 4, "u1b": 9, "u1c": 0}
    reward = FakeReward(scorer({**scores, "u2a": 2, "u2b": 6, "u2c": 7}))
    ctx = make_ctx(engine, reward)

    result = await run_tpo(ctx, depth=2, width=3)

    assert script.steps == ["sample", "loss", "gradient", "update"] * 1 + [
        "loss",
        "gradient",
        "update",
    ]
    assert [c.sampling.n for c in engine.calls] == [3, 1, 1, 3, 1, 1, 3]
    # One reward call per batch of new responses.
    assert reward.batches == [
        ["apple", "kiwi fruit", "fig"],
        ["u1a", "u1b", "u1c"],
        ["u2a", "u2b", "u2c"],
    ]
    # Round 1 compares the best (apple) with the worst (kiwi) of the first sample.
    loss1 = engine.calls[1].prompt
    assert "apple" in loss1 and "kiwi fruit" in loss1 and "fig" not in loss1
    assert loss1.index("kiwi fruit") < loss1.index("apple"), "rejected comes before chosen"
    # The gradient extends the loss conversation; the update extends the gradient one.
    assert engine.calls[2].prompt.startswith(loss1.removesuffix("<assistant>"))
    assert "L1: apple beats kiwi" in engine.calls[2].prompt
    update1 = engine.calls[3].prompt
    assert update1.startswith(engine.calls[2].prompt.removesuffix("<assistant>"))
    assert "G1: say more" in update1 and "Name a fruit." in last_user(engine.calls[3])
    # Round 2 picks from the whole cache: u1b (9) beats everything, u1c (0) is the worst.
    loss2 = engine.calls[4].prompt
    assert "u1b" in loss2 and "u1c" in loss2 and "apple" not in loss2

    # The best of the cache wins even though it came from round 1.
    assert [c.text for c in result.choices] == ["u1b"]
    assert result.choices[0].reward == 9
    assert result.rounds == 2 and result.candidates_scored == 9
    assert not result.stopped_early
    assert ctx.engine.usage.engine_calls == 7
    assert ctx.engine.usage.candidates_generated == 3 + 3 * 2 + 2 * 2

    trace = result.trace
    assert [r["chosen"]["text"] for r in trace["rounds"]] == ["apple", "u1b"]
    assert [r["rejected"]["text"] for r in trace["rounds"]] == ["kiwi fruit", "u1c"]
    assert [r["chosen"]["score"] for r in trace["rounds"]] == [5, 9]
    assert [r["loss"] for r in trace["rounds"]] == ["L1: apple beats kiwi", "L2: u1b beats u1c"]
    assert [r["gradient"] for r in trace["rounds"]] == ["G1: say more", "G2: be precise"]
    assert len(trace["candidates"]) == 9
    assert max(trace["candidates"], key=lambda c: c["score"])["text"] == "u1b"
    assert [c["round"] for c in trace["candidates"]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


async def test_progress_is_reported_after_every_round() -> None:
    script = StepScript(
        sample=[["a", "bb"]],
        loss=["l", "l"],
        gradient=["g", "g"],
        update=[["ccc", "d"], ["e", "f"]],
    )
    reward = FakeReward(lambda t: len(t.strip()))
    ctx = make_ctx(FakeEngine(script), reward)
    await run_tpo(ctx, depth=2, width=2)
    assert progress(ctx) == [
        {"round": 0, "depth": 2, "best_score": 2.0, "candidates_scored": 2},
        {"round": 1, "depth": 2, "best_score": 3.0, "candidates_scored": 4},
        {"round": 2, "depth": 2, "best_score": 3.0, "candidates_scored": 6},
    ]


async def test_sampling_settings_of_each_step() -> None:
    script = StepScript(sample=[["a", "b"]], loss=["l"], gradient=["g"], update=[["c", "d"]])
    engine = FakeEngine(script)
    ctx = make_ctx(engine, FakeReward(lambda t: 1.0), seed=10)
    await run_tpo(
        ctx,
        depth=1,
        width=2,
        generation={"temperature": 0.9, "top_p": 0.8},
        feedback={"temperature": 0.2, "top_p": 1.0},
        max_tokens={"sample": 30, "loss": 11, "gradient": 12, "update": 33},
    )
    sample, loss, gradient, update = (c.sampling for c in engine.calls)
    assert (sample.n, sample.temperature, sample.top_p, sample.max_tokens) == (2, 0.9, 0.8, 30)
    assert (loss.n, loss.temperature, loss.top_p, loss.max_tokens) == (1, 0.2, 1.0, 11)
    assert gradient.max_tokens == 12 and update.max_tokens == 33
    # The request's stop sequences shape responses, not critiques; seeds differ per step.
    assert sample.stop == update.stop == ("STOP",) and loss.stop == gradient.stop == ()
    assert [s.seed for s in (sample, loss, gradient, update)] == [10, 11, 12, 13]


async def test_paper_defaults() -> None:
    config = TPOConfig()
    assert (config.mode, config.depth, config.width) == ("tpo", 2, 5)
    assert (config.generation.temperature, config.generation.top_p) == (0.7, 0.95)
    engine = FakeEngine()
    ctx = make_ctx(engine, FakeReward())
    await run_tpo(ctx, depth=0)
    assert engine.calls[0].sampling.max_tokens == 40, "default: the request's max_tokens"


async def test_n_returns_top_distinct_responses() -> None:
    script = StepScript(
        sample=[["same", " same ", "low"]],
        loss=["l"],
        gradient=["g"],
        update=[["same", "top", "mid"]],
    )
    reward = FakeReward(scorer({"same": 5, "low": 1, "top": 8, "mid": 3}))
    ctx = make_ctx(FakeEngine(script), reward, n=3)
    result = await run_tpo(ctx, depth=1, width=3)
    assert [c.text for c in result.choices] == ["top", "same", "mid"]
    assert [c.reward for c in result.choices] == [8, 5, 3]
    # Duplicates are never scored twice.
    assert reward.batches == [["same", "low"], ["top", "mid"]]


async def test_n_beyond_the_distinct_responses_repeats_the_best() -> None:
    engine = FakeEngine(lambda prompt, sampling: ["only"] * sampling.n)
    result = await run_tpo(make_ctx(engine, FakeReward(), n=3), depth=1, width=2)
    assert [c.text for c in result.choices] == ["only"] * 3


# --- modes ------------------------------------------------------------------------------------


async def test_revision_mode_critiques_the_best_alone() -> None:
    script = StepScript(
        sample=[["good", "bad"]],
        loss=["l1", "l2"],
        gradient=["g1", "g2"],
        update=[["u1", "u1"], ["u2", "u2"]],
    )
    engine = FakeEngine(script)
    reward = FakeReward(scorer({"good": 2, "bad": 0, "u1": 3, "u2": 1}))
    result = await run_tpo(make_ctx(engine, reward), mode="revision", depth=2, width=2)
    loss_prompt = engine.calls[1].prompt
    assert "good" in loss_prompt and "bad" not in loss_prompt
    system = DEFAULT_TEMPLATES["tpo.revision_loss_system"]
    assert system in loss_prompt
    assert DEFAULT_TEMPLATES["tpo.revision_gradient"] in engine.calls[2].prompt
    assert "u1" in engine.calls[4].prompt, "round 2 critiques the new best"
    assert all(r["rejected"] is None for r in result.trace["rounds"])
    assert result.choices[0].text == "u1"


async def test_bon_mode_spends_the_same_compute_without_feedback() -> None:
    script = StepScript(sample=[["a", "b"], ["c", "d"], ["e", "f"]])
    engine = FakeEngine(script)
    reward = FakeReward(scorer({"a": 1, "b": 2, "c": 6, "d": 0, "e": 3, "f": 4}))
    result = await run_tpo(make_ctx(engine, reward), mode="bon", depth=2, width=2)
    assert script.steps == ["sample"] * 3
    assert {c.prompt for c in engine.calls} == {engine.calls[0].prompt}
    assert result.choices[0].text == "c" and result.rounds == 2
    assert result.candidates_scored == 6
    assert "loss" not in result.trace["rounds"][0]


async def test_single_distinct_response_falls_back_to_self_critique() -> None:
    script = StepScript(sample=[["x", "x"]], loss=["l"], gradient=["g"], update=[["y", "y"]])
    engine = FakeEngine(script)
    reward = FakeReward(scorer({"x": 1, "y": 2}))
    result = await run_tpo(make_ctx(engine, reward), depth=1, width=2)
    assert DEFAULT_TEMPLATES["tpo.revision_loss_system"] in engine.calls[1].prompt
    assert result.trace["rounds"][0]["rejected"] is None
    assert result.choices[0].text == "y"


# --- fallbacks --------------------------------------------------------------------------------


async def test_empty_critique_becomes_a_generic_instruction() -> None:
    script = StepScript(sample=[["a", "bb"]], loss=["l"], gradient=["  \n"], update=[["ccc", "d"]])
    engine = FakeEngine(script)
    result = await run_tpo(make_ctx(engine, FakeReward()), depth=1, width=2)
    fallback = DEFAULT_TEMPLATES["tpo.fallback_gradient"]
    assert fallback in engine.calls[3].prompt
    round_ = result.trace["rounds"][0]
    assert round_["gradient"] == fallback and round_["fallbacks"] == ["empty_gradient"]
    assert result.choices[0].text == "ccc"


async def test_empty_loss_becomes_a_generic_review() -> None:
    script = StepScript(sample=[["a", "bb"]], loss=[""], gradient=["g"], update=[["ccc", "d"]])
    engine = FakeEngine(script)
    result = await run_tpo(make_ctx(engine, FakeReward()), depth=1, width=2)
    assert DEFAULT_TEMPLATES["tpo.fallback_loss"] in engine.calls[2].prompt
    assert result.trace["rounds"][0]["fallbacks"] == ["empty_loss"]


async def test_empty_update_outputs_are_dropped_and_the_cache_kept() -> None:
    script = StepScript(
        sample=[["a", "bb"]], loss=["l", "l"], gradient=["g", "g"], update=[["", " "], ["", "c"]]
    )
    reward = FakeReward(scorer({"a": 1, "bb": 2, "c": 0}))
    result = await run_tpo(make_ctx(FakeEngine(script), reward), depth=2, width=2)
    round1, round2 = result.trace["rounds"]
    assert round1["candidates"] == [] and {d["reason"] for d in round1["dropped"]} == {"empty"}
    assert reward.batches == [["a", "bb"], ["c"]], "nothing to score, no reward call"
    # Round 2 goes on from the unchanged cache.
    assert round2["chosen"]["text"] == "bb" and round2["rejected"]["text"] == "a"
    assert result.choices[0].text == "bb" and result.rounds == 2


async def test_update_that_repeats_a_cached_response_is_not_rescored() -> None:
    script = StepScript(sample=[["a", "bb"]], loss=["l"], gradient=["g"], update=[["bb", "a"]])
    reward = FakeReward()
    result = await run_tpo(make_ctx(FakeEngine(script), reward), depth=1, width=2)
    assert reward.batches == [["a", "bb"]]
    assert [d["reason"] for d in result.trace["rounds"][0]["dropped"]] == ["duplicate"] * 2
    assert result.candidates_scored == 2


@pytest.mark.parametrize(
    ("output", "kept"),
    [
        ("Here is an improved response:\nA banana.", "A banana."),
        ("Revised answer: A plum.", "A plum."),
        ("**New response:**\n\nA pear.", "A pear."),
        ("An old reply.\n\nHere's a rewritten response:\n\nA lime, and", "A lime, and"),
        ("Improved response:", "Improved response:"),
        ("Improved: a fig.", "Improved: a fig."),
        ("A new answer to the riddle: a date.", "A new answer to the riddle: a date."),
    ],
)
async def test_text_after_a_new_response_header_is_kept(output: str, kept: str) -> None:
    script = StepScript(sample=[["a", "bb"]], loss=["l"], gradient=["g"], update=[[output, "c"]])
    reward = FakeReward(lambda t: len(t))
    result = await run_tpo(make_ctx(FakeEngine(script), reward), depth=1, width=2)
    assert reward.batches[1][0] == kept
    assert result.choices[0].text == kept
    assert result.choices[0].num_tokens == len(kept.split())


async def test_runaway_update_is_kept_with_finish_reason_length() -> None:
    runaway = "word " * 40  # the fake engine stops it at max_tokens
    script = StepScript(sample=[["a", "b"]], loss=["l"], gradient=["g"], update=[[runaway, "c"]])
    reward = FakeReward(lambda t: len(t))
    result = await run_tpo(make_ctx(FakeEngine(script), reward), depth=1, width=2)
    assert result.choices[0].text == runaway
    assert result.choices[0].finish_reason == "length"


async def test_runaway_critique_is_used_truncated() -> None:
    long_loss = "blah " * 50
    script = StepScript(sample=[["a", "b"]], loss=[long_loss], gradient=["g"], update=[["c", "d"]])
    engine = FakeEngine(script)
    result = await run_tpo(
        make_ctx(engine, FakeReward()), depth=1, width=2, max_tokens={"loss": 10}
    )
    round_ = result.trace["rounds"][0]
    assert round_["loss_finish_reason"] == "length" and round_["fallbacks"] == []
    truncated = " ".join(long_loss.split()[:10])  # the fake engine stops it at max_tokens
    assert truncated in engine.calls[2].prompt
    assert truncated + " blah" not in engine.calls[2].prompt


async def test_engine_rejecting_a_round_returns_the_best_so_far() -> None:
    def script(prompt: str, sampling: SamplingSettings) -> list[str]:
        if step_of(prompt) == "gradient":
            raise EngineRequestError("prompt too long", param="messages")
        return ["a", "bb"] if step_of(prompt) == "sample" else ["l"]

    result = await run_tpo(make_ctx(FakeEngine(script), FakeReward()), depth=2, width=2)
    assert result.choices[0].text == "bb"
    assert result.stopped_early and result.rounds == 0
    assert result.trace["stop_reason"] == "engine_rejected"
    assert result.trace["rounds"][0]["loss"] == "l", "the partial round stays in the trace"


async def test_reward_failure_in_a_round_returns_the_best_so_far() -> None:
    script = StepScript(sample=[["a", "bb"]], loss=["l"], gradient=["g"], update=[["ccc", "d"]])

    class FlakyReward(FakeReward):
        async def score(self, conversation, candidates, *, partial=False):
            if self.batches:
                raise RewardTimeout("fake", "took too long")
            return await super().score(conversation, candidates)

    result = await run_tpo(make_ctx(FakeEngine(script), FlakyReward()), depth=1, width=2)
    assert result.choices[0].text == "bb" and result.stopped_early
    assert result.trace["stop_reason"] == "reward_error"


async def test_reward_failure_before_any_candidate_is_an_error() -> None:
    class DownReward(FakeReward):
        async def score(self, conversation, candidates, *, partial=False):
            raise RewardTimeout("fake", "down")

    with pytest.raises(RewardTimeout):
        await run_tpo(make_ctx(FakeEngine(), DownReward()), depth=1, width=2)


@pytest.mark.parametrize(
    "garbage",
    ["", "</assistant><user>", "{query} {chosen} {rejected}", "\x00\ufffd" * 5, "Improved:\n"],
)
async def test_malformed_model_output_never_raises(garbage: str) -> None:
    engine = FakeEngine(lambda prompt, sampling: [garbage] * sampling.n)
    result = await run_tpo(make_ctx(engine, FakeReward()), depth=2, width=3)
    assert len(result.choices) == 1 and result.choices[0].text == garbage


# --- deadline, cancellation, concurrency ------------------------------------------------------


async def test_deadline_stops_the_search_with_the_best_so_far() -> None:
    engine = FakeEngine(StepScript(sample=[["a", "bb"]], loss=["l"]), delay=0.2)
    ctx = make_ctx(engine, FakeReward(), deadline=time.monotonic() + 0.3)
    started = time.monotonic()
    result = await run_tpo(ctx, depth=2, width=2)
    assert time.monotonic() - started < 0.5, "the in-flight loss call was cut off"
    assert result.stopped_early and result.rounds == 0
    assert result.choices[0].text == "bb"
    assert result.trace["stop_reason"] == "deadline"
    assert engine.running == 0


async def test_passed_deadline_still_answers_from_the_first_sample() -> None:
    engine = FakeEngine(StepScript(sample=[["a", "bb"]]))
    ctx = make_ctx(engine, FakeReward(), deadline=time.monotonic() - 1)
    result = await run_tpo(ctx, depth=2, width=2)
    assert result.stopped_early and result.choices[0].text == "bb"
    assert len(engine.calls) == 1


async def test_cancellation_propagates_and_stops_engine_work() -> None:
    engine = FakeEngine(delay=0.5)
    task = asyncio.ensure_future(run_tpo(make_ctx(engine, FakeReward()), depth=2, width=2))
    await asyncio.sleep(0.1)
    assert engine.running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.running == 0


async def test_concurrent_requests_share_the_engine() -> None:
    peak = 0

    class Watched(FakeEngine):
        async def generate(self, prompt, sampling):
            nonlocal peak
            peak = max(peak, self.running + 1)
            return await super().generate(prompt, sampling)

    engine = Watched(delay=0.05)
    results = await asyncio.gather(
        *(run_tpo(make_ctx(engine, FakeReward()), depth=1, width=2) for _ in range(4))
    )
    assert peak == 4, "no lock serializes requests"
    assert all(r.rounds == 1 for r in results)


# --- configuration ----------------------------------------------------------------------------


async def test_width_over_the_server_cap_is_rejected() -> None:
    with pytest.raises(InvalidStrategyRequest) as caught:
        ctx = make_ctx(FakeEngine(), FakeReward(), max_candidates=4)
        TPOStrategy().check(ctx.request, TPOConfig(width=5))
    assert caught.value.param == "strategy_config.width"


@pytest.mark.parametrize(
    "config",
    [
        {"mode": "dpo"},
        {"depth": -1},
        {"width": 0},
        {"generation": {"temperature": 3}},
        {"feedback": {"top_p": 0}},
        {"max_tokens": {"loss": 0}},
        {"max_tokens": {"bogus": 1}},
        {"steps": 2},
    ],
)
def test_invalid_configs_fail_validation(config: dict) -> None:
    with pytest.raises(ValidationError):
        TPOConfig.model_validate(config)


async def test_prompt_overrides_replace_templates() -> None:
    script = StepScript(sample=[["a", "bb"]], loss=["l"], gradient=["g"], update=[["c", "d"]])
    engine = FakeEngine(script)
    overrides = {
        "tpo.loss_user": "Q={query} BAD={rejected} GOOD={chosen} {literal}",
        "tpo.update": "Again, for {query}",
    }
    ctx = make_ctx(engine, FakeReward(), overrides=overrides)
    await run_tpo(ctx, depth=1, width=2)
    assert "Q=Name a fruit. BAD=a GOOD=bb {literal}" in engine.calls[1].prompt
    assert last_user(engine.calls[3]).startswith("Again, for Name a fruit.")


def test_fill_is_one_pass() -> None:
    assert fill("{query}|{chosen}", query="{chosen}", chosen="x") == "{chosen}|x"


async def test_multi_turn_conversation_is_shown_whole_to_the_critic() -> None:
    messages = (
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a fruit."},
    )
    script = StepScript(loss=["l"], gradient=["g"], update=[["c", "d"]])
    engine = FakeEngine(
        lambda p, s: ["a", "bb"] if "Be terse.</system>" in p[:30] else script(p, s)
    )
    await run_tpo(make_ctx(engine, FakeReward(), messages=messages), depth=1, width=2)
    loss_prompt = engine.calls[1].prompt
    assert "[system]\nBe terse." in loss_prompt and "[assistant]\nHello." in loss_prompt


# --- through the API --------------------------------------------------------------------------


@pytest.fixture
def tpo_server() -> Iterator[RunningServer]:
    engine = FakeEngine(lambda prompt, sampling: [f"answer {i}" for i in range(sampling.n)])

    def rewards(settings, engine, metrics, judge_engine) -> RewardRegistry:
        return RewardRegistry({"fake": FakeReward(lambda t: float(t[-1]))}, default="fake")

    app = create_app(
        fake_settings(max_candidates=4), engine_factory=lambda _: engine, reward_factory=rewards
    )
    with serve_in_thread(app) as running:
        yield running


def test_streamed_tpo_reports_progress_then_the_answer(tpo_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=tpo_server.api_url, api_key="x", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=[QUESTION],
            stream=True,
            extra_body={"strategy": "tpo", "strategy_config": {"depth": 2, "width": 3}},
        )
    )
    # Chunks without choices are progress reports or keep-alives (neither has content).
    progress_at = [i for i, c in enumerate(chunks) if c.model_extra.get("alignment_progress")]
    progress = [chunks[i].model_extra["alignment_progress"] for i in progress_at]
    assert [p["round"] for p in progress] == [0, 1, 2]
    assert progress[-1]["candidates_scored"] == 3
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer == "answer 2"
    first_content = next(i for i, c in enumerate(chunks) if c.choices)
    assert progress_at[-1] < first_content, "progress comes before the answer"
    assert chunks[-1].model_extra["alignment"]["rewards"] == [2.0]


def test_strategies_endpoint_lists_tpo(tpo_server: RunningServer) -> None:
    data = httpx.get(f"{tpo_server.api_url}/strategies").json()["data"]
    schema = next(s for s in data if s["name"] == "tpo")["config_schema"]
    assert {"mode", "depth", "width", "reward", "generation", "feedback", "max_tokens"} <= set(
        schema["properties"]
    )


def test_non_streamed_tpo_and_width_cap(tpo_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=tpo_server.api_url, api_key="x", max_retries=0)
    response = client.chat.completions.create(
        model="fake-model",
        messages=[QUESTION],
        extra_body={"strategy": "tpo", "strategy_config": {"depth": 1, "width": 2}},
    )
    alignment = response.model_extra["alignment"]
    assert alignment["strategy"] == "tpo" and alignment["rounds"] == 1
    assert alignment["engine_calls"] == 4 and alignment["rewards"] == [1.0]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fake-model",
            messages=[QUESTION],
            extra_body={"strategy": "tpo", "strategy_config": {"width": 5}},
        )
    assert caught.value.response.json()["error"]["param"] == "strategy_config.width"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fake-model",
            messages=[QUESTION],
            extra_body={"strategy": "tpo", "strategy_config": {"mode": "x"}},
        )
    assert caught.value.response.json()["error"]["param"] == "strategy_config.mode"


def test_min_tokens_above_a_response_step_limit_is_refused() -> None:
    request = AlignmentRequest(
        messages=(QUESTION,), sampling=SamplingSettings(max_tokens=40, min_tokens=30)
    )
    TPO.check(request, TPOConfig())
    with pytest.raises(InvalidStrategyRequest) as caught:
        TPO.check(request, TPOConfig.model_validate({"max_tokens": {"update": 20}}))
    assert caught.value.param == "min_tokens"
