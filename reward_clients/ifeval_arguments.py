"""The arguments (``kwargs``) of IFEval's instruction checkers: which are required, their
types and their size limits.

if-verifiable's checker builders replace an argument that is left out, and some invalid
ones (a negative count, an empty keyword list, an ``nth_paragraph`` outside
``1..num_paragraphs``), with a *random* value, so the same reply could pass one call and
fail the next. Here every argument a checker declares (its ``get_instruction_args_keys()``,
less ``prompt``, which comes from the conversation) is required, and each is validated
below, so the builders never reach their random fallbacks and a check is a pure function
of the reply. The one fallback that valid data reaches, a ``letter`` outside a-z (IFEval's
own data asks for ``#`` and ``!``), is undone by :mod:`reward_clients.ifeval_checks`, which
counts the character asked for. Unknown arguments are refused rather than ignored.
``None`` counts as left out (IFEval's published data pads every instruction's ``kwargs``
with the other instructions' names set to null).

Some arguments are regular expressions to IFEval's checkers, which search them, or splice
them into their own patterns; those must compile under RE2
(:mod:`reward_clients.linear_regex`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ttalign.reward_clients.limits import (
    MAX_IFEVAL_COUNT,
    MAX_IFEVAL_KWARGS,
    MAX_IFEVAL_TEXT_CHARS,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
)
from ttalign.reward_clients.linear_regex import PatternError, compile_pattern

#: Arguments that IFEval's checkers use as (parts of) regular expressions.
PATTERN_ARGUMENTS = frozenset(
    {"keywords", "keyword", "forbidden_words", "section_spliter", "postscript_marker"}
)

Count = Annotated[int, Field(ge=0, le=MAX_IFEVAL_COUNT)]
Relation = Literal["less than", "at least"]
Word = Annotated[str, Field(min_length=1, max_length=MAX_KEYWORD_CHARS)]
WordList = Annotated[list[Word], Field(min_length=1, max_length=MAX_KEYWORDS)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_IFEVAL_TEXT_CHARS)]


class InvalidArgumentError(ValueError):
    """An instruction's kwargs are unusable; ``argument`` names the bad one, if one is."""

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class _Arguments(BaseModel):
    """Every argument name IFEval's checkers take, with its type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: str | None = None
    relation: Relation | None = None
    num_sentences: Count | None = None
    num_placeholders: Count | None = None
    num_bullets: Count | None = None
    num_highlights: Count | None = None
    num_sections: Count | None = None
    num_paragraphs: Count | None = None
    nth_paragraph: Annotated[int, Field(ge=1, le=MAX_IFEVAL_COUNT)] | None = None
    num_words: Count | None = None
    frequency: Count | None = None
    let_frequency: Count | None = None
    let_relation: Relation | None = None
    capital_frequency: Count | None = None
    capital_relation: Relation | None = None
    letter: Annotated[str, Field(min_length=1, max_length=1)] | None = None
    section_spliter: Word | None = None
    postscript_marker: Word | None = None
    keyword: Word | None = None
    keywords: WordList | None = None
    forbidden_words: WordList | None = None
    first_word: Word | None = None
    end_phrase: Text | None = None
    prompt_to_repeat: Text | None = None

    @field_validator("language")
    @classmethod
    def _known_language(cls, code: str | None) -> str | None:
        from if_verifiable.ifeval.instructions_util import LANGUAGE_CODES

        if code is not None and code not in LANGUAGE_CODES:
            raise ValueError(f"must be one of IFEval's language codes: {', '.join(LANGUAGE_CODES)}")
        return code

    @field_validator(*PATTERN_ARGUMENTS)
    @classmethod
    def _compiles(cls, value: str | list[str] | None) -> str | list[str] | None:
        for pattern in [value] if isinstance(value, str) else value or ():
            try:
                compile_pattern(pattern)
            except PatternError as exc:
                raise ValueError(
                    f"IFEval searches {pattern!r} as a regular expression, "
                    f"which RE2 cannot compile: {exc}"
                ) from None
        return value


def validated(
    instruction_id: str, declared: Sequence[str], kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``kwargs`` checked against the ``declared`` argument names of ``instruction_id``.

    Returns the arguments to build the checker with (validated, null ones dropped); raises
    :class:`InvalidArgumentError` naming the first bad argument.
    """
    raw = dict(kwargs or {})
    if len(raw) > MAX_IFEVAL_KWARGS:
        raise InvalidArgumentError(f"at most {MAX_IFEVAL_KWARGS} kwargs per instruction")
    given = {name: value for name, value in raw.items() if value is not None}
    expected = ", ".join(declared) or "none"
    for name in given:
        if name not in declared:
            raise InvalidArgumentError(
                f"{name!r} is not an argument of {instruction_id!r} (its arguments: {expected})",
                name,
            )
    for name in declared:
        if name not in given:
            raise InvalidArgumentError(
                f"{instruction_id!r} requires {name!r} (its arguments: {expected}); "
                "IFEval would otherwise pick a random value",
                name,
            )
    try:
        arguments = _Arguments.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = first.get("loc", ())
        argument = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in location
        ).lstrip(".")
        raise InvalidArgumentError(str(first.get("msg")), argument or None) from None
    nth, count = arguments.nth_paragraph, arguments.num_paragraphs
    if nth is not None and count is not None and nth > count:
        raise InvalidArgumentError(
            f"nth_paragraph ({nth}) is above num_paragraphs ({count})", "nth_paragraph"
        )
    return arguments.model_dump(exclude_none=True)
