"""``rain``: rewindable search over segments of the reply, steered by an evaluator.

RAIN (Li et al., 2023) grows a tree of candidate segments below the committed prefix.
Each inner iteration selects a leaf, expands it, simulates a continuation to the next
clause boundary, evaluates the partial reply and backs the value up to the root; then it
rewinds to the root. When the most visited child is visited and valued enough (or the
iteration limit is reached), that child is committed and its subtree kept. The numbers
and rules follow the reference implementation (SafeAILab/RAIN); ``strategies/rain_tree``
holds them. Beyond the reference:

- the evaluator is the policy's self-evaluation or any configured reward client, scoring
  partial replies (``strategies/rain_evaluation``);
- ``parallel_leaves`` selects several leaves per round with virtual loss, so their
  expansions, simulations and evaluations batch in the engine;
- trajectories are token ids (``strategies/trajectory``): every call on one starts with
  the committed tokens, so the engine's prefix cache holds them;
- committed segments stream as real content deltas while the search goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from ttalign.engine.base import (
    MAX_TOP_LOGPROBS,
    CompletionDelta,
    EngineRequestError,
    Generation,
    SamplingSettings,
)
from ttalign.reward_clients.backend import gather_or_cancel
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.registry import RewardName
from ttalign.strategies.base import (
    AlignmentRequest,
    ChoiceResult,
    DeltaEvent,
    ResultEvent,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
    StreamEvent,
)
from ttalign.strategies.errors import BudgetExhausted, DeadlineReached, InvalidStrategyRequest
from ttalign.strategies.rain_evaluation import (
    CachedEvaluator,
    Evaluator,
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
    best_continuation,
    clamp_greedy_probability,
    needs_widening,
    normalized,
    promote,
    ready_to_commit,
    remove_virtual_loss,
    segment_length,
    select_child,
    smooth_priors,
)
from ttalign.strategies.registry import register_strategy
from ttalign.strategies.sampling import offset_seed
from ttalign.strategies.tpo_prompts import render_query
from ttalign.strategies.trajectory import Trajectory

logger = logging.getLogger(__name__)

#: Rounds in a row whose evaluation failed before the search gives up on its evaluator.
MAX_FAILED_EVALUATIONS = 3
#: Expansions of one node that may come back empty before it counts as a dead end.
MAX_FAILED_EXPANSIONS = 2
#: Seeds of different choices (``n > 1``) lie this far apart.
CHOICE_SEED_STRIDE = 1_000_003


class RainConfig(StrategyConfig):
    """RAIN's settings. Defaults are the reference implementation's numbers."""

    evaluator: Literal["self", "reward"] = Field(
        "self",
        description="'self': the policy judges its partial reply under `rubric` (the paper); "
        "'reward': the configured reward client scores it with partial=True.",
    )
    rubric: Literal["harmless", "helpful", "honest"] = Field(
        "harmless", description="The self-evaluation criterion."
    )
    self_score: Literal["vote", "probability"] = Field(
        "vote",
        description="'vote': the reference's value in {-1, 0, 1} from the two orderings' "
        "answers; 'probability': the mean probability of the good option, mapped to [-1, 1].",
    )
    reward: RewardName = Field(
        None, description="Reward client for evaluator 'reward' (default: the request's)."
    )
    reward_range: tuple[float, float] = Field(
        (0.0, 1.0), description="The reward's [low, high], mapped linearly onto [-1, 1]."
    )
    exploration: float = Field(2.0, gt=0, description="c in q̂ + c·p·√N/(1+n).")
    first_width: int = Field(
        10, ge=1, le=MAX_TOP_LOGPROBS, description="Children from the top next tokens (1-token)."
    )
    width: int = Field(
        10, ge=1, le=64, description="Children of longer segments: 1 greedy + width-1 sampled."
    )
    sample_top_k: int = Field(15, ge=1, description="top-k of the sampled segments.")
    sample_temperature: float = Field(1.0, gt=0, le=2.0)
    segment_lengths: list[int] = Field(
        [1, 2, 4, 10],
        min_length=1,
        max_length=16,
        description="Segment length by absolute depth; the last repeats.",
    )
    simulation_stops: list[str] = Field(
        [",", ".", "?", ":", ";", "\n"],
        max_length=16,
        description="A simulation stops after any of these (a clause boundary).",
    )
    simulation_max_tokens: int = Field(32, ge=1, description="Longest simulation.")
    similarity_threshold: float = Field(0.95, ge=-1, le=1)
    similarity_weight: float = Field(0.2, ge=0, le=1)
    widen_variance_per_token: float = Field(0.03, ge=0)
    widen_value: float = Field(0.0, ge=-1, le=1)
    max_children: int = Field(20, ge=1, le=64)
    commit_visits: int = Field(6, ge=1, description="Real visits for an early commit...")
    commit_value: float = Field(0.8, ge=-1, le=1, description="... and the value it needs.")
    max_iterations: int = Field(50, ge=1, le=10_000, description="Iterations per commit.")
    prior_smoothing: float = Field(0.25, ge=0, le=1)
    parallel_leaves: int = Field(
        4, ge=1, le=64, description="Leaves per round (virtual loss); 1 is the reference."
    )

    @field_validator("segment_lengths")
    @classmethod
    def _positive_lengths(cls, lengths: list[int]) -> list[int]:
        if any(length < 1 or length > 256 for length in lengths):
            raise ValueError("segment lengths must be between 1 and 256 tokens")
        return lengths

    @field_validator("reward_range")
    @classmethod
    def _ordered_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] < bounds[1]:
            raise ValueError("reward_range must be [low, high] with low < high")
        return bounds

    def tree(self) -> TreeSettings:
        return TreeSettings(
            exploration=self.exploration,
            similarity_threshold=self.similarity_threshold,
            similarity_weight=self.similarity_weight,
            widen_variance_per_token=self.widen_variance_per_token,
            widen_value=self.widen_value,
            max_children=self.max_children,
            commit_visits=self.commit_visits,
            commit_value=self.commit_value,
            prior_smoothing=self.prior_smoothing,
        )


@dataclass
class SearchStats:
    """What one search did, for ``alignment`` and metrics."""

    iterations: int = 0
    rounds: int = 0
    rewinds: int = 0
    commits: int = 0
    expansions: int = 0
    simulations: int = 0
    widenings: int = 0
    evaluator_errors: int = 0
    embedding_errors: int = 0


@dataclass
class Rollout:
    """One evaluated leaf: the partial reply, and the texts to embed along its path."""

    leaf: Node
    reply: str
    suffixes: list[str]
    value: float = 0.0


@dataclass
class RainSearch:
    """The search for one choice. :meth:`run` returns it; deltas go to ``emit``."""

    ctx: StrategyContext
    config: RainConfig
    evaluator: Evaluator
    embedder: Any
    seed: int | None
    index: int = 0
    emit: Any = None
    stats: SearchStats = field(default_factory=SearchStats)
    trace: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tree = self.config.tree()
        self.values = ValueRange()
        self.limit = self.ctx.request.sampling.max_tokens
        self._calls = 0
        self._emitted = ""
        self._failed_rounds = 0
        self._evaluated_once = False
        self.stopped_early = False
        self.stop_cause: str | None = None

    # --- the outer loop -----------------------------------------------------------------

    async def run(self) -> ChoiceResult:
        context = await self.ctx.chat_prompt(self.ctx.request.messages)
        self.trajectory = Trajectory.start(list(context))
        self.root = Node((), 1.0, depth=0)
        try:
            while not self.trajectory.finished and self.trajectory.num_tokens < self.limit:
                if not await self._step():
                    break
        except (DeadlineReached, BudgetExhausted) as exc:
            self._stop_early("deadline" if isinstance(exc, DeadlineReached) else "budget")
        text = await self._flush()
        if self.stopped_early or self.ctx.deadline_reached:
            finish = "length"
        else:
            finish = "stop" if self.trajectory.finished else "length"
        reward = await self._final_value(text)
        await self._publish(CompletionDelta(self.index, "", 0, finish_reason=finish))
        return ChoiceResult(text, finish, self.trajectory.num_tokens, reward=reward)

    async def _step(self) -> bool:
        """Search below the root, then commit one child; False when nothing can follow."""
        explored: list[Node] = []
        iterations = 0
        while iterations < self.config.max_iterations and not ready_to_commit(self.root, self.tree):
            if self._out_of_time():
                self._stop_early("deadline")
                return False
            leaves = await self._select_leaves()
            await self._visit(leaves)
            explored += leaves
            iterations += len(leaves)
            self.stats.iterations += len(leaves)
            self.stats.rounds += 1
            self._report()
            if self._out_of_time():
                self._stop_early("deadline")
                return False
            if not self.root.children and self.root.expanded:
                break  # nothing can follow the committed prefix
        if not self.root.children:
            return False
        await self._commit(best_child(self.root), explored, iterations)
        return True

    async def _commit(self, child: Node, explored: list[Node], iterations: int) -> None:
        rewinds = sum(1 for leaf in explored if child not in (leaf, *_ancestors(leaf)))
        self.stats.rewinds += rewinds
        self.stats.commits += 1
        if self.ctx.request.return_trace:
            self.trace.append(
                {
                    "committed": child.text,
                    "committed_tokens": len(child.segment),
                    "iterations": iterations,
                    "rewinds": rewinds,
                    "candidates": [_candidate(c) for c in self.root.children],
                }
            )
        await self._extend(child)
        self.root = promote(child, self.tree)

    async def _extend(self, node: Node) -> None:
        room = self.limit - self.trajectory.num_tokens
        segment = node.segment[:room]
        whole = len(segment) == len(node.segment)
        self.trajectory.extend(segment, finished=node.terminal and whole)
        await self._emit_text()

    def _stop_early(self, cause: str) -> None:
        """At the deadline or budget: keep the committed text plus the best known continuation."""
        if self.stopped_early:
            return
        self.stopped_early = True
        self.stop_cause = cause
        for node in best_continuation(self.root):
            if self.trajectory.finished or self.trajectory.num_tokens >= self.limit:
                break
            room = self.limit - self.trajectory.num_tokens
            self.trajectory.extend(
                node.segment[:room], finished=node.terminal and room >= len(node.segment)
            )

    def _out_of_time(self) -> bool:
        return self.ctx.deadline_reached or self.ctx.past_deadline()

    # --- one round ----------------------------------------------------------------------

    async def _select_leaves(self) -> list[Node]:
        """Up to ``parallel_leaves`` distinct leaves, spread apart by virtual loss."""
        leaves: list[Node] = []
        selected: list[Node] = []
        try:
            for _ in range(2 * self.config.parallel_leaves):
                if len(leaves) == self.config.parallel_leaves:
                    break
                leaf = await self._descend()
                selected.append(leaf)
                add_virtual_loss(leaf)
                if all(leaf is not other for other in leaves):
                    leaves.append(leaf)
        finally:
            for leaf in selected:
                remove_virtual_loss(leaf)
        return leaves

    async def _descend(self) -> Node:
        node = self.root
        while node.children:
            if self.embedder is not None and needs_widening(node, self.tree):
                await self._widen(node)
            node = select_child(node, self.values, self.tree)
        return node

    async def _visit(self, leaves: list[Node]) -> None:
        expansions = [self._expand(leaf) for leaf in leaves if self._expandable(leaf)]
        for leaf in leaves:
            leaf.expanded = True
        rollouts, _ = await gather_or_cancel(self._evaluate(leaves), gather_or_cancel(*expansions))
        embeddings = await self._embed(rollouts)
        for rollout, vectors in zip(rollouts, embeddings, strict=True):
            backup(rollout.leaf, rollout.value, vectors, self.values, self.tree)

    def _expandable(self, leaf: Node) -> bool:
        return not leaf.expanded and not leaf.terminal and self._room_after(leaf) > 0

    def _room_after(self, node: Node) -> int:
        return self.limit - self.trajectory.num_tokens - len(node.tokens())

    # --- simulate and evaluate ----------------------------------------------------------

    async def _evaluate(self, leaves: list[Node]) -> list[Rollout]:
        rollouts = list(await gather_or_cancel(*(self._rollout(leaf) for leaf in leaves)))
        try:
            values = await self.evaluator.evaluate([r.reply for r in rollouts])
        except (RewardClientError, EngineRequestError):
            self.stats.evaluator_errors += 1
            self._failed_rounds += 1
            if self._failed_rounds >= MAX_FAILED_EVALUATIONS and not self._evaluated_once:
                raise
            values = [0.0] * len(rollouts)  # neutral: the priors steer this round
        else:
            self._failed_rounds = 0
            self._evaluated_once = True
        for rollout, value in zip(rollouts, values, strict=True):
            rollout.value = value
        return rollouts

    async def _rollout(self, leaf: Node) -> Rollout:
        """Continue ``leaf`` to the next clause boundary; the reply text to evaluate."""
        path = leaf.path()
        reached = await self.ctx.engine.decode([*self.trajectory.tokens, *leaf.tokens()])
        simulated = ""
        room = self._room_after(leaf)
        boundary = reached.endswith(tuple(self.config.simulation_stops))
        if not leaf.terminal and room > 0 and not (boundary and path):
            generation = await self.ctx.generate(
                self.trajectory.prompt(leaf.tokens()),
                SamplingSettings(
                    n=1,
                    temperature=1.0,
                    max_tokens=min(self.config.simulation_max_tokens, room),
                    stop=tuple(self.config.simulation_stops),
                    include_stop_str_in_output=True,
                    seed=self._next_seed(),
                ),
            )
            simulated = generation.completions[0].text
            self.stats.simulations += 1
        suffixes = []
        if self.embedder is not None:
            for position in range(len(path)):
                below = [token for node in path[position:] for token in node.segment]
                suffixes.append(await self.ctx.engine.decode(below) + simulated)
        return Rollout(leaf, reached + simulated, suffixes)

    async def _embed(self, rollouts: list[Rollout]) -> list[list[np.ndarray | None]]:
        if self.embedder is None:
            return [[None] * len(r.leaf.path()) for r in rollouts]
        texts = [text for r in rollouts for text in r.suffixes]
        try:
            vectors = await self.embedder.embed(texts) if texts else np.zeros((0, 1))
        except Exception as exc:  # the search goes on without this round's similarity update
            logger.warning("RAIN: embedding failed, round backed up without it: %r", exc)
            self.stats.embedding_errors += 1
            return [[None] * len(r.leaf.path()) for r in rollouts]
        result, start = [], 0
        for r in rollouts:
            result.append(list(vectors[start : start + len(r.suffixes)]))
            start += len(r.suffixes)
        return result

    async def _final_value(self, text: str) -> float | None:
        try:
            (value,) = await self.evaluator.evaluate([text])
        except (RewardClientError, EngineRequestError, DeadlineReached, BudgetExhausted):
            return None
        return value

    # --- expand and widen ---------------------------------------------------------------

    async def _expand(self, leaf: Node) -> None:
        planned = segment_length(leaf.depth, self.config.segment_lengths)
        length = min(planned, self._room_after(leaf))
        self.stats.expansions += 1
        if length == 1:
            await self._expand_by_top_tokens(leaf, self.config.first_width)
        else:
            await self._expand_by_sampling(leaf, length)
        if not leaf.children:
            # Every segment came back empty: let a later round try again, a few times.
            leaf.failed_expansions += 1
            leaf.expanded = leaf.failed_expansions >= MAX_FAILED_EXPANSIONS
        elif leaf is self.root:
            smooth_priors(leaf, self.tree)

    async def _expand_by_top_tokens(self, leaf: Node, width: int) -> None:
        generation = await self.ctx.generate(
            self.trajectory.prompt(leaf.tokens()),
            SamplingSettings(
                n=1,
                temperature=1.0,
                max_tokens=1,
                logprobs=min(self.config.max_children, MAX_TOP_LOGPROBS),
                seed=self._next_seed(),
            ),
        )
        (completion,) = generation.completions
        if not completion.logprobs:
            return
        position = completion.logprobs[0]
        alternatives = [
            ((token,), math.exp(logprob), text)
            for token, (text, logprob) in zip(position.top_ids, position.top, strict=True)
        ]
        chosen, leaf.reserve = alternatives[:width], alternatives[width:]
        priors = normalized([probability for _, probability, _ in chosen])
        eos = self.ctx.engine.eos_token_ids
        for (segment, probability, text), prior in zip(chosen, priors, strict=True):
            leaf.add_child(
                segment, prior, text=text, terminal=segment[0] in eos, probability=probability
            )

    async def _expand_by_sampling(self, leaf: Node, length: int) -> None:
        prompt = self.trajectory.prompt(leaf.tokens())
        calls = [self.ctx.generate(prompt, self._greedy(length))]
        if self.config.width > 1:
            calls.append(self.ctx.generate(prompt, self._sampled(self.config.width - 1, length)))
        generations = await gather_or_cancel(*calls)
        candidates = _distinct_segments(generations, self.ctx.engine.eos_token_ids)
        if not candidates:
            return
        probabilities = [c.probability for c in candidates]
        if generations[0].completions and generations[0].completions[0].token_ids:
            probabilities[0] = clamp_greedy_probability(probabilities[0], probabilities[1:])
        for candidate, prior in zip(candidates, normalized(probabilities), strict=True):
            leaf.add_child(
                candidate.segment,
                prior,
                text=candidate.text,
                terminal=candidate.terminal,
                probability=candidate.probability,
            )

    async def _widen(self, node: Node) -> None:
        """Give ``node`` one more child: the next top token, or a new sampled segment."""
        if node.widened_at == node.real_visits:
            return  # one attempt per visit: a failed attempt is not retried at once
        node.widened_at = node.real_visits
        if node.reserve:
            segment, probability, text = node.reserve.pop(0)
            eos = self.ctx.engine.eos_token_ids
            self._add_widened(node, segment, probability, text, segment[0] in eos)
            return
        length = len(node.children[0].segment)
        generation = await self.ctx.generate(
            self.trajectory.prompt(node.tokens()), self._sampled(2, length)
        )
        known = {child.segment for child in node.children}
        for candidate in _distinct_segments([generation], self.ctx.engine.eos_token_ids):
            if candidate.segment not in known:
                self._add_widened(
                    node, candidate.segment, candidate.probability, candidate.text,
                    candidate.terminal,
                )  # fmt: skip
                return

    def _add_widened(
        self, node: Node, segment: tuple[int, ...], probability: float, text: str, terminal: bool
    ) -> None:
        total = math.fsum(child.probability for child in node.children) + probability
        prior = probability / total if total > 0 else 1.0 / (len(node.children) + 1)
        if node is self.root:
            k = len(node.children) + 1
            prior = (1 - self.tree.prior_smoothing) * prior + self.tree.prior_smoothing / k
        node.add_child(segment, prior, text=text, terminal=terminal, probability=probability)
        self.stats.widenings += 1

    def _greedy(self, length: int) -> SamplingSettings:
        return SamplingSettings(n=1, temperature=0.0, max_tokens=length, logprobs=0)

    def _sampled(self, n: int, length: int) -> SamplingSettings:
        return SamplingSettings(
            n=n,
            temperature=self.config.sample_temperature,
            top_k=self.config.sample_top_k,
            max_tokens=length,
            logprobs=0,
            seed=self._next_seed(),
        )

    def _next_seed(self) -> int | None:
        self._calls += 1
        return offset_seed(self.seed, self._calls)

    # --- streaming ----------------------------------------------------------------------

    async def _emit_text(self) -> None:
        text = await self.ctx.engine.decode(self.trajectory.tokens)
        if text.endswith("\ufffd"):
            return  # a character split across segments: wait for its other bytes
        await self._send(text)

    async def _flush(self) -> str:
        text = await self.ctx.engine.decode(self.trajectory.tokens)
        await self._send(text)
        return text

    async def _send(self, text: str) -> None:
        if not text.startswith(self._emitted) or text == self._emitted:
            return
        delta, self._emitted = text[len(self._emitted) :], text
        tokens = self.trajectory.segments[-1] if self.trajectory.segments else ()
        await self._publish(CompletionDelta(self.index, delta, len(tokens), token_ids=tokens))

    async def _publish(self, delta: CompletionDelta) -> None:
        if self.emit is not None:
            await self.emit(delta)

    def _report(self) -> None:
        child = best_child(self.root) if self.root.children else None
        self.ctx.report(
            choice=self.index,
            committed_tokens=self.trajectory.num_tokens,
            iterations=self.stats.iterations,
            root_visits=round(self.root.visits, 3),
            best_visits=round(child.visits, 3) if child else 0,
            best_value=round(child.value, 4) if child else None,
        )

    def summary(self) -> dict[str, Any]:
        stats = vars(self.stats).copy()
        if self.stop_cause:
            stats["stopped_by"] = self.stop_cause
        return stats


@dataclass(frozen=True)
class _Candidate:
    segment: tuple[int, ...]
    probability: float
    text: str
    terminal: bool


def _distinct_segments(generations: Sequence[Generation], eos: frozenset[int]) -> list[_Candidate]:
    """Non-empty segments in order (greedy first), each once."""
    seen: set[tuple[int, ...]] = set()
    candidates = []
    for generation in generations:
        for completion in generation.completions:
            segment = tuple(completion.token_ids)
            if not segment or segment in seen:
                continue
            seen.add(segment)
            logprob = completion.cumulative_logprob
            if logprob is None and completion.logprobs:
                logprob = math.fsum(lp.logprob for lp in completion.logprobs)
            candidates.append(
                _Candidate(
                    segment,
                    math.exp(logprob) if logprob is not None else 1.0,
                    completion.text,
                    terminal=segment[-1] in eos
                    or (completion.finish_reason == "stop" and completion.stop_reason is None),
                )
            )
    return candidates


def _ancestors(node: Node) -> list[Node]:
    found = []
    while node.parent is not None:
        node = node.parent
        found.append(node)
    return found


def _candidate(node: Node) -> dict[str, Any]:
    return {
        "text": node.text,
        "tokens": len(node.segment),
        "prior": round(node.prior, 4),
        "visits": round(node.visits, 3),
        "real_visits": node.real_visits,
        "value": round(node.value, 4),
    }


@register_strategy
class Rain(Strategy[RainConfig]):
    name = "rain"
    description = (
        "RAIN: tree search over reply segments with self-evaluation or a reward client, "
        "rewinding before it commits; committed segments stream as they are decided."
    )
    config_model = RainConfig
    uses_reward = True

    def needs_reward(self, config: RainConfig) -> bool:
        return config.evaluator == "reward"

    def check(self, request: AlignmentRequest, config: RainConfig) -> None:
        sampling = request.sampling
        if sampling.logprobs is not None:
            raise InvalidStrategyRequest(
                "rain commits segments chosen by search and returns no log-probabilities.",
                param="logprobs",
            )
        if sampling.structured is not None:
            raise InvalidStrategyRequest(
                "rain cannot enforce a response format while it searches.",
                param="response_format",
            )
        if sampling.logit_bias:
            raise InvalidStrategyRequest(
                "rain samples its segments as strategy_config says; logit_bias is not applied.",
                param="logit_bias",
            )
        if sampling.ignore_eos:
            raise InvalidStrategyRequest(
                "rain ends a reply at end-of-sequence; ignore_eos is not supported.",
                param="ignore_eos",
            )
        for name in (
            "min_tokens",
            "stop_token_ids",
            "allowed_token_ids",
            "include_stop_str_in_output",
        ):
            if getattr(sampling, name):
                raise InvalidStrategyRequest(
                    f"rain chooses every segment by search; {name} is not supported.",
                    param=name,
                )
        if sampling.stop:
            raise InvalidStrategyRequest(
                "rain does not support stop strings; limit the reply with max_tokens.",
                param="stop",
            )
        longest = max(max(config.segment_lengths), config.simulation_max_tokens)
        request.check_step_tokens(longest, "strategy_config.segment_lengths")
        width = max(config.width, config.first_width) * request.n
        request.budget.check(width, width * max(config.segment_lengths), param="strategy_config")

    async def run(self, ctx: StrategyContext, config: RainConfig) -> StrategyResult:
        return await self._search(ctx, config, emit=None)

    async def stream(self, ctx: StrategyContext, config: RainConfig) -> AsyncIterator[StreamEvent]:
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        async def emit(delta: CompletionDelta) -> None:
            events.put_nowait(DeltaEvent(delta))

        task = asyncio.ensure_future(self._search(ctx, config, emit=emit))
        waiters: set[asyncio.Future[Any]] = set()
        try:
            while True:
                progress = asyncio.ensure_future(ctx.progress.get())
                delta = asyncio.ensure_future(events.get())
                waiters = {progress, delta}
                await asyncio.wait({task, progress, delta}, return_when=asyncio.FIRST_COMPLETED)
                for waiter in (progress, delta):
                    if waiter.done():
                        yield waiter.result()
                    else:
                        waiter.cancel()
                waiters = set()
                if task.done():
                    break
            while not ctx.progress.empty():
                yield ctx.progress.get_nowait()
            while not events.empty():
                yield events.get_nowait()
            yield ResultEvent(task.result(), streamed=True)
        finally:
            pending = [f for f in (task, *waiters) if not f.done()]
            for future in pending:
                future.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _search(self, ctx: StrategyContext, config: RainConfig, emit: Any) -> StrategyResult:
        started = time.monotonic()
        evaluator = CachedEvaluator(await self._evaluator(ctx, config))
        embedder = ctx.embedder
        searches = [
            RainSearch(
                ctx,
                config,
                evaluator,
                embedder,
                offset_seed(ctx.request.sampling.seed, i * CHOICE_SEED_STRIDE),
                index=i,
                emit=emit,
            )
            for i in range(ctx.request.n)
        ]
        choices = await gather_or_cancel(*(search.run() for search in searches))
        stats = [search.summary() for search in searches]
        totals = {key: sum(s[key] for s in stats) for key in vars(SearchStats()) if key != "rounds"}
        metadata = {
            **totals,
            "evaluator": config.evaluator,
            "evaluator_calls": evaluator.calls,
            "evaluated_texts": evaluator.evaluated,
            "evaluator_cache_hits": evaluator.cache_hits,
            "similarity": embedder is not None,
            "stopped_by": next((s.stop_cause for s in searches if s.stop_cause), None),
            "search_seconds": round(time.monotonic() - started, 4),
        }
        trace = None
        if ctx.request.return_trace:
            trace = {"searches": [{**s.summary(), "commits": s.trace} for s in searches]}
        return StrategyResult(
            choices=list(choices),
            rounds=max(s.stats.rounds for s in searches),
            candidates_scored=evaluator.evaluated,
            stopped_early=any(s.stopped_early for s in searches),
            trace=trace,
            metadata=metadata,
        )

    async def _evaluator(self, ctx: StrategyContext, config: RainConfig) -> Evaluator:
        if config.evaluator == "reward":
            low, high = config.reward_range
            reward = ctx.rewards.get(config.reward or ctx.request.reward)
            return RewardEvaluator(ctx, reward, ctx.request.messages, low, high)
        prompts = EvaluationPrompts.for_rubric(config.rubric, ctx.prompt_overrides)
        letters = await option_token_ids(ctx.engine)
        return SelfEvaluator(
            ctx, prompts, render_query(ctx.request.messages), letters, config.self_score
        )
