"""Server certificates with and without the server profile, issued by the test PKI's root with
cryptography (real keys, real signatures), and written as the files an operator would be given.

``odd_server(pki, ...)`` returns ``(key, certificate)``; by default it is a good server certificate
(EC P-256, basicConstraints CA:FALSE, keyUsage keyAgreement, EKU serverAuth, valid from a day ago for a
year), and each keyword changes one thing.  ``write_pfx`` and ``write_cer`` put them in files.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.pki import PASSWORD_BYTES, TestPKI

DAY = dt.timedelta(days=1)
_UNSET: object = object()


def key_usage(*, key_agreement: bool = True, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=key_agreement, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def odd_server(
    pki: TestPKI,
    *,
    name: str = "odd-server",
    curve: ec.EllipticCurve | None = None,
    ca: bool = False,
    usage: x509.KeyUsage | None | object = _UNSET,
    eku: list[x509.ObjectIdentifier] | None | object = _UNSET,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for a server, issued by ``pki``'s root.  ``usage=None`` / ``eku=None`` leave the
    extension out; ``ca=True`` makes basicConstraints say CA:TRUE."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    now = pki.now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(pki.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.key.public_key()),  # type: ignore[arg-type]
                       critical=False)
    )
    usage = key_usage() if usage is _UNSET else usage
    if isinstance(usage, x509.KeyUsage):
        builder = builder.add_extension(usage, critical=True)
    eku = [ExtendedKeyUsageOID.SERVER_AUTH] if eku is _UNSET else eku
    if isinstance(eku, list):
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return key, builder.sign(pki.ca.key, hashes.SHA256())  # type: ignore[arg-type]


def write_pfx(
    path: Path, key: object, cert: x509.Certificate, cas: list[x509.Certificate], password: bytes = PASSWORD_BYTES
) -> Path:
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"server", key, cert, cas, serialization.BestAvailableEncryption(password)  # type: ignore[arg-type]
        )
    )
    path.chmod(0o600)
    return path


def write_cer(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return path


def signed_crl(
    key: object, issuer: x509.Certificate, *, last_update: dt.datetime, next_update: dt.datetime
) -> bytes:
    """A CRL (DER) with no entries signed by ``key`` for ``issuer``, with the dates given."""
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return crl.public_bytes(serialization.Encoding.DER)


def self_signed_ca(
    name: str, *, not_before: dt.datetime, not_after: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage(key_agreement=False, cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert
