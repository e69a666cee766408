"""Request schema of ``POST /v1/completions``: OpenAI's text completions, as vLLM serves them."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator
from ttalign.engine.base import Prompt
from ttalign.server.protocol import SamplingRequest, TokenId

#: Completions fields that would change the answer but are not served.
UNSUPPORTED_COMPLETION_FIELDS = {
    "suffix": "text insertion before a suffix",
    "prompt_embeds": "prompt embeddings",
}


class CompletionRequest(SamplingRequest):
    """A text completion: one prompt (text or token ids) or a batch of them."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="A text, a list of token ids, or a batch of either (one list of them)."
    )
    echo: bool = Field(False, description="Start each choice's text with its prompt's.")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Report each token's logprob and this many alternatives."
    )
    best_of: int | None = Field(None, ge=1)

    unsupported_fields: ClassVar[dict[str, str]] = UNSUPPORTED_COMPLETION_FIELDS

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt_shape(cls, prompt: object) -> object:
        # One clear message, instead of pydantic's one per member of the union.
        def token_ids(value: object) -> bool:
            return isinstance(value, list) and all(type(t) is int and t >= 0 for t in value)

        if (
            isinstance(prompt, str)
            or token_ids(prompt)
            or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
            or (isinstance(prompt, list) and all(token_ids(p) for p in prompt))
        ):
            return prompt
        raise ValueError(
            "must be a text, a list of token ids (integers from 0), or a batch: a list of "
            "texts or a list of token id lists"
        )

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            batch = [prompt]
        else:
            batch = prompt
        if not batch:
            raise ValueError("must hold at least one prompt")
        if any(len(p) == 0 for p in batch):
            raise ValueError("prompts must not be empty")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(
                f"best_of ({best_of}) other than n ({n}) is served by the best_of_n strategy "
                'with a reward: send strategy "best_of_n" and strategy_config {"n": '
                f"{best_of}}}"
            )
        return best_of

    def prompts(self) -> list[Prompt]:
        """The batch of prompts, each a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def logprob_count(self) -> int | None:
        return self.logprobs
