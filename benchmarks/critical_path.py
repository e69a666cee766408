"""A request's critical path, from its call timeline, and its replay as plain vLLM calls.

``alignment.trace.timeline`` (``return_trace``; prompts with ``--trace-engine-prompts``)
lists every engine and reward call of one request with its start and end. A call that
started only after another had ended is taken to have waited for it, so the timeline is
a dependency graph (:func:`dependency_graph`). That reading can only add dependencies a
strategy did not have (two independent calls that merely happened one after the other),
never drop one it had, so the replay is never shorter than the strategy's true critical
path on the same engine.

:func:`replay` runs that graph as fast as the engine allows: every engine call becomes a
plain ``/v1/completions`` request to a vLLM server with the same prompt token ids, ``n``,
``max_tokens`` and sampling, and every reward call a sleep of its measured duration (reward
time is part of the bound, as measured). What is left between the strategy's wall time and
the replay's is ttalign's own cost: rendering, scheduling, bookkeeping, HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

#: A call ending at most this long after another started still counts as before it: the
#: timeline's offsets are rounded, and a strategy notes an end just before its next start.
TOLERANCE_SECONDS = 1e-3

Call = Mapping[str, Any]


def dependency_graph(
    timeline: Sequence[Call], tolerance: float = TOLERANCE_SECONDS
) -> list[list[int]]:
    """For each call, the indices of the calls it waited for (every earlier one that ended).

    Call ``j`` depends on call ``i`` when ``i`` started no later than ``j`` (earlier in the
    timeline, which is ordered by start) and ended at or before ``j`` started, within
    ``tolerance``. Only earlier calls qualify, so the graph has no cycles. A call that had
    not ended (``end: None``) is nobody's predecessor.
    """
    order = sorted(range(len(timeline)), key=lambda k: timeline[k]["start"])
    rank = {k: position for position, k in enumerate(order)}
    graph: list[list[int]] = []
    for j, call in enumerate(timeline):
        start = call["start"]
        graph.append(
            [
                i
                for i, other in enumerate(timeline)
                if rank[i] < rank[j]
                and other.get("end") is not None
                and other["end"] <= start + tolerance
            ]
        )
    return graph


def duration(call: Call) -> float:
    """How long a call took (0 for one that never ended)."""
    end = call.get("end")
    return 0.0 if end is None else max(0.0, end - call["start"])


def critical_path_seconds(timeline: Sequence[Call], tolerance: float = TOLERANCE_SECONDS) -> float:
    """The longest chain of recorded call durations through :func:`dependency_graph`.

    The gaps between calls (the strategy's own work) are left out, so this is what the
    request would have taken had each call started the moment its predecessors ended.
    """
    graph = dependency_graph(timeline, tolerance)
    order = sorted(range(len(timeline)), key=lambda k: timeline[k]["start"])
    finish: dict[int, float] = {}
    for j in order:  # predecessors come earlier in this order
        finish[j] = max((finish[i] for i in graph[j]), default=0.0) + duration(timeline[j])
    return max(finish.values(), default=0.0)


def completion_body(call: Call, model: str) -> dict[str, Any]:
    """The plain vLLM ``/v1/completions`` body that repeats a recorded engine call.

    A call made with ``ignore_eos`` generated exactly ``n * max_tokens`` tokens, and is
    repeated as it was. A call that could stop early (a DARWIN mutation, a TPO critique
    without ``ignore_eos``) is repeated with ``ignore_eos`` and ``max_tokens`` set to the
    tokens it actually generated per completion (rounded up), so that the replay does the
    same decoding work rather than whatever a new sample happens to do.
    """
    if "prompt_token_ids" in call:
        prompt: list[int] | str = list(call["prompt_token_ids"])
    elif "prompt_text" in call:
        prompt = call["prompt_text"]
    else:
        raise ValueError(
            "the timeline has no engine prompts: serve ttalign with --trace-engine-prompts"
        )
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "n": call["n"],
        "max_tokens": call["max_tokens"],
        "temperature": call["temperature"],
        "top_p": call["top_p"],
        "ignore_eos": True,
    }
    if not call["ignore_eos"]:
        generated = -(-int(call.get("completion_tokens", 0)) // max(1, call["n"]))
        body["max_tokens"] = max(1, min(call["max_tokens"], generated))
    if call.get("top_k") is not None:
        body["top_k"] = call["top_k"]
    return body


async def _replay_call(call: Call, http: httpx.AsyncClient, vllm_url: str, model: str) -> None:
    if call["kind"] == "reward":
        await asyncio.sleep(duration(call))
        return
    response = await http.post(f"{vllm_url}/v1/completions", json=completion_body(call, model))
    response.raise_for_status()


async def replay(
    timeline: Sequence[Call],
    http: httpx.AsyncClient,
    vllm_url: str,
    model: str,
    *,
    tolerance: float = TOLERANCE_SECONDS,
) -> float:
    """Run the timeline's calls as plain vLLM calls, each once its predecessors are done.

    Returns the wall seconds from the first call's start to the last call's end.
    """
    graph = dependency_graph(timeline, tolerance)
    tasks: dict[int, asyncio.Task[None]] = {}

    async def run(j: int) -> None:
        if graph[j]:
            await asyncio.gather(*(tasks[i] for i in graph[j]))
        await _replay_call(timeline[j], http, vllm_url, model)

    started = time.perf_counter()
    # Predecessors start earlier, so their tasks exist before any call that waits for them.
    for j in sorted(range(len(timeline)), key=lambda k: timeline[k]["start"]):
        tasks[j] = asyncio.ensure_future(run(j))
    try:
        await asyncio.gather(*tasks.values())
    finally:
        pending = [task for task in tasks.values() if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return time.perf_counter() - started


async def replay_concurrently(
    timelines: Sequence[Sequence[Call]],
    http: httpx.AsyncClient,
    vllm_url: str,
    model: str,
    *,
    tolerance: float = TOLERANCE_SECONDS,
) -> float:
    """Replay several requests' timelines at once, as their requests ran; wall seconds of all.

    This is the fair reference for N concurrent requests: the same calls, N at a time,
    sharing the engine's batch as the requests did.
    """
    started = time.perf_counter()
    await asyncio.gather(
        *(replay(timeline, http, vllm_url, model, tolerance=tolerance) for timeline in timelines)
    )
    return time.perf_counter() - started
