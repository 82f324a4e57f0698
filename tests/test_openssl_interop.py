"""Interoperability with OpenSSL, the original sKnock's CA tooling.

A client certificate made by ``openssl req`` + ``openssl x509`` with the original's config line
(``otherName.1=1.3.6.1.4.1.19518;UTF8:...``), signed with the key of a CA made by sknock-ca,
must verify with the right ports; and OpenSSL must accept what sknock-ca issues.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sknock import ca as ca_lib
from sknock.credentials import load_certificate, load_client_pfx
from sknock.ports import parse_ports
from sknock.trust import ClientVerifier, load_crl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

PASSWORD = b"interop-pw"

CLIENT_EXTENSIONS = """\
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = @ports
[ports]
otherName.1 = 1.3.6.1.4.1.19518;UTF8:1.22,0.8000,1.9000-9005
"""


def openssl(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def authority(tmp_path: Path) -> ca_lib.CertificateAuthority:
    (tmp_path / "ca.pw").write_bytes(PASSWORD + b"\n")
    return ca_lib.init_ca(tmp_path / "ca", PASSWORD, name="Interop CA")


def test_openssl_issued_client_verifies(tmp_path: Path, authority: ca_lib.CertificateAuthority) -> None:
    d = authority.directory
    (tmp_path / "client.cnf").write_text(CLIENT_EXTENSIONS)
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "client.key", cwd=tmp_path)
    openssl("req", "-new", "-key", "client.key", "-subj", "/CN=openssl client", "-out", "client.csr", cwd=tmp_path)
    openssl(
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        str(d / "ca.pem"),
        "-CAkey",
        str(d / "private/ca.key"),
        "-passin",
        f"file:{tmp_path / 'ca.pw'}",
        "-set_serial",
        "0x5eed0123456789abcdef",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        "client.cnf",
        "-extensions",
        "client",
        "-out",
        "client.pem",
        cwd=tmp_path,
    )
    cert = load_certificate(tmp_path / "client.pem")
    result = ClientVerifier([authority.certificate]).verify(cert, dt.datetime.now(dt.UTC))
    assert result.ports == parse_ports("tcp/22,udp/8000,tcp/9000-9005")
    assert result.subject == "CN=openssl client"
    # and revoking it through sknock-ca's CRL works for a serial sknock-ca never saw
    crl = authority.write_crl()
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is None


def test_openssl_accepts_sknock_ca_output(tmp_path: Path, authority: ca_lib.CertificateAuthority) -> None:
    d = authority.directory
    authority.issue_client("alice", parse_ports("tcp/22,udp/8000"), PASSWORD)
    authority.issue_client("mallory", parse_ports("tcp/22"), PASSWORD)
    authority.revoke("mallory")
    for name in ("alice", "mallory"):
        creds = load_client_pfx(d / "client" / f"{name}.pfx", PASSWORD)
        (tmp_path / f"{name}.pem").write_bytes(creds.certificate.public_bytes(serialization.Encoding.PEM))
    text = openssl("x509", "-in", "alice.pem", "-noout", "-text", cwd=tmp_path)
    assert "1.3.6.1.4.1.19518" in text and "0.8000,1.22" in text
    out = openssl("verify", "-CAfile", str(d / "ca.pem"), "-purpose", "sslclient", "alice.pem", cwd=tmp_path)
    assert "alice.pem: OK" in out
    out = openssl(
        "verify", "-crl_check", "-CAfile", str(d / "ca.pem"), "-CRLfile", str(d / "crl.pem"), "alice.pem", cwd=tmp_path
    )
    assert "OK" in out
    proc = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(d / "ca.pem"),
            "-CRLfile",
            str(d / "crl.pem"),
            "mallory.pem",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "revoked" in (proc.stdout + proc.stderr)
    out = openssl("crl", "-in", str(d / "crl.pem"), "-CAfile", str(d / "ca.pem"), "-noout", cwd=tmp_path)
    assert "verify OK" in out
    # and sknock reads the CRL OpenSSL just checked
    assert load_crl((d / "crl.pem").read_bytes(), [authority.certificate], source="crl.pem") is not None
