"""Interoperability with OpenSSL, the original sKnock's CA tooling.

A client certificate made by ``openssl req`` + ``openssl x509`` with the original's config line
(``otherName.1=1.3.6.1.4.1.19518;UTF8:...``), signed with the key of a CA made by sknock-ca,
must verify with the right ports; and OpenSSL must accept what sknock-ca issues.

The two-level hierarchy of docs/pki.md (a root, an issuing intermediate, a client, a server and both
CRLs, all made with ``openssl``) is built by running the files and commands of the docs exactly as
written; then the daemon's own ``prepare`` loads the docs' config.ini, its verifier grants the client's
knock, and the docs' revocation commands make it refuse (the client, or every client of the intermediate).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sknock import ca as ca_lib
from sknock.certificate import authorized_ports
from sknock.client import KnockClient
from sknock.credentials import load_certificate, load_client_pfx, resolve_password
from sknock.errors import KnockRefused, Reason
from sknock.ports import Protocol, parse_ports
from sknock.server.config import load_config
from sknock.server.daemon import prepare
from sknock.trust import ClientVerifier, load_crl
from sknock.verifier import Grant

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

PASSWORD = b"interop-pw"
REPO = Path(__file__).resolve().parents[1]

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


# -- the two-level hierarchy of docs/pki.md, made with the openssl command alone ---------------------------

RECIPE = re.compile(r"<!-- recipe: (\S+) -->\n```\w*\n(.*?)```", re.S)
SOURCE = ipaddress.ip_address("198.18.0.2")


def _recipe() -> dict[str, str]:
    blocks = dict(RECIPE.findall((REPO / "docs" / "pki.md").read_text()))
    assert set(blocks) == {"root.cnf", "issuing.cnf", "make", "config.ini", "revoke-client", "revoke-intermediate"}
    return blocks


def _sh(script: str, cwd: Path) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{script}\n{proc.stdout}\n{proc.stderr}"


def _knock(folder: Path) -> Grant:
    """alice's knock for tcp/22, checked by the verifier the daemon builds from the docs' config.ini."""
    server = prepare(load_config(_config(folder)))
    client = KnockClient(client_pfx=folder / "alice.pfx", pfx_password=resolve_password(folder / "alice.pw"),
                         server_cert=folder / "gw1.cer")
    now = time.time()
    return server.verifier().check(client.build_knock([(Protocol.TCP, 22)], now=now), SOURCE, now)


@pytest.fixture(scope="module")
def two_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("openssl-two-level")
    blocks = _recipe()
    for name in ("root.cnf", "issuing.cnf"):
        (folder / name).write_text(blocks[name])
    _sh(blocks["make"], folder)
    return folder


def test_the_docs_two_level_recipe_makes_a_hierarchy_the_server_accepts(two_level: Path) -> None:
    server = prepare(load_config(_config(two_level)))
    assert [c.subject.rfc4514_string() for c in server.roots] == ["CN=Example Root CA"]
    assert [c.subject.rfc4514_string() for c in server.intermediates] == ["CN=Example Issuing CA"]
    assert len(server.crls_in_hand()) == 2
    grant = _knock(two_level)
    assert grant.client == "CN=alice" and grant.ports == ((Protocol.TCP, 22),) and grant.address == SOURCE
    client = load_client_pfx(two_level / "alice.pfx", resolve_password(two_level / "alice.pw"))
    assert authorized_ports(client.certificate) == parse_ports("tcp/22,udp/8000")


@pytest.mark.parametrize(("block", "what"), [("revoke-client", "client certificate CN=alice"),
                                             ("revoke-intermediate", "intermediate CA CN=Example Issuing CA")])
def test_the_docs_revocations_refuse(two_level: Path, tmp_path: Path, block: str, what: str) -> None:
    folder = tmp_path / "pki"
    shutil.copytree(two_level, folder)
    _knock(folder)  # granted before
    _sh(_recipe()[block], folder)
    with pytest.raises(KnockRefused, match=f"{what} .* is revoked") as info:
        _knock(folder)
    assert info.value.reason is Reason.CERT_REVOKED


def _config(folder: Path) -> Path:
    """The docs' server config, with a firewall backend that needs no probing of this host: prepare() only
    builds it, and the verifier is what is checked here."""
    config = folder / "config.ini"
    config.write_text(_recipe()["config.ini"] + "firewallBackend = command\nopenCommand = true %IP%\n"
                      "closeCommand = true %IP%\nuser = nobody\n")  # the test machine may have no sknock user
    return config
