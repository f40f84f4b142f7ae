"""The API's documentation pages, /docs (Swagger UI) and /redoc, for `api_docs: true`.

They run scripts from a CDN on the chat page's origin, where the page keeps the API key in
localStorage, so they are off by default. When on, each CDN file is pinned to one published version
with its Subresource Integrity hash (from the package's npm tarball), and a Content-Security-Policy
lets the page run those files and its own inline script only, and talk to this origin only.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

_CDN = "https://cdn.jsdelivr.net/npm"
SWAGGER_JS = (f"{_CDN}/swagger-ui-dist@5.35.0/swagger-ui-bundle.js",
              "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9")
SWAGGER_CSS = (f"{_CDN}/swagger-ui-dist@5.35.0/swagger-ui.css",
               "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I")
REDOC_JS = (f"{_CDN}/redoc@2.5.4/bundles/redoc.standalone.js",
            "sha384-w447zOpYfw/1Tv/5AK9NfHTlQIqE3RVR6KY62jCyy9zNDgO64cMwGGP1Fj0zJVf5")
_FAVICON = "/static/favicon.svg"
_COMMON_POLICY = (
    "default-src 'none'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _with_integrity(html: str, attribute: str, url: str, integrity: str) -> str:
    tag = f'{attribute}="{url}"'
    if html.count(tag) != 1:
        raise RuntimeError(f"the docs page does not load {url} exactly once; update serve_app/openai/docs.py")
    return html.replace(tag, f'{tag} integrity="{integrity}" crossorigin="anonymous"')


def _inline_script_hashes(html: str) -> str:
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)


def _page(html: str, script_src: str, style_src: str, worker_src: str = "") -> HTMLResponse:
    policy = f"{_COMMON_POLICY}; script-src {script_src}; style-src {style_src}"
    if worker_src:
        policy += f"; worker-src {worker_src}"
    return HTMLResponse(html, headers={**_HEADERS, "Content-Security-Policy": policy})


def docs_router(openapi_url: str, title: str) -> APIRouter:
    swagger = get_swagger_ui_html(
        openapi_url=openapi_url, title=f"{title} - Swagger UI",
        swagger_js_url=SWAGGER_JS[0], swagger_css_url=SWAGGER_CSS[0], swagger_favicon_url=_FAVICON,
    ).body.decode()
    swagger = _with_integrity(_with_integrity(swagger, "src", *SWAGGER_JS), "href", *SWAGGER_CSS)
    swagger_scripts = f"{SWAGGER_JS[0]} {_inline_script_hashes(swagger)}"
    redoc = get_redoc_html(
        openapi_url=openapi_url, title=f"{title} - ReDoc", redoc_js_url=REDOC_JS[0],
        redoc_favicon_url=_FAVICON, with_google_fonts=False,
    ).body.decode()
    redoc = _with_integrity(redoc, "src", *REDOC_JS)

    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        return _page(swagger, swagger_scripts, f"{SWAGGER_CSS[0]} 'unsafe-inline'")

    @router.get("/redoc")
    async def redoc_ui() -> HTMLResponse:
        # ReDoc styles itself with inline <style> elements and searches in a blob: worker.
        return _page(redoc, REDOC_JS[0], "'unsafe-inline'", worker_src="blob:")

    return router
