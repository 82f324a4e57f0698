"""The real server with files only root may read (issue 9 §1), and one it must not start with (§3).

Every file the server is given -- config, PKCS#12, CA file, CRL, password file -- is 0600 in a 0700
folder owned by root, as operators keep /etc/sknock and as sknock-ca makes its own folder.  The server
starts (its workers run as nobody and open none of them), grants a valid knock, and after the CA revokes
the client and the new CRL is published (atomically, 0600) and the server gets SIGHUP, refuses the
revoked client and still grants the others.  ``--check-config`` says OK on the same files.

A client's PKCS#12 given as serverPFXFile stops a start: exit 2, one line, the firewall untouched."""

from __future__ import annotations

import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from sknock import ca as ca_lib
from sknock.fileio import write_atomic
from sknock.ports import parse_ports
from tests.netns import TestNet, require_netns
from tests.pki import PASSWORD_BYTES, TestPKI
from tests.server_harness import ENV, PY, REPO, RunningServer
from tests.test_server_crl import Knocker, OwnCA

pytestmark = pytest.mark.root


def root_only(path: Path) -> None:
    """``path`` and everything in it: owned by root, folders 0700, files 0600."""
    for item in [path, *path.rglob("*")]:
        mode = item.stat().st_mode
        assert item.stat().st_uid == 0, item
        assert stat.S_IMODE(mode) == (0o700 if stat.S_ISDIR(mode) else 0o600), (item, oct(mode))


@pytest.fixture
def private_ca() -> Iterator[OwnCA]:
    """A CA, a server and two clients, in folders only root may enter; the server's files in ``etc``."""
    folder = Path(tempfile.mkdtemp(prefix="sknock-rootonly-"))
    folder.chmod(0o700)
    try:
        authority = ca_lib.init_ca(folder / "ca", PASSWORD_BYTES, name="sknock root-only CA")
        authority.issue_server("private-srv", PASSWORD_BYTES)
        for name in ("carol", "dave"):
            authority.issue_client(name, parse_ports("tcp/2005-2009"), PASSWORD_BYTES)
        etc = folder / "etc"
        etc.mkdir(mode=0o700)
        shutil.copy(authority.directory / "server" / "private-srv.pfx", etc / "server.pfx")
        write_atomic(etc / "ca.pem", authority.certificate.public_bytes(Encoding.PEM), 0o600)
        write_atomic(etc / "crl.der", (authority.directory / "crl.der").read_bytes(), 0o600)
        (etc / "server.pfx").chmod(0o600)
        yield OwnCA(authority, etc, etc / "server.pfx", authority.directory / "server" / "private-srv.cer")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_root_only_files_grant_and_a_published_revocation_ends_access(pki: TestPKI, private_ca: OwnCA) -> None:
    require_netns()
    etc = private_ca.folder
    crl_file = etc / "crl.der"
    with TestNet.create("skro") as net, RunningServer.start(
        net, pki, private=True, serverPFXFile=str(private_ca.server_pfx), caFile=str(etc / "ca.pem"),
        crlFile=str(crl_file), firewallPolicy="reject", protectedPorts="tcp/2005-2009",
        PORT_OPEN_DURATION_IN_SECONDS="60",
    ) as server:
        root_only(etc)
        for name in ("config.ini", "pfx.pass"):
            root_only(server.folder / name)
        assert stat.S_IMODE(server.folder.stat().st_mode) == 0o700
        assert "PFXPasswdFile = pfx.pass" in server.config.read_text()
        for port in range(2005, 2010):
            server.serve_tcp(port)

        check = subprocess.run(net.server.cmd(PY, str(REPO / "server" / "knock-server.py"), "-c", str(server.config),
                                              "--check-config"), capture_output=True, text=True, env=ENV, timeout=60)
        assert check.returncode == 0, check.stderr
        assert "configuration OK" in check.stdout

        k = Knocker(net, server, private_ca)
        assert not server.reachable(2005)
        k.granted("carol", 2005)

        private_ca.ca.revoke("carol")
        write_atomic(crl_file, private_ca.crl_bytes, 0o600)  # published atomically, root-only
        root_only(etc)
        k.sighup("using the new CRL")
        k.revoked("carol", 2006)
        k.granted("dave", 2007)
        assert "crl-unavailable" not in server.log_text()
        assert server.process.poll() is None


def test_a_clients_pfx_as_server_pfx_stops_the_start(pki: TestPKI) -> None:
    require_netns()
    with TestNet.create("skrc") as net:
        before = net.server.run("nft", "list", "ruleset").stdout
        folder = Path(tempfile.mkdtemp(prefix="sknock-clientpfx-"))
        try:
            folder.chmod(0o700)
            alice = folder / "alice.pfx"
            shutil.copy(pki.alice.pfx, alice)
            with RunningServer.start(net, pki, wait=False, private=True, serverPFXFile=str(alice),
                                     protectedPorts="tcp/2005") as server:
                assert server.process.wait(30) == 2
                lines = server.log_text().strip().splitlines()
                assert lines == [f"sknock-server: server PKCS#12 {alice}: CN=alice is not a server certificate: its "
                                 "EKU has clientAuth but not serverAuth: it is a client's certificate"], lines
                assert server.nft_ruleset() == before
                assert not server.control_socket.exists()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
