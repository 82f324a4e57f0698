"""The cryptography of a knock: who may read it (ECDH to the server certificate's key) and who sent it
(the client certificate's signature).

* Key agreement: an ephemeral key on the server key's curve (suite 1: P-256, suite 2: P-384), ECDH with
  the public key in the server's certificate.
* Key derivation: HKDF-SHA256 from ``cryptography``; salt = SHA-256 fingerprint of the server certificate,
  info = "sknock/v1/key" || version || suite || ephemeral public key (uncompressed point); 44 bytes out:
  a 32-byte AES key and a 12-byte GCM nonce.  A fresh ephemeral key per knock makes both unique.
* AEAD: AES-256-GCM; associated data = the first 14 header bytes || ephemeral public key.
* Signature: by the client certificate's key over
  "sknock/v1/signature" || version || suite || ephemeral public key || server fingerprint || signed part
  (request and certificate), so a knock cannot be re-targeted to another server or re-encrypted under
  another ephemeral key.  ECDSA-SHA256 (deterministic, RFC 6979), Ed25519, or RSA-PSS-SHA256.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import KnockBuildError, KnockRefused, Reason
from .request import KnockRequest, encode_plaintext, parse_plaintext, signed_part
from .wire import (
    BUCKETS,
    SUITE_CURVES_TEXT,
    SUITE_P256,
    SUITES,
    VERSION,
    Header,
    Prechecked,
    Suite,
    solve_work,
)

__all__ = [
    "OpenedKnock",
    "ClientKey",
    "ClientPublicKey",
    "KnockSigner",
    "SoftwareSigner",
    "as_signer",
    "ecdsa_signature_size",
    "fingerprint",
    "suite_for_curve",
    "seal_knock",
    "seal_plaintext",
    "signed_message",
    "open_knock",
    "verify_signature",
    "max_certificate_size",
]

KDF_INFO = b"sknock/v1/key"
SIGNATURE_DOMAIN = b"sknock/v1/signature"

#: The private keys a knock may be signed with (EC, Ed25519, RSA).  The one definition: credentials.py
#: loads a client's key as one, and sknock-ca (ca.py) makes and signs with the same kinds.
ClientKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
#: Their public halves, as a client certificate carries them.
ClientPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


@runtime_checkable
class KnockSigner(Protocol):
    """What signs a knock: a key in memory (:class:`SoftwareSigner`) or one that never leaves a token
    (``sknock.token.TokenSigner``).  ``sign`` returns the signature exactly as the wire carries it (DER
    ECDSA-SHA256, Ed25519, or RSA-PSS-SHA256: see the module docstring), so the format does not depend on
    where the key lives; ``signature_size`` is the most bytes it may take (to size the datagram)."""

    def public_key(self) -> ClientPublicKey:
        """The public half, as the client certificate carries it."""
        ...

    def sign(self, message: bytes) -> bytes:
        """The signature over ``message`` (the whole message: the signer hashes it)."""
        ...

    @property
    def signature_size(self) -> int:
        """The largest signature this signer makes, in bytes."""
        ...


class SoftwareSigner(NamedTuple):
    """A :data:`ClientKey` held in memory, as a :class:`KnockSigner`."""

    key: ClientKey

    def public_key(self) -> ClientPublicKey:
        """The key's public half."""
        return self.key.public_key()

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` as the protocol says for this kind of key."""
        return _sign(self.key, message)

    @property
    def signature_size(self) -> int:
        """The largest signature this key makes (DER worst case for ECDSA)."""
        return _signature_size(self.key)


def as_signer(key: ClientKey | KnockSigner) -> KnockSigner:
    """``key`` as a :class:`KnockSigner`: a key in memory is wrapped, a signer is returned as it is."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        return SoftwareSigner(key)
    return key


def ecdsa_signature_size(curve: ec.EllipticCurve) -> int:
    """The largest DER ECDSA signature on ``curve``: two integers of the curve's size, each with a possible
    leading zero, in a SEQUENCE (the lengths fit one byte up to P-384, two for P-521)."""
    return 2 * ((curve.key_size + 7) // 8) + 9


def suite_for_curve(curve: ec.EllipticCurve) -> Suite:
    """The suite a knock to a server key on ``curve`` uses; KnockBuildError when none does."""
    for suite in SUITES.values():
        if suite.curve.name == curve.name:
            return suite
    raise KnockBuildError(f"server key curve {curve.name} is not supported: use {SUITE_CURVES_TEXT}")


def fingerprint(certificate: bytes | x509.Certificate) -> bytes:
    """SHA-256 of a certificate's DER encoding, given as DER or loaded: the server identity every knock is
    bound to, and the identity by which sknock caches and logs any certificate.  The one such function."""
    der = certificate if isinstance(certificate, bytes) else certificate.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).digest()


def _derive(shared: bytes, header: Header, ephemeral: bytes, server_fingerprint: bytes) -> tuple[bytes, bytes]:
    info = KDF_INFO + bytes((header.version, header.suite)) + ephemeral
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=server_fingerprint, info=info).derive(shared)
    return okm[:32], okm[32:]


def _signed_message(header: Header, ephemeral: bytes, server_fingerprint: bytes, signed: bytes) -> bytes:
    return SIGNATURE_DOMAIN + bytes((header.version, header.suite)) + ephemeral + server_fingerprint + signed


def _sign(key: ClientKey, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    raise KnockBuildError(f"unsupported client key type {type(key).__name__}")


def verify_signature(public_key: object, signature: bytes, message: bytes) -> None:
    """Raise :class:`KnockRefused` (bad-signature) unless ``signature`` is valid for ``message``."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        else:
            raise KnockRefused(Reason.CERT_INVALID, f"unsupported client key type {type(public_key).__name__}")
    except InvalidSignature:
        raise KnockRefused(Reason.BAD_SIGNATURE) from None
    except ValueError as exc:  # e.g. a malformed DER ECDSA signature
        raise KnockRefused(Reason.BAD_SIGNATURE, str(exc)) from None


def _signature_size(key: ClientKey) -> int:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ecdsa_signature_size(key.curve)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return 64
    return (key.key_size + 7) // 8


def max_certificate_size(
    client_key: ClientKey | KnockSigner, n_ports: int = 1, suite: Suite = SUITES[SUITE_P256]
) -> int:
    """The largest client certificate (DER bytes) that fits a knock for this key (or signer) and number
    of ports."""
    fixed = 8 + 16 + 1 + 1 + 16 + 4 + 1 + 3 * n_ports + 2 + 2  # request with an IPv6 address, lengths
    return BUCKETS[-1] - suite.overhead - fixed - as_signer(client_key).signature_size


def seal_knock(
    request: KnockRequest,
    *,
    client_key: ClientKey | KnockSigner,
    client_certificate: bytes,
    server_public_key: ec.EllipticCurvePublicKey,
    server_fingerprint: bytes,
    work_bits: int,
    ephemeral_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """Build one knock datagram.  ``request.timestamp_ms`` carries the caller's clock; the only other
    inputs from outside are randomness (the ephemeral key, unless given, and the request's nonce).
    ``client_key`` is a key in memory or any :class:`KnockSigner` (a token): the datagram is the same."""
    signer = as_signer(client_key)
    suite = suite_for_curve(server_public_key.curve)
    ephemeral_key = ephemeral_key or ec.generate_private_key(suite.curve)
    if ephemeral_key.curve.name != suite.curve.name:
        raise KnockBuildError("ephemeral key is not on the server key's curve")
    ephemeral = ephemeral_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    header = Header(VERSION, suite.id, work_bits, 0, request.timestamp_ms // 1000, server_fingerprint[:4], 0)
    signed = signed_part(request, client_certificate)
    signature = signer.sign(_signed_message(header, ephemeral, server_fingerprint, signed))
    if len(signature) > signer.signature_size:
        raise KnockBuildError(
            f"the signer made a signature of {len(signature)} bytes, more than its {signer.signature_size}"
        )
    needed = suite.overhead + len(signed) + 2 + len(signature)
    bucket = next((size for size in BUCKETS if size >= needed), None)
    if bucket is None:
        raise KnockBuildError(
            f"the knock would need {needed} bytes but one datagram carries at most {BUCKETS[-1]}: "
            f"the client certificate ({len(client_certificate)} bytes DER) is too large; "
            f"at most {max_certificate_size(signer, len(request.ports), suite)} bytes fit"
        )
    plaintext = encode_plaintext(signed, signature, bucket - suite.overhead)
    return seal_plaintext(
        plaintext, header, ephemeral_key=ephemeral_key, server_public_key=server_public_key,
        server_fingerprint=server_fingerprint,
    )


def signed_message(header: Header, ephemeral: bytes, server_fingerprint: bytes, signed: bytes) -> bytes:
    """What the client signs: the domain, version, suite, ephemeral point, server fingerprint and
    ``signed`` (the request and certificate, as :func:`~sknock.protocol.request.signed_part` encodes them)."""
    return _signed_message(header, ephemeral, server_fingerprint, signed)


def seal_plaintext(
    plaintext: bytes,
    header: Header,
    *,
    ephemeral_key: ec.EllipticCurvePrivateKey,
    server_public_key: ec.EllipticCurvePublicKey,
    server_fingerprint: bytes,
) -> bytes:
    """Encrypt ``plaintext`` (already padded to its bucket) under ``header`` to the server key and
    solve the header's proof of work: the last step of :func:`seal_knock`, public so that tests can
    seal any plaintext at all (the fuzz harness reaches the server's parser this way)."""
    ephemeral = ephemeral_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key, nonce = _derive(ephemeral_key.exchange(ec.ECDH(), server_public_key), header, ephemeral, server_fingerprint)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, header.authenticated + ephemeral)
    return solve_work(header.pack() + ephemeral + ciphertext, header.work_bits)


class OpenedKnock(NamedTuple):
    """A decrypted, parsed knock whose signature and certificate are not checked yet."""

    request: KnockRequest
    certificate: bytes  # client certificate, DER, as the client sent it
    signature: bytes
    signed_message: bytes
    replay_key: bytes  # the pre-check's body digest


def open_knock(pre: Prechecked, *, server_key: ec.EllipticCurvePrivateKey, server_fingerprint: bytes) -> OpenedKnock:
    """Decrypt and parse a pre-checked datagram (one ECDH).  Raises :class:`KnockRefused`."""
    suite = SUITES[pre.header.suite]
    if server_key.curve.name != suite.curve.name:
        raise KnockRefused(Reason.WRONG_SERVER, f"suite {suite.id} does not match the server key's curve")
    body = pre.body
    ephemeral, ciphertext = body[: suite.point_size], body[suite.point_size :]
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(suite.curve, ephemeral)
    except ValueError:
        raise KnockRefused(Reason.MALFORMED_HEADER, "ephemeral key is not a point on the curve") from None
    key, nonce = _derive(server_key.exchange(ec.ECDH(), peer), pre.header, ephemeral, server_fingerprint)
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, pre.header.authenticated + ephemeral)
    except InvalidTag:
        raise KnockRefused(Reason.DECRYPT_FAILED) from None
    parsed = parse_plaintext(plaintext)
    if parsed.request.timestamp_ms // 1000 != pre.header.coarse_time:
        raise KnockRefused(Reason.MALFORMED, "clear and encrypted timestamps differ")
    message = _signed_message(pre.header, ephemeral, server_fingerprint, parsed.signed_part)
    return OpenedKnock(parsed.request, parsed.certificate, parsed.signature, message, pre.body_digest)
