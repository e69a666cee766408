"""``darwin``: reward steering with evolutionary heuristics (Hung et al., 2024).

DARWIN balances exploration, decoding from mutated versions of the instruction, with
exploitation, replacing low-reward partial responses by high-reward ones every few tokens.
The steps and numbers follow the reference implementation (declare-lab/darwin):

1. Seed: one response to the original instruction I0, scored; the archive is
   ``{I0: its reward}``. It runs concurrently with the first mutation.
2. Each of ``cycles`` cycles draws an instruction from the archive uniformly at random;
   the policy rewrites it into ``mutations`` variants (``strategies/darwin_prompts``).
   Each variant gets ``beams_per_instruction`` beams, decoded under its own chat prompt.
   Until every beam has finished, each step extends the unfinished beams by
   ``replacement_period`` tokens (concurrent engine calls; beams with the same prompt
   share one call), scores every beam's text so far against I0 (one reward call,
   ``partial=True``), keeps the top ``keep`` beams and every finished one, and overwrites
   each other beam with a random kept beam's tokens (it keeps its own instruction).
   At the end the beams are scored as complete replies (one reward call); the
   instructions of the ``promote`` most often kept beams enter the archive if their
   reward beats the drawn instruction's, and if any entered, the drawn one leaves.
3. The answer is the best-scored response of the whole search (top ``n`` distinct).

Modes (the paper's ablations): ``replace_only`` decodes every beam from I0 (no mutation,
no archive); ``mutate_only`` decodes each mutated instruction's beams in one call, without
replacement, and counts the top ``keep`` final rewards as kept.

Beams are token ids (``strategies/trajectory``): a replaced beam continues the copied
tokens under its own prompt, never re-tokenized, and the prefix cache covers the rest.

Fallbacks, so that a malformed model output never fails a request:

- a mutation list that does not parse, or has empty, missing or cut-short items -> the
  drawn instruction stands in for each unusable variant (``darwin_prompts``);
- the engine rejects the mutation prompt (too long) -> every variant is the drawn one;
- a beam that ends at once (an empty reply) is not protected as a finished beam: it is
  replaced like any low-reward beam; empty replies are returned only if nothing else is;
- a stop string that spans two steps is not seen (each step is its own engine call);
- a beam's step rejected by the engine, the budget or the deadline -> the beams are scored
  as they are, the search stops with its best so far, ``stopped_early``; scoring may run
  0.5 s past the deadline, after which the best already scored is returned;
- the reward backend fails after the seed was scored -> best so far, ``stopped_early``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ttalign.engine.base import EngineRequestError, Generation, Prompt, SamplingSettings
from ttalign.reward_clients.backend import gather_or_cancel
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.registry import RewardName
from ttalign.strategies.base import (
    AlignmentRequest,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
)
from ttalign.strategies.darwin_population import (
    Archive,
    Beam,
    kept_beams,
    most_kept,
    plan_replacements,
)
from ttalign.strategies.darwin_prompts import (
    LIST_START,
    Variants,
    mutation_messages,
    parse_variants,
)
from ttalign.strategies.errors import BudgetExhausted, DeadlineReached, InvalidStrategyRequest
from ttalign.strategies.registry import register_strategy
from ttalign.strategies.sampling import offset_seed
from ttalign.strategies.selection import (
    ScoredCandidate,
    best,
    check_candidate_cap,
    score_texts,
    top_distinct,
)
from ttalign.strategies.trajectory import Trajectory

logger = logging.getLogger(__name__)

Mode = Literal["darwin", "replace_only", "mutate_only"]


class DecodingSampling(BaseModel):
    """Sampling of the seed and of every beam step."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(40, ge=1, description="Sample among the k likeliest tokens.")


class MutationSampling(DecodingSampling):
    """Sampling of the mutation step, and its token limit."""

    max_tokens: int = Field(
        256, ge=1, le=32768, description="Most tokens of one mutation (the whole list)."
    )


