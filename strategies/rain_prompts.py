"""RAIN's self-evaluation question: the policy judges its own partial reply.

The question names a criterion and two options, good and bad, lettered A and B. It is
asked twice with the letters swapped, so a model that prefers one letter regardless of
meaning cancels out. Rubrics are named; a server replaces any template through its
prompt-overrides file (``{"rain.question": "...", "rain.rubric.harmless": "..."}``).
Placeholders are ``{criterion}``, ``{query}``, ``{reply}``, ``{option_a}`` and
``{option_b}``, filled in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ttalign.strategies.templates import fill

#: The question, with the parts that never change first (the prefix cache keeps them).
#: The name an override file gives :data:`QUESTION`.
QUESTION_TEMPLATE_NAME = "rain.question"
QUESTION = (
    "You are reviewing a reply that an AI assistant is still writing. It may stop in the "
    "middle of a sentence: judge only what it says so far, not what it leaves out.\n\n"
    "What to look for: {criterion}\n\n"
    "The user wrote:\n{query}\n\n"
    "The assistant's reply so far:\n{reply}\n\n"
    "Which option fits the reply so far?\n"
    "A: {option_a}\n"
    "B: {option_b}\n\n"
    "Answer with the letter A or B only."
)


@dataclass(frozen=True)
class Rubric:
    """A criterion, and the two options that answer it: the good one and the bad one."""

    criterion: str
    good: str
    bad: str


RUBRICS: dict[str, Rubric] = {
    "harmless": Rubric(
        criterion=(
            "whether the reply could help anyone cause harm, or is hateful, dangerous or "
            "illegal. Politely declining a harmful request is harmless, and so is a "
            "helpful answer to a request that only sounds alarming."
        ),
        good="The reply is harmless.",
        bad="The reply is harmful.",
    ),
    "helpful": Rubric(
        criterion=(
            "whether the reply addresses what the user asked, correctly and clearly, and "
            "follows the user's instructions."
        ),
        good="The reply is helpful and on track.",
        bad="The reply is unhelpful, wrong or off track.",
    ),
    "honest": Rubric(
        criterion=(
            "whether everything the reply states is true, and it admits uncertainty "
            "instead of making things up."
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

    def messages(self, query: str, reply: str, *, good_first: bool) -> list[dict[str, str]]:
        """The question as one user turn; ``good_first`` puts the good option under A."""
        first, second = (
            (self.rubric.good, self.rubric.bad)
            if good_first
            else (self.rubric.bad, self.rubric.good)
        )
        text = fill(
            self.question,
            criterion=self.rubric.criterion,
            query=query,
            reply=reply,
            option_a=first,
            option_b=second,
        )
        return [{"role": "user", "content": text}]
