"""Prometheus metrics: counted without I/O where the work is done, served by an unprivileged child.

Three parts, one job each:

* Counting, sans-I/O: a worker keeps the counts it already keeps (the verifier's refusals by reason,
  the capture's exact copies) plus the datagrams it read; :class:`StatsReporter` turns them into a
  delta message (:func:`~sknock.server.privsep.encode_stats`) at most once a second, and only when
  something changed, so the per-packet path gains no work.  The monitor adds those deltas to
  :class:`Metrics`, which holds the totals (so counts survive a worker being replaced) and counts
  what only the monitor sees: grants applied, refusals at the monitor, grants closed and why, the
  knock-to-grant latency, CRL refreshes, worker restarts.  :meth:`Metrics.snapshot` adds the gauges
  of the moment (open grants, each CRL's age, the kernel's capture drops) and gives a
  :class:`Snapshot`, a plain value.
* The monitor sends a snapshot a second (JSON: it is the monitor's own word, not hostile input) to
  the metrics server, an unprivileged child like the CRL fetcher.
* The metrics server (:func:`serve`) answers HTTP scrapes from the last snapshot, through
  prometheus_client's own exposition (:class:`SnapshotCollector` and its WSGI app): the only code that
  parses a scraper's bytes runs as the unprivileged user, never in the root process.  The listening
  socket is bound by the root process at start (:func:`open_listener`: a port taken, or a privileged
  one, is an error before anything starts) and handed to the child.

Label sets are bounded: refusal reasons are the :class:`~sknock.errors.Reason` values, close causes
:data:`CLOSE_CAUSES`, refresh results :data:`CRL_RESULTS`, CRL sources the configured ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ..addresses import IPAddress
from ..errors import ConfigError, Reason
from .privsep import WorkerStats, encode_stats

__all__ = [
    "LATENCY_BUCKETS", "CLOSE_CAUSES", "CRL_RESULTS", "REPORT_INTERVAL", "StatsReporter", "Metrics", "Snapshot",
    "CrlFigures", "SnapshotCollector", "crl_figures", "open_listener", "serve",
]

log = logging.getLogger("sknock.metrics")

REASONS = tuple(Reason)
#: Upper bounds (seconds) of the knock-to-grant histogram: a grant takes a millisecond or two when idle,
#: tens to hundreds under a burst.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Why a grant was closed: its window ended, the client's close knock, a CRL revoked the client, the
#: operator (``sknock-server close``), the server stopping (backends without kernel expiry only).
CLOSE_CAUSES = ("expiry", "close_request", "revocation", "operator", "stop")
CRL_RESULTS = ("updated", "unchanged", "failed")
REPORT_INTERVAL = 1.0  # seconds between a worker's stats messages, at most; and between snapshots
MAX_SCRAPES = 8  # scrapes served at once; more connections are closed at once
SCRAPE_TIMEOUT = 10.0  # seconds a scraper has to send its request


# -- the worker's side ---------------------------------------------------------------------------------


class StatsReporter:
    """Turns a worker's running totals into delta messages for the monitor (sans-I/O: time passed in)."""

    def __init__(self, interval: float = REPORT_INTERVAL) -> None:
        self.interval = interval
        self._due = 0.0
        self._received = 0
        self._refused = [0] * len(REASONS)

    def message(self, now: float, received: int, refusals: Mapping[str, int], copies: int) -> bytes | None:
        """The stats message to send at monotonic time ``now``, or None (too soon, or nothing new).
        ``received``: datagrams read so far; ``refusals``: refusals so far by :class:`Reason` value (other
        keys are ignored); ``copies``: exact copies the capture dropped so far (refused ``replay-seen``)."""
        if now < self._due:
            return None
        self._due = now + self.interval
        refused = [refusals.get(reason.value, 0) for reason in REASONS]
        refused[REASONS.index(Reason.REPLAY_SEEN)] += copies
        received += copies
        if received == self._received and refused == self._refused:
            return None
        changes = tuple(new - old for new, old in zip(refused, self._refused, strict=True))
        delta = WorkerStats(received - self._received, changes)
        self._received, self._refused = received, refused
        return encode_stats(delta)


