"""Limits that hold for the whole application: two ingress replicas share one budget; CORS."""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import MODEL
from tests.serving import ServeProcess, config_for_tests, free_port, start_server

pytestmark = pytest.mark.integration

LIMIT = 60


@pytest.fixture(scope="module")
def two_ingresses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    config = config_for_tests(
        free_port(),
        overrides={"ingress": {"rate_limits": {"requests_per_minute": LIMIT},
                               "cors": {"allow_origins": ["http://127.0.0.1:5999"]}}},
        deployments={"Ingress": {"num_replicas": 2}},
    )
    server = start_server(tmp_path_factory.mktemp("two-ingress"), config)
    yield server
    server.stop()


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
