"""RAIN without waste: inherited iterations, token-native evaluation prompts, the leaf pool,
the embedding and evaluation memos, and cancellation. Scripted fake engine only."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from ttalign.engine.base import Generation, Prompt, SamplingSettings
from ttalign.strategies.rain import Rain, RainConfig
from ttalign.strategies.rain_evaluation import Reply
from ttalign.strategies.rain_memo import BatchMemo
from ttalign.strategies.rain_pool import TaskPool
from ttalign.strategies.rain_prompts import EvaluationPrompts

from tests.fakes import FakeEngine
from tests.test_rain import QUESTION as USER_MESSAGE
from tests.test_rain import (
    ScriptedEvaluator,
    UnitEmbedder,
    WordModel,
    judge_script,
    make_ctx,
    reply_of,
    search,
    self_evaluator,
)


@dataclass
class CountingEngine(FakeEngine):
    """A :class:`FakeEngine` that counts its tokenizer calls."""

    renders: int = 0
    tokenizations: int = 0
    decodes: int = 0

    async def render_chat(
        self, messages: Sequence[dict[str, str]], *, continue_final_message: bool = False
    ) -> list[int]:
        self.renders += 1
        return await super().render_chat(messages, continue_final_message=continue_final_message)

    async def tokenize(self, text: str) -> list[int]:
        self.tokenizations += 1
        return await super().tokenize(text)

    async def decode(self, token_ids: Sequence[int]) -> str:
        self.decodes += 1
        return await super().decode(token_ids)


def policy(prompt: str, sampling: SamplingSettings):
    """The policy's segments and simulations (:class:`WordModel`), and its self-evaluation."""
    if sampling.allowed_token_ids is not None:
        return judge_script(True)(prompt, sampling)
    return WordModel()(prompt, sampling)


def reply_part(prompt: str) -> str:
    return prompt.split("<assistant>")[-1]


# --- 1. the visits a committed subtree brings along -------------------------------------


def test_inherited_visits_count_toward_the_limit_down_to_a_floor() -> None:
    config = RainConfig()
    assert config.new_iterations(0) == 50
    assert config.new_iterations(12) == 38
    assert config.new_iterations(40) == 15  # the reference's max(maxT, initi + 15) - initi
    assert RainConfig(max_iterations=8).new_iterations(3) == 8  # the floor is capped


async def test_inherited_visits_reduce_the_next_commits_new_iterations() -> None:
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=3)
    run = search(ctx, ScriptedEvaluator(lambda r: 0.0), parallel_leaves=1)
    await run.run()
    first, second = run.trace
    kept = next(c for c in first["candidates"] if c["text"] == first["committed"])
    assert first["inherited_iterations"] == 0 and first["iterations"] == 50
    assert second["inherited_iterations"] == kept["real_visits"] > 0
    assert second["iterations"] == 50 - kept["real_visits"]
    assert run.stats.inherited_iterations == kept["real_visits"]
    assert run.stats.iterations == 100 - kept["real_visits"]


async def test_a_commit_runs_at_least_the_floor_of_new_iterations() -> None:
    # t0 is valued best (below the early-commit value), so it gathers most of the visits.
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=3)
    value = lambda r: 0.5 if r.startswith(" t0") else -1.0  # noqa: E731
    run = search(ctx, ScriptedEvaluator(value), parallel_leaves=1, max_iterations=20)
    await run.run()
    assert run.trace[1]["inherited_iterations"] > 5
    assert run.trace[1]["iterations"] == 15


# --- 2. token-native evaluation prompts ----------------------------------------------------


async def test_evaluation_prompts_are_rendered_once_per_request() -> None:
    engine = CountingEngine(policy)
    ctx = make_ctx(engine, max_tokens=7)
    result = await Rain().run(ctx, RainConfig(max_iterations=10))
    evaluations = [c for c in engine.calls if c.sampling.allowed_token_ids is not None]
    assert len(evaluations) > 10
    # The conversation, then two renders per option ordering; the letters' two tokens.
    assert engine.renders == 1 + 4 and engine.tokenizations == 2
    assert result.metadata["evaluated_texts"] > 5


