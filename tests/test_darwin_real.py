"""darwin on the real engine, through the official openai client: the rules reward and the judge.

The settings are small but chosen so that every part of the search runs: three beams and
``keep: 2`` make one replacement per step certain, and ``ignore_eos`` with ``max_tokens``
three replacement periods long keeps every beam alive for exactly three steps (the first
two score and replace; after the third every beam has finished and only the final scoring
runs).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.servers import RunningServer, validated_chunks, wait_until

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
INSTRUCTION = "Describe the sea in one short sentence."
QUESTION = [{"role": "user", "content": INSTRUCTION}]
MAX_TOKENS = 24
PERIOD = 8
MUTATIONS = 3
KEEP = 2
#: Steps of the one cycle: two with replacement, then the one that ends every beam.
STEPS = MAX_TOKENS // PERIOD
FAST = {
    "cycles": 1,
    "mutations": MUTATIONS,
    "replacement_period": PERIOD,
    "keep": KEEP,
    "mutation": {"max_tokens": 96},
}
#: Graded: a partial or complete reply meets any number of these four.
CONSTRAINTS = [
    {"type": "keywords", "required": ["sea"]},
    {"type": "keywords", "forbidden": ["the"]},
    {"type": "word_count", "max": 16},
    {"type": "case", "case": "lower"},
]
#: The rules reward is named by the request, the judge by the strategy's own config.
REWARDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "rules": ({}, {"reward": "rules", "constraints": CONSTRAINTS}),
    "judge": ({"reward": "judge"}, {}),
}


@pytest.fixture(scope="module")
def client(real_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)


def request(reward: str, *, n: int = 1, config: dict | None = None, **extra: Any) -> dict:
    """Keyword arguments of ``chat.completions.create`` for one DARWIN request."""
    strategy_config, fields = REWARDS[reward]
    return {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": MAX_TOKENS,
        "seed": 7,
        "n": n,
        "extra_body": {
            "strategy": "darwin",
            "strategy_config": {**FAST, **strategy_config, **(config or {})},
            "ignore_eos": True,
            "return_trace": True,
            **fields,
            **extra,
        },
    }


def whole(client: openai.OpenAI, reward: str, n: int = 1) -> ChatCompletion:
    """A non-streamed request; the raw body is validated against the SDK's model."""
    raw = client.chat.completions.with_raw_response.create(**request(reward, n=n))
    return ChatCompletion.model_validate(raw.http_response.json())


def streamed(client: openai.OpenAI, reward: str) -> list[ChatCompletionChunk]:
    """A streamed request; every raw SSE event is validated against the SDK's chunk model."""
    return validated_chunks(client, request(reward))


@pytest.fixture(scope="module")
def responses(client: openai.OpenAI) -> dict[str, Any]:
    """Both rewards, streamed and not, run at once so that the engine batches them."""
    with ThreadPoolExecutor(4) as pool:
        futures = {
            ("whole", "rules"): pool.submit(whole, client, "rules", 2),
            ("whole", "judge"): pool.submit(whole, client, "judge"),
            ("stream", "rules"): pool.submit(streamed, client, "rules"),
            ("stream", "judge"): pool.submit(streamed, client, "judge"),
        }
        return {key: future.result() for key, future in futures.items()}


def ranked(candidates: list[dict]) -> list[dict]:
    """Scored, non-empty candidates, best first, a tie to the earlier; distinct texts only."""
    usable = [c for c in candidates if c["score"] is not None and c["text"].strip()]
    order = sorted(usable, key=lambda c: c["score"], reverse=True)  # stable: earlier first
    seen: set[str] = set()
    distinct = []
    for candidate in order:
        if candidate["text"].strip() not in seen:
            seen.add(candidate["text"].strip())
            distinct.append(candidate)
    return distinct


