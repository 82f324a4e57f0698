"""The worker's loop stages with a real verifier, a real socketpair and an in-memory capture.

Knocks are real (the test PKI, real crypto); only the capture is replaced by a list of
:class:`~sknock.server.packet.Datagram` values, so each stage can be driven one call at a time.
Knocks are made and decided at the test PKI's fixed :data:`NOW`: the clients and the worker get it as
their clock."""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from sknock.addresses import IPAddress
from sknock.client import KnockClient
from sknock.errors import KnockRefused, Reason
from sknock.ports import Protocol
from sknock.protocol import Action
from sknock.server.firewall.base import Opening
from sknock.server.packet import Datagram
from sknock.server.privsep import CRL_PREFIX, GrantRequest, parse_request
from sknock.server.worker import RefusalLog, Worker, WorkerLimits
from sknock.verifier import KnockVerifier, VerifierPolicy
from tests.pki import NOW, TestPKI, at

SOURCE = ipaddress.ip_address("198.18.0.2")
OTHER = ipaddress.ip_address("fd00:5e::2")
SERVER = ipaddress.ip_address("198.18.0.1")
MAX_DURATION = 3600.0


class ListCapture:
    """What the worker needs of a capture: filenos() for its selector and receive() to drain."""

    def __init__(self) -> None:
        self.pending: list[Datagram] = []
        self.asked: list[int] = []
        self.remembered: list[tuple[bytes, IPAddress]] = []
        self.final: list[bytes] = []
        self.sent: list[bytes] = []  # every payload put, in order
        self.stats: collections.Counter[str] = collections.Counter()
        self._read, self._write = os.pipe()

    def remember(self, payload: bytes, source: IPAddress) -> None:
        self.remembered.append((payload, source))

    def remember_everywhere(self, payload: bytes) -> None:
        self.final.append(payload)

    def take_copies(self) -> list[bytes]:
        return []

    def put(self, payload: bytes, source: IPAddress = SOURCE) -> None:
        destination = SERVER if source.version == 4 else ipaddress.ip_address("fd00:5e::1")
        self.pending.append(Datagram(payload, source, destination, 40000, 12345, 2))
        self.sent.append(payload)
        os.write(self._write, b"x")  # make the selector wake like a socket with data

    def filenos(self) -> list[int]:
        return [self._read]

    def receive(self, max_count: int = 64) -> list[Datagram]:
        self.asked.append(max_count)
        out, self.pending = self.pending[:max_count], self.pending[max_count:]
        if not self.pending:
            os.set_blocking(self._read, False)
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass
        return out

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    worker_end, firewall_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    firewall_end.settimeout(5)
    yield worker_end, firewall_end
    worker_end.close()
    firewall_end.close()


@pytest.fixture
def capture() -> Iterator[ListCapture]:
    c = ListCapture()
    yield c
    c.close()


def make_verifier(pki: TestPKI, **policy: object) -> KnockVerifier:
    return KnockVerifier(
        server_key=pki.server.credentials.key,
        server_certificate=pki.server.certificate,
        trust=pki.verifier(),
        policy=VerifierPolicy(**{"min_work_bits": 4, **policy}),  # type: ignore[arg-type]
    )


def make_worker(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket], **limits: object
) -> Worker:
    return Worker(
        verifier=make_verifier(pki),
        capture=capture,
        channel=channel[0],
        limits=WorkerLimits(**limits),  # type: ignore[arg-type]
        clock=at(NOW),
    )


def alice(pki: TestPKI) -> KnockClient:
    return KnockClient(credentials=pki.alice.credentials, server_cert=pki.server.certificate, work_bits=4,
                       clock=at(NOW))


def received(firewall_end: socket.socket) -> list[GrantRequest]:
    """Every message waiting on the monitor's end, parsed as the monitor does."""
    out = []
    firewall_end.setblocking(False)
    try:
        while True:
            try:
                data = firewall_end.recv(65536)
            except BlockingIOError:
                break
            out.append(parse_request(data, max_duration=MAX_DURATION))
    finally:
        firewall_end.settimeout(5)
    return out


