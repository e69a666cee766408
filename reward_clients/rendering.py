"""Render a conversation plus a candidate reply the way a reward model was trained to read it.

Reward models are sequence classifiers fine-tuned on chats rendered with their own chat
template, so the candidate goes in as the final assistant turn of that template. The
token ids are what the HTTP and local clients send, so both score the very same input.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from reward_clients.backend import ScoringItem


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
