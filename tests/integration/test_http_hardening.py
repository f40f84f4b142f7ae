"""Attacks on the HTTP face of a real `serve run` on loopback: keys that fail closed, authentication
before the body, bodies over the cap whatever their encoding, nesting, CORS on errors, the docs pages,
and who a client is behind proxies. Each attack is followed by proof that the server still answers.

Two servers, one after the other: `keyed` (API keys, a 64 KB body cap, one allowed CORS origin) and
`open` (no keys, per-address rate limits, 127.0.0.2 as its trusted proxy). The start-up refusals
share one `serve run` of three applications, each of which must be refused and never answer.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.images import MODEL
from tests.support.serving import ServeProcess, config_for_tests, free_port, launch, start_server

pytestmark = pytest.mark.integration

KEY = "sk-hardening-main"
UNNAMED_A, UNNAMED_B = "sk-hardening-unnamed-a", "sk-hardening-unnamed-b"
CAP = 64 * 1024
ORIGIN = "https://app.example.com"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN_LIMIT = 1000
DEEP = 20_000  # lists nested this deep stop the JSON decoder, in 40 KB: under CAP


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def chat(**extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}


def post(server: ServeProcess, body: bytes | dict | Iterator[bytes], headers: dict[str, str] | None = None,
         client: httpx.Client | None = None) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    send = client.post if client else httpx.post
    return send(f"{server.base_url}/v1/chat/completions", content=content,
                headers={"Content-Type": "application/json", **(headers or {})}, timeout=120)


def chunked(total: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    """A body with no Content-Length: httpx sends it with Transfer-Encoding: chunked."""
    yield b'{"model": "x", "messages": ['
    sent = 0
    while sent < total:
        yield b" " * piece
        sent += piece
    yield b"]}"


def nested(depth: int) -> bytes:
    return (json.dumps(chat())[:-1] + ', "metadata": ' + "[" * depth + "]" * depth + "}").encode()


def assert_openai_error(response: httpx.Response, status: int, error_type: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == error_type, error
    if code is not None:
        assert error["code"] == code, error
    return error


def still_serving(server: ServeProcess, headers: dict[str, str] | None = AUTH) -> None:
    answer = post(server, chat(), headers)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---- the keyed server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    ingress = {
        "api_keys": [
            {"name": "main", "sha256": sha256(KEY)},
            # Two keys without names, each with its own budget.
            {"sha256": sha256(UNNAMED_A), "requests_per_minute": 1000},
            {"sha256": sha256(UNNAMED_B), "requests_per_minute": 2000},
        ],
        "max_request_bytes": CAP,
        "cors": {"allow_origins": [ORIGIN]},
    }
    config = config_for_tests(free_port(), overrides={"ingress": ingress})
    server = start_server(tmp_path_factory.mktemp("keyed"), config, ready_check_headers=AUTH)
    yield server
    server.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY}"}],
                         ids=["no key", "wrong key", "wrong scheme"])
def test_without_a_valid_key_every_body_gets_401_first(keyed: ServeProcess, headers: dict[str, str]) -> None:
    headers = {**headers, "Origin": ORIGIN}
    for body in (
        {"model": MODEL, "messages": "not a list"},  # a 400 would describe the schema
        b"{not json",
        b"{" + b" " * (2 * CAP) + b"}",  # a 413 would come from reading it
        chunked(2 * CAP),
        nested(DEEP),
    ):
        refused = post(keyed, body, headers)
        assert_openai_error(refused, 401, "invalid_request_error", "invalid_api_key")
        assert refused.headers["access-control-allow-origin"] == ORIGIN
    still_serving(keyed)


def test_an_unauthenticated_body_is_never_waited_for(keyed: ServeProcess) -> None:
    # Headers that announce a body within the cap, then only its first byte: the answer must not wait
    # for the rest (which an attacker would trickle in to hold the server's memory and time).
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=15) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {CAP - 1}\r\n\r\n{{".encode())
        started = time.monotonic()
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401"), head[:200]
    assert time.monotonic() - started < 10
    still_serving(keyed)


@pytest.mark.parametrize("transfer", ["chunked", "content-length"])
def test_a_body_over_the_cap_is_413_with_cors_headers(keyed: ServeProcess, transfer: str) -> None:
    body = chunked(2 * CAP) if transfer == "chunked" else b"{" + b" " * (2 * CAP) + b"}"
    refused = post(keyed, body, {**AUTH, "Origin": ORIGIN})
    assert_openai_error(refused, 413, "invalid_request_error", "request_too_large")
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert "x-ratelimit-limit-requests" in refused.headers["access-control-expose-headers"].lower()
    # A body within the cap is served however it is sent.
    text = json.dumps(chat()).encode()
    pieces = (text[i:i + 7] for i in range(0, len(text), 7)) if transfer == "chunked" else text
    assert post(keyed, pieces, AUTH).status_code == 200


@pytest.mark.parametrize("depth", [DEEP, 2_000])
def test_deeply_nested_json_is_an_invalid_request(keyed: ServeProcess, depth: int) -> None:
    # Deeper than the JSON decoder goes, in a field the schema ignores.
    assert_openai_error(post(keyed, nested(depth), AUTH), 400, "invalid_request_error", "invalid_json")
    still_serving(keyed)


def test_no_client_error_is_typed_as_a_server_error(keyed: ServeProcess) -> None:
    url = f"{keyed.base_url}/v1/chat/completions"
    for response in (
        httpx.put(url, headers=AUTH, timeout=30),  # 405
        httpx.get(f"{keyed.base_url}/v1/nothing-here", headers=AUTH, timeout=30),  # 404
        httpx.post(url, content=b"model=x", headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                   timeout=30),
        post(keyed, b"\xff\xfe{}", AUTH),  # not UTF-8
        post(keyed, nested(DEEP), AUTH),
        post(keyed, chunked(2 * CAP), AUTH),
    ):
        assert 400 <= response.status_code < 500, response.text[:300]
        assert response.json()["error"]["type"] != "server_error", response.text[:300]


def test_unnamed_keys_keep_their_own_names_and_budgets(keyed: ServeProcess) -> None:
    a = post(keyed, chat(), {"Authorization": f"Bearer {UNNAMED_A}"})
    b = post(keyed, chat(), {"Authorization": f"Bearer {UNNAMED_B}"})
    assert a.status_code == b.status_code == 200, (a.text[:300], b.text[:300])
    assert a.headers["x-ratelimit-limit-requests"] == "1000"
    assert b.headers["x-ratelimit-limit-requests"] == "2000"
    assert b.headers["x-ratelimit-remaining-requests"] == "1999"  # not the budget A just used
    again = post(keyed, chat(), {"Authorization": f"Bearer {UNNAMED_A}"})
    assert int(again.headers["x-ratelimit-remaining-requests"]) == int(a.headers["x-ratelimit-remaining-requests"]) - 1


def test_the_docs_pages_are_off_and_the_schema_stays(keyed: ServeProcess) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        page = httpx.get(f"{keyed.base_url}{path}", timeout=30)
        assert_openai_error(page, 404, "invalid_request_error")
        assert "cdn.jsdelivr.net" not in page.text
    assert httpx.get(f"{keyed.base_url}/openapi.json", timeout=30).json()["paths"]["/v1/chat/completions"]


def test_well_formed_requests_are_answered_during_the_attacks(keyed: ServeProcess) -> None:
    attacks = [  # (request, the answer it must get)
        (lambda: post(keyed, chunked(4 * CAP), AUTH), 413),
        (lambda: post(keyed, nested(DEEP), AUTH), 400),
        (lambda: post(keyed, b"{" + b" " * (4 * CAP) + b"}", {}), 401),
        (lambda: post(keyed, chunked(4 * CAP), {}), 401),
    ]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        hostile = [(pool.submit(attacks[i % 4][0]), attacks[i % 4][1]) for i in range(24)]
        good = [pool.submit(post, keyed, chat(), AUTH) for _ in range(8)]
        assert [f.result().status_code for f in good] == [200] * 8
        for future, status in hostile:
            assert_openai_error(future.result(), status, "invalid_request_error")


# ---- start-up refusals -----------------------------------------------------------------------------


def assert_refuses_to_start(tmp_path: Path, refusals: list[tuple[dict, list[str]]], timeout: float = 300) -> None:
    """One `serve run` of one application per (ingress settings, reasons): each must be refused, logging
    every one of its reasons, and none may ever answer on /v1.

    The applications share the run (a `serve run` costs a minute of CI), each under its own route
    prefix. A refused application does not end `serve run` (it keeps waiting for a redeploy), so the
    log is watched for the reasons rather than for the process to exit.
    """
    port = free_port()
    config = config_for_tests(port)
    config["applications"] = []
    for n, (ingress, _) in enumerate(refusals):
        app = config_for_tests(port, overrides={"ingress": ingress})["applications"][0]
        config["applications"].append({**app, "name": f"refused-{n}", "route_prefix": f"/refused-{n}"})
    server = launch(tmp_path, config)
    process = server.process
    reasons = [reason for _, wanted in refusals for reason in wanted]
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = server.log()
            if all(reason in log for reason in reasons):
                return
            for n in range(len(refusals)):
                try:
                    answer = httpx.get(f"{server.base_url}/refused-{n}/v1/models", timeout=5)
                    assert answer.status_code not in (200, 401), f"application {n} started: {answer.status_code}"
                except httpx.HTTPError:
                    pass
            if process.poll() is not None:
                pytest.fail(f"serve run exited without the reasons {reasons}:\n{log[-3000:]}")
            time.sleep(1)
        missing = [reason for reason in reasons if reason not in server.log()]
        pytest.fail(f"no refusal with {missing} within {timeout}s:\n{server.log()[-3000:]}")
    finally:
        server.stop()


def test_empty_unset_or_malformed_key_sources_stop_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLM_HARDENING_UNSET_KEYS", raising=False)
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# the keys go here\n\n")
    # Every malformed form is refused by the same settings model, which tests/serve_app/test_auth.py
    # checks one by one; here two of them, to see each named by its position.
    malformed = ["sk-ok", {"name": "ops", "sha256": "zz" + sha256("sk-ops")[2:]}, "team:sk-after-the-colon"]
    assert_refuses_to_start(tmp_path, [
        ({"api_keys_env": "VLM_HARDENING_UNSET_KEYS"},
         ["VLM_HARDENING_UNSET_KEYS, which is unset or holds no key", "allow_unauthenticated"]),
        ({"api_keys_file": str(key_file)}, ["has no key: refusing to start"]),
        ({"api_keys": malformed}, ["api_keys.1.sha256", "64 hex digits", "api_keys.2", "may not contain ':'"]),
    ])


# ---- the open server: who a client is -----------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    ingress = {"rate_limits": {"requests_per_minute": OPEN_LIMIT}, "trusted_proxies": ["127.0.0.2/32"]}
    config = config_for_tests(free_port(), overrides={"ingress": ingress})
    server = start_server(tmp_path_factory.mktemp("open"), config)
    yield server
    server.stop()


def from_address(address: str) -> httpx.Client:
    """A client whose connections come from `address` (any 127.x address reaches a loopback server)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120)


