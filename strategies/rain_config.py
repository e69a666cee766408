"""RAIN's settings, validated from a request's ``strategy_config``.

Every default is the reference implementation's number (SafeAILab/RAIN).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from ttalign.engine.base import MAX_TOP_LOGPROBS
from ttalign.reward_clients.registry import RewardName
from ttalign.strategies.base import StrategyConfig
from ttalign.strategies.rain_tree import TreeSettings


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
    max_iterations: int = Field(
        50,
        ge=1,
        le=10_000,
        description="Iterations per commit, counting the visits the committed root brings "
        "along from earlier searches (the reference's accounting).",
    )
    min_new_iterations: int = Field(
        15,
        ge=1,
        le=10_000,
        description="New iterations a commit runs at least, however many visits its root "
        "brings along (the reference's 15); capped at max_iterations.",
    )
    prior_smoothing: float = Field(0.25, ge=0, le=1)
    parallel_leaves: int = Field(
        4,
        ge=1,
        le=64,
        description="Leaves in flight at once (virtual loss); 1 is the reference's loop.",
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

    def new_iterations(self, inherited: int) -> int:
        """Iterations to run before a commit whose root already has ``inherited`` visits.

        The reference runs ``max(maxT, initi + 15) - initi`` of them: the root's visits
        count toward the limit, but every commit searches a little.
        """
        floor = min(self.min_new_iterations, self.max_iterations)
        return max(self.max_iterations - inherited, floor)

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
