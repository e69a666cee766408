"""One choice's RAIN search: the inner loop over a pool of leaves, and the commits.

:class:`RainSearch` keeps up to ``parallel_leaves`` leaves in flight
(:class:`~strategies.rain_pool.TaskPool`), spread apart by virtual loss. Each leaf's task
expands the leaf (if it can be), simulates to the next clause boundary, then evaluates the
reply and embeds its path's texts concurrently. A finished task is backed up at once
(its virtual loss removed), the commit test runs, and a new leaf is selected; descents
never wait for the engine: a widening that needs an engine call runs as a task of its own
(with ``parallel_leaves=1`` the descent waits for it, as in the reference's loop). At a
commit, tasks below the committed child go on into the kept subtree and the others are
cancelled; the kept root's visits count toward the next commit's iteration limit.

Reply texts are concatenations of texts the search holds (the committed text, decoded
once per commit, the nodes' texts and the simulation's), and reply token ids are the
committed tokens, the path's segments and the simulation's tokens: nothing is decoded or
tokenized along the way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from ttalign.engine.base import (
    MAX_TOP_LOGPROBS,
    CompletionDelta,
    EngineRequestError,
    Generation,
    SamplingSettings,
)
from ttalign.reward_clients.backend import gather_or_cancel
from ttalign.reward_clients.base import RewardClientError
from ttalign.strategies.base import ChoiceResult, StrategyContext
from ttalign.strategies.errors import BudgetExhausted, DeadlineReached
from ttalign.strategies.rain_config import RainConfig
from ttalign.strategies.rain_evaluation import Evaluator, Reply
from ttalign.strategies.rain_memo import BatchMemo
from ttalign.strategies.rain_pool import TaskPool
from ttalign.strategies.rain_tree import (
    Node,
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
from ttalign.strategies.sampling import offset_seed
from ttalign.strategies.trajectory import Trajectory

logger = logging.getLogger(__name__)

#: Evaluations in a row that failed before the search gives up on its evaluator.
MAX_FAILED_EVALUATIONS = 3
#: Expansions of one node that may come back empty before it counts as a dead end.
MAX_FAILED_EXPANSIONS = 2


@dataclass
class SearchStats:
    """What one search did, for ``alignment`` and metrics."""

    #: Evaluations backed up (new iterations), and visits the committed roots brought along.
    iterations: int = 0
    inherited_iterations: int = 0
    #: Times the pool launched new leaves (with ``parallel_leaves=1``: the iterations).
    rounds: int = 0
    rewinds: int = 0
    commits: int = 0
    expansions: int = 0
    simulations: int = 0
    widenings: int = 0
    #: Leaves in flight at a commit that lay outside the kept subtree.
    cancelled_leaves: int = 0
    evaluator_errors: int = 0
    embedding_errors: int = 0


@dataclass
class Rollout:
    """One visited leaf: the reply evaluated, its value, and its path's embeddings.

    ``embeddings[i]`` embeds the text from the ``i``-th node of the leaf's path (as it was
    at launch) to the end of the reply. ``error`` is set, and ``value`` is ``None``, when
    the evaluator failed.
    """

    leaf: Node
    reply: Reply
    value: float | None
    embeddings: list[np.ndarray | None]
    error: Exception | None = None


@dataclass(frozen=True)
class Visit:
    """What a leaf's task needs, read from the search when the leaf is launched."""

    prompt: list[int]
    #: The reply up to the end of the leaf: committed text and tokens plus the path's.
    reached: Reply
    #: The text of each node on the leaf's path.
    texts: list[str]
    room: int
    simulate: bool
    simulation_seed: int | None
    expand: bool
    expansion_seed: int | None


