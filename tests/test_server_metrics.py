"""Metrics end to end: the real server in a namespace with ``metricsListen`` set; knocks of known outcome
from the client namespace; the endpoint scraped over HTTP inside the server namespace, its figures checked
against what was sent; a worker killed, and the totals kept; and with metrics off, no listening socket."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import METRICS, PY, RunningServer, client_script, run_in_client
from tests.server_harness import scrape_metrics as scrape
from tests.server_harness import wait_for_metrics as wait_for

pytestmark = pytest.mark.root

LISTEN = METRICS
PORTS = (2001, 2002, 2003)

def listening_tcp(net: TestNet) -> list[str]:
    """The TCP sockets listening in the server namespace (local address:port in /proc's hex form)."""
    lines = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        out = net.server.run("cat", table).stdout.splitlines()[1:]
        lines += [line.split()[1] for line in out if line.split()[3] == "0A"]
    return lines


@pytest.fixture(scope="module")
def metered(pki: TestPKI) -> Iterator[tuple[TestNet, RunningServer]]:
    require_netns()
    with TestNet.create("skm") as net, RunningServer.start(
        net, pki, protectedPorts="tcp/2001-2003", firewallPolicy="drop", emergencySSH="no", workers="2",
        PORT_OPEN_DURATION_IN_SECONDS="60", metricsListen=LISTEN,
    ) as server:
        server.wait_log("metrics server listening on 127.0.0.1 port 9465")
        yield net, server


def test_the_figures_are_what_was_sent(metered: tuple[TestNet, RunningServer], pki: TestPKI) -> None:
    net, server = metered
    before = wait_for(net, {"sknock_knocks_received_total": 0.0, "sknock_grants_open": 0.0})
    assert before['sknock_crl_age_seconds{source="' + str(server.folder / "crl.der") + '"}'] > 0
    mark = server.mark()
    send = (
        f"SERVER = {net.server.ipv4!r}\n"
        "def send(d):\n"
        "    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s: s.sendto(d, (SERVER, 40000))\n"
    )
    # N = 3 valid knocks (one per port), then an exact replay of the last
    body = send + (
        f"for port in {PORTS!r}:\n"
        "    d = c.build_knock([(Protocol.TCP, port)], now=time.time()); send(d); time.sleep(0.05)\n"
        "time.sleep(0.5); send(d)\n"
        # 2 stale knocks
        "send(c.build_knock([(Protocol.TCP, 2001)], now=time.time() - 120))\n"
        "send(c.build_knock([(Protocol.TCP, 2001)], now=time.time() + 120))\n"
    )
    result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
    assert result.returncode == 0, result.stderr
    # and 1 revoked client
    result = run_in_client(net, client_script(pki.mallory, pki.server.cer, send + (
        "send(c.build_knock([(Protocol.TCP, 22)], now=time.time()))\n")))
    assert result.returncode == 0, result.stderr
    server.wait_log("refused knock from", count=4, since=mark)
    samples = wait_for(net, {
        "sknock_knocks_received_total": 7.0,
        "sknock_knocks_granted_total": 3.0,
        'sknock_knocks_refused_total{reason="stale"}': 2.0,
        'sknock_knocks_refused_total{reason="cert-revoked"}': 1.0,
        "sknock_grants_open": 3.0,
        "sknock_knock_to_grant_seconds_count": 3.0,
        'sknock_knock_to_grant_seconds_bucket{le="+Inf"}': 3.0,
        "sknock_worker_restarts_total": 0.0,
        'sknock_grants_closed_total{why="expiry"}': 0.0,
    })
    # The replay meets the worker that saw the original (replay-seen) or, from another source port, the
    # other worker, which verifies it: then the monitor refuses its nonce (replay).
    deadline = time.monotonic() + 10
    while True:
        refused = {k: v for k, v in samples.items() if k.startswith("sknock_knocks_refused_total{")}
        replays = refused['sknock_knocks_refused_total{reason="replay-seen"}'] + refused[
            'sknock_knocks_refused_total{reason="replay"}']
        if replays == 1.0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
        samples = scrape(net)
    assert replays == 1.0
    assert sum(refused.values()) == 4.0  # no other reason counted anything
    assert 0 < samples["sknock_knock_to_grant_seconds_sum"] < 3 * 5.0
    assert samples["sknock_capture_drops_total"] == 0.0

    # A worker killed: it is replaced, and the totals stay (the monitor holds them).
    victim = server.status()["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    server.wait_log("has gone", since=mark)
    after = wait_for(net, {"sknock_worker_restarts_total": 1.0, "sknock_knocks_granted_total": 3.0,
                           "sknock_knocks_received_total": 7.0})
    assert after['sknock_knocks_refused_total{reason="stale"}'] == 2.0


def test_a_close_knock_is_counted_as_a_closed_grant(metered: tuple[TestNet, RunningServer], pki: TestPKI) -> None:
    net, server = metered
    before = scrape(net)
    body = (
        f"c.knock({net.server.ipv4!r}, 2002, verify=False)\n"
        "time.sleep(0.5)\n"
        f"c.close({net.server.ipv4!r}, 2002)\n"
    )
    mark = server.mark()
    result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
    assert result.returncode == 0, result.stderr
    server.wait_log("closing tcp/2002", since=mark)
    closes = 'sknock_grants_closed_total{why="close_request"}'
    wait_for(net, {
        closes: before[closes] + 1,
        "sknock_knocks_granted_total": before["sknock_knocks_granted_total"] + 1,
    })


def test_metrics_off_means_no_listening_socket(pki: TestPKI) -> None:
    require_netns()
    with TestNet.create("skn") as net, RunningServer.start(net, pki, workers="1") as server:
        assert listening_tcp(net) == []
        assert "metrics server" not in server.log_text()


def test_the_metrics_server_runs_unprivileged(metered: tuple[TestNet, RunningServer]) -> None:
    net, server = metered
    pids = [int(m) for m in re.findall(r"metrics server running: pid (\d+)", server.log_text())]
    status = Path(f"/proc/{pids[-1]}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == [str(pwd.getpwnam("nobody").pw_uid)] * 4
    assert "CapEff:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status  # its filter is loaded (sknock.server.sandbox.sandbox_metrics) ...
    assert "under its seccomp filter" in server.log_text()
    assert scrape(net)["sknock_knocks_granted_total"] >= 0  # ... and it serves under it


def test_a_metrics_port_in_use_stops_the_start(pki: TestPKI) -> None:
    require_netns()
    with TestNet.create("skp") as net:
        holder = net.server.popen(PY, "-c", (
            "import socket, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 9465)); s.listen(1); print('held', flush=True)\n"
            "time.sleep(60)\n"), stdout=subprocess.PIPE)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
            server = RunningServer.start(net, pki, wait=False, metricsListen=LISTEN)
            try:
                assert server.process.wait(30) == 2
                assert "metricsListen: cannot listen on 127.0.0.1:9465: Address already in use" in server.log_text()
                assert "sknock" not in server.nft_ruleset()  # nothing was changed
            finally:
                server.cleanup()
        finally:
            holder.kill()
            holder.wait(5)


def test_a_crl_refresh_is_counted(metered: tuple[TestNet, RunningServer]) -> None:
    net, server = metered
    unchanged = 'sknock_crl_refresh_total{result="unchanged"}'
    before = scrape(net)[unchanged]
    mark = server.mark()
    server.process.send_signal(signal.SIGHUP)  # the monitor re-reads crlFile: the same CRL
    server.wait_log("SIGHUP: reading the CRL", since=mark)
    wait_for(net, {unchanged: before + 1})
