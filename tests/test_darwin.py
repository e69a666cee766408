"""DARWIN on the scripted fake engine and a scripted reward: the algorithm step by step."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from ttalign.engine.base import EngineRequestError, SamplingSettings, StructuredOutput
from ttalign.engine.metering import MeteredEngine
from ttalign.reward_clients.base import RewardClientError
from ttalign.strategies.base import (
    AlignmentRequest,
    ProgressEvent,
    RewardResolver,
    StrategyContext,
)
from ttalign.strategies.budget import ComputeBudget
from ttalign.strategies.darwin import Darwin, DarwinConfig
from ttalign.strategies.darwin_population import (
    Archive,
    kept_beams,
    most_kept,
    plan_replacements,
)
from ttalign.strategies.darwin_prompts import mutation_messages, parse_variants
from ttalign.strategies.errors import InvalidStrategyRequest

from tests.fakes import FakeEngine, Scripted

ORIGINAL = "Describe owls."
QUESTION = {"role": "user", "content": ORIGINAL}
VARIANTS = ["Describe owls briefly.", "Tell me about owls.", "Explain what owls are."]
#: What the model writes after the list's start ("1."), which the prompt writes for it.
MUTATION_LIST = "\n".join(f"{i}. {v}" for i, v in enumerate(VARIANTS, 1)).removeprefix("1.")
DARWIN = Darwin()


@dataclass
class RecordingReward:
    """Scores by a function of the text; records every call's conversation and flag."""

    scorer: object = len
    name: str = "fake"
    calls: list[tuple[list[dict], list[str], bool]] = field(default_factory=list)
    fail_after: int | None = None

    async def score(
        self, conversation: Sequence[dict], candidates: Sequence[str], *, partial: bool = False
    ) -> list[float]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RewardClientError(self.name, "backend down")
        self.calls.append((list(conversation), list(candidates), partial))
        return [float(self.scorer(c)) for c in candidates]  # type: ignore[operator]


def is_mutation(prompt: str) -> bool:
    return "new versions of it" in prompt


def beam_script(words_by_instruction: dict[str, str] | None = None, mutation: str = MUTATION_LIST):
    """Mutation -> ``mutation``; beams -> one word per token, named after their instruction."""

    def script(prompt: str, sampling: SamplingSettings) -> list:
        if is_mutation(prompt):
            return [mutation]
        instruction = prompt.split("<user>")[-1].split("</user>")[0]
        word = (words_by_instruction or {}).get(instruction, "w")
        return [" ".join([word] * sampling.max_tokens) + " "] * sampling.n

    return script


def make_ctx(
    engine: FakeEngine,
    reward: RecordingReward,
    *,
    max_tokens: int = 6,
    n: int = 1,
    deadline: float | None = None,
    messages: tuple[dict[str, str], ...] = (QUESTION,),
    budget: ComputeBudget | None = None,
    **sampling: object,
) -> StrategyContext:
    request = AlignmentRequest(
        messages=messages,
        sampling=SamplingSettings(max_tokens=max_tokens, seed=7, **sampling),  # type: ignore[arg-type]
        n=n,
        return_trace=True,
        reward="fake",
        budget=budget or ComputeBudget(),
    )
    return StrategyContext(
        request=request,
        engine=MeteredEngine(engine),
        rewards=RewardResolver(lambda name: reward),
        deadline=deadline,
    )


def config(**overrides: object) -> DarwinConfig:
    base = {"cycles": 1, "mutations": 3, "replacement_period": 2, "keep": 1}
    return DarwinConfig.model_validate({**base, **overrides})


async def run(ctx: StrategyContext, cfg: DarwinConfig):
    DARWIN.check(ctx.request, cfg)
    return await DARWIN.run(ctx, cfg)


def progress(ctx: StrategyContext) -> list[dict]:
    events = []
    while not ctx.progress.empty():
        event = ctx.progress.get_nowait()
        assert isinstance(event, ProgressEvent)
        events.append(event.data)
    return events


# --- the algorithm ---------------------------------------------------------------------------


