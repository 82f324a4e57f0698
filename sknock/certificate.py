"""The authorization extension: which ports a client certificate opens.

The original sKnock put the port list in the certificate's subjectAltName as an ``otherName``
whose type-id is :data:`PORTS_OID` (1.3.6.1.4.1.19518) and whose value is ``[0] EXPLICIT
UTF8String`` holding the certificate form of :mod:`sknock.ports` (``1.22,0.8000``).  OpenSSL
writes it from the config line ``otherName.1=1.3.6.1.4.1.19518;UTF8:1.22,0.8000``.

``cryptography`` unwraps the ``[0] EXPLICIT`` tag itself and hands us the DER of the inner
value, so all this module must decode is one DER UTF8String.  It does so strictly, by hand,
because the value comes from a certificate a stranger sent us: anything but exactly one
minimal-length UTF8String with valid UTF-8 is refused with ``CertificateError(Reason.CERT_INVALID)``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from .errors import CertificateError, PortSpecError, Reason
from .logsafe import log_safe
from .ports import PortRange, PortSet, parse_certificate_ports

__all__ = [
    "PORTS_OID",
    "authorized_ports",
    "ports_general_name",
    "encode_utf8string",
    "decode_utf8string",
    "tolerate_zero_serial",
    "quiet_certificate_warnings",
    "describe_name",
]

PORTS_OID = x509.ObjectIdentifier("1.3.6.1.4.1.19518")

_UTF8STRING_TAG = 0x0C
# A port list longer than this is not a port list; it also bounds what we decode from a stranger.
_MAX_VALUE_LENGTH = 65535


def encode_utf8string(text: str) -> bytes:
    """DER-encode ``text`` as a UTF8String (tag 0x0C, minimal definite length)."""
    body = text.encode("utf-8")
    n = len(body)
    if n < 0x80:
        header = bytes([_UTF8STRING_TAG, n])
    else:
        length = n.to_bytes((n.bit_length() + 7) // 8, "big")
        header = bytes([_UTF8STRING_TAG, 0x80 | len(length)]) + length
    return header + body


def decode_utf8string(data: bytes) -> str:
    """Decode exactly one DER UTF8String; raise ``CertificateError(Reason.CERT_INVALID)`` otherwise.

    Refused: another tag, indefinite or non-minimal lengths, lengths past the end, trailing bytes,
    invalid UTF-8.
    """

    def bad(why: str) -> CertificateError:
        return CertificateError(Reason.CERT_INVALID, f"authorization extension value is not a DER UTF8String: {why}")

    if len(data) < 2:
        raise bad("too short")
    if data[0] != _UTF8STRING_TAG:
        raise bad(f"tag 0x{data[0]:02x}, expected 0x0c")
    first = data[1]
    offset = 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise bad("indefinite length")
        if count > 4:
            raise bad("length field too long")
        if len(data) < offset + count:
            raise bad("truncated length")
        length_bytes = data[offset : offset + count]
        if length_bytes[0] == 0:
            raise bad("non-minimal length (leading zero)")
        length = int.from_bytes(length_bytes, "big")
        if length < 0x80:
            raise bad("non-minimal length (long form for a short value)")
        offset += count
    if length > _MAX_VALUE_LENGTH:
        raise bad(f"value of {length} bytes is too long")
    if len(data) - offset < length:
        raise bad("length runs past the end")
    if len(data) - offset > length:
        raise bad("trailing bytes")
    try:
        return data[offset:].decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise bad(f"invalid UTF-8 ({exc.reason})") from None


@contextlib.contextmanager
def tolerate_zero_serial() -> Iterator[None]:
    """Silence cryptography's warning about a non-positive serial number, and only that one.

    The original sKnock's CA certificate has serial 0, which RFC 5280 forbids; cryptography still
    parses it but warns each time.  We must accept that CA, so the warning is noise here, while
    every other warning stays visible.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Parsed a serial number which wasn't positive",
            category=CryptographyDeprecationWarning,
        )
        yield


@contextlib.contextmanager
def quiet_certificate_warnings() -> Iterator[None]:
    """:func:`tolerate_zero_serial`, and silence cryptography's warning about a name attribute of a length
    outside 1..64 too: for certificates from the wire.  Such a certificate may still be refused; the
    warning is printed on stderr once per distinct length, so a stranger could otherwise fill it."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Parsed a serial number which wasn't positive",
            category=CryptographyDeprecationWarning,
        )
        warnings.filterwarnings("ignore", message=r"Attribute's length must be", category=UserWarning)
        yield


def describe_name(name: x509.Name) -> str:
    """A certificate's subject or issuer for a message or a log line: RFC 4514, escaped with
    :func:`~sknock.logsafe.log_safe` (a subject may hold a line break), or ``<undecodable name>``."""
    try:
        return log_safe(name.rfc4514_string())
    except Exception:  # noqa: BLE001 -- a name that does not decode is described, not raised
        return "<undecodable name>"


def authorized_ports(cert: x509.Certificate) -> PortSet:
    """The ports ``cert`` authorizes: the union of every ports otherName in its subjectAltName.

    An absent extension means no ports (an empty :class:`PortSet`), so the server refuses every
    request from that client but the certificate itself is still usable.
    """
    try:
        with quiet_certificate_warnings():
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return PortSet(())
    except ValueError as exc:
        raise CertificateError(Reason.CERT_INVALID, f"certificate extensions are malformed: {exc}") from None
    ranges: list[PortRange] = []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id != PORTS_OID:
            continue
        text = decode_utf8string(other.value)
        try:
            ranges.extend(parse_certificate_ports(text).ranges)
        except PortSpecError as exc:
            raise CertificateError(Reason.CERT_INVALID, f"authorization extension {text!r}: {exc}") from None
    return PortSet.of(ranges)


def ports_general_name(ports: PortSet) -> x509.OtherName:
    """The subjectAltName entry authorizing ``ports``, in the original sKnock's format."""
    if not ports:
        raise PortSpecError("cannot write an authorization extension with no ports")
    return x509.OtherName(PORTS_OID, encode_utf8string(ports.certificate_form()))
