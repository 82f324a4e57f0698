"""How a knock datagram travels to the server: its carriers, and the one function that sends by them.

A knock is one datagram (:mod:`sknock.protocol`); what carries it is not part of it.  Two carriers:

* :attr:`Carrier.UDP` -- the datagram is a UDP payload, sent to a port of the client's choosing (the
  server captures every port, or those in its ``knockPorts``).  Any user may send it.
* :attr:`Carrier.ICMP` -- the datagram is the payload of an ICMP echo request (IPv4, type 8) or ICMPv6
  echo request (type 128), for networks that let only ping out.  The server must have
  ``knockCarriers = udp, icmp``.  It is sent through an unprivileged *ping socket*
  (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, which Linux allows to the groups in
  ``net.ipv4.ping_group_range``; the kernel then writes the identifier and the checksum), else through a
  raw socket (``CAP_NET_RAW``); when neither may be opened, :class:`~sknock.errors.CarrierUnavailableError`
  says so in one line.  Whatever answers the echo request (the server host's kernel, or nothing, as its
  own firewall decides) is not read: the knock's outcome shows, as with UDP, by the port opening.

The echo request's layout (type, code, checksum, identifier, sequence number, then the data) is the
same for both IP versions, and its header is 8 bytes like UDP's, so the knock sizes that fit one packet
(``sknock.protocol.wire.BUCKETS``) fit here too.  The server side parses it in
:mod:`sknock.server.packet` with the constants defined here.
"""

from __future__ import annotations

import enum
import errno
import secrets
import socket
import struct

from .addresses import IPAddress
from .errors import CarrierUnavailableError, ClientError

__all__ = [
    "Carrier",
    "ECHO_HEADER",
    "ICMP_ECHO_REQUEST",
    "ICMPV6_ECHO_REQUEST",
    "echo_request",
    "internet_checksum",
    "send",
]

#: ICMP echo request's type (RFC 792) and ICMPv6 echo request's type (RFC 4443); the code is 0 in both.
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
#: type, code, checksum, identifier, sequence number: 8 bytes, before the data (the knock).
ECHO_HEADER = struct.Struct("!BBHHH")


class Carrier(enum.StrEnum):
    """What carries a knock datagram: a UDP payload, or an ICMP/ICMPv6 echo request's data."""

    UDP = "udp"
    ICMP = "icmp"

    @classmethod
    def parse(cls, value: str | Carrier) -> Carrier:
        """``value`` as a carrier (``"udp"``, ``"icmp"``, in any case); ValueError naming both otherwise."""
        if isinstance(value, Carrier):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        raise ValueError(f"via must be 'udp' or 'icmp', not {value!r}")


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones'-complement sum, folded and complemented: the value that goes in the checksum field
    (with the field zero), and 0 over data whose checksum field is right."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(payload: bytes, *, version: int, identifier: int, sequence: int) -> bytes:
    """An echo request message (ICMP for ``version`` 4, ICMPv6 for 6) carrying ``payload``.  The ICMPv4
    checksum is filled in; the ICMPv6 one (over a pseudo-header with the addresses) is left 0 for the
    kernel, which computes it for every ICMPv6 socket."""
    kind = ICMP_ECHO_REQUEST if version == 4 else ICMPV6_ECHO_REQUEST
    message = ECHO_HEADER.pack(kind, 0, 0, identifier & 0xFFFF, sequence & 0xFFFF) + payload
    if version == 4:
        checksum = internet_checksum(message)
        message = message[:2] + checksum.to_bytes(2, "big") + message[4:]
    return message


def _icmp_socket(family: int) -> socket.socket:
    """A ping socket if this user's group may open one, else a raw ICMP socket (CAP_NET_RAW)."""
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    try:
        return socket.socket(family, socket.SOCK_DGRAM, proto)
    except OSError as ping_error:
        if ping_error.errno not in (errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT):
            raise
        ping_why = ping_error.strerror or str(ping_error)
    try:
        return socket.socket(family, socket.SOCK_RAW, proto)
    except OSError as raw_error:
        if raw_error.errno not in (errno.EACCES, errno.EPERM):
            raise
        raise CarrierUnavailableError(
            f"cannot send a knock over ICMP: no ping socket ({ping_why}; this user's group must be in "
            f"net.ipv4.ping_group_range) and no raw socket ({raw_error.strerror}; needs CAP_NET_RAW); "
            "use --via udp, or widen ping_group_range"
        ) from None


def send(datagram: bytes, address: IPAddress, carrier: Carrier, port: int = 0) -> None:
    """Send ``datagram`` to ``address`` by ``carrier``: to UDP ``port``, or as an echo request's data.
    A failed send is a :class:`~sknock.errors.ClientError` naming the address and the carrier."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    where = f"{address} udp/{port}" if carrier is Carrier.UDP else f"{address} over ICMP"
    try:
        if carrier is Carrier.UDP:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.sendto(datagram, (str(address), port))
            return
        with _icmp_socket(family) as s:
            # A ping socket overwrites the identifier with its own and computes the checksum; a raw
            # socket sends the message as built.
            message = echo_request(
                datagram, version=address.version, identifier=secrets.randbits(16), sequence=secrets.randbits(16)
            )
            s.sendto(message, (str(address), 0))
    except CarrierUnavailableError:
        raise
    except OSError as exc:
        raise ClientError(f"cannot send the knock to {where}: {exc.strerror or exc}") from None
