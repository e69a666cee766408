"""TPO's prompt templates, and the chat messages built from them.

Every template has a name; a server replaces any of them through its prompt-overrides
file (``{"tpo.update": "..."}``). Placeholders are ``{query}``, ``{chosen}`` and
``{rejected}``; they are filled in one pass, so braces anywhere else (and placeholders
inside the filled-in texts) are left alone.

The loss, gradient and update steps are one growing conversation: the gradient prompt
extends the loss prompt and the update prompt extends the gradient prompt, so vLLM's
prefix cache already holds everything but the newest turn. Within the first turn the
parts least likely to change come first: instructions, the query, the rejected response
(the worst in the cache rarely changes once candidates improve), then the chosen one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from ttalign.strategies.templates import fill

Message = dict[str, str]

#: Built-in templates, by the name a server override uses.
DEFAULT_TEMPLATES: dict[str, str] = {
    "tpo.loss_system": (
        "You review assistant replies. You will see a user's query and two replies to it: "
        "a weaker one and a stronger one. Compare them point by point. Explain what makes "
        "the stronger reply better, then say where it still falls short: mistakes, missing "
        "parts, unclear or needless text, instructions it ignores. Do not answer the query "
        "yourself. Be brief."
    ),
    "tpo.loss_user": (
        "Query:\n{query}\n\nWeaker reply:\n{rejected}\n\nStronger reply:\n{chosen}\n\n"
        "Review the stronger reply against the weaker one."
    ),
    "tpo.revision_loss_system": (
        "You review assistant replies. You will see a user's query and one reply to it. "
        "Go through the reply step by step: say what it does well and where it falls short: "
        "mistakes, missing parts, unclear or needless text, instructions it ignores. Do not "
        "answer the query yourself. Be brief."
    ),
    "tpo.revision_loss_user": "Query:\n{query}\n\nReply:\n{chosen}\n\nReview this reply.",
    "tpo.gradient": (
        "From your review, list concrete changes that would make the stronger reply better. "
        "Give suggestions only; do not write the improved reply."
    ),
    "tpo.revision_gradient": (
        "From your review, list concrete changes that would make the reply better. "
        "Give suggestions only; do not write the improved reply."
    ),
    "tpo.update": (
        "Now write a new reply to the query that keeps what is good and applies your "
        "suggestions. Write only the reply itself, addressed to the user, with no "
        "introduction or comments.\n\nQuery:\n{query}"
    ),
    "tpo.fallback_loss": (
        "The stronger reply is better overall, but it may still contain mistakes, miss parts "
        "of the query, or be unclear."
    ),
    "tpo.fallback_gradient": (
        "Make the reply more accurate, complete and clear; follow every instruction in the "
        "query exactly; remove anything unnecessary."
    ),
}


@dataclass(frozen=True)
class TPOPrompts:
    """The templates in force for one request: the built-ins, with server overrides."""

    loss_system: str
    loss_user: str
    revision_loss_system: str
    revision_loss_user: str
    gradient: str
    revision_gradient: str
    update: str
    fallback_loss: str
    fallback_gradient: str

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, str]) -> TPOPrompts:
        """Built-in templates, each replaced by ``overrides["tpo.<name>"]`` when present."""
        return cls(
            **{
                f.name: overrides.get(f"tpo.{f.name}", DEFAULT_TEMPLATES[f"tpo.{f.name}"])
                for f in fields(cls)
            }
        )

    def loss_messages(self, query: str, chosen: str, rejected: str | None) -> list[Message]:
        """The loss step: compare chosen with rejected, or critique chosen alone (``None``)."""
        if rejected is None:
            system, user = self.revision_loss_system, self.revision_loss_user
        else:
            system, user = self.loss_system, self.loss_user
        values = {"query": query, "chosen": chosen, "rejected": rejected or ""}
        return [
            {"role": "system", "content": fill(system, **values)},
            {"role": "user", "content": fill(user, **values)},
        ]

    def gradient_messages(
        self, loss_messages: list[Message], loss: str, *, revision: bool
    ) -> list[Message]:
        """The gradient step: the loss conversation plus a request for suggestions."""
        request = self.revision_gradient if revision else self.gradient
        return [
            *loss_messages,
            {"role": "assistant", "content": loss},
            {"role": "user", "content": request},
        ]

    def update_messages(
        self, gradient_messages: list[Message], gradient: str, query: str
    ) -> list[Message]:
        """The update step: the gradient conversation plus a request for a new response."""
        return [
            *gradient_messages,
            {"role": "assistant", "content": gradient},
            {"role": "user", "content": fill(self.update, query=query)},
        ]


def render_query(messages: tuple[Message, ...] | list[Message]) -> str:
    """The request's conversation as text for the feedback prompts.

    A lone user message is the query itself; anything longer becomes a transcript with
    role labels, so critiques see the system prompt and earlier turns too.
    """
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)
