"""vLLM's request errors as engine errors: refusals name the API parameter, failures are 503s.

vLLM raises ``VLLMClientError`` subclasses for requests it refuses, but names the offending
field by its own name and often only in the message ("top_k must be ..."), and
``VLLMServerError`` subclasses (``EngineDeadError``, ``EngineGenerateError``) when the
engine died or failed a request for reasons of its own.
"""

from __future__ import annotations

from ttalign.engine.base import EngineRequestError, EngineUnavailableError, SamplingSettings

# vLLM's names for request fields, where the API calls them something else.
_API_PARAMETERS = {
    "input_tokens": "messages",
    "prompt": "messages",
    "prompt_token_ids": "messages",
    "logprobs": "top_logprobs",
    "structured_outputs": "response_format",
}

# SamplingParams fields whose checks name them as the first word of the message.
_SAMPLING_FIELDS = frozenset(
    {
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "min_tokens",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "max_tokens",
        "stop",
        "seed",
        "logprobs",
        "logit_bias",
    }
)

_GRAMMAR_WORDS = ("grammar", "json", "schema", "structured")


def request_error(error: Exception, sampling: SamplingSettings) -> EngineRequestError:
    """The :class:`EngineRequestError` for a request vLLM refused, naming the API parameter."""
    message = vllm_message(error)
    return EngineRequestError(
        message, param=api_parameter(getattr(error, "parameter", None), message, sampling)
    )


def api_parameter(named: str | None, message: str, sampling: SamplingSettings) -> str | None:
    """The API parameter a vLLM refusal is about: the one vLLM named, else the one its
    message starts with, by the API's name for it."""
    parameter = named or _named_in(message, sampling)
    return _API_PARAMETERS.get(parameter, parameter) if parameter else None


def unavailable_error(error: Exception, model_name: str) -> EngineUnavailableError:
    """The :class:`EngineUnavailableError` for an engine that died or failed a request."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError):
        return EngineUnavailableError(
            f"The vLLM engine serving {model_name!r} has stopped; the server cannot generate "
            "until it is restarted."
        )
    cause = error.__cause__ or error
    detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return EngineUnavailableError(
        f"The vLLM engine serving {model_name!r} failed this request ({detail})."
    )


def vllm_message(error: Exception) -> str:
    """The bare message: vLLM appends "(parameter=..., value=...)" to ``str()``."""
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


def _named_in(message: str, sampling: SamplingSettings) -> str | None:
    first_word = message.split(" ", 1)[0]
    if first_word in _SAMPLING_FIELDS:
        return first_word
    if first_word.startswith("structured_outputs"):
        return "structured_outputs"
    # Grammar compilers' errors ("Grammar error: Invalid type: foo") name no field.
    lowered = message.lower()
    if sampling.structured is not None and any(w in lowered for w in _GRAMMAR_WORDS):
        return "structured_outputs"
    return None
