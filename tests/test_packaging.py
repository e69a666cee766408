"""The installed distribution and the import graph: one ``ttalign`` namespace, layers point down."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("engine", "reward_clients", "strategies", "server", "benchmarks")

#: What each layer may import from ttalign (ARCHITECTURE.md: lower never imports upper).
ALLOWED = {
    "engine": {"engine"},
    "reward_clients": {"reward_clients", "engine"},
    "strategies": {"strategies", "engine", "reward_clients"},
    "server": {"server", "strategies", "engine", "reward_clients"},
    "benchmarks": set(FOLDERS),
}


def _ttalign_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [(node.lineno, name) for name in names]
    return found


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_layer_imports_only_itself_and_the_layers_below(folder: str) -> None:
    violations = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in _ttalign_imports(path):
            top = name.split(".")[0]
            if top in FOLDERS:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports bare {name!r}")
            elif top == "ttalign":
                layer = name.split(".")[1]
                if layer not in ALLOWED[folder]:
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {name!r}")
    assert not violations, "\n".join(violations)


def test_the_wheel_installs_everything_under_one_ttalign_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ttalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"ttalign", next(t for t in tops if t.endswith(".dist-info"))}
    packages = {"/".join(name.split("/")[:2]) for name in names if name.startswith("ttalign/")}
    assert packages == {f"ttalign/{folder}" for folder in FOLDERS}
    assert "ttalign/benchmarks/quality/harness.py" in names
    # The playground's page, styles and modules ship as package data: nothing to build.
    static = "ttalign/server/playground/static/"
    shipped = {name.removeprefix(static) for name in names if name.startswith(static)}
    assert {"index.html", "main.js", "playground.css"} <= shipped
    assert shipped == {path.name for path in (ROOT / "server/playground/static").iterdir()}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ttalign = ttalign.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_console_script_runs_from_outside_the_checkout(tmp_path: Path) -> None:
    # Outside the checkout, the folders' bare names are not importable: only the
    # installed ``ttalign.*`` names are, and the console script uses them.
    script = Path(sys.executable).with_name("ttalign")
    result = subprocess.run(
        [str(script), "serve", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--kv-cache-memory" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('server'))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() == "None"


def _declared_distributions() -> tuple[set[str], set[str]]:
    """The canonical names pyproject.toml declares: (core dependencies, every extra)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {_canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}

    extras = set().union(*(names(group) for group in project["optional-dependencies"].values()))
    return names(project["dependencies"]), extras


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_third_party_import_is_declared(folder: str) -> None:
    import importlib.metadata

    core, extras = _declared_distributions()
    # vLLM's CPU and CUDA builds both provide `vllm`; torch and gguf come with them or `model`.
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in _ttalign_imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("ttalign", "tests", "__future__"):
                continue
            distributions = {_canonical(d) for d in providers.get(top, [top])}
            if not distributions & (core | extras):
                undeclared.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not undeclared, "\n".join(undeclared)
