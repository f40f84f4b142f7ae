"""The HTTP app the factory builds, in process: what a real server cannot be made to show on demand
(an unexpected exception's 500) and the docs pages' policy when they are turned on.

The service behind the routes is a stand-in for the Ingress deployment (which needs Ray); the app,
its middleware stack and its error handling are the shipped ones. Attacks on a real `serve run`:
tests/integration/test_http_hardening.py.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import Response
from fastapi.testclient import TestClient

from serve_app.errors import APIError, InvalidRequestError, error_for_status
from serve_app.openai.app import build_api
from serve_app.openai.auth import Authenticator, Principal
from serve_app.openai.protocol import ChatCompletionRequest, Model, ModelList
from serve_app.settings import IngressSettings

ORIGIN = "https://app.example.com"


class FailingService:
    async def list_models(self) -> ModelList:
        return ModelList(data=[])

    async def get_model(self, model_id: str) -> Model:
        raise RuntimeError("a bug")

    async def health(self) -> dict:
        return {"status": "ok"}

    async def chat_completions(self, body: ChatCompletionRequest, principal: Principal, response: Response):
        raise RuntimeError("a bug")


def client(**settings) -> TestClient:
    ingress = IngressSettings(**settings)
    app = build_api(ingress, FailingService(), Authenticator.from_settings(ingress))
    return TestClient(app, raise_server_exceptions=False)


def test_an_unexpected_error_is_an_openai_500_with_cors_headers() -> None:
    response = client(cors={"allow_origins": [ORIGIN]}).get("/v1/models/x", headers={"Origin": ORIGIN})
    assert response.status_code == 500
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.json()["error"] == {
        "message": "The server had an error while processing your request.", "type": "server_error",
        "param": None, "code": None,
    }


def test_no_client_error_is_a_server_error() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for c in cls.__subclasses__() for s in subclasses(c))]

    for cls in subclasses(APIError):
        if cls.status_code < 500:
            assert cls.error_type != "server_error", cls
    for status in (400, 405, 409, 413, 415, 422, 499):
        error = error_for_status(status, "x")
        assert isinstance(error, InvalidRequestError) and error.body().error.type == "invalid_request_error"
    assert error_for_status(502, "x").body().error.type == "server_error"


def test_docs_pages_are_off_by_default() -> None:
    c = client()
    assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
    assert c.get("/openapi.json").status_code == 200


def inline_script_hashes(html: str) -> set[str]:
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    return {f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts}


def test_turned_on_docs_pages_run_pinned_scripts_with_sri_under_a_strict_policy() -> None:
    c = client(api_docs=True)
    for path in ("/docs", "/redoc"):
        page = c.get(path)
        assert page.status_code == 200
        policy = dict(p.strip().split(" ", 1) for p in page.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
        external = re.findall(r'<(?:script|link)[^>]*(?:src|href)="(https://[^"]+)"[^>]*>', page.text)
        assert external, page.text
        for tag in re.findall(r'<(?:script|link)[^>]*(?:src|href)="https://[^"]+"[^>]*>', page.text):
            assert re.search(r'integrity="sha384-[A-Za-z0-9+/=]{64}"', tag), tag
            assert re.search(r"@\d+\.\d+\.\d+/", tag), f"not pinned to one version: {tag}"
        for url in external:
            if url.endswith(".js"):
                assert url in policy["script-src"].split()
        # The page's own inline script runs because its hash is allowed, and nothing else inline does.
        script_sources = set(policy["script-src"].split())
        assert "'unsafe-inline'" not in script_sources and "'unsafe-eval'" not in script_sources
        assert inline_script_hashes(page.text) <= script_sources
