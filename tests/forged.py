"""Certificates and knocks an attacker can build: real keys, real signatures, malformed on purpose.

Anyone holding the server certificate can seal a knock to it, sign it with a key of their own and put
any bytes where the client certificate goes; the server parses that certificate before any signature
check.  This module writes such certificates DER byte by DER byte (so that they can be wrong in ways
cryptography's builder refuses to produce), seals them into knocks with the real protocol code, and
names the kinds of malformed certificate that once ended a worker (:data:`MALFORMED`).

Used by tests/test_trust.py, tests/test_server_refusals.py and the fuzz harness (tests/fuzz/).
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sknock.certificate import ports_general_name
from sknock.ports import PortSet, Protocol
from sknock.protocol import Action, KnockRequest, fingerprint, seal_knock

# -- DER, by hand ----------------------------------------------------------------------------------


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length (short or long form), content."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return tlv(0x02, body)


def der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


UTF8STRING, PRINTABLESTRING, IA5STRING, BMPSTRING, BITSTRING = 0x0C, 0x13, 0x16, 0x1E, 0x03
CN = NameOID.COMMON_NAME.dotted_string
ECDSA_SHA256 = "1.2.840.10045.4.3.2"


def der_name(*attributes: tuple[str, int, bytes]) -> bytes:
    """A Name: one RDN per (oid, string tag, raw value bytes) -- the value is not checked at all."""
    return seq(*(tlv(0x31, seq(der_oid(oid), tlv(tag, value))) for oid, tag, value in attributes))


def der_time(when: dt.datetime) -> bytes:
    if 1950 <= when.year < 2050:
        return tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, when.strftime("%Y%m%d%H%M%SZ").encode())


def der_extension(oid: str, value: bytes, critical: bool = False) -> bytes:
    return seq(der_oid(oid), *([tlv(0x01, b"\xff")] if critical else []), tlv(0x04, value))


def extension_der(extension: x509.ExtensionType) -> bytes:
    """The DER value of a well-formed extension, as cryptography writes it."""
    return extension.public_bytes()


@dataclass(frozen=True)
class CertificateParts:
    """Every part of a certificate, as bytes where an attacker might put anything."""

    version: bytes = der_int(2)  # the INTEGER inside [0]: 2 means v3; empty leaves [0] out (v1)
    serial: bytes = der_int(0x5EED)
    signature_algorithm: bytes = seq(der_oid(ECDSA_SHA256))
    issuer: bytes = der_name((CN, UTF8STRING, b"sknock Test Root CA"))
    not_before: bytes = der_time(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    not_after: bytes = der_time(dt.datetime(2036, 1, 1, tzinfo=dt.UTC))
    subject: bytes = der_name((CN, UTF8STRING, b"attacker"))
    public_key: bytes = b""  # SubjectPublicKeyInfo; empty: the signing key's
    extensions: Sequence[bytes] = field(default_factory=tuple)  # each from der_extension()

    def tbs(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        spki = self.public_key or key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        extensions = [tlv(0xA3, seq(*self.extensions))] if self.extensions else []
        return seq(
            *([tlv(0xA0, self.version)] if self.version else []), self.serial, self.signature_algorithm, self.issuer,
            seq(self.not_before, self.not_after), self.subject, spki, *extensions,
        )

    def sign(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        """The certificate's DER, signed by ``key`` (ECDSA-SHA256, deterministic)."""
        tbs = self.tbs(key)
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        return seq(tbs, self.signature_algorithm, tlv(0x03, b"\x00" + signature))


def client_extensions(ports: PortSet | None = None) -> tuple[bytes, ...]:
    """The extensions a real client certificate carries (keyUsage, EKU clientAuth, the ports)."""
    key_usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    out = [
        der_extension(x509.oid.ExtensionOID.BASIC_CONSTRAINTS.dotted_string,
                      extension_der(x509.BasicConstraints(ca=False, path_length=None)), critical=True),
        der_extension(x509.oid.ExtensionOID.KEY_USAGE.dotted_string, extension_der(key_usage), critical=True),
        der_extension(x509.oid.ExtensionOID.EXTENDED_KEY_USAGE.dotted_string,
                      extension_der(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))),
    ]
    if ports:
        out.append(der_extension(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string,
                                 extension_der(x509.SubjectAlternativeName([ports_general_name(ports)]))))
    return tuple(out)


