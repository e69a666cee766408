"""The engine layer without a running engine: vLLM's ``AsyncLLM`` replaced by a scripted stub.

What the real engine does is covered in ``test_engine_real.py``; these tests pin down the
adapter's own logic (greedy copies, aborts on every exit, error mapping, start-up checks).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from jinja2 import TemplateError
from ttalign.benchmarks.processes import free_port, running_server
from ttalign.engine.base import (
    CompletionDelta,
    EngineRequestError,
    EngineStartupError,
    EngineUnavailableError,
    SamplingSettings,
    StructuredOutput,
)
from ttalign.engine.local_tokenizer import LocalTokenizer, load_chat_template
from ttalign.engine.metering import MeteredEngine
from ttalign.engine.vllm_engine import VllmEngine
from ttalign.engine.vllm_errors import request_error, unavailable_error
from ttalign.engine.vllm_memory import (
    NodeMemory,
    check_kv_cache_fits,
    format_bytes,
    start_failure_message,
    suggested_kv_cache,
)
from ttalign.server.app import create_app
from ttalign.server.errors import to_api_error

from tests.conftest import fake_settings
from tests.fakes import FakeEngine
from tests.servers import serve_beside, serve_in_thread

#: VllmEngine imports vLLM's own types as it runs, and these tests raise vLLM's errors.
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")

GIB = 1 << 30
MIB = 1 << 20


# --- a scripted stand-in for vLLM's AsyncLLM -----------------------------------------------


def output(*texts: str, finished: bool, token_ids: tuple[int, ...] = (7, 8)) -> Any:
    """A ``RequestOutput``-shaped object with one completion per text."""
    return SimpleNamespace(
        prompt_token_ids=[1, 2, 3],
        finished=finished,
        num_cached_tokens=0,
        outputs=[
            SimpleNamespace(
                index=i,
                text=text,
                token_ids=list(token_ids),
                finish_reason="stop" if finished else None,
                logprobs=None,
                stop_reason=None,
                cumulative_logprob=None,
            )
            for i, text in enumerate(texts)
        ],
    )


class StubLLM:
    """Answers every request with ``script`` and records requests and aborts."""

    def __init__(
        self, script: list[Any] | Exception, defaults: dict | None = None, policy: str = "fcfs"
    ) -> None:
        self.script = script
        self.requests: list[tuple[Any, str]] = []
        self.aborted: list[str] = []
        self.errored = False
        self.model_config = SimpleNamespace(
            max_model_len=2048,
            dtype="torch.float32",
            get_diff_sampling_param=lambda: dict(defaults or {}),
            try_get_generation_config=lambda: {"eos_token_id": [2, 5]},
        )
        self.vllm_config = SimpleNamespace(
            cache_config=SimpleNamespace(enable_prefix_caching=True),
            scheduler_config=SimpleNamespace(policy=policy),
        )
        self.priorities: list[int] = []

    def get_tokenizer(self) -> Any:
        return SimpleNamespace(encode=lambda text: [1, 2, 3], eos_token_id=2)

    async def generate(
        self, prompt: Any, params: Any, request_id: str, priority: int = 0
    ) -> AsyncIterator[Any]:
        self.requests.append((params, request_id))
        self.priorities.append(priority)
        if isinstance(self.script, Exception):
            raise self.script
        for item in self.script:
            yield item
            if item.finished:
                return
        await asyncio.Event().wait()  # an unfinished request: only closing ends it

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        return None

    def get_num_unfinished_requests(self) -> int:
        return 0


def stub_engine(script: list[Any] | Exception, **kwargs: Any) -> tuple[VllmEngine, StubLLM]:
    llm = StubLLM(script, **kwargs)
    return VllmEngine(llm, "stub-model"), llm


# --- what /health reports ----------------------------------------------------------------------


@needs_vllm
async def test_health_reports_the_dtype_and_reproducibility_mode() -> None:
    llm = StubLLM([])
    health = await VllmEngine(llm, "stub-model", deterministic=True).health()
    assert health.extra["dtype"] == "float32"  # "torch.float32", as vLLM's config holds it
    assert health.extra["deterministic"] is True
    assert health.extra["prefix_caching"] is True  # read from vLLM's config, not assumed


# --- greedy n > 1 -----------------------------------------------------------------------------


@needs_vllm
async def test_greedy_n_samples_once_and_returns_n_copies() -> None:
    engine, llm = stub_engine([output("same answer", finished=True)])
    generation = await engine.generate([1, 2], SamplingSettings(n=3, temperature=0.0))
    assert llm.requests[0][0].n == 1
    assert [c.index for c in generation.completions] == [0, 1, 2]
    assert {c.text for c in generation.completions} == {"same answer"}
    assert generation.completion_tokens == 3 * 2  # usage counts every copy's tokens


@needs_vllm
async def test_greedy_n_streams_every_delta_to_every_copy() -> None:
    engine, llm = stub_engine([output("a", finished=False), output("b", finished=True)])
    deltas = [d async for d in engine.stream([1, 2], SamplingSettings(n=2, temperature=0.0))]
    assert llm.requests[0][0].n == 1
    assert [(d.index, d.text) for d in deltas] == [(0, "a"), (1, "a"), (0, "b"), (1, "b")]
    assert sum(d.num_tokens for d in deltas) == 2 * 4


def child_delta(index: int, text: str, cached: int, *, finished: bool, last: bool = False) -> Any:
    """One child sequence's delta of an ``n > 1`` request, with that child's cache hits;
    the request is finished with its ``last`` delta."""
    delta = output(text, finished=finished, token_ids=(7,))
    delta.outputs[0].index = index
    delta.num_cached_tokens = cached
    delta.finished = last
    return delta


@needs_vllm
async def test_sampled_n_is_read_as_deltas_so_every_child_counts_its_cached_prefill() -> None:
    from vllm.sampling_params import RequestOutputKind

    script = [
        child_delta(0, "a", 0, finished=False),
        child_delta(1, "x", 2, finished=False),
        child_delta(1, "y", 2, finished=True),
        child_delta(0, "b", 0, finished=True, last=True),
    ]
    engine, llm = stub_engine(script)
    generation = await engine.generate([1, 2, 3], SamplingSettings(n=2, temperature=0.7))
    assert llm.requests[0][0].output_kind == RequestOutputKind.DELTA
    assert [(c.index, c.text, c.token_ids) for c in generation.completions] == [
        (0, "ab", (7, 7)),
        (1, "xy", (7, 7)),
    ]
    assert [c.finish_reason for c in generation.completions] == ["stop", "stop"]
    assert (generation.prefill_tokens, generation.cached_prefill_tokens) == (6, 2)
    assert generation.computed_prefill_tokens == 4


@needs_vllm
@pytest.mark.parametrize(("policy", "sent"), [("priority", 1), ("fcfs", 0)])
async def test_a_call_priority_reaches_vllm_only_under_priority_scheduling(
    policy: str, sent: int
) -> None:
    llm = StubLLM([output("x", finished=True)], policy=policy)
    engine = VllmEngine(llm, "stub-model")
    await engine.generate([1], SamplingSettings(priority=1))
    assert llm.priorities == [sent]


@needs_vllm
async def test_sampled_n_goes_to_vllm_unchanged() -> None:
    engine, llm = stub_engine([output("x", "y", finished=True)])
    generation = await engine.generate([1], SamplingSettings(n=2, temperature=0.7))
    assert llm.requests[0][0].n == 2
    assert [c.text for c in generation.completions] == ["x", "y"]


# --- every exit ends the vLLM request --------------------------------------------------------


@needs_vllm
async def test_closing_a_stream_aborts_its_request() -> None:
    engine, llm = stub_engine([output("partial", finished=False)])
    stream = engine.stream([1], SamplingSettings(n=3, temperature=1.0))
    await anext(stream)
    await stream.aclose()
    assert llm.aborted == [llm.requests[0][1]]


@needs_vllm
async def test_cancelling_a_generate_aborts_its_request() -> None:
    engine, llm = stub_engine([output("partial", finished=False)])
    task = asyncio.ensure_future(engine.generate([1], SamplingSettings()))
    while not llm.requests and not task.done():  # a generate that fails early must not hang
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert llm.aborted == [llm.requests[0][1]]


@needs_vllm
async def test_a_finished_request_is_not_aborted() -> None:
    engine, llm = stub_engine([output("done", finished=True)])
    await engine.generate([1], SamplingSettings())
    assert llm.aborted == []


async def test_a_metered_stream_closes_the_engine_stream_at_once() -> None:
    closed = asyncio.Event()

    class ClosingEngine(FakeEngine):
        async def stream(self, prompt: Any, sampling: SamplingSettings) -> AsyncIterator[Any]:
            try:
                yield CompletionDelta(0, "a", 1)
                yield CompletionDelta(0, "b", 1)
            finally:
                closed.set()

    metered = MeteredEngine(ClosingEngine())
    stream = metered.stream([1], SamplingSettings())
    await anext(stream)
    await stream.aclose()
    assert closed.is_set()  # not left for the garbage collector


# --- errors -----------------------------------------------------------------------------------


@needs_vllm
async def test_engine_death_is_engine_unavailable() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    engine, llm = stub_engine(EngineDeadError())
    llm.errored = True
    with pytest.raises(EngineUnavailableError, match="stub-model"):
        await engine.generate([1], SamplingSettings())
    assert llm.aborted == []  # nothing to abort on a dead engine


@needs_vllm
async def test_a_request_failure_is_engine_unavailable_naming_the_cause() -> None:
    from vllm.v1.engine.exceptions import EngineGenerateError

    failure = EngineGenerateError()
    failure.__cause__ = OverflowError("seed too large")
    engine, _ = stub_engine(failure)
    with pytest.raises(EngineUnavailableError, match="OverflowError: seed too large"):
        await engine.generate([1], SamplingSettings())


@needs_vllm
async def test_a_refused_request_names_the_parameter() -> None:
    from vllm.exceptions import VLLMValidationError

    engine, _ = stub_engine(VLLMValidationError("top_k must be 0 (disable), or at least 1."))
    with pytest.raises(EngineRequestError) as caught:
        await engine.generate([1], SamplingSettings())
    assert caught.value.param == "top_k"


@needs_vllm
async def test_seeds_outside_int64_are_refused_before_vllm() -> None:
    engine, llm = stub_engine([output("x", finished=True)])
    with pytest.raises(EngineRequestError) as caught:
        await engine.generate([1], SamplingSettings(seed=2**64))
    assert caught.value.param == "seed"
    assert llm.requests == []


@pytest.mark.parametrize(
    ("message", "parameter", "structured", "expected"),
    [
        ("presence_penalty must be in [-2, 2], got 3.0.", None, None, "presence_penalty"),
        ("token_id(s) [1] in logit_bias contain out-of-vocab token ids.", "logit_bias", None,
         "logit_bias"),
        ("Requested sample logprobs of 30 is too many.", "logprobs", None, "top_logprobs"),
        ("The prompt is too long.", "prompt", None, "messages"),
        ("Grammar error: Invalid type: foo", None, StructuredOutput(json_schema="{}"),
         "response_format"),
        ("Invalid JSON grammar specification.", None, StructuredOutput(json_schema="{"),
         "response_format"),
        ("structured_outputs.json cannot be an empty string", None, None, "response_format"),
        ("Something nobody names.", None, None, None),
    ],
)  # fmt: skip
@needs_vllm
def test_vllm_refusals_name_the_api_parameter(
    message: str, parameter: str | None, structured: StructuredOutput | None, expected: str | None
) -> None:
    from vllm.exceptions import VLLMValidationError

    error = request_error(
        VLLMValidationError(message, parameter=parameter), SamplingSettings(structured=structured)
    )
    assert error.param == expected
    assert str(error) == message  # without vLLM's "(parameter=..., value=...)" suffix


@needs_vllm
def test_engine_unavailable_is_a_503() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    api_error = to_api_error(unavailable_error(EngineDeadError(), "smollm2"))
    assert api_error.status_code == 503
    body = api_error.body()["error"]
    assert body["type"] == "service_unavailable_error"
    assert body["code"] == "engine_unavailable"
    assert "smollm2" in body["message"]


# --- chat templates ---------------------------------------------------------------------------


async def test_a_template_that_refuses_the_messages_is_a_request_error() -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TemplateError("System messages must come first.")

    # Both engines render through LocalTokenizer.
    text = LocalTokenizer(SimpleNamespace(apply_chat_template=refuse))
    with pytest.raises(EngineRequestError, match="System messages must come first") as caught:
        await text.render_chat([{"role": "user", "content": "hi"}])
    assert caught.value.param == "messages"


def test_a_broken_template_file_fails_at_start(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(EngineStartupError, match=r"broken\.jinja: line 1"):
        load_chat_template(str(broken))
    with pytest.raises(EngineStartupError, match=r"missing\.jinja"):
        load_chat_template(str(tmp_path / "missing.jinja"))


# --- sampling defaults --------------------------------------------------------------------------


def test_sampling_defaults_keep_only_sampling_fields() -> None:
    engine, _ = stub_engine([], defaults={"temperature": 0.3, "max_tokens": 64, "stop": "x"})
    assert dict(engine.sampling_defaults) == {"temperature": 0.3, "max_tokens": 64}
    assert dict(MeteredEngine(engine).sampling_defaults) == {"temperature": 0.3, "max_tokens": 64}


def test_the_fake_engine_has_no_defaults_unless_set() -> None:
    assert FakeEngine().sampling_defaults == {}
    assert MeteredEngine(FakeEngine(sampling_defaults={"top_k": 5})).sampling_defaults == {
        "top_k": 5
    }


# --- start-up memory checks ---------------------------------------------------------------------


def test_a_kv_cache_over_the_available_memory_is_refused() -> None:
    memory = NodeMemory(node=0, total=16 * GIB, available=6 * GIB)
    with pytest.raises(EngineStartupError) as caught:
        check_kv_cache_fits(64 << 40, memory)
    message = str(caught.value)
    for expected in ("--kv-cache-memory", "TTALIGN_KV_CACHE_MEMORY", "64.0 TiB", "6.0 GiB",
                     "16.0 GiB", "NUMA node 0", "e.g. to 2GiB"):  # fmt: skip
        assert expected in message
    check_kv_cache_fits(4 * GIB, memory)  # fits: no error
    check_kv_cache_fits(64 << 40, None)  # not the CPU build: vLLM sizes it


def test_a_failed_start_is_explained_by_memory_when_memory_explains_it(tmp_path: Path) -> None:
    with open(tmp_path / "model.safetensors", "wb") as weights:
        weights.truncate(600 * MIB)  # sparse: no disk used
    memory = NodeMemory(node=1, total=8 * GIB, available=2 * GIB)
    failure = RuntimeError("Engine core initialization failed.")
    tight = start_failure_message(failure, 1800 * MIB, memory, str(tmp_path))
    assert "do not fit in memory" in tight and "600.0 MiB" in tight
    assert "TTALIGN_KV_CACHE_MEMORY" in tight and "e.g. to 512MiB" in tight
    roomy = start_failure_message(failure, 256 * MIB, memory, str(tmp_path))
    assert "Engine core initialization failed." in roomy and "log above" in roomy


@needs_vllm
def test_vllm_start_failures_become_startup_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ttalign.engine.vllm_engine as vllm_engine
    from vllm.v1.engine.async_llm import AsyncLLM

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    with open(tmp_path / "model.safetensors", "wb") as weights:
        weights.truncate(200 * MIB)
    monkeypatch.setattr(AsyncLLM, "from_engine_args", fail)
    monkeypatch.setattr(vllm_engine, "cpu_node_memory", lambda: NodeMemory(0, 4 * GIB, GIB))
    # 900 MiB passes the check before the start; with the weights it cannot fit.
    with pytest.raises(EngineStartupError, match="do not fit in memory") as caught:
        VllmEngine.start(str(tmp_path), model_name="m", kv_cache_memory=900 * MIB)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_sizes_read_well() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536 * MIB) == "1.5 GiB"
    assert format_bytes(64 << 40) == "64.0 TiB"
    assert suggested_kv_cache(9 * GIB) == "4GiB"
    assert suggested_kv_cache(900 * MIB) == "256MiB"
    assert suggested_kv_cache(100 * MIB) is None


# --- test helpers surface start-up failures ------------------------------------------------------


def test_a_server_thread_that_fails_to_start_reports_why() -> None:
    def no_engine(settings: Any) -> Any:
        raise EngineStartupError("lower --kv-cache-memory, e.g. to 512MiB")

    app = create_app(fake_settings(), engine_factory=no_engine)
    failure = "EngineStartupError: lower --kv-cache-memory"
    with pytest.raises(RuntimeError, match=failure) as caught, serve_in_thread(app):
        pass
    assert isinstance(caught.value.__cause__, EngineStartupError)


def test_a_server_process_that_dies_quotes_its_log(tmp_path: Path) -> None:
    script = "print('starting'); print('the actual cause', flush=True); raise SystemExit(3)"
    command = [sys.executable, "-c", script]
    with (
        pytest.raises(RuntimeError) as caught,
        running_server(command, free_port(), tmp_path / "s.log"),
    ):
        pass
    assert "exited with 3" in str(caught.value)
    assert "the actual cause" in str(caught.value)


def test_an_app_served_beside_another_shares_its_event_loop() -> None:
    def no_engine(settings: Any) -> Any:
        raise EngineStartupError("no engine here")

    engine = FakeEngine()
    neighbour_app = create_app(fake_settings(), engine_factory=lambda _: engine)
    with serve_in_thread(neighbour_app) as neighbour:
        beside_app = create_app(fake_settings(), engine_factory=lambda _: engine)
        with serve_beside(neighbour, beside_app) as beside:
            assert beside.loop is neighbour.loop and beside.port != neighbour.port
            assert httpx.get(f"{beside.base_url}/health").status_code == 200
        failing = create_app(fake_settings(), engine_factory=no_engine)
        with pytest.raises(RuntimeError, match="no engine here"), serve_beside(neighbour, failing):
            pass
        # Neither the stopped app nor the failed one took the neighbour's loop down.
        assert httpx.get(f"{neighbour.base_url}/health").status_code == 200
