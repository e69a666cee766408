"""The engine interface: the only contract strategies have with a language model.

Strategies depend on :class:`EngineClient` and the plain dataclasses here, never on
vLLM, so they run unchanged against the in-process vLLM engine, a remote one, or the
scripted fake engine in ``tests/fakes.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]

#: A prompt is either rendered text or token ids (token ids skip a second tokenization).
Prompt = str | list[int]

#: Seeds are signed 64-bit integers, as in vLLM.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

#: The most alternatives per position that ``logprobs`` may ask for (vLLM's default cap).
MAX_TOP_LOGPROBS = 20

#: What ended a completion: the stop string, the stop token id, or ``None`` for the model's
#: end-of-sequence token or the length limit.
StopReason = str | int | None


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output's shape, enforced by the engine while it decodes."""

    #: Any JSON object at all (OpenAI's ``response_format: json_object``).
    json_object: bool = False
    #: A JSON schema the output must satisfy, as JSON text (``json_schema``).
    json_schema: str | None = None


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling parameters for one engine call that returns ``n`` completions."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: ``None``: no log-probabilities; ``k`` in ``[0, 20]``: the sampled token plus the top
    #: ``k`` alternatives (and then :attr:`Completion.cumulative_logprob`).
    logprobs: int | None = None
    #: Keep generating past end-of-sequence until ``max_tokens`` (benchmarks use it).
    ignore_eos: bool = False
    #: Sample only among the ``top_k`` most likely tokens (``None``: all).
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    #: ``(token_id, bias)`` pairs added to the logits before sampling.
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None
    #: Generate at least this many tokens before end-of-sequence or a stop may end it.
    min_tokens: int = 0
    #: Token ids that end a completion as a stop string does (kept in ``token_ids``).
    stop_token_ids: tuple[int, ...] = ()
    #: Keep the matched stop string at the end of the text.
    include_stop_str_in_output: bool = False
    #: Sample only among these token ids (with ``max_tokens=1``: a forced one-token answer).
    allowed_token_ids: tuple[int, ...] | None = None
    #: Per-request arguments for the engine's custom logits processors (vLLM ``extra_args``).
    extra_args: Mapping[str, object] | None = None
    #: Scheduling priority under a priority-scheduling engine: lower runs first (vLLM's
    #: convention). Engines that schedule first-come first-served ignore it.
    priority: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token and its top alternatives.

    ``top`` holds ``(text, logprob)`` pairs, most likely first, and ``top_ids`` the same
    alternatives' token ids, so a search can branch on them without tokenizing text.
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    token_id: int | None = None
    top_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One finished completion of an engine call."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: The stop string or stop token id that ended it; ``None`` for end-of-sequence or length.
    stop_reason: StopReason = None
    #: The sum of the sampled tokens' log-probabilities (set when ``logprobs`` was asked for).
    cumulative_logprob: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Generation:
    """The result of one engine call: ``n`` completions of one prompt."""

    prompt_tokens: int
    completions: tuple[Completion, ...]
    #: Prompt tokens the engine prefilled, over every sequence it ran: vLLM runs a call of
    #: ``n > 1`` as ``n`` child sequences that each prefill the prompt. ``None``: unknown
    #: (one prefill per completion is assumed).
    prefill_tokens: int | None = None
    #: Of those, the tokens read from the engine's prefix cache rather than computed.
    cached_prefill_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.completions)

    @property
    def total_prefill_tokens(self) -> int:
        """Prompt tokens prefilled over all sequences, cached or computed."""
        if self.prefill_tokens is not None:
            return self.prefill_tokens
        return self.prompt_tokens * max(1, len(self.completions))

    @property
    def computed_prefill_tokens(self) -> int:
        """Prefill the engine computed (the part its prefix cache did not hold)."""
        return max(0, self.total_prefill_tokens - self.cached_prefill_tokens)


@dataclass(frozen=True)
class CompletionDelta:
    """New output of completion ``index`` since the previous delta of a stream."""

    index: int
    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: Set on every delta; lets the consumer report usage without a second call.
    prompt_tokens: int = 0
    #: The ids of the new tokens (``num_tokens`` of them).
    token_ids: tuple[int, ...] = ()
    #: On the final delta: what ended the completion (see :attr:`Completion.stop_reason`).
    stop_reason: StopReason = None
    #: Prompt tokens this completion's sequence read from the prefix cache (every delta).
    cached_prefill_tokens: int = 0


