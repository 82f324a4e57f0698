"""The real server in a namespace, with its privileges reduced: the monitor keeps only its capabilities,
and a worker taken over by a packet cannot run a program -- the kernel kills it (SIGSYS), the monitor
replaces it, no port opens, and the next valid knock is granted.  The same for the metrics server taken
over by a scraper: killed, replaced, the server and the firewall untouched, the next scrape answered."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from sknock.server.privileges import CAP_KILL, CAP_NET_ADMIN, CAP_NET_RAW, CAP_SETGID, CAP_SETUID
from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import METRICS, PY, REPO, RunningServer, knock_from_client, scrape_metrics
from tests.test_server_e2e import PORT, children, options, proc_status, wait_for, worker_pids

COMPROMISED = str(REPO / "tests" / "compromised_server.py")
MONITOR_CAPS = (1 << CAP_NET_ADMIN) | (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_KILL)


def test_a_worker_that_tries_to_run_a_program_is_killed_and_replaced(pki: TestPKI) -> None:
    require_netns()
    folder = Path(tempfile.mkdtemp(prefix="sknock-sandbox-"))
    marker = folder / "compromised"
    try:
        with (
            TestNet.create("sksb") as net,
            RunningServer.start(
                net, pki, script=(COMPROMISED, "worker", str(marker)), workers="1", **options()
            ) as server,
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


def test_a_metrics_server_that_tries_to_run_a_program_is_killed_and_replaced(pki: TestPKI) -> None:
    require_netns()
    folder = Path(tempfile.mkdtemp(prefix="sknock-sandbox-"))
    marker = folder / "compromised"
    try:
        with (
            TestNet.create("sksm") as net,
            RunningServer.start(net, pki, script=(COMPROMISED, "metrics", str(marker)), workers="1",
                                metricsListen=METRICS, **options()) as server,
        ):
            server.serve_tcp(PORT)
            server.wait_log("metrics server listening on 127.0.0.1 port 9465 under its seccomp filter")
            assert marker.exists(), "the first metrics server is the compromised one"
            first = int(re.findall(r"metrics server running: pid (\d+)", server.log_text())[-1])
            status = proc_status(first)
            assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
            since = server.mark()
            scrape = ("import urllib.request\n"
                      f"urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read()\n")
            assert net.server.run(PY, "-c", scrape, check=False).returncode != 0  # no answer: it died
            server.wait_log(f"metrics server has gone (pid {first} killed by signal 31)", since=since)  # SIGSYS
            server.wait_log("metrics server listening on", since=since)  # its replacement
            log = server.log_text()[since:]
            assert "escaped the sandbox" not in log
            assert server.process.poll() is None  # the server runs on
            assert server.status()["grants"] == []
            assert not server.reachable(PORT)  # nothing opened
            second = int(re.findall(r"metrics server running: pid (\d+)", server.log_text())[-1])
            assert second != first
            assert proc_status(second)["Seccomp"] == "2"
            samples = scrape_metrics(net)  # the replacement answers
            assert samples["sknock_worker_restarts_total"] == 0.0  # a metrics server is not a worker
            knock_from_client(net, pki.alice, pki, PORT)  # and the knocks are served as before
            server.wait_log(f"granted tcp/{PORT} to {net.client.ipv4}", since=since)
            wait_for(lambda: server.reachable(PORT), 5, f"tcp/{PORT} open after the knock")
            assert server.stop() == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