async def test_call_sequence_follows_the_algorithm() -> None:
    engine = FakeEngine(beam_script({VARIANTS[0]: "a", VARIANTS[1]: "bb", VARIANTS[2]: "c"}))
    reward = RecordingReward(lambda text: text.count("b"))
    ctx = make_ctx(engine, reward, max_tokens=6)
    result = await run(ctx, config())

    # The seed (original prompt, the whole length) and the mutation come first, together.
    first_two = sorted(engine.calls[:2], key=lambda call: is_mutation(call.prompt))
    seed, mutation = first_two
    assert ORIGINAL in seed.prompt and seed.sampling.max_tokens == 6
    assert is_mutation(mutation.prompt) and mutation.sampling.max_tokens == 256
    assert seed.sampling.seed == 7  # offset 0 is always the seed's
    # Three steps of two tokens each, every unfinished beam under its own instruction.
    steps = engine.calls[2:]
    assert [c.sampling.max_tokens for c in steps] == [2] * 9
    assert all(c.sampling.n == 1 for c in steps)
    assert [VARIANTS.index(c.prompt.split("<user>")[1].split("</user>")[0]) for c in steps] == [
        0, 1, 2, 0, 1, 2, 0, 1, 2,
    ]  # fmt: skip
    # Reward calls: seed (complete), two partial steps, the final ranking (complete).
    flags = [partial for _, _, partial in reward.calls]
    assert flags.count(True) == 2 and flags.count(False) == 2 and flags[-1] is False
    record = result.trace["cycle_records"][0]
    assert [len(s.get("replacements", [])) for s in record["steps"]] == [2, 2, 0]
    # keep=1: the "bb" beam wins every step and the others take over its tokens.
    assert record["steps"][0]["kept"] == [1]
    assert {r["from"] for s in record["steps"][:2] for r in s["replacements"]} == {1}
    assert result.choices[0].text.strip() == "bb bb bb bb bb bb"
    assert result.choices[0].reward == 12.0
    # The most kept beam (1) and the next (0, never kept, ends as a copy of 1) beat the seed.
    assert [p["beam"] for p in record["promoted"]] == [1, 0]
    assert result.metadata == {"cycles_completed": 1, "archive_size": 2, "stopped_by": None}


async def test_every_score_is_against_the_original_instruction() -> None:
    engine = FakeEngine(beam_script({VARIANTS[0]: "a", VARIANTS[1]: "bb", VARIANTS[2]: "c"}))
    reward = RecordingReward()
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        QUESTION,
    )
    ctx = make_ctx(engine, reward, messages=messages)
    await run(ctx, config(cycles=2))
    assert len(reward.calls) >= 3
    assert all(conversation == list(messages) for conversation, _, _ in reward.calls)
    # Beams are decoded under the mutated instruction, in the same conversation.
    beam_prompt = engine.calls[-1].prompt
    assert "Be brief." in beam_prompt and "Hello!" in beam_prompt
    assert any(v in beam_prompt for v in VARIANTS) and ORIGINAL not in beam_prompt


async def test_a_replaced_beam_continues_the_copied_tokens_under_its_own_prompt() -> None:
    engine = FakeEngine(beam_script({VARIANTS[0]: "a", VARIANTS[1]: "bb", VARIANTS[2]: "c"}))
    reward = RecordingReward(lambda text: text.count("b"))
    ctx = make_ctx(engine, reward, max_tokens=4)
    await run(ctx, config())
    second_step = engine.calls[5:8]
    for call, instruction in zip(second_step, VARIANTS, strict=True):
        assert isinstance(call.raw_prompt, list)  # token ids, never re-tokenized text
        assert call.prompt.endswith(f"<user>{instruction}</user><assistant>bb bb ")


async def test_steps_are_concurrent_engine_calls_and_identical_prompts_share_one() -> None:
    engine = FakeEngine(beam_script(), delay=0.05)
    reward = RecordingReward()
    ctx = make_ctx(engine, reward, max_tokens=4)
    started = time.monotonic()
    await run(ctx, config(beams_per_instruction=2, replacement_period=4))
    elapsed = time.monotonic() - started
    step = engine.calls[2:]
    assert [c.sampling.n for c in step] == [2, 2, 2]  # two beams per instruction, one call
    # Seed with mutation, then one step of three calls: three call delays, not five.
    assert elapsed < 4 * 0.05 + 0.1


