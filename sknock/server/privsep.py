"""Privilege separation: the channels between the monitor and its unprivileged children and the
messages on them (the privilege drop itself is :mod:`sknock.server.privileges`).

The worker reads packets and runs the parser and crypto as an unprivileged user.  It asks the monitor
(root, CAP_NET_ADMIN) to open or close a grant with one small fixed-layout binary datagram over a
SOCK_SEQPACKET socketpair (:func:`channel_pair`).  The monitor treats those messages as hostile too: it
re-checks every field (address, protocol, port, duration bound) before the firewall sees it, so a
compromised worker can at most open ports for the durations the configuration allows -- never run
commands, never touch other tables.

Layout (network byte order; 63 bytes, the revocation ids, then the client name)::

    op u8 (1 open, 2 close) | family u8 (4, 6) | protocol u8 (0 udp, 1 tcp) | reserved u8 (0)
    port u16 | duration f64 | nonce expiry f64 (Unix time) | received f64 (CLOCK_MONOTONIC, 0: unknown)
    address 16 bytes (IPv4: 4 bytes, then 12 zero bytes) | nonce 16 bytes
    id count u8 (at most 8), then each: issuer name SHA-256 32 bytes | serial 21 bytes, signed
    client: the certificate subject for the log, UTF-8, at most 200 printable characters

The revocation ids name the client's certificate and each CA certificate above it as a CRL would
(:func:`sknock.trust.revocation_id`): the monitor closes the grant when a new CRL lists one.

``received`` is when the worker read the knock's datagram, on the clock every process of the host
shares: the monitor measures the knock-to-grant latency from it (a metric, nothing else).

``CRL_PREFIX`` + a CRL in DER: the monitor hands each worker the CRL in use (empty when there is
none), and the CRL fetcher hands the monitor what it downloaded, which the monitor verifies before
anything else is done with it.

``STATS_PREFIX`` + a worker's counters (:func:`encode_stats`), sent at most once a second and only
when they changed: what the worker counted since its last such message, which the monitor adds to
the totals it keeps for the metrics (:mod:`sknock.server.metrics`)::

    "STS\0" | reason count u8 (the number of errors.Reason values) | received u64
    then refused u64 per errors.Reason, in the enum's order

``FETCH_RESULT_PREFIX`` + what one download of the CRL fetcher came to, for the metrics (the bytes of
a new CRL come first, in their own message)::

    "RES\0" | source index u8 | status u8 (0 updated, 1 unchanged, 2 failed)

Binary rather than JSON because the monitor reads one message per grant: parsing JSON and an
address in text costs many times a fixed-layout unpack, and at thousands of grants a second that
difference is a large share of the monitor's one core.
"""

from __future__ import annotations

import ipaddress
import mmap
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from ..addresses import IPAddress, is_bad_source
from ..errors import Reason, SknockError
from ..ports import Protocol
from .firewall.base import Opening

__all__ = [
    "GrantRequest", "PrivsepError", "encode_request", "parse_request", "MAX_MESSAGE",
    "CRL_PREFIX", "MAX_CRL_MESSAGE", "channel_pair", "IdCache", "MAX_ID_CACHE", "receive_buffer",
    "STATS_PREFIX", "WorkerStats", "encode_stats", "parse_stats",
    "FETCH_RESULT_PREFIX", "FETCH_STATUSES", "encode_fetch_result", "parse_fetch_result",
]

_LAYOUT = struct.Struct("!BBBBHddd16s16sB")
_ID = struct.Struct("!32s21s")
MAX_IDS = 8
CRL_PREFIX = b"CRL\0"
STATS_PREFIX = b"STS\0"
_REASONS = tuple(Reason)
_STATS = struct.Struct(f"!4sB{1 + len(_REASONS)}Q")
MAX_STATS_DELTA = 2**40  # more than any worker counts between two messages
FETCH_RESULT_PREFIX = b"RES\0"
FETCH_STATUSES = ("updated", "unchanged", "failed")
_FETCH_RESULT = struct.Struct("!4sBB")
MAX_CRL_MESSAGE = 4 << 20
MAX_CLIENT = 200  # characters
MAX_MESSAGE = _LAYOUT.size + MAX_IDS * _ID.size + 4 * MAX_CLIENT
_OPS: dict[int, Literal["open", "close"]] = {1: "open", 2: "close"}
_OP_CODES = {name: code for code, name in _OPS.items()}
_PROTOCOLS = {int(p): p for p in Protocol}


