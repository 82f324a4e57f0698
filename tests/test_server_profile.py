"""The server profile: the certificate a server runs with, and the one a client is given as the server's,
must be a server's (issue 9 §3): an EC key on a curve knocks can be encrypted with, not a CA, keyAgreement
where keyUsage is present, serverAuth where EKU is present.  Real certificates, real PKCS#12 files."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sknock import ca as ca_lib
from sknock.credentials import SERVER_CURVES, load_server_pfx, server_certificate_problem
from sknock.errors import CAError, CertificateError, CredentialError, ServerCertificateError
from sknock.protocol import SUITES
from sknock.trust import verify_server_certificate
from tests.pki import PASSWORD, PASSWORD_BYTES, TestPKI
from tests.servercerts import key_usage, odd_server, write_pfx

DEVPKI = Path(__file__).resolve().parents[2] / "shared/compat/sknock-v1-devpki"
needs_devpki = pytest.mark.skipif(not DEVPKI.is_dir(), reason=f"no sKnock v1 dev PKI at {DEVPKI} (../shared absent)")


def test_server_curves_are_the_protocols() -> None:
    """P-521 keys load for clients (they only sign) but no knock can be encrypted to one."""
    assert set(SERVER_CURVES) == {suite.curve.name for suite in SUITES.values()} == {"secp256r1", "secp384r1"}
    assert ca_lib.SERVER_KEY_TYPES == ("ec-p256", "ec-p384")  # what sknock-ca offers comes from the suites too


def test_sknock_ca_servers_have_the_profile(pki: TestPKI) -> None:
    assert server_certificate_problem(pki.server.certificate) is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ca": True}, "it is a CA certificate (basicConstraints CA:TRUE)"),
        ({"usage": key_usage(key_agreement=True, cert_sign=True)}, "it is a CA certificate (keyUsage keyCertSign)"),
        ({"usage": key_usage(key_agreement=False, digital_signature=True)}, "keyUsage lacks keyAgreement"),
        ({"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]}, "EKU has clientAuth but not serverAuth: it is a client's"),
        ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, "EKU lacks serverAuth"),
        ({"curve": ec.SECP521R1()}, "its key is EC secp521r1, not EC P-256 or P-384"),
    ],
    ids=["ca", "keycertsign", "no-keyagreement", "client-eku", "other-eku", "p521"],
)
def test_what_is_not_a_server_certificate(pki: TestPKI, change: dict[str, object], words: str) -> None:
    _, cert = odd_server(pki, **change)  # type: ignore[arg-type]
    problem = server_certificate_problem(cert)
    assert problem is not None and words in problem
    with pytest.raises(CertificateError) as info:
        verify_server_certificate(cert, [pki.ca_cert], pki.now())
    assert info.value.reason == "cert-invalid" and words in str(info.value)


@pytest.mark.parametrize("omit", ["usage", "eku", "both"])
def test_key_usage_and_eku_are_checked_where_present(pki: TestPKI, omit: str) -> None:
    change: dict[str, object] = {"usage": None, "eku": None} if omit == "both" else {omit: None}
    _, cert = odd_server(pki, **change)  # type: ignore[arg-type]
    assert server_certificate_problem(cert) is None
    assert verify_server_certificate(cert, [pki.ca_cert], pki.now()) == pki.ca_cert


def test_p384_server_is_fine(pki: TestPKI, tmp_path: Path) -> None:
    key, cert = odd_server(pki, curve=ec.SECP384R1())
    assert server_certificate_problem(cert) is None
    assert load_server_pfx(write_pfx(tmp_path / "p384.pfx", key, cert, [pki.ca_cert]), PASSWORD).certificate == cert


def test_ca_and_client_certificates_are_not_servers(pki: TestPKI) -> None:
    problem = server_certificate_problem(pki.ca_cert)
    assert problem is not None and "CA certificate" in problem
    problem = server_certificate_problem(pki.alice.certificate)
    assert problem is not None and "client's certificate" in problem
    problem = server_certificate_problem(pki.rsa.certificate)
    assert problem is not None and "RSA 2048, not EC P-256 or P-384" in problem


def test_server_refuses_a_clients_pfx(pki: TestPKI) -> None:
    with pytest.raises(ServerCertificateError) as info:
        load_server_pfx(pki.alice.pfx, PASSWORD)
    message = str(info.value)
    assert isinstance(info.value, CredentialError)
    assert message == (
        f"server PKCS#12 {pki.alice.pfx}: CN=alice is not a server certificate: its EKU has clientAuth but not "
        "serverAuth: it is a client's certificate"
    )


def test_server_refuses_a_ca_pfx_and_a_p521_pfx(pki: TestPKI, tmp_path: Path) -> None:
    key, cert = odd_server(pki, name="looks-like-a-ca", ca=True)
    pfx = write_pfx(tmp_path / "ca-like.pfx", key, cert, [pki.ca_cert])
    with pytest.raises(ServerCertificateError, match=r"ca-like\.pfx: CN=looks-like-a-ca is not a server certificate: "
                       r"it is a CA certificate"):
        load_server_pfx(pfx, PASSWORD)
    key, cert = odd_server(pki, curve=ec.SECP521R1())
    pfx = write_pfx(tmp_path / "p521.pfx", key, cert, [pki.ca_cert])
    with pytest.raises(CredentialError, match=r"p521\.pfx: unsupported key type EC secp521r1; the server needs EC "
                       r"P-256 or P-384"):
        load_server_pfx(pfx, PASSWORD)


def test_the_ca_library_makes_no_p521_server(pki: TestPKI, tmp_path: Path) -> None:
    authority = ca_lib.init_ca(tmp_path / "ca", PASSWORD_BYTES, name="curve test CA")
    with pytest.raises(CAError, match="P-256 or P-384"):
        authority.issue_server("big", b"pfx-password", key_type="ec-p521")
    assert not (tmp_path / "ca" / "server" / "big.pfx").exists()


def test_a_subject_with_a_line_break_stays_one_line(pki: TestPKI, tmp_path: Path) -> None:
    key, cert = odd_server(pki, name="evil\nsknock[1] INFO granted", eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(ServerCertificateError) as info:
        load_server_pfx(write_pfx(tmp_path / "evil.pfx", key, cert, [pki.ca_cert]), PASSWORD)
    assert "\n" not in str(info.value) and "CN=evil\\x0asknock" in str(info.value)


@needs_devpki
def test_the_original_sknock_dev_server_certificate_passes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading and checking it warns about nothing (its CA's serial is 0)
        server = load_server_pfx(DEVPKI / "devserver.pfx", "portknocking")
        assert server_certificate_problem(server.certificate) is None
        when = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
        assert verify_server_certificate(server.certificate, server.ca_certificates, when) in server.ca_certificates
    usage = server.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_agreement and not usage.digital_signature
