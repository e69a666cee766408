"""Text completion serving (``POST /v1/completions``), as ``vllm serve`` answers it.

Each prompt of a batch runs as its own request through the chat service's machinery (its
own strategy run, budget and metrics), with the prompt sent to the engine as it is. Choice
``i * n + j`` is the j-th choice of the i-th prompt, as in vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

from ttalign.engine.base import TokenLogprob
from ttalign.server.completion_protocol import CompletionRequest
from ttalign.server.errors import InvalidRequestError
from ttalign.server.responses import DONE_FRAME, ResponseHeader, sse
from ttalign.server.serving import ChatCompletionService, PreparedRequest, client_error
from ttalign.strategies.base import ChoiceResult, DeltaEvent, ProgressEvent, StrategyResult
from ttalign.strategies.merging import merge_tagged


def completion_logprobs(
    logprobs: tuple[TokenLogprob, ...] | None, text_offset: int
) -> dict[str, Any] | None:
    """Logprobs in the completions API's shape, the first token at ``text_offset``."""
    if logprobs is None:
        return None
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{lp.token: lp.logprob, **dict(lp.top)} for lp in logprobs],
        "text_offset": offsets,
    }


def text_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


class TextCompletionService:
    """Serves ``/v1/completions`` on top of the chat service."""

    def __init__(self, chat: ChatCompletionService) -> None:
        self.chat = chat
        self.settings = chat.settings

    async def prepare(
        self,
        request: CompletionRequest,
        affinity_key: str | None = None,
        *,
        client_trace: Mapping[str, str] | None = None,
    ) -> list[PreparedRequest]:
        """Validate the request and prepare one run per prompt (400s name the param)."""
        prompts = request.prompts()
        if len(prompts) > self.settings.max_prompts:
            raise InvalidRequestError(
                f"{len(prompts)} prompts were sent, but this server accepts at most "
                f"{self.settings.max_prompts} per request.",
                param="prompt",
                code="invalid_value",
            )
        if request.echo and request.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs would need the prompt's own logprobs, which this server "
                "does not compute: send one without the other.",
                param="echo",
            )
        header = ResponseHeader.text_completion(self.chat.engine.model_name)
        texts = [p if isinstance(p, str) else await self._decode(p) for p in prompts]
        return [
            self.chat.prepare(
                request,
                affinity_key,
                completion=(text, prompt),
                header=header,
                client_trace=client_trace,
            )
            for text, prompt in zip(texts, prompts, strict=True)
        ]

    async def _decode(self, token_ids: list[int]) -> str:
        """A token-id prompt's text (for reward clients and echo); 400 for ids the model's
        tokenizer cannot decode."""
        try:
            return await self.chat.engine.decode(token_ids)
        except (ValueError, TypeError, OverflowError, IndexError, KeyError) as exc:
            raise InvalidRequestError(
                f"prompt holds token ids this model's tokenizer cannot decode ({exc}).",
                param="prompt",
            ) from None

    async def complete(self, runs: list[PreparedRequest]) -> dict[str, Any]:
        """Run every prompt (concurrently) to the JSON response."""
        tasks = [asyncio.ensure_future(self.chat.run(run)) for run in runs]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one prompt failed: the others' work is abandoned
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        choices = []
        for i, (run, result) in enumerate(zip(runs, results, strict=True)):
            echo = _echo(run)
            choices += [
                text_choice(
                    i * run.request.n + j,
                    echo + choice.text,
                    choice.finish_reason,
                    _choice_logprobs(run, choice, len(echo)),
                )
                for j, choice in enumerate(result.choices)
            ]
        header = runs[0].header
        return {
            "id": header.id,
            "object": "text_completion",
            "created": header.created,
            "model": header.model,
            "choices": choices,
            "usage": await self._usage(runs, results),
            "alignment": self._alignment(runs, results),
        }

    async def stream(self, runs: list[PreparedRequest]) -> AsyncIterator[str]:
        """Stream every prompt's choices as they come, up to and including ``[DONE]``."""
        request, header = runs[0].request, runs[0].header
        include_usage = request.include_usage()
        usage_field = {"usage": None} if include_usage else {}
        results: list[StrategyResult | None] = [None] * len(runs)
        offsets: dict[int, int] = {}  # choice index -> characters sent so far

        def chunk(index: int, run: PreparedRequest, text: str, finish: str | None, lps) -> str:
            sent = text
            if index not in offsets:  # a choice's first chunk carries its echoed prompt
                echo = _echo(run)
                sent, offsets[index] = echo + text, len(echo)
            logprobs = completion_logprobs(lps, offsets[index]) if _wants(run) else None
            offsets[index] += len(text)
            return sse(header.chunk([text_choice(index, sent, finish, logprobs)], **usage_field))

        try:
            async with aclosing(merge_tagged([self.chat.events(run) for run in runs])) as events:
                async for i, event in events:
                    run, first = runs[i], i * runs[i].request.n
                    if isinstance(event, ProgressEvent):
                        data = {**event.data, "prompt_index": i} if len(runs) > 1 else event.data
                        yield sse(header.chunk([], alignment_progress=data, **usage_field))
                    elif isinstance(event, DeltaEvent):
                        d = event.delta
                        finish = None if d.finish_reason == "abort" else d.finish_reason
                        yield chunk(first + d.index, run, d.text, finish, d.logprobs)
                    else:
                        results[i] = event.result
                        if not event.streamed:
                            for j, c in enumerate(event.result.choices):
                                yield chunk(first + j, run, c.text, c.finish_reason, c.logprobs)
            done = [r for r in results if r is not None]
            tail: dict[str, Any] = {"alignment": self._alignment(runs, done)}
            if include_usage:
                tail["usage"] = await self._usage(runs, done)
            yield sse(header.chunk([], **tail))
        except Exception as exc:  # the strategy's (already API errors) or shaping the tail's
            yield sse(client_error(exc).body())
        yield DONE_FRAME

    async def _usage(self, runs: list[PreparedRequest], results: list[StrategyResult]):
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for run, result in zip(runs, results, strict=True):
            for key, value in (await self.chat.response_usage(run, result)).items():
                total[key] += value
        return total

    def _alignment(self, runs: list[PreparedRequest], results: list[StrategyResult]) -> Any:
        """One prompt's ``alignment`` object; a batch's, one per prompt in a list."""
        each = [self.chat.alignment(r, res) for r, res in zip(runs, results, strict=True)]
        return each[0] if len(each) == 1 else each


def _echo(run: PreparedRequest) -> str:
    request = run.request
    assert isinstance(request, CompletionRequest)
    return run.context.request.messages[0]["content"] if request.echo else ""


def _wants(run: PreparedRequest) -> bool:
    return run.request.logprob_count() is not None


def _choice_logprobs(run: PreparedRequest, choice: ChoiceResult, offset: int):
    return completion_logprobs(choice.logprobs, offset) if _wants(run) else None