def check_search(alignment: dict[str, Any], answers: list[str]) -> None:
    """The trace shows the mutation and the replacements; the answers are the top-scored."""
    assert alignment["strategy"] == "darwin"
    assert alignment["stopped_early"] is False and alignment["stopped_by"] is None
    assert alignment["cycles_completed"] == alignment["rounds"] == 1
    trace = alignment["trace"]
    assert trace["mode"] == "darwin" and trace["cycles"] == 1 and trace["stop_reason"] is None
    assert trace["original_instruction"] == INSTRUCTION

    (cycle,) = trace["cycle_records"]
    assert cycle["completed"] and cycle["drawn"] == INSTRUCTION  # the archive held I0 alone
    variants = cycle["mutation"]["variants"]
    assert len(variants) == MUTATIONS and all(v.strip() for v in variants)
    assert cycle["mutation"]["text"].startswith("1.")

    steps = cycle["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for number, step in enumerate(steps, 1):
        assert [b["tokens"] for b in step["beams"]] == [number * PERIOD] * MUTATIONS
        assert [b["instruction"] for b in step["beams"]] == list(range(MUTATIONS))
    for step in steps[:-1]:
        assert len(step["kept"]) == KEEP
        assert len(step["replacements"]) == MUTATIONS - KEEP
        for replacement in step["replacements"]:
            assert replacement["beam"] not in step["kept"] and replacement["from"] in step["kept"]
        scores = [b["score"] for b in step["beams"]]
        worst_kept = min(scores[i] for i in step["kept"])
        assert all(scores[r["beam"]] <= worst_kept for r in step["replacements"])
    assert all(b["finished"] for b in steps[-1]["beams"]) and "replacements" not in steps[-1]

    # A beam replaced at the last replacement step continued the copied tokens: its reply
    # and its source's share their first 2 * PERIOD tokens.
    final = cycle["final"]
    assert len(final) == MUTATIONS
    for replacement in steps[-2]["replacements"]:
        copied = final[replacement["beam"]]["text"]
        source = final[replacement["from"]]["text"]
        shared = next(
            (i for i, (a, b) in enumerate(zip(copied, source, strict=False)) if a != b),
            min(len(copied), len(source)),
        )
        assert shared >= 10, (copied, source)
    promoted = cycle["promoted"]
    assert len(promoted) == 2 and all(p["instruction"] in variants for p in promoted)

    # Every candidate: the seed, then the cycle's beams as complete replies.
    candidates = trace["candidates"]
    assert [c["round"] for c in candidates] == [0] + [1] * MUTATIONS
    assert candidates[0]["text"] == trace["seed"]["text"]
    assert [c["text"] for c in candidates[1:]] == [b["text"] for b in final]
    assert [c["score"] for c in candidates[1:]] == [b["score"] for b in final]
    assert alignment["candidates_scored"] >= len({c["text"] for c in candidates})

    archive = trace["archive"]
    assert [a["cycle"] for a in archive] == [0, 1]
    assert archive[0]["archive"] == [{"instruction": INSTRUCTION, "reward": candidates[0]["score"]}]
    assert alignment["archive_size"] == len(archive[-1]["archive"]) >= 1
    for entry in archive[-1]["archive"]:
        assert entry["instruction"] == INSTRUCTION or entry["instruction"] in variants

    top = ranked(candidates)
    assert answers == [c["text"] for c in top[: len(answers)]]
    assert alignment["rewards"] == pytest.approx([c["score"] for c in top[: len(answers)]])
    assert top[0]["score"] == max(c["score"] for c in candidates if c["score"] is not None)


@pytest.mark.parametrize("reward", sorted(REWARDS))
def test_non_streamed_darwin_returns_the_top_scored_candidate(
    responses: dict[str, Any], reward: str
) -> None:
    response: ChatCompletion = responses["whole", reward]
    answers = [choice.message.content for choice in response.choices]
    check_search(response.model_extra["alignment"], answers)
    assert all(choice.finish_reason == "length" for choice in response.choices)
    assert response.usage.completion_tokens == MAX_TOKENS * len(answers)


def test_n_gives_distinct_choices_best_first(responses: dict[str, Any]) -> None:
    response: ChatCompletion = responses["whole", "rules"]
    assert [choice.index for choice in response.choices] == [0, 1]
    texts = [choice.message.content.strip() for choice in response.choices]
    assert len(set(texts)) == 2
    rewards = response.model_extra["alignment"]["rewards"]
    assert rewards == sorted(rewards, reverse=True)


@pytest.mark.parametrize("reward", sorted(REWARDS))
def test_streamed_darwin_reports_progress_then_the_answer(
    responses: dict[str, Any], reward: str
) -> None:
    chunks: list[ChatCompletionChunk] = responses["stream", reward]
    extras = [chunk.model_extra or {} for chunk in chunks]
    # A keep-alive at once: no choices, no progress, no alignment.
    assert chunks[0].choices == [] and not extras[0]

    alignment = extras[-1]["alignment"]
    assert chunks[-1].choices == []
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_search(alignment, [answer])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["length"] and finishes[-1] == "length"

    # Progress after each replacement step and after the cycle, all before the answer.
    positions = [i for i, extra in enumerate(extras) if extra.get("alignment_progress")]
    first_content = next(i for i, c in enumerate(chunks) if c.choices)
    assert positions and max(positions) < first_content
    progress = [extras[i]["alignment_progress"] for i in positions]
    steps = alignment["trace"]["cycle_records"][0]["steps"]
    replacing = [s["step"] for s in steps if s.get("replacements")]
    assert [(p["phase"], p.get("step")) for p in progress] == [
        *(("step", number) for number in replacing),
        ("cycle", None),
    ]
    for report in progress:
        assert {"best_reward", "beams_alive", "archive_size"} <= report.keys()
        assert report["cycle"] == 1 and report["cycles"] == 1 and report["archive_size"] >= 1
    for report, number in zip(progress[:-1], replacing, strict=True):
        assert report["beams_alive"] == MUTATIONS
        scores = [b["score"] for b in steps[number - 1]["beams"]]
        assert report["step_best_reward"] == pytest.approx(max(scores))
    last = progress[-1]
    assert last["beams_alive"] == 0
    assert last["archive_size"] == alignment["archive_size"]
    assert last["best_reward"] == pytest.approx(alignment["rewards"][0])


def test_darwin_refuses_what_it_cannot_honour(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request("rules"), logprobs=True)
    assert caught.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request("rules"), response_format={"type": "json_object"})
    assert caught.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request("rules", config={"reward": "no-such-reward"}))
    assert caught.value.body["param"] == "strategy_config.reward"