# -- the monitor's side --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrlFigures:
    """One CRL source in a snapshot: seconds since its CRL was issued, and until its nextUpdate
    (negative once past it; None without one)."""

    source: str
    age: float
    next_update: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every figure at one moment: what the metrics server exposes."""

    received: int = 0
    granted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    grants_open: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    latency_buckets: tuple[int, ...] = (0,) * len(LATENCY_BUCKETS)  # per bucket, not cumulative
    latency_count: int = 0
    latency_sum: float = 0.0
    crls: tuple[CrlFigures, ...] = ()
    crl_refreshes: dict[str, int] = field(default_factory=dict)
    worker_restarts: int = 0
    capture_drops: int = 0
    foreign_removed: int = 0

    def encode(self) -> bytes:
        """As the monitor sends it to the metrics server."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Snapshot:
        """What :meth:`encode` made (from the monitor).  Raises ValueError, TypeError or KeyError on
        anything else."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a snapshot is a JSON object")
        crls = tuple(CrlFigures(**c) for c in raw.pop("crls"))
        raw["latency_buckets"] = tuple(raw["latency_buckets"])
        return cls(crls=crls, **raw)


class Metrics:
    """The totals the monitor keeps (plain ints; no I/O, no clock)."""

    def __init__(self) -> None:
        self.received = 0
        self.granted = 0
        self.refused = dict.fromkeys((r.value for r in REASONS), 0)
        self.closed = dict.fromkeys(CLOSE_CAUSES, 0)
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_over = 0  # above the last bucket
        self.latency_sum = 0.0
        self.crl_refreshes = dict.fromkeys(CRL_RESULTS, 0)
        self.worker_restarts = 0
        self.foreign_removed = 0  # entries of sknock's firewall no knock granted, removed by the monitor

    def add_worker(self, stats: WorkerStats) -> None:
        """A worker's stats message (already parsed and bounded)."""
        self.received += stats.received
        refused = self.refused
        for reason, count in zip(REASONS, stats.refused, strict=True):
            if count:
                refused[reason.value] += count

    def refuse(self, reason: Reason, count: int = 1) -> None:
        """Knock requests the monitor itself refused (a replay another worker saw, a client its newest CRL
        revokes, a full replay memory, a journal it cannot write)."""
        self.refused[reason.value] += count

    def close(self, cause: str, count: int = 1) -> None:
        """``count`` grants closed, for ``cause`` (one of :data:`CLOSE_CAUSES`)."""
        self.closed[cause] += count

    def applied(self, knocks: Iterable[tuple[Any, Sequence[str]]], now: float) -> None:
        """Knocks the firewall has just applied, each ``(request, ports)``: an open is a grant whose
        latency runs from the request's ``received`` (monotonic, as ``now``); a close request closes
        ``len(ports)`` grants."""
        for request, ports in knocks:
            if request.op != "open":
                self.closed["close_request"] += len(ports)
                continue
            self.granted += 1
            if request.received > 0:
                self.observe(max(0.0, now - request.received))

    def observe(self, seconds: float) -> None:
        """One knock-to-grant latency."""
        self.latency_sum += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_buckets[index] += 1
                return
        self.latency_over += 1

    def crl_refreshed(self, statuses: Iterable[str]) -> None:
        """Results of CRL refreshes the monitor made or was offered."""
        for status in statuses:
            if status in self.crl_refreshes:
                self.crl_refreshes[status] += 1

    def snapshot(self, *, grants_open: int, crls: Sequence[CrlFigures] = (), capture_drops: int = 0) -> Snapshot:
        """The totals now, with the gauges of the moment."""
        return Snapshot(
            received=self.received, granted=self.granted, refused=dict(self.refused), grants_open=grants_open,
            closed=dict(self.closed), latency_buckets=tuple(self.latency_buckets),
            latency_count=sum(self.latency_buckets) + self.latency_over, latency_sum=self.latency_sum,
            crls=tuple(crls), crl_refreshes=dict(self.crl_refreshes), worker_restarts=self.worker_restarts,
            capture_drops=capture_drops, foreign_removed=self.foreign_removed,
        )


# -- the metrics server's side ---------------------------------------------------------------------------


class SnapshotCollector:
    """A prometheus_client collector that yields the figures of the last snapshot it was given."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Any]:
        """The metric families, in base units with Prometheus' names."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.snapshot  # one read: the receiving thread swaps the whole object
        yield CounterMetricFamily("sknock_knocks_received_total", "Knock datagrams the workers read (after the "
                                  "kernel filter), exact copies dropped at the capture included.", value=s.received)
        yield CounterMetricFamily("sknock_knocks_granted_total", "Open knocks the firewall applied.", value=s.granted)
        refused = CounterMetricFamily("sknock_knocks_refused_total", "Knocks refused, by reason code.",
                                      labels=["reason"])
        for reason in REASONS:
            refused.add_metric([reason.value], s.refused.get(reason.value, 0))
        yield refused
        yield GaugeMetricFamily("sknock_grants_open", "Grants open now (address, protocol, port).",
                                value=s.grants_open)
        closed = CounterMetricFamily("sknock_grants_closed_total", "Grants closed, by cause.", labels=["why"])
        for cause in CLOSE_CAUSES:
            closed.add_metric([cause], s.closed.get(cause, 0))
        yield closed
        cumulative, buckets = 0, []
        for bound, count in zip(LATENCY_BUCKETS, s.latency_buckets, strict=True):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", s.latency_count))
        yield HistogramMetricFamily("sknock_knock_to_grant_seconds", "From a knock's datagram read by a worker "
                                    "to its grant applied in the firewall.", buckets=buckets,
                                    sum_value=s.latency_sum)
        age = GaugeMetricFamily("sknock_crl_age_seconds", "Seconds since the CRL in hand was issued "
                                "(thisUpdate), per CRL source.", labels=["source"])
        next_update = GaugeMetricFamily("sknock_crl_next_update_seconds", "Seconds until the CRL's nextUpdate "
                                        "(negative: past it), per CRL source.", labels=["source"])
        for crl in s.crls:
            age.add_metric([crl.source], crl.age)
            if crl.next_update is not None:
                next_update.add_metric([crl.source], crl.next_update)
        yield age
        yield next_update
        refreshes = CounterMetricFamily("sknock_crl_refresh_total", "CRL refreshes the root process made or was "
                                        "offered, by result.", labels=["result"])
        for result in CRL_RESULTS:
            refreshes.add_metric([result], s.crl_refreshes.get(result, 0))
        yield refreshes
        yield CounterMetricFamily("sknock_worker_restarts_total", "Workers that died and were replaced.",
                                  value=s.worker_restarts)
        yield CounterMetricFamily("sknock_capture_drops_total", "Packets the kernel dropped on the capture "
                                  "sockets (receive buffer full).", value=s.capture_drops)
        yield CounterMetricFamily("sknock_foreign_entries_removed_total", "Entries of sknock's own firewall set or "
                                  "chain that no knock granted (added by hand), removed.", value=s.foreign_removed)


