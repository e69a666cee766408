"""Screenshots of the playground's trace views, on the fake engine (no model is started).

    .venv/bin/python -m ttalign.benchmarks.playground_screenshots [--out docs/images/playground]

Runs from a checkout: the demo server is ttalign over ``tests.fakes``' scripted engine, with
a scripted "model" (:func:`demo_model`) that answers every kind of call the strategies make
(samples, TPO's critiques, DARWIN's numbered variants, RAIN's one-token expansions and
self-evaluation letters) and a deterministic reward. Chromium is driven by Playwright, as in
``tests/test_playground.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "images" / "playground"

#: The demo model's vocabulary (its "replies" are draws from it).
WORDS = tuple(
    re.findall(
        r"\S+",
        "owls hunt at night with silent wings and keen ears that locate prey in darkness "
        "their eyes face forward giving depth perception while flexible necks turn far",
    )
)
CRITIQUE = (
    "The stronger reply names concrete adaptations, but it repeats itself and never says "
    "why silent flight matters to hunting."
)
SUGGESTIONS = "1. Open with the main idea. 2. Explain why silence helps. 3. Cut repeated words."
VARIANTS = (
    "Explain, in two sentences, how owls are adapted to hunt at night.",
    "Describe the night-hunting adaptations of owls, briefly and precisely.",
    "In a short answer, list how owls manage to hunt in the dark.",
    "Summarise what lets owls hunt at night, in plain words.",
    "Give a brief, accurate account of owls' night-hunting adaptations.",
)


def _hash(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest(), 16)


def _sentence(seed: int, length: int) -> str:
    words = [WORDS[(seed >> (5 * j)) % len(WORDS)] for j in range(length)]
    return " ".join(words) + "."


def demo_model(prompt: str, sampling: Any) -> list[Any]:
    """A scripted policy answering each kind of call by what its prompt asks.

    ``sampling`` is an engine :class:`SamplingSettings`; the answers are
    ``tests.fakes.Scripted`` completions, so that log-probabilities can be scripted too.
    """
    from tests.fakes import Scripted

    last_turn = prompt.rsplit("<user>", 1)[-1]
    if sampling.allowed_token_ids is not None:  # RAIN's self-evaluation: A or B
        letter = "AB"[_hash(prompt) % 3 == 0]
        other = "B" if letter == "A" else "A"
        return [Scripted(letter, logprobs=[-0.2], top=[{letter: -0.2, other: -1.7}])] * sampling.n
    if sampling.max_tokens == 1 and sampling.logprobs:  # RAIN's first-token expansion
        top = {f" {w}": -0.2 * (i + 1) for i, w in enumerate(WORDS[:20])}
        return [Scripted(" owls", logprobs=[-0.2], top=[top])] * sampling.n
    if prompt.endswith("1."):  # DARWIN's mutation: a numbered list of variants
        items = "\n".join(f"{i + 1}. {v}" for i, v in enumerate(VARIANTS)).removeprefix("1.")
        return [" " + items + "\n\n"] * sampling.n
    if "Weaker reply:" in last_turn or "Review this reply" in last_turn:
        return [CRITIQUE] * sampling.n
    if "list concrete changes" in last_turn:
        return [SUGGESTIONS] * sampling.n
    answers = []
    for i in range(sampling.n):
        seed = _hash(prompt, i, sampling.seed, sampling.temperature)
        length = max(1, min(sampling.max_tokens, 4 + seed % 9))
        text = _sentence(seed, length)
        logprobs = [-0.1 - (seed >> k) % 7 / 10 for k in range(length)]
        answers.append(Scripted(" " + text, eos=seed % 4 == 0, logprobs=logprobs))
    return answers


def demo_reward(text: str) -> float:
    """Distinct words per sentence, scaled into [0, 1]: rewards that differ, deterministically."""
    words = text.split()
    return round(len(set(words)) / (len(words) + 4), 4) if words else 0.0


def demo_temperatures(prompt: str, sampling: Any, num_tokens: int) -> list[float]:
    """adaptive_temperature's per-token record: a wave through the head's set."""
    steps = (0.2, 0.6, 1.0, 0.6)
    return [steps[(k + _hash(prompt) % 3) % len(steps)] for k in range(num_tokens)]


def demo_app(**settings: Any) -> Any:
    """ttalign over the scripted demo model and reward (``settings`` override the server's)."""
    from ttalign.engine.base import TemperatureHeadInfo
    from ttalign.reward_clients.registry import RewardRegistry
    from ttalign.server.app import create_app
    from ttalign.server.settings import ServerSettings

    from tests.fakes import AdaptiveFakeEngine, FakeReward

    engine = AdaptiveFakeEngine(
        script=demo_model,
        model_name="demo-model",
        temperature_heads={
            "demo-example": TemperatureHeadInfo("demo-example", "example", (0.2, 0.6, 1.0)),
            "demo-token": TemperatureHeadInfo("demo-token", "token", (0.2, 0.6, 1.0)),
        },
        record_script=demo_temperatures,
    )
    rewards = RewardRegistry({"demo": FakeReward(scorer=demo_reward, name="demo")}, default="demo")
    values: dict[str, Any] = {
        "model": "unused",
        "served_model_name": "demo-model",
        "warmup": False,
        "embedding_model": "none",
        **settings,
    }
    return create_app(
        ServerSettings(**values),
        engine_factory=lambda _: engine,
        reward_factory=lambda *_: rewards,
        embedder_factory=lambda _: None,
    )


#: What each screenshot runs: (file stem, strategy, strategy_config, element to capture).
SHOTS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("best_of_n", "best_of_n", {"n": 8}, "#result-a .trace-view"),
    ("tpo", "tpo", {"depth": 2, "width": 4}, "#result-a .trace-view"),
    ("rain", "rain", {"max_iterations": 6, "first_width": 4, "width": 3}, "#result-a .trace-view"),
    (
        "darwin",
        "darwin",
        {"cycles": 2, "mutations": 4, "keep": 1, "replacement_period": 3},
        "#result-a .trace-view",
    ),
    (
        "adaptive_temperature",
        "adaptive_temperature",
        {"level": "token", "head": "demo-token"},
        "#result-a .trace-view",
    ),
    ("gantt", "tpo", {"depth": 2, "width": 4}, "#result-a .gantt"),
)


