"""Fail closed, end to end: no stop, crash, kill, second instance, firewall reload, failed close,
restart or slow CRL server opens a protected port (issue 8).

Every test runs the real server in a network namespace with the real kernel firewall, and the host
ruleset the docs recommend: the admin's own table accepts the protected port and lets sknock's table
decide, so a missing sknock table would show at once as a reachable port.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import ENV, PY, REPO, RunningServer, client_script, run_in_client

pytestmark = pytest.mark.root

PORT = 2005
ADMIN_TABLE = (
    "add table inet admin { chain input { type filter hook input priority 0; policy drop; "
    "ct state established,related accept; iif lo accept; "
    f"tcp dport {PORT} accept; udp dport 40000 accept; meta l4proto {{ icmp, ipv6-icmp }} accept; }}; }}"
)
SERVER_SCRIPT = str(REPO / "server" / "knock-server.py")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition``; return how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@contextmanager
def host(pki: TestPKI, prefix: str) -> Iterator[tuple[TestNet, str]]:
    """A test net whose server host has the admin's ruleset, and a second client address."""
    require_netns()
    with TestNet.create(prefix) as net:
        net.server.run("nft", ADMIN_TABLE)
        second = net.client.ipv4.rsplit(".", 1)[0] + ".3"
        net.client.run("ip", "addr", "add", f"{second}/24", "dev", net.client.ifname)
        yield net, second


def start(net: TestNet, pki: TestPKI, **options: str) -> RunningServer:
    values = {"firewallBackend": "nftables", "firewallPolicy": "drop", "protectedPorts": f"tcp/{PORT}",
              "emergencySSH": "no", "PORT_OPEN_DURATION_IN_SECONDS": "4", **options}
    server = RunningServer.start(net, pki, **values)
    server.serve_tcp(PORT)
    return server


def reachable(net: TestNet, source: str) -> bool:
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(1.0)\n"
        f"s.bind(({source!r}, 0))\n"
        f"try:\n    s.connect(({net.server.ipv4!r}, {PORT})); s.close()\n"
        "except OSError:\n    sys.exit(1)\n"
    )
    return net.client.run(PY, "-c", code, check=False, timeout=15).returncode == 0


def build_knock(net: TestNet, pki: TestPKI, **kw: object) -> bytes:
    """A knock datagram for tcp/PORT, built by alice's client in the client namespace."""
    args = "".join(f", {k}={v}" for k, v in kw.items())
    body = f"print(c.build_knock([(Protocol.TCP, {PORT})], now=time.time(){args}).hex())\n"
    result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
    assert result.returncode == 0, result.stderr
    return bytes.fromhex(result.stdout.strip())


def send(net: TestNet, datagram: bytes, source: str) -> None:
    code = (
        "import socket\n"
        "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
        f"    s.bind(({source!r}, 0)); s.sendto(bytes.fromhex({datagram.hex()!r}), ({net.server.ipv4!r}, 40000))\n"
    )
    net.client.run(PY, "-c", code, timeout=15)


def knock(net: TestNet, pki: TestPKI, server: RunningServer, source: str | None = None) -> bytes:
    source = source or net.client.ipv4
    datagram = build_knock(net, pki)
    mark = server.mark()
    send(net, datagram, source)
    server.wait_log(f"granted tcp/{PORT} to {source} (", since=mark)
    return datagram


def sknock_table(net: TestNet) -> str:
    return net.server.run("nft", "list", "table", "inet", "sknock", check=False).stdout


def table_handle(net: TestNet) -> int | None:
    listing = json.loads(net.server.run("nft", "-j", "list", "tables").stdout)["nftables"]
    handles = [e["table"]["handle"] for e in listing if "table" in e and e["table"]["name"] == "sknock"]
    return handles[0] if handles else None


def monitor_children(server: RunningServer) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" in f.read()
    except FileNotFoundError:
        return True


# -- 2: every stop is closed --------------------------------------------------------------------------


def policy_in_place(net: TestNet, backend: str) -> bool:
    if backend == "nftables":
        return "table inet sknock" in sknock_table(net)
    return "-A INPUT -j SKNOCK" in net.server.run("iptables-legacy-save", "-t", "filter").stdout