def open_listener(address: IPAddress, port: int) -> socket.socket:
    """The metrics server's listening TCP socket, bound now (by the root process, at start).  Raises
    ConfigError naming ``metricsListen`` when the kernel refuses."""
    try:  # now, as root: the metrics server drops its privileges, then its seccomp filter refuses any file
        import prometheus_client.core  # noqa: F401 -- SnapshotCollector.collect imports it at a scrape
        import prometheus_client.exposition  # noqa: F401
        import prometheus_client.openmetrics.exposition  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"metricsListen: the metrics need prometheus_client ({exc}): install sknock[server]"
                          ) from None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(address), port))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        where = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        raise ConfigError(f"metricsListen: cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


class _Quiet(WSGIRequestHandler):
    """No line on stderr per scrape; a scraper that does not send its request in time is dropped."""

    timeout = SCRAPE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's server on a socket bound before, a thread per scrape, at most MAX_SCRAPES at once."""

    daemon_threads = True

    def __init__(self, listener: socket.socket) -> None:
        super().__init__(listener.getsockname()[:2], _Quiet, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        host, port = listener.getsockname()[:2]
        self.server_name, self.server_port = host, port  # what server_bind() sets, without a DNS lookup
        self.setup_environ()
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape that failed (a scraper silent past SCRAPE_TIMEOUT, a connection gone): one line, not
        socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        log.info("a scrape from %s failed: %s", client_address[0], f"{type(exc).__name__}: {exc}")


def serve(listener: socket.socket, channel: socket.socket, confine: Callable[[], None] = lambda: None) -> None:
    """The metrics server's life (in the unprivileged child): answer scrapes on ``listener`` from the
    latest snapshot the monitor sent on ``channel``, until SIGTERM or until the monitor has gone.
    ``confine`` is called once everything is set up, before the first thread starts and before the first
    scrape is read: the child's seccomp filter (:func:`sknock.server.sandbox.sandbox_metrics`)."""
    from prometheus_client import CollectorRegistry, make_wsgi_app

    collector = SnapshotCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    httpd = _Server(listener)
    httpd.set_app(make_wsgi_app(registry))
    state = {"running": True}
    signal.signal(signal.SIGTERM, lambda *_: state.update(running=False))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    host, port = listener.getsockname()[:2]
    confine()  # in this thread, before any other: a thread inherits its creator's filter
    thread = threading.Thread(target=httpd.serve_forever, name="scrapes", daemon=True)
    thread.start()
    log.info("metrics server listening on %s port %d under its seccomp filter", host, port)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(channel, selectors.EVENT_READ)
            while state["running"]:
                if not selector.select(1.0):
                    continue
                try:
                    data = channel.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    return  # the monitor has gone
                try:
                    collector.snapshot = Snapshot.decode(data)
                except (ValueError, TypeError, KeyError) as exc:
                    log.error("ignored a snapshot of %d bytes from the monitor: %s", len(data), exc)
    finally:
        with contextlib.suppress(Exception):
            httpd.shutdown()
        httpd.server_close()


def crl_figures(refreshers: Iterable[Any], wall: float) -> list[CrlFigures]:
    """Each CRL source's figures at Unix time ``wall`` (a source without a CRL yet has none)."""
    out = []
    for refresher in refreshers:
        crl = refresher.current
        issued = getattr(crl, "last_update_utc", None)
        if issued is None:
            continue
        next_update = getattr(crl, "next_update_utc", None)
        out.append(CrlFigures(refresher.source, wall - issued.timestamp(),
                              None if next_update is None else next_update.timestamp() - wall))
    return out
