"""DARWIN's mutation prompt, and reading the model's numbered list of rewrites.

The policy model is asked to rewrite an instruction into ``{count}`` clearer versions that
ask for the same thing, as one numbered list. A server replaces the template through its
prompt-overrides file (``{"darwin.mutation": "..."}``); the placeholders are
``{count}`` and ``{instruction}``, filled in one pass.

Reading the list never fails; what it cannot use is replaced by the drawn instruction:

- fewer items than asked (or no list at all) -> the drawn instruction fills the rest;
- more items than asked -> the first ``count`` are used;
- an empty item -> the drawn instruction stands in for it;
- output cut at its token limit -> the last item is dropped (it may stop mid-sentence)
  and the drawn instruction stands in for it, unless a blank line had ended it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ttalign.strategies.templates import fill

#: The name an override file gives :data:`MUTATION`.
MUTATION_TEMPLATE_NAME = "darwin.mutation"
MUTATION = (
    "Below is a task that someone gave to an AI assistant. Do not carry out the task. "
    "Instead, write {count} new versions of it. Every version must ask for exactly the "
    "same result and keep every requirement (lengths, formats, words to use or avoid), "
    "but state it more clearly and precisely than the original does.\n\n"
    'For example, two new versions of the task "write a poem about rain, no more than '
    '40 words" would be:\n'
    "1. Write a short poem of at most 40 words whose subject is rain.\n"
    "2. Compose a poem about rain; keep the whole poem to 40 words or fewer.\n\n"
    "Task:\n{instruction}\n\n"
    "Reply with a numbered list of {count} new versions and nothing else."
)

#: The start of the assistant's reply, written for it: small models that would answer
#: the task instead go on with the list they find begun.
LIST_START = "1."

#: The start of a numbered item: "1." or "1)" at the start of a line, maybe in bold.
_ITEM = re.compile(r"^[ \t>*_#-]*(\d{1,2})[.):][*_]*[ \t]*", re.MULTILINE)


@dataclass(frozen=True)
class Variants:
    """The instructions one mutation produced, and which fallbacks were needed."""

    instructions: tuple[str, ...]
    #: One entry per fallback taken, e.g. ``"missing_item"`` or ``"empty_item"``.
    fallbacks: tuple[str, ...] = ()


def mutation_messages(
    instruction: str, count: int, overrides: Mapping[str, str]
) -> list[dict[str, str]]:
    """The mutation request as a user turn, then the list's start as the assistant's.

    Render it with ``continue_final_message`` so the model goes on from :data:`LIST_START`.
    """
    template = overrides.get(MUTATION_TEMPLATE_NAME, MUTATION)
    return [
        {"role": "user", "content": fill(template, count=str(count), instruction=instruction)},
        {"role": "assistant", "content": LIST_START},
    ]


def parse_variants(text: str, count: int, drawn: str, *, cut_short: bool = False) -> Variants:
    """Exactly ``count`` instructions read from ``text``'s numbered list (see module doc)."""
    items, ended_at_blank_line = _numbered_items(text)
    fallbacks: list[str] = []
    if cut_short and items and not ended_at_blank_line:
        items.pop()
        fallbacks.append("cut_short_item")
    if len(items) > count:
        items = items[:count]
        fallbacks.append("extra_items")
    instructions = []
    for item in items:
        if item:
            instructions.append(item)
        else:
            instructions.append(drawn)
            fallbacks.append("empty_item")
    if not instructions:
        fallbacks.append("no_list")
    fallbacks.extend("missing_item" for _ in range(count - len(instructions)))
    instructions.extend(drawn for _ in range(count - len(instructions)))
    return Variants(tuple(instructions), tuple(fallbacks))


def _numbered_items(text: str) -> tuple[list[str], bool]:
    """The items of the first numbered list counting 1, 2, 3, …, each stripped.

    An item runs until the next number in sequence, so an item may span lines, and a
    number out of sequence (a year, a step inside an item) stays part of the text. The
    last item ends at the first blank line after it; the flag says whether it did.
    """
    starts: list[re.Match[str]] = []
    for match in _ITEM.finditer(text):
        if int(match.group(1)) == len(starts) + 1:
            starts.append(match)
    items = []
    ended_at_blank_line = False
    for i, start in enumerate(starts):
        if i + 1 < len(starts):
            end = starts[i + 1].start()
        else:  # the last item ends at a blank line: what follows is the model talking on
            blank = text.find("\n\n", start.end())
            ended_at_blank_line = blank != -1
            end = len(text) if blank == -1 else blank
        items.append(_clean(text[start.end() : end]))
    return items, ended_at_blank_line


def _clean(item: str) -> str:
    # Models wrap items in quotes or bold markers and leave blank lines between them.
    item = item.strip()
    item = re.sub(r"^(\*\*|__)(.*)\1$", r"\2", item, flags=re.DOTALL).strip()
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
        item = item[1:-1].strip()
    return item
