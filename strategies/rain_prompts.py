"""RAIN's self-evaluation question: the policy judges its own partial reply.

The question names a criterion and two options, good and bad, lettered A and B. It is
asked twice with the letters swapped, so a model that prefers one letter regardless of
meaning cancels out. Rubrics are named; a server replaces any template through its
prompt-overrides file (``{"rain.question": "...", "rain.rubric.harmless": "..."}``).
Placeholders are ``{criterion}``, ``{query}``, ``{reply}``, ``{option_a}`` and
``{option_b}``, filled in one pass.

Everything but the reply is the same for every evaluation of a request, so the built-in
question puts the reply last: the evaluator renders the text before ``{reply}`` (and any
text after it) once per request and ordering, and each evaluation splices only the
reply's token ids in between (:class:`~strategies.rain_evaluation.SelfEvaluator`). An
override may put ``{reply}`` anywhere; one without it gets the reply appended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ttalign.strategies.templates import fill

#: The name an override file gives :data:`QUESTION`.
QUESTION_TEMPLATE_NAME = "rain.question"
#: The question; the reply comes last, so all that precedes it is shared between calls.
QUESTION = (
    "Below is a reply that an AI assistant is still in the middle of writing; it may end "
    "mid-sentence. Judge only what it says so far, not what it has not said yet.\n\n"
    "Criterion: {criterion}\n\n"
    "The user's message:\n{query}\n\n"
    "Which statement describes the reply so far?\n"
    "A: {option_a}\n"
    "B: {option_b}\n"
    "Answer with the single letter A or B.\n\n"
    "The reply so far:\n{reply}"
)
REPLY_PLACEHOLDER = "{reply}"


@dataclass(frozen=True)
class Rubric:
    """A criterion, and the two options that answer it: the good one and the bad one."""

    criterion: str
    good: str
    bad: str


RUBRICS: dict[str, Rubric] = {
    "harmless": Rubric(
        criterion=(
            "could the reply help someone cause harm, or is it hateful, dangerous or "
            "illegal? Turning down a harmful request politely is harmless, and so is a "
            "useful answer to a request that only sounds alarming."
        ),
        good="The reply is harmless.",
        bad="The reply is harmful.",
    ),
    "helpful": Rubric(
        criterion=(
            "does the reply address what the user asked, correctly and clearly, and follow "
            "the user's instructions?"
        ),
        good="The reply is helpful and on track.",
        bad="The reply is unhelpful, wrong or off track.",
    ),
    "honest": Rubric(
        criterion=(
            "is everything the reply states true, and does it admit uncertainty rather "
            "than invent things?"
        ),
        good="The reply is truthful.",
        bad="The reply contains something false or made up.",
    ),
}

#: The option letters, in the order the question lists them.
LETTERS = ("A", "B")


@dataclass(frozen=True)
class EvaluationPrompts:
    """The question and the rubric in force for one request (built-ins plus overrides)."""

    question: str
    rubric: Rubric

    @classmethod
    def for_rubric(cls, name: str, overrides: Mapping[str, str]) -> EvaluationPrompts:
        """The named rubric; a server may override ``rain.question`` and the criterion."""
        rubric = RUBRICS[name]
        criterion = overrides.get(f"rain.rubric.{name}", rubric.criterion)
        return cls(
            overrides.get(QUESTION_TEMPLATE_NAME, QUESTION),
            Rubric(criterion, rubric.good, rubric.bad),
        )

    def around_reply(self, query: str, *, good_first: bool) -> tuple[str, str]:
        """The question's text before the reply and after it (``good_first``: good is A).

        The template is split at ``{reply}`` before it is filled, so a query that contains
        the placeholder's text stays part of the query.
        """
        before, found, after = self.question.partition(REPLY_PLACEHOLDER)
        if not found:
            before, after = before + "\n\n", ""
        first, second = (
            (self.rubric.good, self.rubric.bad)
            if good_first
            else (self.rubric.bad, self.rubric.good)
        )
        values = {
            "criterion": self.rubric.criterion,
            "query": query,
            "option_a": first,
            "option_b": second,
        }
        return fill(before, **values), fill(after, **values)

    def messages(self, query: str, reply: str, *, good_first: bool) -> list[dict[str, str]]:
        """The whole question as one user turn (for people: traces, tests)."""
        before, after = self.around_reply(query, good_first=good_first)
        return [{"role": "user", "content": before + reply + after}]
