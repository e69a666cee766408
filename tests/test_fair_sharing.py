"""Fair sharing of the engine and prefill metering, on the scripted fake engine.

A search's calls carry a lower scheduling priority than plain requests' and at most
``max_engine_calls_in_flight`` of them run in the engine at once; every call's prefill is
metered per sequence, split into what the engine computed and what its prefix cache held.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import openai
import pytest
from ttalign.engine.base import Generation, Prompt, SamplingSettings
from ttalign.engine.fair_gate import FairGate
from ttalign.engine.metering import MeteredEngine
from ttalign.engine.timeline import CallTimeline
from ttalign.server.app import create_app
from ttalign.server.cli import build_parser, settings_from_args
from ttalign.server.metrics import Metrics
from ttalign.server.serving import SEARCH_PRIORITY
from ttalign.strategies.budget import ComputeBudget
from ttalign.strategies.errors import BudgetExhausted

from tests.conftest import fake_settings
from tests.fakes import FakeEngine
from tests.servers import serve_in_thread

CHAT = [{"role": "user", "content": "Name a colour."}]


class CachingEngine(FakeEngine):
    """A fake engine whose prefix cache holds ``cached`` tokens of every sequence's prompt."""

    cached: int = 3

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        generation = await super().generate(prompt, sampling)
        sequences = len(generation.completions)
        return replace(
            generation,
            prefill_tokens=generation.prompt_tokens * sequences,
            cached_prefill_tokens=self.cached * sequences,
        )


async def test_prefill_is_metered_per_sequence_computed_apart_from_cached() -> None:
    metered = MeteredEngine(CachingEngine())
    await metered.generate("one two three four five", SamplingSettings(n=4, max_tokens=2))
    usage = metered.usage
    assert usage.prompt_tokens == 5  # the prompt, once per call (OpenAI's usage)
    assert usage.prefill_cached_tokens == 4 * 3
    assert usage.prefill_computed_tokens == 4 * (5 - 3)


async def test_an_engine_that_reports_no_prefill_counts_one_full_prefill_per_sequence() -> None:
    metered = MeteredEngine(FakeEngine())
    await metered.generate("one two three", SamplingSettings(n=2, max_tokens=2))
    assert (metered.usage.prefill_computed_tokens, metered.usage.prefill_cached_tokens) == (6, 0)


async def test_streamed_sequences_count_their_prefill_once_each() -> None:
    metered = MeteredEngine(FakeEngine())
    stream = metered.stream("one two three", SamplingSettings(n=3, max_tokens=4))
    deltas = [delta async for delta in stream]
    assert len(deltas) > 3  # several deltas per sequence, one prefill each
    assert metered.usage.prefill_computed_tokens == 3 * 3


def test_the_budget_charges_computed_prefill_and_not_cached_prefill() -> None:
    budget = ComputeBudget(max_engine_tokens=100)
    metered = MeteredEngine(FakeEngine())
    usage = metered.usage
    usage.engine_calls, usage.prompt_tokens = 1, 500
    usage.prefill_cached_tokens, usage.prefill_computed_tokens = 450, 50
    budget.admit(usage, candidates=1, tokens=40)  # 50 computed + 40 fits in 100
    usage.prefill_computed_tokens = 70
    with pytest.raises(BudgetExhausted, match="70 spent"):
        budget.admit(usage, candidates=1, tokens=40)


async def test_every_call_carries_the_request_priority() -> None:
    engine = FakeEngine()
    metered = MeteredEngine(engine, priority=SEARCH_PRIORITY)
    await metered.generate("hi", SamplingSettings(max_tokens=1))
    async for _ in metered.stream("hi", SamplingSettings(max_tokens=1)):
        pass
    assert [call.sampling.priority for call in engine.calls] == [SEARCH_PRIORITY] * 2


async def test_a_request_keeps_at_most_its_cap_of_calls_in_the_engine() -> None:
    engine = FakeEngine(delay=0.05)
    metered = MeteredEngine(engine, max_in_flight=2)
    most = 0

    async def call() -> None:
        nonlocal most
        task = asyncio.ensure_future(metered.generate("hi", SamplingSettings(max_tokens=1)))
        while not task.done():
            most = max(most, engine.running)
            await asyncio.sleep(0.005)
        await task

    await asyncio.gather(*(call() for _ in range(6)))
    assert len(engine.calls) == 6
    assert most == 2


