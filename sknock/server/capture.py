"""Receiving knock datagrams: the only module of the capture edge that touches sockets.

Two receivers with one shape (``filenos()`` for a worker's selector, ``receive()`` to drain,
``stats`` to count what was refused, ``close()``; both are context managers):

* :func:`open_packet_capture` -- the normal mode.  ``AF_PACKET``/``SOCK_DGRAM`` sockets listening to
  ``ETH_P_ALL`` are delivered a copy of each packet by the device layer's taps, which run before tc
  and netfilter's netdev ingress hook, and long before the IP layer, the ``inet`` input hooks and the
  UDP socket lookup.  So the server sees knocks to ports that no socket listens on and that the
  firewall drops, and the host answers nothing: no ICMP port-unreachable leaks that a server exists.
  A classic BPF filter (:mod:`sknock.server.bpf`) keeps everything else in the kernel.  With ``icmp``
  it also takes knocks carried in ICMP/ICMPv6 echo requests (:mod:`sknock.carrier`), which only a
  packet capture can see.
* :func:`open_udp_capture` -- plain bound UDP sockets, for hosts where raw capture is not wanted.
  The port is then open (and visible to a scanner only by silence, since UDP never answers).

Privileges: the kernel checks ``CAP_NET_RAW`` only when a packet socket is created; binding, attaching
the filter and reading need none.  So the server opens the captures as root and each worker then drops to
an unprivileged user (``setgid``/``setuid``) and keep reading; ``tests/test_capture.py`` checks this.
The filter is locked (``SO_LOCK_FILTER``) so that a compromised process cannot widen it either.

Receiving never raises for what arrives: a malformed packet is counted in ``stats`` under its
:class:`~sknock.server.packet.PacketError` reason, a socket error (for instance ``ENETDOWN`` when a
bound interface goes down) under ``"socket-error"``.  Python has no ``recvmmsg``, so a burst is drained
with up to ``max_count`` non-blocking receive calls per :meth:`receive`, in rotating socket order
so one busy interface cannot starve another.

Exact copies: the worker calls :meth:`remember` for each datagram that passed its cheap checks, with
its source address, and from then on an exact copy of that UDP payload *from that source* is dropped
here, before the IP header is even parsed (counted as ``"duplicate"``).  A flood of replays of one
captured knock from one address then costs a receive and a hash per packet instead of the whole
pre-check (bench/README.md has the figures).  A copy from another address goes on to the verifier, which
decides it without a public-key operation: keying on the payload alone would let a copy sent first from
elsewhere stop the genuine sender's knock here, before the verifier could see that the knock is bound
to the genuine sender's address.  Only datagrams with a valid proof of work are remembered, so junk
cannot push a real knock out of the set cheaply, and a copy that is missed still meets the verifier's
replay caches.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import ipaddress
import socket
import struct
import sys
from collections.abc import Sequence
from types import TracebackType

from ..addresses import IPAddress, is_bad_source
from ..errors import ConfigError, SknockError
from ..replay import RecentKeys
from .bpf import DEFAULT_MAX_PACKET, Instruction, build_filter, pack
from .packet import Datagram, PacketError, parse_datagram

__all__ = [
    "CaptureError",
    "PacketCapture",
    "UdpCapture",
    "open_packet_capture",
    "open_udp_capture",
    "DEFAULT_RCVBUF",
    "kernel_drops",
]

#: Receive buffer per socket: room for thousands of knocks while the workers verify signatures.
DEFAULT_RCVBUF = 4 * 1024 * 1024
#: Hashes of recent datagrams that passed the worker's cheap checks (see "Exact copies" above).
RECENT_PAYLOADS = 16384

# From linux/if_ether.h, asm-generic/socket.h and linux/in.h; Python's socket module lacks them.
_ETH_P_ALL = 0x0003
_SO_ATTACH_FILTER = 26
_SO_RCVBUFFORCE = 33
_SO_LOCK_FILTER = 44
_SIOCGIFINDEX = 0x8933
_IP_PKTINFO = 8
_SOL_PACKET = 263
_PACKET_FANOUT = 18
_PACKET_FANOUT_HASH = 0
_PACKET_FANOUT_FLAG_ROLLOVER = 0x1000
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")  # sk_meminfo; SK_MEMINFO_DROPS is the ninth
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_REJECT_ALL = (Instruction(0x06, 0, 0, 0),)  # ret #0
_MAX_NAME_CACHE = 256
_MAX_COPIES_KEPT = 4096


def _packed(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text.split("%", 1)[0])


def kernel_drops(fds: Sequence[int]) -> int:
    """Packets the kernel dropped on the capture sockets ``fds`` since they were opened (their receive
    buffer was full): the socket's drop counter (``SO_MEMINFO``), the same for AF_PACKET and UDP sockets,
    read without resetting it and without privilege.  A socket that cannot say counts 0."""
    total = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket (any more)
            continue
        try:
            total += _MEMINFO.unpack_from(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size))[8]
        except (OSError, struct.error):
            pass
        finally:
            sock.detach()
    return total


class CaptureError(SknockError):
    """A capture socket could not be opened (no privilege, interface gone, kernel refused)."""


def _attach_filter(sock: socket.socket, program: Sequence[Instruction]) -> None:
    """``SO_ATTACH_FILTER`` with a ``struct sock_fprog`` pointing at the packed program; the kernel
    copies the program, so the buffer only has to live through the call."""
    code = ctypes.create_string_buffer(pack(program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """``SO_RCVBUFFORCE`` goes past ``net.core.rmem_max`` (needs CAP_NET_ADMIN); else best effort."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _drain(sock: socket.socket, limit: int = 100_000) -> None:
    """Discard what was queued before the real filter was attached (bounded)."""
    for _ in range(limit):
        try:
            sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return