def test_at_the_deadline_darwin_returns_its_best_so_far(client: openai.OpenAI) -> None:
    started = time.monotonic()
    kwargs = request("rules", config={"cycles": 8}, deadline_seconds=3.0)
    kwargs["max_tokens"] = 400
    answer = client.chat.completions.create(**kwargs)
    assert time.monotonic() - started < 10
    alignment = answer.model_extra["alignment"]
    assert alignment["stopped_early"] is True and alignment["stopped_by"] == "deadline"
    assert alignment["cycles_completed"] < 8
    assert answer.choices[0].message.content


async def test_a_disconnect_aborts_every_beam_and_every_judge_call(
    real_server: RunningServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)
    engine = real_server.app.state.engine

    # Long enough that the search is still running when the client goes away; the judge's
    # calls run on the same engine, so no running engine request means no reward call left.
    kwargs = request("judge", config={"cycles": 4})
    kwargs["max_tokens"] = 300
    task = asyncio.create_task(client.chat.completions.create(**kwargs))
    await wait_until(lambda: engine.engine_running_requests() > 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(lambda: engine.engine_running_requests() == 0, timeout=10)

    stream = await client.chat.completions.create(stream=True, **kwargs)
    seen = []
    async for chunk in stream:
        seen.append(chunk)
        progress = (chunk.model_extra or {}).get("alignment_progress") or {}
        if progress.get("phase") == "step" and engine.engine_running_requests() > 0:
            break
        assert not chunk.choices, seen
    else:
        raise AssertionError(f"the stream ended before the beams got going: {seen}")
    await stream.close()
    await wait_until(lambda: engine.engine_running_requests() == 0, timeout=10)
    await client.close()