def remaining(server: ServeProcess, client: httpx.Client, forwarded_for: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    answer = post(server, chat(), headers, client=client)
    assert answer.status_code == 200, answer.text[:300]
    return int(answer.headers["x-ratelimit-remaining-requests"])


def test_a_direct_client_cannot_pick_its_identity_with_x_forwarded_for(open_server: ServeProcess) -> None:
    # 127.0.0.1 is a peer whose header Serve's proxy itself applies; 127.0.0.3 one whose it ignores.
    for address in ("127.0.0.1", "127.0.0.3"):
        with from_address(address) as client:
            seen = [remaining(open_server, client, f"198.51.100.{i}") for i in range(1, 5)]
            seen.append(remaining(open_server, client))
        assert seen == list(range(seen[0], seen[0] - 5, -1)), (address, seen)  # one budget however forwarded


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget(open_server: ServeProcess) -> None:
    with from_address("127.0.0.2") as proxy:
        first = [remaining(open_server, proxy, f"203.0.113.{i}") for i in (1, 2, 3)]
        assert first == [OPEN_LIMIT - 1] * 3
        assert remaining(open_server, proxy, "203.0.113.1") == OPEN_LIMIT - 2
        # What the client wrote itself (left of the proxy's own entry) is not believed.
        assert remaining(open_server, proxy, "6.6.6.6, 203.0.113.1") == OPEN_LIMIT - 3
    # The proxy's clients are not the proxy's own budget, nor a direct client's.
    with from_address("127.0.0.2") as proxy:
        assert remaining(open_server, proxy) == OPEN_LIMIT - 1
