"""Limits that hold for the whole application: two ingress replicas share one budget; CORS,
checked by headers and by a real browser on another local origin."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.images import MODEL
from tests.support.serving import ServeProcess, config_for_tests, free_port, start_server

pytestmark = pytest.mark.integration

LIMIT = 60
ALLOWED_PORT = 5999
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def two_ingresses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    config = config_for_tests(
        free_port(),
        overrides={"ingress": {"rate_limits": {"requests_per_minute": LIMIT},
                               "cors": {"allow_origins": [f"http://127.0.0.1:{ALLOWED_PORT}"]}}},
        deployments={"Ingress": {"num_replicas": 2}},
    )
    server = start_server(tmp_path_factory.mktemp("two-ingress"), config)
    yield server
    server.stop()


PAGE = """<!doctype html><title>another origin</title><pre id="out">pending</pre><script>
fetch("%s/v1/chat/completions", {method: "POST",
  headers: {"Content-Type": "application/json", "Authorization": "Bearer anything"},
  body: JSON.stringify({model: "%s", messages: [{role: "user", content: "hi"}], max_tokens: 2})})
  .then(async r => { document.getElementById("out").textContent =
      r.status + " " + r.headers.get("x-ratelimit-limit-requests") + " " + (await r.text()).slice(0, 40); })
  .catch(e => { document.getElementById("out").textContent = "blocked " + e.name; });
</script>"""


def serve_page(port: int, html: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_browser_on_another_origin(two_ingresses: ServeProcess) -> None:
    """Runs before the burst below, so its one request fits the budget."""
    sync_api = pytest.importorskip("playwright.sync_api")
    html = PAGE % (two_ingresses.base_url, MODEL)
    allowed, other = serve_page(ALLOWED_PORT, html), serve_page(free_port(), html)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = browser.new_page()
            results = {}
            for name, httpd in (("allowed", allowed), ("other", other)):
                page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
                page.wait_for_function("document.getElementById('out').textContent !== 'pending'", timeout=60_000)
                results[name] = page.text_content("#out")
            browser.close()
    finally:
        allowed.shutdown()
        other.shutdown()
    # The allowed origin reads the answer and the exposed rate-limit header; the other is blocked.
    assert results["allowed"].startswith(f"200 {LIMIT} "), results
    assert results["other"] == "blocked TypeError", results


def chat(server: ServeProcess, client: httpx.Client) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return client.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)


def test_limit_holds_across_two_ingress_replicas(two_ingresses: ServeProcess) -> None:
    attempts = LIMIT + 30
    started = time.monotonic()
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: chat(two_ingresses, client), range(attempts)))
    assert time.monotonic() - started < 55, "the burst must fit in one window for the count to mean anything"
    statuses = [r.status_code for r in responses]
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}
    assert LIMIT * 0.9 <= admitted <= LIMIT * 1.1, f"{admitted} admitted of {attempts}"
    ok = next(r for r in responses if r.status_code == 200)
    for kind in ("requests", "tokens"):
        assert f"x-ratelimit-limit-{kind}" in ok.headers or kind == "tokens"
    assert ok.headers["x-ratelimit-limit-requests"] == str(LIMIT)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1
    # Both replicas answered: Serve's request log names the replica that served each request.
    replicas = set(re.findall(r"Ingress pid=(\d+)\).*POST /v1/chat/completions", two_ingresses.log()))
    assert len(replicas) == 2, replicas


def test_cors_preflight_and_exposed_headers(two_ingresses: ServeProcess) -> None:
    preflight = httpx.options(
        f"{two_ingresses.base_url}/v1/chat/completions",
        headers={"Origin": "http://127.0.0.1:5999", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://127.0.0.1:5999"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    foreign = httpx.options(
        f"{two_ingresses.base_url}/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}, timeout=10,
    )
    assert "access-control-allow-origin" not in foreign.headers
