"""``sknock-ca`` with a root kept offline and an issuing intermediate, as an admin runs it (subprocesses).

The root's key is used to create the intermediate, to revoke it and to sign the root's CRL, and for
nothing else: the intermediate's directory, with its own password, issues, revokes and signs its CRL
while the root's key is away.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sknock.credentials import load_certificate, load_client_pfx, load_server_pfx
from sknock.errors import CertificateError
from sknock.ports import parse_ports
from sknock.trust import ClientVerifier, load_crl, verify_server_certificate

REPO = Path(__file__).resolve().parents[1]


class Admin:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.issuing = tmp / "issuing"
        for name, secret in (("root.pw", "root-secret-1"), ("issuing.pw", "issuing-secret-2"), ("pfx.pw", "pfx-3")):
            (tmp / name).write_text(secret + "\n")

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SKNOCK_")}
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "sknock.cli.ca", *args], cwd=self.tmp, env=full_env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=120,
        )

    def ok(self, *args: str) -> str:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def fails(self, *args: str, match: str) -> str:
        proc = self.run(*args)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert match in lines[0], lines[0]
        return lines[0]

    def root_cmd(self, *args: str) -> list[str]:
        return ["--dir", str(self.root), "--password-file", str(self.tmp / "root.pw"), *args]

    def issuing_cmd(self, *args: str) -> list[str]:
        return ["--dir", str(self.issuing), "--password-file", str(self.tmp / "issuing.pw"),
                "--pfx-password-file", str(self.tmp / "pfx.pw"), *args]


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    a = Admin(tmp_path)
    a.ok(*a.root_cmd("init", "--name", "Example Root CA"))
    return a


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_root_offline_intermediate_issues_and_a_revoked_intermediate_refuses_its_clients(admin: Admin) -> None:
    out = admin.ok(*admin.root_cmd("intermediate", "issuing", "--out", str(admin.issuing),
                                   "--new-ca-password-file", str(admin.tmp / "issuing.pw")))
    assert f"in {admin.issuing}, under CN=Example Root CA" in out
    assert f"--dir {admin.issuing} client|server NAME" in out
    assert f"--dir {admin.root} revoke issuing" in out
    d = admin.issuing
    for name in ("ca.cer", "ca.pem", "ca-chain.pem", "crl.der", "crl.pem", "index.json"):
        assert (d / name).is_file(), name
    assert stat.S_IMODE((d / "private" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "private").stat().st_mode) == 0o700
    root = load_certificate(admin.root / "ca.cer")
    sub = load_certificate(d / "ca.cer")
    assert sub.issuer == root.subject and load_certificate(d / "ca-chain.pem") == root
    assert "intermediate" in admin.ok("--dir", str(admin.root), "list").split("issuing", 1)[1].splitlines()[0]

    # The root goes offline: its key leaves the machine.  The intermediate works on, with its own password.
    offline = admin.tmp / "offline-root-key"
    shutil.move(admin.root / "private", offline)
    admin.ok(*admin.issuing_cmd("client", "alice", "--allow", "tcp/22,udp/8000"))
    admin.ok(*admin.issuing_cmd("client", "mallory", "--allow", "tcp/22"))
    admin.ok(*admin.issuing_cmd("server", "gw1", "--ip", "198.18.0.1"))
    admin.ok(*admin.issuing_cmd("revoke", "mallory"))
    # ... and the root's password does not open it
    admin.fails("--dir", str(d), "--password-file", str(admin.tmp / "root.pw"), "crl", match="wrong password")

    alice = load_client_pfx(d / "client" / "alice.pfx", b"pfx-3")
    assert alice.ca_certificates == (sub, root)  # the chain a server or client needs, nearest first
    server = load_server_pfx(d / "server" / "gw1.pfx", b"pfx-3")
    assert server.ca_certificates == (sub, root)
    assert verify_server_certificate(server.certificate, alice.ca_certificates, _now()) == sub

    def verifier() -> ClientVerifier:
        crls = [load_crl((ca / "crl.der").read_bytes(), [root, sub], source=str(ca)) for ca in (admin.root, d)]
        return ClientVerifier([root], [sub], crls, require_crl=True)

    assert verifier().verify(alice.certificate, _now()).ports == parse_ports("tcp/22,udp/8000")
    mallory = load_client_pfx(d / "client" / "mallory.pfx", b"pfx-3")
    with pytest.raises(CertificateError, match="client certificate CN=mallory .* is revoked"):
        verifier().verify(mallory.certificate, _now())

    # The root's key comes back to revoke the intermediate: every client under it is refused.
    shutil.move(offline, admin.root / "private")
    out = admin.ok(*admin.root_cmd("revoke", "issuing", "--crl-days", "180"))
    assert "revoked issuing" in out
    root_crl = load_crl((admin.root / "crl.der").read_bytes(), [root], source="root crl")
    assert root_crl.get_revoked_certificate_by_serial_number(sub.serial_number) is not None
    assert root_crl.next_update_utc is not None and root_crl.next_update_utc > _now() + dt.timedelta(days=179)
    with pytest.raises(CertificateError, match="intermediate CA CN=issuing .* is revoked") as info:
        verifier().verify(alice.certificate, _now())
    assert info.value.reason == "cert-revoked"


def test_the_default_place_is_under_the_root_and_the_password_may_come_from_the_environment(admin: Admin) -> None:
    proc = admin.run(*admin.root_cmd("intermediate", "branch"), env={"SKNOCK_NEW_CA_PASSWORD": "branch-secret"})
    assert proc.returncode == 0, proc.stderr
    d = admin.root / "intermediate" / "branch"
    assert (d / "private" / "ca.key").is_file()
    proc = admin.run("--dir", str(d), "crl", env={"SKNOCK_PFX_PASSWORD": "branch-secret"})
    assert proc.returncode == 0 and "CRL with 0 revoked" in proc.stdout, proc.stderr


def test_refusals_are_one_line(admin: Admin) -> None:
    out = str(admin.issuing)
    # no password of its own, and no terminal to ask on
    admin.fails(*admin.root_cmd("intermediate", "issuing", "--out", out),
                match="the intermediate CA issuing needs its own password: give --new-ca-password-file")
    # the root's password is not the intermediate's
    admin.fails(*admin.root_cmd("intermediate", "issuing", "--out", out,
                                "--new-ca-password-file", str(admin.tmp / "root.pw")),
                match="needs a password of its own, not its parent's")
    assert not (admin.issuing / "ca.cer").exists()
    assert "issuing" not in admin.ok("--dir", str(admin.root), "list")
    # the root's own directory, or one that already holds a CA
    admin.fails(*admin.root_cmd("intermediate", "x", "--out", str(admin.root),
                                "--new-ca-password-file", str(admin.tmp / "issuing.pw")),
                match="is this CA's own directory")
    admin.ok(*admin.root_cmd("intermediate", "issuing", "--out", out,
                             "--new-ca-password-file", str(admin.tmp / "issuing.pw")))
    admin.fails(*admin.root_cmd("intermediate", "other", "--out", out,
                                "--new-ca-password-file", str(admin.tmp / "issuing.pw")),
                match="already holds a CA")
    admin.fails(*admin.root_cmd("intermediate", "issuing", "--out", str(admin.tmp / "again"),
                                "--new-ca-password-file", str(admin.tmp / "issuing.pw")),
                match="a certificate named 'issuing' already exists")
    # an issuing intermediate (pathLen 0) has no CA under it
    admin.fails(*admin.issuing_cmd("intermediate", "deeper", "--new-ca-password-file", str(admin.tmp / "pfx.pw")),
                match="may not have intermediate CAs under it")


def test_an_intermediate_never_outlives_its_root(tmp_path: Path) -> None:
    a = Admin(tmp_path)
    a.ok(*a.root_cmd("init", "--name", "Short Root", "--days", "30"))
    a.ok(*a.root_cmd("intermediate", "issuing", "--out", str(a.issuing), "--days", "3650",
                     "--new-ca-password-file", str(tmp_path / "issuing.pw")))
    root, sub = load_certificate(a.root / "ca.cer"), load_certificate(a.issuing / "ca.cer")
    assert sub.not_valid_after_utc <= root.not_valid_after_utc
    assert sub.not_valid_after_utc > _now() + dt.timedelta(days=29)