@pytest.mark.parametrize(
    ("backend", "how"),
    [("nftables", "SIGTERM"), ("nftables", "SIGINT"), ("nftables", "kill -9 of the monitor"),
     ("iptables", "SIGTERM"), ("iptables", "kill -9 of the monitor")],
)
def test_every_stop_leaves_the_port_closed_and_live_grants_end_on_time(pki: TestPKI, backend: str, how: str) -> None:
    with host(pki, "skfs") as (net, second):
        server = start(net, pki, firewallBackend=backend)
        with server:
            assert not reachable(net, net.client.ipv4)
            knock(net, pki, server)
            assert reachable(net, net.client.ipv4)
            granted = time.monotonic()
            workers = monitor_children(server)
            sig = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}.get(how, signal.SIGKILL)
            server.process.send_signal(sig)
            server.process.wait(15)
            for pid in workers:
                wait_for(lambda pid=pid: gone(pid), 5, f"worker {pid} ends with the monitor")  # type: ignore[misc]
            # the policy stayed: the unknocked address is refused; the live grant holds until its end
            assert policy_in_place(net, backend)
            assert not reachable(net, second)
            if time.monotonic() - granted < 3:
                assert reachable(net, net.client.ipv4)
            wait_for(lambda: not reachable(net, net.client.ipv4), 8, "the grant ends on time without the server")
            assert time.monotonic() - granted < 4 + 2
            assert not reachable(net, second) and policy_in_place(net, backend)
            if sig != signal.SIGKILL:
                assert "the firewall policy stays in place" in server.log_text()
            assert "firewall rules removed" not in server.log_text()


def test_a_killed_worker_is_replaced_and_the_policy_never_lifted(pki: TestPKI) -> None:
    with host(pki, "skfw") as (net, second), start(net, pki, workers="2") as server:
        table = table_handle(net)
        workers = monitor_children(server)
        assert len(workers) == 2
        mark = server.mark()

        os.kill(workers[0], signal.SIGKILL)
        server.wait_log("worker 1 has gone", since=mark)
        server.wait_log("worker ready", since=mark)
        assert not reachable(net, second) and not reachable(net, net.client.ipv4)
        assert table_handle(net) == table  # never replaced, never removed
        replaced = monitor_children(server)
        assert workers[0] not in replaced and workers[1] in replaced and len(replaced) == 2
        for _ in range(3):  # the new worker verifies knocks (both workers take packets: knock a few times)
            knock(net, pki, server)
        assert reachable(net, net.client.ipv4) and not reachable(net, second)
        assert server.process.poll() is None


# -- 3: a table that stays ------------------------------------------------------------------------------


def test_a_second_server_refuses_to_start_and_leaves_the_first_alone(pki: TestPKI) -> None:
    with host(pki, "skf2") as (net, second), start(net, pki, PORT_OPEN_DURATION_IN_SECONDS="30") as first:
        knock(net, pki, first)
        table = table_handle(net)
        before = net.server.run("nft", "-j", "list", "chain", "inet", "sknock", "input").stdout
        with RunningServer.start(net, pki, wait=False, firewallPolicy="reject", protectedPorts="tcp/22",
                                 emergencySSH="no") as again:
            assert again.process.wait(30) == 2
            lines = again.log_text().strip().splitlines()
            assert len(lines) == 1 and f"pid {first.process.pid}" in lines[0], lines
            assert "already running" in lines[0]
        assert table_handle(net) == table
        assert net.server.run("nft", "-j", "list", "chain", "inet", "sknock", "input").stdout == before
        assert reachable(net, net.client.ipv4) and not reachable(net, second)
        assert first.process.poll() is None and len(first.status()["grants"]) == 1


@pytest.mark.parametrize("change", ["nft flush ruleset", "nft delete table inet sknock"])
def test_a_removed_table_comes_back_with_its_grants_within_a_second(pki: TestPKI, change: str) -> None:
    with host(pki, "skfr") as (net, second), start(net, pki, PORT_OPEN_DURATION_IN_SECONDS="30") as server:
        knock(net, pki, server)
        mark = server.mark()
        net.server.run(*change.split())
        if change == "nft flush ruleset":
            net.server.run("nft", ADMIN_TABLE)  # the firewall service reloads the admin's rules
        took = wait_for(lambda: net.client.ipv4 in sknock_table(net), 3, "the table and its grant are back")
        assert took < 1.0, took
        server.wait_log("removed or changed by something else", since=mark)
        assert "ERROR" in next(line for line in server.log_text()[mark:].splitlines() if "something else" in line)
        assert reachable(net, net.client.ipv4) and not reachable(net, second)
        grant = server.status()["grants"][0]
        assert 20 < grant["expires_in"] <= 30


BY_HAND = {
    "nftables": lambda net, source: net.server.run(
        "nft", f"add element inet sknock grants4 {{ {source} . tcp . {PORT} }}"),  # no timeout: for good
    "iptables": lambda net, source: net.server.run(
        "iptables-legacy", "-I", "SKNOCK", "1", "-s", source, "-p", "tcp", "--dport", str(PORT), "-j", "ACCEPT"),
}


@pytest.mark.parametrize("backend", sorted(BY_HAND))
def test_an_entry_added_by_hand_is_removed_and_named_and_a_knocked_grant_stays(pki: TestPKI, backend: str) -> None:
    """Someone opens the protected port to an address that never knocked by editing sknock's own set or
    chain: it gets through until the server's next check at most, then it is refused, the log names
    what was removed at ERROR level; a grant a real knock made at the same time stays and works."""
    with host(pki, "skfh") as (net, second), start(net, pki, firewallBackend=backend,
                                                    PORT_OPEN_DURATION_IN_SECONDS="60") as server:
        assert not reachable(net, second)
        mark = server.mark()
        BY_HAND[backend](net, second)
        removed = f"removed {second}{'/32' if backend == 'iptables' else ''} -> tcp/{PORT}"
        # the hole is real until the check (unless the check came first: then it says so already)
        assert reachable(net, second) or removed in server.log_text()[mark:]
        knock(net, pki, server)  # a real knock, while the entry added by hand is there
        server.wait_log(removed, since=mark, timeout=15)
        assert not reachable(net, second)
        assert reachable(net, net.client.ipv4)  # the knocked grant was kept
        [line] = [line for line in server.log_text()[mark:].splitlines() if removed in line]
        assert "ERROR" in line and "not granted by a knock" in line
        [grant] = server.status()["grants"]
        assert grant["address"] == net.client.ipv4 and grant["expires_in"] > 30
        after = server.log_text()[mark:]
        assert "removed or changed by something else" not in after, after  # named, not restored
        if backend == "nftables":
            assert second not in sknock_table(net) and net.client.ipv4 in sknock_table(net)
        else:
            saved = net.server.run("iptables-legacy-save", "-t", "filter").stdout
            assert second not in saved and net.client.ipv4 in saved


# -- 4: closes that happen ------------------------------------------------------------------------------


def test_a_close_that_fails_is_retried_and_status_shows_it_overdue(pki: TestPKI, tmp_path: Path) -> None:
    require_netns()
    calls = tmp_path / "calls.txt"
    broken = tmp_path / "broken"
    broken.touch()
    script = tmp_path / "fw.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n'
        f'if [ "$1" = close ] && [ -e {shlex.quote(str(broken))} ]; then echo "table locked" >&2; exit 1; fi\n'
    )
    run = f"/bin/sh {shlex.quote(str(script))}"
    with TestNet.create("skfc") as net, RunningServer.start(
        net, pki, firewallBackend="command", firewallPolicy="none",
        PORT_OPEN_DURATION_IN_SECONDS="2",
        openCommand=f"{run} open %IP% %PROTO% %PORT%", closeCommand=f"{run} close %IP% %PROTO% %PORT%",
    ) as server:
        knock(net, pki, server)
        server.wait_log(f"could not close tcp/{PORT} for {net.client.ipv4}", timeout=10)
        [grant] = server.status()["grants"]
        assert grant["overdue"] is True and grant["close_failures"] >= 1 and grant["expires_in"] < 0
        assert "OVERDUE: close failed" in server.status_cli()
        server.wait_log("retried in 2 s", timeout=10)  # the backoff grows
        closes = calls.read_text().count("close ")
        assert closes >= 2
        broken.unlink()
        server.wait_log(f"closed tcp/{PORT} for {net.client.ipv4}: window ended", timeout=10)
        assert server.status()["grants"] == []


