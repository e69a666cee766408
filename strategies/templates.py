"""Prompt templates with ``{name}`` placeholders, filled in one pass.

Only the placeholders given a value are replaced, so braces elsewhere in a template (and
placeholders inside the filled-in texts) are left alone.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill(template: str, **values: str) -> str:
    """Replace ``{name}`` for every ``name`` in ``values``, in one pass."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