def test_accept_queues_only_what_passes_the_cheap_checks(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(pki, capture, channel)
    now = NOW
    good = alice(pki).build_knock([(Protocol.TCP, 22)], now=now)
    caplog.set_level(logging.INFO, logger="sknock.worker")
    worker.accept(good, SOURCE, now)
    worker.accept(os.urandom(1024), OTHER, now)  # junk: bad magic
    worker.accept(alice(pki).build_knock([(Protocol.TCP, 22)], now=now - 60), SOURCE, now)  # stale
    worker.accept(good, OTHER, now + 1)  # the same bytes again, from elsewhere: replay
    worker.accept(good, SOURCE, now + 1)  # and from the first source again: replay, at once
    # The copy from elsewhere waits too (the knock might be bound to OTHER: a copy sent first from
    # SOURCE must not burn it), and is decided from the first one's verdict, without a public-key operation.
    assert [source for _, source, _ in worker.queue] == [SOURCE, OTHER]
    assert capture.remembered == [(good, SOURCE), (good, OTHER)]
    assert worker.verifier.counters == {"bad-magic": 1, "stale": 1, "replay-seen": 1}
    assert received(channel[1]) == []  # nothing reaches the monitor before work()
    while worker.queue:
        worker.work()
    assert worker.verifier.counters == {"bad-magic": 1, "stale": 1, "replay-seen": 2, "granted": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "sknock.worker"]
    assert lines == [
        f"refused knock from {OTHER}: bad-magic",
        f"refused knock from {SOURCE}: stale" + lines[1].removeprefix(f"refused knock from {SOURCE}: stale"),
        f"refused knock from {SOURCE}: replay-seen",
        f"refused knock from {OTHER}: replay-seen",
    ]
    assert lines[1].startswith(f"refused knock from {SOURCE}: stale: clock differs by")
    assert [r.opening.address for r in received(channel[1])] == [SOURCE]  # the unbound knock went to SOURCE


def test_read_batch_takes_at_most_read_batch_datagrams(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket]
) -> None:
    worker = make_worker(pki, capture, channel, read_batch=3)
    client = alice(pki)
    now = NOW
    for _ in range(5):
        capture.put(client.build_knock([(Protocol.TCP, 22)], now=now))
    assert worker.read_batch() == 3
    assert worker.read_batch() == 2
    assert worker.read_batch() == 0
    assert capture.asked == [3, 3, 3]
    assert len(worker.queue) == 5


