"""The metrics, in memory: the worker's stats message (every byte hostile), the delta reporter, the
monitor's totals, the exposition through prometheus_client, the metricsListen option, and the kernel's
drop counter on a real loopback socket."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sknock.errors import ConfigError, Reason
from sknock.server.capture import kernel_drops
from sknock.server.config import MetricsListen, _Field, _metrics_listen
from sknock.server.metrics import (
    LATENCY_BUCKETS,
    CrlFigures,
    Metrics,
    Snapshot,
    SnapshotCollector,
    StatsReporter,
    open_listener,
)
from sknock.server.privsep import STATS_PREFIX, PrivsepError, WorkerStats, encode_stats, parse_stats

REASONS = list(Reason)
STATS = struct.Struct(f"!4sB{1 + len(REASONS)}Q")  # written out again, as privsep's docstring states it

# -- the stats message ---------------------------------------------------------------------------------

_stats = st.builds(WorkerStats, received=st.integers(0, 2**40),
                   refused=st.lists(st.integers(0, 2**40), min_size=len(REASONS), max_size=len(REASONS)).map(tuple))


@settings(max_examples=300, deadline=None)
@given(_stats)
def test_stats_round_trip(stats: WorkerStats) -> None:
    data = encode_stats(stats)
    assert data == STATS.pack(STATS_PREFIX, len(REASONS), stats.received, *stats.refused)
    assert parse_stats(data) == stats


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=STATS.size + 16) | st.binary(min_size=STATS.size, max_size=STATS.size).map(
    lambda b: STATS_PREFIX + b[4:]))
def test_any_bytes_give_stats_or_a_privsep_error(data: bytes) -> None:
    try:
        stats = parse_stats(data)
    except PrivsepError:
        return
    assert len(stats.refused) == len(REASONS) and all(0 <= n <= 2**40 for n in (stats.received, *stats.refused))


@pytest.mark.parametrize("data", [
    STATS.pack(STATS_PREFIX, len(REASONS), 1, *[0] * len(REASONS))[:-1],  # one byte short
    STATS.pack(STATS_PREFIX, len(REASONS), 1, *[0] * len(REASONS)) + b"\0",  # one byte more
    STATS.pack(STATS_PREFIX, len(REASONS) - 1, 1, *[0] * len(REASONS)),  # another count of reasons
    STATS.pack(b"STX\0", len(REASONS), 1, *[0] * len(REASONS)),
    STATS.pack(STATS_PREFIX, len(REASONS), 2**40 + 1, *[0] * len(REASONS)),  # more than any second's count
    STATS.pack(STATS_PREFIX, len(REASONS), 0, *[2**64 - 1] * len(REASONS)),  # a "negative" delta
])
def test_bad_stats_are_refused(data: bytes) -> None:
    with pytest.raises(PrivsepError):
        parse_stats(data)


# -- the reporter and the totals --------------------------------------------------------------------------


def test_the_reporter_sends_deltas_at_most_once_an_interval_and_only_changes() -> None:
    reporter = StatsReporter(interval=1.0)
    assert reporter.message(0.0, 0, {}, 0) is None  # nothing counted yet
    first = reporter.message(1.0, 5, {"stale": 2, "granted": 3}, 1)
    assert first is not None
    stats = parse_stats(first)
    assert stats.received == 6  # the capture's exact copy is a datagram received, and refused replay-seen
    assert stats.refused[REASONS.index(Reason.STALE)] == 2
    assert stats.refused[REASONS.index(Reason.REPLAY_SEEN)] == 1
    assert sum(stats.refused) == 3  # "granted" is not a refusal
    assert reporter.message(1.5, 9, {"stale": 2}, 1) is None  # too soon
    second = reporter.message(2.0, 9, {"stale": 4}, 1)
    assert second is not None and parse_stats(second).received == 4
    assert parse_stats(second).refused[REASONS.index(Reason.STALE)] == 2
    assert reporter.message(3.0, 9, {"stale": 4}, 1) is None  # nothing new


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(REASONS), st.integers(0, 5)), max_size=30))
def test_the_monitor_sums_to_what_the_worker_counted(steps: list[tuple[int, Reason, int]]) -> None:
    reporter, metrics = StatsReporter(interval=0.0), Metrics()
    received, refusals, copies = 0, dict.fromkeys((r.value for r in REASONS), 0), 0
    for index, (new, reason, copy) in enumerate(steps):
        received, copies = received + new, copies + copy
        refusals[reason.value] += new
        message = reporter.message(float(index), received, refusals, copies)
        if message is not None:
            metrics.add_worker(parse_stats(message))
    assert metrics.received == received + copies
    expected = dict(refusals)
    expected[Reason.REPLAY_SEEN.value] += copies
    assert metrics.refused == expected


class _Request:
    def __init__(self, op: str, received: float) -> None:
        self.op, self.received = op, received


def test_applied_knocks_count_grants_latency_and_close_requests() -> None:
    metrics = Metrics()
    metrics.applied([(_Request("open", 10.0), ["tcp/22"]), (_Request("open", 9.9995), ["tcp/22", "tcp/80"]),
                     (_Request("close", 10.0), ["tcp/22", "tcp/80"]), (_Request("open", 0.0), ["tcp/22"])],
                    now=10.003)
    metrics.observe(60.0)  # above the last bucket
    snap = metrics.snapshot(grants_open=2)
    assert snap.granted == 3 and snap.closed["close_request"] == 2
    assert snap.latency_count == 3  # the request without a receipt time has no latency
    assert snap.latency_buckets[LATENCY_BUCKETS.index(0.005)] == 2
    assert snap.latency_sum == pytest.approx(0.003 + 0.0035 + 60.0)


def test_a_snapshot_travels_whole() -> None:
    metrics = Metrics()
    metrics.refuse(Reason.REPLAY, 2)
    metrics.close("expiry", 3)
    metrics.crl_refreshed(["updated", "failed", "failed"])
    snap = metrics.snapshot(grants_open=1, crls=[CrlFigures("/etc/sknock/crl.der", 10.0, -5.0)], capture_drops=7)
    assert Snapshot.decode(snap.encode()) == snap
    with pytest.raises((ValueError, TypeError, KeyError)):
        Snapshot.decode(b"[1, 2]")


def test_the_exposition_has_every_metric_with_prometheus_names() -> None:
    metrics = Metrics()
    metrics.add_worker(WorkerStats(5, tuple(1 if r is Reason.STALE else 0 for r in REASONS)))
    metrics.applied([(_Request("open", 1.0), ["tcp/22"])], now=1.004)
    metrics.worker_restarts = 1
    collector = SnapshotCollector()
    collector.snapshot = metrics.snapshot(grants_open=1, crls=[CrlFigures("https://ca/crl.der", 60.0, 3600.0)],
                                          capture_drops=4)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert set(families) == {
        "sknock_knocks_received", "sknock_knocks_granted", "sknock_knocks_refused", "sknock_grants_open",
        "sknock_grants_closed", "sknock_knock_to_grant_seconds", "sknock_crl_age_seconds",
        "sknock_crl_next_update_seconds", "sknock_crl_refresh", "sknock_worker_restarts", "sknock_capture_drops",
        "sknock_foreign_entries_removed",
    }
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("sknock_knocks_received_total", ())] == 5
    assert values[("sknock_knocks_refused_total", (("reason", "stale"),))] == 1
    assert len([k for k in values if k[0] == "sknock_knocks_refused_total"]) == len(REASONS)
    assert values[("sknock_knock_to_grant_seconds_bucket", (("le", "0.002"),))] == 0
    assert values[("sknock_knock_to_grant_seconds_bucket", (("le", "0.005"),))] == 1
    assert values[("sknock_knock_to_grant_seconds_bucket", (("le", "+Inf"),))] == 1
    assert values[("sknock_crl_next_update_seconds", (("source", "https://ca/crl.der"),))] == 3600.0
    assert values[("sknock_worker_restarts_total", ())] == 1
    assert values[("sknock_capture_drops_total", ())] == 4


# -- metricsListen ----------------------------------------------------------------------------------------

FIELD = _Field(Path("/etc/sknock/config.ini"), "metricsListen")


@pytest.mark.parametrize(("text", "shown"), [
    ("9465", "127.0.0.1:9465"), ("127.0.0.1:9100", "127.0.0.1:9100"), ("[::1]:9465", "[::1]:9465"),
    ("198.18.7.1:65535", "198.18.7.1:65535"),
])
def test_metrics_listen_accepts(text: str, shown: str) -> None:
    assert str(_metrics_listen(FIELD, text)) == shown


@pytest.mark.parametrize(("text", "problem"), [
    ("localhost:9465", "not an IP address"), ("0.0.0.0:9465", "every address"), ("[::]:9465", "every address"),
    ("::1:9465", "in brackets"), ("127.0.0.1:0", "1..65535"), ("127.0.0.1:70000", "1..65535"),
    ("127.0.0.1:", "1..65535"), ("224.0.0.1:9465", "multicast"), ("x", "1..65535"),
])
def test_metrics_listen_refuses(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        _metrics_listen(FIELD, text)
    assert str(info.value).startswith("/etc/sknock/config.ini: metricsListen: ")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.tuples(st.ip_addresses(), st.integers(-5, 70000)).map(
    lambda t: f"[{t[0]}]:{t[1]}" if t[0].version == 6 else f"{t[0]}:{t[1]}"))
def test_any_text_gives_a_listen_address_or_a_config_error(text: str) -> None:
    try:
        listen = _metrics_listen(FIELD, text)
    except ConfigError:
        return
    assert isinstance(listen, MetricsListen)
    assert 1 <= listen.port <= 65535 and not listen.address.is_unspecified
    assert _metrics_listen(FIELD, str(listen)) == listen


def test_a_port_in_use_is_a_config_error() -> None:
    import ipaddress

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(ConfigError, match="metricsListen: cannot listen on 127.0.0.1:"):
            open_listener(ipaddress.IPv4Address("127.0.0.1"), taken.getsockname()[1])
    finally:
        taken.close()


# -- the kernel's drops -----------------------------------------------------------------------------------


def test_kernel_drops_counts_what_a_full_receive_buffer_lost() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        receiver.bind(("127.0.0.1", 0))
        assert kernel_drops([receiver.fileno()]) == 0
        for _ in range(200):  # bounded: far more than 4 KiB of buffer holds
            sender.sendto(b"x" * 500, receiver.getsockname())
        drops = kernel_drops([receiver.fileno()])
        assert 0 < drops <= 200
        assert kernel_drops([receiver.fileno()]) == drops  # read without resetting
        receiver.recv(1000)  # still a working socket: kernel_drops left it open


def test_the_docs_and_the_dashboard_name_exactly_the_metrics_served() -> None:
    import re

    collector = SnapshotCollector()
    collector.snapshot = Metrics().snapshot(grants_open=0, crls=[CrlFigures("x", 1.0, 1.0)])
    samples = {sample.name for family in collector.collect() for sample in family.samples}
    docs = Path(__file__).resolve().parents[1] / "docs"
    table = set(re.findall(r"^\| `(sknock_\w+)`", (docs / "metrics.md").read_text(), re.MULTILINE))
    histogram = "sknock_knock_to_grant_seconds"
    assert table == {s for s in samples if not s.startswith(histogram)} | {histogram}
    dashboard = set(re.findall(r"sknock_\w+", (docs / "grafana-sknock.json").read_text())) - {"sknock"}
    assert dashboard <= samples, dashboard - samples


# -- the monitor's counting, through real socketpairs ----------------------------------------------------


def test_the_monitor_counts_grants_refusals_closes_and_sums_the_workers(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import ipaddress

    from sknock.ports import Protocol
    from sknock.server.firewall.base import Opening
    from sknock.server.monitor import Monitor
    from sknock.server.privsep import GrantRequest, encode_request
    from tests.test_monitor import Clock, RecordingFirewall

    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    clock = Clock()
    monitor = Monitor(firewall=RecordingFirewall(), channels=[p[0] for p in pairs], max_duration=3600, clock=clock,
                      wall_clock=lambda: 1_900_000_000.0)
    workers = [p[1] for p in pairs]
    address = ipaddress.ip_address("198.18.0.2")

    def knock(op: str, port: int, nonce: bytes, received: float = 0.0) -> bytes:
        return encode_request(GrantRequest(op, Opening(address, Protocol.TCP, port), 15.0, "CN=alice", nonce,  # type: ignore[arg-type]
                                           2_000_000_000.0, (), received))

    def turn() -> None:
        requests = []
        for channel in monitor.channels:
            requests += monitor.read(channel)
        monitor.apply(requests)

    stale = tuple(3 if r is Reason.STALE else 0 for r in REASONS)
    workers[0].send(encode_stats(WorkerStats(7, stale)))
    workers[1].send(encode_stats(WorkerStats(4, stale)))
    workers[0].send(knock("open", 80, b"x" * 16, clock.now - 0.004))  # one knock, two ports: one grant
    workers[0].send(knock("open", 443, b"x" * 16, clock.now - 0.004))
    workers[0].send(knock("open", 22, b"y" * 16, clock.now - 0.0015))
    workers[1].send(knock("open", 22, b"y" * 16, clock.now - 0.0015))  # the same knock at another worker: replay
    workers[1].send(b"STS\0" + bytes(10))  # malformed: refused, not counted
    caplog.set_level("ERROR", logger="sknock.monitor")
    turn()
    assert any("malformed" in r.getMessage() for r in caplog.records)
    snap = monitor.metrics.snapshot(grants_open=len(monitor.grants))
    assert (snap.received, snap.granted, snap.grants_open) == (11, 2, 3)
    assert snap.refused["stale"] == 6 and snap.refused["replay"] == 1 and sum(snap.refused.values()) == 7
    assert snap.latency_count == 2
    assert snap.latency_buckets[LATENCY_BUCKETS.index(0.002)] == 1  # 1.5 ms
    assert snap.latency_buckets[LATENCY_BUCKETS.index(0.005)] == 1  # 4 ms

    workers[0].send(knock("close", 443, b"z" * 16))
    turn()
    clock.now += 16
    monitor.expire()
    closed = monitor.metrics.snapshot(grants_open=len(monitor.grants)).closed
    assert closed["close_request"] == 1 and closed["expiry"] == 2 and len(monitor.grants) == 0
    for end in workers + monitor.channels:
        end.close()


def test_kernel_drops_skips_what_is_not_a_socket(tmp_path: Path) -> None:
    import os

    fd = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
    try:
        assert kernel_drops([fd]) == 0
        os.fstat(fd)  # still open: kernel_drops closes nothing
    finally:
        os.close(fd)


# -- the CRL fetcher's results ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12) | st.tuples(st.integers(0, 255), st.integers(0, 255)).map(
    lambda t: b"RES\0" + bytes(t)))
def test_any_bytes_give_a_fetch_result_or_a_privsep_error(data: bytes) -> None:
    from sknock.server.privsep import FETCH_STATUSES, encode_fetch_result, parse_fetch_result

    try:
        source, status = parse_fetch_result(data)
    except PrivsepError:
        return
    assert status in FETCH_STATUSES and encode_fetch_result(source, status) == data


def test_the_fetchers_results_are_counted_for_its_sources_only(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    from sknock.server.crl_refresh import CrlRefresher, CrlSet
    from sknock.server.monitor import Child, Monitor
    from sknock.server.privsep import encode_fetch_result
    from tests.test_monitor import RecordingFirewall

    def refuse(data: bytes) -> Any:
        raise ValueError("not a CRL")

    crls = CrlSet([CrlRefresher("https://ca.example/crl.der", tmp_path / "a.crl", refuse, read_existing=False),
                   CrlRefresher(str(tmp_path / "local.crl"), tmp_path / "b.crl", refuse, read_existing=False)])
    monitor = Monitor(firewall=RecordingFirewall(), max_duration=60, crl=crls)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    fetcher = Child("crl fetcher", 0, 0, ours)
    caplog.set_level("ERROR", logger="sknock.monitor")
    for message in (encode_fetch_result(0, "failed"), encode_fetch_result(0, "unchanged"),
                    encode_fetch_result(1, "updated"),  # source 1 is a file the monitor reads itself: ignored
                    b"RES\0\0\7"):  # malformed
        theirs.send(message)
        monitor._read_fetcher(fetcher)
    assert monitor.metrics.crl_refreshes == {"updated": 0, "unchanged": 1, "failed": 1}
    assert any("malformed" in r.getMessage() for r in caplog.records)
    monitor.offer_crl(b"junk", 0)  # bytes the monitor refuses count as a failed refresh too
    assert monitor.metrics.crl_refreshes["failed"] == 2
    ours.close()
    theirs.close()