class PrivsepError(SknockError):
    """A message between the worker and the monitor is malformed."""


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """One port of one verified knock.  ``nonce`` is the knock's signed nonce and ``expires`` (Unix
    time) when it falls out of the timestamp window: the monitor refuses a nonce it has seen,
    which catches a replay that reached another worker."""

    op: Literal["open", "close"]
    opening: Opening
    duration: float
    client: str
    nonce: bytes = bytes(16)
    expires: float = 0.0
    revocation_ids: tuple[tuple[bytes, int], ...] = ()
    received: float = 0.0  # time.monotonic() when the worker read the datagram; 0: unknown

    @property
    def replay_key(self) -> bytes:
        """Nonce, port and protocol -- not the address: a replay from another source must collide
        with the original."""
        return self.nonce + self.opening.port.to_bytes(2, "big") + bytes((self.opening.protocol,))


def printable_client(client: str) -> str:
    """The client name as the log may show it: at most 200 characters, no control characters (a
    subject may hold any Unicode, and a newline in it would forge a log line)."""
    client = client[:MAX_CLIENT]
    if client.isprintable():
        return client
    return "".join(c if c.isprintable() else "?" for c in client)


def encode_request(request: GrantRequest) -> bytes:
    """One message of at most MAX_MESSAGE bytes."""
    address = request.opening.address
    return _LAYOUT.pack(
        _OP_CODES[request.op],
        address.version,
        int(request.opening.protocol),
        0,
        request.opening.port,
        request.duration,
        request.expires,
        request.received,
        address.packed.ljust(16, b"\0"),
        request.nonce,
        len(request.revocation_ids),
    ) + b"".join(
        _ID.pack(issuer, serial.to_bytes(21, "big", signed=True)) for issuer, serial in request.revocation_ids
    ) + printable_client(request.client).encode()


#: Revocation ids parsed before, by their bytes in a message (see :func:`parse_request`).
IdCache = dict[bytes, tuple[tuple[bytes, int], ...]]
MAX_ID_CACHE = 4096  # distinct id lists kept; the cache is emptied when it is full


def parse_request(data: bytes, *, max_duration: float, id_cache: IdCache | None = None) -> GrantRequest:
    """Strictly parse and re-check one message from the worker.

    ``id_cache`` (the caller's, bounded by MAX_ID_CACHE) maps the bytes of a message's revocation ids to
    their parsed tuple: a client's knocks all carry the same ids, so they are parsed once and every grant
    of that client shares one tuple instead of holding its own copy."""
    if len(data) > MAX_MESSAGE:
        raise PrivsepError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    if len(data) < _LAYOUT.size:
        raise PrivsepError(f"message of {len(data)} bytes is shorter than the {_LAYOUT.size} of a request")
    op_code, family, protocol_code, reserved, port, duration, expires, received, raw_address, nonce, count = (
        _LAYOUT.unpack_from(data)
    )
    op = _OPS.get(op_code)
    if op is None:
        raise PrivsepError(f"unknown op {op_code}")
    protocol = _PROTOCOLS.get(protocol_code)
    if protocol is None or reserved:
        raise PrivsepError(f"bad protocol {protocol_code} (reserved byte {reserved})")
    address: IPAddress
    if family == 4:
        if raw_address[4:] != bytes(12):
            raise PrivsepError("bad address: an IPv4 address with bytes after its fourth")
        packed = raw_address[:4]
        if is_bad_source(packed):
            raise PrivsepError(f"address {ipaddress.IPv4Address(packed)} cannot be granted")
        address = ipaddress.IPv4Address(int.from_bytes(packed, "big"))
    elif family == 6:
        if is_bad_source(raw_address):
            raise PrivsepError(f"address {ipaddress.IPv6Address(raw_address)} cannot be granted")
        address = ipaddress.IPv6Address(raw_address)
    else:
        raise PrivsepError(f"bad address family {family}")
    if not 1 <= port <= 65535:
        raise PrivsepError(f"bad port {port}")
    if not 0 < duration <= max_duration:  # false for NaN too
        raise PrivsepError(f"bad duration {duration!r} (at most {max_duration:g} s)")
    if not 0 <= expires < 2**40:
        raise PrivsepError(f"bad nonce expiry {expires!r}")
    if not 0 <= received < 2**40:
        raise PrivsepError(f"bad receipt time {received!r}")
    if count > MAX_IDS:
        raise PrivsepError(f"bad revocation id count {count}")
    end = _LAYOUT.size + count * _ID.size
    if len(data) < end:
        raise PrivsepError(f"message of {len(data)} bytes is shorter than its {count} revocation id(s)")
    raw_ids = data[_LAYOUT.size : end]
    ids = id_cache.get(raw_ids) if id_cache is not None else None
    if ids is None:
        ids = tuple(
            (issuer, int.from_bytes(serial, "big", signed=True)) for issuer, serial in _ID.iter_unpack(raw_ids)
        )
        if id_cache is not None:
            if len(id_cache) >= MAX_ID_CACHE:
                id_cache.clear()
            id_cache[raw_ids] = ids
    try:
        client = data[end:].decode()
    except UnicodeDecodeError:
        raise PrivsepError("bad client name: not UTF-8") from None
    if len(client) > MAX_CLIENT or not client.isprintable():
        raise PrivsepError("bad client name: too long or not printable")
    return GrantRequest(op, Opening(address, protocol, port), duration, client, nonce, expires, ids, received)


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """What a worker counted since its last stats message: datagrams ``received``, and ``refused`` by
    reason (one count per :class:`~sknock.errors.Reason`, in the enum's order)."""

    received: int
    refused: tuple[int, ...]


