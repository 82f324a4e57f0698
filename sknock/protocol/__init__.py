"""The knock protocol, sans-I/O: bytes, keys and the current time in; a datagram, a request or a typed
refusal out.  No sockets, no clock reads, no global state.  See docs/protocol.md.

Client side: :func:`seal_knock` builds a datagram from a :class:`KnockRequest`.
Server side, cheapest first: :func:`precheck` (no public-key operation), :func:`open_knock` (one ECDH,
AEAD, strict parse), :func:`verify_signature` (once the client certificate is trusted).
"""

from .request import Action, KnockRequest, ParsedPlaintext, parse_plaintext
from .seal import (
    ClientKey,
    ClientPublicKey,
    KnockSigner,
    OpenedKnock,
    SoftwareSigner,
    as_signer,
    fingerprint,
    max_certificate_size,
    open_knock,
    seal_knock,
    seal_plaintext,
    signed_message,
    suite_for_curve,
    verify_signature,
)
from .wire import (
    BUCKETS,
    HEADER_SIZE,
    MAX_DATAGRAM,
    SUITE_CURVES_TEXT,
    SUITES,
    VERSION,
    Header,
    Prechecked,
    Suite,
    body_digest,
    precheck,
    solve_work,
)

__all__ = [
    "Action",
    "KnockRequest",
    "ParsedPlaintext",
    "parse_plaintext",
    "ClientKey",
    "ClientPublicKey",
    "KnockSigner",
    "SoftwareSigner",
    "as_signer",
    "OpenedKnock",
    "fingerprint",
    "max_certificate_size",
    "open_knock",
    "seal_knock",
    "seal_plaintext",
    "signed_message",
    "suite_for_curve",
    "verify_signature",
    "BUCKETS",
    "HEADER_SIZE",
    "MAX_DATAGRAM",
    "SUITES",
    "SUITE_CURVES_TEXT",
    "Suite",
    "VERSION",
    "Header",
    "Prechecked",
    "body_digest",
    "precheck",
    "solve_work",
]
