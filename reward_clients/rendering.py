"""Render a conversation plus a candidate reply the way a reward model was trained to read it.

Reward models are sequence classifiers fine-tuned on chats rendered with their own chat
template, so the candidate goes in as the final assistant turn of that template. The
token ids are what the HTTP and local clients send, so both score the very same input.

Loading a tokenizer and applying a chat template are CPU work (milliseconds per candidate),
so :func:`render_batch` runs them in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from ttalign.reward_clients.backend import ScoringItem

Rendered = TypeVar("Rendered")


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> Any:
    """The Hugging Face tokenizer at ``name_or_path`` (a local folder; nothing downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def render_ids(tokenizer: Any, item: ScoringItem) -> list[int]:
    """Token ids of the conversation with ``item.candidate`` as the final assistant turn.

    The turn is closed, or left open when the candidate is a partial reply.
    """
    encoded = tokenizer.apply_chat_template(
        item.messages(),
        tokenize=True,
        add_generation_prompt=False,
        continue_final_message=item.partial,
        return_dict=True,
    )
    return list(encoded["input_ids"])


def render_text(tokenizer: Any, item: ScoringItem) -> str:
    """The same rendering as text, for backends that tokenize themselves."""
    return tokenizer.apply_chat_template(
        item.messages(),
        tokenize=False,
        add_generation_prompt=False,
        continue_final_message=item.partial,
    )


async def render_batch(
    tokenizer_path: str,
    items: Sequence[ScoringItem],
    render: Callable[[Any, ScoringItem], Rendered],
) -> list[Rendered]:
    """``render`` (:func:`render_ids` or :func:`render_text`) of every item, in a thread."""

    def render_all() -> list[Rendered]:
        tokenizer = load_tokenizer(tokenizer_path)
        return [render(tokenizer, item) for item in items]

    return await asyncio.to_thread(render_all)
