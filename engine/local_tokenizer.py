"""The model's tokenizer and chat template, run in-process and off the event loop.

Both engines render chats here: the in-process one with the tokenizer vLLM loaded, the
remote one with the same model folder's tokenizer, so the token ids a strategy sees do
not depend on where the model runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttalign.engine.base import EngineRequestError, EngineStartupError

#: The ``generation_config.json`` fields that ``vllm serve`` uses as sampling defaults.
SAMPLING_DEFAULT_KEYS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "max_tokens",
    }
)


class LocalTokenizer:
    """Renders chats and (de)tokenizes with a Hugging Face tokenizer, in worker threads."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._token_texts: dict[int, str] = {}

    @classmethod
    def load(cls, model_path: str, chat_template: str | None = None) -> LocalTokenizer:
        """The tokenizer of the model folder ``model_path`` (never downloads)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EngineStartupError(
                f"cannot load the tokenizer of {model_path!r}: {exc}. In remote mode the "
                "gateway renders chats itself: --model must be a folder with the served "
                "model's tokenizer files."
            ) from None
        return cls(tokenizer, chat_template)

    async def render_chat(
        self, messages: Sequence[dict[str, str]], continue_final_message: bool = False
    ) -> list[int]:
        # A long conversation takes seconds to render and tokenize; the event loop serves
        # every other stream meanwhile.
        return await asyncio.to_thread(self._render_chat, messages, continue_final_message)

    async def count_tokens(self, text: str) -> int:
        return len(await self.tokenize(text))

    async def tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=False)

    async def encode_prompt(self, text: str) -> list[int]:
        """A text prompt's ids, special tokens included as the model expects them."""
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def decode(self, token_ids: Sequence[int]) -> str:
        return await asyncio.to_thread(
            self.tokenizer.decode, list(token_ids), skip_special_tokens=True
        )

    def token_text(self, token_id: int) -> str:
        """One token's text (for log-probability alternatives, decoded on the event loop:
        each distinct id is decoded once, since a stream repeats them many times over)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _render_chat(
        self, messages: Sequence[dict[str, str]], continue_final_message: bool
    ) -> list[int]:
        from jinja2 import TemplateError

        try:
            rendered = self.tokenizer.apply_chat_template(
                list(messages),
                tokenize=True,
                chat_template=self.chat_template,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
            )
        except (TemplateError, ValueError) as exc:
            # Templates refuse conversations they cannot render (raise_exception), and
            # transformers raises ValueError for ones it cannot apply the template to.
            raise EngineRequestError(
                f"The model's chat template refused these messages: {exc}", param="messages"
            ) from None
        # transformers 5 returns a BatchEncoding-like mapping; older versions a list.
        ids = (
            rendered["input_ids"]
            if isinstance(rendered, dict) or hasattr(rendered, "keys")
            else rendered
        )
        return list(ids)


class RendersLocally:
    """The text half of an engine, for engines that keep a :class:`LocalTokenizer` in
    ``self._text``: rendering, counting, tokenizing and decoding never leave the process."""

    _text: LocalTokenizer

    async def render_chat(
        self, messages: Sequence[dict[str, str]], *, continue_final_message: bool = False
    ) -> list[int]:
        return await self._text.render_chat(messages, continue_final_message)

    async def count_tokens(self, text: str) -> int:
        return await self._text.count_tokens(text)

    async def tokenize(self, text: str) -> list[int]:
        return await self._text.tokenize(text)

    async def decode(self, token_ids: Sequence[int]) -> str:
        return await self._text.decode(token_ids)


def load_chat_template(path: str) -> str:
    """Read and parse a chat template file, so a bad one fails at start, not per request."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        template = Path(path).read_text()
        ImmutableSandboxedEnvironment().parse(template)
    except OSError as exc:
        raise EngineStartupError(f"--chat-template {path}: {exc.strerror}") from None
    except TemplateSyntaxError as exc:
        raise EngineStartupError(
            f"--chat-template {path}: line {exc.lineno}: {exc.message}"
        ) from None
    return template


def eos_ids(tokenizer: Any, configured: object) -> frozenset[int]:
    """The tokenizer's end-of-sequence id plus the model's own (``generation_config.json``)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = {int(eos)} if eos is not None else set()
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    return frozenset(ids)


def generation_config(model_path: str) -> dict[str, Any]:
    """The model folder's ``generation_config.json`` ({} without one)."""
    path = Path(model_path) / "generation_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def folder_sampling_defaults(config: dict[str, Any]) -> dict[str, float | int]:
    """Sampling defaults from a ``generation_config.json``, named as ``vllm serve`` names
    them (Hugging Face's ``max_new_tokens`` is ``max_tokens``)."""
    renamed = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in config.items()}
    return {
        k: v
        for k, v in renamed.items()
        if k in SAMPLING_DEFAULT_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }
