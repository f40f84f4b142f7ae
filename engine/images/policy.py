"""Which IP addresses the image fetcher may connect to on a client's behalf.

An address is allowed when it, or the IPv4 address it carries, lies in a network the operator
allowed (`ImageSettings.allowed_hosts`). Otherwise it must be globally routable (`ipaddress`'s
`is_global`) and not multicast; an IPv6 address must also not be reserved or site-local.

IPv6 forms that carry an IPv4 address reach that IPv4 address through the host's stack or a
gateway (NAT64, 6to4 relays), so the IPv4 address they carry is what must be public: IPv4-mapped
`::ffff:0:0/96`, IPv4-translated `::ffff:0:0:0/96`, IPv4-compatible `::/96`, NAT64 `64:ff9b::/96`
and 6to4 `2002::/16`. Forms whose IPv4 part cannot be read back reliably are refused outright:
Teredo `2001::/32` (the client address is obfuscated) and local-use NAT64 `64:ff9b:1::/48` (the
position of the IPv4 part depends on the operator's prefix length).
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REFUSED_V6 = tuple(ipaddress.IPv6Network(n) for n in ("2001::/32", "64:ff9b:1::/48"))
# Networks whose last 32 bits are the IPv4 address the packet is delivered to.
_LAST_32_BITS_V6 = tuple(
    ipaddress.IPv6Network(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96")
)


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (see the module docstring), or None."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in _LAST_32_BITS_V6):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _public(address: IPAddress) -> bool:
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return not (address.is_reserved or address.is_site_local)
    return True


class AddressPolicy:
    """Decides which hosts and IP addresses the server may connect to when fetching images."""

    def __init__(self, allowed: list[str]) -> None:
        self._hosts = {a.lower() for a in allowed}
        self._networks = []
        for entry in allowed:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                pass  # a host name, matched by name

    def host_allowed(self, host: str) -> bool:
        """Whether `host` was allowed by name; its addresses are then not checked."""
        return host.lower().strip("[]") in self._hosts

    def _operator_allowed(self, address: IPAddress) -> bool:
        return any(address in net for net in self._networks if net.version == address.version)

    def address_allowed(self, address: IPAddress) -> bool:
        inner = embedded_ipv4(address)
        if self._operator_allowed(address) or (inner is not None and self._operator_allowed(inner)):
            return True
        if isinstance(address, ipaddress.IPv6Address) and any(address in net for net in _REFUSED_V6):
            return False
        return _public(inner) if inner is not None else _public(address)
