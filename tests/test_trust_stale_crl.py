"""A CRL past its nextUpdate: refused when a CRL is required, still used with accept_stale_crl (the
daemon keeps the last good CRL while the CRL URL is down), and its revocations still apply."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sknock import ca as ca_lib
from sknock.credentials import load_client_pfx
from sknock.errors import CertificateError
from sknock.ports import parse_ports
from sknock.trust import ClientVerifier
from tests.pki import NOW, TestPKI, at

PASSWORD = b"stale-test"


def test_stale_crl(tmp_path: Path) -> None:
    authority = ca_lib.init_ca(tmp_path / "ca", PASSWORD, name="stale CA", clock=at(NOW))
    authority.issue_client("good", parse_ports("tcp/22"), PASSWORD)
    authority.issue_client("bad", parse_ports("tcp/22"), PASSWORD)
    authority.revoke("bad")
    now = TestPKI.now()
    past = now - dt.timedelta(days=40)
    stale = authority.write_crl(days=30, now=past)  # nextUpdate ten days ago
    good = load_client_pfx(authority.directory / "client" / "good.pfx", PASSWORD).certificate
    bad = load_client_pfx(authority.directory / "client" / "bad.pfx", PASSWORD).certificate

    strict = ClientVerifier([authority.certificate], (), [stale], require_crl=True)
    with pytest.raises(CertificateError) as info:
        strict.verify(good, now)
    assert info.value.reason == "crl-unavailable"

    lenient = ClientVerifier([authority.certificate], (), [stale], require_crl=True, accept_stale_crl=True)
    assert lenient.verify(good, now).subject == "CN=good"
    with pytest.raises(CertificateError) as info:
        lenient.verify(bad, now)
    assert info.value.reason == "cert-revoked"

    no_crl = ClientVerifier([authority.certificate], (), [], require_crl=True, accept_stale_crl=True)
    with pytest.raises(CertificateError) as info:
        no_crl.verify(good, now)
    assert info.value.reason == "crl-unavailable"