@dataclass(frozen=True)
class TemperatureHeadInfo:
    """A trained temperature head the engine has loaded (see ``engine.temperature_head``)."""

    name: str
    level: Literal["example", "token"]
    temperatures: tuple[float, ...]


@runtime_checkable
class AdaptiveTemperatureEngine(Protocol):
    """An engine whose sampler can pick each row's temperature (Adaptive Decoding).

    Requests opt in through ``SamplingSettings.extra_args``; the keys are those of
    ``engine.vllm_adaptive_temperature``. Optional: strategies check for it with
    ``isinstance`` and refuse adaptive requests with a 400 on engines without it.
    """

    @property
    def temperature_heads(self) -> Mapping[str, TemperatureHeadInfo]:
        """The heads a request may name, by name."""
        ...

    async def temperature_records(self, keys: Sequence[str]) -> dict[str, list[float]]:
        """The temperatures the sampler used for each recorded request, one per sampling
        step (see the processor's note on discarded prefill samples); unknown keys are left
        out, and a finished request's record is returned once."""
        ...


@dataclass
class EngineHealth:
    """What ``/health`` reports about the engine."""

    healthy: bool
    running_requests: int
    detail: str = ""
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class EngineClient(Protocol):
    """An LLM engine that renders chats and samples completions.

    Cancelling the task awaiting :meth:`generate`, or closing a :meth:`stream`, must abort
    the underlying engine request.
    """

    @property
    def model_name(self) -> str:
        """The name this engine's model is served under."""
        ...

    @property
    def max_model_len(self) -> int:
        """The context window in tokens."""
        ...

    @property
    def sampling_defaults(self) -> Mapping[str, float | int]:
        """The model's own sampling defaults, for the fields a request leaves unset.

        Keys are among ``temperature``, ``top_p``, ``top_k``, ``min_p``,
        ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty`` and
        ``max_tokens`` (as ``vllm serve`` reads them from ``generation_config.json``);
        empty when the model sets none or the server was told to ignore them.
        """
        ...

    async def render_chat(
        self, messages: Sequence[dict[str, str]], *, continue_final_message: bool = False
    ) -> list[int]:
        """Render messages with the model's chat template into prompt token ids.

        With ``continue_final_message`` the last (assistant) message is left open, so a
        generation continues it instead of starting a new turn. Rendering and tokenizing
        a long conversation is CPU work: implementations do it off the event loop. A
        conversation the template refuses raises :class:`EngineRequestError`.
        """
        ...

    async def count_tokens(self, text: str) -> int:
        """The number of tokens ``text`` encodes to, without special tokens (off the loop)."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text``, without special tokens (off the loop)."""
        ...

    async def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids``, special tokens (end-of-sequence) left out."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end a reply: the tokenizer's end-of-sequence token and the model's."""
        ...

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        """Sample ``sampling.n`` completions of ``prompt`` in one batched request.

        Raises :class:`EngineRequestError` for settings the engine refuses and
        :class:`EngineUnavailableError` when the engine has died or failed the request.
        """
        ...

    def stream(self, prompt: Prompt, sampling: SamplingSettings) -> AsyncIterator[CompletionDelta]:
        """Sample like :meth:`generate`, yielding output token by token as it is produced."""
        ...

    async def health(self) -> EngineHealth:
        """Report whether the engine can serve, and how many requests it is running."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine and release its resources."""
        ...


class EngineStartupError(RuntimeError):
    """The engine could not start; the message says which setting to change."""


class CallNotAdmitted(Exception):
    """An engine call its caller's own limits refused before it started (a request's compute
    budget). Layers in between pass it on unchanged, so the request's owner sees it."""


class EngineUnavailableError(RuntimeError):
    """The engine cannot serve: it died, or it failed a request for reasons of its own."""


class EngineRequestError(ValueError):
    """The engine refused a request as invalid (e.g. the prompt exceeds the context).

    ``param`` names the offending request parameter when the engine said which.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