# -- the kinds of malformed certificate that once ended a worker -----------------------------------


def _kind(**changes: bytes | Sequence[bytes]) -> Callable[[ec.EllipticCurvePrivateKey], bytes]:
    def build(key: ec.EllipticCurvePrivateKey) -> bytes:
        return replace(CertificateParts(extensions=client_extensions()), **changes).sign(key)  # type: ignore[arg-type]

    return build


#: name -> builder(attacker key) -> certificate DER.  Before issue 8 the first five raised something
#: other than a refusal in the verifier (InvalidVersion, ValueError from the subject or the issuer,
#: TypeError) and ended the worker; the others were refused only because the chain check happened to
#: fail first.  Each is now refused ``cert-invalid`` by trust.parse_client_certificate.
MALFORMED: dict[str, Callable[[ec.EllipticCurvePrivateKey], bytes]] = {
    # The version INTEGER says 3 (that is "v4"): x509.InvalidVersion when loaded.
    "bad-version": _kind(version=der_int(3)),
    # A UTF8String CN holding byte 0xFF: ValueError when the subject is first read.
    "subject-not-utf8": _kind(subject=der_name((CN, UTF8STRING, b"\xff\xfeattacker"))),
    # The same in the issuer: ValueError when the chain builder or a message reads it.
    "issuer-not-utf8": _kind(issuer=der_name((CN, UTF8STRING, b"sknock Test Root CA\xff"))),
    # A CN that is a BIT STRING: TypeError ("oid must be X500_UNIQUE_IDENTIFIER for BitString type").
    "subject-bitstring": _kind(subject=der_name((CN, BITSTRING, b"\x00attacker"))),
    # An IA5String CN with a byte above 0x7F: ValueError on the subject.
    "subject-ia5-high": _kind(subject=der_name((CN, IA5STRING, b"att\xe4cker"))),
    # keyUsage whose value is not a BIT STRING: ValueError when the extensions are parsed.
    "extension-garbage": _kind(extensions=(
        *client_extensions()[:1],
        der_extension(x509.oid.ExtensionOID.KEY_USAGE.dotted_string, b"\x04\x02\x00\x00", critical=True),
    )),
    # The same extension twice: x509.DuplicateExtension.
    "extension-twice": _kind(extensions=(*client_extensions(), client_extensions()[-1])),
    # A public key of an algorithm nobody knows: UnsupportedAlgorithm when the key is read.
    "unknown-key": _kind(public_key=seq(seq(der_oid("1.3.6.1.4.1.55555.1")), tlv(0x03, b"\x00" + bytes(32)))),
    # Validity times that are not times.
    "bad-time": _kind(not_before=tlv(0x17, b"26013X000000Z")),
}


# -- certificates a CA issued with a hostile subject (for the log-forging tests) -------------------


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    common_name: str,
    ports: PortSet,
    *,
    now: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A valid client certificate from ``ca_key`` whose CN is ``common_name`` -- any text at all,
    newlines and terminal escapes included.  Returns (client key, certificate)."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    key_usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    with warnings.catch_warnings():  # a CN longer than 64 characters is the point here
        warnings.simplefilter("ignore", UserWarning)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([ports_general_name(ports)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


# -- knocks ------------------------------------------------------------------------------------------


def seal(
    certificate_der: bytes,
    key: ec.EllipticCurvePrivateKey,
    server_certificate: x509.Certificate,
    ports: Sequence[tuple[Protocol, int]],
    *,
    now: float,
    work_bits: int,
    source_address: object = None,
    action: Action = Action.OPEN,
) -> bytes:
    """A knock sealed to ``server_certificate`` carrying ``certificate_der`` and signed by ``key``,
    built by the protocol code the client library uses."""
    request = KnockRequest(
        ports=tuple(ports), timestamp_ms=int(now * 1000), nonce=os.urandom(16), action=action,
        source_address=source_address,  # type: ignore[arg-type]
    )
    server_key = server_certificate.public_key()
    assert isinstance(server_key, ec.EllipticCurvePublicKey)
    return seal_knock(
        request, client_key=key, client_certificate=certificate_der, server_public_key=server_key,
        server_fingerprint=fingerprint(server_certificate.public_bytes(serialization.Encoding.DER)),
        work_bits=work_bits,
    )
