"""``tpo``: Test-Time Preference Optimization (Li et al., 2025).

Sample ``width`` responses and score them into a cache that lasts the whole request. Each
of ``depth`` rounds takes the best (chosen) and worst (rejected) response of the cache;
the policy model explains why chosen beats rejected and where it still falls short (the
textual loss), turns that into suggestions (the textual gradient), and writes ``width``
new responses guided by them (the update), which are scored into the cache. The answer is
the best of the cache.

Modes: ``tpo``; ``revision`` (the loss critiques the chosen response alone); ``bon`` (no
feedback: each round samples ``width`` fresh responses, the same compute as plain sampling).

Fallbacks, so that a model that ignores the format never fails a request:

- empty loss -> the ``tpo.fallback_loss`` text stands in for it;
- empty gradient -> the ``tpo.fallback_gradient`` generic instruction stands in for it;
- loss or gradient cut at its max tokens -> used as it is (finish reason in the trace);
- update output with a "Here is the new response:" header -> only the text after the
  last such header is kept;
- update output empty -> dropped, the cache is unchanged;
- update output already in the cache -> dropped without scoring it again;
- update output cut at its max tokens -> kept and scored; returned with ``length``;
- no update output survives -> the round adds nothing; the next one critiques again;
- best and worst are the same response (one distinct response, or all tied) -> that
  round critiques it alone, as ``revision`` does;
- the engine rejects a round's prompt (too long) -> stop, best so far, ``stopped_early``;
- the reward backend fails after the first sampling -> stop, best so far, ``stopped_early``;
- the deadline passes -> the running engine call is aborted and keeps what it generated
  (``finish_reason: length``); a cut-short critique ends the search, cut-short update
  responses are still scored; scoring may run 0.5 s past the deadline, after which the
  search returns its best so far (or, if the first sampling was never scored, its first
  distinct responses, unscored); ``stopped_early``;
- the next engine call could exceed the request's compute budget -> best so far,
  ``stopped_early``.

Every step's token limit is at most the server's ``--max-tokens-cap`` (a 400 otherwise).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ttalign.engine.base import Completion, EngineRequestError, SamplingSettings
from ttalign.reward_clients.base import RewardClientError
from ttalign.reward_clients.registry import RewardName
from ttalign.strategies.base import (
    AlignmentRequest,
    Strategy,
    StrategyConfig,
    StrategyContext,
    StrategyResult,
)
from ttalign.strategies.errors import BudgetExhausted, DeadlineReached, InvalidStrategyRequest
from ttalign.strategies.registry import register_strategy
from ttalign.strategies.sampling import offset_seed
from ttalign.strategies.selection import (
    ScoredCandidate,
    best,
    check_candidate_cap,
    distinct_key,
    score_texts,
    top_distinct,
    unscored,
    worst,
)
from ttalign.strategies.tpo_prompts import Message, TPOPrompts, render_query

logger = logging.getLogger(__name__)

Mode = Literal["tpo", "revision", "bon"]

#: A header such as "Here is an improved response:" that small models write before the
#: response they were asked for, often after echoing the old one or commenting on it.
_RESPONSE_HEADER = re.compile(
    r"^\W*(?:here(?:'s| is)\s+(?:an?|the|my)\s+)?"
    r"(?:improved|revised|updated|new|better|rewritten)\s+(?:reply|response|answer|version)\b"
    r"[^\n:]{0,40}:[*_]*",
    re.IGNORECASE | re.MULTILINE,
)


class StepSampling(BaseModel):
    """Sampling settings shared by a group of steps."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")


class StepTokens(BaseModel):
    """The most tokens each step may generate."""

    model_config = ConfigDict(extra="forbid")

    sample: int | None = Field(
        None, ge=1, le=32768, description="First sampling; default: the request's max_tokens."
    )
    loss: int = Field(256, ge=1, le=32768, description="Textual loss (the comparison).")
    gradient: int = Field(256, ge=1, le=32768, description="Textual gradient (suggestions).")
    update: int | None = Field(
        None, ge=1, le=32768, description="Each updated response; default: as for sample."
    )


class TPOConfig(StrategyConfig):
    """``strategy_config`` of ``tpo``."""

    mode: Mode = Field(
        "tpo",
        description="tpo: chosen vs rejected feedback; revision: critique of the best alone; "
        "bon: no feedback, fresh samples each round (ablation at equal compute).",
    )
    depth: int = Field(2, ge=0, le=16, description="Rounds of feedback and update (D).")
    width: int = Field(5, ge=1, le=1024, description="Responses sampled per round (N).")
    reward: RewardName = Field(
        None, description="Configured reward client to score with; default: the request's."
    )
    generation: StepSampling = Field(
        default_factory=StepSampling, description="Sampling of the sample and update steps."
    )
    feedback: StepSampling = Field(
        default_factory=StepSampling, description="Sampling of the loss and gradient steps."
    )
    max_tokens: StepTokens = Field(default_factory=StepTokens, description="Per-step limits.")


