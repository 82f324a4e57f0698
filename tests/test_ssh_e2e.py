"""End to end with the real OpenSSH: ``ssh -F cfg NAME true`` through a port closed by the real knock
server (nftables, ``firewallPolicy = drop``), with ``sknock-knock ssh-proxy`` as the ProxyCommand.

* with ``ProxyUseFdpass yes`` (the connected socket is passed to ssh) and without it (relayed), over
  IPv4, and over IPv6 (the knock's address family is the connection's);
* behind a ControlMaster with ControlPersist: only the first login knocks;
* plain ssh without the proxy does not get through (ConnectTimeout, quickly);
* a named server that does not exist: one line on stderr from the proxy, ssh fails, nothing is knocked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import PASSWORD, TestPKI
from tests.server_harness import RunningServer
from tests.ssh_harness import SshSetup, client_ini, running_sshd, ssh_available

PORT = 2006  # in alice's tcp/2000-2010
pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SshSetup, RunningServer]]:
    require_netns()
    reason = ssh_available()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("ssh")
    folder.chmod(0o755)
    (folder / "pfx.pass").write_text(PASSWORD + "\n")
    with TestNet.create("sks") as net, RunningServer.start(
        net, pki, firewallPolicy="drop", protectedPorts=f"tcp/{PORT}", PORT_OPEN_DURATION_IN_SECONDS="5"
    ) as server:
        ini = client_ini(
            folder / "client.ini", pfx=pki.alice.pfx, password_file=folder / "pfx.pass", server_cer=pki.server.cer,
            host=net.server.ipv4,
        )
        with running_sshd(net, folder / "sshd", PORT, ini) as ssh:
            yield ssh, server


def grants(server: RunningServer, since: int) -> int:
    return server.log_text()[since:].count(f"granted tcp/{PORT}")


def test_plain_ssh_does_not_get_through(lab: tuple[SshSetup, RunningServer]) -> None:
    ssh, server = lab
    started = time.monotonic()
    result = ssh.ssh("plain", "true")
    assert result.returncode == 255, result
    assert "timed out" in result.stderr, result.stderr
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("host", ["gw", "gwrelay", "gw6"])
def test_ssh_through_the_knock(lab: tuple[SshSetup, RunningServer], host: str) -> None:
    ssh, server = lab
    mark = server.mark()
    result = ssh.ssh(host, "echo", "logged-in")
    assert result.returncode == 0, result
    assert result.stdout == "logged-in\n"
    assert result.stderr == ""  # the proxy wrote nothing but the connection
    assert grants(server, mark) >= 1
    if host == "gw6":  # knocked over IPv6 too: the grant is for the client's IPv6 address
        assert ssh.net.client.ipv6 in server.log_text()[mark:]


def test_a_control_master_knocks_only_for_a_new_connection(lab: tuple[SshSetup, RunningServer]) -> None:
    ssh, server = lab
    mark = server.mark()
    assert ssh.ssh("gwmux", "true").returncode == 0
    server.wait_log(f"granted tcp/{PORT}", since=mark)
    first = grants(server, mark)
    for _ in range(2):
        result = ssh.ssh("gwmux", "true")
        assert result.returncode == 0, result
    assert ssh.ssh("gwmux", "-O", "check").returncode == 0
    time.sleep(0.5)  # a knock, had one been sent, would be granted within milliseconds
    assert grants(server, mark) == first


def test_an_unknown_named_server_is_one_line_and_no_knock(lab: tuple[SshSetup, RunningServer]) -> None:
    ssh, server = lab
    mark = server.mark()
    result = ssh.ssh("nosuch", "true")
    assert result.returncode == 255
    lines = [line for line in result.stderr.splitlines() if "sknock-knock" in line]
    assert lines == [
        "sknock-knock ssh-proxy: error: no server named 'nosuch' or 'nosuch.invalid' in "
        f"{ssh.folder.parent / 'client.ini'}"
    ], result.stderr
    assert grants(server, mark) == 0