async def test_the_constant_question_precedes_the_reply_and_is_shared() -> None:
    engine = FakeEngine(policy)
    ctx = make_ctx(engine, max_tokens=7)
    await Rain().run(ctx, RainConfig(max_iterations=10))
    good_first = [
        c.raw_prompt
        for c in engine.calls
        if c.sampling.allowed_token_ids is not None and "A: The reply is harmless." in c.prompt
    ]
    assert len({tuple(p) for p in good_first}) > 2
    prompts = EvaluationPrompts.for_rubric("harmless", {})
    before, after = prompts.around_reply(USER_MESSAGE["content"], good_first=True)
    prefix = list(f"<user>{before}".encode())
    suffix = list(b"</user><assistant>")
    assert all(p[: len(prefix)] == prefix and p[-len(suffix) :] == suffix for p in good_first)
    assert after == ""
    # Between them lie the reply's token ids as the search generated them (word ids).
    replies = [p[len(prefix) : -len(suffix)] for p in good_first]
    assert all(replies) and all(all(token >= 1000 for token in reply) for reply in replies)


async def test_the_reply_ids_are_spliced_without_retokenizing() -> None:
    engine = CountingEngine(judge_script(True))
    evaluator = await self_evaluator(engine)
    before = engine.tokenizations
    ids = tuple(engine.word_ids(" other words"))
    await evaluator.evaluate([Reply("anything", ids)])  # ids its text would never give
    assert engine.tokenizations == before
    assert all(tuple(c.raw_prompt[-20:-18]) == ids for c in engine.calls)


async def test_end_of_sequence_ids_stay_out_of_the_question() -> None:
    engine = FakeEngine(judge_script(True))
    evaluator = await self_evaluator(engine)
    reply = reply_of(engine, "done")
    await evaluator.evaluate([Reply(reply.text, (*reply.token_ids, *engine.eos_token_ids))])
    assert all(not set(c.raw_prompt) & engine.eos_token_ids for c in engine.calls)


async def test_an_overridden_question_may_put_text_after_the_reply() -> None:
    engine = CountingEngine(judge_script(True))
    question = "Rate: {criterion}\nA: {option_a}\nB: {option_b}\n<<{reply}>> for {query}"
    evaluator = await self_evaluator(engine, overrides={"rain.question": question})
    assert engine.tokenizations == 2 + 2  # the letters, then each ordering's tail, once
    await evaluator.evaluate([reply_of(engine, "so far")])
    await evaluator.evaluate([reply_of(engine, "another")])
    prompts = EvaluationPrompts.for_rubric("harmless", {"rain.question": question})
    (expected,) = prompts.messages("a question", "so far", good_first=True)
    first = next(c for c in engine.calls if "A: The reply is harmless." in c.prompt)
    assert first.prompt == f"<user>{expected['content']}</user><assistant>"
    assert engine.tokenizations == 4 and engine.renders == 4


def test_a_question_without_the_reply_placeholder_gets_it_appended() -> None:
    prompts = EvaluationPrompts.for_rubric("helpful", {"rain.question": "Is it {option_a}?"})
    before, after = prompts.around_reply("{reply}", good_first=False)
    assert before.startswith("Is it The reply is unhelpful") and before.endswith("\n\n")
    assert after == ""
    # The query's own braces are not the placeholder.
    before, _ = EvaluationPrompts.for_rubric("honest", {}).around_reply("{reply}", good_first=True)
    assert "{reply}" in before


# --- 3. no decoding of texts the search holds ---------------------------------------------


async def test_rollouts_make_no_decode_calls() -> None:
    engine = CountingEngine(WordModel())
    ctx = make_ctx(engine, max_tokens=7)
    run = search(ctx, ScriptedEvaluator(lambda r: 0.0), UnitEmbedder(), max_iterations=12)
    await run.run()
    assert run.stats.simulations > 10
    assert engine.decodes == run.stats.commits + 1  # once per commit, once at the end


