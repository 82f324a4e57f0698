"""The notify protocol against real AF_UNIX datagram sockets (a path and an abstract address), the
Heartbeat's decisions on a moved clock, and the monitor telling a recording notifier READY only once its
children run and WATCHDOG only while they all do."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sknock.server.monitor import Monitor
from sknock.server.notify import Heartbeat, SocketNotifier, notifier_from_environment, watchdog_interval
from tests.test_monitor import RecordingFirewall


def _receive(server: socket.socket) -> dict[str, str]:
    data = server.recv(4096)
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield str(path), server
    server.close()


def test_sends_one_datagram_to_a_socket_path(path_socket: tuple[str, socket.socket]) -> None:
    address, server = path_socket
    notifier = SocketNotifier(address)
    assert notifier.send(READY="1", STATUS="2 open grant(s)\nsecond line")
    assert _receive(server) == {"READY": "1", "STATUS": "2 open grant(s) second line"}
    assert notifier.send(WATCHDOG="1")
    assert _receive(server) == {"WATCHDOG": "1"}
    notifier.close()


def test_an_at_sign_names_an_abstract_socket() -> None:
    name = f"sknock-test-notify-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    server.settimeout(5)
    try:
        notifier = notifier_from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send(READY="1")
        assert _receive(server) == {"READY": "1"}
    finally:
        server.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = notifier_from_environment({})
    assert notifier.address is None
    assert not notifier.send(READY="1")


def test_a_missing_socket_is_reported_once_and_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SocketNotifier(str(tmp_path / "nobody-listens"))
    assert not notifier.send(READY="1")
    assert not notifier.send(WATCHDOG="1")
    assert sum("cannot notify the service manager" in r.getMessage() for r in caplog.records) == 1


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_heartbeat_ready_once_then_status_on_change_and_watchdog_while_alive() -> None:
    beat = Heartbeat(watchdog=10.0, status_interval=5.0)
    assert beat.fields(0.0, ready=False, alive=False, status="starting") == {}  # nothing before READY
    assert beat.fields(1.0, ready=True, alive=True, status="0 open") == {"READY": "1", "STATUS": "0 open",
                                                                         "WATCHDOG": "1"}
    assert beat.fields(2.0, ready=True, alive=True, status="0 open") == {}
    assert beat.fields(3.0, ready=True, alive=True, status="1 open") == {}  # at most one STATUS per 5 s
    assert beat.fields(6.0, ready=True, alive=True, status="1 open") == {"STATUS": "1 open"}
    assert beat.fields(11.5, ready=True, alive=False, status="1 open") == {}  # a child is gone: no WATCHDOG
    assert beat.fields(12.0, ready=True, alive=True, status="1 open") == {"WATCHDOG": "1"}


class RecordingNotifier:
    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def send(self, **fields: str) -> bool:
        self.sent.append(fields)
        return True


def test_the_monitor_says_ready_only_once_its_children_run_and_watchdog_only_while_they_do() -> None:
    now = [100.0]
    children: list[socket.socket] = []

    def spawn(role: str, index: int, fds: object) -> tuple[int, socket.socket]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        children.append(theirs)
        return 0, mine  # pid 0: nothing to signal or reap

    notifier = RecordingNotifier()
    monitor = Monitor(firewall=RecordingFirewall(), max_duration=60, spawn=spawn, workers=2, notifier=notifier,
                      watchdog=10.0, clock=lambda: now[0], wall_clock=lambda: 1_800_000_000.0)
    monitor._tell_manager(now[0])
    assert notifier.sent == []  # no worker runs yet
    monitor._start_children()
    monitor._tell_manager(now[0])
    assert notifier.sent[-1]["READY"] == "1" and notifier.sent[-1]["WATCHDOG"] == "1"
    assert notifier.sent[-1]["STATUS"].startswith("0 open grant(s); 2/2 worker(s)")
    children[0].close()  # worker 1 dies
    assert monitor.read(monitor.children[0].channel) == []  # type: ignore[arg-type]
    now[0] += 20
    monitor._tell_manager(now[0])
    assert all("WATCHDOG" not in sent for sent in notifier.sent[1:])  # silent while a worker is missing
    monitor._respawn_due(now[0] + 60)
    monitor._tell_manager(now[0] + 60)
    assert notifier.sent[-1].get("WATCHDOG") == "1"
    monitor.shutdown()
    assert notifier.sent[-1]["STOPPING"] == "1"
    for child in children:
        child.close()


def test_the_status_line_without_revocation_says_so() -> None:
    from sknock.server.crl_refresh import CrlSet

    monitor = Monitor(firewall=RecordingFirewall(), max_duration=60, crl=CrlSet([]), clock=lambda: 0.0,
                      wall_clock=lambda: 1_800_000_000.0)
    assert monitor.status_line() == "0 open grant(s); 0/0 worker(s); no CRL checked (revocation none)"


def test_the_notify_variables_are_dropped_once_read() -> None:
    from sknock.server.notify import forget_environment

    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/usr/bin"}
    forget_environment(environ)
    assert environ == {"PATH": "/usr/bin"}
