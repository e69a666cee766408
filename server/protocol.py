"""Request schemas of the chat completion and score routes: OpenAI's fields plus ttalign's."""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from ttalign.engine.base import SEED_MAX, SEED_MIN
from ttalign.reward_clients.limits import MAX_CONSTRAINTS
from ttalign.reward_clients.registry import RewardName

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 16
#: Longest stop string: each one is matched against the tail of the text at every token.
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS_ENTRIES = 300
#: Longest candidate reply ``/v1/rewards/score`` accepts, in characters.
MAX_CANDIDATE_CHARS = 65536

#: A token id; whether it is in the model's vocabulary is the engine's to say.
TokenId = Annotated[int, Field(ge=0, strict=True)]

#: OpenAI request fields that would change the answer's meaning but are not served here.
#: Sending one with a non-empty value is a 400 (``unsupported_parameter``), never ignored.
UNSUPPORTED_FIELDS = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "audio": "audio output",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
}


class OpenAIBaseModel(BaseModel):
    """Accepts fields it does not know (clients send many) and logs that it ignored them."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            logger.debug("ignoring unsupported fields %s", sorted(self.model_extra))
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the reply must satisfy."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class SamplingRequest(OpenAIBaseModel):
    """The fields chat and text completion requests share: sampling, the vLLM extensions
    ``vllm serve`` accepts, and ttalign's strategy fields. Range checks here give 400s
    naming the param."""

    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    # --- vLLM extensions, accepted as ``vllm serve`` accepts them (send through ``extra_body``)
    ignore_eos: bool = Field(
        False, description="vLLM extension: generate max_tokens even past end-of-sequence."
    )
    top_k: int | None = Field(
        None, ge=-1, description="vLLM extension: sample among the k most likely tokens."
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="vLLM extension: drop tokens below min_p x the top one."
    )
    repetition_penalty: float | None = Field(
        None, gt=0, le=2, description="vLLM extension: penalize tokens already in the text."
    )
    min_tokens: int = Field(
        0,
        ge=0,
        description="vLLM extension: generate at least this many tokens before "
        "end-of-sequence or a stop_token_ids token may end the reply (at most max_tokens).",
    )
    stop_token_ids: list[TokenId] | None = Field(
        None,
        description="vLLM extension: token ids that end the reply as stop strings do "
        "(the stop token's text is left out unless include_stop_str_in_output).",
    )
    include_stop_str_in_output: bool = Field(
        False,
        description="vLLM extension: end the reply with the stop string or stop token that "
        "ended it.",
    )
    allowed_token_ids: list[TokenId] | None = Field(
        None,
        min_length=1,
        description="vLLM extension: sample only among these token ids (with max_tokens=1, "
        "a forced choice among them).",
    )

    # --- ttalign extensions (clients send them through ``extra_body``) --------------------
    strategy: str | None = Field(
        None, description="Alignment strategy; GET /v1/strategies lists them."
    )
    strategy_config: dict[str, Any] | None = Field(
        None, description="Settings of the chosen strategy, validated by its own schema."
    )
    reward: RewardName = Field(
        None, description="Name of a reward client configured on the server."
    )
    constraints: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_CONSTRAINTS,
        description="Verifiable constraints for rule-verifier rewards (data, never code); "
        "see reward_clients/rules.py for the kinds.",
    )
    return_trace: bool = Field(
        False, description="Return every candidate, reward and critique of the search."
    )
    deadline_seconds: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget; multi-round strategies stop and return their best "
        "so far when it passes.",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else stop or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in sequences):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in sequences):
            raise ValueError(f"stop sequences may be at most {MAX_STOP_CHARS} characters long")
        return stop

    @field_validator("min_tokens")
    @classmethod
    def _check_min_tokens(cls, min_tokens: int, info: ValidationInfo) -> int:
        # max_tokens and max_completion_tokens come first, so they are validated by now.
        for name in ("max_completion_tokens", "max_tokens"):
            limit = info.data.get(name)
            if limit is not None:
                if min_tokens > limit:
                    raise ValueError(f"must be at most {name} ({limit}), got {min_tokens}")
                break
        return min_tokens

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids, got {token[:20]!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases must be within [-100, 100], got {value}")
        return bias

    #: Fields of this API that would change the answer but are not served, by feature.
    unsupported_fields: ClassVar[dict[str, str]] = UNSUPPORTED_FIELDS

    def unsupported_field(self) -> tuple[str, str] | None:
        """The first field sent that changes the answer but is not served, with its feature."""
        extra = self.model_extra or {}
        for name, feature in self.unsupported_fields.items():
            value = extra.get(name)
            if value in (None, [], {}) or (name == "tool_choice" and value == "none"):
                continue
            return name, feature
        modalities = extra.get("modalities")
        if modalities not in (None, ["text"]):
            return "modalities", "output modalities other than text"
        return None

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprob_count(self) -> int | None:
        """Top alternatives to report per token, or ``None`` for no logprobs at all."""
        raise NotImplementedError


class ChatCompletionRequest(SamplingRequest):
    """OpenAI chat completion request (``POST /v1/chat/completions``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ScoreRequest(BaseModel):
    """``POST /v1/rewards/score``: score candidate replies with a configured reward client."""

    model_config = ConfigDict(extra="forbid")

    reward: RewardName = Field(None, description="Configured reward client (default if unset).")
    messages: list[ChatMessage] = Field(min_length=1)
    candidates: list[Annotated[str, Field(max_length=MAX_CANDIDATE_CHARS)]] = Field(min_length=1)
    constraints: list[dict[str, Any]] | None = Field(None, max_length=MAX_CONSTRAINTS)