async def test_a_capped_stream_holds_its_slot_until_it_closes() -> None:
    engine = FakeEngine()
    metered = MeteredEngine(engine, max_in_flight=1)
    stream = metered.stream("hi there", SamplingSettings(max_tokens=3))
    await stream.__anext__()
    waiting = asyncio.ensure_future(metered.generate("hi", SamplingSettings(max_tokens=1)))
    await asyncio.sleep(0.02)
    assert not waiting.done()  # the open stream holds the only slot
    await stream.aclose()
    await asyncio.wait_for(waiting, 1)


@pytest.mark.parametrize(
    ("policy", "cap", "search_priority"),
    [("priority", 4, SEARCH_PRIORITY), ("fcfs", 0, 0)],
)
def test_searches_run_behind_plain_requests_through_the_api(
    policy: str, cap: int, search_priority: int
) -> None:
    engine = FakeEngine()
    settings = fake_settings(scheduling_policy=policy, max_engine_calls_in_flight=cap)
    app = create_app(settings, engine_factory=lambda _: engine)
    with serve_in_thread(app) as running:
        client = openai.OpenAI(base_url=running.api_url, api_key="x", max_retries=0)
        response = client.chat.completions.create(
            model="fake-model", messages=CHAT, max_tokens=4, extra_body={"strategy": "none"}
        )
        assert [c.sampling.priority for c in engine.calls] == [0]
        prefill = response.model_extra["alignment"]["engine_prefill"]
        assert prefill["computed_tokens"] == len(engine.calls[0].prompt.split())  # fake: words
        assert prefill["cached_tokens"] == 0
        engine.calls.clear()
        client.chat.completions.create(
            model="fake-model",
            messages=CHAT,
            max_tokens=4,
            extra_body={
                "strategy": "best_of_n",
                "strategy_config": {"n": 4},
                "reward": "rules",
                "constraints": [{"type": "word_count", "max": 2}],
            },
        )
        assert {c.sampling.priority for c in engine.calls} == {search_priority}


async def test_the_fair_gate_holds_searches_back_while_a_plain_request_runs() -> None:
    gate = FairGate(sequences_beside_plain=4)
    order: list[str] = []

    async def search(name: str, sequences: int) -> None:
        async with gate.search(sequences):
            order.append(name)
            await asyncio.sleep(0.01)

    async with gate.search(3):  # a search call already in the engine
        async with gate.plain():
            waiting = [
                asyncio.ensure_future(search("fits", 1)),
                asyncio.ensure_future(search("too big", 9)),
            ]
            await asyncio.sleep(0.02)
            assert order == ["fits"]  # 3 + 1 <= 4 beside the plain request; 9 more waits
            assert gate.plain_in_flight == 1
        await asyncio.sleep(0.02)
        assert order == ["fits", "too big"]  # the plain request left
    await asyncio.gather(*waiting)
    assert gate.search_sequences_in_flight == 0


async def test_a_stream_of_plain_requests_never_starves_searches() -> None:
    gate = FairGate(sequences_beside_plain=0)
    async with gate.plain():
        # Nothing beside plain requests, but one search call always runs.
        async with gate.search(9):
            assert gate.search_sequences_in_flight == 9
            second = asyncio.ensure_future(gate.search(1).__aenter__())
            await asyncio.sleep(0.02)
            assert not second.done()
        await asyncio.wait_for(second, 1)


async def test_the_gate_stays_closed_for_its_linger_after_the_last_plain_request() -> None:
    gate = FairGate(sequences_beside_plain=0, linger_seconds=0.3)
    async with gate.search(1):  # a search call in the engine
        async with gate.plain():
            pass
        # The plain request left, but a client's next one may be a moment away.
        second = gate.search(1)
        waiting = asyncio.ensure_future(second.__aenter__())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        # Nothing notifies the gate when the linger ends; it looks again by itself.
        await asyncio.wait_for(waiting, 2)
        assert gate.search_sequences_in_flight == 2
        await second.__aexit__(None, None, None)
    assert gate.search_sequences_in_flight == 0


