"""End to end: the real knock server in a namespace, the real kernel firewall, knocks from the client
namespace with the client library.

* the matrix: nftables and iptables x IPv4 and IPv6 x reject and drop -- closed before the knock
  (refused fast with reject, silent with drop), open after it for the knocking address only, closed
  to new connections after the window, while a connection made inside the window survives it;
* the command backend runs the admin's templates with the grant's values;
* kill -9 of the server: the worker follows, the kernel still ends the grant on time, and the next
  start replaces the leftover table;
* ``--check-config`` and a server with a bad config: exit 2, one line naming the key, firewall untouched;
* ``status``, the unprivileged worker, close-now and extending a grant.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import PASSWORD, TestPKI
from tests.server_harness import (
    ENV,
    PY,
    REPO,
    RunningServer,
    client_script,
    knock_from_client,
    run_in_client,
)

PORT = 2005
DURATION = 3  # PORT_OPEN_DURATION_IN_SECONDS for the tests that wait for a window to end
PROBE_TIMEOUT = 1.0
SERVER_SCRIPT = str(REPO / "server" / "knock-server.py")
NOBODY = 65534


def options(backend: str = "nftables", policy: str = "drop", duration: int = DURATION, **more: str) -> dict[str, str]:
    return {
        "firewallBackend": backend,
        "firewallPolicy": policy,
        "protectedPorts": f"tcp/{PORT}",
        "PORT_OPEN_DURATION_IN_SECONDS": str(duration),
        **more,
    }


# -- observing -----------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def probe(net: TestNet, port: int = PORT, *, family: int = 4, timeout: float = PROBE_TIMEOUT) -> tuple[str, float]:
    """Try a new TCP connection from the client namespace: ('open' | 'refused' | 'timeout' | error name,
    seconds it took)."""
    host = net.server.ipv4 if family == 4 else net.server.ipv6
    code = (
        "import json, socket, time\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close(); r = 'open'\n"
        "except ConnectionRefusedError:\n    r = 'refused'\n"
        "except TimeoutError:\n    r = 'timeout'\n"
        "except OSError as e:\n    r = type(e).__name__\n"
        "print(json.dumps([r, time.monotonic() - t]))\n"
    )
    out = net.client.run(PY, "-c", code, timeout=timeout + 10).stdout
    result, seconds = json.loads(out)
    return result, seconds


def assert_closed(net: TestNet, policy: str, *, family: int = 4) -> None:
    """A new connection fails the way the policy says: reject answers at once, drop stays silent."""
    result, seconds = probe(net, family=family)
    if policy == "reject":
        assert result == "refused", result
        assert seconds < PROBE_TIMEOUT / 2, f"reject took {seconds:.2f} s"
    else:
        assert result == "timeout", result
        assert seconds >= PROBE_TIMEOUT * 0.9


def wait_open(net: TestNet, *, family: int = 4, timeout: float = 3) -> None:
    wait_for(lambda: probe(net, family=family)[0] == "open", timeout, f"tcp/{PORT} open over IPv{family}")


def client_address(net: TestNet, family: int) -> str:
    return net.client.ipv4 if family == 4 else net.client.ipv6


def grant_rules(server: RunningServer, backend: str, family: int) -> str:
    """The part of the kernel firewall that holds grants, as text."""
    if backend == "nftables":
        return server.net.server.run("nft", "list", "set", "inet", "sknock", f"grants{family}").stdout
    save = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    out = server.net.server.run(save, "-t", "filter").stdout
    return "\n".join(line for line in out.splitlines() if "sknock-grant" in line)


def legacy_rules(net: TestNet) -> str:
    """The legacy x_tables filter rules (IPv4 and IPv6), without the save's comments and packet counters."""
    saved = "".join(
        net.server.run(save, "-t", "filter").stdout for save in ("iptables-legacy-save", "ip6tables-legacy-save")
    )
    return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in saved.splitlines() if not line.startswith("#"))


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie nobody has reaped yet (it was reparented)."""
    try:
        return proc_status(pid)["State"].startswith("Z")
    except FileNotFoundError:
        return True


def worker_pids(server: RunningServer) -> list[int]:
    """The server's children: its workers, as many as `workers = auto` makes (one per CPU, at most 8)."""
    kids = children(server.process.pid)
    expected = min(os.cpu_count() or 1, 8)
    assert len(kids) == expected, f"the server should have {expected} children, its workers: {kids}"
    return kids


# -- a connection held open across the window ------------------------------------------------------------


class HeldConnection:
    """A client-side process that connects to the service, reads its greeting, then waits for a go to
    send a line and read the answer over the same connection."""

    def __init__(self, net: TestNet, family: int) -> None:
        host = net.server.ipv4 if family == 4 else net.server.ipv6
        code = (
            "import socket, sys\n"
            f"s = socket.create_connection(({host!r}, {PORT}), timeout=3)\n"
            "f = s.makefile('rb')\n"
            "print(f.readline().decode().strip(), flush=True)\n"
            "sys.stdin.readline()\n"
            "s.sendall(b'still there?\\n')\n"
            "print(f.readline().decode().strip(), flush=True)\n"
        )
        self.process = subprocess.Popen(
            net.client.cmd(PY, "-c", code),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def greeting(self, timeout: float = 10) -> str:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout), "no greeting from the held connection"
        return self.process.stdout.readline().strip()

    def talk(self, timeout: float = 15) -> tuple[int, str, str]:
        out, err = self.process.communicate("go\n", timeout=timeout)
        return self.process.returncode, out.strip(), err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@contextmanager
def held_connection(net: TestNet, family: int) -> Iterator[HeldConnection]:
    held = HeldConnection(net, family)
    try:
        yield held
    finally:
        held.kill()


# -- 1 and 5: the matrix, with status --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reject", "drop"])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_knock_opens_for_the_window_and_established_sessions_survive(
    pki: TestPKI, backend: str, family: int, policy: str
) -> None:
    require_netns()
    other = 6 if family == 4 else 4
    with TestNet.create("ske") as net, RunningServer.start(net, pki, wait=True, **options(backend, policy)) as server:
        address = client_address(net, family)
        server.serve_tcp(PORT)
        assert_closed(net, policy, family=family)
        assert grant_rules(server, backend, family).count(address) == 0

        knock_from_client(net, pki.alice, pki, PORT, family=family)
        server.wait_log(f"granted tcp/{PORT} to {address}")
        wait_open(net, family=family)
        with held_connection(net, family) as held:
            assert held.greeting() == "hello"
            # the kernel holds the grant, for this address; status lists it
            assert grant_rules(server, backend, family).count(address) == 1
            listing = server.status_cli()
            line = next(line for line in listing.splitlines() if address in line.split())
            assert f"tcp/{PORT}" in line.split() and "alice" in line, listing
            assert "1 open grant(s)" in listing and f"backend {backend}" in listing
            assert "revocation crl" in listing and "CRL of CN=sknock Test Root CA: issued " in listing
            # the other address family holds no grant
            assert_closed(net, policy, family=other)

            server.wait_log(f"closed tcp/{PORT} for {address}: window ended", timeout=DURATION + 5)
            assert_closed(net, policy, family=family)
            assert grant_rules(server, backend, family).count(address) == 0
            assert server.status()["grants"] == []
            # the session opened inside the window still talks after it
            code, out, err = held.talk()
            assert (code, out) == (0, "again"), err

        assert server.stop() == 0
        # a stop is not a teardown: sknock's policy stays in the backend's own place, and only there
        if backend == "nftables":
            assert server.nft_ruleset().count("table inet sknock") == 1
            assert "SKNOCK" not in legacy_rules(net)
        else:
            assert "sknock" not in server.nft_ruleset()
            assert "-A INPUT -j SKNOCK" in legacy_rules(net)
        assert_closed(net, policy, family=family)


# -- 2: the command backend ------------------------------------------------------------------------------


def test_command_backend_runs_the_templates(pki: TestPKI, tmp_path: Path) -> None:
    require_netns()
    calls = tmp_path / "calls.txt"
    script = tmp_path / "record.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n')
    record = f"/bin/sh {shlex.quote(str(script))}"
    config = options(
        "command",
        "none",
        protectedPorts="all",  # the command backend applies no policy: a list would be refused as meaningless
        openCommand=f"{record} open %IP% %PROTO% %PORT% %DURATION%",
        closeCommand=f"{record} close %IP% %PROTO% %PORT% %DURATION%",
    )

    def lines() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    with TestNet.create("skec") as net, RunningServer.start(net, pki, wait=True, **config) as server:
        knock_from_client(net, pki.alice, pki, PORT)
        wait_for(lambda: len(lines()) >= 1, 10, "the open command ran")
        opened = time.monotonic()
        assert lines() == [f"open {net.client.ipv4} tcp {PORT} {DURATION}"]
        assert [g["address"] for g in server.status()["grants"]] == [net.client.ipv4]
        wait_for(lambda: len(lines()) >= 2, DURATION + 5, "the close command ran")
        assert time.monotonic() - opened > DURATION - 1
        assert lines()[1] == f"close {net.client.ipv4} tcp {PORT} 0"
        server.wait_log(f"closed tcp/{PORT} for {net.client.ipv4}: window ended")
        assert server.stop() == 0
        assert len(lines()) == 2  # nothing left to close at teardown
        assert server.nft_ruleset().strip() == ""  # the command backend installs nothing itself


# -- 3: kill -9 ------------------------------------------------------------------------------------------


def test_kill_9_the_kernel_still_ends_the_grant_and_the_next_start_cleans_up(pki: TestPKI) -> None:
    require_netns()
    with TestNet.create("skk") as net:
        address = net.client.ipv4
        with RunningServer.start(net, pki, wait=True, **options("nftables", "drop")) as server:
            server.serve_tcp(PORT)
            workers = worker_pids(server)
            knock_from_client(net, pki.alice, pki, PORT)
            server.wait_log(f"granted tcp/{PORT} to {address}")
            wait_open(net)
            assert address in grant_rules(server, "nftables", 4)

            server.process.send_signal(signal.SIGKILL)
            assert server.process.wait(5) == -signal.SIGKILL
            killed = time.monotonic()
            # the workers see their channels close and stop
            for worker in workers:
                wait_for(partial(gone, worker), 5, f"worker {worker} exits after the monitor died")
            assert "the monitor has gone; worker stops" in server.log_text()
            # nobody tore the table down: the grant is still there, and the kernel ends it on time
            assert server.nft_ruleset().count("table inet sknock") == 1
            wait_for(lambda: address not in grant_rules(server, "nftables", 4), DURATION + 3, "the element expired")
            assert time.monotonic() - killed < DURATION + 1.5
            assert_closed(net, "drop")
            assert server.nft_ruleset().count("table inet sknock") == 1  # left behind, still protecting

        with RunningServer.start(net, pki, wait=True, **options("nftables", "drop")) as again:
            assert again.nft_ruleset().count("table inet sknock") == 1
            again.serve_tcp(PORT)
            assert_closed(net, "drop")
            knock_from_client(net, pki.alice, pki, PORT)
            again.wait_log(f"granted tcp/{PORT} to {address}")
            wait_open(net)
            assert again.stop() == 0
            assert again.nft_ruleset().count("table inet sknock") == 1  # a stop leaves the policy


# -- 4: --check-config and a bad config ------------------------------------------------------------------


def write_config(folder: Path, pki: TestPKI, **values: str) -> Path:
    for source, name in ((pki.server.pfx, "server.pfx"), (pki.ca_dir / "crl.der", "crl.der")):
        shutil.copy(source, folder / name)
    base = {
        "serverPFXFile": "server.pfx",
        "PFXPasswd": PASSWORD,
        "crlFile": "crl.der",
        "controlSocket": str(folder / "control.sock"),
        "stateDir": str(folder / "state"),
        "user": "nobody",
        **options("nftables", "drop"),
    }
    config = folder / f"config{len(list(folder.glob('config*')))}.ini"
    config.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in {**base, **values}.items()))
    return config


BAD_CONFIGS: list[tuple[dict[str, str], str]] = [
    ({"firewalPolicy": "drop"}, "firewalPolicy"),  # an unknown key (a typo)
    ({"firewallPolicy": "maybe"}, "firewallPolicy"),  # a bad value
    ({"protectedPorts": "tcp/22"}, "emergencySSH"),  # a contradiction: emergency SSH would keep tcp/22 open
]


def test_check_config_changes_nothing(pki: TestPKI) -> None:
    require_netns()
    folder = Path(tempfile.mkdtemp(prefix="sknock-e2e-"))
    try:
        with TestNet.create("skg") as net:
            # an admin's table, so "unchanged" is about a real ruleset
            net.server.run(
                "nft",
                "add table inet admin { chain input { type filter hook input priority 0; "
                "policy accept; tcp dport 9999 drop; }; }",
            )
            before = net.server.run("nft", "list", "ruleset").stdout
            legacy_before = legacy_rules(net)

            def check(config: Path) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    net.server.cmd(PY, SERVER_SCRIPT, "-c", str(config), "--check-config"),
                    capture_output=True,
                    text=True,
                    env=ENV,
                    timeout=60,
                )

            good = check(write_config(folder, pki))
            assert good.returncode == 0, good.stderr
            assert "configuration OK" in good.stdout
            for values, key in BAD_CONFIGS:
                result = check(write_config(folder, pki, **values))
                assert result.returncode == 2, result
                lines = result.stderr.strip().splitlines()
                assert len(lines) == 1 and key in lines[0] and result.stdout == "", result
            assert net.server.run("nft", "list", "ruleset").stdout == before
            assert legacy_rules(net) == legacy_before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(("values", "key"), BAD_CONFIGS, ids=["unknown-key", "bad-policy", "contradiction"])
def test_server_with_a_bad_config_exits_2_and_touches_nothing(pki: TestPKI, values: dict[str, str], key: str) -> None:
    require_netns()
    with TestNet.create("skeb") as net:
        before = net.server.run("nft", "list", "ruleset").stdout
        with RunningServer.start(net, pki, wait=False, **{**options(), **values}) as server:
            assert server.process.wait(30) == 2
            lines = server.log_text().strip().splitlines()
            assert len(lines) == 1 and key in lines[0], lines
            assert server.nft_ruleset() == before
            assert not server.control_socket.exists()