async def test_finished_beams_are_kept_and_never_replaced() -> None:
    def script(prompt: str, sampling: SamplingSettings) -> list:
        if is_mutation(prompt):
            return [MUTATION_LIST]
        if VARIANTS[2] in prompt:
            return [Scripted(" done", eos=True)] * sampling.n
        word = "b" if VARIANTS[1] in prompt else "a"
        return [" ".join([word] * sampling.max_tokens) + " "] * sampling.n

    engine = FakeEngine(script)
    reward = RecordingReward(lambda text: text.count("b"))
    result = await run(make_ctx(engine, reward, max_tokens=6), config())
    first = result.trace["cycle_records"][0]["steps"][0]
    assert first["beams"][2]["finished"] and first["beams"][2]["score"] == 0.0
    assert first["kept"] == [1, 2]  # the top one, plus the finished one despite its score
    assert first["replacements"] == [{"beam": 0, "from": first["replacements"][0]["from"]}]
    # The finished beam is not extended again, and it is a candidate as a complete reply.
    assert sum(VARIANTS[2] in c.prompt for c in engine.calls) == 1
    finals = result.trace["cycle_records"][0]["final"]
    assert finals[2]["text"] == " done" and finals[2]["finish_reason"] == "stop"


async def test_archive_admits_the_most_kept_beams_that_beat_the_drawn_instruction() -> None:
    engine = FakeEngine(beam_script({VARIANTS[0]: "a", VARIANTS[1]: "bb", VARIANTS[2]: "c"}))
    reward = RecordingReward(lambda text: text.count("b") + 0.5 * text.count("c"))
    result = await run(make_ctx(engine, reward, max_tokens=4), config(keep=2))
    record = result.trace["cycle_records"][0]
    # keep=2: beams 1 and 2 are kept at every step; both beat the seed ("w ..." = 0).
    assert [p["beam"] for p in record["promoted"]] == [1, 2]
    assert record["entered"] == [VARIANTS[1], VARIANTS[2]]
    archive = result.trace["archive"]
    assert archive[0]["archive"] == [{"instruction": ORIGINAL, "reward": 0.0}]
    assert [a["instruction"] for a in archive[-1]["archive"]] == [VARIANTS[1], VARIANTS[2]]
    assert result.metadata["archive_size"] == 2


async def test_the_second_cycle_mutates_an_instruction_drawn_from_the_archive() -> None:
    engine = FakeEngine(beam_script({VARIANTS[1]: "bb"}))
    reward = RecordingReward(lambda text: text.count("b"))
    result = await run(make_ctx(engine, reward, max_tokens=4), config(cycles=2))
    records = result.trace["cycle_records"]
    assert records[0]["drawn"] == ORIGINAL
    archive_after_first = [a["instruction"] for a in result.trace["archive"][1]["archive"]]
    assert records[1]["drawn"] in archive_after_first and ORIGINAL not in archive_after_first


def test_archive_update_rule() -> None:
    archive = Archive({"I0": 1.0})
    assert archive.update("I0", [("x", 0.5), ("y", 1.0)]) == []  # ties do not beat it
    assert archive.rewards == {"I0": 1.0}
    assert archive.update("I0", [("x", 2.0), ("y", 0.5)]) == ["x"]
    assert archive.rewards == {"x": 2.0}  # the drawn one left
    archive = Archive({"I0": 1.0, "z": 3.0})
    assert archive.update("I0", [("z", 2.0)]) == ["z"]
    assert archive.rewards == {"z": 3.0}  # an archived instruction keeps its best reward
    archive = Archive({"I0": 1.0})
    assert archive.update("I0", [("I0", 2.0)]) == ["I0"]  # the drawn one re-entered
    assert archive.rewards == {"I0": 2.0}
    archive = Archive({"I0": math.nan})
    assert archive.update("I0", [("x", -5.0)]) == ["x"]  # an unscored bar is beaten by any


def test_kept_replacement_and_promotion_rules() -> None:
    assert kept_beams([1.0, 3.0, 2.0, 0.0], [False, False, False, True], 2) == [1, 2, 3]
    assert kept_beams([1.0, 1.0, 1.0], [False] * 3, 1) == [0]  # the earlier wins a tie
    assert kept_beams([math.nan, 0.0], [False, False], 1) == [1]  # NaN never wins
    plan = plan_replacements(4, [1, 3], random.Random(0))
    assert [r.target for r in plan] == [0, 2] and {r.source for r in plan} <= {1, 3}
    assert most_kept([2, 5, 5, 0], 2) == [1, 2]


async def test_n_returns_the_top_distinct_responses() -> None:
    engine = FakeEngine(beam_script({VARIANTS[0]: "a", VARIANTS[1]: "bb", VARIANTS[2]: "c"}))
    reward = RecordingReward(lambda text: text.count("b") + 0.5 * text.count("c"))
    result = await run(make_ctx(engine, reward, max_tokens=4, n=2), config(keep=3))
    texts = [c.text.strip() for c in result.choices]
    assert texts == ["bb bb bb bb", "c c c c"]
    assert [c.reward for c in result.choices] == [8.0, 2.0]