@register_strategy
class TestTimePreferenceOptimization(Strategy[TPOConfig]):
    __test__ = False  # not a pytest test class, whatever module imports it
    name = "tpo"
    description = (
        "Test-Time Preference Optimization: responses are refined over rounds of textual "
        "feedback (chosen vs rejected critique, then suggestions) guided by a reward."
    )
    config_model = TPOConfig
    uses_reward = True

    def check(self, request: AlignmentRequest, config: TPOConfig) -> None:
        check_candidate_cap(config.width, request, "strategy_config.width")
        for step, tokens in config.max_tokens.model_dump().items():
            if tokens is not None:
                request.check_step_tokens(tokens, f"strategy_config.max_tokens.{step}")
        sample_tokens = config.max_tokens.sample or request.sampling.max_tokens
        update_tokens = config.max_tokens.update or sample_tokens
        for step, limit in (("sample", sample_tokens), ("update", update_tokens)):
            if request.sampling.min_tokens > limit:
                raise InvalidStrategyRequest(
                    f"min_tokens ({request.sampling.min_tokens}) exceeds the {step} step's "
                    f"max_tokens ({limit}).",
                    param="min_tokens",
                )
        request.budget.check(
            config.width, config.width * sample_tokens, param="strategy_config.width"
        )

    async def run(self, ctx: StrategyContext, config: TPOConfig) -> StrategyResult:
        return await _Search(ctx, config).run()


