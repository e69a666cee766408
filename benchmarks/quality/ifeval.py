"""IFEval (Zhou et al., 2023): prompts carrying instructions a program can verify.

Metrics, as IFEval defines them:

- prompt-level accuracy: the share of prompts whose instructions *all* pass;
- instruction-level accuracy: the share of all instructions (over every prompt) that pass;

each under IFEval's strict check and its loose one, from :mod:`reward_clients.ifeval_checks`
(the same checks the rule-verifier reward uses, so harness and reward agree on a pass).

Every request carries the prompt's instructions as ``constraints`` of type ``ifeval``, so
a rule-verifier reward (``reward="rules"``) can steer by them; other rewards ignore them.

Intervals (:mod:`.intervals`): Wilson's for prompt-level accuracy; for instruction-level
accuracy a bootstrap that resamples prompts, since one prompt's instructions share a reply.

The prefix-checkable subset (suite ``ifeval-prefix``)
-----------------------------------------------------

Search strategies that score *partial* replies (RAIN with ``evaluator: reward``) need
instructions whose check means something before the reply is done. An instruction is
**prefix-checkable** when its strict check can only get stricter as the reply grows: if a
prefix fails, every continuation of it fails too (equivalently, whatever passes, every
prefix of it passed). On such prompts the ``rules`` reward of a partial reply is an upper
bound of the final reply's, and a violation it sees is final. :func:`prefix_checkable`
decides it per instruction from IFEval's checkers (``if-verifiable``), as follows.

Prefix-checkable (violations only accumulate):

- ``punctuation:no_comma``: a comma, once there, stays.
- ``keywords:letter_frequency`` with ``less than``: a character count only grows
  (``str.lower`` is per character for the ASCII letters asked for).
- ``keywords:frequency`` with ``less than``, keyword a literal word: IFEval counts it with
  ``re.findall`` (substring, non-overlapping); occurrences inside the prefix stay.
- ``length_constraints:number_words`` with ``less than``: runs of ``\\w`` only grow in
  number (a word cut in two by the prefix end is counted once either way).
- ``keywords:forbidden_words`` (literal words), ``length_constraints:number_sentences``
  with ``less than``, ``change_case:capital_word_frequency`` with ``less than``: only for
  prefixes that end at a word boundary (what follows is not a letter or digit). Cut inside
  a word they can un-fail: forbidden ``rock`` is in ``Rock`` but not in ``Rocky``; ``I``
  is an all-capital word, ``It`` is not; Punkt splits ``J. S`` in two sentences and
  ``J. Smith`` not. RAIN evaluates replies that end at a clause boundary (its simulation
  stops), at end of sequence, or at ``max_tokens``; only the last may cut a word.

Not prefix-checkable (a failing prefix can still pass):

- ``change_case:english_lowercase`` and ``change_case:english_capital``: the case part
  is monotone, but the check also needs langdetect to call the reply English (and a
  cased letter to exist). Detection on a short prefix flips: measured on this project's
  SmolLM2 replies turned all-lowercase (all-capital), 3.6 % (7.6 %) of the whole-word
  prefixes of replies that pass failed. ``language:response_language`` likewise.
- ``length_constraints:number_paragraphs`` and ``detectable_format:number_bullet_lists``:
  an exact count, reached later; ``length_constraints:nth_paragraph_first_word`` needs
  its paragraph to exist.
- Every ``at least`` count (words, sentences, keywords, letters, capital words).
- Something that must appear: ``keywords:existence``, ``detectable_content:postscript``,
  ``detectable_content:number_placeholders``, ``detectable_format:title``,
  ``detectable_format:number_highlighted_sections``, ``detectable_format:multiple_sections``,
  ``detectable_format:constrained_response``, ``combination:two_responses``.
- The whole reply's shape: ``detectable_format:json_format``, ``startend:quotation``,
  ``startend:end_checker``, ``combination:repeat_prompt`` (a prefix shorter than the prompt
  to repeat fails).

Two more limits: IFEval's check fails an empty reply, so the empty prefix is not a
violation; and only the *strict* check is prefix-checkable (the loose one drops the
reply's first or last line, which moves as the reply grows). The ``rules`` reward uses the
strict check. Of the 390 dev prompts, 44 have only prefix-checkable instructions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttalign.benchmarks.quality.intervals import Interval, bootstrap_ratio, wilson
from ttalign.benchmarks.quality.suites import Item, Metric, Suite, mean
from ttalign.reward_clients.ifeval_checks import check_instruction, check_loose


def _used_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    # IFEval's data lists unused kwargs as None; IFEval itself drops them.
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


#: A keyword IFEval's regex search treats as plain text.
_LITERAL = re.compile(r"[\w '-]+")


def _less_than(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda kwargs: kwargs.get(key) == "less than"


def _literal(*keys: str) -> Callable[[dict[str, Any]], bool]:
    def check(kwargs: dict[str, Any]) -> bool:
        words = [kwargs.get(key) for key in keys]
        words = [w for word in words for w in (word if isinstance(word, list) else [word])]
        return bool(words) and all(isinstance(w, str) and _LITERAL.fullmatch(w) for w in words)

    return check


#: Prefix-checkable instructions (see the module docstring), each with the condition on
#: its kwargs under which it is.
PREFIX_CHECKABLE: dict[str, Callable[[dict[str, Any]], bool]] = {
    "punctuation:no_comma": lambda kwargs: True,
    "keywords:letter_frequency": _less_than("let_relation"),
    "keywords:frequency": lambda kw: _less_than("relation")(kw) and _literal("keyword")(kw),
    "keywords:forbidden_words": _literal("forbidden_words"),
    "length_constraints:number_words": _less_than("relation"),
    "length_constraints:number_sentences": _less_than("relation"),
    "change_case:capital_word_frequency": _less_than("capital_relation"),
}


def prefix_checkable(instruction_id: str, kwargs: dict[str, Any]) -> bool:
    """Whether a prefix of a reply that fails this instruction fails it for good."""
    condition = PREFIX_CHECKABLE.get(instruction_id)
    return condition is not None and condition(kwargs)


class IFEval(Suite):
    name = "ifeval"
    filename = "ifeval_dev.jsonl"
    metrics = (
        Metric("prompt_strict", "prompt-level accuracy, strict"),
        Metric("prompt_loose", "prompt-level accuracy, loose"),
        Metric("instruction_strict", "instruction-level accuracy, strict"),
        Metric("instruction_loose", "instruction-level accuracy, loose"),
    )
    plot_metrics = ("prompt_strict", "instruction_strict")

    def load(self, path: Path) -> list[Item]:
        items = []
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                row = json.loads(line)
                instructions = [
                    (iid, _used_kwargs(kw))
                    for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)
                ]
                items.append(Item(str(row["key"]), row["prompt"], {"instructions": instructions}))
        return items

    def constraints(self, item: Item) -> list[dict[str, Any]]:
        return [
            {"type": "ifeval", "instruction_id": iid, "kwargs": kwargs}
            for iid, kwargs in item.meta["instructions"]
        ]

    def score(self, item: Item, output: str) -> dict[str, Any]:
        instructions = item.meta["instructions"]
        return {
            "instructions": [iid for iid, _ in instructions],
            "strict": [check_instruction(i, kw, output, item.prompt) for i, kw in instructions],
            "loose": [check_loose(i, kw, output, item.prompt) for i, kw in instructions],
        }

    def aggregate(self, scored: list[dict[str, Any]]) -> dict[str, float | None]:
        return ifeval_metrics(scored)

    def intervals(self, scored: list[dict[str, Any]]) -> dict[str, Interval | None]:
        return ifeval_intervals(scored)


class IFEvalPrefixCheckable(IFEval):
    """The IFEval prompts whose every instruction is :func:`prefix_checkable`."""

    name = "ifeval-prefix"

    def load(self, path: Path) -> list[Item]:
        return [
            item
            for item in super().load(path)
            if all(prefix_checkable(iid, kwargs) for iid, kwargs in item.meta["instructions"])
        ]


def ifeval_metrics(scored: list[dict[str, Any]]) -> dict[str, float | None]:
    """Prompt- and instruction-level accuracy from per-prompt ``strict``/``loose`` lists."""
    metrics: dict[str, float | None] = {}
    for mode in ("strict", "loose"):
        per_prompt = [s[mode] for s in scored]
        metrics[f"prompt_{mode}"] = mean([float(all(passes)) for passes in per_prompt])
        metrics[f"instruction_{mode}"] = mean(
            [float(passed) for passes in per_prompt for passed in passes]
        )
    return {m.key: metrics[m.key] for m in IFEval.metrics}


def ifeval_intervals(scored: list[dict[str, Any]]) -> dict[str, Interval | None]:
    """95 % intervals: Wilson's per prompt, a prompt bootstrap per instruction."""
    intervals: dict[str, Interval | None] = {}
    for mode in ("strict", "loose"):
        per_prompt = [s[mode] for s in scored]
        intervals[f"prompt_{mode}"] = wilson(sum(all(p) for p in per_prompt), len(per_prompt))
        intervals[f"instruction_{mode}"] = bootstrap_ratio(
            [sum(p) for p in per_prompt], [len(p) for p in per_prompt]
        )
    return intervals
