"""The real server's CRL: fetched over HTTP from inside its namespace, refreshed on SIGHUP, stored
atomically, never replaced by a bad one; without crlUrl, crlFile itself is re-read on SIGHUP.

Each test has its own CA (revoking is permanent, and the session ``pki`` is shared)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from sknock import ca as ca_lib
from sknock.fileio import write_atomic
from sknock.ports import parse_ports
from tests.netns import TestNet, require_netns
from tests.pki import PASSWORD_BYTES, TestPKI, at
from tests.server_harness import METRICS, PY, RunningServer, client_script, run_in_client
from tests.server_harness import wait_for_metrics as wait_for

pytestmark = pytest.mark.root


@dataclass
class OwnCA:
    ca: ca_lib.CertificateAuthority
    folder: Path  # world-readable: the worker runs as nobody
    server_pfx: Path
    server_cer: Path

    def client(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(pfx=self.ca.directory / "client" / f"{name}.pfx")

    @property
    def crl_bytes(self) -> bytes:
        return (self.ca.directory / "crl.der").read_bytes()


@pytest.fixture
def own_ca() -> Iterator[OwnCA]:
    folder = Path(tempfile.mkdtemp(prefix="sknock-crl-"))
    folder.chmod(0o755)
    try:
        # The same name as the session pki's stranger CA, so its CRL differs only by the signature.  Its clock
        # stands still: every CRL it signs has one thisUpdate (whole seconds), as when an admin revokes within
        # a second of the last CRL, so only the CRL number tells them apart -- whatever the machine's speed.
        authority = ca_lib.init_ca(folder / "ca", PASSWORD_BYTES, name="sknock Test Root CA", clock=at(time.time()))
        authority.issue_server("crlsrv", PASSWORD_BYTES)
        for name in ("carol", "dave"):
            authority.issue_client(name, parse_ports("tcp/2005-2009"), PASSWORD_BYTES)
        pfx = folder / "server.pfx"
        shutil.copy(authority.directory / "server" / "crlsrv.pfx", pfx)
        pfx.chmod(0o644)
        (folder / "state").mkdir(mode=0o755)
        yield OwnCA(authority, folder, pfx, authority.directory / "server" / "crlsrv.cer")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class CrlSite:
    """An http.server on 127.0.0.1 inside the server namespace, serving one file, crl.der."""

    def __init__(self, net: TestNet, folder: Path) -> None:
        self.net = net
        self.folder = folder
        self.folder.mkdir(mode=0o755)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def publish(self, data: bytes) -> None:
        """Serve ``data`` from now on, replaced atomically as a CA's web server would have it.  Its
        Last-Modified has whole seconds and the steps follow each other within seconds: the CRL fetcher must
        not let that hide a change (it sends no If-Modified-Since from within a minute of the Date)."""
        write_atomic(self.folder / "crl.der", data)

    def start(self) -> None:
        code = (
            "import functools, http.server\n"
            f"handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory={str(self.folder)!r})\n"
            "server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)\n"
            "print(server.server_address[1], flush=True)\n"
            "server.serve_forever()\n"
        )
        self.process = self.net.server.popen(PY, "-c", code, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/crl.der"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@dataclass
class Knocker:
    net: TestNet
    server: RunningServer
    own: OwnCA

    def mark(self) -> int:
        return self.server.mark()

    def wait_new(self, mark: int, needle: str, timeout: float = 15) -> str:
        """Wait until ``needle`` appears in the log after ``mark``; return that part of the log."""
        return self.server.wait_log(needle, timeout=timeout, since=mark)

    def knock(self, name: str, port: int) -> None:
        body = (
            f"d = c.build_knock([(Protocol.TCP, {port})], now=time.time())\n"
            "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
            f"    s.sendto(d, ({self.net.server.ipv4!r}, 40000))\n"
        )
        result = run_in_client(self.net, client_script(self.own.client(name), self.own.server_cer, body))
        assert result.returncode == 0, result.stderr

    def granted(self, name: str, port: int) -> None:
        mark = self.mark()
        self.knock(name, port)
        self.wait_new(mark, f"granted tcp/{port} to {self.net.client.ipv4} (")
        assert self.server.reachable(port)

    def revoked(self, name: str, port: int) -> None:
        mark = self.mark()
        self.knock(name, port)
        text = self.wait_new(mark, f"refused knock from {self.net.client.ipv4}: cert-revoked")
        assert f"CN={name}" in text
        assert not self.server.reachable(port)

    def sighup(self, needle: str) -> str:
        """SIGHUP the server (its monitor); wait for ``needle`` from the refresh it causes, and check it
        is logged once (by the monitor or the CRL fetcher), not once per worker."""
        mark = self.mark()
        self.server.process.send_signal(signal.SIGHUP)
        self.wait_new(mark, "SIGHUP: ")
        text = self.wait_new(mark, needle)
        time.sleep(0.3)  # a second copy of the line, if any, would be written by now
        text = self.server.log_text()[mark:]
        assert text.count(needle) == 1, f"{needle!r} logged {text.count(needle)} times:\n{text}"
        return text


def _server(net: TestNet, pki: TestPKI, own: OwnCA, **options: str) -> RunningServer:
    server = RunningServer.start(
        net, pki, serverPFXFile=str(own.server_pfx), firewallPolicy="reject", protectedPorts="tcp/2005-2009",
        PORT_OPEN_DURATION_IN_SECONDS="60", **options,  # type: ignore[arg-type]
    )
    for port in range(2005, 2010):
        server.serve_tcp(port)
    return server


def test_crl_from_a_url_refreshed_on_sighup(pki: TestPKI, own_ca: OwnCA) -> None:
    require_netns()
    crl_file = own_ca.folder / "state" / "crl.der"  # absent: the first fetch writes it
    with TestNet.create("skc") as net:
        web = CrlSite(net, own_ca.folder / "www")
        try:
            first = own_ca.crl_bytes
            web.publish(first)
            web.start()
            with _server(net, pki, own_ca, crlFile=str(crl_file), crlUrl=web.url, metricsListen=METRICS) as server:
                k = Knocker(net, server, own_ca)
                server.wait_log(f"CRL updated from {web.url} into {crl_file}")
                assert crl_file.read_bytes() == first
                assert (crl_file.stat().st_mode & 0o777) == 0o644

                assert not server.reachable(2005)
                k.granted("carol", 2005)

                # Revoked at the CA and published; until the server refreshes it does not know.
                own_ca.ca.revoke("carol")
                revoked = own_ca.crl_bytes
                web.publish(revoked)
                k.granted("carol", 2006)
                inode = crl_file.stat().st_ino
                text = k.sighup("using the new CRL")
                assert text.count(f"CRL updated from {web.url} into {crl_file}") == 1
                # From that refresh on, carol is refused; dave is not.
                k.revoked("carol", 2007)
                k.granted("dave", 2008)
                # Stored atomically: a new file renamed over the old one, the bytes served, no temp file left.
                assert crl_file.read_bytes() == revoked
                assert crl_file.stat().st_ino != inode
                assert sorted(p.name for p in crl_file.parent.iterdir()) == ["crl.der"]

                # A CRL signed by another CA with the same name (wrong signature) is refused; the last
                # good one is kept, in memory and on disk.
                web.publish((pki.stranger_ca.directory / "crl.der").read_bytes())
                text = k.sighup("keeping the last good CRL")
                assert f"refused CRL from {web.url}" in text and "signature does not verify" in text, text
                assert "CRL updated" not in text
                assert crl_file.read_bytes() == revoked
                k.revoked("carol", 2009)

                # An older CRL of the right CA (before the revocation) must not un-revoke carol.
                web.publish(first)
                text = k.sighup("keeping the last good CRL")
                assert "an older CRL could un-revoke keys" in text
                assert crl_file.read_bytes() == revoked
                k.revoked("carol", 2009)

                # The CRL site goes away: the server keeps running on the last good CRL.
                web.stop()
                text = k.sighup("keeping the last good CRL")
                assert f"cannot fetch CRL from {web.url}" in text
                assert server.process.poll() is None
                assert crl_file.read_bytes() == revoked
                k.revoked("carol", 2009)
                k.granted("dave", 2009)
                # Every download counted as the fetcher found it: the first and the SIGHUP's new CRL, then
                # the wrong signature, the older CRL and the site gone.
                refreshes = 'sknock_crl_refresh_total{{result="{}"}}'
                wait_for(net, {refreshes.format("updated"): 2.0, refreshes.format("unchanged"): 0.0,
                               refreshes.format("failed"): 3.0}, listen=METRICS)
                assert server.stop() == 0
        finally:
            web.stop()


def test_without_crl_url_crl_file_is_reread_on_sighup(pki: TestPKI, own_ca: OwnCA) -> None:
    require_netns()
    crl_file = own_ca.folder / "state" / "crl.der"
    write_atomic(crl_file, own_ca.crl_bytes)
    with TestNet.create("skf") as net, _server(net, pki, own_ca, crlFile=str(crl_file)) as server:
        k = Knocker(net, server, own_ca)
        k.granted("carol", 2005)
        own_ca.ca.revoke("carol")
        k.granted("carol", 2006)  # not re-read yet
        # The admin publishes the new CRL file (atomically, world-readable) and sends SIGHUP.
        write_atomic(crl_file, own_ca.crl_bytes)
        text = k.sighup("using the new CRL")
        assert f"CRL updated from {crl_file} into {crl_file}" in text
        k.revoked("carol", 2007)
        k.granted("dave", 2008)
        # A broken file is refused and the last good CRL kept.
        write_atomic(crl_file, b"not a CRL")
        text = k.sighup("keeping the last good CRL")
        assert f"refused CRL from {crl_file}" in text
        k.revoked("carol", 2009)
        assert server.process.poll() is None


@dataclass
class TwoLevelCA:
    """A root kept offline and an issuing intermediate, as ``sknock-ca intermediate --out`` makes them;
    the server's .pfx is issued by the intermediate and carries it and the root."""

    root: ca_lib.CertificateAuthority
    issuing: ca_lib.CertificateAuthority
    folder: Path
    server_pfx: Path
    server_cer: Path

    def client(self, name: str) -> SimpleNamespace:
        for authority in (self.issuing, self.root):
            pfx = authority.directory / "client" / f"{name}.pfx"
            if pfx.exists():
                return SimpleNamespace(pfx=pfx)
        raise KeyError(name)