async def test_replies_are_the_committed_text_plus_the_path_and_the_simulation() -> None:
    engine = FakeEngine(WordModel())
    ctx = make_ctx(engine, max_tokens=3)
    evaluator = ScriptedEvaluator(lambda r: 0.0)
    run = search(ctx, evaluator, max_iterations=6)
    choice = await run.run()
    texts = [text for batch in evaluator.batches for text in batch]
    committed = run.trace[0]["committed"]
    assert any(t.startswith(committed + " g g") for t in texts)
    assert choice.text in texts and " sim." in texts  # the root, simulated


# --- 4. the pool of leaves in flight ------------------------------------------------------


@dataclass
class GatedEngine(FakeEngine):
    """Calls whose reply part contains ``gated`` wait for :attr:`gate`; can fail one."""

    gated: tuple[str, ...] = ()
    failing: str | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0
    cancelled: int = 0

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        reply = reply_part(self.prompt_text(prompt))
        if self.failing is not None and self.failing in reply:
            await asyncio.sleep(0.01)
            raise RuntimeError("the engine broke")
        if any(word in reply for word in self.gated):
            self.waiting += 1
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.waiting -= 1
        return await super().generate(prompt, sampling)


async def test_a_slow_leaf_does_not_hold_back_the_backups_of_faster_ones() -> None:
    engine = GatedEngine(WordModel(), gated=(" t0",))
    ctx = make_ctx(engine, max_tokens=3)
    run = search(ctx, ScriptedEvaluator(lambda r: 0.0), parallel_leaves=4, max_iterations=12)
    seen_while_t0_waited: list[int] = []

    async def release_t0() -> None:
        # With a round barrier the search would wait for t0 and never get here.
        while run.stats.iterations < 6:
            await asyncio.sleep(0.001)
        seen_while_t0_waited.append(engine.waiting)
        engine.gate.set()

    choice, _ = await asyncio.wait_for(asyncio.gather(run.run(), release_t0()), timeout=10)
    assert seen_while_t0_waited[0] > 0 and choice.num_tokens == 3


async def test_an_exception_in_one_leaf_cancels_the_others() -> None:
    engine = GatedEngine(WordModel(), gated=(" t1", " t2", " t3"), failing=" t0")
    ctx = make_ctx(engine, max_tokens=3)
    run = search(ctx, ScriptedEvaluator(lambda r: 0.0), parallel_leaves=4)
    with pytest.raises(RuntimeError, match="the engine broke"):
        await asyncio.wait_for(run.run(), timeout=10)
    assert engine.cancelled >= 3 and engine.waiting == 0
    assert not run.pool


async def test_leaves_outside_the_committed_child_are_cancelled() -> None:
    # t0 is good; a leaf under t1 hangs until it is cancelled at the commit of t0.
    engine = GatedEngine(WordModel(), gated=(" t1",), delay=0.002)
    ctx = make_ctx(engine, max_tokens=5)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0 if r.startswith(" t0") else 0.0))
    choice = await asyncio.wait_for(run.run(), timeout=10)
    first = run.trace[0]
    assert first["committed"] == " t0" and choice.text.startswith(" t0")
    assert first["cancelled_leaves"] >= 1 and engine.cancelled >= 1
    # Leaves in flight below t0 went on into the kept subtree.
    assert first["kept_in_flight"] >= 1 and run.trace[1]["inherited_iterations"] > 0
    assert engine.waiting == 0 and not run.pool


@dataclass
class LoggingEngine(FakeEngine):
    """Logs when each call starts and ends."""

    log: list[tuple[str, SamplingSettings]] = field(default_factory=list)

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        self.log.append(("start", sampling))
        try:
            return await super().generate(prompt, sampling)
        finally:
            self.log.append(("end", sampling))


