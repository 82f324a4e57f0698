"""The real server in a namespace, with its privileges reduced: the monitor keeps only its capabilities,
and a worker taken over by a packet cannot run a program -- the kernel kills it (SIGSYS), the monitor
replaces it, no port opens, and the next valid knock is granted."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sknock.server.privileges import CAP_KILL, CAP_NET_ADMIN, CAP_NET_RAW, CAP_SETGID, CAP_SETUID
from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import REPO, RunningServer, knock_from_client
from tests.test_server_e2e import PORT, children, options, proc_status, wait_for, worker_pids

COMPROMISED = str(REPO / "tests" / "compromised_worker_server.py")
MONITOR_CAPS = (1 << CAP_NET_ADMIN) | (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_KILL)


def test_a_worker_that_tries_to_run_a_program_is_killed_and_replaced(pki: TestPKI) -> None:
    require_netns()
    folder = Path(tempfile.mkdtemp(prefix="sknock-sandbox-"))
    marker = folder / "compromised"
    try:
        with (
            TestNet.create("sksb") as net,
            RunningServer.start(net, pki, script=(COMPROMISED, str(marker)), workers="1", **options()) as server,
        ):
            server.serve_tcp(PORT)
            assert marker.exists(), "the first worker is the compromised one"
            first = children(server.process.pid)
            assert len(first) == 1
            assert not server.reachable(PORT)
            since = server.mark()
            knock_from_client(net, pki.alice, pki, PORT)
            server.wait_log("killed by signal 31", since=since)  # SIGSYS: the seccomp filter
            server.wait_log("worker ready", since=since)  # its replacement
            log = server.log_text()[since:]
            assert "escaped the sandbox" not in log
            assert "granted" not in log
            assert server.status()["grants"] == []
            assert not server.reachable(PORT)
            assert children(server.process.pid) != first
            knock_from_client(net, pki.alice, pki, PORT)
            server.wait_log(f"granted tcp/{PORT} to {net.client.ipv4}", since=since)
            wait_for(lambda: server.reachable(PORT), 5, f"tcp/{PORT} open after the second knock")
            assert server.stop() == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_monitor_keeps_only_its_capabilities(pki: TestPKI) -> None:
    require_netns()
    for backend, want in (("nftables", MONITOR_CAPS), ("iptables", MONITOR_CAPS | (1 << CAP_NET_RAW))):
        with TestNet.create("skcp") as net, RunningServer.start(net, pki, **options(backend)) as server:
            monitor = proc_status(server.process.pid)
            assert monitor["Uid"].split() == ["0"] * 4
            for key in ("CapEff", "CapPrm", "CapBnd"):
                assert int(monitor[key], 16) == want, (backend, key, monitor[key])
            assert int(monitor["CapInh"], 16) == 0 and int(monitor["CapAmb"], 16) == 0
            pids = worker_pids(server)
            server.wait_log("worker ready", count=len(pids))
            for pid in pids:
                status = proc_status(pid)
                for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
                    assert int(status[key], 16) == 0, (key, status[key])
                assert status["NoNewPrivs"] == "1"
                assert status["Seccomp"] == "2"  # filter mode
            # it still does its job after the drop: a knock opens the port, and the status answers
            server.serve_tcp(PORT)
            knock_from_client(net, pki.alice, pki, PORT)
            server.wait_log(f"granted tcp/{PORT} to {net.client.ipv4}")
            wait_for(lambda: server.reachable(PORT), 5, f"tcp/{PORT} open")
            assert len(server.status()["grants"]) == 1
            assert server.stop() == 0