class _Search:
    """The state of one request's search: the cache, the trace, the step counter."""

    def __init__(self, ctx: StrategyContext, config: TPOConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.prompts = TPOPrompts.with_overrides(ctx.prompt_overrides)
        self.reward = ctx.rewards.get(config.reward or ctx.request.reward)
        self.query = render_query(ctx.request.messages)
        #: Distinct responses by text, in the order they were generated.
        self.cache: dict[str, ScoredCandidate] = {}
        self.rounds: list[dict[str, Any]] = []
        self.initial: dict[str, Any] = {}
        self.candidates_scored = 0
        self.engine_steps = 0
        self.prompt_tokens: int | None = None

    async def run(self) -> StrategyResult:
        generation_prompt = list(self.ctx.request.messages)
        completions = await self._generate(generation_prompt, self._response_tokens("sample"))
        try:
            await self._admit(completions, 0, self.initial, keep_empty=True)
        except DeadlineReached:
            # Out of time before anything was ranked: the first sampling, unscored.
            chosen = unscored(completions, self.ctx.request.n)
            return self._result(0, "deadline", chosen)
        self._report(0)

        completed, stop_reason = 0, None
        for number in range(1, self.config.depth + 1):
            if self.ctx.deadline_reached or self.ctx.past_deadline():
                stop_reason = "deadline"
                break
            record: dict[str, Any] = {"round": number, "completed": False}
            self.rounds.append(record)
            try:
                await self._round(number, record)
            except DeadlineReached:
                stop_reason = "deadline"
            except BudgetExhausted as exc:
                stop_reason = "budget"
                record["error"] = str(exc)
            except EngineRequestError as exc:
                stop_reason = "engine_rejected"
                record["error"] = str(exc)
            except RewardClientError as exc:
                stop_reason = "reward_error"
                record["error"] = str(exc)
                logger.warning("tpo round %d stopped: %s", number, exc)
            if stop_reason is not None:
                break
            record["completed"] = True
            completed = number
            self._report(number)
        return self._result(completed, stop_reason)

    # --- one round ----------------------------------------------------------------------

    async def _round(self, number: int, record: dict[str, Any]) -> None:
        if self.config.mode == "bon":
            completions = await self._generate(
                list(self.ctx.request.messages), self._response_tokens("update")
            )
            await self._admit(completions, number, record)
            return

        chosen = best(self.cache.values())
        rejected = worst(self.cache.values()) if self.config.mode == "tpo" else None
        if rejected is chosen:
            rejected = None  # one distinct response (or all tied): critique it alone
        record["chosen"] = chosen.summary()
        record["rejected"] = rejected.summary() if rejected else None
        record["fallbacks"] = []

        loss_messages = self.prompts.loss_messages(
            self.query, chosen.text, rejected.text if rejected else None
        )
        loss = await self._critique(loss_messages, "loss", self.prompts.fallback_loss, record)
        self._stop_at_deadline()
        gradient_messages = self.prompts.gradient_messages(
            loss_messages, loss, revision=rejected is None
        )
        gradient = await self._critique(
            gradient_messages, "gradient", self.prompts.fallback_gradient, record
        )
        self._stop_at_deadline()
        update_messages = self.prompts.update_messages(gradient_messages, gradient, self.query)
        completions = await self._generate(update_messages, self._response_tokens("update"))
        trimmed = [await _after_header(c, self.ctx) for c in completions]
        await self._admit(trimmed, number, record)

    def _stop_at_deadline(self) -> None:
        # A critique cut short by the deadline cannot guide an update that has no time left.
        if self.ctx.deadline_reached:
            raise DeadlineReached("the deadline passed during a critique")

    async def _critique(
        self, messages: list[Message], step: str, fallback: str, record: dict[str, Any]
    ) -> str:
        """One loss or gradient sample; an empty one becomes ``fallback``."""
        max_tokens = getattr(self.config.max_tokens, step)
        (completion,) = await self._generate(
            messages, max_tokens, n=1, sampling=self.config.feedback, response=False
        )
        text = completion.text.strip()
        record[f"{step}_finish_reason"] = completion.finish_reason
        if not text:
            record["fallbacks"].append(f"empty_{step}")
            text = fallback
        record[step] = text
        return text

    # --- engine and reward ----------------------------------------------------------------

    def _response_tokens(self, step: Literal["sample", "update"]) -> int:
        limits = self.config.max_tokens
        tokens = limits.update if step == "update" else None
        return tokens or limits.sample or self.ctx.request.sampling.max_tokens

    async def _generate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        *,
        n: int | None = None,
        sampling: StepSampling | None = None,
        response: bool = True,
    ) -> tuple[Completion, ...]:
        """One engine call.

        Response steps keep every setting of the request (stops, logprobs, penalties,
        logit_bias, response_format); critique steps keep only its seed and ignore_eos.
        """
        request = self.ctx.request.sampling
        step_sampling = sampling or self.config.generation
        step = {
            "n": self.config.width if n is None else n,
            "temperature": step_sampling.temperature,
            "top_p": step_sampling.top_p,
            "max_tokens": max_tokens,
            "seed": offset_seed(request.seed, self.engine_steps),
        }
        self.engine_steps += 1
        settings = (
            replace(request, **step)
            if response
            else SamplingSettings(**step, ignore_eos=request.ignore_eos)
        )
        generation = await self.ctx.sample(messages, settings)
        if self.prompt_tokens is None:
            self.prompt_tokens = generation.prompt_tokens
        return generation.completions

    async def _admit(
        self,
        completions: Sequence[Completion],
        number: int,
        record: dict[str, Any],
        *,
        keep_empty: bool = False,
    ) -> None:
        """Score the new distinct responses in one reward call and add them to the cache."""
        fresh: dict[str, Completion] = {}
        dropped = []
        for completion in completions:
            key = distinct_key(completion.text)
            if not key and not keep_empty:
                dropped.append({"text": completion.text, "reason": "empty"})
            elif key in self.cache or key in fresh:
                dropped.append({"text": completion.text, "reason": "duplicate"})
            else:
                fresh[key] = completion
        scores = await score_texts(
            self.ctx, self.reward, self.ctx.request.messages, [c.text for c in fresh.values()]
        )
        self.candidates_scored += len(scores)
        added = []
        for (key, c), score in zip(fresh.items(), scores, strict=True):
            candidate = ScoredCandidate(
                c.text, score, c.finish_reason, c.num_tokens, c.logprobs, number
            )
            self.cache[key] = candidate
            added.append(candidate.summary())
        record["candidates"] = added
        record["dropped"] = dropped

    def _report(self, number: int) -> None:
        self.ctx.report(
            round=number,
            depth=self.config.depth,
            best_score=best(self.cache.values()).score,
            candidates_scored=self.candidates_scored,
        )

    # --- result ---------------------------------------------------------------------------

    def _result(
        self,
        completed: int,
        stop_reason: str | None,
        chosen: list[ScoredCandidate] | None = None,
    ) -> StrategyResult:
        if chosen is None:
            chosen = top_distinct(self.cache.values(), self.ctx.request.n)
        trace = None
        if self.ctx.request.return_trace:
            trace = {
                "mode": self.config.mode,
                "depth": self.config.depth,
                "width": self.config.width,
                "initial": self.initial,
                "rounds": self.rounds,
                "candidates": [c.summary() for c in self.cache.values()],
                "stop_reason": stop_reason,
            }
        return StrategyResult(
            choices=[c.choice() for c in chosen],
            rounds=completed,
            candidates_scored=self.candidates_scored,
            stopped_early=stop_reason is not None,
            trace=trace,
            prompt_tokens=self.prompt_tokens,
        )


async def _after_header(completion: Completion, ctx: StrategyContext) -> Completion:
    """Keep only what follows the last "New response:" header, unless nothing follows it."""
    headers = list(_RESPONSE_HEADER.finditer(completion.text))
    if not headers or not completion.text[headers[-1].end() :].strip():
        return completion
    text = completion.text[headers[-1].end() :].strip()
    kept = await ctx.engine.count_tokens(text)
    return Completion(
        index=completion.index,
        text=text,
        # The response is the tail of what was generated; usage counts only its tokens.
        token_ids=completion.token_ids[-kept:] if kept else (),
        finish_reason=completion.finish_reason,
        logprobs=None,  # they no longer line up with the text
    )
