"""The original sKnock's dev PKI on the real server: ``revocation = none``, and only when asked for.

The original sKnock never published a CRL for its dev PKI (../shared/compat/sknock-v1-devpki), so the
server can only run with it when revocation is turned off explicitly.  Then ``python
server/knock-server.py`` with devserver.pfx grants ``client/knock-client.py -p 2000`` with devclient.pfx,
end to end: the real server, the real client script, nftables in network namespaces.  Without it, no CRL
is still an error.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import ENV, PY, REPO, RunningServer

DEVPKI = REPO.parent / "shared" / "compat" / "sknock-v1-devpki"
PASSWORD = "portknocking"  # the dev PKI's, from its README
EXPIRY = dt.datetime(2027, 6, 25, tzinfo=dt.UTC)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not DEVPKI.is_dir(), reason=f"no sKnock v1 dev PKI at {DEVPKI} (../shared absent)"),
    pytest.mark.skipif(dt.datetime.now(dt.UTC) >= EXPIRY, reason="the sKnock v1 dev certificates expired 2027-06-25"),
]

NO_REVOCATION = "revocation = none: no CRL is checked"


def _dev_server(net: TestNet, pki: TestPKI, *, wait: bool = True, **options: str) -> RunningServer:
    return RunningServer.start(
        net, pki, wait=wait, serverPFXFile=str(DEVPKI / "devserver.pfx"), PFXPasswd=PASSWORD,
        crlFile="", firewallPolicy="drop", protectedPorts="tcp/2000,tcp/3000", **options,
    )


def test_revocation_none_lets_the_original_dev_pki_knock(pki: TestPKI, tmp_path: Path) -> None:
    require_netns()
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    with TestNet.create("skv") as net, _dev_server(net, pki, revocation="none") as server:
        # said at every start, as a WARNING
        text = server.wait_log(NO_REVOCATION)
        assert f"WARNING sknock.server: {NO_REVOCATION}" in text
        server.serve_tcp(2000)
        assert not server.reachable(2000)
        client = subprocess.run(
            net.client.cmd(PY, str(REPO / "client" / "knock-client.py"), "-p", "2000",
                           "--pfx", str(DEVPKI / "devclient.pfx"), "--server-cert", str(DEVPKI / "devserver.cer"),
                           "--password-file", str(password_file), net.server.ipv4),
            capture_output=True, text=True, env=ENV, timeout=60,
        )
        assert client.returncode == 0, (client.stdout, client.stderr)
        assert client.stdout == ""  # not a terminal: the status line goes to stderr
        assert client.stderr.strip() == f"tcp/2000 is open on {net.server.ipv4}"
        server.wait_log(f"granted tcp/2000 to {net.client.ipv4} (CN=sKnock Test Client")
        assert server.reachable(2000)
        assert not server.reachable(3000)  # only what was knocked for
        check = subprocess.run([PY, str(REPO / "server" / "knock-server.py"), "-c", str(server.config),
                                "--check-config"], capture_output=True, text=True, env=ENV, timeout=60)
        assert check.returncode == 0, check.stderr
        assert "revocation none: no CRL is checked" in check.stdout and NO_REVOCATION in check.stderr
        assert server.stop() == 0


def test_without_revocation_none_no_crl_is_still_an_error(pki: TestPKI) -> None:
    require_netns()
    with TestNet.create("skw") as net:
        server = _dev_server(net, pki, wait=False)
        try:
            assert server.process.wait(60) == 2
            lines = server.log_text().strip().splitlines()
            assert len(lines) == 1, lines
            assert lines[0].endswith(
                "crlFile: is required: the CRL of each CA (or revocation = none, for certificates that are never "
                "revoked)"
            ), lines[0]
            assert "table inet sknock" not in server.nft_ruleset()  # it stopped before changing anything
        finally:
            server.cleanup()
