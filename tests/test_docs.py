"""The docs site builds in strict mode (no broken links or anchors), its configuration page
lists every setting, and the README stays a short front door whose links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ttalign.server.settings import ServerSettings
from ttalign.server.settings_reference import flag

ROOT = Path(__file__).parents[1]
README_MAX_LINES = 250


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return target


def test_every_setting_is_in_the_generated_configuration_page(site: Path) -> None:
    page = (site / "configuration" / "index.html").read_text()
    for name in ServerSettings.model_fields:
        assert f"TTALIGN_{name.upper()}" in page, f"configuration page lacks {name}"
        assert flag(name) in page


def test_every_strategy_has_a_page(site: Path) -> None:
    from ttalign.strategies import strategy_names

    for name in strategy_names():
        assert (site / "strategies" / name / "index.html").exists(), name


def test_readme_is_a_short_front_door_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < README_MAX_LINES
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links to the docs"
    for link in local:
        assert (ROOT / link).exists(), f"README links to a missing {link}"


def test_readme_gives_exactly_the_two_set_up_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)\n```", setup, re.S) == ["./run serve", "./run test"]
