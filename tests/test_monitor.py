"""The monitor's own logic, driven through real socketpairs: batching, the central nonce check,
close-now, expiry, CRL writing, and failing closed when a worker goes.

The firewall backend here is a small recording backend (the kernel side is covered by
test_firewall_kernel.py and test_server_e2e.py); everything else is the real code."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest

from sknock.ports import Protocol
from sknock.server.firewall.base import Firewall, FirewallError, Opening
from sknock.server.monitor import CRL_PREFIX, LOG_GROUP, Monitor, RecentRate
from sknock.server.privsep import GrantRequest, encode_request

A = ipaddress.ip_address("198.18.0.2")
B = ipaddress.ip_address("198.18.0.3")


class RecordingFirewall(Firewall):
    name = "recording"
    kernel_expiry = False

    def __init__(self, refuse: Sequence[Opening] = ()) -> None:
        self.batches: list[tuple[list[tuple[Opening, float]], list[Opening]]] = []
        self.known: list[set[Opening]] = []
        self.open_now: dict[Opening, float] = {}
        self.refuse = set(refuse)
        self.torn_down = False

    def setup(self) -> None:
        pass

    def open(self, opening: Opening, duration: float) -> None:
        if opening in self.refuse:
            raise FirewallError(self.name, f"refusing {opening}")
        self.open_now[opening] = duration

    def close(self, opening: Opening) -> None:
        self.open_now.pop(opening, None)

    def apply(
        self,
        opens: Sequence[tuple[Opening, float]],
        closes: Sequence[Opening],
        known: Collection[Opening] | None = None,
    ) -> list[tuple[Opening, FirewallError]]:
        self.batches.append((list(opens), list(closes)))
        self.known.append(set(known or ()))
        return super().apply(opens, closes, known)

    def openings(self) -> list[Opening]:
        return list(self.open_now)

    def teardown(self) -> None:
        self.torn_down = True
        self.open_now.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(op: str, address: object, port: int, nonce: bytes, duration: float = 15.0) -> bytes:
    return encode_request(
        GrantRequest(op, Opening(address, Protocol.TCP, port), duration, "CN=alice", nonce, 2_000_000_000.0)  # type: ignore[arg-type]
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Monitor, RecordingFirewall, list[socket.socket], Clock]:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    firewall = RecordingFirewall(refuse=[Opening(B, Protocol.TCP, 99)])
    clock = Clock()
    monitor = Monitor(
        firewall=firewall, channels=[p[0] for p in pairs], max_duration=3600, crl_file=tmp_path / "crl.der",
        clock=clock, wall_clock=lambda: 1_900_000_000.0,
    )
    return monitor, firewall, [p[1] for p in pairs], clock


def drain(monitor: Monitor) -> None:
    requests = []
    for channel in monitor.channels:
        requests += monitor.read(channel)
    monitor.apply(requests)


def test_everything_sent_since_the_last_turn_is_one_batch(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    for i in range(50):
        workers[i % 2].send(request("open", A, 1000 + i, bytes([i]) * 16))
    drain(monitor)
    assert len(firewall.batches) == 1
    assert len(firewall.batches[0][0]) == 50
    assert len(monitor.grants) == 50
    assert sum("granted tcp/" in r.getMessage() for r in caplog.records) == 50


def test_knocks_for_the_same_ports_share_log_lines_and_each_is_named(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    """A burst is logged in lines of at most LOG_GROUP knocks, each knock named by address and client;
    a knock for two ports is one knock; an extension and a close have lines of their own."""
    monitor, _, workers, _ = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    addresses = [ipaddress.ip_address(f"198.18.1.{i}") for i in range(1, 41)]
    for i, address in enumerate(addresses):
        workers[i % 2].send(request("open", address, 22, bytes([i]) * 16))
    two_ports = bytes([100]) * 16
    workers[0].send(request("open", A, 80, two_ports))
    workers[0].send(request("open", A, 443, two_ports))
    drain(monitor)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("granted")]
    tcp22 = [line for line in lines if line.startswith("granted tcp/22 to ")]
    assert [line.count("(CN=alice)") for line in tcp22] == [LOG_GROUP, 40 - LOG_GROUP]
    assert all(line.endswith(" for 15 s") for line in tcp22)
    for address in addresses:
        assert sum(f"{address} (CN=alice)" in line for line in tcp22) == 1
    assert "granted tcp/80,tcp/443 to 198.18.0.2 (CN=alice) for 15 s" in lines
    caplog.clear()
    workers[1].send(request("open", addresses[0], 22, bytes([101]) * 16))
    workers[1].send(request("close", addresses[1], 22, bytes([102]) * 16))
    drain(monitor)
    messages = [r.getMessage() for r in caplog.records]
    assert "granted tcp/22 to 198.18.1.1 (CN=alice) for 15 s, extending an open grant" in messages
    assert "closing tcp/22 for 198.18.1.2 (CN=alice) at its request" in messages


def test_a_nonce_seen_from_another_worker_is_refused(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    nonce = b"\x07" * 16
    workers[0].send(request("open", A, 22, nonce))
    drain(monitor)
    workers[1].send(request("open", B, 22, nonce))  # the same knock, replayed from another address
    drain(monitor)
    assert list(firewall.open_now) == [Opening(A, Protocol.TCP, 22)]
    assert any("replay (its nonce was granted by another worker)" in r.getMessage() for r in caplog.records)


def test_the_backend_is_told_which_openings_may_exist(setup) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    workers[0].send(request("open", A, 22, b"\x0a" * 16))
    drain(monitor)
    workers[0].send(request("open", A, 22, b"\x0b" * 16))  # a new knock extends the grant
    workers[0].send(request("open", A, 23, b"\x0c" * 16))
    drain(monitor)
    assert firewall.known == [set(), {Opening(A, Protocol.TCP, 22)}]


def test_the_ports_of_one_knock_share_its_nonce(setup) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    nonce = b"\x08" * 16
    for port in (22, 2000, 2001):
        workers[0].send(request("open", A, port, nonce))
    drain(monitor)
    assert len(firewall.open_now) == 3


def test_close_now_and_expiry(setup) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, clock = setup
    workers[0].send(request("open", A, 22, b"\x01" * 16, duration=10))
    workers[0].send(request("open", A, 23, b"\x02" * 16, duration=10))
    drain(monitor)
    workers[1].send(request("close", A, 22, b"\x03" * 16))
    drain(monitor)
    assert list(firewall.open_now) == [Opening(A, Protocol.TCP, 23)]
    clock.now += 9.9
    monitor.expire()
    assert len(firewall.open_now) == 1
    clock.now += 0.2
    monitor.expire()
    assert firewall.open_now == {} and len(monitor.grants) == 0


def test_a_change_the_firewall_refuses_is_not_recorded_as_granted(setup) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    workers[0].send(request("open", B, 99, b"\x04" * 16))
    workers[0].send(request("open", B, 98, b"\x05" * 16))
    drain(monitor)
    assert Opening(B, Protocol.TCP, 99) not in monitor.grants
    assert Opening(B, Protocol.TCP, 98) in monitor.grants


def test_malformed_messages_are_refused_and_the_rest_applied(setup) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    workers[0].send(b'{"op": "open", "address": "198.18.0.2"}')
    workers[0].send(b"\xff" * 100)
    workers[0].send(request("open", A, 22, b"\x06" * 16))
    drain(monitor)
    assert list(firewall.open_now) == [Opening(A, Protocol.TCP, 22)]


def test_a_crl_from_a_worker_is_written(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monitor, _, workers, _ = setup
    workers[0].send(CRL_PREFIX + b"crl bytes")
    drain(monitor)
    assert (tmp_path / "crl.der").read_bytes() == b"crl bytes"


def test_a_worker_that_goes_shuts_everything_down(setup) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    workers[0].send(request("open", A, 22, b"\x09" * 16))
    workers[1].close()
    assert monitor.run() == 1
    assert firewall.torn_down


def test_recent_rate_counts_only_the_window() -> None:
    rate = RecentRate(0.01)
    assert rate.per_second(100.0) == 0
    rate.add(100.0, 5)
    rate.add(100.004, 15)
    assert rate.per_second(100.005) == pytest.approx(2000)
    assert rate.per_second(100.0105) == pytest.approx(1500)  # the first 5 have left the window
    assert rate.per_second(100.02) == 0
