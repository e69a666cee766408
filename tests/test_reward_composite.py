"""Composite rewards: normalization parameters are fixed per request, so calls compare."""

from __future__ import annotations

import math

import pytest
from ttalign.reward_clients.composite import CompositeReward
from ttalign.reward_clients.normalization import Scaler
from ttalign.reward_clients.rules import RuleVerifierReward

from tests.fakes import FakeReward

CHAT = [{"role": "user", "content": "hi"}]


def mix(normalization: str = "zscore") -> CompositeReward:
    length = FakeReward(scorer=len, name="length")
    vowels = FakeReward(scorer=lambda c: sum(ch in "aeiou" for ch in c), name="vowels")
    return CompositeReward(
        "mix", {"length": (length, 1.0), "vowels": (vowels, 2.0)}, normalization=normalization
    )


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
async def test_equal_raw_scores_get_equal_composite_scores_across_calls(
    normalization: str,
) -> None:
    request = mix(normalization).bind([])
    first = await request.score(CHAT, ["a", "bee", "cello", "dd"])
    # TPO's later rounds: fewer candidates, other spreads, some repeats.
    second = await request.score(CHAT, ["bee", "zzzzzzzzzz"])
    third = await request.score(CHAT, ["cello"])
    assert second[0] == first[1]
    assert third[0] == first[2]
    # Each call calibrated on itself would have scored "bee" differently the second time.
    unbound = mix(normalization)
    assert (await unbound.score(CHAT, ["bee", "zzzzzzzzzz"]))[0] != first[1]


async def test_the_first_call_with_spread_is_plain_zscore_and_minmax() -> None:
    candidates = ["a", "bee", "cello", "dd"]
    z = await mix("zscore").bind([]).score(CHAT, candidates)
    lengths = [1.0, 3.0, 5.0, 2.0]
    vowels = [1.0, 2.0, 2.0, 0.0]

    def zscore(values: list[float]) -> list[float]:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return [(v - mean) / std for v in values]

    expected = [a + 2 * b for a, b in zip(zscore(lengths), zscore(vowels), strict=True)]
    assert z == pytest.approx(expected)
    m = await mix("minmax").bind([]).score(CHAT, candidates)
    assert m == pytest.approx([0.0 + 2 * 0.5, 0.5 + 2 * 1.0, 1.0 + 2 * 1.0, 0.25 + 0.0])


async def test_a_tied_first_call_scores_zero_and_stays_consistent() -> None:
    request = mix("zscore").bind([])
    assert await request.score(CHAT, ["ab"]) == [0.0]  # a lone candidate has no spread
    later = await request.score(CHAT, ["ab", "abcd"])
    assert later[0] == 0.0  # "ab" is the calibration's center for both components
    assert later[1] > 0.0


def test_scaler_parameters_are_fixed_by_the_first_calls() -> None:
    scaler = Scaler("zscore")
    assert scaler([5.0, 5.0]) == [0.0, 0.0]
    assert (scaler.center, scaler.scale) == (5.0, None)
    assert scaler([5.0, 7.0]) == [0.0, pytest.approx(2 / math.sqrt(2))]
    assert scaler([7.0, 100.0])[0] == pytest.approx(2 / math.sqrt(2))
    ties = Scaler("zscore")
    assert ties([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]  # no spread invented from rounding
    assert ties.scale is None
    minmax = Scaler("minmax")
    assert minmax([2.0, 4.0, 6.0]) == [0.0, 0.5, 1.0]
    assert minmax([0.0, 10.0]) == [-0.5, 2.0]  # outside [0, 1] is fine, the mapping is fixed
    assert Scaler("none")([3.0, -1.0]) == [3.0, -1.0]


async def test_each_bind_calibrates_afresh() -> None:
    composite = mix("minmax")
    one = composite.bind([])
    await one.score(CHAT, ["a", "abcdefgh"])
    other = composite.bind([])
    assert await other.score(CHAT, ["abc", "abcdef"]) == await composite.score(
        CHAT, ["abc", "abcdef"]
    )


async def test_bound_rules_component_inside_a_calibrated_composite() -> None:
    composite = CompositeReward(
        "mix", {"rules": (RuleVerifierReward(), 1.0), "length": (FakeReward(), 1.0)}, "minmax"
    )
    request = composite.bind([{"type": "case", "case": "upper"}])
    first = await request.score(CHAT, ["YES", "no", "MAYBE SO"])
    again = await request.score(CHAT, ["MAYBE SO"])
    assert again == [first[2]]
