"""The client address behind Serve's proxy: uvicorn's own ProxyHeadersMiddleware (as Serve's proxy runs
it) rewrites the scope first, then ClientAddressPolicy decides with the trusted proxies."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from serve_app.openai.client_address import ClientAddressPolicy, parse_ip, serve_proxy_allowed_ips

SERVE_PROXY_DEFAULT = "127.0.0.1,::1"  # uvicorn's forwarded_allow_ips when FORWARDED_ALLOW_IPS is unset


def through_serve_proxy(peer: tuple[str, int], forwarded_for: list[str]) -> dict:
    """The scope the ingress replica receives: what uvicorn (proxy_headers on) made of the connection."""
    scope = {"type": "http", "client": peer, "headers": [(b"x-forwarded-for", v.encode()) for v in forwarded_for]}
    seen: dict = {}

    async def app(scope, receive, send) -> None:
        seen.update(scope)

    asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=SERVE_PROXY_DEFAULT)(scope, None, None))
    return seen


def client(trusted: list[str], peer: tuple[str, int], *forwarded_for: str) -> str | None:
    scope = through_serve_proxy(peer, list(forwarded_for))
    policy = ClientAddressPolicy([ipaddress.ip_network(t) for t in trusted], SERVE_PROXY_DEFAULT)
    return policy.client(scope["client"], ",".join(forwarded_for) or None)


def test_serve_proxy_default_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert serve_proxy_allowed_ips() == SERVE_PROXY_DEFAULT
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.1")
    assert serve_proxy_allowed_ips() == "10.0.0.1"


def test_the_serve_proxy_really_rewrites_loopback_peers() -> None:
    # The premise: without the policy, a loopback client names itself.
    assert through_serve_proxy(("127.0.0.1", 50000), ["9.9.9.9"])["client"] == ("9.9.9.9", 0)


@pytest.mark.parametrize("forged", ["9.9.9.9", "1.2.3.4, 5.6.7.8", "[2001:db8::1]:443", "127.0.0.1, 8.8.8.8", "junk"])
def test_a_direct_loopback_client_cannot_choose_its_identity(forged: str) -> None:
    assert client([], ("127.0.0.1", 50000), forged) == "127.0.0.1"
    assert client([], ("::1", 50000), forged) == "127.0.0.1"  # one identity for every untrusted loopback peer


def test_a_direct_client_without_the_header_is_its_peer() -> None:
    assert client([], ("127.0.0.1", 50000)) == "127.0.0.1"
    assert client([], ("::1", 50000)) == "127.0.0.1"  # as with a header: one loopback identity
    assert client([], ("203.0.113.7", 50000)) == "203.0.113.7"
    assert client([], ("::ffff:203.0.113.7", 50000)) == "203.0.113.7"


def test_an_untrusted_remote_peer_is_its_own_address_whatever_it_forwards() -> None:
    assert client([], ("203.0.113.7", 40000), "9.9.9.9") == "203.0.113.7"
    assert client(["10.0.0.0/8"], ("203.0.113.7", 40000), "10.0.0.1") == "203.0.113.7"


def test_behind_a_trusted_load_balancer_each_client_is_itself() -> None:
    lb = ("10.0.0.2", 40000)
    assert client(["10.0.0.2/32"], lb, "198.51.100.1") == "198.51.100.1"
    assert client(["10.0.0.2/32"], lb, "198.51.100.2") == "198.51.100.2"
    # The walk goes right to left: what the client wrote itself (left) is not believed.
    assert client(["10.0.0.2/32"], lb, "6.6.6.6, 198.51.100.1") == "198.51.100.1"
    # Several trusted hops are skipped.
    assert client(["10.0.0.0/8"], lb, "6.6.6.6, 198.51.100.1, 10.0.0.9") == "198.51.100.1"
    # Every hop trusted: the furthest one.
    assert client(["10.0.0.0/8"], lb, "10.1.1.1, 10.0.0.9") == "10.1.1.1"
    # A hop that is not an address ends the walk at the trusted hop that reported it.
    assert client(["10.0.0.0/8"], lb, "198.51.100.1, garbage") == "10.0.0.2"
    # A trusted peer that forwards nothing is the client.
    assert client(["10.0.0.2/32"], lb) == "10.0.0.2"


def test_a_trusted_proxy_on_loopback_is_walked_after_serve_rewrote_the_scope() -> None:
    trusted = ["127.0.0.0/8", "::1/128"]
    assert client(trusted, ("127.0.0.1", 50000), "198.51.100.1") == "198.51.100.1"
    assert client(trusted, ("127.0.0.1", 50000), "6.6.6.6, 198.51.100.1") == "198.51.100.1"
    assert client(trusted, ("127.0.0.1", 50000), "198.51.100.1, 127.0.0.1") == "198.51.100.1"
    assert client(trusted, ("127.0.0.1", 50000), "[2001:db8::5]:1234") == "2001:db8::5"


def test_a_remote_client_forging_its_own_address_gains_no_fresh_identity() -> None:
    # Indistinguishable from a rewrite by Serve's proxy, so it counts as the loopback identity: one
    # shared budget, never one the client picks.
    assert client([], ("203.0.113.7", 40000), "203.0.113.7:40000") == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.2.3.4", "1.2.3.4"), (" 1.2.3.4:80 ", "1.2.3.4"), ("[::1]:80", "::1"), ("2001:db8::1", "2001:db8::1"),
     ("::ffff:1.2.3.4", "1.2.3.4"), ("unknown", None), ("", None), ("[::1", None)],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    parsed = parse_ip(text)
    assert (str(parsed) if parsed else None) == expected
