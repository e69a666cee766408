"""The processes this test process started, read from /proc (vLLM names its own)."""

from __future__ import annotations

import os
from pathlib import Path


def descendants(name_part: str) -> list[int]:
    """Processes descended from this one whose name contains ``name_part``."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        pid = int(entry.name)
        names[pid] = fields.get("Name", "").strip()
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
    found: list[int] = []
    pending = [os.getpid()]
    while pending:
        for child in children.get(pending.pop(), []):
            pending.append(child)
            if name_part in names.get(child, ""):
                found.append(child)
    return found
