"""Rule verifiers: score candidates by the fraction of the request's constraints they meet.

Constraints are data sent with the request (``constraints``), validated into the models
below, a union discriminated by ``type``:

=========== ================================================ ===============================
type        fields                                           satisfied when
=========== ================================================ ===============================
word_count  ``min``, ``max`` (int or null)                   whitespace-separated words
                                                             within [min, max]
char_count  ``min``, ``max`` (int or null)                   characters within [min, max]
sentence_   ``min``, ``max`` (int or null)                   sentences (text ending in . ! or
count                                                        ?) within [min, max]
paragraph_  ``min``, ``max`` (int or null)                   paragraphs (blocks separated by
count                                                        blank lines) within [min, max]
keywords    ``required``, ``forbidden`` (lists of str)       every required and no forbidden
                                                             keyword occurs (substring,
                                                             case-insensitive)
regex       ``pattern``, ``must_match`` (default true),      the pattern is found (or, with
            ``min_count``, ``max_count`` (int or null)       must_match false, is not); with
                                                             a count, its non-overlapping
                                                             matches are within the bounds
json        (none)                                           the reply, optionally inside a
                                                             ```` ```json ```` fence, parses
case        ``case``: ``lower`` or ``upper``                 every cased letter has that case
                                                             (and there is at least one)
ifeval      ``instruction_id``, ``kwargs`` (object)          IFEval's strict check passes
=========== ================================================ ===============================

Patterns are user data run against model output, so every regular expression here runs on
RE2 (:mod:`reward_clients.linear_regex`), whose searches take time linear in the reply
whatever the pattern. That makes the usual defences of a backtracking engine unnecessary
(refusing "nested quantifiers" such as ``(a+)+``, a time limit per search): no pattern can
be slow. A pattern RE2 cannot compile (backreferences, lookaround, a program over RE2's
memory budget) is a 400 naming ``constraints[i].pattern``. IFEval instructions need all of
their kwargs (:mod:`reward_clients.ifeval_arguments`), so that each check is deterministic.
Request data is capped in size (:mod:`reward_clients.limits`); a bad constraint is a 400
naming its field.

Checks are CPU work, so :meth:`RuleVerifierReward.score` runs them in a worker thread and
the event loop keeps serving other requests meanwhile. When the call is cancelled (its
client disconnected), the thread stops before its next check.

The :class:`RuleVerifierReward` registered as ``rules`` has no constraints of its own; the
registry binds it to each request's constraints with :meth:`RuleVerifierReward.bind`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from ttalign.reward_clients import ifeval_checks
from ttalign.reward_clients.backend import RewardMetrics
from ttalign.reward_clients.base import Message
from ttalign.reward_clients.limits import (
    MAX_CONSTRAINTS,
    MAX_INSTRUCTION_ID_CHARS,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
    MAX_PATTERN_CHARS,
)
from ttalign.reward_clients.linear_regex import PatternError, compile_pattern, well_formed

_JSON_FENCE = compile_pattern(r"(?s)^\s*```(?:json)?\s*\n(.*?)\n?```\s*$")

Keyword = Annotated[str, Field(min_length=1, max_length=MAX_KEYWORD_CHARS)]


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


_SENTENCE_END = compile_pattern(r"[.!?]+(?:\s|$)")
_BLANK_LINE = compile_pattern(r"\n[ \t]*\n")


class SentenceCount(_Range):
    type: Literal["sentence_count"]

    def satisfied(self, text: str, prompt: str) -> bool:
        pieces = _SENTENCE_END.split(text)
        return self._within(sum(1 for piece in pieces if any(c.isalnum() for c in piece)))


class ParagraphCount(_Range):
    type: Literal["paragraph_count"]

    def satisfied(self, text: str, prompt: str) -> bool:
        return self._within(sum(1 for block in _BLANK_LINE.split(text) if block.strip()))


class Keywords(_Constraint):
    type: Literal["keywords"]
    required: list[Keyword] = Field(default_factory=list, max_length=MAX_KEYWORDS)
    forbidden: list[Keyword] = Field(default_factory=list, max_length=MAX_KEYWORDS)

    def satisfied(self, text: str, prompt: str) -> bool:
        lowered = text.lower()
        return all(k.lower() in lowered for k in self.required) and not any(
            k.lower() in lowered for k in self.forbidden
        )


class Regex(_Constraint):
    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)
    must_match: bool = True
    min_count: int | None = Field(None, ge=0)
    max_count: int | None = Field(None, ge=0)
    _compiled: Any = PrivateAttr(None)

    @field_validator("max_count")
    @classmethod
    def _counts_ordered(cls, value: int | None, info: Any) -> int | None:
        low = info.data.get("min_count")
        if value is not None and low is not None and value < low:
            raise ValueError(f"max_count ({value}) is below min_count ({low})")
        if value is not None and info.data.get("must_match") is False:
            raise ValueError("a count bounds the matches: leave must_match true")
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            raise ValueError(
                f"RE2 cannot compile this pattern ({exc}); patterns run on RE2, which "
                "matches in linear time and so has no backreferences or lookaround"
            ) from None
        return pattern

    def model_post_init(self, context: Any) -> None:
        self._compiled = compile_pattern(self.pattern)

    def satisfied(self, text: str, prompt: str) -> bool:
        if self.min_count is None and self.max_count is None:
            return (self._compiled.search(text) is not None) == self.must_match
        count = sum(1 for _ in self._compiled.finditer(text))
        return (self.min_count is None or count >= self.min_count) and (
            self.max_count is None or count <= self.max_count
        )


class Json(_Constraint):
    type: Literal["json"]

    def satisfied(self, text: str, prompt: str) -> bool:
        fenced = _JSON_FENCE.match(text)
        try:
            json.loads(fenced.group(1) if fenced else text)
        except (ValueError, RecursionError):  # nested deeper than Python parses: not JSON
            return False
        return True


class Case(_Constraint):
    type: Literal["case"]
    case: Literal["lower", "upper"]

    def satisfied(self, text: str, prompt: str) -> bool:
        return text.islower() if self.case == "lower" else text.isupper()


class IfEval(_Constraint):
    type: Literal["ifeval"]
    instruction_id: str = Field(min_length=1, max_length=MAX_INSTRUCTION_ID_CHARS)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def satisfied(self, text: str, prompt: str) -> bool:
        return ifeval_checks.check_instruction(self.instruction_id, self.kwargs, text, prompt)


Constraint = Annotated[
    WordCount
    | CharCount
    | SentenceCount
    | ParagraphCount
    | Keywords
    | Regex
    | Json
    | Case
    | IfEval,
    Field(discriminator="type"),
]
#: Every constraint type, in the order the docs list them.
CONSTRAINT_TYPES = (
    "word_count", "char_count", "sentence_count", "paragraph_count", "keywords", "regex",
    "json", "case", "ifeval",
)  # fmt: skip
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
            constraint = _with_checked_kwargs(index, constraint)
        parsed.append(constraint)
    return tuple(parsed)


def _with_checked_kwargs(index: int, constraint: IfEval) -> IfEval:
    try:
        kwargs = ifeval_checks.validate_instruction(constraint.instruction_id, constraint.kwargs)
    except ifeval_checks.UnknownInstructionError as exc:
        raise InvalidConstraintsError(str(exc), f"constraints[{index}].instruction_id") from None
    except ifeval_checks.InvalidArgumentError as exc:
        raise _invalid_kwargs(index, exc) from None
    return constraint.model_copy(update={"kwargs": kwargs})


def _invalid_kwargs(index: int, exc: ValueError) -> InvalidConstraintsError:
    argument = getattr(exc, "argument", None)
    param = f"constraints[{index}].kwargs" + (f".{argument}" if argument else "")
    return InvalidConstraintsError(f"{param}: {exc}", param=param)


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
        message = f"type must be one of {', '.join(CONSTRAINT_TYPES)}"
        param = f"constraints[{index}].type"
    return InvalidConstraintsError(f"{param}: {message}", param=param)


class _Abandoned(Exception):
    """The caller of a scoring call went away; its worker thread stops early."""


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
        stop = threading.Event()
        try:
            scores = await asyncio.to_thread(self._score_all, prompt, list(candidates), stop)
        except asyncio.CancelledError:
            stop.set()  # nobody waits for the scores: the worker thread stops at its next check
            raise
        RewardMetrics(self._metrics).record(
            self.name, "ok", time.monotonic() - started, len(candidates)
        )
        return scores

    def _score_all(self, prompt: str, candidates: list[str], stop: threading.Event) -> list[float]:
        prompt = well_formed(prompt)
        return [self._fraction_satisfied(well_formed(text), prompt, stop) for text in candidates]

    def _fraction_satisfied(self, text: str, prompt: str, stop: threading.Event) -> float:
        met = 0
        for index, constraint in enumerate(self.constraints):
            if stop.is_set():
                raise _Abandoned
            try:
                met += constraint.satisfied(text, prompt)
            except (PatternError, ifeval_checks.InvalidArgumentError) as exc:
                # Validation catches these; an IFEval argument that compiles alone but not
                # inside IFEval's own pattern only shows here.
                raise _invalid_kwargs(index, exc) from None
        return met / len(self.constraints)

    async def close(self) -> None:
        return None
