"""Parse one captured IP datagram into a knock-carrying :class:`Datagram`, or refuse it with a reason.

The packet capture (``capture.py``) reads from an ``AF_PACKET``/``SOCK_DGRAM`` socket, which hands us
the packet starting at the IP header whatever the link type.  That tap runs *before* the kernel's IP
and UDP layers look at the packet, so nothing here may assume the kernel has validated anything: every
byte is hostile.  This module is pure (no sockets, no clock) so that it can be fuzzed exhaustively.

The rule the parser follows is "accept only what the kernel itself would deliver to a local UDP
socket, and only the plain forms of it":

* IPv4: version 4, IHL >= 5 with well-formed options (skipped), a correct header checksum, a total
  length within the captured bytes (trailing bytes -- Ethernet padding -- are ignored), no fragments
  (MF set or a non-zero offset), protocol UDP.
* IPv6: a payload length within the captured bytes (0, a jumbogram, is refused), then at most
  :data:`MAX_EXTENSION_HEADERS` hop-by-hop (first only), routing (segments left 0 only) and
  destination-options headers, whose options must be ones a receiver may skip; a fragment header, AH,
  ESP or any other header is refused.
* UDP: a length field of at least 8 and no larger than the IP payload (a shorter one is honoured and
  the rest ignored, as the kernel does).
* ICMP, only when the caller takes the ICMP carrier (``icmp=True``; :mod:`sknock.carrier`): over IPv4
  protocol 1 with an echo request (type 8), over IPv6 next header 58 with an ICMPv6 echo request (type
  128), code 0 in both, and the 8-byte echo header present; the knock is the rest of the IP payload
  (ICMP has no length field of its own).  Any other ICMP message is refused (``not-echo``).  Without
  ``icmp``, ICMP is a transport like any other that is not UDP (``not-udp``).
* Source addresses that cannot be answered (unspecified, multicast, IPv4 limited broadcast:
  :func:`~sknock.addresses.is_bad_source`) are refused: a knock from them could only be forged.

UDP and ICMP checksums are deliberately *not* verified.  On the receive side of veth pairs, loopback and
offloading NICs the packet socket sees packets with ``CHECKSUM_PARTIAL`` or already-verified
checksums whose field holds only the pseudo-header sum, so a software check would refuse good knocks.
A corrupted knock costs nothing: the knock is authenticated encryption plus a signature, so it fails
the cryptographic checks with a reason of its own.  The IPv4 *header* checksum is checked, because the
kernel always fills it in software and would itself drop a packet whose header checksum is wrong.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from ..addresses import IPAddress, is_bad_source
from ..carrier import ECHO_HEADER, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, Carrier, internet_checksum
from ..errors import SknockError

__all__ = ["Datagram", "PacketError", "parse_datagram", "MAX_EXTENSION_HEADERS", "REASONS"]

#: Most IPv6 extension headers walked before the packet is refused; legitimate knocks carry none.
MAX_EXTENSION_HEADERS = 8

#: Every ``PacketError.reason`` this module produces, for counters and documentation.
REASONS = (
    "truncated",  # fewer bytes than a header or a length field says
    "not-ip",  # version nibble is neither 4 nor 6
    "ipv4-options-bad",  # IHL < 5, or an option that overruns the header
    "ipv4-checksum",  # IPv4 header checksum wrong
    "bad-length",  # a length field contradicts another (total length < IHL, UDP length, jumbogram)
    "fragment",  # any fragment, IPv4 or IPv6
    "ext-header",  # an IPv6 extension header we refuse (see the module docstring)
    "not-udp",  # the transport is not UDP (nor, with the ICMP carrier, ICMP)
    "not-echo",  # with the ICMP carrier: an ICMP message other than an echo request with code 0
    "bad-source",  # a source address no knock can come from
)

_UDP = 17
_ICMP = 1
_ICMPV6 = 58
_HOP_BY_HOP = 0
_ROUTING = 43
_FRAGMENT = 44
_DEST_OPTIONS = 60
# Extension headers (RFC 8200 and the IANA registry) that are not walked: refused as "ext-header"
# rather than "not-udp", because a UDP datagram may hide behind them.
_OTHER_EXTENSIONS = frozenset({50, 51, 135, 139, 140, 253, 254})

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_UDP_HEADER = struct.Struct("!HHHH")


class Datagram(NamedTuple):
    """One knock-carrying datagram as received: who sent it, to which address and port, on which interface,
    by which carrier.

    ``ifindex`` is 0 when the receiver does not know the interface.  Over ICMP (``carrier`` is
    :attr:`~sknock.carrier.Carrier.ICMP`) there are no ports: both are 0.  A named tuple rather than a
    frozen dataclass: one is made per captured packet, and this costs a third as much.
    """

    payload: bytes
    source: IPAddress
    destination: IPAddress
    source_port: int
    dest_port: int
    ifindex: int
    carrier: Carrier = Carrier.UDP


class PacketError(SknockError):
    """A captured packet is not a plain UDP datagram (or, with the ICMP carrier, echo request) for us.
    ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


