"""``rain``: rewindable search over segments of the reply, steered by an evaluator.

RAIN (Li et al., 2023) grows a tree of candidate segments below the committed prefix.
Each inner iteration selects a leaf, expands it, simulates a continuation to the next
clause boundary, evaluates the partial reply and backs the value up to the root; then it
rewinds to the root. When the most visited child is visited and valued enough (or the
iteration limit is reached), that child is committed and its subtree kept; the visits
the kept subtree brings along count toward the next commit's iteration limit, as in the
reference. The numbers and rules follow the reference implementation (SafeAILab/RAIN);
``strategies/rain_tree`` holds them. Beyond the reference:

- the evaluator is the policy's self-evaluation or any configured reward client, scoring
  partial replies (``strategies/rain_evaluation``); self-evaluation prompts are token
  ids built once per request, with only the reply's ids spliced in per evaluation;
- ``parallel_leaves`` keeps that many leaves in flight (``strategies/rain_search``, on
  ``strategies/rain_pool``), spread apart by virtual loss: each leaf's task expands,
  simulates, evaluates and embeds, and is backed up as soon as it finishes, while the
  others go on; a widening that needs an engine call runs as its own task. With
  ``parallel_leaves=1`` this is the reference's sequential loop. At a commit, tasks below
  the committed child go on into the kept subtree and the others are cancelled;
- trajectories are token ids (``strategies/trajectory``): every call on one starts with
  the committed tokens, so the engine's prefix cache holds them. Reply texts are built
  from the texts the search already holds (the committed text, decoded once per commit,
  plus the nodes' and the simulation's), and their embeddings are cached per request;
- committed segments stream as real content deltas while the search goes on.

This module is the strategy: its checks, its streaming, and one search per choice
(``n``), sharing the request's evaluation and embedding memos. The settings live in
``strategies/rain_config``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ttalign.engine.base import CompletionDelta
from ttalign.reward_clients.backend import gather_or_cancel
from ttalign.strategies.base import (
    AlignmentRequest,
    DeltaEvent,
    ResultEvent,
    Strategy,
    StrategyContext,
    StrategyResult,
    StreamEvent,
)
from ttalign.strategies.errors import InvalidStrategyRequest
from ttalign.strategies.rain_config import RainConfig
from ttalign.strategies.rain_evaluation import (
    CachedEvaluator,
    Evaluator,
    RewardEvaluator,
    SelfEvaluator,
    option_token_ids,
)
from ttalign.strategies.rain_memo import BatchMemo
from ttalign.strategies.rain_prompts import EvaluationPrompts
from ttalign.strategies.rain_search import RainSearch, SearchStats
from ttalign.strategies.registry import register_strategy
from ttalign.strategies.sampling import offset_seed
from ttalign.strategies.tpo_prompts import render_query

__all__ = ["Rain", "RainConfig", "RainSearch", "SearchStats"]

#: Seeds of different choices (``n > 1``) lie this far apart.
CHOICE_SEED_STRIDE = 1_000_003


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
        embeddings: BatchMemo[str, np.ndarray] = BatchMemo()
        searches = [
            RainSearch(
                ctx,
                config,
                evaluator,
                embedder,
                offset_seed(ctx.request.sampling.seed, i * CHOICE_SEED_STRIDE),
                index=i,
                emit=emit,
                embeddings=embeddings,
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
            "embedding_calls": embeddings.calls,
            "embedded_texts": embeddings.computed,
            "embedding_cache_hits": embeddings.hits,
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
        return await SelfEvaluator.prepare(
            ctx, prompts, render_query(ctx.request.messages), letters, config.self_score
        )
