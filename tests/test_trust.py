"""Client certificate verification against the test PKI: every reason code, on real chains."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sknock import ca as ca_lib
from sknock.certificate import ports_general_name
from sknock.errors import CertificateError, Reason
from sknock.ports import PortSet, parse_ports
from sknock.protocol import fingerprint
from sknock.trust import (
    ClientVerifier,
    current_crls,
    load_crl,
    parse_client_certificate,
    verify_server_certificate,
)
from tests.forged import MALFORMED, CertificateParts
from tests.pki import ALICE_PORTS, NOW, PASSWORD_BYTES, TestPKI, at, unnumbered_crl

DAY = dt.timedelta(days=1)


def _reason(verifier: ClientVerifier, cert: x509.Certificate, now: dt.datetime) -> str:
    with pytest.raises(CertificateError) as info:
        verifier.verify(cert, now)
    assert isinstance(info.value.reason, Reason)  # one vocabulary: the refusal reason itself
    return info.value.reason


def test_good_client(pki: TestPKI) -> None:
    result = pki.verifier().verify(pki.alice.certificate, pki.now())
    assert result.certificate == pki.alice.certificate
    assert result.subject == "CN=alice"
    assert result.fingerprint == fingerprint(pki.alice.certificate)
    assert result.ports == parse_ports(ALICE_PORTS)
    assert result.not_after == pki.alice.certificate.not_valid_after_utc


@pytest.mark.parametrize("name", ["ed25519", "rsa", "bob"])
def test_other_key_types_and_intermediate(pki: TestPKI, name: str) -> None:
    issued = getattr(pki, name)
    assert pki.verifier().verify(issued.certificate, pki.now()).ports == parse_ports("tcp/22")


def test_client_without_ports_is_valid_but_authorizes_nothing(pki: TestPKI) -> None:
    assert pki.verifier().verify(pki.noports.certificate, pki.now()).ports == PortSet(())


def test_revoked(pki: TestPKI) -> None:
    with pytest.raises(CertificateError, match="CN=mallory .* is revoked") as info:
        pki.verifier().verify(pki.mallory.certificate, pki.now())
    assert info.value.reason == "cert-revoked"


def test_revocation_only_counts_when_crl_loaded(pki: TestPKI) -> None:
    without = ClientVerifier([pki.ca_cert], [pki.intermediate.certificate])
    assert without.verify(pki.mallory.certificate, pki.now()).subject == "CN=mallory"


def test_expired_and_not_yet_valid(pki: TestPKI) -> None:
    v = pki.verifier()
    assert _reason(v, pki.old.certificate, pki.now()) == "cert-expired"
    assert _reason(v, pki.alice.certificate, pki.alice.certificate.not_valid_before_utc - DAY) == "cert-expired"
    assert _reason(v, pki.alice.certificate, pki.alice.certificate.not_valid_after_utc + DAY) == "cert-expired"


def test_other_ca_is_untrusted_even_with_the_same_name(pki: TestPKI) -> None:
    assert pki.stranger_ca.certificate.subject == pki.ca_cert.subject
    assert _reason(pki.verifier(), pki.stranger.certificate, pki.now()) == "cert-untrusted"


def test_intermediate_client_needs_the_intermediate(pki: TestPKI) -> None:
    v = ClientVerifier([pki.ca_cert])
    assert _reason(v, pki.bob.certificate, pki.now()) == "cert-untrusted"


def test_server_certificate_is_not_a_client(pki: TestPKI) -> None:
    assert _reason(pki.verifier(), pki.server.certificate, pki.now()) in ("cert-untrusted", "cert-invalid")


def _leaf(pki: TestPKI, key_usage: x509.KeyUsage, eku: list[x509.ObjectIdentifier] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = pki.now()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(pki.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + DAY)
        .add_extension(x509.KeyUsage(*key_usage_flags(key_usage)), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([ports_general_name(parse_ports("tcp/22"))]), critical=False)
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(pki.ca.key, hashes.SHA256())


def key_usage_flags(ku: x509.KeyUsage) -> tuple[bool, ...]:
    return (
        ku.digital_signature,
        ku.content_commitment,
        ku.key_encipherment,
        ku.data_encipherment,
        ku.key_agreement,
        False,
        False,
        False,
        False,
    )


def _ku(digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature, False, False, False, True, False, False, False, False)


def test_leaf_needs_digital_signature(pki: TestPKI) -> None:
    ok = _leaf(pki, _ku(True), [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert pki.verifier().verify(ok, pki.now()).subject == "CN=odd"
    bad = _leaf(pki, _ku(False), [ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(CertificateError, match="digitalSignature") as info:
        pki.verifier().verify(bad, pki.now())
    assert info.value.reason == "cert-invalid"


def test_leaf_needs_client_auth_eku(pki: TestPKI) -> None:
    for eku in (None, [ExtendedKeyUsageOID.SERVER_AUTH]):
        cert = _leaf(pki, _ku(True), eku)
        assert _reason(pki.verifier(), cert, pki.now()) in ("cert-invalid", "cert-untrusted")


def test_require_crl(pki: TestPKI) -> None:
    strict = ClientVerifier([pki.ca_cert], [pki.intermediate.certificate], [pki.crl], require_crl=True)
    assert strict.verify(pki.alice.certificate, pki.now()).subject == "CN=alice"
    # bob's issuer (the intermediate) has no CRL loaded
    with pytest.raises(CertificateError, match="sub-ca.*no CRL") as info:
        strict.verify(pki.bob.certificate, pki.now())
    assert info.value.reason == "crl-unavailable"
    none = ClientVerifier([pki.ca_cert], require_crl=True)
    assert _reason(none, pki.alice.certificate, pki.now()) == "crl-unavailable"


def test_stale_crl(pki: TestPKI) -> None:
    after = pki.crl.next_update_utc
    assert after is not None
    later = after + DAY
    assert later < pki.alice.certificate.not_valid_after_utc
    assert _reason(pki.verifier(require_crl=True), pki.alice.certificate, later) == "crl-unavailable"
    # without the requirement a stale CRL still revokes what it lists
    assert _reason(pki.verifier(), pki.mallory.certificate, later) == "cert-revoked"
    assert pki.verifier().verify(pki.alice.certificate, later).subject == "CN=alice"


def test_revoked_intermediate_revokes_its_clients(tmp_path: Path) -> None:
    root = ca_lib.init_ca(tmp_path / "root", PASSWORD_BYTES, clock=at(NOW))
    sub = root.issue_intermediate("sub", PASSWORD_BYTES)
    carol = sub.issue_client("carol", parse_ports("tcp/22"), PASSWORD_BYTES)
    now = TestPKI.now()
    assert ClientVerifier([root.certificate], [sub.certificate]).verify(carol, now).subject == "CN=carol"
    crl = root.revoke("sub")
    v = ClientVerifier([root.certificate], [sub.certificate], [crl])
    with pytest.raises(CertificateError, match="intermediate CA CN=sub .* is revoked") as info:
        v.verify(carol, now)
    assert info.value.reason == "cert-revoked"


@pytest.mark.parametrize("order", ["older-first", "newer-first"])
def test_of_two_crls_of_one_second_the_verifier_uses_the_later_number(tmp_path: Path, order: str) -> None:
    """The CA's clock stands still: its first CRL and the one that revokes carol share one thisUpdate (whole
    seconds); the CRL number alone says which is newer, and the verifier must use that one in either order."""
    root = ca_lib.init_ca(tmp_path / "root", PASSWORD_BYTES, clock=at(NOW))
    carol = root.issue_client("carol", parse_ports("tcp/22"), PASSWORD_BYTES)
    before = x509.load_der_x509_crl((root.directory / "crl.der").read_bytes())
    after = root.revoke("carol")
    assert before.last_update_utc == after.last_update_utc
    crls = [before, after] if order == "older-first" else [after, before]
    with pytest.raises(CertificateError, match="revoked") as info:
        ClientVerifier([root.certificate], [], crls).verify(carol, TestPKI.now())
    assert info.value.reason == "cert-revoked"


def _crl_without_number(authority: ca_lib.CertificateAuthority, *serials: int) -> x509.CertificateRevocationList:
    return unnumbered_crl(authority, *serials, issued=dt.datetime.fromtimestamp(NOW, dt.UTC) - dt.timedelta(hours=1))


@pytest.mark.parametrize("order", ["carol-first", "dave-first"])
def test_of_two_crls_neither_newer_each_revocation_holds(tmp_path: Path, order: str) -> None:
    """Two CRLs of one CA, one second, no CRL number, each revoking a certificate the other does not
    (two mirrors of a CA that misbehaves): which is newer cannot be told, so neither revocation may be
    dropped -- the verifier checks both, and a client neither revokes is still let in."""
    root = ca_lib.init_ca(tmp_path / "root", PASSWORD_BYTES, clock=at(NOW))
    carol, dave, erin = (root.issue_client(n, parse_ports("tcp/22"), PASSWORD_BYTES) for n in ("carol", "dave", "erin"))
    crls = [_crl_without_number(root, carol.serial_number), _crl_without_number(root, dave.serial_number)]
    if order == "dave-first":
        crls.reverse()
    assert current_crls(crls) == crls  # both kept
    verifier = ClientVerifier([root.certificate], [], crls, require_crl=True)
    for revoked in (carol, dave):
        with pytest.raises(CertificateError, match="revoked") as info:
            verifier.verify(revoked, TestPKI.now())
        assert info.value.reason == "cert-revoked"
    assert verifier.verify(erin, TestPKI.now()).subject == "CN=erin"
    # One that keeps every revocation of the other may replace it; a numbered newer one replaces both.
    both = _crl_without_number(root, carol.serial_number, dave.serial_number)
    assert current_crls([*crls, both]) == [both]
    newer = root.write_crl()
    assert current_crls([*crls, newer]) == [newer] and current_crls([newer, *crls]) == [newer]


def test_expired_issuer_is_reported_as_expired(tmp_path: Path) -> None:
    root = ca_lib.init_ca(tmp_path / "root", PASSWORD_BYTES, days=2, clock=at(NOW))
    now = TestPKI.now()
    dave = root.issue_client("dave", parse_ports("tcp/22"), PASSWORD_BYTES, not_after=now + 10 * DAY)
    with pytest.raises(CertificateError, match="issuer CN=sknock CA is not valid") as info:
        ClientVerifier([root.certificate]).verify(dave, now + 5 * DAY)
    assert info.value.reason == "cert-expired"


def test_naive_time_refused(pki: TestPKI) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.verifier().verify(pki.alice.certificate, dt.datetime(2026, 1, 1))  # noqa: DTZ001


def test_crl_from_unknown_ca_refused_at_construction(pki: TestPKI) -> None:
    other_crl = load_crl(
        (pki.stranger_ca.directory / "crl.der").read_bytes(), [pki.stranger_ca.certificate], source="other"
    )
    with pytest.raises(CertificateError, match="not signed by any configured CA"):
        ClientVerifier([pki.ca_cert], crls=[other_crl])


# -- load_crl ----------------------------------------------------------------------------------


def test_load_crl_der_and_pem(pki: TestPKI) -> None:
    der = load_crl((pki.ca_dir / "crl.der").read_bytes(), [pki.ca_cert], source="crl.der")
    pem = load_crl((pki.ca_dir / "crl.pem").read_bytes(), [pki.intermediate.certificate, pki.ca_cert], source="p")
    assert der == pem == pki.crl
    assert der.get_revoked_certificate_by_serial_number(pki.mallory.certificate.serial_number) is not None


def test_load_crl_refusals(pki: TestPKI) -> None:
    data = (pki.ca_dir / "crl.der").read_bytes()
    with pytest.raises(CertificateError, match="CRL http://x/crl: not a DER or PEM CRL") as info:
        load_crl(b"garbage", [pki.ca_cert], source="http://x/crl")
    assert info.value.reason == "crl-unavailable"
    with pytest.raises(CertificateError, match="CRL crl.der: issued by CN=sknock Test Root CA, which is not a known"):
        load_crl(data, [pki.intermediate.certificate], source="crl.der")
    # the stranger CA has the same name as ours: the name matches, the signature must not
    with pytest.raises(CertificateError, match="signature does not verify"):
        load_crl(data, [pki.stranger_ca.certificate], source="crl.der")
    tampered = bytearray(data)
    tampered[-10] ^= 0x01
    with pytest.raises(CertificateError):
        load_crl(bytes(tampered), [pki.ca_cert], source="tampered")


# -- server certificates -----------------------------------------------------------------------


def test_server_certificate(pki: TestPKI) -> None:
    assert verify_server_certificate(pki.server.certificate, [pki.ca_cert], pki.now()) == pki.ca_cert
    with pytest.raises(CertificateError) as info:
        verify_server_certificate(pki.server.certificate, [pki.stranger_ca.certificate], pki.now())
    assert info.value.reason == "cert-untrusted"
    later = pki.server.certificate.not_valid_after_utc + DAY
    with pytest.raises(CertificateError) as info:
        verify_server_certificate(pki.server.certificate, [pki.ca_cert], later)
    assert info.value.reason == "cert-expired"


def test_client_certificate_is_not_a_server(pki: TestPKI) -> None:
    with pytest.raises(CertificateError, match="serverAuth"):
        verify_server_certificate(pki.alice.certificate, [pki.ca_cert], pki.now())
    with pytest.raises(CertificateError, match="not EC"):
        verify_server_certificate(pki.ed25519.certificate, [pki.ca_cert], pki.now())


# -- certificates from the wire are read whole before any field is used (issue 8) -------------------

_ATTACKER = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_certificate_from_the_wire_is_cert_invalid(kind: str) -> None:
    with pytest.raises(CertificateError) as info:
        parse_client_certificate(MALFORMED[kind](_ATTACKER))
    assert info.value.reason is Reason.CERT_INVALID
    assert str(info.value).isprintable()


@pytest.mark.parametrize("kind", ["subject-not-utf8", "issuer-not-utf8", "subject-bitstring", "extension-twice"])
def test_a_certificate_that_loads_but_does_not_read_is_cert_invalid_in_verify_too(pki: TestPKI, kind: str) -> None:
    # cryptography loads these (it parses names and extensions lazily); verify() checks them first.
    cert = x509.load_der_x509_certificate(MALFORMED[kind](_ATTACKER))
    assert _reason(pki.verifier(), cert, pki.now()) == Reason.CERT_INVALID


def test_a_well_formed_certificate_passes_the_parse(pki: TestPKI) -> None:
    der = pki.alice.certificate.public_bytes(serialization.Encoding.DER)
    assert parse_client_certificate(der) == pki.alice.certificate
    with pytest.raises(CertificateError) as info:
        parse_client_certificate(der[:-1])
    assert info.value.reason is Reason.CERT_INVALID


def test_a_v1_certificate_is_cert_invalid() -> None:
    der = CertificateParts(version=b"").sign(_ATTACKER)  # no [0] version: v1
    with pytest.raises(CertificateError, match="version v1, not v3") as info:
        parse_client_certificate(der)
    assert info.value.reason is Reason.CERT_INVALID
