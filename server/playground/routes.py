"""The playground's routes: the page and its assets, each with a strict CSP.

Only the files shipped in ``static/`` are served, by exact name (no sub-folders, so no path
can leave the folder). The routes are left out of the OpenAPI document: they are not API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

PLAYGROUND_PATH = "/playground"
STATIC_DIR = Path(__file__).with_name("static")

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: Everything comes from this origin; nothing inline, nothing framed, no form posts.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def shipped_assets(folder: Path = STATIC_DIR) -> dict[str, Path]:
    """The servable files of ``folder`` by name: those of a known media type."""
    return {
        path.name: path
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


def install_playground(app: FastAPI) -> None:
    """Serve the page at ``/playground`` and its assets at ``/playground/<name>``."""
    assets = shipped_assets()

    @app.get(PLAYGROUND_PATH, include_in_schema=False)
    async def playground_page() -> FileResponse:
        return _file(assets["index.html"])

    @app.get(PLAYGROUND_PATH + "/{name}", include_in_schema=False)
    async def playground_asset(name: str) -> FileResponse:
        if name not in assets:
            raise HTTPException(404, "Not Found")
        return _file(assets[name])
