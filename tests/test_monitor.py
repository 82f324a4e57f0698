"""The monitor's own logic, driven through real socketpairs, real child processes and real CRLs, on a
clock the tests move: batching, the journal of applied knocks (replays, also across a restart),
close-now, expiry and retried closes, the CRL (verified before it is written or handed to workers),
the firewall watch, replacing a worker that dies, and a stop that leaves the policy in place.

The firewall backend here is a small recording backend (the kernel side is covered by
test_firewall_kernel.py and test_server_e2e.py); everything else is the real code."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest

from sknock.ports import Protocol
from sknock.server.firewall.base import Firewall, FirewallError, Held, Opening
from sknock.server.journal import KnockJournal
from sknock.server.monitor import CRL_PREFIX, FOREIGN_INTERVAL, FOREIGN_NAMED, LOG_GROUP, BatchRule, Monitor, RecentRate
from sknock.server.privsep import GrantRequest, encode_request

A = ipaddress.ip_address("198.18.0.2")
B = ipaddress.ip_address("198.18.0.3")
WATCH_STEP = 0.5


class RecordingFirewall(Firewall):
    name = "recording"
    kernel_expiry = False

    def __init__(self, refuse: Sequence[Opening] = ()) -> None:
        self.batches: list[tuple[list[tuple[Opening, float]], list[Opening]]] = []
        self.known: list[set[Opening]] = []
        self.open_now: dict[Opening, float] = {}
        self.refuse = set(refuse)
        self.refuse_close: set[Opening] = set()
        self.torn_down = False
        self.is_intact = True
        self.restored: list[list[tuple[Opening, float]]] = []
        self.by_hand: list[Held] = []  # entries someone else put in "the kernel"
        self.removed: list[Held] = []

    def held(self) -> list[Held]:
        return [Held(o) for o in self.open_now] + list(self.by_hand)

    def remove(self, entries: Sequence[Held]) -> list[tuple[Held, FirewallError]]:
        for entry in entries:
            self.removed.append(entry)
            if entry in self.by_hand:
                self.by_hand.remove(entry)
            elif entry.opening is not None:
                self.open_now.pop(entry.opening, None)
        return []

    def setup(self) -> list[tuple[Opening, float]]:
        return []

    def intact(self) -> bool:
        return self.is_intact

    def restore(self, grants: Sequence[tuple[Opening, float]]) -> list[tuple[Opening, float]]:
        self.restored.append(list(grants))
        self.open_now = dict(grants)
        self.is_intact = True
        return list(grants)

    def open(self, opening: Opening, duration: float) -> None:
        if opening in self.refuse:
            raise FirewallError(self.name, f"refusing {opening}")
        self.open_now[opening] = duration

    def close(self, opening: Opening) -> None:
        if opening in self.refuse_close:
            raise FirewallError(self.name, f"cannot close {opening}")
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
        firewall=firewall, channels=[p[0] for p in pairs], max_duration=3600, clock=clock,
        wall_clock=lambda: 1_900_000_000.0,
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
    needle = "replay (its nonce was granted by another worker or before a restart)"
    assert any(needle in r.getMessage() for r in caplog.records)


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


def test_recent_rate_counts_only_the_window() -> None:
    rate = RecentRate(0.01)
    assert rate.per_second(100.0) == 0
    rate.add(100.0, 5)
    rate.add(100.004, 15)
    assert rate.per_second(100.005) == pytest.approx(2000)
    assert rate.per_second(100.0105) == pytest.approx(1500)  # the first 5 have left the window
    assert rate.per_second(100.02) == 0


def test_batch_rule_holds_only_under_load() -> None:
    rule = BatchRule(min_interval=0.001, busy_rate=2000, window=0.01)
    assert rule.hold(100.0) == 0  # nothing applied yet
    rule.applied(100.0, 1)
    assert rule.hold(100.0002) == 0  # 100 requests a second: apply at once
    rule.applied(100.0003, 30)  # 3,100 a second over the window: busy
    assert rule.hold(100.0005) == pytest.approx(0.0008)
    assert rule.hold(100.0014) == 0  # the interval has passed
    assert rule.hold(100.03) == 0


def test_a_held_batch_is_not_woken_by_each_message_and_takes_what_came_meanwhile(setup) -> None:  # type: ignore[no-untyped-def]
    """Under load a batch is held for the rest of the interval; the workers' messages do not wake the
    monitor then (each would cost a turn, and the sender the wake-up), and what they sent during the hold
    joins the batch when it ends."""
    import selectors

    monitor, firewall, workers, clock = setup
    waited: list[float] = []

    class Waiting(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
        """Waits on the timeline: the test's clock moves by the time waited."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            waited.append(timeout or 0.0)
            clock.now += timeout or 0.0
            return super().select(0)

    monitor._selector = selectors.DefaultSelector()
    for child in monitor.children:
        monitor._selector.register(child.channel, selectors.EVENT_READ, child)
    monitor._holding = Waiting()
    try:
        monitor._batch.applied(clock.now, 100)  # a batch of 100 just now: busy, the next one is held
        for i in range(3):
            workers[0].send(request("open", A, 2000 + i, bytes([i + 1]) * 16))
        monitor.turn(0)  # reads the three, holds them
        assert not firewall.batches and len(monitor._pending) == 3
        for i in range(3, 5):
            workers[1].send(request("open", A, 2000 + i, bytes([i + 1]) * 16))
        timeout = monitor._timeout()
        assert 0 < timeout <= 0.001
        monitor.turn(timeout)  # waits out the hold without the channels, then reads them and applies
        assert waited == [timeout]
        assert len(firewall.batches) == 1 and len(firewall.batches[0][0]) == 5
        assert len(monitor.grants) == 5 and not monitor._pending
    finally:
        monitor._selector.close()
        monitor._holding.close()


