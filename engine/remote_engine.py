"""The remote engine: a fleet of vLLM OpenAI servers (or one router in front of them).

Chats are rendered here, with the served model's own tokenizer, and every call goes to
``/v1/completions`` as token ids, so strategies see the same token ids as in-process.
Routing, retries and health checks are the :class:`~engine.replicas.ReplicaPool`'s: every
call of one user request reaches one replica, and a call that fails before anything of it
was returned is retried on another. Closing a call's HTTP request makes vLLM abort it.

``adaptive_temperature`` is served when every replica runs ttalign's logits processor and
routes (``engine.adaptive_replicas``): the heads offered are those all replicas loaded, and
the per-token records are read from the replicas after the call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import httpx
from ttalign.engine.adaptive_replicas import HEADS_PATH, RECORDS_PATH
from ttalign.engine.base import (
    Completion,
    CompletionDelta,
    EngineHealth,
    EngineRequestError,
    EngineStartupError,
    EngineUnavailableError,
    FinishReason,
    Generation,
    Prompt,
    SamplingSettings,
    TemperatureHeadInfo,
    TokenLogprob,
)
from ttalign.engine.local_tokenizer import (
    LocalTokenizer,
    RendersLocally,
    eos_ids,
    folder_sampling_defaults,
    generation_config,
    load_chat_template,
)
from ttalign.engine.replicas import (
    ERROR_BODY_CHARS,
    Replica,
    ReplicaFailure,
    ReplicaPool,
    ReplicasExhausted,
    Routing,
    StreamInterrupted,
    is_retryable_status,
    transport_failure,
)
from ttalign.engine.sampling_rules import SEED_RANGE, greedy_copies
from ttalign.engine.sse_lines import sse_lines
from ttalign.engine.vllm_errors import api_parameter

logger = logging.getLogger(__name__)

#: Text whose token ids are compared with the fleet's at start (words, digits, unicode).
TOKENIZER_PROBE = "Hello, world! Tokenizers differ on 12345 and on naïve café emoji 🙂."
#: vLLM's prefix for log-probability tokens sent as ids (``return_tokens_as_token_ids``).
TOKEN_ID_PREFIX = "token_id:"


class RemoteEngine(RendersLocally):
    """An :class:`~ttalign.engine.base.EngineClient` over vLLM OpenAI servers."""

    def __init__(
        self,
        pool: ReplicaPool,
        text: LocalTokenizer,
        *,
        model_name: str,
        max_model_len: int,
        sampling_defaults: Mapping[str, float | int],
        eos_token_ids: frozenset[int],
        read_timeout: float | None = None,
        temperature_heads: Mapping[str, TemperatureHeadInfo] | None = None,
    ) -> None:
        self.pool = pool
        self._temperature_heads = dict(temperature_heads) if temperature_heads is not None else None
        self._text = text
        self._model_name = model_name
        self._max_model_len = max_model_len
        self._sampling_defaults = dict(sampling_defaults)
        self._eos_token_ids = eos_token_ids
        self._running = 0
        # Unbounded connections: every concurrent engine call holds one while it runs.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=read_timeout, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    @classmethod
    async def connect(
        cls,
        urls: Sequence[str],
        model_path: str,
        *,
        model_name: str | None = None,
        chat_template: str | None = None,
        use_model_defaults: bool = True,
        routing: Routing = "consistent_hash",
        retries: int = 2,
        health_interval: float = 5.0,
        session_header: str | None = "X-Session-ID",
        start_timeout: float = 600.0,
        read_timeout: float | None = None,
        pool_name: str = "engine",
    ) -> RemoteEngine:
        """Wait for the fleet, check it serves ``model_path``'s model, and connect.

        Waits up to ``start_timeout`` seconds for every URL's ``/v1/models``; URLs still
        down then start out of the rotation (the health loop adds them when they come up),
        and none up at all is an :class:`EngineStartupError`. Each answering replica must
        serve ``model_name`` (or, without one, a single model) with one context length,
        and its tokenizer must agree with the local one.
        """
        template = load_chat_template(chat_template) if chat_template else None
        text = await asyncio.to_thread(LocalTokenizer.load, model_path, template)
        pool = ReplicaPool(
            pool_name,
            urls,
            routing=routing,
            retries=retries,
            health_interval=health_interval,
            session_header=session_header,
        )
        async with httpx.AsyncClient(timeout=10.0) as http:
            served = await _wait_for_models(http, pool.replicas, start_timeout)
            name, max_len = _fleet_model(served, model_name)
            for replica in pool.replicas:
                replica.healthy = replica.url in served
            up = [r for r in pool.replicas if r.healthy]
            await asyncio.gather(*(_check_tokenizer(http, r.url, name, text) for r in up))
            heads = await _fleet_temperature_heads(http, up)
        config = generation_config(model_path)
        engine = cls(
            pool,
            text,
            model_name=name,
            max_model_len=max_len,
            sampling_defaults=folder_sampling_defaults(config) if use_model_defaults else {},
            eos_token_ids=eos_ids(text.tokenizer, config.get("eos_token_id")),
            read_timeout=read_timeout,
            temperature_heads=heads,
        )
        # Now, not at the first call: replicas down at start must rejoin on an idle gateway.
        pool.start_health_checks()
        logger.info(
            "remote engine: %s (context %d) on %d of %d replicas: %s",
            name, max_len, len(up), len(urls), ", ".join(r.url for r in up),
        )  # fmt: skip
        return engine

    # --- EngineClient ---------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def sampling_defaults(self) -> Mapping[str, float | int]:
        return self._sampling_defaults

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        copies, request = greedy_copies(sampling)
        ids = await self._prompt_ids(prompt)
        body = self._body(ids, request, stream=False)

        async def attempt(replica: Replica, headers: dict[str, str]) -> Any:
            try:
                response = await self._http.post(
                    f"{replica.url}/v1/completions", json=body, headers=headers
                )
            except httpx.HTTPError as exc:
                raise transport_failure(replica.url, exc) from exc
            _raise_for_status(response.status_code, response.text, replica, sampling)
            try:
                return response.json()
            except ValueError as exc:
                raise ReplicaFailure(f"{replica.url}: answered invalid JSON") from exc

        self._running += 1
        try:
            answer = await self.pool.call(attempt)
        except ReplicasExhausted as exc:
            raise self._unavailable(exc) from None
        finally:
            self._running -= 1
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        completions = tuple(self._completion(c, request) for c in choices)
        if copies > 1:
            completions = tuple(_with_index(completions[0], i) for i in range(copies))
        usage = answer.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return Generation(
            prompt_tokens=int(usage.get("prompt_tokens", len(ids))),
            completions=completions,
            # A replica started with --enable-prompt-tokens-details reports its cache hits
            # (for n > 1: one child's, the only figure vLLM's API gives).
            cached_prefill_tokens=int(details.get("cached_tokens") or 0),
        )

    async def stream(
        self, prompt: Prompt, sampling: SamplingSettings
    ) -> AsyncIterator[CompletionDelta]:
        copies, request = greedy_copies(sampling)
        ids = await self._prompt_ids(prompt)
        body = self._body(ids, request, stream=True)
        self._running += 1
        try:
            stream = self.pool.stream(
                lambda replica, headers: self._stream_once(replica, headers, body, ids, request)
            )
            async with aclosing(stream) as deltas:
                async for delta in deltas:
                    for index in range(copies):
                        yield _with_index(delta, index) if copies > 1 else delta
        except StreamInterrupted as exc:
            raise EngineUnavailableError(
                f"The remote engine serving {self._model_name!r} failed mid-stream ({exc}); "
                "the output so far could not be continued elsewhere."
            ) from None
        except ReplicasExhausted as exc:
            raise self._unavailable(exc) from None
        finally:
            self._running -= 1

    # --- AdaptiveTemperatureEngine -------------------------------------------------------

    @property
    def temperature_heads(self) -> Mapping[str, TemperatureHeadInfo] | None:  # type: ignore[override]
        """The heads every replica loaded; ``None`` when the replicas do not run ttalign's
        processor (``adaptive_temperature`` is then refused with a 400)."""
        return self._temperature_heads

    async def temperature_records(self, keys: Sequence[str]) -> dict[str, list[float]]:
        """The records of ``keys``, from whichever replicas hold them (each one once)."""

        async def ask(replica: Replica) -> dict[str, list[float]]:
            url = f"{replica.url}{RECORDS_PATH}"
            answer = await self._http.post(url, json={"keys": list(keys)}, timeout=30.0)
            answer.raise_for_status()
            return answer.json()["records"]

        answers = await asyncio.gather(
            *(ask(r) for r in self.pool.replicas), return_exceptions=True
        )
        records: dict[str, list[float]] = {}
        for answer in answers:
            if isinstance(answer, dict):
                records.update(answer)
        if not records and all(isinstance(a, BaseException) for a in answers):
            raise EngineUnavailableError("no replica answered for its temperature records")
        return records

    async def health(self) -> EngineHealth:
        healthy = self.pool.healthy_count
        total = len(self.pool.replicas)
        detail = "" if healthy else f"none of the {total} replicas passes its health check"
        return EngineHealth(
            healthy > 0,
            self._running,
            detail=detail,
            extra={"replicas": self.pool.snapshot()},
        )

    async def engine_running_requests(self) -> int:
        """Requests the replicas themselves still hold (their ``/metrics`` gauges)."""
        async with httpx.AsyncClient(timeout=5.0) as http:
            texts = await asyncio.gather(
                *(http.get(f"{r.url}/metrics") for r in self.pool.replicas),
                return_exceptions=True,
            )
        total = 0.0
        for answer in texts:
            if isinstance(answer, httpx.Response) and answer.status_code == 200:
                total += metric_sum(answer.text, "vllm:num_requests_running")
                total += metric_sum(answer.text, "vllm:num_requests_waiting")
        return int(total)

    async def shutdown(self) -> None:
        await self.pool.close()
        await self._http.aclose()

    # --- internals ------------------------------------------------------------------------

    async def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else await self._text.encode_prompt(prompt)

    def _unavailable(self, exc: Exception) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"The remote engine serving {self._model_name!r} could not serve this request: {exc}"
        )

    def _body(self, ids: list[int], s: SamplingSettings, *, stream: bool) -> dict[str, Any]:
        if s.seed is not None and s.seed not in SEED_RANGE:
            raise EngineRequestError(
                f"seed must be a signed 64-bit integer, got {s.seed}.", param="seed"
            )
        body: dict[str, Any] = {
            "model": self._model_name,
            "prompt": ids,
            "n": s.n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k if s.top_k is not None else 0,
            "min_p": s.min_p,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "repetition_penalty": s.repetition_penalty,
            "max_tokens": s.max_tokens,
            "min_tokens": s.min_tokens,
            "stop": list(s.stop),
            "stop_token_ids": list(s.stop_token_ids),
            "include_stop_str_in_output": s.include_stop_str_in_output,
            "ignore_eos": s.ignore_eos,
            "seed": s.seed,
            "stream": stream,
            "return_token_ids": True,
        }
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
            body["return_tokens_as_token_ids"] = True
        if s.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in s.logit_bias}
        if s.allowed_token_ids is not None:
            body["allowed_token_ids"] = list(s.allowed_token_ids)
        if s.structured is not None:
            if s.structured.json_schema is not None:
                body["structured_outputs"] = {"json": json.loads(s.structured.json_schema)}
            elif s.structured.json_object:
                body["structured_outputs"] = {"json_object": True}
        if s.extra_args:
            body["vllm_xargs"] = _flat_extra_args(s.extra_args)
        if s.priority:
            # Sent only when set: a replica without priority scheduling refuses any other.
            body["priority"] = s.priority
        return body

    async def _stream_once(
        self,
        replica: Replica,
        headers: dict[str, str],
        body: dict[str, Any],
        ids: list[int],
        sampling: SamplingSettings,
    ) -> AsyncIterator[CompletionDelta]:
        url = f"{replica.url}/v1/completions"
        try:
            async with self._http.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    _raise_for_status(response.status_code, text, replica, sampling)
                async for line in sse_lines(response.aiter_bytes()):
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        return
                    for choice in _chunk_choices(replica, data):
                        delta = self._delta(choice, len(ids), sampling)
                        if delta is not None:
                            yield delta
        except httpx.HTTPError as exc:
            raise transport_failure(replica.url, exc) from exc
        # vLLM always ends with [DONE]: a body that stops short was cut somewhere between.
        raise ReplicaFailure(f"{replica.url}: the stream ended without [DONE]")

    def _completion(self, choice: dict[str, Any], sampling: SamplingSettings) -> Completion:
        logprobs = self._logprobs(choice.get("logprobs"), sampling)
        return Completion(
            index=int(choice["index"]),
            text=choice.get("text") or "",
            token_ids=tuple(choice.get("token_ids") or ()),
            finish_reason=_finish_reason(choice.get("finish_reason")) or "stop",
            logprobs=logprobs,
            stop_reason=choice.get("stop_reason"),
            cumulative_logprob=(sum(t.logprob for t in logprobs) if logprobs is not None else None),
        )

    def _delta(
        self, choice: dict[str, Any], prompt_tokens: int, sampling: SamplingSettings
    ) -> CompletionDelta | None:
        token_ids = tuple(choice.get("token_ids") or ())
        finish = _finish_reason(choice.get("finish_reason"))
        if not token_ids and finish is None:
            return None
        return CompletionDelta(
            index=int(choice["index"]),
            text=choice.get("text") or "",
            num_tokens=len(token_ids),
            token_ids=token_ids,
            finish_reason=finish,
            logprobs=self._logprobs(choice.get("logprobs"), sampling),
            prompt_tokens=prompt_tokens,
            stop_reason=choice.get("stop_reason") if finish else None,
        )

    def _logprobs(
        self, raw: dict[str, Any] | None, sampling: SamplingSettings
    ) -> tuple[TokenLogprob, ...] | None:
        if sampling.logprobs is None or raw is None:
            return None
        result = []
        tops = raw.get("top_logprobs") or [None] * len(raw.get("tokens", ()))
        for token, logprob, top in zip(raw["tokens"], raw["token_logprobs"], tops, strict=False):
            token_id = _token_id(token)
            ranked = sorted((top or {}).items(), key=lambda item: item[1], reverse=True)
            ranked = ranked[: sampling.logprobs]
            top_ids = tuple(_token_id(t) for t, _ in ranked)
            result.append(
                TokenLogprob(
                    self._text.token_text(token_id),
                    float(logprob) if logprob is not None else float("-inf"),
                    tuple(
                        (self._text.token_text(i), float(lp))
                        for i, (_, lp) in zip(top_ids, ranked, strict=True)
                    ),
                    token_id=token_id,
                    top_ids=top_ids,
                )
            )
        return tuple(result)


# --- start-up checks ----------------------------------------------------------------------


async def _wait_for_models(
    http: httpx.AsyncClient, replicas: Sequence[Replica], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Each answering replica's ``/v1/models`` entries, waiting up to ``timeout`` for all."""
    deadline = time.monotonic() + timeout
    served: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    while True:
        for replica in replicas:
            if replica.url in served:
                continue
            try:
                response = await http.get(f"{replica.url}/v1/models")
                if response.status_code == 200:
                    served[replica.url] = list(response.json().get("data") or [])
                    continue
                errors[replica.url] = f"/v1/models answered {response.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                errors[replica.url] = type(exc).__name__
        if len(served) == len(replicas) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    missing = {url: why for url, why in errors.items() if url not in served}
    if not served:
        detail = "; ".join(f"{url}: {why}" for url, why in missing.items())
        raise EngineStartupError(
            f"no engine replica answered within {timeout:.0f} s ({detail}). Check "
            "--engine-urls, or raise --engine-start-timeout for a fleet still loading."
        )
    for url, why in missing.items():
        logger.warning("replica %s is not up (%s); it joins when its health check passes", url, why)
    return served