@pytest.fixture
def two_level() -> Iterator[TwoLevelCA]:
    folder = Path(tempfile.mkdtemp(prefix="sknock-crl2-"))
    folder.chmod(0o755)
    try:
        root = ca_lib.init_ca(folder / "root", PASSWORD_BYTES, name="sknock E2E Root")
        issuing = root.issue_intermediate("issuing", b"issuing password", out=folder / "issuing")
        issuing.issue_server("gw", PASSWORD_BYTES)
        for name in ("carol", "dave"):
            issuing.issue_client(name, parse_ports("tcp/2005-2009"), PASSWORD_BYTES)
        root.issue_client("erin", parse_ports("tcp/2005-2009"), PASSWORD_BYTES)  # issued by the root itself
        pfx = folder / "server.pfx"
        shutil.copy(issuing.directory / "server" / "gw.pfx", pfx)
        pfx.chmod(0o644)
        (folder / "state").mkdir(mode=0o755)
        yield TwoLevelCA(root, issuing, folder, pfx, issuing.directory / "server" / "gw.cer")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_revoked_intermediate_refuses_every_client_under_it(pki: TestPKI, two_level: TwoLevelCA) -> None:
    """crlFile lists the root's CRL (a file the admin copies, re-read on SIGHUP) and the intermediate's
    (fetched from a URL); each is verified against its own CA, and the workers get both."""
    require_netns()
    own = two_level
    root_file = own.folder / "state" / "root.crl"
    issuing_file = own.folder / "state" / "issuing.crl"  # absent: the first fetch writes it
    write_atomic(root_file, (own.root.directory / "crl.der").read_bytes())
    with TestNet.create("ski") as net:
        web = CrlSite(net, own.folder / "www")
        try:
            web.publish((own.issuing.directory / "crl.der").read_bytes())
            web.start()
            with _server(net, pki, own, crlFile=f"{root_file}, {issuing_file}",  # type: ignore[arg-type]
                         crlUrl=f", {web.url}") as server:
                k = Knocker(net, server, own)  # type: ignore[arg-type]
                # at the start only the root's CRL is in hand: said, and the intermediate's clients wait
                server.wait_log(f"no CRL yet from {web.url}: every client whose chain passes through a CA without "
                                "a CRL (now: CN=issuing) is refused until a valid CRL arrives")
                server.wait_log(f"CRL updated from {web.url} into {issuing_file}", timeout=20)
                server.wait_log("using the new CRL of CN=issuing")
                status = server.status()
                assert [c["issuer"] for c in status["crls"]] == ["CN=sknock E2E Root", "CN=issuing"]
                assert status["revocation"] == "crl"

                k.granted("carol", 2005)
                k.granted("erin", 2006)

                # The intermediate revokes dave and publishes its CRL: the fetcher brings it.
                own.issuing.revoke("dave")
                web.publish((own.issuing.directory / "crl.der").read_bytes())
                k.sighup("using the new CRL of CN=issuing")
                k.revoked("dave", 2007)
                k.granted("carol", 2007)

                # The root's CRL from the intermediate's URL is another CA's CRL: refused, the last good kept.
                web.publish((own.root.directory / "crl.der").read_bytes())
                text = k.sighup("keeping the last good CRL")
                assert "this source serves the CRL of CN=issuing" in text
                k.revoked("dave", 2008)

                # The root's key revokes the intermediate; the admin copies the root's CRL and sends SIGHUP.
                own.root.revoke("issuing")
                write_atomic(root_file, (own.root.directory / "crl.der").read_bytes())
                text = k.sighup("using the new CRL of CN=sknock E2E Root")
                # revocation ends access: carol's open grants (issued under the intermediate) close at once
                for port in (2005, 2007):
                    assert f"closed tcp/{port} for {net.client.ipv4} (CN=carol)" in server.wait_log(
                        f"closed tcp/{port} for {net.client.ipv4} (CN=carol)")
                    assert not server.reachable(port)
                assert server.reachable(2006)  # erin's, from the root itself, stays
                refused = f"refused knock from {net.client.ipv4}: cert-revoked: intermediate CA CN=issuing"
                for name, port in (("carol", 2008), ("dave", 2009), ("carol", 2009)):
                    mark = k.mark()
                    k.knock(name, port)
                    needle = refused if name == "carol" else f"{net.client.ipv4}: cert-revoked"
                    text = k.wait_new(mark, needle)
                    assert "granted" not in text, text
                    assert not server.reachable(port)
                # a client the root issued itself is not under the intermediate: still let in
                k.granted("erin", 2009)
                assert server.stop() == 0
        finally:
            web.stop()