# -- 6: the worker is unprivileged -----------------------------------------------------------------------


def test_worker_runs_as_nobody_with_no_new_privs(pki: TestPKI) -> None:
    require_netns()
    assert pwd.getpwnam("nobody").pw_uid == NOBODY
    with TestNet.create("skw") as net, RunningServer.start(net, pki, wait=True, **options()) as server:
        parent = proc_status(server.process.pid)
        assert parent["Uid"].split() == ["0"] * 4
        for pid in worker_pids(server):
            worker = proc_status(pid)
            assert worker["Uid"].split() == [str(NOBODY)] * 4
            assert "0" not in worker["Gid"].split()
            assert worker["Groups"] == ""
            assert worker["NoNewPrivs"] == "1"
            assert worker["CapEff"] == worker["CapPrm"] == "0000000000000000"
        assert server.stop() == 0


# -- 7 and 8: close now, extend --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_close_knock_closes_before_the_window_ends(pki: TestPKI, backend: str) -> None:
    require_netns()
    long_window = 30
    with (
        TestNet.create("skn") as net,
        RunningServer.start(net, pki, wait=True, **options(backend, "reject", duration=long_window)) as server,
    ):
        server.serve_tcp(PORT)
        knock_from_client(net, pki.alice, pki, PORT)
        server.wait_log(f"granted tcp/{PORT} to {net.client.ipv4}")
        wait_open(net)
        opened = time.monotonic()
        body = f"c.close({net.server.ipv4!r}, {PORT})\n"
        result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
        assert result.returncode == 0, result.stderr
        server.wait_log(f"closing tcp/{PORT} for {net.client.ipv4} (CN=alice")
        wait_for(lambda: probe(net)[0] == "refused", 5, "closed after the close knock")
        assert time.monotonic() - opened < long_window / 2
        assert server.status()["grants"] == []
        assert net.client.ipv4 not in grant_rules(server, backend, 4)
        assert server.stop() == 0


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_second_knock_extends_the_window(pki: TestPKI, backend: str) -> None:
    require_netns()
    with TestNet.create("skx") as net, RunningServer.start(net, pki, wait=True, **options(backend, "reject")) as server:
        address = net.client.ipv4
        server.serve_tcp(PORT)
        knock_from_client(net, pki.alice, pki, PORT)
        server.wait_log(f"granted tcp/{PORT} to {address}")

        def expires_in() -> float:
            grants = server.status()["grants"]
            assert len(grants) == 1, grants
            return float(grants[0]["expires_in"])

        # knock again when a good part of the first window has gone
        wait_for(lambda: expires_in() < DURATION - 1.5, DURATION, "the first window is half over")
        first_end = time.monotonic() + expires_in()
        knock_from_client(net, pki.alice, pki, PORT)
        server.wait_log(f"granted tcp/{PORT} to {address}", count=2)
        server.wait_log("extending an open grant")
        assert expires_in() > first_end - time.monotonic() + 0.5
        assert grant_rules(server, backend, 4).count(address) == 1  # one grant, not two

        # past the end of the first window the port is still open
        while time.monotonic() < first_end + 0.5:
            assert probe(net)[0] == "open"
        assert probe(net)[0] == "open"
        assert f"closed tcp/{PORT}" not in server.log_text()

        server.wait_log(f"closed tcp/{PORT} for {address}: window ended", timeout=DURATION + 5)
        assert time.monotonic() > first_end + 0.5
        assert probe(net)[0] == "refused"
        assert server.stop() == 0


# -- captureMode = udp: an ordinary UDP socket on the knock port --------------------------------------------


def test_udp_capture_mode_keeps_only_the_knock_port_open(pki: TestPKI) -> None:
    """With captureMode = udp the server binds the knock port; firewallPolicy drop on every port must
    then leave that one UDP port open (and nothing else), or no knock could arrive."""
    require_netns()
    with TestNet.create("sku") as net, RunningServer.start(
        net, pki, wait=True, **options("nftables", "drop", protectedPorts="all", captureMode="udp",
                                       knockPorts="40000")
    ) as server:
        server.serve_tcp(PORT)
        assert "udp dport 40000 accept" in server.nft_ruleset()
        assert_closed(net, "drop")
        knock_from_client(net, pki.alice, pki, PORT, knock_port=40001)  # not the knock port: dropped
        time.sleep(1.0)
        assert "granted" not in server.log_text()
        knock_from_client(net, pki.alice, pki, PORT, knock_port=40000)
        server.wait_log(f"granted tcp/{PORT} to {net.client.ipv4}")
        wait_open(net)
        assert server.stop() == 0