@pytest.mark.parametrize("parallel_leaves", [1, 4])
async def test_widening_by_sampling_runs_as_its_own_call(parallel_leaves: int) -> None:
    # Two-token children that all look alike and are bad make a committed root widen by
    # sampling. One leaf at a time, the search waits for it (the reference's loop); with
    # more, the descents go on meanwhile.
    engine = LoggingEngine(WordModel(sampled_same=True), delay=0.001)
    ctx = make_ctx(engine, max_tokens=3)
    run = search(
        ctx, ScriptedEvaluator(lambda r: -0.5), UnitEmbedder(alike=True), first_width=2,
        parallel_leaves=parallel_leaves, max_iterations=20,
    )  # fmt: skip
    await run.run()
    widenings = [s for event, s in engine.log if event == "start" and s.n == 2 and s.top_k]
    assert widenings and not run.pool
    alone = []
    for widening in widenings:
        start = next(i for i, (e, s) in enumerate(engine.log) if s is widening and e == "start")
        end = next(i for i, (e, s) in enumerate(engine.log) if s is widening and e == "end")
        alone.append(all(event == "end" for event, _ in engine.log[start + 1 : end]))
    assert all(alone) if parallel_leaves == 1 else not all(alone)


# --- 5. the embedding and evaluation memos -----------------------------------------------


async def test_each_text_is_embedded_once_per_request() -> None:
    embedder = UnitEmbedder()
    ctx = make_ctx(FakeEngine(policy), max_tokens=7, embedder=embedder)
    result = await Rain().run(ctx, RainConfig(max_iterations=12))
    embedded = [text for batch in embedder.batches for text in batch]
    assert len(embedded) == len(set(embedded)) == result.metadata["embedded_texts"]
    assert result.metadata["embedding_cache_hits"] > 0


async def test_concurrent_askers_share_one_computation() -> None:
    memo: BatchMemo[str, int] = BatchMemo()
    batches: list[list[str]] = []

    async def compute(keys: list[str]) -> list[int]:
        batches.append(keys)
        await asyncio.sleep(0.01)
        return [len(k) for k in keys]

    first, second = await asyncio.gather(
        memo.get_many(["a", "bb"], compute), memo.get_many(["bb", "ccc", "a"], compute)
    )
    assert (first, second) == ([1, 2], [2, 3, 1])
    assert batches == [["a", "bb"], ["ccc"]]
    assert (memo.calls, memo.computed, memo.hits) == (2, 3, 2)


async def test_a_failed_computation_is_not_the_other_askers_failure() -> None:
    memo: BatchMemo[str, int] = BatchMemo()

    async def failing(keys: list[str]) -> list[int]:
        await asyncio.sleep(0.01)
        raise RuntimeError("down")

    async def working(keys: list[str]) -> list[int]:
        return [len(k) for k in keys]

    first, second = await asyncio.gather(
        memo.get_many(["a"], failing), memo.get_many(["a"], working), return_exceptions=True
    )
    assert isinstance(first, RuntimeError) and second == [1]


# --- the pool itself --------------------------------------------------------------------


async def test_the_pool_returns_tasks_as_they_finish_and_cancels_what_it_drops() -> None:
    pool: TaskPool[str] = TaskPool()
    never = asyncio.Event()
    stopped: list[str] = []

    async def work(name: str, seconds: float) -> str:
        try:
            if seconds < 0:
                await never.wait()
            await asyncio.sleep(seconds)
            return name
        except asyncio.CancelledError:
            stopped.append(name)
            raise

    pool.start(work("slow", 0.05), "slow")
    pool.start(work("fast", 0.0), "fast")
    pool.start(work("stuck", -1), "stuck")
    assert await pool.next() == ("fast", "fast")
    assert await pool.cancel_where(lambda label: label == "stuck") == ["stuck"]
    assert stopped == ["stuck"] and pool.labels() == ["slow"]
    assert await pool.next() == ("slow", "slow")
    pool.start(work("left", -1), "left")
    await asyncio.sleep(0)
    await pool.aclose()
    assert stopped == ["stuck", "left"] and not pool
