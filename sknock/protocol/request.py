"""What a client asks for, and its encoding inside the encrypted part of a knock.

Plaintext layout (version 1, integers big-endian)::

    size  field
    8     timestamp_ms: Unix time in milliseconds, UTC
    16    nonce: random, unique per knock (the replay cache keys on it)
    1     action: 1 = open, 2 = close now
    1     address family: 0 = any (the server uses the packet's source), 4 = IPv4, 6 = IPv6
    0|4|16 address: the source address the client binds the knock to
    4     duration: seconds the client asks for, 0 = the server's default
    1     port count n, 1..32
    3n    n x (protocol: 0 = UDP, 1 = TCP; port: u16, 1..65535)
    2     certificate length c
    c     client certificate, DER
    2     signature length s
    s     signature over the signed message (see seal.py)
    ...   zero padding to the bucket size

Parsing is total: any byte string yields a :class:`ParsedPlaintext` or :class:`KnockRefused`
(reason ``malformed``), never another exception.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import NamedTuple

from ..addresses import IPAddress
from ..errors import KnockRefused, Reason
from ..ports import Protocol

__all__ = ["Action", "KnockRequest", "ParsedPlaintext", "encode_request", "encode_plaintext", "parse_plaintext"]

MAX_PORTS = 32
NONCE_SIZE = 16
MAX_DURATION = 0xFFFFFFFF
_FIXED = struct.Struct("!Q16sBB")


class Action(enum.IntEnum):
    """What a knock asks for: open its ports (for a duration), or close them now."""

    OPEN = 1
    CLOSE = 2


class _RequestFields(NamedTuple):  # the defaults are KnockRequest.__new__'s
    ports: tuple[tuple[Protocol, int], ...]
    timestamp_ms: int
    nonce: bytes
    action: Action
    source_address: IPAddress | None
    duration: int | None


class KnockRequest(_RequestFields):
    """One knock's request.  ``source_address`` None means "any" (clients behind NAT); ``duration`` None
    means the server's default.  Checked when made: a ValueError names what is out of range."""

    __slots__ = ()

    def __new__(
        cls,
        ports: tuple[tuple[Protocol, int], ...],
        timestamp_ms: int,
        nonce: bytes,
        action: Action = Action.OPEN,
        source_address: IPAddress | None = None,
        duration: int | None = None,
    ) -> KnockRequest:
        if not 1 <= len(ports) <= MAX_PORTS:
            raise ValueError(f"a knock names 1 to {MAX_PORTS} ports, not {len(ports)}")
        for protocol, port in ports:
            if not isinstance(protocol, Protocol) or not 1 <= port <= 65535:
                raise ValueError(f"bad port {protocol}/{port}")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        if not 0 <= timestamp_ms < 1 << 64:
            raise ValueError("timestamp out of range")
        if duration is not None and not 1 <= duration <= MAX_DURATION:
            raise ValueError("duration must be 1 second or more")
        return super().__new__(cls, ports, timestamp_ms, nonce, action, source_address, duration)


class ParsedPlaintext(NamedTuple):
    """A decrypted plaintext split into its parts; nothing in it is verified yet (the signature and
    certificate are the verifier's job)."""

    request: KnockRequest
    certificate: bytes
    signature: bytes
    signed_part: bytes  # the plaintext bytes the signature covers: request and certificate


def encode_request(request: KnockRequest) -> bytes:
    """The wire form of ``request``'s fields (everything before the certificate in the plaintext layout)."""
    address = request.source_address
    family = 0 if address is None else address.version
    out = bytearray(_FIXED.pack(request.timestamp_ms, request.nonce, request.action, family))
    if address is not None:
        out += address.packed
    out += struct.pack("!IB", request.duration or 0, len(request.ports))
    for protocol, port in request.ports:
        out += struct.pack("!BH", protocol, port)
    return bytes(out)


def encode_plaintext(signed_part: bytes, signature: bytes, size: int) -> bytes:
    """The plaintext: ``signed_part``, the signature, then zero padding to ``size`` bytes; raises ValueError
    when they do not fit."""
    body = signed_part + struct.pack("!H", len(signature)) + signature
    if len(body) > size:
        raise ValueError(f"plaintext needs {len(body)} bytes, {size} available")
    return body + bytes(size - len(body))


def signed_part(request: KnockRequest, certificate: bytes) -> bytes:
    """The bytes a client signs: the encoded request followed by its certificate (DER); raises ValueError for
    an empty or oversized certificate."""
    if not 0 < len(certificate) <= 0xFFFF:
        raise ValueError("certificate size out of range")
    return encode_request(request) + struct.pack("!H", len(certificate)) + certificate


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise KnockRefused(Reason.MALFORMED, f"truncated {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")


def parse_plaintext(data: bytes) -> ParsedPlaintext:
    """Split a decrypted plaintext into request, certificate and signature.  Total: raises only
    :class:`KnockRefused` (``malformed``), whatever the bytes."""
    r = _Reader(data)
    timestamp_ms = int.from_bytes(r.take(8, "timestamp"), "big")
    nonce = r.take(NONCE_SIZE, "nonce")
    action_code = r.u8("action")
    if action_code not in (Action.OPEN, Action.CLOSE):
        raise KnockRefused(Reason.MALFORMED, f"unknown action {action_code}")
    family = r.u8("address family")
    address: IPAddress | None
    if family == 0:
        address = None
    elif family == 4:
        address = ipaddress.IPv4Address(r.take(4, "IPv4 address"))
    elif family == 6:
        address = ipaddress.IPv6Address(r.take(16, "IPv6 address"))
    else:
        raise KnockRefused(Reason.MALFORMED, f"unknown address family {family}")
    duration = r.u32("duration")
    count = r.u8("port count")
    if not 1 <= count <= MAX_PORTS:
        raise KnockRefused(Reason.MALFORMED, f"port count {count}")
    ports = []
    for _ in range(count):
        proto_code = r.u8("protocol")
        port = r.u16("port")
        if proto_code not in (Protocol.UDP, Protocol.TCP) or port == 0:
            raise KnockRefused(Reason.MALFORMED, f"bad port entry {proto_code}/{port}")
        ports.append((Protocol(proto_code), port))
    cert_len = r.u16("certificate length")
    if cert_len == 0:
        raise KnockRefused(Reason.MALFORMED, "empty certificate")
    certificate = r.take(cert_len, "certificate")
    signed_end = r.pos
    sig_len = r.u16("signature length")
    if sig_len == 0:
        raise KnockRefused(Reason.MALFORMED, "empty signature")
    signature = r.take(sig_len, "signature")
    if data.count(0, r.pos) != len(data) - r.pos:  # counted in C: a Python any() over the padding is far slower
        raise KnockRefused(Reason.MALFORMED, "non-zero padding")
    request = KnockRequest(
        ports=tuple(ports),
        timestamp_ms=timestamp_ms,
        nonce=nonce,
        action=Action(action_code),
        source_address=address,
        duration=duration or None,
    )
    return ParsedPlaintext(request, certificate, signature, data[:signed_end])
