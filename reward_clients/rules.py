"""Rule verifiers: score candidates by the fraction of the request's constraints they meet.

Constraints are data sent with the request (``constraints``), validated into the models
below, a union discriminated by ``type``:

=========== ================================================ ===============================
type        fields                                           satisfied when
=========== ================================================ ===============================
word_count  ``min``, ``max`` (int or null)                   whitespace-separated words
                                                             within [min, max]
char_count  ``min``, ``max`` (int or null)                   characters within [min, max]
keywords    ``required``, ``forbidden`` (lists of str)       every required and no forbidden
                                                             keyword occurs (substring,
                                                             case-insensitive)
regex       ``pattern``, ``must_match`` (default true)       the pattern is found (or, with
                                                             must_match false, is not)
json        (none)                                           the reply, optionally inside a
                                                             ```` ```json ```` fence, parses
case        ``case``: ``lower`` or ``upper``                 every cased letter has that case
                                                             (and there is at least one)
ifeval      ``instruction_id``, ``kwargs`` (object)          IFEval's strict check passes
=========== ================================================ ===============================

Regexes are user data run against model output, so they are capped in length, checked for
nested quantifiers (the classic catastrophic-backtracking shape) and run with a time limit.
The :class:`RuleVerifierReward` registered as ``rules`` has no constraints of its own; the
registry binds it to each request's constraints with :meth:`RuleVerifierReward.bind`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from reward_clients import ifeval_checks
from reward_clients.backend import RewardMetrics
from reward_clients.base import Message

MAX_PATTERN_CHARS = 512
#: Wall-clock limit of one regex search over one candidate.
REGEX_TIMEOUT_SECONDS = 0.05
MAX_CONSTRAINTS = 64

# A group that contains a quantifier and is itself quantified: (a+)+, (\w*x)*, (a|b+){2,}.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*(?:[+*]|\{\d+,?\d*\})\)(?:[+*]|\{\d+,?\d*\})")
_JSON_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)


class InvalidConstraintsError(ValueError):
    """The request's constraints are missing or invalid; ``param`` names the bad field."""

    def __init__(self, message: str, param: str = "constraints") -> None:
        super().__init__(message)
        self.param = param


class _Constraint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def satisfied(self, text: str, prompt: str) -> bool:
        raise NotImplementedError


class _Range(_Constraint):
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, value: int | None, info: Any) -> int | None:
        low = info.data.get("min")
        if value is not None and low is not None and value < low:
            raise ValueError(f"max ({value}) is below min ({low})")
        return value

    def _within(self, count: int) -> bool:
        return (self.min is None or count >= self.min) and (self.max is None or count <= self.max)


class WordCount(_Range):
    type: Literal["word_count"]

    def satisfied(self, text: str, prompt: str) -> bool:
        return self._within(len(text.split()))


class CharCount(_Range):
    type: Literal["char_count"]

    def satisfied(self, text: str, prompt: str) -> bool:
        return self._within(len(text))


class Keywords(_Constraint):
    type: Literal["keywords"]
    required: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    forbidden: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    def satisfied(self, text: str, prompt: str) -> bool:
        lowered = text.lower()
        return all(k.lower() in lowered for k in self.required) and not any(
            k.lower() in lowered for k in self.forbidden
        )


class Regex(_Constraint):
    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)
    must_match: bool = True

    @field_validator("pattern")
    @classmethod
    def _safe_pattern(cls, pattern: str) -> str:
        if _NESTED_QUANTIFIER.search(pattern):
            raise ValueError("nested quantifiers such as (a+)+ are not allowed")
        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return pattern

    def satisfied(self, text: str, prompt: str) -> bool:
        try:
            found = regex.search(self.pattern, text, timeout=REGEX_TIMEOUT_SECONDS) is not None
        except TimeoutError:
            raise InvalidConstraintsError(
                f"the pattern {self.pattern!r} took too long to run; simplify it"
            ) from None
        return found == self.must_match


