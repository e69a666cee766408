"""Reproducibility on the real engine: ``--deterministic`` keeps its promise, on both dtypes.

A seeded best-of-8 request under the judge is sent six times, three alone and three beside
other traffic (plain sampled requests sharing the engine's batches), and must
return the same text and the same rewards each time. It runs once with ``--dtype auto``
(float32 in deterministic mode) and once with bfloat16 forced where it is native (CPUs
with AVX512-BF16; emulated elsewhere, and too slow there for the judge's timeout); on CPUs
with AMX, deterministic bfloat16 is refused at start, and that refusal is what is tested
there.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from ttalign.engine.base import EngineStartupError
from ttalign.engine.vllm_engine import resolve_dtype
from ttalign.server.app import create_app

from tests.conftest import real_engine_settings
from tests.determinism import cpu_has_amx
from tests.servers import RunningServer, serve_in_thread, wait_until_sync

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Give one tip for staying focused while studying."}]
#: Other users' work, sent while the probed request runs.
TRAFFIC = [
    [{"role": "user", "content": f"Write a short poem about the number {i}."}] for i in range(2)
]


@pytest.fixture(scope="module", params=["auto", "bfloat16"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[RunningServer, str]]:
    """A deterministic server and the dtype it must compute in."""
    if request.param == "auto":
        yield request.getfixturevalue("deterministic_server"), "float32"
        return
    if cpu_has_amx():
        pytest.skip("deterministic bfloat16 is refused on AMX CPUs (see the refusal test)")
    import torch

    if not torch.cpu._is_avx512_bf16_supported():
        # Measured on a 2-core CPU without it: emulated bfloat16 is so slow that the judge's
        # ratings beside the other traffic pass its 30 s timeout three times over.
        pytest.skip("bfloat16 is emulated on this CPU, too slow for the judge's timeout")
    settings = real_engine_settings(deterministic=True, dtype="bfloat16", warmup=False)
    with serve_in_thread(create_app(settings)) as running:
        yield running, "bfloat16"


def best_of_8(client: openai.OpenAI, seed: int, messages=QUESTION):
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        seed=seed,
        extra_body={
            "strategy": "best_of_n",
            "strategy_config": {"n": 8, "temperature": 1.0},
            "reward": "judge",
            "return_trace": True,
        },
    )


def traffic(client: openai.OpenAI, pool: ThreadPoolExecutor) -> list:
    """Plain sampled requests of other prompts, sharing the engine's batches."""
    return [
        pool.submit(
            client.chat.completions.create,
            model=MODEL,
            messages=messages,
            max_tokens=48,
            n=2,
            temperature=1.0,
        )
        for messages in TRAFFIC
    ]


def test_seeded_best_of_8_under_the_judge_is_reproducible(
    server: tuple[RunningServer, str],
) -> None:
    server, dtype = server
    engine = server.app.state.engine
    health = httpx.get(f"{server.base_url}/health", timeout=30).json()["engine"]
    assert health["deterministic"] is True and health["prefix_caching"] is False
    assert health["dtype"] == dtype
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    answers = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for attempt in range(6):
            others = traffic(client, pool) if attempt % 2 else []
            if others:  # the probed request joins batches the engine is already running
                wait_until_sync(lambda: engine.engine_running_requests() > 0, timeout=60)
            response = best_of_8(client, seed=7)
            trace = response.model_extra["alignment"]["trace"]
            answers.append(
                (
                    response.choices[0].message.content,
                    tuple(c["text"] for c in trace["candidates"]),
                    tuple(trace["rewards"]),
                )
            )
            for other in others:
                assert other.result(timeout=300).choices[0].message.content is not None
    first = answers[0]
    assert len(set(first[1])) > 1  # sampled candidates, not one greedy text eight times
    assert len(set(first[2])) > 1  # the judge tells them apart
    for again in answers[1:]:
        assert again == first  # exact: the same text, candidates and rewards


def test_deterministic_mode_resolves_its_dtype() -> None:
    assert resolve_dtype("auto", deterministic=True) == "float32"
    assert resolve_dtype("float32", deterministic=True) == "float32"
    if cpu_has_amx():
        with pytest.raises(EngineStartupError, match="AMX"):
            resolve_dtype("bfloat16", deterministic=True)
    else:
        assert resolve_dtype("bfloat16", deterministic=True) == "bfloat16"


def test_default_mode_keeps_prefix_caching_and_deterministic_mode_does_not(
    real_server: RunningServer, deterministic_server: RunningServer
) -> None:
    default = real_server.app.state.engine
    fixed = deterministic_server.app.state.engine
    assert default.deterministic is False and fixed.deterministic is True
    assert default.prefix_caching is True and fixed.prefix_caching is False