class DarwinConfig(StrategyConfig):
    """``strategy_config`` of ``darwin``."""

    mode: Mode = Field(
        "darwin",
        description="darwin: mutation and replacement; replace_only: beams of the original "
        "instruction with replacement; mutate_only: mutated beams without replacement.",
    )
    cycles: int = Field(3, ge=0, le=16, description="Mutation cycles after the seed.")
    mutations: int = Field(5, ge=1, le=64, description="Variants per mutation.")
    beams_per_instruction: int = Field(
        1, ge=1, le=64, description="Beams decoded under each variant (the paper's nb)."
    )
    replacement_period: int = Field(
        40, ge=1, le=32768, description="Tokens between replacement steps (m)."
    )
    keep: int = Field(3, ge=1, le=4096, description="Beams kept at each replacement step.")
    promote: int = Field(
        2, ge=1, le=4096, description="Most often kept beams whose instructions may enter."
    )
    reward: RewardName = Field(
        None, description="Configured reward client to score with; default: the request's."
    )
    generation: DecodingSampling = Field(
        default_factory=DecodingSampling, description="Sampling of the seed and the beams."
    )
    mutation: MutationSampling = Field(
        default_factory=MutationSampling, description="Sampling of the mutation step."
    )


@register_strategy
class Darwin(Strategy[DarwinConfig]):
    name = "darwin"
    description = (
        "DARWIN: beams decoded from mutated instructions; every few tokens low-reward "
        "partial responses are replaced by high-reward ones (scored against the original)."
    )
    config_model = DarwinConfig
    uses_reward = True

    def check(self, request: AlignmentRequest, config: DarwinConfig) -> None:
        sampling = request.sampling
        if sampling.logprobs is not None:
            raise InvalidStrategyRequest(
                "darwin splices responses from many engine calls and returns no log-probabilities.",
                param="logprobs",
            )
        if sampling.structured is not None:
            raise InvalidStrategyRequest(
                "darwin cannot enforce a response format on responses it splices.",
                param="response_format",
            )
        if _last_user_index(request.messages) is None:
            raise InvalidStrategyRequest(
                "darwin mutates the last user message, and the conversation has none.",
                param="messages",
            )
        beams = config.mutations * config.beams_per_instruction
        check_candidate_cap(beams, request, "strategy_config.mutations")
        request.check_step_tokens(config.mutation.max_tokens, "strategy_config.mutation.max_tokens")
        request.check_step_tokens(
            min(config.replacement_period, sampling.max_tokens),
            "strategy_config.replacement_period",
        )
        request.budget.check(
            1 + (1 if config.cycles and config.mode != "replace_only" else 0),
            sampling.max_tokens + config.mutation.max_tokens,
            param="strategy_config",
        )

    async def run(self, ctx: StrategyContext, config: DarwinConfig) -> StrategyResult:
        return await _Evolution(ctx, config).run()


