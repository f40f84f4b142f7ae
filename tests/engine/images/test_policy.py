"""The address policy against IPv6 forms that carry an IPv4 address, and the ranges `is_global` rules out."""

from __future__ import annotations

import ipaddress

import pytest

from engine.images.policy import AddressPolicy, embedded_ipv4


@pytest.mark.parametrize(
    "private, public",
    [
        ("64:ff9b::7f00:1", "64:ff9b::808:808"),  # NAT64 (RFC 6052): 127.0.0.1 / 8.8.8.8
        ("64:ff9b::a9fe:a9fe", "64:ff9b::101:101"),  # NAT64: 169.254.169.254 (cloud metadata) / 1.1.1.1
        ("2002:7f00:1::", "2002:808:808::1"),  # 6to4: 127.0.0.1 / 8.8.8.8
        ("2002:c0a8:101::1", "2002:101:101::"),  # 6to4: 192.168.1.1 / 1.1.1.1
        ("::7f00:1", None),  # IPv4-compatible (deprecated): 127.0.0.1
        ("::a00:1", None),  # IPv4-compatible: 10.0.0.1
        ("::ffff:0:7f00:1", None),  # IPv4-translated (SIIT): 127.0.0.1
        ("64:ff9b:1::7f00:1", None),  # local-use NAT64 (RFC 8215): refused whatever it carries
        ("64:ff9b:1:abcd::808:808", None),
        ("fec0::1", None),  # site-local: deprecated, still routed inside some networks
    ],
)
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_carry(private: str, public: str | None) -> None:
    """Refused when what they reach is not public; NAT64 and 6to4 of public addresses stay allowed,
    as an IPv6-only host reaches every IPv4 site through NAT64."""
    policy = AddressPolicy([])
    assert not policy.address_allowed(ipaddress.ip_address(private))
    if public is not None:
        assert policy.address_allowed(ipaddress.ip_address(public))


def test_an_allowed_network_covers_the_ipv6_forms_of_its_addresses() -> None:
    policy = AddressPolicy(["127.0.0.0/8"])
    for address in ("127.0.0.5", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::"):
        assert policy.address_allowed(ipaddress.ip_address(address)), address
    assert not policy.address_allowed(ipaddress.ip_address("64:ff9b::a00:1"))


@pytest.mark.parametrize(
    "address, carried",
    [("64:ff9b::c000:221", "192.0.2.33"), ("2002:c000:221::", "192.0.2.33"), ("::ffff:c000:221", "192.0.2.33"),
     ("::ffff:0:c000:221", "192.0.2.33"), ("::c000:221", "192.0.2.33"), ("2606:4700::1111", None)],
)
def test_embedded_ipv4_reads_the_address_each_form_carries(address: str, carried: str | None) -> None:
    inner = embedded_ipv4(ipaddress.ip_address(address))
    assert (str(inner) if inner else None) == carried