def _fleet_model(served: Mapping[str, list[dict[str, Any]]], wanted: str | None) -> tuple[str, int]:
    """The model name and context length every answering replica agrees on."""
    found: dict[str, int] = {}
    for url, models in served.items():
        names = {m.get("id"): m for m in models}
        if wanted is None:
            if len(names) != 1:
                raise EngineStartupError(
                    f"{url} serves {sorted(map(str, names))}; name one with --served-model-name"
                )
            name = next(iter(names))
        elif wanted in names:
            name = wanted
        else:
            raise EngineStartupError(
                f"{url} does not serve {wanted!r} (it serves {sorted(map(str, names))}); "
                "--served-model-name must match the replicas' --served-model-name"
            )
        found[url] = int(names[name].get("max_model_len") or 0)
        wanted = name
    lengths = set(found.values())
    if len(lengths) != 1 or 0 in lengths:
        raise EngineStartupError(f"replicas disagree on the context length: {found}")
    assert wanted is not None
    return wanted, lengths.pop()


async def _fleet_temperature_heads(
    http: httpx.AsyncClient, replicas: Sequence[Replica]
) -> dict[str, TemperatureHeadInfo] | None:
    """The temperature heads every replica serves, or ``None`` unless all run the processor."""
    if not replicas:
        return None
    answers = await asyncio.gather(
        *(http.get(f"{r.url}{HEADS_PATH}") for r in replicas), return_exceptions=True
    )
    common: dict[str, Any] | None = None
    for answer in answers:
        if not isinstance(answer, httpx.Response) or answer.status_code != 200:
            return None
        body = answer.json()
        if not body.get("processor"):
            return None
        heads = body.get("heads") or {}
        common = heads if common is None else {k: v for k, v in common.items() if heads.get(k) == v}
    return {
        name: TemperatureHeadInfo(name, spec["level"], tuple(spec["temperatures"]))
        for name, spec in (common or {}).items()
    }


