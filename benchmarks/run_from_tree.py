"""Run ttalign's CLI from another source tree (e.g. a git worktree of an older commit).

    python benchmarks/run_from_tree.py TREE serve --port 8000 ...

Run by path, not with ``-m``: it must import nothing of ttalign before it points the
``ttalign.<package>`` names (``server``, ``engine``, ``strategies``, ...) at ``TREE``'s
folders. Everything else (vLLM, torch) comes from this interpreter's environment. The
benchmarks use it for a baseline without a given change, side by side with the change.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import runpy
import sys
from pathlib import Path


class TreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``ttalign.<package>`` in ``tree``; the submodules then follow its ``__path__``."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree

    def find_spec(self, name: str, path: object = None, target: object = None):
        parts = name.split(".")
        if len(parts) != 2 or parts[0] != "ttalign":
            return None
        folder = self.tree / parts[1]
        init = folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(folder)]
        )


def main() -> None:
    tree = Path(sys.argv[1]).resolve()
    if not (tree / "server" / "__init__.py").is_file():
        raise SystemExit(f"{tree} is not a ttalign source tree (no server/__init__.py)")
    sys.meta_path.insert(0, TreeFinder(tree))
    sys.argv = ["ttalign", *sys.argv[2:]]
    runpy.run_module("ttalign.server.cli", run_name="__main__")


if __name__ == "__main__":
    main()