@dataclass(frozen=True)
class InFlight:
    """What a task of the pool works on: a leaf's visit, or the widening of a node."""

    kind: Literal["leaf", "widen"]
    node: Node


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
    #: Embeddings by text, shared by the request's searches.
    embeddings: BatchMemo[str, np.ndarray] = field(default_factory=BatchMemo)

    def __post_init__(self) -> None:
        self.tree = self.config.tree()
        self.values = ValueRange()
        self.limit = self.ctx.request.sampling.max_tokens
        self.pool: TaskPool[InFlight] = TaskPool()
        self._calls = 0
        self._emitted = ""
        #: The committed tokens' text, decoded once per commit (replies are built on it).
        self._committed_text = ""
        self._failed_evaluations = 0
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
        finally:
            await self.pool.aclose()
        text = await self._flush()
        if self.stopped_early or self.ctx.deadline_reached:
            finish = "length"
        else:
            finish = "stop" if self.trajectory.finished else "length"
        reward = await self._final_value(text)
        await self._publish(CompletionDelta(self.index, "", 0, finish_reason=finish))
        return ChoiceResult(text, finish, self.trajectory.num_tokens, reward=reward)

    async def _step(self) -> bool:
        """Search below the root, then commit one child; False when nothing can follow.

        Leaves are visited by the pool's tasks; each one that finishes is backed up at
        once, and the commit test runs after every backup, as the reference runs it after
        every iteration. The root's visits from before the commit count toward
        ``max_iterations`` (the reference's ``initi = root.fn``).
        """
        inherited = self.root.real_visits
        limit = self.config.new_iterations(inherited)
        self.stats.inherited_iterations += inherited
        explored: list[Node] = []
        while True:
            if self._out_of_time():
                self._stop_early("deadline")
                return False
            self._fill(limit - len(explored))
            if not self.pool:
                break
            label, rollout = await self.pool.next()
            if label.kind == "widen":
                continue
            self._back_up(rollout)
            explored.append(rollout.leaf)
            self.stats.iterations += 1
            self._report()
            if self._out_of_time():
                self._stop_early("deadline")
                return False
            if not self.root.children and self.root.expanded:
                break  # nothing can follow the committed prefix
            if len(explored) >= limit or ready_to_commit(self.root, self.tree):
                break
        if not self.root.children:
            return False
        await self._commit(best_child(self.root), explored, inherited)
        return True

    async def _commit(self, child: Node, explored: list[Node], inherited: int) -> None:
        # Work below the committed child goes on into the kept subtree; the rest stops.
        dropped = await self.pool.cancel_where(lambda task: not _within(task.node, child))
        cancelled = sum(1 for task in dropped if task.kind == "leaf")
        self.stats.cancelled_leaves += cancelled
        rewinds = sum(1 for leaf in explored if not _within(leaf, child))
        self.stats.rewinds += rewinds
        self.stats.commits += 1
        if self.ctx.request.return_trace:
            self.trace.append(
                {
                    "committed": child.text,
                    "committed_tokens": len(child.segment),
                    "inherited_iterations": inherited,
                    "iterations": len(explored),
                    "rewinds": rewinds,
                    "cancelled_leaves": cancelled,
                    "kept_in_flight": sum(1 for t in self.pool.labels() if t.kind == "leaf"),
                    "candidates": [_candidate(c) for c in self.root.children],
                }
            )
        self.root = promote(child, self.tree)
        await self._extend(child)

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

    # --- selection: the pool's leaves ---------------------------------------------------

    def _fill(self, remaining: int) -> None:
        """Launch leaves until ``parallel_leaves`` are in flight or ``remaining`` are."""
        launched = False
        while True:
            in_flight = sum(1 for task in self.pool.labels() if task.kind == "leaf")
            if in_flight >= min(self.config.parallel_leaves, remaining):
                break
            leaf = self._select_leaf()
            if leaf is None:
                break
            self._launch(leaf)
            launched = True
        if launched:
            self.stats.rounds += 1

    def _select_leaf(self) -> Node | None:
        """A leaf no task is visiting, spread from those by their virtual loss; or None."""
        busy = {task.node for task in self.pool.labels() if task.kind == "leaf"}
        tried: list[Node] = []
        try:
            for _ in range(self.config.parallel_leaves):
                leaf = self._descend()
                if leaf is None or leaf not in busy:
                    return leaf
                add_virtual_loss(leaf)
                tried.append(leaf)
            return None
        finally:
            for leaf in tried:
                remove_virtual_loss(leaf)

    def _descend(self) -> Node | None:
        """Walk down to a leaf, widening on the way; None: wait for a widening first."""
        node = self.root
        while node.children:
            alike = self.embedder is not None and needs_widening(node, self.tree)
            if alike and self._widen(node) and self.config.parallel_leaves == 1:
                return None  # the reference's sequential loop widens before it selects
            node = select_child(node, self.values, self.tree)
        return node

    def _launch(self, leaf: Node) -> None:
        """Start the task that visits ``leaf``, from the state of the search now.

        Its seeds are drawn here too, in selection order, so a run does not depend on
        the order in which tasks happen to reach the engine.
        """
        expand = self._expandable(leaf)
        leaf.expanded = True
        add_virtual_loss(leaf)
        path = leaf.path()
        texts = [node.text for node in path]
        below = leaf.tokens()
        reached = Reply(self._committed_text + "".join(texts), (*self.trajectory.tokens, *below))
        room = self._room_after(leaf)
        boundary = reached.text.endswith(tuple(self.config.simulation_stops))
        simulate = not leaf.terminal and room > 0 and not (boundary and path)
        visit = self._visit(
            leaf,
            Visit(
                prompt=self.trajectory.prompt(below),
                reached=reached,
                texts=texts,
                room=room,
                simulation_seed=self._next_seed() if simulate else None,
                simulate=simulate,
                expansion_seed=self._next_seed() if expand else None,
                expand=expand,
            ),
        )
        self.pool.start(visit, InFlight("leaf", leaf))

    def _back_up(self, rollout: Rollout) -> None:
        leaf = rollout.leaf
        remove_virtual_loss(leaf)
        value = rollout.value
        if rollout.error is not None:
            self.stats.evaluator_errors += 1
            self._failed_evaluations += 1
            if self._failed_evaluations >= MAX_FAILED_EVALUATIONS and not self._evaluated_once:
                raise rollout.error
            value = 0.0  # neutral: the priors steer this visit
        else:
            self._failed_evaluations = 0
            self._evaluated_once = True
        assert value is not None
        # A leaf launched before a commit has one node fewer on its path now.
        depth = len(leaf.path())
        embeddings = rollout.embeddings[len(rollout.embeddings) - depth :]
        backup(leaf, value, embeddings, self.values, self.tree)

    def _expandable(self, leaf: Node) -> bool:
        return not leaf.expanded and not leaf.terminal and self._room_after(leaf) > 0

    def _room_after(self, node: Node) -> int:
        return self.limit - self.trajectory.num_tokens - len(node.tokens())

    # --- one leaf: expand, simulate, evaluate, embed ------------------------------------

    async def _visit(self, leaf: Node, visit: Visit) -> Rollout:
        if not visit.expand:
            return await self._rollout(leaf, visit)
        expansion = self._expand(leaf, visit.prompt, visit.room, visit.expansion_seed)
        rollout, _ = await gather_or_cancel(self._rollout(leaf, visit), expansion)
        return rollout

    async def _rollout(self, leaf: Node, visit: Visit) -> Rollout:
        """Continue the leaf to the next clause boundary, then evaluate and embed the reply."""
        simulated, simulated_ids = "", ()
        if visit.simulate:
            generation = await self.ctx.generate(
                visit.prompt,
                SamplingSettings(
                    n=1,
                    temperature=1.0,
                    max_tokens=min(self.config.simulation_max_tokens, visit.room),
                    stop=tuple(self.config.simulation_stops),
                    include_stop_str_in_output=True,
                    seed=visit.simulation_seed,
                ),
            )
            completion = generation.completions[0]
            simulated, simulated_ids = completion.text, completion.token_ids
            self.stats.simulations += 1
        reached = visit.reached
        reply = Reply(reached.text + simulated, (*reached.token_ids, *simulated_ids))
        texts = visit.texts
        suffixes = ["".join(texts[i:]) + simulated for i in range(len(texts))]
        (value, error), embeddings = await gather_or_cancel(
            self._evaluate(reply), self._embed(suffixes)
        )
        return Rollout(leaf, reply, value, embeddings, error)

    async def _evaluate(self, reply: Reply) -> tuple[float | None, Exception | None]:
        try:
            (value,) = await self.evaluator.evaluate([reply])
        except (RewardClientError, EngineRequestError) as exc:
            return None, exc
        return value, None

    async def _embed(self, texts: list[str]) -> list[np.ndarray | None]:
        if self.embedder is None or not texts:
            return [None] * len(texts)
        try:
            return list(await self.embeddings.get_many(texts, self._embed_batch))
        except Exception as exc:  # the search goes on without this visit's similarity update
            logger.warning("RAIN: embedding failed, leaf backed up without it: %r", exc)
            self.stats.embedding_errors += 1
            return [None] * len(texts)

    async def _embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        return list(await self.embedder.embed(texts))

    async def _final_value(self, text: str) -> float | None:
        try:
            (value,) = await self.evaluator.evaluate([Reply(text, self.trajectory.tokens)])
        except (RewardClientError, EngineRequestError, DeadlineReached, BudgetExhausted):
            return None
        return value

    # --- expand and widen ---------------------------------------------------------------

    async def _expand(self, leaf: Node, prompt: list[int], room: int, seed: int | None) -> None:
        planned = segment_length(leaf.depth, self.config.segment_lengths)
        length = min(planned, room)
        self.stats.expansions += 1
        if length == 1:
            await self._expand_by_top_tokens(leaf, prompt, self.config.first_width, seed)
        else:
            await self._expand_by_sampling(leaf, prompt, length, seed)
        if not leaf.children:
            # Every segment came back empty: let a later visit try again, a few times.
            leaf.failed_expansions += 1
            leaf.expanded = leaf.failed_expansions >= MAX_FAILED_EXPANSIONS
        elif leaf is self.root:
            smooth_priors(leaf, self.tree)

    async def _expand_by_top_tokens(
        self, leaf: Node, prompt: list[int], width: int, seed: int | None
    ) -> None:
        generation = await self.ctx.generate(
            prompt,
            SamplingSettings(
                n=1,
                temperature=1.0,
                max_tokens=1,
                logprobs=min(self.config.max_children, MAX_TOP_LOGPROBS),
                seed=seed,
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

    async def _expand_by_sampling(
        self, leaf: Node, prompt: list[int], length: int, seed: int | None
    ) -> None:
        calls = [self.ctx.generate(prompt, self._greedy(length))]
        if self.config.width > 1:
            sampled = self._sampled(self.config.width - 1, length, seed)
            calls.append(self.ctx.generate(prompt, sampled))
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

    def _widen(self, node: Node) -> bool:
        """Give ``node`` one more child: the next top token now, or a sampled segment later.

        True when an engine call was started for it (a task of the pool): the descent
        goes on with the children ``node`` has.
        """
        if node.widened_at == node.real_visits:
            return False  # one attempt per visit: a failed attempt is not retried at once
        if any(task.kind == "widen" and task.node is node for task in self.pool.labels()):
            return False
        node.widened_at = node.real_visits
        if node.reserve:
            segment, probability, text = node.reserve.pop(0)
            eos = self.ctx.engine.eos_token_ids
            self._add_widened(node, segment, probability, text, segment[0] in eos)
            return False
        length = len(node.children[0].segment)
        sampling = self._sampled(2, length, self._next_seed())
        work = self._widen_by_sampling(node, self.trajectory.prompt(node.tokens()), sampling)
        self.pool.start(work, InFlight("widen", node))
        return True

    async def _widen_by_sampling(
        self, node: Node, prompt: list[int], sampling: SamplingSettings
    ) -> None:
        generation = await self.ctx.generate(prompt, sampling)
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

    def _sampled(self, n: int, length: int, seed: int | None) -> SamplingSettings:
        return SamplingSettings(
            n=n,
            temperature=self.config.sample_temperature,
            top_k=self.config.sample_top_k,
            max_tokens=length,
            logprobs=0,
            seed=seed,
        )

    def _next_seed(self) -> int | None:
        self._calls += 1
        return offset_seed(self.seed, self._calls)

    # --- streaming ----------------------------------------------------------------------

    async def _emit_text(self) -> None:
        text = await self.ctx.engine.decode(self.trajectory.tokens)
        self._committed_text = text
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


def _within(node: Node, top: Node) -> bool:
    """Whether ``node`` is ``top`` or lies below it."""
    current: Node | None = node
    while current is not None:
        if current is top:
            return True
        current = current.parent
    return False


def _candidate(node: Node) -> dict[str, Any]:
    return {
        "text": node.text,
        "tokens": len(node.segment),
        "prior": round(node.prior, 4),
        "visits": round(node.visits, 3),
        "real_visits": node.real_visits,
        "value": round(node.value, 4),
    }
