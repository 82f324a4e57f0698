"""The clear outer layer of a knock: header, size buckets, and the proof of work.

This is everything the server may look at before it spends a public-key operation.  Layout (all integers
big-endian; see docs/protocol.md for the whole packet)::

    offset size field
    0      2    magic "sK"
    2      1    version (1)
    3      1    suite (1 = P-256, 2 = P-384; ECDH + HKDF-SHA256 + AES-256-GCM)
    4      1    work_bits: leading zero bits the proof of work reaches
    5      1    flags, must be 0 in version 1
    6      4    coarse_time: Unix seconds, UTC
    10     4    key_id: the first 4 bytes of the SHA-256 fingerprint of the server certificate
    14     8    work_nonce: the client's proof-of-work counter
    22     ...  ephemeral public key, AEAD ciphertext (see seal.py)

The proof of work binds the whole packet except the work nonce itself::

    body_digest = SHA-256(packet[0:14] || packet[22:])
    work        = SHA-256("sknock/v1/work" || body_digest || work_nonce)

and ``work`` must begin with ``work_bits`` zero bits.  The server checks it with two hashes; junk of the
right size fails it with probability 1 - 2**-work_bits, and ``body_digest`` keys the cheap replay cache:
an exact replay (or one with a re-solved work nonce) is refused before any public-key operation.
The coarse time, covered by the digest, means solved packets cannot be stockpiled for a later flood.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import KnockRefused, Reason

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "BUCKETS",
    "MAX_DATAGRAM",
    "MAX_WORK_BITS",
    "DEFAULT_WORK_BITS",
    "SUITE_P256",
    "SUITE_P384",
    "SUITES",
    "SUITE_CURVES_TEXT",
    "Suite",
    "TAG_SIZE",
    "Header",
    "Prechecked",
    "precheck",
    "body_digest",
    "work_hash",
    "leading_zero_bits",
    "solve_work",
]

MAGIC = b"sK"
VERSION = 1
_HEADER = struct.Struct("!2sBBBBI4sQ")
HEADER_SIZE = _HEADER.size  # 22
_AUTH_END = 14  # header bytes covered by the digest, AEAD and key derivation (everything before work_nonce)
WORK_DOMAIN = b"sknock/v1/work"
MAX_WORK_BITS = 32
#: The proof of work a server demands and a client does, unless configured otherwise (workBits).
DEFAULT_WORK_BITS = 12
TAG_SIZE = 16  # the AES-256-GCM tag at the end of the ciphertext
SUITE_P256 = 1
SUITE_P384 = 2
# Every knock is exactly one of these sizes, so the length reveals almost nothing of the certificate.
# 1232 is the largest UDP payload that crosses any IPv6 path without fragmentation (1280 - 40 - 8).
BUCKETS: tuple[int, ...] = (1024, 1232)
MAX_DATAGRAM = BUCKETS[-1]


class Suite(NamedTuple):
    """One cipher suite: the curve of the server key and of the client's ephemeral key (ECDH), and the
    size of that key's point in a datagram.  Every suite uses HKDF-SHA256 and AES-256-GCM."""

    id: int
    curve: ec.EllipticCurve
    point_size: int  # an uncompressed SEC1 point: the server decodes it several times faster than a compressed one

    @property
    def overhead(self) -> int:
        """Bytes of a datagram that are not plaintext."""
        return HEADER_SIZE + self.point_size + TAG_SIZE


#: Every suite of this protocol version, by the id the header carries: the one table the header check,
#: the BPF filter, the sealing and opening of a knock, and the curves a server key may use all come from.
SUITES: dict[int, Suite] = {
    SUITE_P256: Suite(SUITE_P256, ec.SECP256R1(), 65),
    SUITE_P384: Suite(SUITE_P384, ec.SECP384R1(), 97),
}
#: The curves of :data:`SUITES` as people name them, for messages: "P-256 or P-384".
SUITE_CURVES_TEXT = " or ".join(f"P-{suite.curve.key_size}" for suite in SUITES.values())


class Header(NamedTuple):
    """The cleartext header of a knock datagram, as :func:`parse_header` reads it; fields as in the layout
    above."""

    version: int
    suite: int
    work_bits: int
    flags: int
    coarse_time: int
    key_id: bytes
    work_nonce: int

    def pack(self) -> bytes:
        """The header's wire bytes (``HEADER_SIZE`` of them, magic included)."""
        return _HEADER.pack(
            MAGIC, self.version, self.suite, self.work_bits, self.flags, self.coarse_time, self.key_id, self.work_nonce
        )

    @property
    def authenticated(self) -> bytes:
        """The header bytes covered by the AEAD, the key derivation and the proof of work."""
        return self.pack()[:_AUTH_END]