async def test_progress_after_every_step_and_cycle() -> None:
    engine = FakeEngine(beam_script())
    ctx = make_ctx(engine, RecordingReward(), max_tokens=6)
    await run(ctx, config(cycles=2))
    events = progress(ctx)
    assert [(e["phase"], e["cycle"]) for e in events] == [
        ("step", 1), ("step", 1), ("cycle", 1), ("step", 2), ("step", 2), ("cycle", 2),
    ]  # fmt: skip
    assert all({"best_reward", "beams_alive", "archive_size"} <= e.keys() for e in events)
    assert events[0]["beams_alive"] == 3 and events[2]["beams_alive"] == 0


async def test_the_mutation_stops_at_its_end_even_when_the_reply_ignores_eos() -> None:
    engine = FakeEngine(beam_script())
    await run(make_ctx(engine, RecordingReward(), ignore_eos=True), config())
    (mutation,) = [c for c in engine.calls if is_mutation(c.prompt)]
    assert mutation.sampling.ignore_eos is False
    assert all(c.sampling.ignore_eos for c in engine.calls if not is_mutation(c.prompt))


async def test_paper_defaults() -> None:
    cfg = DarwinConfig()
    assert (cfg.cycles, cfg.mutations, cfg.replacement_period, cfg.keep) == (3, 5, 40, 3)
    assert (cfg.beams_per_instruction, cfg.promote, cfg.mode) == (1, 2, "darwin")
    assert (cfg.generation.temperature, cfg.generation.top_k) == (0.7, 40)
    assert (cfg.mutation.temperature, cfg.mutation.top_k) == (0.7, 40)


async def test_step_sampling_keeps_the_request_settings() -> None:
    engine = FakeEngine(beam_script())
    ctx = make_ctx(engine, RecordingReward(), max_tokens=4, presence_penalty=0.5, min_tokens=3)
    await run(ctx, config(replacement_period=2))
    first, second = engine.calls[2], engine.calls[5]
    assert (first.sampling.temperature, first.sampling.top_k) == (0.7, 40)
    assert first.sampling.presence_penalty == 0.5
    # min_tokens spreads over the steps, never above a step's max_tokens (vLLM refuses it).
    assert (first.sampling.min_tokens, second.sampling.min_tokens) == (2, 1)
    assert all(c.sampling.min_tokens <= c.sampling.max_tokens for c in engine.calls)
    seeds = [c.sampling.seed for c in engine.calls]
    assert len(set(seeds)) == len(seeds)  # a distinct seed per call, derived from the request's


# --- modes -----------------------------------------------------------------------------------


async def test_replace_only_samples_the_original_instruction_without_mutation() -> None:
    engine = FakeEngine(beam_script())
    reward = RecordingReward()
    result = await run(make_ctx(engine, reward, max_tokens=4), config(mode="replace_only"))
    assert not any(is_mutation(c.prompt) for c in engine.calls)
    first_step = engine.calls[1]
    assert first_step.sampling.n == 3 and ORIGINAL in first_step.prompt
    assert result.metadata["archive_size"] == 1
    assert result.trace["cycle_records"][0]["steps"][0]["replacements"]


async def test_mutate_only_decodes_each_variant_whole_without_replacement() -> None:
    engine = FakeEngine(beam_script())
    reward = RecordingReward()
    result = await run(make_ctx(engine, reward, max_tokens=6), config(mode="mutate_only"))
    beams = engine.calls[2:]
    assert [c.sampling.max_tokens for c in beams] == [6, 6, 6]
    assert not any(partial for _, _, partial in reward.calls)
    assert result.trace["cycle_records"][0]["steps"] == []
    assert [p["beam"] for p in result.trace["cycle_records"][0]["promoted"]] == [0, 1]


# --- fallbacks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cut_short", "expected", "fallbacks"),
    [
        ("1. A\n2. B\n3. C", False, ["A", "B", "C"], []),
        ('1) **A**\n\n2) "B"\n3) C\n4) D', False, ["A", "B", "C"], ["extra_items"]),
        ("1. A\n2. B", False, ["A", "B", "I"], ["missing_item"]),
        ("Sure! Here you go.", False, ["I", "I", "I"], ["no_list"] + ["missing_item"] * 3),
        ("", False, ["I", "I", "I"], ["no_list"] + ["missing_item"] * 3),
        ("1. A\n2.\n3. C", False, ["A", "I", "C"], ["empty_item"]),
        ("1. A\n2. B\n3. C\n\nI hope these help!", False, ["A", "B", "C"], []),
        ("1. A\n2. B\n3. C\n\nI hope these he", True, ["A", "B", "C"], []),
        ("1. A\n2. B\n3. Write a le", True, ["A", "B", "I"], ["cut_short_item", "missing_item"]),
        # Numbers out of sequence (a year, a stray "5.") stay inside the item.
        (
            "1. Write it in\n2023 style.\n2. B\n5. x\n3. C",
            False,
            ["Write it in\n2023 style.", "B\n5. x", "C"],
            [],
        ),
    ],
)
def test_mutation_lists_parse_with_the_drawn_instruction_as_fallback(
    text: str, cut_short: bool, expected: list[str], fallbacks: list[str]
) -> None:
    variants = parse_variants(text, 3, "I", cut_short=cut_short)
    assert list(variants.instructions) == expected
    assert list(variants.fallbacks) == fallbacks


def test_mutation_prompt_can_be_overridden() -> None:
    message, start = mutation_messages(
        "Do X {count}", 4, {"darwin.mutation": "{count}|{instruction}"}
    )
    assert message == {"role": "user", "content": "4|Do X {count}"}
    assert start == {"role": "assistant", "content": "1."}  # the list, begun for the model
    default, _ = mutation_messages("Do X", 5, {})
    assert "Do X" in default["content"] and "5 new versions" in default["content"]


@pytest.mark.parametrize("garbage", ["", "1.", "\n\n\n", "1. 1. 1. 1.", "9. x\n8. y", "{}" * 50])
async def test_malformed_mutation_output_never_fails_the_request(garbage: str) -> None:
    engine = FakeEngine(beam_script(mutation=garbage))
    result = await run(make_ctx(engine, RecordingReward()), config())
    record = result.trace["cycle_records"][0]
    assert record["completed"] and len(record["mutation"]["variants"]) == 3
    assert result.choices and result.choices[0].text


async def test_a_mutation_prompt_the_engine_rejects_falls_back_to_the_drawn_instruction() -> None:
    script = beam_script()

    class RejectingEngine(FakeEngine):
        async def generate(self, prompt, sampling):  # type: ignore[no-untyped-def]
            if is_mutation(self.prompt_text(prompt)):
                raise EngineRequestError("prompt too long", param="messages")
            return await super().generate(prompt, sampling)

    engine = RejectingEngine(script)
    result = await run(make_ctx(engine, RecordingReward()), config())
    record = result.trace["cycle_records"][0]
    assert record["mutation"]["variants"] == [ORIGINAL] * 3
    assert record["completed"] and not result.stopped_early


async def test_a_beam_that_ends_at_once_is_replaced_not_kept() -> None:
    def script(prompt: str, sampling: SamplingSettings) -> list:
        if is_mutation(prompt):
            return [MUTATION_LIST]
        if VARIANTS[0] in prompt and prompt[-11:] == "<assistant>":
            return [Scripted("", eos=True)] * sampling.n  # an empty reply
        return [" ".join(["b"] * sampling.max_tokens) + " "] * sampling.n

    engine = FakeEngine(script)
    reward = RecordingReward(lambda text: 10 - len(text))  # the empty reply scores best
    result = await run(make_ctx(engine, reward, max_tokens=4), config(keep=1))
    first = result.trace["cycle_records"][0]["steps"][0]
    assert first["kept"] == [0]  # it is the top-scored one, so it stays
    reward_low = RecordingReward(lambda text: len(text))
    result = await run(make_ctx(FakeEngine(script), reward_low, max_tokens=4), config(keep=1))
    first = result.trace["cycle_records"][0]["steps"][0]
    assert 0 not in first["kept"] and any(r["beam"] == 0 for r in first["replacements"])
    assert all(c.text.strip() for c in result.choices)


async def test_empty_replies_are_returned_only_when_nothing_else_exists() -> None:
    engine = FakeEngine(
        lambda p, s: [MUTATION_LIST] if is_mutation(p) else [Scripted("", eos=True)] * s.n
    )
    result = await run(make_ctx(engine, RecordingReward()), config())
    assert result.choices[0].text == "" and result.choices[0].finish_reason == "stop"


async def test_a_stop_string_ends_a_beam_and_is_dropped_from_its_text() -> None:
    def script(prompt: str, sampling: SamplingSettings) -> list:
        if is_mutation(prompt):
            return [MUTATION_LIST]
        return ["one two END three"] * sampling.n

    engine = FakeEngine(script)
    result = await run(make_ctx(engine, RecordingReward(), max_tokens=8, stop=("END",)), config())
    final = result.trace["cycle_records"][0]["final"][0]
    assert final["text"] == "one two " and final["finish_reason"] == "stop"