def test_a_command_backend_grant_left_by_a_killed_server_is_closed_by_the_next_start(
    pki: TestPKI, tmp_path: Path
) -> None:
    """The command backend cannot end grants by itself: the monitor records them in stateDir, so after a
    kill -9 the next start runs the close command at the grant's time."""
    require_netns()
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fw.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n')
    run = f"/bin/sh {shlex.quote(str(script))}"
    options = {
        "firewallBackend": "command", "firewallPolicy": "none", "protectedPorts": "all",
        "PORT_OPEN_DURATION_IN_SECONDS": "3", "stateDir": str(tmp_path / "state"),
        "openCommand": f"{run} open %IP% %PROTO% %PORT%", "closeCommand": f"{run} close %IP% %PROTO% %PORT%",
    }
    with TestNet.create("skfk") as net:
        with RunningServer.start(net, pki, **options) as server:
            knock(net, pki, server)
            opened = time.monotonic()
            server.stop(signal.SIGKILL)
        assert calls.read_text().splitlines() == [f"open {net.client.ipv4} tcp {PORT}"]  # nobody closed it
        with RunningServer.start(net, pki, **options) as again:
            again.wait_log("left open by a previous run")
            again.wait_log(f"closed tcp/{PORT} for {net.client.ipv4}: window ended", timeout=10)
            assert time.monotonic() - opened >= 3 - 0.5  # on time, not before
            assert calls.read_text().splitlines()[-1] == f"close {net.client.ipv4} tcp {PORT}"
            assert again.status()["grants"] == []


