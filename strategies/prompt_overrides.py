"""The prompt templates a server's ``--prompt-overrides`` file may replace, and its check."""

from __future__ import annotations

from collections.abc import Mapping

from ttalign.strategies.darwin_prompts import MUTATION_TEMPLATE_NAME
from ttalign.strategies.rain_prompts import QUESTION_TEMPLATE_NAME, RUBRICS
from ttalign.strategies.tpo_prompts import DEFAULT_TEMPLATES


def overridable_prompts() -> frozenset[str]:
    """Every template name an override file may use (``tpo.loss``, ``rain.question``, ...)."""
    return frozenset(
        {
            *DEFAULT_TEMPLATES,
            QUESTION_TEMPLATE_NAME,
            *(f"rain.rubric.{name}" for name in RUBRICS),
            MUTATION_TEMPLATE_NAME,
        }
    )


def check_prompt_overrides(overrides: Mapping[str, str]) -> None:
    """Raise ``ValueError`` naming every unknown template and listing the valid ones.

    A misspelt name would otherwise be ignored without a word, and the built-in prompt used.
    """
    valid = overridable_prompts()
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown prompt template(s) {', '.join(unknown)}; "
            f"the valid names are {', '.join(sorted(valid))}"
        )
