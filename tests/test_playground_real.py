"""The playground on the real engine: the page loads, runs none and best_of_n, and draws
best_of_n's candidates and the call timeline from what the real strategies returned."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import RunningServer
from tests.test_playground import open_playground, run, shown_alignment, watched_page

pytestmark = pytest.mark.real_engine

#: The rule verifiers score without a model call (the default judge would run the engine).
CONSTRAINTS = '[{"type": "word_count", "max": 12}]'


@pytest.fixture(scope="module")
def server(serve_on_real_engine) -> Iterator[RunningServer]:
    with serve_on_real_engine(playground=True) as running:
        yield running


@pytest.fixture
def page(browser: Any, server: RunningServer) -> Iterator[Any]:
    for watched in watched_page(browser, server):
        watched.set_default_timeout(180_000)  # a CPU engine on a busy machine
        yield watched


def test_the_page_loads_from_the_real_server(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    models = page.locator("#model option").evaluate_all("os => os.map(o => o.value)")
    assert models == ["smollm2"]
    assert "best_of_n" in page.locator("#strategy-a option").all_text_contents()


def test_none_streams_its_text(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    assert run(page, "none", max_tokens="16", seed="3") == "done"
    assert page.locator("#result-a .stream").first.text_content().strip()
    assert int(page.get_attribute("#result-a", "data-chunks")) > 1


def test_best_of_n_draws_its_candidates_and_timeline(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    page.select_option("#reward", "rules")
    page.fill("#constraints", CONSTRAINTS)
    assert run(page, "best_of_n", {"n": 4}, max_tokens="16", seed="5") == "done"
    assert page.locator("#result-a .stream").first.text_content().strip()
    trace = shown_alignment(page)["trace"]
    rows = page.locator("#result-a table.candidates tbody tr")
    assert rows.count() == len(trace["candidates"]) == 4
    bars = page.locator("#result-a svg.gantt rect.bar")
    assert bars.count() == len(trace["timeline"]) >= 2
    assert page.locator("#result-a svg.gantt rect.bar.critical").count() >= 1