async def test_without_a_linger_the_gate_opens_as_the_plain_request_leaves() -> None:
    gate = FairGate(sequences_beside_plain=0)
    async with gate.search(1):
        async with gate.plain():
            waiting = asyncio.ensure_future(gate.search(1).__aenter__())
            await asyncio.sleep(0.02)
            assert not waiting.done()
        await asyncio.wait_for(waiting, 0.2)


@dataclass
class HeldEngine(FakeEngine):
    """A fake engine whose call on the prompt ``held`` runs until :attr:`release` is set."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    #: Calls on ``held`` waiting for the release now.
    holding: int = 0

    async def generate(self, prompt: Prompt, sampling: SamplingSettings) -> Generation:
        generation = await super().generate(prompt, sampling)
        if prompt == "held":
            self.holding += 1
            try:
                await self.release.wait()
            finally:
                self.holding -= 1
        return generation


async def test_metered_calls_take_their_turn_at_the_fair_gate() -> None:
    gate = FairGate()
    engine = HeldEngine()
    plain = MeteredEngine(engine, fair_gate=gate)
    search = MeteredEngine(engine, fair_gate=gate, searches=True)
    first = asyncio.ensure_future(search.generate("held", SamplingSettings(max_tokens=1)))
    while not engine.calls:
        await asyncio.sleep(0)
    async with gate.plain():  # a plain request in the engine
        served = await plain.generate("b", SamplingSettings(max_tokens=1))
        held = asyncio.ensure_future(search.generate("c", SamplingSettings(n=2, max_tokens=1)))
        for _ in range(20):
            await asyncio.sleep(0)
        # One search call is in the engine; another waits while plain requests run.
        assert [call.prompt for call in engine.calls] == ["held", "b"]
    await asyncio.wait_for(held, 5)
    engine.release.set()
    await asyncio.wait_for(first, 5)
    assert served.completions and [call.prompt for call in engine.calls] == ["held", "b", "c"]


async def _until(condition: object, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def test_a_plain_request_preempts_a_search_call_that_runs_again_after_it() -> None:
    gate = FairGate(preempt=True, exclusive_seconds=10)
    engine = HeldEngine()
    timeline = CallTimeline()
    search = MeteredEngine(engine, timeline, fair_gate=gate, searches=True)
    call = asyncio.ensure_future(search.generate("held", SamplingSettings(n=2, max_tokens=1)))
    await _until(lambda: engine.holding == 1)
    async with gate.plain():
        # Aborted at once, and kept out while the plain request runs (its exclusive spell).
        await _until(lambda: engine.holding == 0)
        assert gate.preemptions == 1 and gate.search_sequences_in_flight == 0
        await asyncio.sleep(0.02)
        assert len(engine.calls) == 1 and not call.done()
    await _until(lambda: engine.holding == 1)  # run again once the plain request left
    async with gate.plain():  # a preempted call is never preempted twice
        await asyncio.sleep(0.02)
        assert engine.holding == 1 and gate.preemptions == 1
    engine.release.set()
    generation = await asyncio.wait_for(call, 2)
    assert len(generation.completions) == 2
    assert [c.prompt for c in engine.calls] == ["held", "held"]
    # One call for the request's metering; the timeline shows the aborted attempt.
    assert search.usage.engine_calls == 1 and search.usage.candidates_generated == 2
    assert [record.aborted for record in timeline.calls()] == [True, False]


async def test_steady_plain_traffic_lets_one_search_call_in_after_the_exclusive_spell() -> None:
    gate = FairGate(preempt=True, exclusive_seconds=0.2)
    async with gate.plain():
        started = asyncio.get_running_loop().time()
        async with gate.search(3):  # no notification comes: the gate looks again by itself
            waited = asyncio.get_running_loop().time() - started
            assert 0.15 <= waited < 1.5
            second = asyncio.ensure_future(gate.search(1).__aenter__())
            await asyncio.sleep(0.05)
            assert not second.done()  # one call at a time beside plain requests
        await asyncio.wait_for(second, 1)


async def test_cancelling_a_preemptible_search_call_cancels_it_rather_than_rerunning() -> None:
    gate = FairGate(preempt=True)
    engine = HeldEngine()
    search = MeteredEngine(engine, fair_gate=gate, searches=True)
    call = asyncio.ensure_future(search.generate("held", SamplingSettings(max_tokens=1)))
    await _until(lambda: engine.holding == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.02)
    assert engine.holding == 0 and len(engine.calls) == 1
    assert gate.preemptions == 0 and gate.search_sequences_in_flight == 0


async def test_plain_calls_and_search_streams_are_never_preempted() -> None:
    gate = FairGate(preempt=True)
    engine = HeldEngine()
    plain = MeteredEngine(engine, fair_gate=gate)
    search = MeteredEngine(engine, fair_gate=gate, searches=True)
    first = asyncio.ensure_future(plain.generate("held", SamplingSettings(max_tokens=1)))
    stream = search.stream("streamed", SamplingSettings(max_tokens=3))
    await stream.__anext__()
    await _until(lambda: engine.holding == 1)
    async with gate.plain():
        await asyncio.sleep(0.02)
    assert gate.preemptions == 0 and not first.done()
    assert [delta async for delta in stream]  # the stream goes on where it was
    engine.release.set()
    await asyncio.wait_for(first, 2)


def test_metrics_export_the_fair_gate() -> None:
    gate = FairGate(preempt=True)
    gate.preemptions = 3
    metrics = Metrics()
    metrics.watch_fair_gate(gate)
    text = metrics.render().decode()
    assert "ttalign_search_calls_preempted_total 3.0" in text
    assert "ttalign_plain_calls_in_flight 0.0" in text
    assert "ttalign_search_sequences_in_flight 0.0" in text


def test_the_fair_gate_is_on_in_process_and_off_in_front_of_a_fleet_unless_set() -> None:
    assert fake_settings().resolved_fair_gate()
    remote = {"engine": "remote", "engine_urls": "http://127.0.0.1:9"}
    # One gate over every replica would hold all searches back for a plain request on one.
    assert not fake_settings(**remote).resolved_fair_gate()
    assert fake_settings(**remote, fair_gate=True).resolved_fair_gate()
    assert not fake_settings(fair_gate=False).resolved_fair_gate()


def test_the_fair_gate_flags_parse_to_on_off_and_unset() -> None:
    parser = build_parser()
    for flags, expected in (([], None), (["--fair-gate"], True), (["--no-fair-gate"], False)):
        args = parser.parse_args(["serve", "--model", "m", *flags])
        assert settings_from_args(args).fair_gate is expected


async def test_preemption_leaves_the_search_sequences_allowed_beside_plain_requests() -> None:
    gate = FairGate(sequences_beside_plain=3, preempt=True, exclusive_seconds=10)
    release = asyncio.Event()
    finished: list[str] = []

    async def call(name: str) -> str:
        await release.wait()
        finished.append(name)
        return name

    calls = [
        asyncio.ensure_future(gate.run_search(n, lambda name=name: call(name)))
        for name, n in (("old", 2), ("new", 2))
    ]
    await _until(lambda: gate.search_sequences_in_flight == 4)
    async with gate.plain():
        # Only the newest call goes: the older one's 2 sequences fit beside the plain request.
        await _until(lambda: gate.search_sequences_in_flight == 2)
        assert gate.preemptions == 1
        release.set()
        # Once the old call ends, the new one fits beside the plain request and runs again.
        await _until(lambda: finished == ["old", "new"])
    assert await asyncio.gather(*calls) == ["old", "new"]


async def test_preemption_within_a_window_spares_calls_that_have_run_longer() -> None:
    gate = FairGate(preempt=True, exclusive_seconds=10, preempt_within_seconds=0.1)
    release = asyncio.Event()

    async def call(name: str) -> str:
        await release.wait()
        return name

    old = asyncio.ensure_future(gate.run_search(1, lambda: call("old")))
    await _until(lambda: gate.search_sequences_in_flight == 1)
    await asyncio.sleep(0.2)  # decoding by now: an abort would waste it
    new = asyncio.ensure_future(gate.run_search(1, lambda: call("new")))
    await _until(lambda: gate.search_sequences_in_flight == 2)
    async with gate.plain():
        await _until(lambda: gate.search_sequences_in_flight == 1)
        assert gate.preemptions == 1  # the young call only
        release.set()
        assert await asyncio.wait_for(old, 1) == "old"
    assert await asyncio.wait_for(new, 1) == "new"