@contextmanager
def _browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        sys.exit("playground_screenshots: chromium not found (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def configure_strategy(page: Any, strategy: str, config: dict[str, Any], side: str = "a") -> None:
    """Pick ``strategy`` and fill its config form."""
    page.select_option(f"#strategy-{side}", strategy)
    form = page.locator(f'#config-{side} [data-strategy="{strategy}"]')
    for path, value in config.items():
        field = form.locator(f'[data-path="{path}"]')
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(str(value))
        else:
            field.fill(str(value))


def take_screenshots(out: Path) -> list[Path]:
    """Serve the demo app, run each shot and write ``out/<stem>.png``; the files written."""
    sys.path.insert(0, str(ROOT))
    from tests.servers import serve_in_thread

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with serve_in_thread(demo_app()) as server, _browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        for stem, strategy, config, selector in SHOTS:
            page.goto(f"{server.base_url}/playground")
            page.wait_for_selector("body[data-ready='true']", state="attached")
            page.fill("#max-tokens", "24")
            configure_strategy(page, strategy, config)
            page.click("#run")
            page.wait_for_selector("#result-a[data-state='done']")
            target = out / f"{stem}.png"
            page.locator(selector).screenshot(path=str(target))
            written.append(target)
        page.set_viewport_size({"width": 1700, "height": 900})
        page.goto(f"{server.base_url}/playground")
        page.wait_for_selector("body[data-ready='true']", state="attached")
        page.check("#compare")
        page.fill("#max-tokens", "24")
        configure_strategy(page, "best_of_n", {"n": 6}, "a")
        configure_strategy(page, "tpo", {"depth": 1, "width": 3}, "b")
        page.click("#run")
        page.wait_for_selector("#result-a[data-state='done']")
        page.wait_for_selector("#result-b[data-state='done']")
        target = out / "compare.png"
        page.locator("#results").screenshot(path=str(target))
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs")
    args = parser.parse_args()
    for path in take_screenshots(args.out):
        print(path)


if __name__ == "__main__":
    main()
