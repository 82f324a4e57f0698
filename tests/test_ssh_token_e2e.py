"""Issue 12's whole path in one test: a named server in the client configuration file whose key is on a
PKCS#11 token (SoftHSM2: the key made on the token, its certificate issued by ``sknock-ca --csr``), and
``ssh NAME`` reaching a shell through a port the real knock server keeps closed (nftables, drop), with
``sknock-knock ssh-proxy`` as the real OpenSSH's ProxyCommand."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import RunningServer
from tests.ssh_harness import running_sshd, ssh_available
from tests.test_token import SoftToken, _missing, issue_from_csr, token

__all__ = ["token"]  # the fixture
PORT = 2007
pytestmark = [pytest.mark.root, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


def test_ssh_name_reaches_a_shell_with_the_key_on_a_token(pki: TestPKI, token: SoftToken, tmp_path: Path) -> None:
    require_netns()
    reason = ssh_available()
    if reason:
        pytest.skip(reason)
    cer = issue_from_csr(pki, tmp_path, "tokssh", token.csr("tokssh"), f"tcp/{PORT}")
    with TestNet.create("skh") as net, RunningServer.start(
        net, pki, firewallPolicy="drop", protectedPorts=f"tcp/{PORT}"
    ) as server:
        ini = tmp_path / "client.ini"
        ini.write_text(
            f"[gw]\nhost = {net.server.ipv4}\nserverCert = {pki.server.cer}\ncredentials = {token.uri()}\n"
            f"clientCert = {cer}\npasswordFile = {token.pin_file}\n"
        )
        with running_sshd(net, tmp_path / "sshd", PORT, ini) as ssh:
            assert ssh.ssh("plain", "true").returncode == 255  # closed without the knock
            result = ssh.ssh("gw", "echo", "a shell", env={"SOFTHSM2_CONF": token.env["SOFTHSM2_CONF"]})
            assert result.returncode == 0, result.stderr
            assert result.stdout == "a shell\n"
            text = server.wait_log(f"granted tcp/{PORT}")
            assert "CN=tokssh" in text  # the token's key signed the knock