class _Stop(Exception):
    """Ends the search early with ``reason``; what was scored so far is kept."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    @classmethod
    def after(cls, error: Exception) -> _Stop:
        """The stop that ``error`` (one of :data:`_STOPPING`) calls for."""
        if isinstance(error, DeadlineReached):
            return cls("deadline")
        if isinstance(error, BudgetExhausted):
            return cls("budget", str(error))
        if isinstance(error, EngineRequestError):
            return cls("engine_rejected", str(error))
        return cls("reward_error", str(error))


#: Errors that end the search with its best so far rather than fail the request.
_STOPPING = (DeadlineReached, BudgetExhausted, EngineRequestError, RewardClientError)


class _Evolution:
    """One request's search: the archive, the candidates, the caches and the trace."""

    def __init__(self, ctx: StrategyContext, config: DarwinConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.request = ctx.request
        self.length = ctx.request.sampling.max_tokens
        # The request's seed makes the draws reproducible, as it makes the sampling.
        self.rng = random.Random(ctx.request.sampling.seed)
        self.reward = ctx.rewards.get(config.reward or ctx.request.reward)
        self.messages = list(ctx.request.messages)
        self.user_index = _last_user_index(self.messages)
        self.original = self.messages[self.user_index]["content"]
        self.archive = Archive({self.original: math.nan})
        self.candidates: list[ScoredCandidate] = []
        self.partial_scores: dict[str, float] = {}
        self.final_scores: dict[str, float] = {}
        self.contexts: dict[str, tuple[int, ...]] = {}
        self.decoded: dict[tuple[int, ...], str] = {}
        # Offset 0 is the seed's: it races the first mutation, and must not take its seed.
        self.engine_steps = 1
        self.candidates_scored = 0
        self.prompt_tokens: int | None = None
        self.seed: dict[str, Any] = {}
        self.cycle_records: list[dict[str, Any]] = []
        self.archive_history: list[dict[str, Any]] = []

    # --- the search -----------------------------------------------------------------------

    async def run(self) -> StrategyResult:
        seed_task = asyncio.ensure_future(self._seed())
        completed, stop = 0, None
        try:
            for number in range(1, self.config.cycles + 1):
                if self.ctx.deadline_reached or self.ctx.past_deadline():
                    stop = _Stop("deadline")
                    break
                record: dict[str, Any] = {"cycle": number, "completed": False}
                self.cycle_records.append(record)
                try:
                    await self._cycle(number, record, seed_task)
                except _Stop as exc:
                    stop = exc
                except _STOPPING as exc:
                    logger.warning("darwin cycle %d stopped: %s", number, exc)
                    stop = _Stop.after(exc)
                if stop is not None:
                    if stop.detail:
                        record["error"] = stop.detail
                    break
                record["completed"] = True
                completed = number
            await seed_task  # its reward is the archive's first bar; its errors fail the request
        finally:
            if not seed_task.done():
                seed_task.cancel()
                await asyncio.gather(seed_task, return_exceptions=True)
        return self._result(completed, stop.reason if stop else None)

    async def _seed(self) -> None:
        """Sample and score one response to the original conversation."""
        prompt = await self._context(self.original)
        generation = await self._generate(
            list(prompt), self.config.generation, self.length, seed_offset=0
        )
        self.prompt_tokens = generation.prompt_tokens
        (completion,) = generation.completions
        try:
            (score,) = await self._score_final([completion.text])
        except DeadlineReached:
            score = math.nan  # out of time: the seed is still an answer, unranked
        candidate = ScoredCandidate(
            completion.text, score, completion.finish_reason, completion.num_tokens, None, 0
        )
        self.candidates.insert(0, candidate)
        self.archive.rewards[self.original] = score
        self.seed = candidate.summary()
        self.archive_history.append({"cycle": 0, "archive": self.archive.snapshot()})

    def _check_seed(self, seed_task: asyncio.Future[None]) -> None:
        # Fail fast: a seed that failed (a prompt the engine rejects, a reward backend that
        # is down) fails the request, so there is no point searching on.
        if seed_task.done() and not seed_task.cancelled() and seed_task.exception():
            raise seed_task.exception()  # type: ignore[misc]

    async def _cycle(
        self, number: int, record: dict[str, Any], seed_task: asyncio.Future[None]
    ) -> None:
        mode = self.config.mode
        drawn = self.original if mode == "replace_only" else self.archive.draw(self.rng)
        record["drawn"] = drawn
        if mode == "replace_only":
            variants = Variants((self.original,) * self.config.mutations)
        else:
            variants = await self._mutate(drawn, record)
        self._check_seed(seed_task)
        beams = [
            Beam(index, instruction, Trajectory.start(await self._context(instruction)))
            for index, instruction in enumerate(variants.instructions)
            for _ in range(self.config.beams_per_instruction)
        ]
        record["steps"] = []
        stop: _Stop | None = None
        try:
            if mode == "mutate_only":
                await self._extend(beams, period=self.length)  # to the end, no replacement
            else:
                await self._evolve(number, beams, record["steps"], seed_task)
        except (BudgetExhausted, EngineRequestError) as exc:
            stop = _Stop.after(exc)  # the beams so far are still scored below
        if stop is None and self.ctx.deadline_reached:
            stop = _Stop("deadline")

        numbered = [(i, beam) for i, beam in enumerate(beams) if beam.num_tokens]
        beams = [beam for _, beam in numbered]  # a rejected first step leaves none
        texts = await self._texts(beams)
        scores = await self._score_final(texts)
        for beam, text, score in zip(beams, texts, scores, strict=True):
            self.candidates.append(
                ScoredCandidate(text, score, _finish_reason(beam), beam.num_tokens, None, number)
            )
        if mode == "mutate_only":
            for index in kept_beams(scores, [False] * len(beams), self.config.keep):
                beams[index].times_kept += 1
        record["final"] = [
            {
                "beam": numbered[i][0],
                "instruction": beam.instruction_index,
                "times_kept": beam.times_kept,
                "text": text,
                "score": _json_score(score),
                "finish_reason": _finish_reason(beam),
            }
            for i, (beam, text, score) in enumerate(zip(beams, texts, scores, strict=True))
        ]
        if stop is not None:
            raise stop

        await seed_task  # its reward is the archive's first bar; its errors fail the request
        if mode != "replace_only":
            promoted = most_kept([b.times_kept for b in beams], self.config.promote)
            contenders = [(beams[i].instruction, scores[i]) for i in promoted]
            record["promoted"] = [
                {"beam": i, "instruction": beams[i].instruction, "score": _json_score(scores[i])}
                for i in promoted
            ]
            record["entered"] = self.archive.update(drawn, contenders)
        self.archive_history.append({"cycle": number, "archive": self.archive.snapshot()})
        self._report(phase="cycle", cycle=number, beams_alive=0)

    async def _mutate(self, drawn: str, record: dict[str, Any]) -> Variants:
        """The policy's rewrites of ``drawn``, with the drawn one standing in where needed."""
        count = self.config.mutations
        messages = mutation_messages(drawn, count, self.ctx.prompt_overrides)
        step = self.config.mutation
        settings = SamplingSettings(
            n=1,
            temperature=step.temperature,
            top_p=step.top_p,
            top_k=step.top_k,
            max_tokens=step.max_tokens,
            seed=self._next_seed(),
            # Not the request's ignore_eos: that is about the reply; a list run past its end
            # would glue the model's next turn onto its last item.
        )
        try:
            prompt = await self.ctx.chat_prompt(messages, continue_final_message=True)
            generation = await self.ctx.generate(prompt, settings)
        except EngineRequestError as exc:
            variants = Variants((drawn,) * count, ("mutation_rejected",))
            record["mutation"] = {"error": str(exc), "variants": list(variants.instructions)}
            return variants
        (completion,) = generation.completions
        text = LIST_START + completion.text
        variants = parse_variants(
            text, count, drawn, cut_short=completion.finish_reason == "length"
        )
        record["mutation"] = {
            "text": text,
            "finish_reason": completion.finish_reason,
            "variants": list(variants.instructions),
            "fallbacks": list(variants.fallbacks),
        }
        if self.ctx.deadline_reached:
            raise _Stop("deadline")
        return variants

    async def _evolve(
        self,
        cycle: int,
        beams: list[Beam],
        steps: list[dict[str, Any]],
        seed_task: asyncio.Future[None],
    ) -> None:
        """Extend, score and replace until every beam has finished (or time runs out)."""
        while not all(beam.finished for beam in beams):
            if self.ctx.past_deadline():
                self.ctx.deadline_reached = True
                return
            await self._extend(beams)
            self._check_seed(seed_task)
            entry: dict[str, Any] = {"step": len(steps) + 1}
            steps.append(entry)
            if self.ctx.deadline_reached or all(beam.finished for beam in beams):
                # Nothing left to steer: the final scoring ranks them as complete replies.
                entry["beams"] = [_beam_summary(i, b) for i, b in enumerate(beams)]
                return
            texts = await self._texts(beams)
            scores = await self._score_partial(texts)
            protected = [
                beam.finished and bool(text.strip())
                for beam, text in zip(beams, texts, strict=True)
            ]
            kept = kept_beams(scores, protected, self.config.keep)
            for index in kept:
                beams[index].times_kept += 1
            replacements = plan_replacements(len(beams), kept, self.rng)
            entry["beams"] = [
                {**_beam_summary(i, b), "score": _json_score(s)}
                for i, (b, s) in enumerate(zip(beams, scores, strict=True))
            ]
            entry["kept"] = kept
            entry["replacements"] = [{"beam": r.target, "from": r.source} for r in replacements]
            for r in replacements:
                beams[r.target].take_response_of(beams[r.source])
            self._report(
                phase="step",
                cycle=cycle,
                step=entry["step"],
                step_best_reward=max((s for s in scores if not math.isnan(s)), default=None),
                beams_alive=sum(not beam.finished for beam in beams),
            )

    async def _extend(self, beams: Sequence[Beam], *, period: int | None = None) -> None:
        """One step: every unfinished beam gets up to ``period`` more tokens.

        ``period`` defaults to ``replacement_period``.

        Beams whose prompts are identical (same instruction, same tokens) share one engine
        call with ``n`` completions; the calls run concurrently and the engine batches them.
        """
        groups: dict[tuple[int, ...], list[Beam]] = {}
        for beam in beams:
            if not beam.finished:
                groups.setdefault(tuple(beam.trajectory.prompt()), []).append(beam)
        generations = await gather_or_cancel(
            *(
                self._extend_group(list(prompt), group, period or self.config.replacement_period)
                for prompt, group in groups.items()
            )
        )
        for group, generation in zip(groups.values(), generations, strict=True):
            for beam, completion in zip(group, generation.completions, strict=True):
                total = beam.num_tokens + completion.num_tokens
                ended = completion.finish_reason == "stop" or total >= self.length
                if completion.finish_reason == "length" and total < self.length:
                    ended = False  # cut short by the deadline, not by the limit
                beam.trajectory.extend(completion.token_ids, finished=ended)
                beam.finish_reason = completion.finish_reason if ended else None
                if isinstance(completion.stop_reason, str):
                    beam.stop_tail = completion.text
                    beam.stop_tail_tokens = completion.num_tokens

    async def _extend_group(self, prompt: list[int], group: list[Beam], period: int) -> Generation:
        done = group[0].num_tokens
        limit = min(period, self.length - done)
        return await self._generate(
            prompt,
            self.config.generation,
            limit,
            n=len(group),
            # The request's min_tokens spread over the steps (the engine refuses more
            # than the step's limit).
            min_tokens=min(limit, max(0, self.request.sampling.min_tokens - done)),
        )

    # --- engine and reward ----------------------------------------------------------------

    def _next_seed(self) -> int | None:
        seed = offset_seed(self.request.sampling.seed, self.engine_steps)
        self.engine_steps += 1
        return seed

    async def _generate(
        self,
        prompt: Prompt,
        sampling: DecodingSampling,
        max_tokens: int,
        *,
        n: int = 1,
        min_tokens: int | None = None,
        seed_offset: int | None = None,
    ) -> Generation:
        """One engine call with the request's settings (stops, penalties, ...) and ``sampling``."""
        settings = replace(
            self.request.sampling,
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=max_tokens,
            min_tokens=self.request.sampling.min_tokens if min_tokens is None else min_tokens,
            seed=(
                self._next_seed()
                if seed_offset is None
                else offset_seed(self.request.sampling.seed, seed_offset)
            ),
        )
        return await self.ctx.generate(prompt, settings)

    async def _context(self, instruction: str) -> tuple[int, ...]:
        """The rendered conversation with ``instruction`` as its last user message."""
        if instruction not in self.contexts:
            messages = list(self.messages)
            messages[self.user_index] = {**messages[self.user_index], "content": instruction}
            self.contexts[instruction] = tuple(await self.ctx.chat_prompt(messages))
        return self.contexts[instruction]

    async def _texts(self, beams: Sequence[Beam]) -> list[str]:
        """Every beam's reply so far, decoded concurrently (cached by tokens)."""
        return list(await asyncio.gather(*(self._text(beam) for beam in beams)))

    async def _text(self, beam: Beam) -> str:
        tokens = beam.trajectory.tokens
        tail = ""
        if beam.stop_tail is not None:
            tokens, tail = tokens[: len(tokens) - beam.stop_tail_tokens], beam.stop_tail
        if tokens not in self.decoded:
            self.decoded[tokens] = await self.ctx.engine.decode(tokens)
        return self.decoded[tokens] + tail

    async def _score_partial(self, texts: Sequence[str]) -> list[float]:
        """Every text as a partial reply to the original conversation, in one reward call."""
        return await self._score(texts, self.partial_scores, partial=True)

    async def _score_final(self, texts: Sequence[str]) -> list[float]:
        """Every text as a complete reply to the original conversation, in one reward call."""
        return await self._score(texts, self.final_scores, partial=False)

    async def _score(
        self, texts: Sequence[str], cache: dict[str, float], *, partial: bool
    ) -> list[float]:
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        scores = await score_texts(
            self.ctx, self.reward, self.request.messages, missing, partial=partial
        )
        self.candidates_scored += len(missing)
        cache.update(zip(missing, scores, strict=True))
        return [cache[t] for t in texts]

    # --- reporting ------------------------------------------------------------------------

    def _report(self, **data: Any) -> None:
        scored = [c for c in self.candidates if c.reward is not None]
        self.ctx.report(
            **data,
            cycles=self.config.cycles,
            best_reward=best(scored).reward if scored else None,
            archive_size=len(self.archive.rewards),
        )

    def _result(self, completed: int, stop_reason: str | None) -> StrategyResult:
        pool = [c for c in self.candidates if c.key] or self.candidates
        chosen = top_distinct(pool, self.request.n)
        trace = None
        if self.request.return_trace:
            trace = {
                "mode": self.config.mode,
                "cycles": self.config.cycles,
                "original_instruction": self.original,
                "seed": self.seed,
                "archive": self.archive_history,
                "cycle_records": self.cycle_records,
                "candidates": [c.summary() for c in self.candidates],
                "stop_reason": stop_reason,
            }
        return StrategyResult(
            choices=[c.choice() for c in chosen],
            rounds=completed,
            candidates_scored=self.candidates_scored,
            stopped_early=stop_reason is not None,
            trace=trace,
            prompt_tokens=self.prompt_tokens,
            metadata={
                "cycles_completed": completed,
                "archive_size": len(self.archive.rewards),
                "stopped_by": stop_reason,
            },
        )


def _last_user_index(messages: Sequence[dict[str, Any]]) -> int | None:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user" and isinstance(
            messages[index].get("content"), str
        ):
            return index
    return None


def _finish_reason(beam: Beam) -> Literal["stop", "length"]:
    return "stop" if beam.finish_reason == "stop" else "length"


def _json_score(score: float) -> float | None:
    return None if math.isnan(score) else score


def _beam_summary(index: int, beam: Beam) -> dict[str, Any]:
    return {
        "beam": index,
        "instruction": beam.instruction_index,
        "tokens": beam.num_tokens,
        "finished": beam.finished,
    }
