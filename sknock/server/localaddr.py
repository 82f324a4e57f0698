"""Which destination addresses a knock may be sent to: by default the host's own.

On a host that routes, the packet capture (AF_PACKET) also sees datagrams passing through to other
hosts.  A knock addressed to another host is not a knock for this one, so the worker refuses it
(``wrong-destination``) unless the operator listed that address (``knockDestinations``).

The host's addresses come from the kernel over rtnetlink (an ``RTM_GETADDR`` dump, which needs no
privilege), read at start and again -- at most once a second -- when a datagram names an address not
in the set, so an address added later (DHCP, a new interface) is found without a restart.  A worker
asks over one rtnetlink socket opened before its seccomp filter, which forbids new sockets.  A loopback
address counts only for a datagram that arrived on a loopback interface: from the wire, the kernel drops
such packets as martians.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass, field

from ..addresses import IPAddress

__all__ = ["DestinationFilter", "host_addresses", "rtnetlink_socket"]


_NLMSG = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_REFRESH = 1.0  # seconds between two reads of the host's addresses


def rtnetlink_socket() -> socket.socket:
    """A socket to ask the kernel for the host's addresses over (needs no privilege)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.settimeout(2.0)
    return sock


def host_addresses(sock: socket.socket | None = None, seq: int = 1) -> dict[IPAddress, int]:
    """Every address the kernel has on this host (this network namespace), with its interface index.
    Over ``sock`` when given (kept open: what an earlier, aborted dump left on it is skipped by its
    sequence number ``seq``), else over a socket of its own."""
    if sock is None:
        with rtnetlink_socket() as own:
            return _dump_addresses(own, seq)
    return _dump_addresses(sock, seq)


def _dump_addresses(sock: socket.socket, seq: int) -> dict[IPAddress, int]:
    found: dict[IPAddress, int] = {}
    request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    sock.send(_NLMSG.pack(_NLMSG.size + len(request), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + request)
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _, number, _ = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size or offset + length > len(data):
                raise OSError("malformed rtnetlink answer")
            if number != seq:
                pass  # the rest of an earlier dump
            elif kind == _NLMSG_DONE:
                return found
            elif kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                if code:
                    raise OSError(-code, os.strerror(-code))
            elif kind == _RTM_NEWADDR:
                _parse_address(data[offset + _NLMSG.size : offset + length], found)
            offset += (length + 3) & ~3


def _parse_address(body: bytes, found: dict[IPAddress, int]) -> None:
    family, _, _, _, index = _IFADDRMSG.unpack_from(body)
    size = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
    attributes: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            break
        attributes[kind] = body[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    # IPv4: IFA_LOCAL is this host's address (IFA_ADDRESS is the peer's on a point-to-point link)
    raw = attributes.get(_IFA_LOCAL) or attributes.get(_IFA_ADDRESS)
    if size and raw is not None and len(raw) == size:
        found[ipaddress.ip_address(raw)] = index


@dataclass
class DestinationFilter:
    """Decides whether a datagram's destination is one a knock may be sent to.  ``local``: the host's
    own addresses count; ``extra``: addresses the operator listed."""

    local: bool = True
    extra: Collection[IPAddress] = ()
    _known: dict[IPAddress, int] = field(default_factory=dict)
    _read_at: float = -1e18
    _sock: socket.socket | None = None
    _seq: int = 0

    def __post_init__(self) -> None:
        if self.local:  # opened now, before a worker's seccomp filter forbids new sockets
            with contextlib.suppress(OSError):
                self._sock = rtnetlink_socket()

    def allows(self, destination: IPAddress, ifindex: int, now: float) -> bool:
        """Whether a knock addressed to ``destination`` (arriving on interface ``ifindex``) may be verified
        at ``now`` (seconds).  An unknown address re-reads the host's addresses at most once a second; a
        loopback address counts only on its own interface."""
        if destination in self.extra:
            return True
        if not self.local:
            return False
        index = self._known.get(destination)
        if index is None and now - self._read_at >= _REFRESH:
            self._read_at = now
            # on failure keep what was known: an address that cannot be confirmed is refused
            self._seq = self._seq % 0xFFFFFFFF + 1
            with contextlib.suppress(OSError):
                self._known = host_addresses(self._sock, self._seq) if self._sock is not None else {}
            index = self._known.get(destination)
        if index is None:
            return False
        return not destination.is_loopback or ifindex == index
