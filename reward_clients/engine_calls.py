"""The two engine calls that judging clients make, metered into the request they score for.

Both run on an :class:`~ttalign.engine.base.EngineClient` (the serving engine or the judge
engine). Before each call the request's budget may refuse it (``meter.before``); after it,
its tokens count in the request's usage (``meter.after``). Without a meter (a call outside
any request) nothing is metered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ttalign.engine.base import SamplingSettings
from ttalign.reward_clients.base import RewardClientError

#: How many alternatives of a judged position are inspected.
TOP_LOGPROBS = 20


async def _generate(
    engine: Any,
    messages: Sequence[dict[str, str]],
    sampling: SamplingSettings,
    meter: Any,
    continue_final: bool = True,
) -> Any:
    prompt = await engine.render_chat(list(messages), continue_final_message=continue_final)
    if meter is not None:
        meter.before(len(prompt), sampling.max_tokens)
    generation = await engine.generate(prompt, sampling)
    if meter is not None:
        meter.after(generation)
    return generation


async def greedy_continuation(
    engine: Any,
    messages: Sequence[dict[str, str]],
    *,
    max_tokens: int,
    meter: Any,
    continue_final: bool = True,
) -> str:
    """The greedy continuation of ``messages``' open final turn (seeded, so repeatable);
    without ``continue_final``, the greedy reply that starts a new assistant turn."""
    sampling = SamplingSettings(n=1, temperature=0.0, max_tokens=max_tokens, seed=0)
    generation = await _generate(engine, messages, sampling, meter, continue_final)
    return generation.completions[0].text


async def first_token_alternatives(
    engine: Any, messages: Sequence[dict[str, str]], meter: Any, client: str
) -> list[tuple[str, float]]:
    """The top alternatives, with log-probabilities, of the next token after ``messages``'
    open final turn: one greedy token on ``engine``, metered into ``meter`` (whose budget
    may refuse the call first)."""
    sampling = SamplingSettings(n=1, temperature=0.0, max_tokens=1, logprobs=TOP_LOGPROBS)
    generation = await _generate(engine, messages, sampling, meter)
    logprobs = generation.completions[0].logprobs
    if not logprobs:
        raise RewardClientError(client, "the engine returned no log-probabilities")
    first = logprobs[0]
    alternatives = dict(first.top)
    alternatives.setdefault(first.token, first.logprob)
    return list(alternatives.items())
