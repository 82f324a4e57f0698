"""The original sKnock's dev PKI (../shared/compat/sknock-v1-devpki) must load and verify as is."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path

import pytest

from sknock.certificate import tolerate_zero_serial
from sknock.credentials import load_certificate, load_client_pfx, load_server_pfx
from sknock.errors import CertificateError
from sknock.ports import parse_ports
from sknock.trust import ClientVerifier, verify_server_certificate
from tests.pki import TestPKI

DEVPKI = Path(__file__).resolve().parents[2] / "shared/compat/sknock-v1-devpki"
PASSWORD = "portknocking"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # inside the certificates' validity (2017-06-27 .. 2027-06-25)

pytestmark = pytest.mark.skipif(not DEVPKI.is_dir(), reason=f"no sKnock v1 dev PKI at {DEVPKI} (../shared absent)")


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> object:
    # The CA's serial 0 makes cryptography warn; sknock must silence exactly that, so any other
    # warning (or that one leaking out) fails these tests.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_client_authorizes_exactly_the_original_ports() -> None:
    creds = load_client_pfx(DEVPKI / "devclient.pfx", PASSWORD)
    with tolerate_zero_serial():  # reading the serial ourselves warns, as it should
        assert [c.serial_number for c in creds.ca_certificates] == [0]  # the RFC-violating CA loads
    result = ClientVerifier(list(creds.ca_certificates)).verify(creds.certificate, NOW)
    assert result.ports == parse_ports("tcp/2000,tcp/3000,udp/8000")
    assert result.subject.startswith("CN=sKnock Test Client")
    assert (1, 2000) in result.ports and (0, 8000) in result.ports and (1, 8000) not in result.ports


def test_server_credentials_and_certificate() -> None:
    server = load_server_pfx(DEVPKI / "devserver.pfx", PASSWORD)
    cer = load_certificate(DEVPKI / "devserver.cer")
    assert cer == server.certificate
    ca = load_client_pfx(DEVPKI / "devclient.pfx", PASSWORD).ca_certificates
    assert verify_server_certificate(cer, ca, NOW) == ca[0]


def test_client_expires_when_the_original_said() -> None:
    creds = load_client_pfx(DEVPKI / "devclient.pfx", PASSWORD)
    verifier = ClientVerifier(list(creds.ca_certificates))
    with pytest.raises(CertificateError) as info:
        verifier.verify(creds.certificate, dt.datetime(2027, 7, 1, tzinfo=dt.UTC))
    assert info.value.reason == "cert-expired"


def test_our_ca_does_not_trust_the_original_client(pki: TestPKI) -> None:
    creds = load_client_pfx(DEVPKI / "devclient.pfx", PASSWORD)
    with pytest.raises(CertificateError) as info:
        pki.verifier().verify(creds.certificate, NOW)
    assert info.value.reason == "cert-untrusted"
