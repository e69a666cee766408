"""Builders for OpenAI-shaped responses, stream chunks and SSE frames.

Plain dicts serialised with ``json.dumps``: this is the per-token hot path of streaming.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ttalign.engine.base import TokenLogprob
from ttalign.strategies.base import ChoiceResult

DONE_FRAME = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def logprobs_content(logprobs: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": tok, "logprob": value, "bytes": list(tok.encode())}
                    for tok, value in lp.top
                ],
            }
            for lp in logprobs
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class ResponseHeader:
    """The fields every response and chunk of one request share."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    #: The ``object`` of stream chunks: chat's, or ``text_completion`` for completions.
    chunk_object: str = "chat.completion.chunk"

    @classmethod
    def text_completion(cls, model: str) -> ResponseHeader:
        """The header of a ``/v1/completions`` response (its chunks are ``text_completion``)."""
        return cls(model, id=f"cmpl-{uuid.uuid4().hex}", chunk_object="text_completion")

    def completion(
        self,
        choices: list[ChoiceResult],
        usage_: dict[str, int],
        alignment: dict[str, Any],
        want_logprobs: bool,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": choice.text},
                    "logprobs": logprobs_content(choice.logprobs) if want_logprobs else None,
                    "finish_reason": choice.finish_reason,
                }
                for i, choice in enumerate(choices)
            ],
            "usage": usage_,
            "alignment": alignment,
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def delta_choice(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: tuple[TokenLogprob, ...] | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs_content(logprobs),
        "finish_reason": finish_reason,
    }