class Prechecked(NamedTuple):
    """A datagram that passed the cheap checks: no public-key operation has been spent on it yet."""

    header: Header
    body_digest: bytes  # keys the pre-crypto replay cache
    datagram: bytes

    @property
    def body(self) -> bytes:
        """Ephemeral public key and ciphertext."""
        return self.datagram[HEADER_SIZE:]


def leading_zero_bits(digest: bytes) -> int:
    """How many leading zero bits ``digest`` has: what a proof of work is measured in."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def body_digest(datagram: bytes) -> bytes:
    """SHA-256 over the authenticated header and the body, without the work nonce: the datagram's identity
    for the proof of work and the pre-crypto replay cache."""
    h = hashlib.sha256(datagram[:_AUTH_END])
    h.update(datagram[HEADER_SIZE:])
    return h.digest()


def work_hash(digest: bytes, work_nonce: int) -> bytes:
    """The hash whose leading zero bits count as the proof of work for ``digest`` and ``work_nonce``."""
    return hashlib.sha256(WORK_DOMAIN + digest + work_nonce.to_bytes(8, "big")).digest()


def solve_work(datagram: bytes, work_bits: int, *, start: int = 0, limit: int = 1 << 40) -> bytes:
    """Return ``datagram`` with a work nonce that reaches ``work_bits`` (the header must already say so).

    Expected cost: 2**work_bits hashes of 54 bytes.  ``limit`` bounds the search.
    """
    if not 0 <= work_bits <= MAX_WORK_BITS:
        raise ValueError(f"work_bits must be 0..{MAX_WORK_BITS}")
    digest = body_digest(datagram)
    base = hashlib.sha256(WORK_DOMAIN + digest)
    threshold = 1 << (256 - work_bits)
    for nonce in range(start, start + limit):
        h = base.copy()
        h.update(nonce.to_bytes(8, "big"))
        if int.from_bytes(h.digest(), "big") < threshold:
            return datagram[:_AUTH_END] + nonce.to_bytes(8, "big") + datagram[HEADER_SIZE:]
    raise RuntimeError("no proof of work found within the search limit")


def parse_header(datagram: bytes) -> Header:
    """Read and check a datagram's header (length bucket, magic, version, suite, flags); raises
    :class:`KnockRefused` with the reason.  Checks no time, key id or work."""
    if len(datagram) not in BUCKETS:
        raise KnockRefused(Reason.BAD_LENGTH, f"{len(datagram)} bytes; knocks are {' or '.join(map(str, BUCKETS))}")
    magic, version, suite, work_bits, flags, coarse_time, key_id, work_nonce = _HEADER.unpack_from(datagram)
    if magic != MAGIC:
        raise KnockRefused(Reason.BAD_MAGIC)
    if version != VERSION:
        raise KnockRefused(Reason.UNSUPPORTED_VERSION, f"version {version}")
    if suite not in SUITES:
        raise KnockRefused(Reason.UNSUPPORTED_SUITE, f"suite {suite}")
    if flags != 0:
        raise KnockRefused(Reason.MALFORMED_HEADER, f"flags {flags:#04x}")
    return Header(version, suite, work_bits, flags, coarse_time, key_id, work_nonce)


def precheck(
    datagram: bytes, *, now: float, window: float, min_work_bits: int, key_ids: frozenset[bytes]
) -> Prechecked:
    """The checks that cost no public-key operation, cheapest first.

    ``now`` is Unix time in seconds; ``window`` the accepted clock difference in seconds; ``key_ids``
    the 4-byte ids of the server certificates this server holds keys for.
    Raises :class:`KnockRefused` with the reason.
    """
    header = parse_header(datagram)
    if abs(header.coarse_time - now) > window + 1:
        raise KnockRefused(Reason.STALE, f"clock differs by {header.coarse_time - now:+.0f} s")
    if header.key_id not in key_ids:
        raise KnockRefused(Reason.WRONG_SERVER, f"key id {header.key_id.hex()}")
    if header.work_bits < min_work_bits:
        raise KnockRefused(Reason.INSUFFICIENT_WORK, f"{header.work_bits} bits, {min_work_bits} required")
    digest = body_digest(datagram)
    if leading_zero_bits(work_hash(digest, header.work_nonce)) < header.work_bits:
        raise KnockRefused(Reason.INSUFFICIENT_WORK, "proof of work does not verify")
    return Prechecked(header, digest, datagram)
