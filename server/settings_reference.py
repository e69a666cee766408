"""The configuration reference, generated from :class:`ServerSettings` (so it cannot drift).

The docs site renders it into its configuration page at build time (``docs/hooks.py``);
``python -m ttalign.server.settings_reference`` prints it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ByteSize
from ttalign.server.settings import ServerSettings

ENV_PREFIX = "TTALIGN_"
#: Where the generated table goes in a page.
PLACEHOLDER = "<!-- settings-reference -->"


def flag(name: str) -> str:
    """The ``ttalign serve`` flag of settings field ``name``."""
    return "--" + name.replace("_", "-")


def shown_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, ByteSize):
        return value.human_readable(separator="")
    if isinstance(value, Path):
        return str(value).replace(str(Path.home()), "~")
    return str(value)


def settings_reference() -> str:
    """A markdown table: flag, environment variable, default and meaning of every setting."""
    rows = [
        "| flag | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in ServerSettings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `{flag(name)}` | `{ENV_PREFIX}{name.upper()}` | "
            f"`{shown_default(field.default)}` | {meaning} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
