"""The browser playground at /playground, driven in Chromium over the scripted fake engine.

Playwright cannot download browsers here: the ``browser`` fixture (tests/conftest.py)
launches the system's Chromium (``./run test`` installs Debian's package when it is
missing) and fails, never skips, without one. The server is the demo app of
``benchmarks/playground_screenshots.py``: ttalign over ``tests.fakes``' engine, with a
scripted model that answers every strategy's calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ttalign.benchmarks.critical_path import critical_path_seconds
from ttalign.benchmarks.playground_screenshots import configure_strategy, demo_app
from ttalign.server.playground.routes import shipped_assets

from tests.servers import RunningServer, serve_in_thread

API_KEY = "playground-test-key"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve_in_thread(demo_app()) as running:
        yield running


@pytest.fixture
def page(browser: Any, server: RunningServer) -> Iterator[Any]:
    yield from watched_page(browser, server)


def watched_page(browser: Any, server: RunningServer) -> Iterator[Any]:
    """A fresh page (its own context: no key or storage shared) that fails the test on
    script errors and on any request leaving the server's origin. ``page.requests`` lists
    every request it made."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console error: {message.text}")
            # The browser logs every non-2xx answer; those the tests expect are asserted on.
            if message.type == "error" and not message.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on(
        "request",
        lambda request: (
            None
            if request.url.startswith(server.base_url) or request.url.startswith("data:")
            else problems.append(f"request left the page's origin: {request.url}")
        ),
    )
    requests: list[Any] = []
    page.requests = requests  # type: ignore[attr-defined]
    page.on("request", lambda request: requests.append(request))
    yield page
    context.close()
    assert not problems, "\n".join(problems)


def open_playground(page: Any, server: RunningServer) -> None:
    page.goto(f"{server.base_url}/playground")
    page.wait_for_selector("body[data-ready='true']", state="attached")


def run(page: Any, strategy: str, config: dict[str, Any] | None = None, **fields: str) -> str:
    """Run one request from the form; the result pane's final state (done or error)."""
    configure_strategy(page, strategy, config or {})
    for field_id, value in fields.items():
        page.fill(f"#{field_id.replace('_', '-')}", value)
    page.click("#run")
    page.wait_for_selector("#result-a[data-state='done'], #result-a[data-state='error']")
    return page.get_attribute("#result-a", "data-state")


def shown_alignment(page: Any, side: str = "a") -> dict[str, Any]:
    """The alignment object the pane received (its raw JSON block)."""
    text = page.locator(f"#result-{side} details.json pre").last.text_content()
    return json.loads(text)


# --- serving ---------------------------------------------------------------------------------