def parse_datagram(data: bytes, *, ifindex: int = 0, icmp: bool = False) -> Datagram:
    """Parse ``data``, which starts at the IP header, into a :class:`Datagram`: a UDP datagram, or with
    ``icmp`` also an ICMP/ICMPv6 echo request (the ICMP carrier).

    Raises :class:`PacketError` for anything else; never any other exception.
    """
    if not data:
        raise PacketError("truncated", "empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data, ifindex, icmp)
    if version == 6:
        return _parse_ipv6(data, ifindex, icmp)
    raise PacketError("not-ip", f"IP version {version}")


def _parse_ipv4(data: bytes, ifindex: int, icmp: bool) -> Datagram:
    if len(data) < _IPV4_HEADER.size:
        raise PacketError("truncated", f"{len(data)} bytes is shorter than an IPv4 header")
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4_HEADER.unpack_from(data)
    header_len = (vihl & 0x0F) * 4
    if header_len < 20:
        raise PacketError("ipv4-options-bad", f"IHL {header_len // 4} is below 5")
    if header_len > len(data):
        raise PacketError("truncated", f"IPv4 header of {header_len} bytes in {len(data)}")
    if header_len == 20:  # the usual case, without options: one precompiled unpack
        checksum_ok = _fold(sum(_IPV4_WORDS.unpack_from(data))) == 0
    else:
        checksum_ok = internet_checksum(data[:header_len]) == 0
        _check_ipv4_options(data[20:header_len])
    if not checksum_ok:
        raise PacketError("ipv4-checksum", "IPv4 header checksum mismatch")
    if total < header_len:
        raise PacketError("bad-length", f"IPv4 total length {total} below header length {header_len}")
    if total > len(data):
        raise PacketError("truncated", f"IPv4 total length {total} but {len(data)} bytes captured")
    if frag & 0x3FFF:  # MF flag or a fragment offset
        raise PacketError("fragment", "IPv4 fragment")
    if proto != _UDP and not (icmp and proto == _ICMP):
        raise PacketError("not-udp", f"IPv4 protocol {proto}")
    if is_bad_source(src):
        raise PacketError("bad-source", f"source {IPv4Address(src)}")
    source = IPv4Address(int.from_bytes(src, "big"))
    return _parse_transport(data, proto, header_len, total, source, IPv4Address(dst), ifindex)


_IPV4_WORDS = struct.Struct("!10H")


def _check_ipv4_options(options: bytes) -> None:
    """Walk the option TLVs so that a malformed header is refused, as the kernel's option parser
    would.  Option meanings are ignored: a knock needs none, and none changes where it is delivered
    except source routing, which Linux refuses by default (``accept_source_route=0``)."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of options list: the rest is padding
            return
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= len(options):
            raise PacketError("ipv4-options-bad", f"option {kind} has no length byte")
        length = options[i + 1]
        if length < 2 or i + length > len(options):
            raise PacketError("ipv4-options-bad", f"option {kind} has bad length {length}")
        i += length


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _parse_ipv6(data: bytes, ifindex: int, icmp: bool) -> Datagram:
    if len(data) < 40:
        raise PacketError("truncated", f"{len(data)} bytes is shorter than an IPv6 header")
    payload_len = int.from_bytes(data[4:6], "big")
    if payload_len == 0:
        raise PacketError("bad-length", "IPv6 payload length 0 (jumbogram) is not a knock")
    end = 40 + payload_len
    if end > len(data):
        raise PacketError("truncated", f"IPv6 payload length {payload_len} but {len(data) - 40} bytes captured")
    next_header = data[6]
    offset = 40
    for count in range(MAX_EXTENSION_HEADERS + 1):
        if next_header == _UDP or (icmp and next_header == _ICMPV6):
            break
        if count == MAX_EXTENSION_HEADERS:
            raise PacketError("ext-header", f"more than {MAX_EXTENSION_HEADERS} extension headers")
        if next_header == _FRAGMENT:
            raise PacketError("fragment", "IPv6 fragment header")
        if next_header in (_HOP_BY_HOP, _ROUTING, _DEST_OPTIONS):
            if next_header == _HOP_BY_HOP and count != 0:
                raise PacketError("ext-header", "hop-by-hop header not first")
            if offset + 8 > end:
                raise PacketError("truncated", f"extension header {next_header} overruns the packet")
            length = (data[offset + 1] + 1) * 8
            if offset + length > end:
                raise PacketError("truncated", f"extension header {next_header} overruns the packet")
            header = data[offset : offset + length]
            if next_header == _ROUTING:
                if header[3] != 0:
                    raise PacketError("ext-header", "routing header with segments left: not for us yet")
            else:
                _check_ipv6_options(header[2:], next_header)
            next_header = header[0]
            offset += length
            continue
        if next_header in _OTHER_EXTENSIONS:
            raise PacketError("ext-header", f"extension header {next_header} is not accepted")
        raise PacketError("not-udp", f"IPv6 next header {next_header}")
    source = data[8:24]
    if is_bad_source(source):
        raise PacketError("bad-source", f"source {IPv6Address(source)}")
    return _parse_transport(data, next_header, offset, end, IPv6Address(source), IPv6Address(data[24:40]), ifindex)


def _check_ipv6_options(options: bytes, header: int) -> None:
    """Walk hop-by-hop or destination option TLVs.  An option whose two high type bits are not 00
    tells a receiver that does not understand it to discard the packet; a knock needs none, so
    all of those are refused, which keeps us no more permissive than the kernel."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # Pad1
            i += 1
            continue
        if i + 1 >= len(options):
            raise PacketError("ext-header", f"option {kind} in header {header} has no length byte")
        length = options[i + 1]
        if i + 2 + length > len(options):
            raise PacketError("ext-header", f"option {kind} in header {header} overruns it")
        if kind >> 6:
            raise PacketError("ext-header", f"option {kind:#04x} in header {header} must be understood")
        i += 2 + length


#: The echo request's type for each ICMP protocol number the parser takes.
_ECHO_REQUEST = {_ICMP: ICMP_ECHO_REQUEST, _ICMPV6: ICMPV6_ECHO_REQUEST}


def _parse_transport(
    data: bytes,
    proto: int,
    start: int,
    end: int,
    source: IPAddress,
    destination: IPAddress,
    ifindex: int,
) -> Datagram:
    """The UDP datagram, or (``proto`` ICMP or ICMPv6) the echo request, in ``data[start:end]`` (the IP
    payload), read in place.  An echo request's data, the knock, runs to ``end``: ICMP has no length."""
    if proto != _UDP:
        if end - start < ECHO_HEADER.size:
            raise PacketError("truncated", f"echo header needs 8 bytes, {end - start} present")
        kind, code = data[start], data[start + 1]
        if kind != _ECHO_REQUEST[proto] or code != 0:
            raise PacketError("not-echo", f"ICMP type {kind} code {code}")
        return Datagram(bytes(data[start + ECHO_HEADER.size : end]), source, destination, 0, 0, ifindex, Carrier.ICMP)
    if end - start < _UDP_HEADER.size:
        raise PacketError("truncated", f"UDP header needs 8 bytes, {end - start} present")
    source_port, dest_port, length, _checksum = _UDP_HEADER.unpack_from(data, start)
    if length < 8 or length > end - start:
        raise PacketError("bad-length", f"UDP length {length} with {end - start} bytes of IP payload")
    return Datagram(
        payload=bytes(data[start + 8 : start + length]),
        source=source,
        destination=destination,
        source_port=source_port,
        dest_port=dest_port,
        ifindex=ifindex,
    )