class _Receiver:
    """What both receivers share: the socket list, counters, rotation and closing."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._sockets = sockets
        self._start = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self._recent = RecentKeys(RECENT_PAYLOADS)
        self._copies: list[bytes] = []

    def remember(self, payload: bytes, source: IPAddress) -> None:
        """``payload`` from ``source`` passed the cheap checks: drop exact copies of it from that
        source from now on."""
        self._recent.add(hash((payload, source.packed)))

    def remember_everywhere(self, payload: bytes) -> None:
        """The knock in ``payload`` has a final outcome (granted, or refused for a reason no sender address
        can change): drop exact copies of it from every source from now on.  Until then copies are dropped
        per source only, so a copy sent first from another address cannot hide a bound knock's genuine
        sender; once the outcome is final, a replay flood from spoofed sources costs a hash a packet."""
        self._recent.add(hash(payload))

    def take_copies(self) -> list[bytes]:
        """The source addresses (packed, as the IP header says) of the copies dropped since the last
        call, for the refusal log; at most a few thousand are kept between calls."""
        copies, self._copies = self._copies, []
        return copies

    def _is_copy(self, payload: bytes, source: bytes) -> bool:
        """``source`` is packed, as in the IP header (4 or 16 bytes, like ``IPv4Address.packed``)."""
        if hash((payload, source)) in self._recent or hash(payload) in self._recent:
            self.stats["duplicate"] += 1
            if len(self._copies) < _MAX_COPIES_KEPT:
                self._copies.append(source)
            return True
        return False

    def filenos(self) -> list[int]:
        return [s.fileno() for s in self._sockets]

    def receive(self, max_count: int = 64) -> list[Datagram]:
        """Up to ``max_count`` datagrams already queued; never blocks, never raises for input.  At most
        4 * ``max_count`` packets are read, so a flood of refused ones cannot hold the caller here."""
        out: list[Datagram] = []
        count = len(self._sockets)
        reads = 4 * max_count
        for i in range(count):
            sock = self._sockets[(self._start + i) % count]
            while len(out) < max_count and reads > 0:
                reads -= 1
                try:
                    datagram = self._receive_one(sock)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:
                    # ENETDOWN and friends are reported once through sk_err; the socket stays usable.
                    self.stats["socket-error"] += 1
                    self.stats[f"socket-error-{errno.errorcode.get(error.errno or 0, error.errno)}"] += 1
                    break
                if datagram is not None:
                    out.append(datagram)
        if count:
            self._start = (self._start + 1) % count
        return out

    def _receive_one(self, sock: socket.socket) -> Datagram | None:
        raise NotImplementedError

    def close(self) -> None:
        while self._sockets:
            self._sockets.pop().close()

    def __enter__(self) -> _Receiver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PacketCapture(_Receiver):
    """Knock datagrams seen by ``AF_PACKET`` sockets, whatever the firewall does with them."""

    def __init__(self, sockets: list[socket.socket], max_packet: int, icmp: bool = False) -> None:
        super().__init__(sockets)
        self._bufsize = max_packet
        self._ifindex: dict[str, int] = {}
        self._icmp = icmp
        # Next headers after which an IPv6 knock's payload starts at byte 48: UDP, and ICMPv6 (whose echo
        # header is 8 bytes too) when that carrier is on.
        self._plain_v6 = (17, 58) if icmp else (17,)

    def __enter__(self) -> PacketCapture:
        return self

    def _receive_one(self, sock: socket.socket) -> Datagram | None:
        data, address = sock.recvfrom(self._bufsize)
        # (ifname, protocol, pkttype, hatype, hwaddr); the filter already passes PACKET_HOST only,
        # this is the belt to its braces (and covers anything queued before it was attached).
        if address[2] != socket.PACKET_HOST:
            self.stats["not-host"] += 1
            return None
        # An exact copy of a remembered payload: where the payload starts in a plain IPv4 or IPv6
        # packet, without trusting the header (a wrong guess only misses the shortcut).  UDP and echo
        # headers are both 8 bytes.
        version = data[0] >> 4 if data else 0
        if version == 4:
            if self._is_copy(data[(data[0] & 0x0F) * 4 + 8 :], data[12:16]):
                return None
        elif version == 6 and len(data) > 48 and data[6] in self._plain_v6 and self._is_copy(data[48:], data[8:24]):
            return None
        try:
            return parse_datagram(data, ifindex=self._index(sock, address[0]), icmp=self._icmp)
        except PacketError as error:
            self.stats[error.reason] += 1
            return None

    def _index(self, sock: socket.socket, name: str) -> int:
        """Interface index for the name recvfrom reports (Python resolves the kernel's index to a
        name); cached, 0 when the interface vanished meanwhile.  Asked of the capture socket itself
        (SIOCGIFINDEX): socket.if_nametoindex would open a new socket, which the worker's seccomp
        filter forbids."""
        index = self._ifindex.get(name)
        if index is None:
            try:
                request = struct.pack("16si", name.encode()[:15], 0)
                index = struct.unpack_from("i", fcntl.ioctl(sock.fileno(), _SIOCGIFINDEX, request), 16)[0]
            except (OSError, UnicodeError):
                return 0
            if len(self._ifindex) >= _MAX_NAME_CACHE:
                self._ifindex.clear()
            self._ifindex[name] = index
        return index


class UdpCapture(_Receiver):
    """Knock datagrams received on ordinary bound UDP sockets."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        super().__init__(sockets)
        self._ports = {s.fileno(): s.getsockname()[1] for s in sockets}

    def __enter__(self) -> UdpCapture:
        return self

    def _receive_one(self, sock: socket.socket) -> Datagram | None:
        data, ancillary, flags, address = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        if flags & socket.MSG_TRUNC:
            self.stats["truncated"] += 1
            return None
        packed = _packed(address[0])
        if self._is_copy(data, packed):
            return None
        if is_bad_source(packed):
            self.stats["bad-source"] += 1
            return None
        source = ipaddress.ip_address(address[0])
        destination: IPAddress = ipaddress.ip_address(sock.getsockname()[0])
        ifindex = 0
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(value) >= 12:
                ifindex = int.from_bytes(value[0:4], sys.byteorder)
                destination = ipaddress.IPv4Address(value[8:12])
            elif level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(value) >= 20:
                destination = ipaddress.IPv6Address(value[0:16])
                ifindex = int.from_bytes(value[16:20], sys.byteorder)
        return Datagram(
            payload=data,
            source=source,
            destination=destination,
            source_port=address[1],
            dest_port=self._ports[sock.fileno()],
            ifindex=ifindex,
        )