def test_page_and_assets_are_served_with_a_strict_csp(server: RunningServer) -> None:
    page = httpx.get(f"{server.base_url}/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe" not in csp
    referenced = re.findall(r'(?:src|href)="playground/([^"]+)"', page.text)
    assert {"main.js", "playground.css"} <= set(referenced)
    for name in shipped_assets():
        asset = httpx.get(f"{server.base_url}/playground/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-security-policy"] == csp
        assert asset.headers["x-content-type-options"] == "nosniff"
    # Nothing outside the shipped files: no traversal, no listing.
    for path in ("/playground/..%2Fapp.py", "/playground/routes.py", "/playground/nope.js"):
        missing = httpx.get(f"{server.base_url}{path}")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"


def test_the_routes_stay_out_of_the_openapi_document(server: RunningServer) -> None:
    paths = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/playground")]


def test_the_page_loads_the_lists_from_the_api(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    strategies = httpx.get(f"{server.api_url}/strategies").json()["data"]
    options = page.locator("#strategy-a option").evaluate_all("os => os.map(o => o.value)")
    assert options == [s["name"] for s in strategies]
    assert page.locator("#model option").evaluate_all("os => os.map(o => o.value)") == [
        "demo-model"
    ]
    rewards = page.locator("#reward option").evaluate_all("os => os.map(o => o.value)")
    assert rewards == ["", "demo"]


# --- running ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["none", "best_of_n"])
def test_a_run_streams_its_text_into_the_page(
    page: Any, server: RunningServer, strategy: str
) -> None:
    open_playground(page, server)
    assert run(page, strategy, max_tokens="12") == "done"
    text = page.locator("#result-a .stream").first.text_content()
    assert text.strip(), "no streamed text"
    chunks = int(page.get_attribute("#result-a", "data-chunks"))
    # none streams token by token; best_of_n sends its chosen answer once it has it.
    assert chunks > 1 if strategy == "none" else chunks >= 1
    alignment = shown_alignment(page)
    assert alignment["strategy"] == strategy
    sent = [r for r in page.requests if r.url.endswith("/v1/chat/completions")]
    body = json.loads(sent[-1].post_data)
    assert body["stream"] is True and body["return_trace"] is True
    assert body["strategy"] == strategy and body["max_tokens"] == 12
    assert "strategy_config" not in body, "unchanged defaults are not sent"


@pytest.mark.parametrize(
    ("strategy", "config"), [("best_of_n", {"n": 6}), ("tpo", {"depth": 1, "width": 3})]
)
def test_candidates_and_gantt_match_the_response(
    page: Any, server: RunningServer, strategy: str, config: dict[str, Any]
) -> None:
    open_playground(page, server)
    assert run(page, strategy, config, max_tokens="12") == "done"
    sent = [r for r in page.requests if r.url.endswith("/v1/chat/completions")]
    assert json.loads(sent[-1].post_data)["strategy_config"] == config
    trace = shown_alignment(page)["trace"]
    bars = page.locator("#result-a svg.gantt rect.bar")
    assert bars.count() == len(trace["timeline"]) > 0
    engine_calls = [c for c in trace["timeline"] if c["kind"] == "engine"]
    assert page.locator("#result-a svg.gantt rect.bar.engine").count() == len(engine_calls)
    assert page.locator("#result-a svg.gantt rect.bar.critical").count() >= 1
    if strategy == "best_of_n":
        rows = page.locator("#result-a table.candidates tbody tr")
        assert rows.count() == len(trace["candidates"]) == 6
        rewards = [float(r) for r in rows.locator("td:nth-child(3)").all_text_contents()]
        assert rewards == sorted(rewards, reverse=True), "ranked by reward"
        assert page.locator("#result-a table.candidates tr.chosen").count() == 1
        assert page.locator("#result-a table.candidates svg.strip").count() == 6
    else:
        rounds = page.locator("#result-a .trace-view section.round")
        assert rounds.count() == 1 + len(trace["rounds"])


def test_the_critical_path_matches_the_python_definition(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    # b and the short d overlap a; c waited for all three, and b is the longest way to it.
    timeline = [
        {"kind": "engine", "start": 0.0, "end": 1.0},
        {"kind": "engine", "start": 0.0, "end": 2.0},
        {"kind": "reward", "start": 2.0, "end": 3.0},
        {"kind": "engine", "start": 1.0, "end": 1.5},
        {"kind": "engine", "start": 0.5, "end": None},
    ]
    path = page.evaluate(
        "async (t) => (await import('./playground/gantt.js')).criticalPath(t)", timeline
    )
    assert path == [1, 2]
    seconds = sum(timeline[i]["end"] - timeline[i]["start"] for i in path)
    assert seconds == pytest.approx(critical_path_seconds(timeline))


def _expected_fields(schema: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every property path of a config schema, with the input kind it must get."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **rest}
        return node

    def walk(properties: dict[str, Any], prefix: str) -> Iterator[tuple[str, str, dict]]:
        for name, raw in properties.items():
            path = f"{prefix}{name}"
            node = resolve(raw)
            if "anyOf" in node:
                others = [b for b in node["anyOf"] if b.get("type") != "null"]
                if len(others) != 1:
                    yield path, "json", node
                    continue
                node = resolve(others[0])
            if "enum" in node or "const" in node:
                yield path, "enum", node
            elif node.get("type") in ("integer", "number", "boolean", "string"):
                yield path, node["type"], node
            elif node.get("type") == "object" and "properties" in node:
                yield path, "object", node
                yield from walk(node["properties"], f"{path}.")
            else:
                yield path, "json", node

    return {path: (kind, node) for path, kind, node in walk(schema.get("properties", {}), "")}


#: The element each kind of field must be: (tag, input type).
ELEMENTS = {
    "enum": ("SELECT", None),
    "integer": ("INPUT", "number"),
    "number": ("INPUT", "number"),
    "boolean": ("INPUT", "checkbox"),
    "string": ("INPUT", "text"),
    "json": ("INPUT", "text"),
    "object": ("FIELDSET", None),
}


def test_each_strategy_form_matches_its_schema(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    strategies = httpx.get(f"{server.api_url}/strategies").json()["data"]
    checked = 0
    for strategy in strategies:
        form = page.locator(f'#config-a [data-strategy="{strategy["name"]}"]')
        expected = _expected_fields(strategy["config_schema"])
        shown = form.locator("[data-path]").evaluate_all("es => es.map(e => e.dataset.path)")
        assert sorted(shown) == sorted(expected), strategy["name"]
        for path, (kind, node) in expected.items():
            field = form.locator(f'[data-path="{path}"]')
            tag, input_type = field.evaluate("e => [e.tagName, e.getAttribute('type')]")
            where = f"{strategy['name']}.{path}"
            assert field.get_attribute("data-kind") == kind, where
            assert (tag, input_type) == ELEMENTS[kind], where
            if kind == "enum":
                options = field.locator("option").evaluate_all("os => os.map(o => o.value)")
                assert [o for o in options if o] == [str(v) for v in node.get("enum", [])], where
            if kind in ("integer", "number"):
                for attribute, keys in (
                    ("min", ("minimum", "exclusiveMinimum")),
                    ("max", ("maximum", "exclusiveMaximum")),
                ):
                    bound = next((node[k] for k in keys if k in node), None)
                    shown_bound = field.get_attribute(attribute)
                    assert (None if shown_bound is None else float(shown_bound)) == bound, where
            checked += 1
    assert checked > 40, "the schemas have fewer fields than expected"


def test_changed_nested_and_json_fields_are_sent(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    configure_strategy(page, "tpo", {"depth": 1, "width": 2, "generation.temperature": 0.3})
    page.fill("#max-tokens", "8")
    page.click("#run")
    page.wait_for_selector("#result-a[data-state='done']")
    configure_strategy(page, "rain", {"segment_lengths": "[1, 2]", "max_iterations": 4})
    page.click("#run")
    page.wait_for_selector("#result-a[data-state='done']")
    bodies = [json.loads(r.post_data) for r in page.requests if r.url.endswith("/chat/completions")]
    assert bodies[0]["strategy_config"] == {
        "depth": 1,
        "width": 2,
        "generation": {"temperature": 0.3},
    }
    assert bodies[1]["strategy_config"] == {"segment_lengths": [1, 2], "max_iterations": 4}


def test_a_refused_config_shows_the_servers_message(page: Any, server: RunningServer) -> None:
    body = {
        "model": "demo-model",
        "messages": [{"role": "user", "content": "hi"}],
        "strategy": "best_of_n",
        "strategy_config": {"n": 0},
    }
    refusal = httpx.post(f"{server.api_url}/chat/completions", json=body)
    assert refusal.status_code == 400
    message = refusal.json()["error"]["message"]
    open_playground(page, server)
    assert run(page, "best_of_n", {"n": 0}) == "error"
    shown = page.locator("#result-a .error").text_content()
    assert message in shown and "400" in shown and "strategy_config.n" in shown


def test_bad_json_in_the_form_is_caught_before_sending(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    configure_strategy(page, "rain", {"segment_lengths": "[1, 2"})
    page.click("#run")
    assert "strategy_config.segment_lengths" in page.locator("#form-error").text_content()
    assert not [r for r in page.requests if r.url.endswith("/chat/completions")]


# --- trace views and compare -----------------------------------------------------------------


def test_every_trace_view_draws_its_trace(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    view = "#result-a .trace-view"
    rain = {"max_iterations": 4, "first_width": 3, "width": 2}
    assert run(page, "rain", rain, max_tokens="6") == "done"
    trace = shown_alignment(page)["trace"]
    commits = [c for s in trace["searches"] for c in s["commits"]]
    assert page.locator(f"{view} svg.rain-tree").count() == len(commits) > 0
    assert page.locator(f"{view} .segment").count() == len(commits)

    assert run(page, "darwin", {"cycles": 1, "mutations": 2, "replacement_period": 3}) == "done"
    trace = shown_alignment(page)["trace"]
    assert page.locator(f"{view} table.archive thead th").count() == 1 + len(trace["archive"])
    steps = trace["cycle_records"][0]["steps"]
    assert page.locator(f"{view} table.steps thead th").count() == len(steps) + 2
    kept = sum(len(step.get("kept", [])) for step in steps)
    assert page.locator(f"{view} table.steps td.kept").count() == kept > 0

    assert run(page, "adaptive_temperature", {"level": "token", "head": "demo-token"}) == "done"
    trace = shown_alignment(page)["trace"]
    temperatures = trace["choices"][0]["token_temperatures"]
    tokens = page.locator(f"{view} span.token")
    assert tokens.count() == len(temperatures) > 0
    assert "".join(tokens.all_text_contents()) == page.locator("#result-a .stream").text_content()


def test_compare_runs_two_strategies_side_by_side(page: Any, server: RunningServer) -> None:
    open_playground(page, server)
    page.check("#compare")
    configure_strategy(page, "best_of_n", {"n": 3}, "a")
    configure_strategy(page, "tpo", {"depth": 1, "width": 2}, "b")
    page.fill("#max-tokens", "8")
    page.click("#run")
    page.wait_for_selector("#comparison")
    assert page.get_attribute("#result-a", "data-state") == "done"
    assert page.get_attribute("#result-b", "data-state") == "done"
    headers = page.locator("#comparison thead th").all_text_contents()
    assert headers == ["", "best_of_n", "tpo"]
    rows = {
        row.locator("th").text_content(): row.locator("td").all_text_contents()
        for row in page.locator("#comparison tbody tr").all()
    }
    for side, column in (("a", 0), ("b", 1)):
        alignment = shown_alignment(page, side)
        assert rows["engine tokens"][column] == str(alignment["engine_tokens"]["total_tokens"])
        assert float(rows["reward"][column]) == pytest.approx(alignment["rewards"][0], abs=1e-3)
        assert float(rows["elapsed (s)"][column]) == pytest.approx(
            alignment["elapsed_seconds"], abs=1e-3
        )


# --- API key and the setting -----------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[RunningServer]:
    with serve_in_thread(demo_app(api_key=API_KEY)) as running:
        yield running


def test_behind_an_api_key_the_page_asks_for_it(browser: Any, keyed_server: RunningServer) -> None:
    assert httpx.get(f"{keyed_server.base_url}/playground").status_code == 200
    for name in shipped_assets():
        assert httpx.get(f"{keyed_server.base_url}/playground/{name}").status_code == 200
    assert httpx.get(f"{keyed_server.api_url}/models").status_code == 401

    for page in watched_page(browser, keyed_server):
        page.goto(f"{keyed_server.base_url}/playground")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong-key")
        page.click("#key-ok")
        # A wrong key is refused by the server, and the page asks again with its message.
        # A locator wait, not wait_for_function: a string predicate is eval'd in the page,
        # which the playground's CSP (script-src 'self') rightly refuses in newer Chromium.
        page.locator("#key-message", has_text="Incorrect").wait_for()
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", API_KEY)
        page.click("#key-ok")
        page.wait_for_selector("body[data-ready='true']", state="attached")
        assert page.locator("#key-dialog[open]").count() == 0
        assert run(page, "none", max_tokens="6") == "done"
        stored = page.evaluate(
            "() => JSON.stringify([{...localStorage}, {...sessionStorage}, document.cookie])"
        )
        assert API_KEY not in stored
        for request in page.requests:
            authorization = request.headers.get("authorization")
            if "/v1/" not in request.url:
                assert authorization is None, request.url
        keyed = [r for r in page.requests if r.headers.get("authorization") == f"Bearer {API_KEY}"]
        assert any(r.url.endswith("/v1/chat/completions") for r in keyed)


def test_with_the_setting_off_the_playground_is_a_404() -> None:
    with serve_in_thread(demo_app(playground=False)) as off:
        for path in ("/playground", "/playground/main.js"):
            response = httpx.get(f"{off.base_url}{path}")
            assert response.status_code == 404
            assert response.json()["error"]["type"] == "not_found_error"
        assert httpx.get(f"{off.api_url}/models").status_code == 200
