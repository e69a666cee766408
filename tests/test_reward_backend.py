"""The shared backend base: micro-batching, retries, partial failures, metrics; composites."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest
from ttalign.reward_clients.backend import (
    BackendReward,
    BackendSettings,
    ScoringItem,
    TransientBackendError,
)
from ttalign.reward_clients.base import RewardClientError, RewardTimeout, RewardUnavailable
from ttalign.reward_clients.composite import CompositeReward, normalize
from ttalign.reward_clients.rules import InvalidConstraintsError, RuleVerifierReward
from ttalign.server.metrics import Metrics

from tests.fakes import FakeReward

CHAT = [{"role": "user", "content": "hi"}]


class ScriptedBackend(BackendReward):
    """Scores by length; fails the first ``failures`` calls the scripted way."""

    def __init__(self, settings: BackendSettings, metrics=None, **behaviour) -> None:
        super().__init__("scripted", settings, metrics)
        self.calls: list[list[str]] = []
        self.failures = behaviour.get("failures", 0)
        self.failure = behaviour.get("failure", "unavailable")
        self.result = behaviour.get("result")
        self.delay = behaviour.get("delay", 0.0)

    async def score_items(self, items: Sequence[ScoringItem]) -> list[float]:
        self.calls.append([i.candidate for i in items])
        attempt = len(self.calls)
        await asyncio.sleep(self.delay)
        if attempt <= self.failures:
            if self.failure == "hang":
                await asyncio.sleep(3600)
            raise TransientBackendError(self.failure, "scripted failure")
        if self.result is not None:
            return self.result
        return [float(len(i.candidate)) for i in items]


def settings(**overrides) -> BackendSettings:
    values = {"timeout_seconds": 1.0, "max_retries": 2, "backoff_seconds": 0.001}
    return BackendSettings(**{**values, **overrides})


async def test_concurrent_calls_share_one_backend_batch() -> None:
    backend = ScriptedBackend(settings(batch_window_ms=50))
    results = await asyncio.gather(
        backend.score(CHAT, ["a", "bb"]),
        backend.score(CHAT, ["ccc"]),
        backend.score(CHAT, ["dddd"]),
    )
    assert results == [[1.0, 2.0], [3.0], [4.0]]
    assert len(backend.calls) == 1 and sorted(backend.calls[0]) == ["a", "bb", "ccc", "dddd"]


async def test_batches_are_capped_at_max_batch_size() -> None:
    backend = ScriptedBackend(settings(batch_window_ms=50, max_batch_size=2))
    results = await asyncio.gather(
        backend.score(CHAT, ["a", "bb", "ccc"]), backend.score(CHAT, ["x"])
    )
    assert results == [[1.0, 2.0, 3.0], [1.0]]
    # A full batch flushes at once, in chunks of at most two.
    assert backend.calls == [["a", "bb"], ["ccc"], ["x"]]


async def test_calls_outside_the_window_are_separate() -> None:
    backend = ScriptedBackend(settings(batch_window_ms=1))
    await backend.score(CHAT, ["a"])
    await backend.score(CHAT, ["b"])
    assert backend.calls == [["a"], ["b"]]


async def test_transient_failures_are_retried() -> None:
    metrics = Metrics()
    backend = ScriptedBackend(settings(), metrics, failures=2)
    assert await backend.score(CHAT, ["abc"]) == [3.0]
    assert len(backend.calls) == 3
    assert metrics.reward_calls.labels("scripted", "ok")._value.get() == 1
    assert metrics.reward_batch_size.labels("scripted")._sum.get() == 1


@pytest.mark.parametrize(
    ("failure", "error"), [("unavailable", RewardUnavailable), ("timeout", RewardTimeout)]
)
async def test_retries_are_bounded_then_name_the_client(failure: str, error: type) -> None:
    metrics = Metrics()
    backend = ScriptedBackend(settings(max_retries=1), metrics, failures=99, failure=failure)
    with pytest.raises(error, match=r"'scripted'.*after 2 attempts") as caught:
        await backend.score(CHAT, ["abc"])
    assert caught.value.client == "scripted" and caught.value.status_code == 503
    assert len(backend.calls) == 2
    assert metrics.reward_calls.labels("scripted", failure)._value.get() == 1


async def test_a_hanging_backend_times_out() -> None:
    backend = ScriptedBackend(
        settings(timeout_seconds=0.05, max_retries=1), failures=99, failure="hang"
    )
    with pytest.raises(RewardTimeout, match="timed out after 2 attempts"):
        await backend.score(CHAT, ["abc"])


@pytest.mark.parametrize("result", [[1.0], [1.0, math.nan], [1.0, 2.0, 3.0], [math.inf, 0.0]])
async def test_partial_answers_raise_instead_of_scoring_zero(result: list[float]) -> None:
    backend = ScriptedBackend(settings(), result=result)
    with pytest.raises(RewardClientError) as caught:
        await backend.score(CHAT, ["a", "b"])
    assert type(caught.value) is RewardClientError and caught.value.status_code == 502


async def test_one_failing_chunk_fails_only_its_callers() -> None:
    backend = ScriptedBackend(settings(batch_window_ms=50, max_batch_size=2, max_retries=0))
    backend.failures = 1  # the first chunk to run fails
    outcomes = await asyncio.gather(
        backend.score(CHAT, ["a"]),
        backend.score(CHAT, ["bb"]),
        backend.score(CHAT, ["ccc"]),
        return_exceptions=True,
    )
    assert backend.calls == [["a", "bb"], ["ccc"]]
    assert isinstance(outcomes[0], RewardUnavailable) and isinstance(outcomes[1], RewardUnavailable)
    assert outcomes[2] == [3.0]


def test_normalizations() -> None:
    assert normalize([1.0, 2.0, 3.0], "minmax") == [0.0, 0.5, 1.0]
    z = normalize([1.0, 2.0, 3.0], "zscore")
    assert z[1] == 0.0 and z[0] == pytest.approx(-z[2]) and z[2] == pytest.approx(1.2247, 1e-3)
    assert normalize([5.0, 5.0], "zscore") == [0.0, 0.0]
    assert normalize([5.0, 5.0], "minmax") == [0.0, 0.0]
    assert normalize([2.0, 7.0], "none") == [2.0, 7.0]


async def test_composite_weights_normalized_components() -> None:
    length = FakeReward(scorer=len, name="length")
    shouting = FakeReward(scorer=lambda c: 100.0 * c.isupper(), name="shout")
    mix = CompositeReward(
        "mix", {"length": (length, 1.0), "shout": (shouting, 3.0)}, normalization="minmax"
    )
    scores = await mix.score(CHAT, ["a", "BB", "ccc"])
    assert scores == [0.0, 0.5 + 3.0, 1.0]
    assert length.batches == [["a", "BB", "ccc"]] and shouting.batches == [["a", "BB", "ccc"]]


async def test_composite_binds_rule_components_to_the_constraints() -> None:
    mix = CompositeReward(
        "mix", {"rules": (RuleVerifierReward(), 1.0), "length": (FakeReward(), 0.0)}, "none"
    )
    bound = mix.bind([{"type": "case", "case": "upper"}])
    assert await bound.score(CHAT, ["YES", "no"]) == [1.0, 0.0]
    with pytest.raises(InvalidConstraintsError):
        mix.bind([])


def test_judge_prompt_says_when_the_reply_is_unfinished() -> None:
    from ttalign.reward_clients.backend import ScoringItem
    from ttalign.reward_clients.judge import judge_messages

    conversation = ({"role": "user", "content": "Tell me a story."},)
    finished = judge_messages(ScoringItem(conversation, "Once upon"), "Be fair.", 1, 9)
    unfinished = judge_messages(ScoringItem(conversation, "Once upon", True), "Be fair.", 1, 9)
    assert "Unfinished" not in finished[1]["content"]
    assert "Unfinished" in unfinished[1]["content"]
    assert unfinished[-1] == finished[-1]  # the same open answer turn


def test_the_retry_policy_states_its_attempts_and_its_longest_call() -> None:
    settings = BackendSettings(timeout_seconds=30, max_retries=2, backoff_seconds=0.2)
    assert settings.attempts() == 3
    assert settings.call_seconds() == pytest.approx(3 * 30 + 0.2 + 0.4)  # the docs' 90.6 s
    assert BackendSettings(max_retries=0).call_seconds() == BackendSettings().timeout_seconds
