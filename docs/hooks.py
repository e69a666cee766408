"""mkdocs hooks: the configuration page's table is generated from the settings model."""

from __future__ import annotations

from ttalign.server.settings_reference import PLACEHOLDER, settings_reference


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Put the generated settings table where a page holds the placeholder."""
    return markdown.replace(PLACEHOLDER, settings_reference())
