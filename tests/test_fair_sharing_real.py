"""Fair sharing and prefix caching on the real engine, through the public API.

A plain request is served while a search holds the engine; every child sequence's prefill
is metered, split into computed and cached; the engine's own prefix-cache counters show on
``/metrics``.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.servers import RunningServer

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
#: Long enough to fill several 32-token blocks of the KV cache.
LONG_QUESTION = [
    {
        "role": "user",
        "content": "A lighthouse keeper writes a letter to the ships that pass her island "
        "every night. She tells them about the storms, the gulls, the lamp she trims, and the "
        "town she has not visited in years. Write the first lines of that letter.",
    }
]


def _prefix_counters(server: RunningServer) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    counters = {}
    for line in text.splitlines():
        if line.startswith(("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counters


def test_every_child_sequence_prefill_is_metered_and_repeats_hit_the_prefix_cache(
    real_server: RunningServer,
) -> None:
    client = openai.OpenAI(base_url=real_server.api_url, api_key="x", max_retries=0)
    before = _prefix_counters(real_server)
    answers = [
        client.chat.completions.create(
            model=MODEL, messages=LONG_QUESTION, n=4, max_tokens=2, temperature=1.0, seed=s
        )
        for s in (1, 2)
    ]
    for answer in answers:
        prefill = answer.model_extra["alignment"]["engine_prefill"]
        # Four child sequences, each prefilling the whole prompt, cached or computed.
        prefilled = prefill["computed_tokens"] + prefill["cached_tokens"]
        assert prefilled == 4 * answer.usage.prompt_tokens
    assert answers[0].usage.prompt_tokens > 64
    repeat = answers[1].model_extra["alignment"]["engine_prefill"]
    assert repeat["cached_tokens"] >= 4 * 32  # every child reads at least one whole block
    # vLLM keeps one set of metrics per process and the last engine started takes it over
    # (the suite's deterministic engine, with no prefix cache), so only their export is
    # checked here; benchmarks/prefix_cache.py reads their values on a server of its own.
    after = _prefix_counters(real_server)
    assert {"vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"} <= set(after)
    assert before.keys() == after.keys()


def test_a_plain_request_finishes_while_a_search_holds_the_engine(
    real_server: RunningServer,
) -> None:
    engine = real_server.app.state.engine
    search_ended = threading.Event()
    search_started = threading.Event()
    body = {
        "model": MODEL,
        "messages": LONG_QUESTION,
        "max_tokens": 64,
        "stream": True,
        "strategy": "rain",
        "strategy_config": {"max_iterations": 50},
    }

    def search() -> None:
        try:
            with httpx.stream(
                "POST", f"{real_server.api_url}/chat/completions", json=body, timeout=600
            ) as response:
                assert response.status_code == 200
                for _ in response.iter_lines():
                    if engine.engine_running_requests():
                        search_started.set()
                    if stop.is_set():
                        return  # closing the stream aborts the search
        finally:
            search_ended.set()

    stop = threading.Event()
    worker = threading.Thread(target=search, daemon=True)
    worker.start()
    try:
        assert search_started.wait(120), "the search never reached the engine"
        client = openai.OpenAI(base_url=real_server.api_url, api_key="x", max_retries=0)
        plain = client.chat.completions.create(
            model=MODEL, messages=LONG_QUESTION, max_tokens=8, temperature=1.0, seed=0
        )
        assert plain.usage.completion_tokens > 0
        # Served in the middle of the search, not after it.
        assert not search_ended.is_set()
    finally:
        stop.set()
        worker.join(120)
    assert search_ended.is_set()
    deadline = time.monotonic() + 30
    while engine.engine_running_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.engine_running_requests() == 0


def test_a_plain_request_preempts_a_search_call_and_the_search_still_answers(
    real_server: RunningServer,
) -> None:
    gate = real_server.app.state.service.fair_gate
    assert gate is not None and gate.preempt  # the server's default
    before = gate.preemptions
    client = openai.OpenAI(base_url=real_server.api_url, api_key="x", max_retries=0)
    answers: dict[str, object] = {}

    def search() -> None:
        answers["search"] = client.chat.completions.create(
            model=MODEL,
            messages=LONG_QUESTION,
            max_tokens=96,
            temperature=1.0,
            seed=3,
            extra_body={
                "ignore_eos": True,
                "strategy": "best_of_n",
                "strategy_config": {"n": 4},
                "reward": "rules",
                "constraints": [{"type": "word_count", "max": 500}],
            },
        )

    worker = threading.Thread(target=search, daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while gate.search_sequences_in_flight < 4:  # the search's one call is in the engine
        assert time.monotonic() < deadline, "the search never reached the engine"
        time.sleep(0.01)
    plain = client.chat.completions.create(
        model=MODEL, messages=LONG_QUESTION, max_tokens=8, temperature=1.0, seed=0
    )
    assert plain.usage.completion_tokens > 0
    assert gate.preemptions == before + 1
    assert worker.is_alive()  # the search runs its call again after the plain request
    worker.join(300)
    answer = answers["search"]
    assert answer.usage.completion_tokens == 96
    assert answer.model_extra["alignment"]["engine_calls"] == 1