async def _check_tokenizer(
    http: httpx.AsyncClient, url: str, model: str, text: LocalTokenizer
) -> None:
    """Fail the start if ``url`` tokenizes differently from the local tokenizer."""
    body = {"model": model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
    try:
        response = await http.post(f"{url}/tokenize", json=body)
    except httpx.HTTPError as exc:
        raise EngineStartupError(f"{url}/tokenize: {type(exc).__name__}") from None
    if response.status_code == 404:  # a router that forwards only the generation routes
        logger.warning("%s has no /tokenize; the tokenizer check is skipped", url)
        return
    if response.status_code != 200:
        raise EngineStartupError(f"{url}/tokenize answered {response.status_code}")
    remote = response.json().get("tokens")
    local = await text.tokenize(TOKENIZER_PROBE)
    if remote != local:
        raise EngineStartupError(
            f"{url} tokenizes differently from the local tokenizer (--model): the gateway "
            f"needs the served model's own tokenizer files (probe gave {remote} there and "
            f"{local} here)."
        )


# --- response helpers ---------------------------------------------------------------------


def _raise_for_status(status: int, text: str, replica: Replica, sampling: SamplingSettings) -> None:
    """Map a non-200 answer: retryable ones to :class:`ReplicaFailure`, refusals to a 400."""
    if status == 200:
        return
    if is_retryable_status(status) or status == 404:
        # 404: this replica does not serve the model (any more); another may.
        raise ReplicaFailure(f"{replica.url} answered {status}: {text[:ERROR_BODY_CHARS]}")
    try:
        error = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    message = error.get("message") if isinstance(error, dict) else None
    message = message or text[:ERROR_BODY_CHARS] or f"status {status}"
    named = error.get("param") if isinstance(error, dict) else None
    raise EngineRequestError(message, param=api_parameter(named, message, sampling))


def _chunk_choices(replica: Replica, data: str) -> list[dict[str, Any]]:
    """The choices of one SSE chunk; a chunk that is not JSON, or an error, fails the replica."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ReplicaFailure(f"{replica.url}: sent a chunk that is not JSON") from None
    if "error" in chunk:
        raise ReplicaFailure(f"{replica.url}: {_error_message(chunk)}")
    return list(chunk.get("choices", ()))


def _error_message(chunk: dict[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _flat_extra_args(extra: Mapping[str, object]) -> dict[str, object]:
    """``extra_args`` as ``vllm_xargs``, which carries only strings, numbers and lists."""

    def plain(value: object) -> bool:
        return isinstance(value, str | int | float) and not isinstance(value, bool)

    for key, value in extra.items():
        if not (plain(value) or (isinstance(value, list) and all(map(plain, value)))):
            raise EngineRequestError(
                f"the remote engine cannot pass engine argument {key!r} (only strings, numbers "
                "and lists of them reach a vLLM server); this feature needs the in-process "
                "engine."
            )
    return dict(extra)


def _token_id(token: str) -> int:
    return int(token.removeprefix(TOKEN_ID_PREFIX))


def _finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    return "length" if reason == "length" else ("abort" if reason == "abort" else "stop")


def _with_index(item: Any, index: int) -> Any:
    return replace(item, index=index)


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of metric ``name`` in Prometheus text ``text``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
