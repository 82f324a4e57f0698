"""IP addresses: the one type sknock uses for them, and the one rule for sources that can never be granted.

The lowest layer: it imports nothing of sknock, so the protocol, the verifier, the client and every
server edge take their address type and the bad-source rule from here.
"""

from __future__ import annotations

import ipaddress

__all__ = ["IPAddress", "is_bad_source"]

#: An IPv4 or IPv6 address, as :func:`ipaddress.ip_address` returns it.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_UNSPECIFIED_OR_BROADCAST = (bytes(4), b"\xff\xff\xff\xff")
_V6_UNSPECIFIED = bytes(16)


def is_bad_source(packed: bytes) -> bool:
    """True for a source address that no knock can come from and no grant may name: unspecified
    (0.0.0.0, ::), multicast (224.0.0.0/4, ff00::/8) or the IPv4 limited broadcast (255.255.255.255).
    Nothing can be answered at such an address, so a knock from it could only be forged.

    ``packed`` is the address as the IP header carries it (4 or 16 bytes, like ``IPv4Address.packed``):
    the capture and the monitor check it before they build an address object, with a few byte
    comparisons (``ipaddress``'s ``is_multicast`` costs a network containment test).
    """
    if len(packed) == 4:
        return packed[0] >> 4 == 0xE or packed in _V4_UNSPECIFIED_OR_BROADCAST
    return packed[0] == 0xFF or packed == _V6_UNSPECIFIED
