"""The unprivileged worker: reads captured datagrams, runs the verifier, asks for grants.

One process, one thread, one loop (never a thread per packet): the selector wakes on the capture
sockets and the monitor channel (which brings the CRLs the monitor keeps).  Each turn it first reads and
pre-checks a bounded batch of datagrams (two hashes each), queueing the ones that pass, then spends a bounded time
slice on the expensive stage (ECDH, chain, signature) for the queue in arrival order.  Under a flood the
kernel's socket buffer drops raw packets before this process does; packets that passed the cheap checks
are kept and served first, and the queue is bounded (overflow is counted as ``overload``).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from typing import Protocol as TypingProtocol

from ..addresses import IPAddress
from ..errors import KnockRefused, Reason
from ..protocol import Action, Prechecked
from ..verifier import Grant, KnockVerifier
from .firewall.base import Opening
from .localaddr import DestinationFilter
from .metrics import StatsReporter
from .packet import Datagram
from .privsep import CRL_PREFIX, GrantRequest, encode_request, receive_buffer

__all__ = ["Worker", "WorkerLimits", "RefusalLog"]

log = logging.getLogger("sknock.worker")


#: Refusals that no copy of the same datagram can turn into a grant, whatever address it comes from: the
#: capture may then drop every copy before parsing.  Not among them: source-mismatch (the genuine sender
#: may still come), timestamp (a knock from a clock slightly ahead becomes fresh), crl-unavailable and
#: overload (passing states), internal-error.
FINAL_REFUSALS = frozenset({
    Reason.WRONG_SERVER, Reason.DECRYPT_FAILED, Reason.MALFORMED, Reason.REPLAY, Reason.REPLAY_SEEN,
    Reason.CERT_INVALID, Reason.CERT_UNTRUSTED, Reason.CERT_EXPIRED, Reason.CERT_REVOKED, Reason.BAD_SIGNATURE,
    Reason.SOURCE_REQUIRED, Reason.NOT_AUTHORIZED,
})


class Capture(TypingProtocol):
    """What a worker reads knocks from: a packet or UDP capture (:mod:`sknock.server.capture`), or a fake in
    tests."""

    stats: collections.Counter[str]

    def filenos(self) -> list[int]:
        """The sockets to wait on."""
    def receive(self, max_count: int = 64) -> list[Datagram]:
        """Up to ``max_count`` datagrams that are waiting; never blocks, never raises for what arrived."""
    def remember(self, payload: bytes, source: IPAddress) -> None:
        """Drop exact copies of ``payload`` from ``source`` from now on (it passed the cheap checks)."""
    def remember_everywhere(self, payload: bytes) -> None:
        """Drop exact copies of ``payload`` from every source from now on (its outcome is final)."""
    def take_copies(self) -> list[bytes]:
        """The source addresses (packed: 4 or 16 bytes) of the exact copies dropped since the last call, for
        the refusal log."""


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """How a worker shares its time between reading and verifying; sizes in datagrams, times in seconds."""

    read_batch: int = 256  # datagrams pre-checked per turn
    queue_size: int = 4096  # pre-checked datagrams waiting for the expensive stage
    work_slice: float = 0.02  # seconds of expensive work per turn before reading again
    stats_interval: float = 60.0


class RefusalLog:
    """Logs refusals with the source address and reason, at most ``per_second`` lines a second;
    the rest are counted and summarized, so a flood cannot fill the disk.  What a refusal quotes from
    the datagram is already escaped (:class:`~sknock.errors.KnockRefused` does it)."""

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self._second = 0
        self._lines = 0
        self._suppressed = 0

    def flush(self, now: float) -> None:
        """Write the summary of a second that has ended (also called from the loop when idle, so the
        count of a flood followed by silence is not held back until the next refusal)."""
        second = int(now)
        if second != self._second:
            if self._suppressed:
                log.info("%d more refusals not logged in the last second", self._suppressed)
            self._second, self._lines, self._suppressed = second, 0, 0

    def refused(
        self, source: IPAddress | bytes, refusal: KnockRefused | Reason, now: float, level: int = logging.INFO
    ) -> None:
        """``source`` may be packed (4 or 16 bytes): it is only made an address when it is logged."""
        self.flush(now)
        if self._lines < self.per_second:
            self._lines += 1
            if isinstance(source, bytes):
                source = ipaddress.ip_address(source)
            what = refusal.value if isinstance(refusal, Reason) else refusal
            reason = refusal if isinstance(refusal, Reason) else refusal.reason
            detail = refusal.detail if isinstance(refusal, KnockRefused) and refusal.detail else None
            log.log(level, "refused knock from %s: %s", source, what,
                    extra={"event": "refusal", "source": str(source), "reason": reason.value, "detail": detail})
        else:
            self._suppressed += 1


class Worker:
    """One unprivileged worker: reads its capture, runs ``verifier`` on each datagram, sends each grant to
    the monitor over ``channel``, and passes the CRLs the monitor sends to ``on_crl``.  ``destinations``
    (None: any) filters by destination address."""

    def __init__(
        self,
        *,
        verifier: KnockVerifier,
        capture: Capture,
        channel: socket.socket,
        on_crl: Callable[[bytes], None] = lambda data: None,
        destinations: DestinationFilter | None = None,
        limits: WorkerLimits = WorkerLimits(),  # noqa: B008 -- frozen
        clock: Callable[[], float] = time.time,
        reporter: StatsReporter | None = None,
    ) -> None:
        self.verifier = verifier
        self.capture = capture
        self.channel = channel
        self.on_crl = on_crl
        self.destinations = destinations  # None: any destination address (the capture's own filter only)
        self._buffer = receive_buffer()
        self.limits = limits
        self.clock = clock
        # (pre-checked datagram, source, time.monotonic() when read)
        self.queue: collections.deque[tuple[Prechecked, IPAddress, float]] = collections.deque()
        self.refusals = RefusalLog()
        self.reporter = reporter  # None: no stats messages to the monitor (metrics off)
        self.received = 0  # datagrams read from the capture
        self._running = True

    def stop(self, *_: object) -> None:
        """SIGTERM: leave the loop at the end of this turn."""
        self._running = False

    def run(self) -> None:
        """Run the loop until SIGTERM or until the monitor's channel closes.  SIGINT and SIGHUP are ignored:
        the monitor handles them for every process."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        signal.signal(signal.SIGTERM, self.stop)
        # Ctrl-C reaches the whole process group, and a SIGHUP may be sent to every sknock process:
        # the monitor handles both (it stops us, or refreshes the CRL and hands it to us).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        for fd in self.capture.filenos():
            selector.register(fd, selectors.EVENT_READ, "capture")
        selector.register(self.channel, selectors.EVENT_READ, "channel")
        next_stats = time.monotonic() + self.limits.stats_interval
        log.info("worker ready")
        while self._running:
            for key, _ in selector.select(0 if self.queue else 1.0):
                if key.data == "channel" and not self.read_channel():
                    log.warning("the monitor has gone; worker stops")
                    return
            self.read_batch()
            self.work()
            self.refusals.flush(self.clock())
            if self.reporter is not None:
                self.report()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.limits.stats_interval
                log.info("counters: %s; capture: %s", dict(sorted(self.verifier.counters.items())),
                         dict(sorted(self.capture.stats.items())))

    def report(self) -> None:
        """Send the monitor what was counted since the last report (at most once a second, only when
        something changed; see :class:`~sknock.server.metrics.StatsReporter`)."""
        assert self.reporter is not None
        message = self.reporter.message(time.monotonic(), self.received, self.verifier.counters,
                                        self.capture.stats["duplicate"])
        if message is not None:
            self.channel.send(message)

    def read_channel(self) -> bool:
        """Take what the monitor sent (a new CRL); False when the monitor has gone."""
        while True:
            try:
                size = self.channel.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if size == 0:
                return False
            data = bytes(memoryview(self._buffer)[:size])
            if data.startswith(CRL_PREFIX):
                self.on_crl(data[len(CRL_PREFIX) :])
            else:
                log.error("ignored a message of %d bytes from the monitor", size)

    def read_batch(self) -> int:
        """Read up to ``read_batch`` datagrams and pre-check each (:meth:`accept`); returns how many were
        read."""
        datagrams = self.capture.receive(self.limits.read_batch)
        received = time.monotonic()  # the batch's receipt, for the knock-to-grant latency
        self.received += len(datagrams)
        now = self.clock()
        for source in self.capture.take_copies():  # exact copies of remembered datagrams
            self.refusals.refused(source, Reason.REPLAY_SEEN, now)
        destinations = self.destinations
        for datagram in datagrams:
            if destinations is not None and not destinations.allows(datagram.destination, datagram.ifindex, now):
                self.verifier.counters[Reason.WRONG_DESTINATION.value] += 1
                refusal = KnockRefused(Reason.WRONG_DESTINATION, f"addressed to {datagram.destination}")
                self.refusals.refused(datagram.source, refusal, now)
                continue
            self.accept(datagram.payload, datagram.source, now, received)
        return len(datagrams)

    def accept(self, payload: bytes, source: IPAddress, now: float, received: float = 0.0) -> None:
        """The cheap stage for one datagram (read at monotonic time ``received``); what passes is queued
        for :meth:`work`."""
        try:
            pre = self.verifier.precheck(payload, now, source)
        except KnockRefused as refusal:
            self.refusals.refused(source, refusal, now)
            return
        except Exception as error:  # noqa: BLE001 -- a bug must not end the worker: see internal_error
            self.internal_error(source, error, now)
            return
        self.capture.remember(payload, source)  # exact copies from this source now stop at the capture
        if len(self.queue) >= self.limits.queue_size:
            self.verifier.counters[Reason.OVERLOAD.value] += 1
            self.refusals.refused(source, KnockRefused(Reason.OVERLOAD, "verification queue full"), now)
            return
        self.queue.append((pre, source, received))

    def work(self) -> int:
        """The expensive stage, for at most one time slice."""
        done = 0
        deadline = time.monotonic() + self.limits.work_slice
        while self.queue and (done == 0 or time.monotonic() < deadline):
            pre, source, received = self.queue.popleft()
            now = self.clock()
            try:
                grant = self.verifier.complete(pre, source, now)
                messages = grant_messages(grant, received)
            except KnockRefused as refusal:
                self.refusals.refused(source, refusal, now)
                if refusal.reason in FINAL_REFUSALS:
                    self.capture.remember_everywhere(pre.datagram)
            except Exception as error:  # noqa: BLE001 -- a bug must not end the worker: see internal_error
                self.internal_error(source, error, now)
            else:
                self.send(grant, messages)
                self.capture.remember_everywhere(pre.datagram)  # granted: any copy is a replay
            done += 1
        return done

    def internal_error(self, source: IPAddress, error: Exception, now: float) -> None:
        """The last line of defence: the verifier raised something it should not have (it promises
        :class:`KnockRefused` only, and the fuzz tests hold it to that).  That one datagram is refused
        with ``internal-error``, counted, and logged on one rate-limited line; the worker goes on."""
        self.verifier.counters[Reason.INTERNAL_ERROR.value] += 1
        refusal = KnockRefused(Reason.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        self.refusals.refused(source, refusal, now, logging.ERROR)

    def apply(self, grant: Grant) -> None:
        """Ask the monitor to apply ``grant`` (one message per port)."""
        self.send(grant, grant_messages(grant))

    def send(self, grant: Grant, messages: list[bytes]) -> None:
        """Send ``grant``'s messages (from :func:`grant_messages`) to the monitor.  Channel
        errors are not caught: a worker whose channel is broken has nothing left to do."""
        for message in messages:
            self.channel.send(message)
        # The monitor logs the grant once applied (it may still refuse a replay another worker saw).
        if log.isEnabledFor(logging.DEBUG):
            op = "open" if grant.action is Action.OPEN else "close"
            ports = ",".join(f"{p.label}/{n}" for p, n in grant.ports)
            log.debug("verified %s knock for %s from %s (%s)", op, ports, grant.address, grant.client)


def grant_messages(grant: Grant, received: float = 0.0) -> list[bytes]:
    """The monitor messages for ``grant`` (its datagram read at monotonic time ``received``), one per port,
    all built before any is sent."""
    op: Literal["open", "close"] = "open" if grant.action is Action.OPEN else "close"
    return [
        encode_request(
            GrantRequest(
                op, Opening(grant.address, protocol, port), grant.duration, grant.client, grant.nonce,
                grant.nonce_expires, grant.revocation_ids, received,
            )
        )
        for protocol, port in grant.ports
    ]
