"""The chat page: `GET /` serves `static/index.html`, `GET /static/...` its assets.

The page is plain HTML, CSS and native JavaScript modules shipped inside the package (no CDN, no
build step): `index.html` loads `static/js/main.js` as a module script, which imports the other
modules of `static/js/`. It talks to the same origin's OpenAI routes (`/v1/models`,
`/v1/chat/completions`). Any regular, non-hidden file under `static/` is served, with a type from
its suffix; nothing outside that folder is.

Sample images: when `static/samples/index.json` exists the page offers them as one-click
attachments. Its shape is a list (or `{"samples": [...]}`) of
`{"file": "cat.png", "title": "A cat", "prompt": "What animal is this?"}`; `file` is relative to
`static/samples/` (or give `url`), `title` and `prompt` are optional.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Explicit types: module scripts must be served as JavaScript whatever the host's mime database says.
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

# Only same-origin scripts, styles and connections; images may also be data:/blob: (previews).
# No inline script is allowed, so even a rendering bug could not run model-written HTML.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSET_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def _file(relative: str) -> Path:
    """The file under STATIC_DIR named by `relative`, or a 404 (also for `..` and hidden files)."""
    root = STATIC_DIR.resolve()
    candidate = (root / relative).resolve()
    if (
        not relative
        or any(part.startswith(".") for part in Path(relative).parts)
        or not candidate.is_relative_to(root)
        or not candidate.is_file()
    ):
        raise HTTPException(status_code=404, detail=f"No static file {relative!r}.")
    return candidate


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    return FileResponse(_file("index.html"), media_type=_MEDIA_TYPES[".html"], headers=_PAGE_HEADERS)


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"])
async def static(path: str) -> FileResponse:
    file = _file(path)
    media_type = _MEDIA_TYPES.get(file.suffix.lower(), "application/octet-stream")
    return FileResponse(file, media_type=media_type, headers=_ASSET_HEADERS)