# -- 5: no replay across restarts, and a copied bound knock --------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_a_knock_captured_before_a_restart_is_refused_after_it(pki: TestPKI, how: str) -> None:
    with host(pki, "skfj") as (net, second), tempfile.TemporaryDirectory(prefix="sknock-state-") as state:
        options = {"PORT_OPEN_DURATION_IN_SECONDS": "1", "TIMESTAMP_THRESHOLD_IN_SECONDS": "30", "stateDir": state}
        server = start(net, pki, **options)
        with server:
            datagram = knock(net, pki, server)
            server.stop(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        with start(net, pki, **options) as again:
            mark = again.mark()
            send(net, datagram, second)
            again.wait_log(f"refused knock from {second}: replay", since=mark)
            assert not reachable(net, second)
            knock(net, pki, again, second)  # a fresh knock from there is granted
            assert reachable(net, second)


# -- 6: the loop never waits on the network -------------------------------------------------------------


@contextmanager
def stalled_http(net: TestNet) -> Iterator[str]:
    """A CRL 'server' in the server namespace that accepts connections and never answers."""
    code = (
        "import socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(64)\n"
        "print(s.getsockname()[1], flush=True)\n"
        "held = []\n"
        "while True:\n"
        "    c, _ = s.accept(); held.append(c)\n"
    )
    process = net.server.popen(PY, "-c", code, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}/crl.der"
    finally:
        process.kill()
        process.wait(5)


def test_a_stalled_crl_server_delays_no_knock(pki: TestPKI) -> None:
    with host(pki, "skfl") as (net, _), stalled_http(net) as url, start(
        net, pki, crlUrl=url, workers="2", PORT_OPEN_DURATION_IN_SECONDS="30"
    ) as server:
            server.wait_log("CRL fetcher running")
            for _ in range(3):
                mark = server.mark()
                server.process.send_signal(signal.SIGHUP)  # fetch now: the fetch hangs
                server.wait_log("SIGHUP: asking the CRL fetcher", since=mark)
                datagram = build_knock(net, pki)
                sent = time.monotonic()
                send(net, datagram, net.client.ipv4)
                server.wait_log(f"granted tcp/{PORT} to {net.client.ipv4} (", since=mark, timeout=5)
                assert time.monotonic() - sent < 1.0
            log = server.log_text()
            assert log.count("CRL fetcher running") == 1  # one per server, not one per worker
            assert "refused knock" not in log


# -- teardown is explicit -------------------------------------------------------------------------------


def test_teardown_is_an_explicit_act_refused_while_the_server_runs(pki: TestPKI) -> None:
    with host(pki, "skft") as (net, second):
        server = start(net, pki)

        def teardown() -> subprocess.CompletedProcess[str]:
            return subprocess.run(net.server.cmd(PY, SERVER_SCRIPT, "-c", str(server.config), "teardown"),
                                  capture_output=True, text=True, env=ENV, timeout=60)

        with server:
            refused = teardown()
            assert refused.returncode == 2
            assert f"pid {server.process.pid}" in refused.stderr and "stop it first" in refused.stderr
            assert "table inet sknock" in sknock_table(net)
            assert server.stop() == 0
            server.serve_tcp(PORT)  # stop() ended the service too: start it again
            assert "table inet sknock" in sknock_table(net) and not reachable(net, second)
            done = teardown()
            assert done.returncode == 0, done.stderr
            assert "removed sknock's firewall" in done.stdout
            assert sknock_table(net) == ""
            assert reachable(net, second)  # now the admin's ruleset alone decides, and it accepts the port


def test_the_instance_claim_names_its_holder_and_is_released_when_it_dies() -> None:

    from sknock.server.instance import AlreadyRunning, claim, running_pid

    name = f"\0sknock-test-{os.getpid()}".encode()
    assert running_pid(name) is None
    held = claim(name)
    try:
        assert running_pid(name) == os.getpid()
        with pytest.raises(AlreadyRunning) as refused:
            claim(name)
        assert refused.value.pid == os.getpid() and f"pid {os.getpid()}" in str(refused.value)
    finally:
        held.close()
    claim(name).close()  # free again once the holder is gone
    # a holder that is killed releases it too
    child = os.fork()
    if child == 0:
        kept = claim(name)
        time.sleep(30)
        kept.close()
        os._exit(0)
    try:
        wait_for(lambda: running_pid(name) == child, 5, "the child holds the name")
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert running_pid(name) is None


def test_the_boot_ruleset_keeps_the_port_closed_before_the_server_starts(pki: TestPKI, tmp_path: Path) -> None:
    """`sknock-server boot-ruleset` prints the policy for the host's own ruleset: loaded at boot, the port
    is closed before sknock starts; the server then takes the table over and knocks work."""
    with host(pki, "skfb") as (net, second):
        folder = tmp_path / "cfg"
        folder.mkdir()
        config = folder / "config.ini"
        config.write_text("[DEFAULT]\nserverPFXFile = x.pfx\nPFXPasswd = x\ncrlFile = crl.der\n"
                          f"firewallBackend = nftables\nfirewallPolicy = drop\nprotectedPorts = tcp/{PORT}\n"
                          "emergencySSH = no\n")
        printed = subprocess.run([PY, SERVER_SCRIPT, "-c", str(config), "boot-ruleset"], capture_output=True,
                                 text=True, env=ENV, timeout=60)
        assert printed.returncode == 0, printed.stderr
        ruleset = tmp_path / "sknock.nft"
        ruleset.write_text(printed.stdout)
        net.server.run("nft", "-f", str(ruleset))  # what the host's nftables.service does at boot
        net.server.run("nft", "-f", str(ruleset))  # and on a reload: still one table, no duplicate rules
        assert sknock_table(net).count(f"tcp dport {PORT} drop") == 1
        listener = net.server.popen(PY, "-c", (
            "import socket, time\n"
            f"s = socket.socket(); s.bind(('0.0.0.0', {PORT})); s.listen(8); print('up', flush=True); time.sleep(60)\n"
        ), stdout=subprocess.PIPE)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == b"up"
            assert not reachable(net, net.client.ipv4) and not reachable(net, second)  # no sknock running yet
        finally:
            listener.kill()
            listener.wait(5)
        with start(net, pki) as server:  # serves the port; the server takes over the boot table
            knock(net, pki, server)
            assert reachable(net, net.client.ipv4) and not reachable(net, second)
        assert "table inet sknock" in sknock_table(net)
