"""Revocation ends access, on the real server (issue 9 §2): a refreshed CRL that revokes a client closes
its open grants at once, and the operator can close grants by hand (``sknock-server close``)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from sknock.fileio import write_atomic
from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import ENV, PY
from tests.test_server_crl import Knocker, OwnCA, _server, own_ca  # noqa: F401 -- own_ca is a fixture

pytestmark = pytest.mark.root


def test_a_crl_that_revokes_a_client_closes_its_grant_at_once(pki: TestPKI, own_ca: OwnCA) -> None:  # noqa: F811
    require_netns()
    crl_file = own_ca.folder / "state" / "crl.der"
    write_atomic(crl_file, own_ca.crl_bytes)
    with TestNet.create("skv") as net, _server(net, pki, own_ca, crlFile=str(crl_file)) as server:
        k = Knocker(net, server, own_ca)
        k.granted("carol", 2005)  # open for 60 s
        k.granted("dave", 2006)
        own_ca.ca.revoke("carol")
        write_atomic(crl_file, own_ca.crl_bytes)
        mark = server.mark()
        revoked_at = time.monotonic()
        server.process.send_signal(signal.SIGHUP)
        text = server.wait_log(f"closed tcp/2005 for {net.client.ipv4} (CN=carol)", since=mark)
        assert time.monotonic() - revoked_at < 2
        line = next(line for line in text.splitlines() if "(CN=carol)" in line)
        assert "WARNING" in line and "revoked by the new CRL" in line
        assert not server.reachable(2005)
        assert server.reachable(2006)  # dave is not revoked
        assert [g["client"] for g in server.status()["grants"]] == ["CN=dave"]
        k.revoked("carol", 2007)


def test_the_operator_closes_grants_by_hand(pki: TestPKI, own_ca: OwnCA) -> None:  # noqa: F811
    require_netns()
    crl_file = own_ca.folder / "state" / "crl.der"
    write_atomic(crl_file, own_ca.crl_bytes)
    with TestNet.create("skw") as net, _server(net, pki, own_ca, crlFile=str(crl_file)) as server:
        k = Knocker(net, server, own_ca)
        k.granted("dave", 2005)
        k.granted("carol", 2006)
        serial = next(g["serial"] for g in server.status()["grants"] if g["client"] == "CN=carol")

        def close(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([PY, "-m", "sknock.cli.server", "-c", str(server.config), "close", *args],
                                  capture_output=True, text=True, env=ENV, timeout=30)

        done = close("--client", "dave")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["closed 1 grant(s)", f"  tcp/2005 for {net.client.ipv4} (CN=dave)"]
        assert not server.reachable(2005) and server.reachable(2006)
        assert close("--serial", hex(serial)).stdout.startswith("closed 1 grant(s)")
        assert not server.reachable(2006)
        assert close("--address", net.client.ipv4).stdout.startswith("closed 0 grant(s)")
        wrong = close("--client", "dave", "--address", net.client.ipv4)
        assert wrong.returncode == 2 and "exactly one of" in wrong.stderr
        assert server.log_text().count("closed by the operator") == 2
        assert server.status()["grants"] == []
