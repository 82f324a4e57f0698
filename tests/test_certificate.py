"""The authorization extension: DER codec, reading it from certificates, writing it."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from sknock.certificate import (
    PORTS_OID,
    authorized_ports,
    decode_utf8string,
    describe_name,
    encode_utf8string,
    ports_general_name,
)
from sknock.errors import CertificateError, PortSpecError
from sknock.ports import PortSet, parse_ports
from tests.pki import ALICE_PORTS, TestPKI

_KEY = ec.generate_private_key(ec.SECP256R1())


def _cert_with_san(names: list[x509.GeneralName] | None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ext-test")])
    now = TestPKI.now()
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if names is not None:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(_KEY, hashes.SHA256())


# -- DER UTF8String ----------------------------------------------------------------------------


@given(st.text(max_size=2000))
def test_utf8string_round_trips(text: str) -> None:
    assert decode_utf8string(encode_utf8string(text)) == text


def test_short_and_long_length_forms() -> None:
    assert encode_utf8string("1.22") == b"\x0c\x041.22"
    assert encode_utf8string("a" * 127)[:2] == b"\x0c\x7f"
    assert encode_utf8string("a" * 128)[:3] == b"\x0c\x81\x80"
    assert encode_utf8string("a" * 300)[:4] == b"\x0c\x82\x01\x2c"
    assert decode_utf8string(b"\x0c\x82\x01\x2c" + b"a" * 300) == "a" * 300


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "too short"),
        (b"\x0c", "too short"),
        (b"\x13\x041.22", "tag"),  # PrintableString, not UTF8String
        (b"\x0c\x80" + b"1.22\x00\x00", "indefinite"),
        (b"\x0c\x81\x041.22", "non-minimal"),
        (b"\x0c\x82\x00\x041.22", "non-minimal"),
        (b"\x0c\x85\x00\x00\x00\x00\x04", "too long"),
        (b"\x0c\x82\x01", "truncated"),
        (b"\x0c\x051.22", "past the end"),
        (b"\x0c\x031.22", "trailing"),
        (b"\x0c\x02\xc3\x28", "UTF-8"),
        (b"\x0c\x83\x01\x00\x00" + b"a" * 65536, "too long"),
    ],
)
def test_malformed_der_refused(data: bytes, why: str) -> None:
    with pytest.raises(CertificateError, match=why) as info:
        decode_utf8string(data)
    assert info.value.reason == "cert-invalid"


@given(st.binary(max_size=300))
def test_decoder_only_raises_certificate_error(data: bytes) -> None:
    try:
        text = decode_utf8string(data)
    except CertificateError as exc:
        assert exc.reason == "cert-invalid"
    else:
        assert encode_utf8string(text) == data  # DER is canonical: whatever decodes, re-encodes the same


# -- in certificates ---------------------------------------------------------------------------


def test_issued_client_authorizes_its_ports(pki: TestPKI) -> None:
    assert authorized_ports(pki.alice.certificate) == parse_ports(ALICE_PORTS)


def test_absent_extension_means_no_ports(pki: TestPKI) -> None:
    assert authorized_ports(pki.noports.certificate) == PortSet(())
    assert authorized_ports(_cert_with_san(None)) == PortSet(())
    assert authorized_ports(pki.server.certificate) == PortSet(())  # SAN with IPs only


def test_several_othernames_are_united_and_foreign_ones_ignored() -> None:
    cert = _cert_with_san(
        [
            ports_general_name(parse_ports("tcp/22")),
            x509.DNSName("knock.example"),
            x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.99999"), encode_utf8string("junk")),
            ports_general_name(parse_ports("udp/53,tcp/8000-8010")),
        ]
    )
    assert authorized_ports(cert) == parse_ports("tcp/22,udp/53,tcp/8000-8010")


@pytest.mark.parametrize(
    "value",
    [
        encode_utf8string("1.22,2.80"),  # unknown protocol number
        encode_utf8string("tcp/22"),  # admin form where the certificate form belongs
        encode_utf8string(""),
        b"\x13\x041.22",  # PrintableString
        b"\x04\x041.22",  # OCTET STRING (cryptography itself refuses to write trailing bytes)
    ],
)
def test_malformed_extension_is_cert_invalid(value: bytes) -> None:
    cert = _cert_with_san([x509.OtherName(PORTS_OID, value)])
    with pytest.raises(CertificateError) as info:
        authorized_ports(cert)
    assert info.value.reason == "cert-invalid"


def test_written_extension_matches_original_format() -> None:
    name = ports_general_name(parse_ports("tcp/2000,tcp/3000,udp/8000"))
    assert name.type_id.dotted_string == "1.3.6.1.4.1.19518"
    # a UTF8String of PROTO.PORT entries, as the original's dev client carries ("\x0c\x14" + 20 chars);
    # we write the entries sorted (UDP = 0 first), which the original's parser reads the same.
    assert name.value == b"\x0c\x140.8000,1.2000,1.3000"


def test_empty_port_set_cannot_be_written() -> None:
    with pytest.raises(PortSpecError):
        ports_general_name(PortSet(()))


def test_describe_name_is_one_escaped_line() -> None:
    """The one way a subject or an issuer goes into a message (trust, credentials and the client share it)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eve\nsknock INFO granted")])
    assert describe_name(name) == "CN=eve\\x0asknock INFO granted"