def encode_stats(stats: WorkerStats) -> bytes:
    """One stats message (``STATS_PREFIX`` and the fixed layout in the module's docstring)."""
    return _STATS.pack(STATS_PREFIX, len(_REASONS), stats.received, *stats.refused)


def encode_fetch_result(source: int, status: str) -> bytes:
    """The CRL fetcher's word on one download from source number ``source``."""
    return _FETCH_RESULT.pack(FETCH_RESULT_PREFIX, source, FETCH_STATUSES.index(status))


def parse_fetch_result(data: bytes) -> tuple[int, str]:
    """Strictly parse a fetch result: (source index, status).  The caller checks the index is a source
    the fetcher downloads."""
    if len(data) != _FETCH_RESULT.size:
        raise PrivsepError(f"fetch result of {len(data)} bytes, not {_FETCH_RESULT.size}")
    prefix, source, status = _FETCH_RESULT.unpack(data)
    if prefix != FETCH_RESULT_PREFIX or status >= len(FETCH_STATUSES):
        raise PrivsepError(f"bad fetch result (status {status})")
    return source, FETCH_STATUSES[status]


def parse_stats(data: bytes) -> WorkerStats:
    """Strictly parse a stats message from a worker (hostile like every other)."""
    if len(data) != _STATS.size:
        raise PrivsepError(f"stats message of {len(data)} bytes, not {_STATS.size}")
    prefix, reasons, *counts = _STATS.unpack(data)
    if prefix != STATS_PREFIX or reasons != len(_REASONS):
        raise PrivsepError(f"bad stats message header ({reasons} reasons, not {len(_REASONS)})")
    if any(count > MAX_STATS_DELTA for count in counts):
        raise PrivsepError(f"stats count out of range (more than {MAX_STATS_DELTA})")
    return WorkerStats(counts[0], tuple(counts[1:]))


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """The monitor's end and a child's end of one channel: datagrams, each a whole message, with room
    for a CRL."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in pair:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_CRL_MESSAGE + 4096)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_CRL_MESSAGE + 4096)
    return pair


def receive_buffer() -> mmap.mmap:
    """A buffer for receiving any one channel message (a CRL set at most), to be reused for every message.
    Anonymous memory: a page costs resident memory only once a message has been written to it, so the
    grant messages that fill a monitor's day touch one page, not the 4 MiB a zeroed bytearray would."""
    return mmap.mmap(-1, MAX_CRL_MESSAGE + len(CRL_PREFIX))

