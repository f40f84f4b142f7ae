"""Who a request comes from: the connecting peer, or, behind trusted proxies, the address they forwarded.

Rules (the identity an open service's per-address rate limits use):
- The peer is the client unless it is one of `trusted_proxies`; then X-Forwarded-For is walked right
  to left (each proxy appends the address it saw), past trusted hops, and the first untrusted address
  is the client. When every hop is trusted, the leftmost is. An entry that is not an IP address ends
  the walk at the trusted hop that reported it.
- Serve's HTTP proxy runs uvicorn with proxy_headers on: for a peer among uvicorn's forwarded-allow
  IPs (FORWARDED_ALLOW_IPS, loopback by default) it has already replaced the peer in scope["client"]
  with an address taken from X-Forwarded-For, so the scope no longer names the peer. Such a rewrite
  is recognised (the client is exactly what uvicorn picks from the header; a real peer never matches
  that unless it forwarded its own address and port) and undone: the peer was one of uvicorn's
  allowed IPs. When all of them are trusted proxies here, the header is walked as above; otherwise
  those peers, header or not, count as one client named by the first of uvicorn's allowed IPs. A
  direct client on loopback thus cannot pick a fresh identity with a new X-Forwarded-For each time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

# uvicorn's own parser of forwarded-allow IPs and of X-Forwarded-For: the rewrite is recognised by
# running exactly the code that made it.
from uvicorn.middleware.proxy_headers import _TrustedHosts

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def serve_proxy_allowed_ips() -> str:
    """uvicorn's forwarded-allow IPs as Serve's proxy builds its uvicorn.Config: from FORWARDED_ALLOW_IPS,
    loopback by default (the replica runs in the same Ray cluster, with the same environment)."""
    allowed = uvicorn.Config(app=None, log_config=None, log_level=None).forwarded_allow_ips
    return allowed if isinstance(allowed, str) else ",".join(allowed)


def parse_ip(text: str) -> IPAddress | None:
    """An address as X-Forwarded-For or a scope writes it: bare, `v4:port` or `[v6]:port`."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


class ClientAddressPolicy:
    def __init__(self, trusted_proxies: Sequence[IPNetwork], serve_proxy_allowed: str) -> None:
        self._trusted = [ipaddress.ip_network(n) for n in trusted_proxies]
        self._uvicorn = _TrustedHosts(serve_proxy_allowed)
        entries = [e.strip() for e in serve_proxy_allowed.split(",") if e.strip()]
        self._uvicorn_label = entries[0] if entries else "unknown"
        self._uvicorn_peers_trusted = self._covers(entries)

    def trusted(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._trusted)

    def _covers(self, entries: list[str]) -> bool:
        """Whether every one of uvicorn's allowed IPs is a trusted proxy here."""
        if not entries or "*" in entries:
            return False
        for entry in entries:
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                return False
            if not any(net.version == t.version and net.subnet_of(t) for t in self._trusted):  # type: ignore[arg-type]
                return False
        return True

    def _walk(self, forwarded_for: str, nearest: str) -> str:
        for hop in reversed(forwarded_for.split(",")):
            ip = parse_ip(hop)
            if ip is None:
                return nearest
            if not self.trusted(ip):
                return str(ip)
            nearest = str(ip)
        return nearest

    def client(self, scope_client: Sequence | None, forwarded_for: str | None) -> str | None:
        """The client's address for a scope whose `client` is `scope_client` and whose X-Forwarded-For
        headers, joined with commas, are `forwarded_for`."""
        if not scope_client:
            return None
        host, port = str(scope_client[0]), int(scope_client[1] or 0)
        if forwarded_for and self._uvicorn.get_trusted_client_address(forwarded_for) == (host, port):
            if self._uvicorn_peers_trusted:
                return self._walk(forwarded_for, self._uvicorn_label)
            return self._uvicorn_label
        peer = parse_ip(host)
        if peer is None:
            return host
        if self.trusted(peer):
            return self._walk(forwarded_for, str(peer)) if forwarded_for else str(peer)
        # The same peer with a header would have been rewritten: one identity, header or not.
        return self._uvicorn_label if str(peer) in self._uvicorn else str(peer)


class ClientAddress:
    """ASGI middleware: sets scope["client"] to the client's address by the rules above."""

    def __init__(self, app: ASGIApp, policy: ClientAddressPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
            address = self.policy.client(scope.get("client"), ",".join(forwarded) or None)
            if address is not None:
                scope["client"] = (address, 0)
        await self.app(scope, receive, send)