def open_packet_capture(
    *,
    interfaces: Sequence[str] | None,
    ports: Sequence[tuple[int, int]] | None,
    min_payload: int,
    rcvbuf: int = DEFAULT_RCVBUF,
    max_packet: int = DEFAULT_MAX_PACKET,
    fanout_group: int | None = None,
    icmp: bool = False,
) -> PacketCapture:
    """Open one filtered ``AF_PACKET`` socket per interface in ``interfaces`` (``None``: one socket
    for all interfaces, including ones that appear later).

    ``ports`` are inclusive UDP destination port ranges (``None``: any), ``min_payload`` the smallest
    UDP payload worth reading.  Needs CAP_NET_RAW.  Raises :class:`ConfigError` for an unknown
    interface or bad filter values and :class:`CaptureError` when the kernel refuses.

    ``fanout_group``: open one capture per worker with the same group number, and the kernel shares
    the packets among them (PACKET_FANOUT by flow hash, so one source's packets go to one worker, with
    rollover to another when a worker's buffer is full).  Each interface uses group number + its index.

    ``icmp``: also capture knocks carried in ICMP and ICMPv6 echo requests (``knockCarriers = udp, icmp``);
    ``ports`` do not apply to them.
    """
    if fanout_group is not None and not 0 <= fanout_group <= 0xFFFF - len(interfaces or [None]):
        raise ConfigError(f"fanout group {fanout_group} out of range")
    program = build_filter(min_payload=min_payload, ports=ports, max_packet=max_packet, icmp=icmp)
    if interfaces is not None:
        if not interfaces:
            raise ConfigError("an empty interface list would capture nothing; pass None for all")
        for name in interfaces:
            try:
                socket.if_nametoindex(name)
            except OSError:
                raise ConfigError(f"no network interface named {name!r}") from None
    sockets: list[socket.socket] = []
    try:
        targets: list[str | None] = list(interfaces) if interfaces is not None else [None]
        for target in targets:
            if target is None:
                # Listening to every interface means creating the socket with a protocol, which
                # starts delivery at once: reject everything, drop what slipped in, then filter.
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
                sockets.append(sock)
                _attach_filter(sock, _REJECT_ALL)
                _drain(sock)
                _attach_filter(sock, program)
            else:
                # Protocol 0 receives nothing until bind(), so the filter is in place first.
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
                sockets.append(sock)
                _attach_filter(sock, program)
                sock.bind((target, _ETH_P_ALL))  # Python turns the name into the kernel's ifindex
            sock.setsockopt(socket.SOL_SOCKET, _SO_LOCK_FILTER, 1)
            _set_rcvbuf(sock, rcvbuf)
            sock.setblocking(False)
            if fanout_group is not None:
                group = fanout_group + len(sockets) - 1
                mode = _PACKET_FANOUT_HASH | _PACKET_FANOUT_FLAG_ROLLOVER
                sock.setsockopt(_SOL_PACKET, _PACKET_FANOUT, group | (mode << 16))
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise CaptureError(f"cannot open packet capture: {error.strerror or error}") from error
    return PacketCapture(sockets, max_packet, icmp)


def open_udp_capture(*, bind: Sequence[tuple[str, int]]) -> UdpCapture:
    """Open one non-blocking UDP socket per ``(address, port)``; IPv6 sockets are v6-only so that
    ``::`` and ``0.0.0.0`` can both be bound on one port.  Port 0 picks a free port (see
    ``dest_port`` of what arrives)."""
    if not bind:
        raise ConfigError("no UDP address to bind")
    sockets: list[socket.socket] = []
    try:
        for host, port in bind:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"bind address {host!r} is not an IP address") from None
            if address.version == 6:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.bind((host, port))
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise CaptureError(f"cannot bind UDP {host}:{port}: {error.strerror or error}") from error
    except ConfigError:
        for sock in sockets:
            sock.close()
        raise
    return UdpCapture(sockets)
