"""The one bad-source rule (sknock.addresses), which the capture, the packet parser and the root process share."""

from __future__ import annotations

import ipaddress

import pytest

from sknock.addresses import IPAddress, is_bad_source

BAD = ["0.0.0.0", "224.0.0.1", "239.255.255.255", "255.255.255.255", "::", "ff02::1", "ff0e::1234"]
GOOD = ["198.18.0.2", "10.0.0.1", "223.255.255.255", "240.0.0.1", "255.255.255.254", "127.0.0.1",
        "::1", "fd00:5e::2", "fe80::1", "2001:db8::1", "::ffff:198.18.0.2"]


@pytest.mark.parametrize("text", BAD)
def test_unspecified_multicast_and_limited_broadcast_are_bad_sources(text: str) -> None:
    assert is_bad_source(ipaddress.ip_address(text).packed)


@pytest.mark.parametrize("text", GOOD)
def test_other_addresses_are_not(text: str) -> None:
    assert not is_bad_source(ipaddress.ip_address(text).packed)


def test_the_rule_is_ipaddress_s_own_plus_the_limited_broadcast() -> None:
    """Every first byte, and the edges of each family: the byte-level rule says what ipaddress says."""
    samples: list[IPAddress] = [ipaddress.IPv4Address(b * 0x1000000 + 7) for b in range(256)]
    samples += [ipaddress.IPv6Address(b << 120 | 7) for b in range(256)]
    samples += [ipaddress.IPv4Address(0), ipaddress.IPv4Address(0xFFFFFFFF), ipaddress.IPv6Address(0)]
    for address in samples:
        expected = address.is_multicast or address.is_unspecified or address == ipaddress.IPv4Address(0xFFFFFFFF)
        assert is_bad_source(address.packed) is expected, address
