"""RAIN on the scripted fake engine and a scripted evaluator: the tree's rules and the search."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from ttalign.engine.base import SamplingSettings
from ttalign.engine.metering import MeteredEngine
from ttalign.reward_clients.base import RewardClientError
from ttalign.strategies.base import (
    AlignmentRequest,
    DeltaEvent,
    ProgressEvent,
    ResultEvent,
    RewardResolver,
    StrategyContext,
)
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.rain import Rain, RainConfig, RainSearch
from ttalign.strategies.rain_evaluation import (
    CachedEvaluator,
    Reply,
    RewardEvaluator,
    SelfEvaluator,
    option_token_ids,
)
from ttalign.strategies.rain_prompts import EvaluationPrompts
from ttalign.strategies.rain_tree import (
    Node,
    TreeSettings,
    ValueRange,
    add_virtual_loss,
    backup,
    best_child,
    clamp_greedy_probability,
    needs_widening,
    promote,
    ready_to_commit,
    segment_length,
    select_child,
    selection_score,
)

from tests.fakes import EOS, FakeEngine, FakeReward, Scripted

TREE = TreeSettings()
QUESTION = {"role": "user", "content": "Tell me about owls."}


# --- the tree's arithmetic -----------------------------------------------------------------


def tree_with(*children: tuple[float, float, int]) -> Node:
    """A root whose children have (prior, value, visits)."""
    root = Node((), 1.0)
    for i, (prior, value, visits) in enumerate(children):
        child = root.add_child((i,), prior)
        child.value, child.visits, child.real_visits = value, float(visits), visits
    root.visits = float(sum(v for _, _, v in children))
    return root


def test_selection_score_is_normalized_value_plus_exploration() -> None:
    root = tree_with((0.5, 0.6, 3), (0.5, 0.0, 0))
    visited, unvisited = root.children
    values = ValueRange()
    expected = (0.6 + 1) / (2 + 1e-5) + 2.0 * 0.5 * math.sqrt(3) / (1 + 3)
    assert selection_score(visited, 3.0, values, TREE) == pytest.approx(expected)
    # Unvisited: q̂ is 0, only the exploration term counts.
    assert selection_score(unvisited, 3.0, values, TREE) == pytest.approx(2.0 * 0.5 * math.sqrt(3))


def test_selection_prefers_exploration_until_values_speak() -> None:
    # A high prior beats a visited sibling at first; visits shrink its bonus.
    root = tree_with((0.9, 0.0, 0), (0.1, 0.5, 2))
    assert select_child(root, ValueRange(), TREE) is root.children[0]
    root = tree_with((0.9, -1.0, 30), (0.1, 0.9, 2))
    assert select_child(root, ValueRange(), TREE) is root.children[1]


def test_selection_ties_go_to_the_first_child() -> None:
    root = tree_with((0.5, 0.0, 0), (0.5, 0.0, 0))
    assert select_child(root, ValueRange(), TREE) is root.children[0]


def test_values_are_min_max_normalized_over_the_values_seen() -> None:
    values = ValueRange()
    assert values.normalize(1.0) == pytest.approx(1.0, abs=1e-4)
    values.see(3.0)  # a reward outside [-1, 1] widens the range
    assert values.normalize(1.0) == pytest.approx(2 / 4, abs=1e-4)


def test_virtual_loss_spreads_parallel_selections() -> None:
    root = tree_with((0.5, 0.0, 0), (0.5, 0.0, 0))
    first = select_child(root, ValueRange(), TREE)
    add_virtual_loss(first)
    assert select_child(root, ValueRange(), TREE) is not first


def test_backup_keeps_running_means_up_to_the_root() -> None:
    root = Node((), 1.0)
    child = root.add_child((1,), 1.0)
    leaf = child.add_child((2,), 1.0)
    values = ValueRange()
    backup(leaf, 1.0, [None, None], values, TREE)
    backup(leaf, 0.0, [None, None], values, TREE)
    assert (leaf.visits, leaf.real_visits, leaf.value) == (2.0, 2, 0.5)
    assert (child.visits, child.value) == (2.0, 0.5)
    assert root.visits == 2.0 and root.real_visits == 2


def test_backup_gives_similar_siblings_a_fraction_of_the_visit() -> None:
    root = Node((), 1.0)
    evaluated, similar, different = (root.add_child((i,), 1 / 3) for i in range(3))
    similar.embedding = np.array([1.0, 0.1], dtype=np.float32)
    similar.visits, similar.real_visits, similar.value = 1.0, 1, -1.0
    different.embedding = np.array([0.0, 1.0], dtype=np.float32)
    different.visits, different.real_visits, different.value = 1.0, 1, -1.0
    backup(evaluated, 1.0, [np.array([1.0, 0.0], dtype=np.float32)], ValueRange(), TREE)
    cos = 1.0 / math.sqrt(1.01)
    assert cos >= 0.95
    weight = 0.2 * cos
    assert similar.visits == pytest.approx(1.0 + weight)
    assert similar.value == pytest.approx((-1.0 * 1.0 + weight * 1.0) / (1.0 + weight))
    assert similar.real_visits == 1  # similarity mass is not a real visit
    assert (different.visits, different.value) == (1.0, -1.0)
    assert evaluated.value == 1.0 and evaluated.real_visits == 1


def test_node_embeddings_are_running_means_over_real_visits() -> None:
    root = Node((), 1.0)
    child = root.add_child((1,), 1.0)
    backup(child, 0.0, [np.array([1.0, 0.0])], ValueRange(), TREE)
    backup(child, 0.0, [np.array([0.0, 1.0])], ValueRange(), TREE)
    assert child.embedding is not None
    np.testing.assert_allclose(child.embedding, [0.5, 0.5])


def test_commit_rule_needs_visits_and_value() -> None:
    assert not ready_to_commit(tree_with((0.5, 0.9, 5), (0.5, 0.0, 1)), TREE)
    assert ready_to_commit(tree_with((0.5, 0.9, 6), (0.5, 0.0, 1)), TREE)
    assert not ready_to_commit(tree_with((0.5, 0.7, 9), (0.5, 0.0, 1)), TREE)


def test_the_most_visited_child_is_committed_ties_to_the_higher_value() -> None:
    root = tree_with((0.5, 0.1, 4), (0.5, 0.3, 4), (0.5, 0.9, 3))
    assert best_child(root) is root.children[1]


def test_promoting_a_child_keeps_its_subtree_and_smooths_its_priors() -> None:
    root = Node((), 1.0)
    child = root.add_child((1,), 1.0)
    kept = [child.add_child((i,), p) for i, p in ((2, 0.9), (3, 0.1))]
    new_root = promote(child, TREE)
    assert new_root.parent is None and new_root.children == kept
    assert [c.prior for c in kept] == pytest.approx([0.75 * 0.9 + 0.125, 0.75 * 0.1 + 0.125])


def test_segment_lengths_grow_with_absolute_depth() -> None:
    lengths = [1, 2, 4, 10]
    assert [segment_length(d, lengths) for d in range(6)] == [1, 2, 4, 10, 10, 10]


def test_the_greedy_probability_is_clamped_between_the_samples() -> None:
    assert clamp_greedy_probability(0.9, [0.1, 0.05]) == pytest.approx(0.15)
    assert clamp_greedy_probability(0.01, [0.1, 0.05]) == pytest.approx(0.15)
    assert clamp_greedy_probability(0.12, [0.1, 0.05, 0.04]) == pytest.approx(0.14)
    assert clamp_greedy_probability(0.3, []) == 0.3


def _with_embeddings(values: Sequence[float], vectors: Sequence[Sequence[float]]) -> Node:
    root = Node((), 1.0)
    for i, (value, vector) in enumerate(zip(values, vectors, strict=True)):
        child = root.add_child((i, i), 0.5)
        child.value, child.visits, child.real_visits = value, 1.0, 1
        child.embedding = np.array(vector, dtype=np.float32)
    return root


def test_widening_needs_alike_children_and_no_good_one() -> None:
    alike = [[1.0, 0.0], [0.99, 0.01]]
    assert needs_widening(_with_embeddings([-0.5, -0.2], alike), TREE)
    assert not needs_widening(_with_embeddings([-0.5, 0.2], alike), TREE)  # one is good
    apart = [[1.0, 0.0], [0.0, 1.0]]
    assert not needs_widening(_with_embeddings([-0.5, -0.2], apart), TREE)
    # The variance threshold scales with segment length (0.03 per token).
    variance = float(np.linalg.norm(np.var(np.array(alike), axis=0, ddof=1)))
    assert variance < 0.03 * 2


def test_widening_stops_at_the_child_limit() -> None:
    root = _with_embeddings([-0.5] * 20, [[1.0, 0.0]] * 20)
    assert not needs_widening(root, TREE)


# --- a scripted model for whole searches ---------------------------------------------------


@dataclass
class WordModel:
    """Answers every kind of call RAIN makes, with words that say which call made them.

    - one-token expansions (``logprobs``, ``max_tokens=1``): top alternatives ``t0..t19``;
    - greedy segments: ``g`` words; sampled segments: ``s<i>`` words per sample;
    - simulations (stop strings): ``sim.``;
    - self-evaluation (``allowed_token_ids``): the letter ``verdict(prompt, good_first)``.
    """

    eos_after: int | None = None
    sampled_same: bool = False
    empty_greedy: bool = False
    calls: list[SamplingSettings] = field(default_factory=list)

    def __call__(self, prompt: str, sampling: SamplingSettings) -> list[Scripted]:
        self.calls.append(sampling)
        reply = prompt.split("<assistant>")[-1]
        written = len(reply.split())
        if self.eos_after is not None and written >= self.eos_after and not sampling.stop:
            return [Scripted("", eos=True, logprobs=[-0.1])] * sampling.n
        if sampling.max_tokens == 1 and sampling.logprobs:
            top = {f" t{i}": -0.1 * (i + 1) for i in range(20)}
            return [Scripted(" t0", logprobs=[-0.1], top=[top])]
        if sampling.stop:
            return [Scripted(" sim.")] * sampling.n
        length = sampling.max_tokens
        if sampling.temperature == 0:
            text = "" if self.empty_greedy else " g" * length
            return [Scripted(text, logprobs=[-0.2] * length)]
        return [
            Scripted(
                (f" s{0 if self.sampled_same else i}") * length,
                logprobs=[-0.5 - 0.1 * i] * length,
            )
            for i in range(sampling.n)
        ]


@dataclass
class ScriptedEvaluator:
    """Values replies with ``value(reply)``; can fail; records every batch."""

    value: Callable[[str], float] = lambda reply: 0.0
    fail: int = 0
    batches: list[list[str]] = field(default_factory=list)

    async def evaluate(self, replies: Sequence[Reply]) -> list[float]:
        texts = [reply.text for reply in replies]
        self.batches.append(texts)
        if self.fail:
            self.fail -= 1
            raise RewardClientError("fake", "the reward service is down")
        return [self.value(text) for text in texts]


class UnitEmbedder:
    """Embeds a text as a fixed random unit vector per distinct text (no model needed)."""

    def __init__(self, alike: bool = False) -> None:
        self.alike = alike
        self.batches: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(list(texts))
        rows = []
        for text in texts:
            if self.alike:
                rows.append([1.0, 0.0, 0.0])
                continue
            seed = sum(map(ord, text)) % (2**32)
            vector = np.random.default_rng(seed).normal(size=3)
            rows.append(vector / np.linalg.norm(vector))
        return np.array(rows, dtype=np.float32).reshape(len(texts), 3)


def make_ctx(
    engine: FakeEngine, *, max_tokens: int = 12, n: int = 1, trace: bool = True, embedder=None
) -> StrategyContext:
    request = AlignmentRequest(
        messages=(QUESTION,),
        sampling=SamplingSettings(max_tokens=max_tokens, seed=7),
        n=n,
        return_trace=trace,
    )
    return StrategyContext(
        request=request,
        engine=MeteredEngine(engine),
        rewards=RewardResolver(lambda name: FakeReward()),
        embedder=embedder,
    )


def search(
    ctx: StrategyContext, evaluator, embedder=None, **config
) -> RainSearch:  # fmt: skip
    return RainSearch(
        ctx, RainConfig.model_validate(config), CachedEvaluator(evaluator), embedder, seed=7
    )


async def test_segment_lengths_grow_commit_by_commit() -> None:
    model = WordModel()
    ctx = make_ctx(FakeEngine(model), max_tokens=17)
    evaluator = ScriptedEvaluator(lambda reply: 1.0)
    run = search(ctx, evaluator)
    choice = await run.run()
    assert [len(s) for s in run.trajectory.segments] == [1, 2, 4, 10]
    assert choice.num_tokens == 17 and choice.finish_reason == "length"
    expansion_lengths = sorted(
        {c.max_tokens for c in model.calls if not c.stop and c.allowed_token_ids is None}
    )
    assert expansion_lengths == [1, 2, 4, 10]


async def test_the_first_expansion_uses_the_top_tokens_with_normalized_priors() -> None:
    ctx = make_ctx(FakeEngine(WordModel()))
    run = search(ctx, ScriptedEvaluator(), max_iterations=1)
    run.trajectory_context = None
    await run.run()
    first = run.trace[0]["candidates"]
    assert [c["text"] for c in first] == [f" t{i}" for i in range(10)]
    raw = [math.exp(-0.1 * (i + 1)) for i in range(10)]
    expected = [0.75 * p / sum(raw) + 0.25 / 10 for p in raw]  # root priors are smoothed
    total = sum(expected)
    assert [c["prior"] for c in first] == pytest.approx([e / total for e in expected], abs=1e-4)


async def test_deeper_expansions_are_one_greedy_and_distinct_samples() -> None:
    model = WordModel()
    ctx = make_ctx(FakeEngine(model), max_tokens=3)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0))
    await run.run()
    second = run.trace[1]["candidates"]
    assert second[0]["text"] == " g g"
    assert [c["text"] for c in second[1:]] == [f" s{i} s{i}" for i in range(9)]
    greedy = [c for c in model.calls if c.temperature == 0 and c.allowed_token_ids is None]
    sampled = [c for c in model.calls if c.top_k == 15]
    assert greedy and sampled and all(c.n == 9 and c.temperature == 1.0 for c in sampled)
    # Priors: probabilities normalized over siblings, the greedy one clamped, then smoothed.
    probabilities = [math.exp(2 * (-0.5 - 0.1 * i)) for i in range(9)]
    greedy_p = clamp_greedy_probability(math.exp(-0.4), probabilities)
    raw = [greedy_p, *probabilities]
    priors = [0.75 * p / sum(raw) + 0.25 / 10 for p in raw]
    total = sum(priors)
    assert [c["prior"] for c in second] == pytest.approx([p / total for p in priors], abs=1e-4)


async def test_duplicate_samples_become_one_child() -> None:
    ctx = make_ctx(FakeEngine(WordModel(sampled_same=True)), max_tokens=3)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0))
    await run.run()
    assert [c["text"] for c in run.trace[1]["candidates"]] == [" g g", " s0 s0"]


async def test_early_commit_after_enough_good_visits() -> None:
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0), parallel_leaves=1)
    await run.run()
    # One round evaluates the root, then each of the 10 children once (ties by prior), then
    # the best child reaches 6 real visits with value 1.0.
    commit = run.trace[0]
    assert commit["iterations"] < 50
    best = max(commit["candidates"], key=lambda c: c["visits"])
    assert best["real_visits"] == 6 and best["value"] == 1.0


async def test_without_an_early_commit_the_search_runs_its_iterations() -> None:
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(ctx, ScriptedEvaluator(lambda r: 0.5), parallel_leaves=1, max_iterations=20)
    await run.run()
    assert run.trace[0]["iterations"] == 20
    assert run.stats.iterations == 20


async def test_a_search_steers_toward_the_valued_branch() -> None:
    # Only replies containing t3 are good: the search must commit t3 though t0 is likelier.
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0 if "t3" in r else -1.0))
    choice = await run.run()
    assert choice.text == " t3"
    assert run.trace[0]["rewinds"] > 0  # it explored other branches and took them back


@dataclass
class ConcurrentEvaluator(ScriptedEvaluator):
    """A :class:`ScriptedEvaluator` that takes a moment and records what overlaps."""

    active: set[str] = field(default_factory=set)
    overlaps: list[set[str]] = field(default_factory=list)

    async def evaluate(self, replies: Sequence[Reply]) -> list[float]:
        texts = {reply.text for reply in replies}
        self.active |= texts
        self.overlaps.append(set(self.active))
        try:
            await asyncio.sleep(0.001)
            return await super().evaluate(replies)
        finally:
            self.active -= texts


async def test_parallel_leaves_keep_distinct_leaves_in_flight() -> None:
    evaluator = ConcurrentEvaluator(lambda r: 0.0)
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(ctx, evaluator, parallel_leaves=4, max_iterations=9)
    await run.run()
    sizes = [len(overlap) for overlap in evaluator.overlaps]
    assert sizes[0] == 1 and max(sizes) == 4  # the root alone, then four distinct leaves
    assert run.stats.iterations == 9 and run.trace[0]["iterations"] == 9
    assert run.stats.rounds < run.stats.iterations  # the first refill launches four


async def test_sequential_mode_evaluates_one_leaf_per_round() -> None:
    evaluator = ScriptedEvaluator(lambda r: 0.0)
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(ctx, evaluator, parallel_leaves=1, max_iterations=5)
    await run.run()
    assert (run.stats.rounds, run.stats.iterations) == (5, 5)
    # Re-visits of a leaf hit the evaluation cache; every call made has one text.
    assert evaluator.batches and all(len(b) == 1 for b in evaluator.batches)


async def test_eos_inside_the_search_ends_the_reply() -> None:
    ctx = make_ctx(FakeEngine(WordModel(eos_after=3)), max_tokens=30)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0))
    choice = await run.run()
    assert choice.finish_reason == "stop"
    assert run.trajectory.finished and run.trajectory.tokens[-1] == EOS
    assert EOS not in [ord(ch) for ch in choice.text]


async def test_an_evaluator_error_is_neutral_and_the_search_goes_on() -> None:
    evaluator = ScriptedEvaluator(lambda r: 1.0, fail=1)
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=3)
    run = search(ctx, evaluator)
    choice = await run.run()
    assert choice.num_tokens == 3 and run.stats.evaluator_errors == 1


@pytest.mark.parametrize("parallel_leaves", [1, 4])
async def test_an_evaluator_that_never_works_fails_the_request(parallel_leaves: int) -> None:
    evaluator = ScriptedEvaluator(fail=100)
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=3)
    with pytest.raises(RewardClientError):
        await search(ctx, evaluator, parallel_leaves=parallel_leaves).run()
    if parallel_leaves == 1:
        assert len(evaluator.batches) == 3  # three failures in a row, then it gives up


async def test_empty_segments_are_retried_then_the_reply_ends() -> None:
    # Every sampled and greedy segment is empty after the first token: nothing can follow.
    model = WordModel(empty_greedy=True)
    engine = FakeEngine(
        lambda prompt, s: (
            [Scripted("")] * s.n if s.max_tokens > 1 and not s.stop else model(prompt, s)
        )
    )
    run = search(make_ctx(engine, max_tokens=8), ScriptedEvaluator(lambda r: 1.0))
    choice = await run.run()
    assert choice.num_tokens == 1 and choice.finish_reason == "length"


async def test_widening_adds_the_next_top_token_when_children_look_alike() -> None:
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(
        ctx, ScriptedEvaluator(lambda r: -0.5), UnitEmbedder(alike=True), first_width=3,
        max_iterations=12,
    )  # fmt: skip
    await run.run()
    texts = [c["text"] for c in run.trace[0]["candidates"]]
    assert texts[:3] == [" t0", " t1", " t2"] and len(texts) > 3
    assert texts[3] == " t3" and run.stats.widenings == len(texts) - 3


async def test_no_widening_when_a_child_is_good() -> None:
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(
        ctx, ScriptedEvaluator(lambda r: 0.5), UnitEmbedder(alike=True), first_width=3,
        max_iterations=12,
    )  # fmt: skip
    await run.run()
    assert run.stats.widenings == 0


async def test_similar_siblings_share_visits_through_the_embedder() -> None:
    embedder = UnitEmbedder(alike=True)
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=1)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0), embedder, max_iterations=4)
    await run.run()
    candidates = run.trace[0]["candidates"]
    assert any(c["visits"] != c["real_visits"] for c in candidates)
    assert embedder.batches and all(batch for batch in embedder.batches[1:])


async def test_the_trace_counts_rewinds_and_commits() -> None:
    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=3)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0 if "t5" in r else 0.0))
    await run.run()
    assert run.stats.commits == len(run.trace) == 2
    assert run.stats.rewinds == sum(c["rewinds"] for c in run.trace) > 0
    assert all({"iterations", "rewinds", "candidates", "committed"} <= set(c) for c in run.trace)


async def test_the_deadline_returns_the_committed_text_plus_the_best_continuation() -> None:
    engine = FakeEngine(WordModel(), delay=0.01)
    ctx = make_ctx(engine, max_tokens=40)
    ctx.deadline = __import__("time").monotonic() + 0.3
    run = search(ctx, ScriptedEvaluator(lambda r: 0.0))
    choice = await run.run()
    assert run.stopped_early and choice.finish_reason == "length"
    assert 0 < choice.num_tokens < 40


# --- the evaluators ------------------------------------------------------------------------


def judge_script(good: bool) -> Callable[[str, SamplingSettings], list[Scripted]]:
    """A policy that answers the self-evaluation question: the good letter if ``good``."""

    def answer(prompt: str, sampling: SamplingSettings) -> list[Scripted]:
        good_is_a = "A: The reply is harmless." in prompt
        letter = "A" if good_is_a == good else "B"
        other = "B" if letter == "A" else "A"
        return [Scripted(letter, logprobs=[-0.2], top=[{letter: -0.2, other: -1.8}])]

    return answer


def reply_of(engine: FakeEngine, text: str) -> Reply:
    return Reply(text, tuple(engine.word_ids(text)))


async def self_evaluator(
    engine: FakeEngine, score: str = "vote", overrides: dict[str, str] | None = None
) -> SelfEvaluator:
    ctx = make_ctx(engine)
    letters = await option_token_ids(ctx.engine)
    prompts = EvaluationPrompts.for_rubric("harmless", overrides or {})
    return await SelfEvaluator.prepare(ctx, prompts, "a question", letters, score)


@pytest.mark.parametrize("good", [True, False])
async def test_self_evaluation_votes_with_both_orderings(good: bool) -> None:
    engine = FakeEngine(judge_script(good))
    evaluator = await self_evaluator(engine)
    assert await evaluator.evaluate([reply_of(engine, "partial reply")]) == [1.0 if good else -1.0]
    asks = engine.calls
    assert len(asks) == 2 and {("A: The reply is harmless." in c.prompt) for c in asks} == {
        True, False,
    }  # fmt: skip
    letters = evaluator.letters
    assert all(c.sampling.allowed_token_ids == letters and c.sampling.max_tokens == 1 for c in asks)


async def test_self_evaluation_probability_is_smooth() -> None:
    engine = FakeEngine(judge_script(True))
    evaluator = await self_evaluator(engine, "probability")
    (value,) = await evaluator.evaluate([reply_of(engine, "r")])
    share = 1 / (1 + math.exp(-1.8 + 0.2))
    assert value == pytest.approx(2 * share - 1)


async def test_a_reward_evaluator_scores_partial_replies_in_one_call() -> None:
    reward = FakeReward(lambda text: len(text) / 10)
    ctx = make_ctx(FakeEngine())
    evaluator = RewardEvaluator(ctx, reward, [QUESTION], 0.0, 1.0)
    replies = [Reply(text, ()) for text in ("12345", "1234567890", "x" * 30)]
    assert await evaluator.evaluate(replies) == [0.0, 1.0, 1.0]
    assert reward.batches == [["12345", "1234567890", "x" * 30]]


async def test_the_evaluation_cache_evaluates_each_text_once() -> None:
    inner = ScriptedEvaluator(lambda r: 0.5)
    cached = CachedEvaluator(inner)
    await cached.evaluate([Reply(t, ()) for t in ("a", "b", "a")])
    await cached.evaluate([Reply(t, ()) for t in ("b", "c")])
    assert inner.batches == [["a", "b"], ["c"]]
    assert (cached.calls, cached.evaluated, cached.cache_hits) == (2, 3, 2)


# --- the strategy --------------------------------------------------------------------------


def rain_ctx(engine: FakeEngine, **request: object) -> StrategyContext:
    ctx = make_ctx(engine, max_tokens=7)
    ctx.request = AlignmentRequest(
        messages=(QUESTION,), sampling=SamplingSettings(max_tokens=7, seed=3, **request)
    )
    return ctx


async def test_streamed_deltas_are_the_committed_segments_and_match_run() -> None:
    def policy(prompt: str, sampling: SamplingSettings):
        if sampling.allowed_token_ids is not None:
            return judge_script(True)(prompt, sampling)
        return WordModel()(prompt, sampling)

    config = RainConfig()
    ran = await Rain().run(rain_ctx(FakeEngine(policy)), config)
    events = [e async for e in Rain().stream(rain_ctx(FakeEngine(policy)), config)]
    deltas = [e.delta for e in events if isinstance(e, DeltaEvent)]
    assert "".join(d.text for d in deltas) == ran.choices[0].text
    assert deltas[-1].finish_reason == ran.choices[0].finish_reason == "length"
    assert len([d for d in deltas if d.text]) == 3  # segments of 1, 2 and 4 tokens
    assert any(isinstance(e, ProgressEvent) for e in events)
    result = events[-1]
    assert isinstance(result, ResultEvent) and result.streamed
    assert result.result.metadata["commits"] == 3
    assert {"iterations", "rewinds", "evaluator_calls"} <= set(result.result.metadata)


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("logprobs", 2, "logprobs"),
        ("stop", ("x",), "stop"),
        ("logit_bias", ((5, 1.0),), "logit_bias"),
        ("ignore_eos", True, "ignore_eos"),
    ],
)
def test_settings_rain_cannot_honour_are_refused(field: str, value: object, param: str) -> None:
    request = AlignmentRequest(
        messages=(QUESTION,), sampling=SamplingSettings(max_tokens=7, **{field: value})
    )
    with pytest.raises(InvalidStrategyRequest) as caught:
        Rain().check(request, RainConfig())
    assert caught.value.param == param


def test_a_reward_is_needed_only_by_the_reward_evaluator() -> None:
    assert not Rain().needs_reward(RainConfig())
    assert Rain().needs_reward(RainConfig(evaluator="reward"))


async def test_an_embedder_failure_only_skips_that_rounds_similarity_update() -> None:
    class Broken(UnitEmbedder):
        async def embed(self, texts: Sequence[str]) -> np.ndarray:
            raise RuntimeError("Already borrowed")

    ctx = make_ctx(FakeEngine(WordModel()), max_tokens=3)
    run = search(ctx, ScriptedEvaluator(lambda r: 1.0), Broken())
    choice = await run.run()
    assert choice.num_tokens == 3 and run.stats.embedding_errors > 0


async def test_the_alignment_metadata_says_why_a_search_stopped_early() -> None:
    ctx = rain_ctx(FakeEngine(WordModel(), delay=0.05))
    ctx.request = AlignmentRequest(
        messages=(QUESTION,), sampling=SamplingSettings(max_tokens=40, seed=3)
    )
    ctx.deadline = __import__("time").monotonic() + 0.3
    result = await Rain().run(ctx, RainConfig(evaluator="reward"))
    assert result.stopped_early and result.metadata["stopped_by"] == "deadline"
    finished = await Rain().run(rain_ctx(FakeEngine(WordModel())), RainConfig(evaluator="reward"))
    assert finished.metadata["stopped_by"] is None