# --- limits ----------------------------------------------------------------------------------


async def test_deadline_returns_the_best_so_far() -> None:
    engine = FakeEngine(beam_script(), delay=0.15)
    ctx = make_ctx(engine, RecordingReward(), max_tokens=40, deadline=time.monotonic() + 0.5)
    result = await run(ctx, config(cycles=3))
    assert result.stopped_early and result.metadata["stopped_by"] == "deadline"
    assert result.choices and result.choices[0].text


async def test_budget_exhaustion_returns_the_best_so_far() -> None:
    engine = FakeEngine(beam_script())
    budget = ComputeBudget(max_engine_tokens=700)
    ctx = make_ctx(engine, RecordingReward(), max_tokens=6, budget=budget)
    result = await run(ctx, config(cycles=3))
    assert result.stopped_early and result.metadata["stopped_by"] == "budget"
    assert result.choices[0].text


async def test_reward_failure_after_the_seed_returns_the_best_so_far() -> None:
    engine = FakeEngine(beam_script())
    result = await run(make_ctx(engine, RecordingReward(fail_after=1)), config())
    assert result.stopped_early and result.metadata["stopped_by"] == "reward_error"
    assert result.choices[0].reward is not None  # the seed, scored


async def test_reward_failure_on_the_seed_is_an_error() -> None:
    engine = FakeEngine(beam_script())
    with pytest.raises(RewardClientError):
        await run(make_ctx(engine, RecordingReward(fail_after=0)), config())


async def test_cancellation_aborts_every_engine_call() -> None:
    engine = FakeEngine(beam_script(), delay=0.2)
    ctx = make_ctx(engine, RecordingReward(), max_tokens=40)
    task = asyncio.ensure_future(run(ctx, config()))
    await asyncio.sleep(0.3)  # inside the first beam step
    assert engine.running >= 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert engine.running == 0


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"logprobs": 2}, "logprobs"),
        ({"structured": StructuredOutput(json_object=True)}, "response_format"),
    ],
)
def test_unsupported_request_settings_are_refused(sampling: dict, param: str) -> None:
    ctx = make_ctx(FakeEngine(), RecordingReward(), **sampling)
    with pytest.raises(InvalidStrategyRequest) as error:
        DARWIN.check(ctx.request, config())
    assert error.value.param == param


def test_a_conversation_without_a_user_message_is_refused() -> None:
    ctx = make_ctx(FakeEngine(), RecordingReward(), messages=({"role": "system", "content": "x"},))
    with pytest.raises(InvalidStrategyRequest) as error:
        DARWIN.check(ctx.request, config())
    assert error.value.param == "messages"


@pytest.mark.parametrize(
    "bad", [{"cycles": -1}, {"mutations": 0}, {"keep": 0}, {"replacement_period": 0}, {"x": 1}]
)
def test_invalid_configs_fail_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        DarwinConfig.model_validate(bad)


def test_too_many_beams_for_the_candidate_cap_are_refused() -> None:
    ctx = make_ctx(FakeEngine(), RecordingReward())
    request = AlignmentRequest(
        messages=(QUESTION,), sampling=SamplingSettings(), max_candidates=8, reward="fake"
    )
    with pytest.raises(InvalidStrategyRequest) as error:
        DARWIN.check(request, config(mutations=5, beams_per_instruction=2))
    assert error.value.param == "strategy_config.mutations"
    assert ctx.request.max_candidates == 64


def test_mutation_faithfulness_statistics() -> None:
    from ttalign.benchmarks.darwin_mutations import mutation_stats

    original = "Write 300 words about cats in 4 paragraphs."
    stats = mutation_stats(
        [
            (
                original,
                [
                    original,  # a fallback
                    "A rain poem.",  # the prompt's example, and short
                    "Please write 300 words on cats, split into 4 paragraphs.",  # both numbers
                    "Write words about cats in 4 paragraphs, and nothing more than that.",
                ],
            )
        ]
    )
    assert stats["variants"] == 4
    assert stats["fallback_to_original"] == 0.25
    assert stats["copied_the_prompt_example"] == 0.25
    assert stats["shorter_than_half_the_original"] == 0.25
    assert stats["numbers_kept_mean_share"] == pytest.approx((0 + 1 + 0.5) / 3)