# -- closes that happen --------------------------------------------------------------------------------


def test_a_close_that_fails_stays_listed_overdue_and_is_retried_until_it_works(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, clock = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    opening = Opening(A, Protocol.TCP, 22)
    workers[0].send(request("open", A, 22, b"\x21" * 16, duration=10))
    drain(monitor)
    firewall.refuse_close.add(opening)
    clock.now += 10
    monitor.expire()
    [entry] = monitor.status()["grants"]  # type: ignore[misc]
    assert entry["overdue"] is True and entry["close_failures"] == 1
    assert opening in firewall.open_now
    assert any("could not close tcp/22 for 198.18.0.2" in r.getMessage() and "retried in 1 s" in r.getMessage()
               for r in caplog.records)
    clock.now += 0.5
    monitor.expire()  # not yet: the backoff is 1 s
    assert monitor.grants.next_deadline() == pytest.approx(clock.now + 0.5)
    clock.now += 0.5
    monitor.expire()  # fails again: 2 s next
    assert monitor.status()["grants"][0]["close_failures"] == 2  # type: ignore[index]
    assert monitor.grants.next_deadline() == pytest.approx(clock.now + 2)
    firewall.refuse_close.clear()
    clock.now += 2
    monitor.expire()
    assert monitor.status()["grants"] == [] and firewall.open_now == {}
    assert any("closed tcp/22 for 198.18.0.2: window ended" in r.getMessage() for r in caplog.records)


# -- the journal: no replay, also across a restart -----------------------------------------------------


def test_a_knock_applied_before_a_restart_is_refused_after_it(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="sknock.monitor")
    wall = 1_900_000_000.0
    path = tmp_path / "state" / "replay.journal"

    def started() -> tuple[Monitor, RecordingFirewall, socket.socket]:
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        firewall = RecordingFirewall()
        journal = KnockJournal(path, capacity=1000, now=wall, window=7)
        monitor = Monitor(firewall=firewall, channels=[here], max_duration=3600, journal=journal,
                          wall_clock=lambda: wall)
        return monitor, firewall, there

    first, _, worker = started()
    nonce = b"\x31" * 16
    worker.send(request("open", A, 22, nonce))
    drain(first)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    first.journal.close()  # the process ends (no stop needed: the record was written before the grant)

    second, firewall, worker = started()
    worker.send(request("open", B, 22, nonce))  # the captured knock, replayed from another address
    worker.send(request("open", B, 23, b"\x32" * 16))  # a new knock
    drain(second)
    assert list(firewall.open_now) == [Opening(B, Protocol.TCP, 23)]
    assert any("refused knock from 198.18.0.3: replay" in r.getMessage() for r in caplog.records)


def test_the_journal_floor_refuses_what_a_lost_journal_could_have_held(tmp_path: Path) -> None:
    """A journal that cannot be read at start (an I/O error) sets the floor: every knock signed within
    a window of the start (its expiry within two windows) might have been applied before, and is refused."""
    wall = 1_900_000_000.0
    journal = KnockJournal(tmp_path / "replay.journal", capacity=10, now=wall, window=7)
    assert journal.problem is None and journal.floor == float("-inf")  # a missing file is a first start
    journal.floor = wall + 14  # as __init__ sets it when the read fails
    assert journal.seen(b"k" * 19, wall + 14, wall)  # signed at start + 7 s: could have been applied before
    assert not journal.seen(b"k" * 19, wall + 14.5, wall)
    # a journal path that cannot be written at all stops the start (the daemon says so and exits 2)
    (tmp_path / "dir.journal").mkdir()
    with pytest.raises(OSError):
        KnockJournal(tmp_path / "dir.journal", capacity=10, now=wall, window=7)


def test_a_journal_that_cannot_be_written_refuses_the_batch(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="sknock.monitor")
    here, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    firewall = RecordingFirewall()
    journal = KnockJournal(tmp_path / "replay.journal", capacity=1000, now=1_900_000_000.0, window=7)
    monitor = Monitor(firewall=firewall, channels=[here], max_duration=3600, journal=journal,
                      wall_clock=lambda: 1_900_000_000.0)
    journal.close()
    journal._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF
    worker.send(request("open", A, 22, b"\x41" * 16))
    drain(monitor)
    assert firewall.open_now == {} and len(monitor.grants) == 0
    assert any("cannot record them" in r.getMessage() for r in caplog.records)


# -- the firewall watch ----------------------------------------------------------------------------------


def test_a_firewall_changed_by_something_else_is_restored_with_the_grants_still_due(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, clock = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    workers[0].send(request("open", A, 22, b"\x51" * 16, duration=10))
    workers[0].send(request("open", A, 23, b"\x52" * 16, duration=2))
    drain(monitor)
    clock.now += 3  # tcp/23's window ended (not yet closed by expire): it is not put back
    firewall.is_intact = False
    firewall.open_now.clear()  # `nft flush ruleset`
    monitor.watch()
    assert firewall.restored == [[(Opening(A, Protocol.TCP, 22), pytest.approx(7))]]
    assert list(firewall.open_now) == [Opening(A, Protocol.TCP, 22)]
    assert any(r.levelname == "ERROR" and "removed or changed by something else" in r.getMessage()
               for r in caplog.records)
    monitor.watch()  # intact again: nothing more
    assert len(firewall.restored) == 1


def test_an_entry_no_knock_granted_is_removed_and_named_and_a_grant_of_the_same_turn_kept(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, clock = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    stranger = Held(Opening(ipaddress.ip_address("198.18.9.9"), Protocol.TCP, 22))
    odd = Held(None, "198.18.9.10 -> protocol 132/0")
    firewall.by_hand = [stranger, odd]
    workers[0].send(request("open", A, 22, b"\x61" * 16, duration=10))
    drain(monitor)  # applied in the same turn as the check, just before it
    monitor.watch()
    assert firewall.removed == [stranger, odd] and firewall.by_hand == []
    assert list(firewall.open_now) == [Opening(A, Protocol.TCP, 22)] and Opening(A, Protocol.TCP, 22) in monitor.grants
    lines = [r for r in caplog.records if "not granted by a knock" in r.getMessage()]
    assert [r.levelname for r in lines] == ["ERROR", "ERROR"]
    assert "removed 198.18.9.9 -> tcp/22 from sknock's firewall (recording)" in lines[0].getMessage()
    assert "198.18.9.10 -> protocol 132/0" in lines[1].getMessage()
    assert lines[0].source == "198.18.9.9" and lines[0].ports == ["tcp/22"]
    assert monitor.metrics.snapshot(grants_open=1).foreign_removed == 2

    firewall.by_hand = [stranger]  # again, at once: seen at the next check, FOREIGN_INTERVAL later
    monitor.watch()
    assert firewall.by_hand == [stranger]
    clock.now += FOREIGN_INTERVAL
    monitor.watch()
    assert firewall.by_hand == [] and firewall.restored == []


def test_a_carried_grant_longer_than_any_knock_grants_is_not_kept_and_is_removed(caplog) -> None:  # type: ignore[no-untyped-def]
    """setup() carries over what a previous run's table held; an element with more time left than
    maxOpenDuration was put there by hand (with a timeout, before this start): it is not taken as a
    grant, so the first check removes it."""
    caplog.set_level("INFO", logger="sknock.monitor")
    kept, long = Opening(A, Protocol.TCP, 22), Opening(B, Protocol.TCP, 22)
    firewall = RecordingFirewall()
    firewall.open_now = {kept: 300.0, long: 86400.0}
    monitor = Monitor(firewall=firewall, max_duration=300, clock=Clock(), carried=[(kept, 300.4), (long, 86400.0)])
    assert kept in monitor.grants and long not in monitor.grants
    assert any("not keeping 198.18.0.3 -> tcp/22" in r.getMessage() for r in caplog.records)
    monitor.watch()
    assert firewall.removed == [Held(long)] and list(firewall.open_now) == [kept]


def test_many_entries_no_knock_granted_share_one_line(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, _, _ = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    firewall.by_hand = [Held(Opening(ipaddress.ip_address(f"198.18.9.{i}"), Protocol.UDP, 53)) for i in range(40)]
    monitor.watch()
    assert firewall.by_hand == []
    [line] = [r.getMessage() for r in caplog.records if "not granted by a knock" in r.getMessage()]
    assert line.startswith("removed 40 entries from sknock's firewall (recording): 198.18.9.0 -> udp/53, ")
    assert f"and {40 - FOREIGN_NAMED} more" in line


def test_a_changed_firewall_has_what_no_knock_granted_removed_before_it_is_restored(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    """As with iptables, where a rule added by hand changes the chain's length: the check runs at once,
    names the rule and removes it; the firewall is then intact, and nothing is restored."""
    monitor, firewall, _, clock = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    monitor.watch()  # the first check is done; the next is FOREIGN_INTERVAL away
    stranger = Held(None, "198.18.9.9/32 -> tcp/22 (rule in SKNOCK, IPv4, -j ACCEPT)")
    firewall.by_hand = [stranger]
    firewall.is_intact = False
    original = firewall.remove

    def remove(entries: Sequence[Held]) -> list[tuple[Held, FirewallError]]:
        firewall.is_intact = True
        failures: list[tuple[Held, FirewallError]] = original(entries)
        return failures

    firewall.remove = remove
    clock.now += WATCH_STEP
    monitor.watch()
    assert firewall.removed == [stranger] and firewall.restored == []
    assert any("198.18.9.9/32 -> tcp/22" in r.getMessage() for r in caplog.records)


# -- the CRL ---------------------------------------------------------------------------------------------


@pytest.fixture
def crl_ca(tmp_path: Path):  # type: ignore[no-untyped-def]
    from sknock import ca as ca_lib
    from tests.pki import PASSWORD_BYTES

    return ca_lib.init_ca(tmp_path / "ca", PASSWORD_BYTES, name="monitor test CA")


def test_a_crl_from_the_fetcher_is_verified_before_it_is_written_or_handed_to_workers(
    tmp_path: Path, crl_ca, caplog  # type: ignore[no-untyped-def]
) -> None:
    import datetime as dt
    from functools import partial

    from cryptography.hazmat.primitives import serialization

    from sknock import ca as ca_lib
    from sknock.server.crl_refresh import CrlRefresher
    from sknock.trust import load_crl
    from tests.pki import PASSWORD_BYTES

    caplog.set_level("INFO")
    now = dt.datetime.now(dt.UTC)
    der = serialization.Encoding.DER
    first = crl_ca.write_crl(now=now - dt.timedelta(hours=2)).public_bytes(der)
    newer = crl_ca.write_crl(now=now - dt.timedelta(hours=1)).public_bytes(der)
    older = crl_ca.write_crl(now=now - dt.timedelta(hours=3)).public_bytes(der)
    other = ca_lib.init_ca(tmp_path / "other", PASSWORD_BYTES, name="monitor test CA").write_crl().public_bytes(der)
    crl_file = tmp_path / "crl.der"
    crl_file.write_bytes(first)
    keeper = CrlRefresher("http://crl.invalid/crl.der", crl_file,
                          partial(load_crl, issuers=[crl_ca.certificate], source="test"))
    keeper.seed(load_crl(first, [crl_ca.certificate], source="test"), first)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    monitor = Monitor(firewall=RecordingFirewall(), channels=[p[0] for p in pairs], max_duration=3600, crl=keeper)

    def handed() -> list[bytes]:
        out = []
        for _, worker in pairs:
            worker.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                out.append(worker.recv(1 << 20))
        return out

    for bad, why in ((b"garbage", "not a DER or PEM CRL"), (other, "signature does not verify"),
                     (older, "older than the CRL in hand")):
        monitor.offer_crl(bad)
        assert crl_file.read_bytes() == first and handed() == []
        assert any(why in r.getMessage() for r in caplog.records), why
    monitor.offer_crl(newer)
    assert crl_file.read_bytes() == newer
    assert handed() == [CRL_PREFIX + newer] * 2
    assert sum("CRL updated" in r.getMessage() for r in caplog.records) == 1


# -- children: a worker that dies is replaced; a stop leaves the policy ------------------------------------


def _spawner(started: list[int]):  # type: ignore[no-untyped-def]
    """Forks children that wait for their channel to close (stand-ins for workers: real processes)."""

    def spawn(role: str, index: int, fds: Sequence[int]) -> tuple[int, socket.socket]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                while theirs.recv(1 << 20):
                    pass
            finally:
                os._exit(0)
        theirs.close()
        started.append(pid)
        return pid, mine

    return spawn


def test_a_worker_that_dies_is_replaced_and_the_policy_stays(caplog) -> None:  # type: ignore[no-untyped-def]
    import selectors
    import signal
    import time

    caplog.set_level("INFO", logger="sknock.monitor")
    started: list[int] = []
    firewall = RecordingFirewall()
    monitor = Monitor(firewall=firewall, max_duration=3600, spawn=_spawner(started), workers=2)
    monitor._selector = selectors.DefaultSelector()
    try:
        monitor._start_children()
        assert len(started) == 2 and monitor.worker_pids == started
        victim = started[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(started) < 3 and time.monotonic() < deadline:
            monitor.turn(0.1)
        assert len(started) == 3, "a replacement was started"
        assert victim not in monitor.worker_pids and started[2] in monitor.worker_pids
        assert not firewall.torn_down
        assert any("worker 1 has gone" in r.getMessage() and "killed by signal 9" in r.getMessage()
                   for r in caplog.records)
        # restarts are bounded: after FREE_RESTARTS quick ones, a replacement waits
        for _ in range(3):
            if not monitor.children[0].pid:
                break  # its replacement is waiting: the bound was reached
            os.kill(monitor.children[0].pid, signal.SIGKILL)
            before = len(started)
            while len(started) == before and monitor.children[0].respawn_at is None and time.monotonic() < deadline:
                monitor.turn(0.1)
        assert monitor.children[0].pid == 0
        assert monitor.children[0].respawn_at is not None and monitor.children[0].respawn_at > monitor.clock()
    finally:
        monitor.shutdown()
    for pid in started:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # every child was reaped
    assert not firewall.torn_down


def test_a_stop_leaves_the_policy_and_closes_only_what_the_kernel_cannot_end(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    workers[0].send(request("open", A, 22, b"\x61" * 16))
    drain(monitor)
    monitor.stop()
    assert monitor.run() == 0
    assert not firewall.torn_down
    assert firewall.open_now == {}  # the recording backend has no kernel expiry: closed at the stop
    assert any("the firewall policy stays in place" in r.getMessage() for r in caplog.records)


def test_a_worker_channel_that_closes_does_not_stop_the_monitor(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    workers[1].close()
    drain(monitor)
    workers[0].send(request("open", A, 22, b"\x71" * 16))
    drain(monitor)
    assert list(firewall.open_now) == [Opening(A, Protocol.TCP, 22)] and not firewall.torn_down
    assert any("worker 2 has gone" in r.getMessage() for r in caplog.records)


# -- revocation ends access; the operator closes grants ----------------------------------------------------


def test_a_new_crl_closes_the_grants_of_the_clients_it_revokes_at_once(tmp_path: Path, crl_ca, caplog) -> None:  # type: ignore[no-untyped-def]
    from functools import partial

    from cryptography.hazmat.primitives import serialization

    from sknock.ports import parse_ports
    from sknock.server.crl_refresh import CrlRefresher
    from sknock.trust import load_crl, revocation_id
    from tests.pki import PASSWORD_BYTES

    caplog.set_level("INFO", logger="sknock.monitor")
    carol = crl_ca.issue_client("carol", parse_ports("tcp/22"), PASSWORD_BYTES)
    dave = crl_ca.issue_client("dave", parse_ports("tcp/22"), PASSWORD_BYTES)
    ids = {name: (revocation_id(crl_ca.certificate.subject, cert.serial_number),)
           for name, cert in (("carol", carol), ("dave", dave))}
    der = serialization.Encoding.DER
    first = crl_ca.write_crl().public_bytes(der)
    crl_file = tmp_path / "crl.der"
    crl_file.write_bytes(first)
    keeper = CrlRefresher(str(crl_file), crl_file, partial(load_crl, issuers=[crl_ca.certificate], source="test"),
                          store=lambda data: None)
    keeper.seed(load_crl(first, [crl_ca.certificate], source="test"), first)
    here, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    firewall = RecordingFirewall()
    monitor = Monitor(firewall=firewall, channels=[here], max_duration=3600, crl=keeper)

    def knock(name: str, address: object, nonce: bytes) -> None:
        worker.send(encode_request(GrantRequest("open", Opening(address, Protocol.TCP, 22), 3000.0, f"CN={name}",  # type: ignore[arg-type]
                                                nonce, 2_000_000_000.0, ids[name])))
        drain(monitor)

    knock("carol", A, b"\x81" * 16)
    knock("dave", B, b"\x82" * 16)
    assert len(firewall.open_now) == 2
    crl_ca.revoke("carol")
    crl_file.write_bytes((crl_ca.directory / "crl.der").read_bytes())
    monitor.refresh_crl(now_requested=True)
    assert list(firewall.open_now) == [Opening(B, Protocol.TCP, 22)]
    assert [e.client for e in monitor.grants.entries()] == ["CN=dave"]
    assert any(r.levelname == "WARNING" and "closed tcp/22 for 198.18.0.2 (CN=carol)" in r.getMessage()
               and "revoked by the new CRL" in r.getMessage() for r in caplog.records)
    # a knock a worker verified before it had the new CRL is refused by the monitor
    knock("carol", A, b"\x83" * 16)
    assert Opening(A, Protocol.TCP, 22) not in firewall.open_now
    assert any("refused knock from 198.18.0.2: cert-revoked" in r.getMessage() for r in caplog.records)


def test_the_operator_closes_grants_by_client_serial_or_address(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, _ = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    grants = [("CN=alice,O=x", A, 22, 0x1234), ("CN=bob", A, 23, 0x99), ("CN=bob", B, 22, 0x99)]
    for i, (client, address, port, serial) in enumerate(grants):
        workers[0].send(encode_request(GrantRequest("open", Opening(address, Protocol.TCP, port), 60.0, client,
                                                    bytes([0x90 + i]) * 16, 2_000_000_000.0,
                                                    ((b"\x05" * 32, serial),))))
    drain(monitor)
    assert monitor.close_command({"serial": 0x1234}) == {
        "closed": ["tcp/22 for 198.18.0.2 (CN=alice,O=x)"], "failed": []}
    assert monitor.close_command({"client": "bob", "address": "198.18.0.2"})["error"]  # type: ignore[index]
    assert monitor.close_command({"address": "198.18.0.3"})["closed"] == ["tcp/22 for 198.18.0.3 (CN=bob)"]
    assert "error" in monitor.close_command({"address": "not an address"})
    assert monitor.close_command({"client": "bob"})["closed"] == ["tcp/23 for 198.18.0.2 (CN=bob)"]
    assert firewall.open_now == {} and len(monitor.grants) == 0
    assert sum("closed by the operator" in r.getMessage() for r in caplog.records) == 3


def test_grants_a_backend_cannot_end_are_recorded_and_ended_after_a_crash(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import json

    from sknock.server.ledger import GrantLedger

    caplog.set_level("INFO", logger="sknock.monitor")
    path = tmp_path / "state" / "grants.json"
    clock = Clock()
    wall = [1_900_000_000.0]
    here, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    first = Monitor(firewall=RecordingFirewall(), channels=[here], max_duration=3600, ledger=GrantLedger(path),
                    clock=clock, wall_clock=lambda: wall[0])
    worker.send(request("open", A, 22, b"\xa1" * 16, duration=10))
    worker.send(request("open", B, 22, b"\xa2" * 16, duration=100))
    drain(first)
    recorded = json.loads(path.read_text())["grants"]
    assert sorted((g["address"], g["expires"]) for g in recorded) == [("198.18.0.2", wall[0] + 10),
                                                                    ("198.18.0.3", wall[0] + 100)]
    assert path.stat().st_mode & 0o777 == 0o600
    # the monitor is killed (no stop); 20 s later a new one starts with a fresh firewall object
    clock.now += 20
    wall[0] += 20
    firewall = RecordingFirewall()
    firewall.open_now = {Opening(A, Protocol.TCP, 22): 10, Opening(B, Protocol.TCP, 22): 100}  # still in the firewall
    second = Monitor(firewall=firewall, max_duration=3600, ledger=GrantLedger(path), clock=clock,
                     wall_clock=lambda: wall[0])
    second.expire()
    assert list(firewall.open_now) == [Opening(B, Protocol.TCP, 22)]  # the one past its time: closed at once
    assert [e["address"] for e in second.status()["grants"]] == ["198.18.0.3"]  # type: ignore[index]
    clock.now += 80
    second.expire()
    assert firewall.open_now == {}
    assert any("left open by a previous run" in r.getMessage() for r in caplog.records)


def test_an_unreadable_ledger_is_reported(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    from sknock.server.ledger import GrantLedger

    caplog.set_level("INFO", logger="sknock.monitor")
    path = tmp_path / "grants.json"
    path.write_text('{"grants": [{"address": "198.18.0.2", "protocol": "tcp", "port": 0, "expires": 1}]}')
    Monitor(firewall=RecordingFirewall(), max_duration=3600, ledger=GrantLedger(path))
    assert any(r.levelname == "ERROR" and "cannot read the grants a previous run left open" in r.getMessage()
               and str(path) in r.getMessage() for r in caplog.records)


def test_an_operator_close_that_fails_stays_listed_and_is_retried(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    monitor, firewall, workers, clock = setup
    caplog.set_level("INFO", logger="sknock.monitor")
    opening = Opening(A, Protocol.TCP, 22)
    workers[0].send(request("open", A, 22, b"\xb1" * 16, duration=60))
    drain(monitor)
    firewall.refuse_close.add(opening)
    assert monitor.close_command({"address": "198.18.0.2"}) == {
        "closed": [], "failed": ["tcp/22 for 198.18.0.2 (CN=alice)"]}
    assert opening in firewall.open_now and monitor.grants.next_deadline() == clock.now
    firewall.refuse_close.clear()
    monitor.expire()  # the retry
    assert firewall.open_now == {} and len(monitor.grants) == 0