def test_a_full_queue_counts_overload(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(pki, capture, channel, queue_size=3)
    client = alice(pki)
    now = NOW
    caplog.set_level(logging.INFO, logger="sknock.worker")
    for _ in range(5):
        capture.put(client.build_knock([(Protocol.TCP, 22)], now=now))
    worker.read_batch()
    assert len(worker.queue) == 3
    assert worker.verifier.counters["overload"] == 2
    assert sum(f"refused knock from {SOURCE}: overload: verification queue full" == r.getMessage()
               for r in caplog.records) == 2
    # The queued ones are served (in arrival order), and room is made for new ones.
    assert worker.work() >= 1
    while worker.queue:
        worker.work()
    assert len(received(channel[1])) == 3
    worker.accept(client.build_knock([(Protocol.TCP, 22)], now=now), SOURCE, now)
    assert len(worker.queue) == 1 and worker.verifier.counters["overload"] == 2


def test_work_sends_open_requests_the_firewall_process_accepts(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(pki, capture, channel)
    client = alice(pki)
    now = NOW
    caplog.set_level(logging.INFO, logger="sknock.worker")
    capture.put(client.build_knock([(Protocol.TCP, 22), (Protocol.UDP, 8000)], now=now, duration=60))
    capture.put(client.build_knock([(Protocol.TCP, 2005)], now=now), source=OTHER)
    capture.put(client.build_knock([(Protocol.TCP, 2006)], now=now, duration=99_999))  # capped
    worker.read_batch()
    while worker.queue:
        worker.work()
    subject = pki.alice.certificate.subject.rfc4514_string()
    got = received(channel[1])
    assert [(r.op, r.opening, r.duration, r.client) for r in got] == [
        ("open", Opening(SOURCE, Protocol.TCP, 22), 60.0, subject),
        ("open", Opening(SOURCE, Protocol.UDP, 8000), 60.0, subject),
        ("open", Opening(OTHER, Protocol.TCP, 2005), 15.0, subject),
        ("open", Opening(SOURCE, Protocol.TCP, 2006), MAX_DURATION, subject),
    ]
    # Both ports of one knock carry its nonce, for the monitor's replay check; each knock its own.
    assert got[0].nonce == got[1].nonce and len({got[0].nonce, got[2].nonce, got[3].nonce}) == 3
    window = worker.verifier.policy.timestamp_threshold
    assert all(abs(r.expires - (now + window)) < 1 for r in got)
    assert worker.verifier.counters["granted"] == 3
    # The grant itself is logged by the monitor once applied (test_gatekeeper.py); the worker
    # says at DEBUG what it verified.
    assert not any(r.getMessage().startswith("granted") for r in caplog.records)


def test_expensive_refusals_are_logged_and_send_nothing_to_the_firewall_process(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(pki, capture, channel)
    now = NOW
    caplog.set_level(logging.INFO, logger="sknock.worker")
    mallory = KnockClient(credentials=pki.mallory.credentials, server_cert=pki.server.certificate, work_bits=4,
                          check_server_cert=False, clock=at(NOW))
    capture.put(mallory.build_knock([(Protocol.TCP, 22)], now=now))
    capture.put(alice(pki).build_knock([(Protocol.TCP, 22)], now=now, source_address=OTHER), source=OTHER)
    capture.put(alice(pki).build_knock([(Protocol.TCP, 22)], now=now,
                                       source_address=ipaddress.ip_address("198.18.0.99")))
    worker.read_batch()
    assert len(worker.queue) == 3  # all pass the cheap stage
    while worker.queue:
        worker.work()
    # only the knock bound to OTHER and sent from it reaches the monitor
    assert [r.opening for r in received(channel[1])] == [Opening(OTHER, Protocol.TCP, 22)]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"refused knock from {SOURCE}: cert-revoked") for m in messages), messages
    assert any(m.startswith(f"refused knock from {SOURCE}: source-mismatch") for m in messages), messages
    assert worker.verifier.counters["granted"] == 1
    # the revoked knock and the granted one are final for every source: the capture drops all their copies;
    # the knock bound to another address is not (its genuine sender may still come)
    assert len(capture.final) == 2 and capture.final[0] == capture.sent[0] and capture.final[1] == capture.sent[1]


def test_close_now_sends_a_close_request(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(pki, capture, channel)
    client = alice(pki)
    now = NOW
    caplog.set_level(logging.INFO, logger="sknock.worker")
    capture.put(client.build_knock([(Protocol.TCP, 22)], now=now))
    capture.put(client.build_knock([(Protocol.TCP, 22)], now=now + 0.1, action=Action.CLOSE))
    worker.read_batch()
    while worker.queue:
        worker.work()
    subject = pki.alice.certificate.subject.rfc4514_string()
    opened, closed = received(channel[1])
    assert opened.op == "open"
    assert closed.op == "close" and closed.opening == Opening(SOURCE, Protocol.TCP, 22) and closed.client == subject
    assert worker.verifier.counters["closed"] == 1
    assert not any(r.getMessage().startswith("closing") for r in caplog.records)  # the monitor logs it


def test_work_is_bounded_by_its_time_slice_but_always_makes_progress(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket]
) -> None:
    worker = make_worker(pki, capture, channel, work_slice=0.0)
    client = alice(pki)
    now = NOW
    for _ in range(4):
        capture.put(client.build_knock([(Protocol.TCP, 22)], now=now))
    worker.read_batch()
    assert [worker.work() for _ in range(5)] == [1, 1, 1, 1, 0]
    assert len(received(channel[1])) == 4


def test_run_serves_knocks_takes_the_monitors_crl_survives_sighup_and_stops_when_the_monitor_goes(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket]
) -> None:
    """The loop itself: capture -> verifier -> channel; a CRL from the monitor reaches on_crl; a SIGHUP
    (sent to every sknock process by an admin) does not end it; a closed channel does."""
    import threading

    client = alice(pki)
    capture.put(client.build_knock([(Protocol.TCP, 2001)], now=NOW))
    monitor_end = channel[1]
    monitor_end.send(CRL_PREFIX + b"the CRL")
    crls: list[bytes] = []
    seen: list[GrantRequest] = []

    def monitor() -> None:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            seen.extend(received(monitor_end))
            time.sleep(0.05)
        time.sleep(0.3)
        monitor_end.close()  # the monitor has gone

    worker = Worker(verifier=make_verifier(pki), capture=capture, channel=channel[0], on_crl=crls.append,
                    clock=at(NOW))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    helper = threading.Thread(target=monitor)
    started = time.monotonic()
    helper.start()
    try:
        worker.run()
    finally:
        helper.join(10)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert time.monotonic() - started < 10
    assert [r.opening for r in seen] == [Opening(SOURCE, Protocol.TCP, 2001)]
    assert crls == [b"the CRL"]


