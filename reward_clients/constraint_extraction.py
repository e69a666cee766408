"""Constraint extraction: a model turns a request's explicit instructions into rule constraints.

The model reads the user's request and writes a JSON array of ttalign's *generic* constraint
kinds (word, sentence and paragraph counts, character counts, keywords, regular expressions
with match counts, JSON, letter case); the rule verifiers of :mod:`reward_clients.rules`
then check replies against them. IFEval's instruction ids are never accepted from the model
(the ``ifeval`` kind is dropped), so a reward built on extraction never sees the metric it
may be evaluated with.

The answer turn is pre-filled with ``[`` and decoded greedily. Whatever the model writes is
parsed leniently: an array cut short by ``max_tokens`` keeps its complete items, and each
item is validated on its own, so one bad constraint costs only itself. A request from which
nothing checkable comes out gives an empty tuple; the caller decides how to degrade.

Extractions are cached per request text (bounded, least recently used first out), and
concurrent extractions of the same text share one engine call. The engine call is metered
into the requesting task's budget, like the judge's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ttalign.engine.metering import ScoringMeter
from ttalign.reward_clients.engine_calls import greedy_continuation
from ttalign.reward_clients.request_cache import SharedCache, text_key
from ttalign.reward_clients.rules import (
    InvalidConstraintsError,
    parse_constraints,
)

#: The kinds the model may produce: every generic kind, never ``ifeval``.
EXTRACTABLE_KINDS = (
    "word_count", "sentence_count", "paragraph_count", "char_count", "keywords", "regex",
    "json", "case",
)  # fmt: skip
MAX_EXTRACTED = 8
MAX_REQUEST_CHARS = 4000

INSTRUCTIONS = """\
You turn a writing request into machine-checkable rules. Read the request and list only the \
requirements it states explicitly about the form of the reply: length, number of sentences \
or paragraphs, words or phrases that must or must not appear, patterns such as titles, \
bullet points, highlighted parts, placeholders, a required ending or beginning, JSON output, \
and all-lowercase or all-uppercase text. Ignore requirements about content or quality that \
a pattern cannot check. Never guess numbers the request does not give.

Write a JSON array. Each rule is one object of these kinds:
{"type": "word_count", "min": N, "max": N}          (either bound may be omitted)
{"type": "sentence_count", "min": N, "max": N}
{"type": "paragraph_count", "min": N, "max": N}    (paragraphs are separated by blank lines)
{"type": "char_count", "min": N, "max": N}
{"type": "keywords", "required": ["..."], "forbidden": ["..."]}   (case-insensitive substrings)
{"type": "regex", "pattern": "...", "must_match": true|false, "min_count": N, "max_count": N}
{"type": "json"}
{"type": "case", "case": "lower" | "upper"}
Patterns are RE2 regular expressions: no lookaround, no backreferences; \\A and \\z anchor \
the whole reply, (?m)^ a line, (?i) ignores case. Write [] when nothing is checkable."""

EXAMPLE_REQUEST = (
    "Describe an old lighthouse in exactly 4 paragraphs and fewer than 150 words. Don't use "
    "the word sea. Give it a title wrapped in double angular brackets, like <<title>>, and "
    "finish with the phrase 'Any questions?'."
)
EXAMPLE_RULES: list[dict[str, Any]] = [
    {"type": "paragraph_count", "min": 4, "max": 4},
    {"type": "word_count", "max": 149},
    {"type": "regex", "pattern": r"(?i)\bsea\b", "must_match": False},
    {"type": "regex", "pattern": r"<<[^<>\n]+>>", "min_count": 1},
    {"type": "regex", "pattern": r"Any questions\?\s*\z"},
]


def extraction_messages(request: str) -> list[dict[str, str]]:
    """The extraction chat: instructions, one worked example, the request, the open answer."""
    return [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": f"Request:\n{EXAMPLE_REQUEST}"},
        {"role": "assistant", "content": json.dumps(EXAMPLE_RULES)},
        {"role": "user", "content": f"Request:\n{request[:MAX_REQUEST_CHARS]}"},
        {"role": "assistant", "content": "["},
    ]


def parse_extracted(continuation: str) -> tuple[Any, ...]:
    """The valid generic constraints in the model's continuation of ``[``, deduplicated."""
    kept: list[Any] = []
    seen: set[str] = set()
    for item in _json_items("[" + continuation):
        if not isinstance(item, dict) or item.get("type") not in EXTRACTABLE_KINDS:
            continue
        try:
            (constraint,) = parse_constraints([item])
        except InvalidConstraintsError:
            continue
        key = constraint.model_dump_json()
        if key not in seen:
            seen.add(key)
            kept.append(constraint)
        if len(kept) == MAX_EXTRACTED:
            break
    return tuple(kept)


def _json_items(text: str) -> list[Any]:
    """The items of the JSON array at the start of ``text``; of an array cut short, the
    items that are complete."""
    decoder = json.JSONDecoder()
    try:
        value, _ = decoder.raw_decode(text)
        return value if isinstance(value, list) else []
    except ValueError:
        pass
    items: list[Any] = []
    position = 1
    while position < len(text):
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except ValueError:
            break
        items.append(item)
    return items


class ConstraintExtractor:
    """Extracts (and caches) the constraints of request texts with one engine."""

    def __init__(self, engine: Any, *, max_tokens: int = 256, cache_size: int = 1024) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self._cache: SharedCache[tuple[Any, ...]] = SharedCache(cache_size)

    async def extract(self, request: str, meter: ScoringMeter | None = None) -> tuple[Any, ...]:
        """The constraints of ``request`` (cached; concurrent calls share one extraction)."""
        return await self._cache.get(text_key(request), lambda: self._run(request, meter))

    async def _run(self, request: str, meter: ScoringMeter | None) -> tuple[Any, ...]:
        text = await greedy_continuation(
            self.engine, extraction_messages(request), max_tokens=self.max_tokens, meter=meter
        )
        return parse_extracted(text)


def last_user_text(conversation: Sequence[dict[str, str]]) -> str:
    """The request to extract from: the conversation's last user message."""
    return next((m["content"] for m in reversed(conversation) if m.get("role") == "user"), "")
