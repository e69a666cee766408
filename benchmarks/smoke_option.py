"""The ``--smoke`` and ``--out`` options the fleet benchmarks share, and their report writer."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def add_smoke_and_out(
    parser: argparse.ArgumentParser, smoke: Mapping[str, object], report: str
) -> None:
    """``--smoke`` (tiny sizes ``smoke``) and ``--out`` (the folder for ``report``.json/.md)."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny sizes to check the script runs ({dict(smoke)}); overrides the size "
        "flags, and without --out writes to a fresh temporary folder",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for {report}.json and .md (default: {RESULTS_DIR})",
    )


def apply_smoke_and_out(
    args: argparse.Namespace, smoke: Mapping[str, object], report: str
) -> argparse.Namespace:
    """Apply ``--smoke``'s sizes, and pick the output folder: a smoke run never writes into
    the committed results."""
    if args.smoke:
        vars(args).update(smoke)
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix=f"ttalign-{report}-smoke-")) if args.smoke else RESULTS_DIR
        )
    return args


def write_report(
    folder: Path, name: str, report: dict[str, Any], markdown: str, logs: Path
) -> None:
    """Write ``name``.json and ``name``.md into ``folder`` and print the table."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"Wrote {out}.json and {out}.md (server logs in {logs})")