class Json(_Constraint):
    type: Literal["json"]

    def satisfied(self, text: str, prompt: str) -> bool:
        fenced = _JSON_FENCE.match(text)
        try:
            json.loads(fenced.group(1) if fenced else text)
        except ValueError:
            return False
        return True


class Case(_Constraint):
    type: Literal["case"]
    case: Literal["lower", "upper"]

    def satisfied(self, text: str, prompt: str) -> bool:
        return text.islower() if self.case == "lower" else text.isupper()


class IfEval(_Constraint):
    type: Literal["ifeval"]
    instruction_id: str = Field(min_length=1, max_length=100)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def satisfied(self, text: str, prompt: str) -> bool:
        return ifeval_checks.check_instruction(self.instruction_id, self.kwargs, text, prompt)


Constraint = Annotated[
    WordCount | CharCount | Keywords | Regex | Json | Case | IfEval, Field(discriminator="type")
]
_CONSTRAINT = TypeAdapter(Constraint)


def parse_constraints(raw: Sequence[dict[str, Any]]) -> tuple[_Constraint, ...]:
    """Validate request constraints; raises :class:`InvalidConstraintsError` naming the field."""
    if len(raw) > MAX_CONSTRAINTS:
        raise InvalidConstraintsError(f"at most {MAX_CONSTRAINTS} constraints per request")
    parsed = []
    for index, item in enumerate(raw):
        try:
            constraint = _CONSTRAINT.validate_python(item)
        except ValidationError as exc:
            raise _invalid(index, item, exc) from None
        if isinstance(constraint, IfEval):
            try:
                ifeval_checks.validate_instruction(constraint.instruction_id, constraint.kwargs)
            except ifeval_checks.UnknownInstructionError as exc:
                raise InvalidConstraintsError(
                    str(exc), param=f"constraints[{index}].instruction_id"
                ) from None
            except ValueError as exc:
                raise InvalidConstraintsError(str(exc), f"constraints[{index}].kwargs") from None
        parsed.append(constraint)
    return tuple(parsed)


def _invalid(index: int, item: Any, exc: ValidationError) -> InvalidConstraintsError:
    first = exc.errors()[0]
    location = list(first.get("loc", ()))
    # pydantic puts the union's tag first; clients know fields, not tags.
    if location and isinstance(item, dict) and location[0] == item.get("type"):
        location = location[1:]
    param = f"constraints[{index}]" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in location
    )
    message = first.get("msg", "invalid value")
    if first.get("type") in {"union_tag_invalid", "union_tag_not_found"}:
        message = "type must be one of word_count, char_count, keywords, regex, json, case, ifeval"
        param = f"constraints[{index}].type"
    return InvalidConstraintsError(f"{param}: {message}", param=param)


class RuleVerifierReward:
    """Scores each candidate by the fraction of its constraints satisfied (0 to 1)."""

    def __init__(
        self,
        name: str = "rules",
        constraints: tuple[_Constraint, ...] = (),
        *,
        metrics: Any = None,
    ) -> None:
        self.name = name
        self.constraints = constraints
        self._metrics = metrics

    def bind(self, constraints: Sequence[dict[str, Any]]) -> RuleVerifierReward:
        """A client scoring against ``constraints`` (validated; none is an error)."""
        if not constraints:
            raise InvalidConstraintsError(
                f"the {self.name!r} reward scores against the request's constraints, "
                "but the request sent none"
            )
        return RuleVerifierReward(self.name, parse_constraints(constraints), metrics=self._metrics)

    async def score(
        self, conversation: Sequence[Message], candidates: Sequence[str], *, partial: bool = False
    ) -> list[float]:
        if not self.constraints:
            raise InvalidConstraintsError(f"the {self.name!r} reward has no constraints bound")
        started = time.monotonic()
        prompt = next((m["content"] for m in reversed(conversation) if m.get("role") == "user"), "")
        scores = [
            sum(c.satisfied(text, prompt) for c in self.constraints) / len(self.constraints)
            for text in candidates
        ]
        RewardMetrics(self._metrics).record(
            self.name, "ok", time.monotonic() - started, len(candidates)
        )
        return scores

    async def close(self) -> None:
        return None
