"""The real server as systemd would run it, in a test namespace: READY=1 on a real notify socket only
once sknock's nft table and every capture exist, then STATUS and WATCHDOG, STOPPING at the end; and a
logFile in the JSON format that logrotate renames and SIGHUP reopens, with the workers' lines in the
new file and the grants and refusals as structured fields."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import RunningServer, client_script, run_in_client

pytestmark = pytest.mark.root


def _packet_sockets(net: TestNet) -> int:
    """AF_PACKET sockets open in the server's namespace (only the server opens any there)."""
    out = net.server.run("ss", "-0", "-n", "-p").stdout
    return sum(1 for line in out.splitlines() if "pid=" in line)


def _messages(server_socket: socket.socket, until: float) -> list[dict[str, str]]:
    got = []
    while time.monotonic() < until:
        server_socket.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = server_socket.recv(4096)
        except TimeoutError:
            break
        got.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
    return got


def test_ready_only_once_the_table_and_captures_exist_then_status_and_watchdog(pki: TestPKI, tmp_path: Path) -> None:
    require_netns()
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    try:
        with TestNet.create("skn") as net, RunningServer.start(
            net, pki, wait=False, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"},
            protectedPorts="tcp/2005", workers="2",
        ) as server:
            deadline = time.monotonic() + 30
            ready: dict[str, str] | None = None
            while ready is None and time.monotonic() < deadline:
                for message in _messages(listener, time.monotonic() + 0.5):
                    if message.get("READY") == "1":
                        ready = message
                        # at the moment READY arrives, everything it promises is in place
                        table = net.server.run("nft", "list", "table", "inet", "sknock", check=False)
                        assert table.returncode == 0, "READY=1 before sknock's table exists"
                        assert _packet_sockets(net) >= 2, "READY=1 before every capture is open"
                        assert "worker 2 running: pid" in server.log_text()
                        break
                    assert "WATCHDOG" not in message and "STATUS" not in message  # nothing before READY
                assert server.process.poll() is None, server.log_text()
            assert ready is not None, f"no READY=1 within 30 s:\n{server.log_text()}"
            assert ready["STATUS"].startswith("0 open grant(s); 2/2 worker(s); oldest CRL issued")
            later = _messages(listener, time.monotonic() + 2.5)
            assert sum(m.get("WATCHDOG") == "1" for m in later) >= 2  # every 0.5 s (half of WATCHDOG_USEC)
            server.stop()
            assert any(m.get("STOPPING") == "1" for m in _messages(listener, time.monotonic() + 1))
    finally:
        listener.close()


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_record(path: Path, server: RunningServer, match: dict[str, Any], timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in _records(path):
            if all(record.get(k) == v for k, v in match.items()):
                return record
        assert server.process.poll() is None, server.log_text()
        time.sleep(0.05)
    raise AssertionError(f"no record with {match} in {path}:\n{path.read_text() if path.exists() else ''}")


def test_log_file_reopened_on_sighup_keeps_every_process_and_the_fields(pki: TestPKI) -> None:
    require_netns()
    folder = Path(tempfile.mkdtemp(prefix="sknock-logs-"))
    folder.chmod(0o755)
    log_file = folder / "sknock.log"
    with TestNet.create("skl") as net, RunningServer.start(
        net, pki, wait=False, protectedPorts="tcp/2005", workers="1", logFile=str(log_file), logFormat="json",
        logLevel="INFO",
    ) as server:
        _wait_record(log_file, server, {"message": "worker ready"}, timeout=30)
        log_file.rename(folder / "sknock.log.1")  # what logrotate does, then its postrotate: systemctl reload
        os.kill(server.process.pid, signal.SIGHUP)
        _wait_record(log_file, server, {"logger": "sknock.monitor"})  # the monitor's SIGHUP line, in the new file
        body = ("d = c.build_knock([(Protocol.TCP, 2005)], now=time.time())\n"
                f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(d, ({net.server.ipv4!r}, 40000))\n"
                f"time.sleep(1); s.sendto(d, ({net.server.ipv4!r}, 40000))\n")
        result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
        assert result.returncode == 0, result.stderr
        grant = _wait_record(log_file, server, {"event": "grant"})
        assert grant["source"] == net.client.ipv4 and grant["ports"] == ["tcp/2005"]
        assert "alice" in grant["subject"] and isinstance(grant["serial"], int)
        refusal = _wait_record(log_file, server, {"event": "refusal", "reason": "replay-seen"})
        assert refusal["source"] == net.client.ipv4 and refusal["logger"] == "sknock.worker"
        assert refusal["pid"] != server.process.pid  # a worker's line, relayed by the monitor
        old = (folder / "sknock.log.1").read_text()
        assert "worker ready" in old and '"event":"grant"' not in old
        server.stop()
        stopped = _wait_record(log_file, server, {"message": "stopped (exit 0)"}, timeout=5)
        assert stopped["level"] == "INFO"
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()


SANDBOX = Path(__file__).with_name("unit_sandbox.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-seccomp


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_the_server_works_inside_the_units_sandbox(pki: TestPKI, backend: str, tmp_path: Path) -> None:
    """What of the unit one process can impose on itself (tests/unit_sandbox.py): its capability bounding
    set, NoNewPrivileges, its SystemCallFilter as a seccomp allow list, and MemoryDenyWriteExecute as
    PR_SET_MDWE (cryptography, cffi/ctypes, libnftables and python-iptables never need W+X memory).  The
    server still sets up its firewall, captures, verifies a knock and grants it."""
    require_netns()
    import shutil
    import subprocess

    from sknock.server.service import unit_text
    from tests.server_harness import PY, knock_from_client

    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze to expand the unit's syscall groups")
    unit = tmp_path / "sknock-server.service"
    unit.write_text(unit_text(Path(PY).parent / "sknock-server"))
    wrapper = [SYSTEM_PYTHON, str(SANDBOX), str(unit)]
    if subprocess.run([*wrapper, "/bin/true"], check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot impose the unit's sandbox here (needs python3-seccomp and Linux 6.3+ for PR_SET_MDWE)")
    refused = subprocess.run([*wrapper, PY, "-c", "import os; os.sched_setaffinity(0, {0})"], check=False,
                             capture_output=True, text=True)
    assert "Operation not permitted" in refused.stderr  # the filter is on: ~@resources answers EPERM
    with TestNet.create("skm") as net:
        plain_popen = net.server.popen
        net.server.popen = lambda *args, **kw: plain_popen(*wrapper, *args, **kw)  # type: ignore[method-assign]
        with RunningServer.start(net, pki, protectedPorts="tcp/2005", workers="2", firewallBackend=backend) as server:
            net.server.popen = plain_popen  # type: ignore[method-assign]
            bounding = int(next(line for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines()
                                if line.startswith("CapBnd:")).split()[1], 16)
            # the sandbox holds, and the monitor took from it what its backend does not need after set-up:
            # CAP_SETPCAP (8) always, CAP_NET_RAW (13) with nftables
            kept = (1 << 5) | (1 << 6) | (1 << 7) | (1 << 12) | ((1 << 13) if backend == "iptables" else 0)
            assert bounding == kept
            server.serve_tcp(2005)
            assert not server.reachable(2005)
            knock_from_client(net, pki.alice, pki, 2005)
            server.wait_log("granted tcp/2005")
            assert server.reachable(2005)
            assert server.stop() == 0