def test_refusal_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sknock.worker")
    refusals = RefusalLog(per_second=20)
    refusal = KnockRefused(Reason.BAD_MAGIC)
    for i in range(100):
        refusals.refused(SOURCE, refusal, 1000.0 + i / 1000)  # 100 within one second
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"refused knock from {SOURCE}: bad-magic"] * 20
    refusals.refused(OTHER, KnockRefused(Reason.STALE, "clock differs by -60 s"), 1001.5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[20:] == ["80 more refusals not logged in the last second",
                          f"refused knock from {OTHER}: stale: clock differs by -60 s"]
    caplog.clear()
    for i in range(20):  # exactly the limit: no summary in the next second
        refusals.refused(SOURCE, refusal, 1002.0 + i / 100)
    refusals.refused(SOURCE, refusal, 1003.0)
    assert len(caplog.records) == 21
    assert not any("more refusals" in r.getMessage() for r in caplog.records)


def test_an_unexpected_exception_refuses_that_datagram_only(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket],
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last line of defence: the verifier promises KnockRefused only (the fuzz tests hold it to
    that), but should a bug raise anything else, that one datagram is refused ``internal-error``,
    counted and logged on one rate-limited line, and the worker goes on."""
    worker = make_worker(pki, capture, channel)
    client = alice(pki)
    now = NOW
    worker.clock = lambda: now  # one second for the rate limit
    caplog.set_level(logging.INFO, logger="sknock.worker")
    trust = worker.verifier._trust

    def broken(*_: object) -> object:
        raise RuntimeError("a bug\nwith a newline")

    monkeypatch.setattr(trust, "verify", broken)
    for _ in range(30):
        capture.put(client.build_knock([(Protocol.TCP, 22)], now=now))
    worker.read_batch()
    while worker.queue:
        worker.work()
    assert worker.verifier.counters["internal-error"] == 30
    assert received(channel[1]) == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == worker.refusals.per_second  # rate-limited like every refusal
    assert errors[0].getMessage() == (
        f"refused knock from {SOURCE}: internal-error: RuntimeError: a bug\\x0awith a newline"
    )
    # The cheap stage is guarded the same way.
    monkeypatch.setattr(worker.verifier, "precheck", broken)
    worker.accept(client.build_knock([(Protocol.TCP, 22)], now=now), OTHER, now + 2)
    assert worker.verifier.counters["internal-error"] == 31 and not worker.queue
    assert caplog.records[-1].getMessage().startswith(f"refused knock from {OTHER}: internal-error: RuntimeError")
    # The same worker then grants a valid knock.
    monkeypatch.undo()
    capture.put(client.build_knock([(Protocol.TCP, 2005)], now=now))
    worker.read_batch()
    worker.work()
    assert [r.opening for r in received(channel[1])] == [Opening(SOURCE, Protocol.TCP, 2005)]


def test_a_subject_with_line_breaks_is_escaped_in_refusals_and_grants(
    pki: TestPKI, capture: ListCapture, channel: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 8, point 7, in memory: a CA-issued certificate whose subject forges a log line."""
    from cryptography.hazmat.primitives import serialization

    from sknock.ports import parse_ports
    from tests import forged

    worker = make_worker(pki, capture, channel)
    now = NOW
    caplog.set_level(logging.INFO, logger="sknock.worker")
    name = "eve\n2026-11-30 12:00:00,000 sknock[1] INFO sknock.firewall: granted tcp/22 to 6.6.6.6\r\x1b[0m\u2028"
    key, certificate = forged.issue(pki.ca.key, pki.ca_cert, name, parse_ports("tcp/22"), now=pki.now())  # type: ignore[arg-type]
    der = certificate.public_bytes(serialization.Encoding.DER)
    capture.put(forged.seal(der, key, pki.server.certificate, [(Protocol.TCP, 23)], now=now, work_bits=4))
    capture.put(forged.seal(der, key, pki.server.certificate, [(Protocol.TCP, 22)], now=now, work_bits=4))
    worker.read_batch()
    while worker.queue:
        worker.work()
    [refusal] = [r.getMessage() for r in caplog.records]
    escaped = ("CN=eve\\x0a2026-11-30 12:00:00\\,000 sknock[1] INFO sknock.firewall: granted tcp/22 to 6.6.6.6"
               "\\x0d\\x1b[0m\\u2028")
    assert refusal == f"refused knock from {SOURCE}: not-authorized: {escaped} may not open tcp/23"
    [grant] = received(channel[1])  # parse_request refuses a client name that is not printable
    assert grant.client == escaped and grant.opening == Opening(SOURCE, Protocol.TCP, 22)
