"""The monitor: the server's root process, and the only part of it that changes the firewall.

It runs no parser of network bytes and no crypto.  It listens to its workers, one socketpair each,
re-checks each request (:func:`privsep.parse_request`), refuses a knock it has applied before (a replay
that reached another worker, or one captured before a restart: :class:`~sknock.server.journal.KnockJournal`)
or that another server of its fleet applied (:class:`~sknock.server.replaystore.ReplayGate`), and applies
everything the workers asked for since its last turn as one batch (one nftables transaction).  It closes
grants when their time is up and retries a close that fails, answers ``status`` on the root-only control
socket, keeps the CRLs (verifying every CRL before it is used or written) and hands them to the workers,
the whole set in one message.

Failing closed is arranged so that nothing the monitor or its children do can open a port:

* A stop is not a teardown.  SIGTERM, SIGINT, a crash of the monitor or ``kill -9`` of any process
  leave sknock's firewall policy in place; grants end on time in the kernel (a backend without kernel
  expiry has its grants closed at a stop).  Removing the policy is an explicit ``sknock-server teardown``.
* A worker (or the CRL fetcher) that dies is replaced, at a bounded rate; the policy is never touched
  because of it.
* Twice a second the monitor checks that its firewall table is still the one it installed; when
  something else removed or rewrote it, it puts it back with the grants still due, within a second.
* Every FOREIGN_INTERVAL it compares what sknock's set or chain holds with its grant table and removes
  every entry no knock granted -- one someone added by hand -- saying so at ERROR level
  (:func:`~sknock.server.grants.foreign` decides; nothing outside sknock's own table or chain is read).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import ipaddress
import logging
import math
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cryptography import x509

from ..errors import Reason, SknockError
from ..logsafe import log_safe
from ..trust import RevocationId, describe_crl_issue, revocation_id
from .control import ControlServer
from .crl_refresh import FETCHED_HEADER, CrlRefresher, CrlSet, RefreshResult
from .firewall.base import Firewall, Held, Opening
from .grants import GrantEntry, GrantTable, foreign, summary
from .journal import KnockJournal
from .ledger import GrantLedger, LedgerError
from .metrics import REPORT_INTERVAL, Metrics, crl_figures
from .notify import Heartbeat, Notifier
from .privsep import (
    CRL_PREFIX,
    FETCH_RESULT_PREFIX,
    MAX_CRL_MESSAGE,
    STATS_PREFIX,
    GrantRequest,
    IdCache,
    PrivsepError,
    parse_fetch_result,
    parse_request,
    parse_stats,
    receive_buffer,
)
from .replaystore import LocalReplayStore, ReplayGate

__all__ = ["Monitor", "Child", "BatchRule", "RecentRate", "CRL_PREFIX", "MAX_CRL_MESSAGE", "MAX_BATCH"]

log = logging.getLogger("sknock.monitor")
MAX_BATCH = 2048  # messages read from one worker before the batch is applied
NONCE_CAPACITY = 1_000_000
LOG_GROUP = 32  # knocks named in one log line
MIN_BATCH_INTERVAL = 0.001  # seconds between transactions under load
BUSY_RATE = 2000.0  # requests a second, over the last RATE_WINDOW: coalescing only pays above it
RATE_WINDOW = 0.01  # seconds
WATCH_INTERVAL = 0.5  # seconds between checks that the firewall table is still ours
# Seconds between checks for entries no knock granted: a listing of every grant (about 10 ms with 10,000
# nftables grants, when anything changed at all; see docs/firewall.md), so not at every watch.
FOREIGN_INTERVAL = 2.0
FOREIGN_NAMED = 5  # up to this many removed entries get a log line each; more share one, with the count
RESTART_WINDOW = 60.0  # seconds over which a child's restarts are counted
FREE_RESTARTS = 3  # restarts within RESTART_WINDOW that happen at once; later ones back off
MAX_RESTART_DELAY = 30.0
STOP_GRACE = 5.0  # seconds a child has to exit after SIGTERM before SIGKILL
MAX_LOOP_FAILURES = 50  # unexpected errors in a row before the monitor gives up (exit 1; the policy stays)

Role = Literal["worker", "crl fetcher", "metrics server"]


class LogRelay(Protocol):
    """The pipe the children write their log lines into, with a logFile (:class:`sknock.server.logs.LogOutput`)."""

    def fileno(self) -> int:
        """The read end, to wait on."""

    def pump(self) -> int:
        """Copy what is waiting into the log; the bytes copied."""

#: Forks a child of ``role`` number ``index``; the child closes ``fds`` (the monitor's own sockets) first.
#: Returns the child's pid and the monitor's end of its channel.
Spawner = Callable[[Role, int, Sequence[int]], tuple[int, socket.socket]]


class RecentRate:
    """Requests a second over the last ``window`` seconds (time passed in)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._count = 0

    def add(self, now: float, count: int) -> None:
        """Record ``count`` requests at ``now`` (seconds, any monotonic timeline)."""
        self._events.append((now, count))
        self._count += count

    def per_second(self, now: float) -> float:
        """The rate over the ``window`` before ``now``; forgets older events."""
        events = self._events
        while events and events[0][0] < now - self.window:
            self._count -= events.popleft()[1]
        return self._count / self.window


class BatchRule:
    """When to apply what the workers sent, sans-I/O.  A firewall transaction costs about the same
    whatever its size, so under load (``busy_rate`` requests a second or more) the monitor applies at
    most one batch per ``min_interval`` and lets what comes meanwhile join it; below that rate each
    request is applied at once (coalescing would only add latency)."""

    def __init__(
        self, min_interval: float = MIN_BATCH_INTERVAL, busy_rate: float = BUSY_RATE, window: float = RATE_WINDOW
    ) -> None:
        self.min_interval = min_interval
        self.busy_rate = busy_rate
        self._rate = RecentRate(window)
        self._last = -math.inf

    def hold(self, now: float) -> float:
        """Seconds to hold the pending batch before applying it (0: apply now)."""
        wait = self._last + self.min_interval - now
        if wait > 0 and self._rate.per_second(now) >= self.busy_rate:
            return wait
        return 0.0

    def applied(self, now: float, count: int) -> None:
        """Record that ``count`` requests were applied as one batch at ``now``."""
        self._last = now
        self._rate.add(now, count)


@dataclass(eq=False)
class Child:
    """A process the monitor forked and keeps alive: a worker, the CRL fetcher or the metrics server."""

    role: Role
    index: int
    pid: int = 0  # 0: not running
    channel: socket.socket | None = None
    starts: collections.deque[float] = field(default_factory=collections.deque)
    respawn_at: float | None = None

    @property
    def name(self) -> str:
        """How the log names this child: ``worker N`` (from 1) or ``crl fetcher``."""
        return f"worker {self.index + 1}" if self.role == "worker" else self.role


class Monitor:
    """The server's root process: the one that changes the firewall (see the module's docstring).  Time comes
    from ``clock`` (monotonic) and ``wall_clock`` (Unix time), so tests can drive it on any timeline;
    ``spawn`` forks its children, or ``channels`` are workers forked by the caller."""

    def __init__(
        self,
        *,
        firewall: Firewall,
        max_duration: float,
        channels: Sequence[socket.socket] = (),
        worker_pids: Sequence[int] = (),
        spawn: Spawner | None = None,
        workers: int = 0,
        fetcher: bool = False,
        window: float = 7.0,
        journal: KnockJournal | None = None,
        control: ControlServer | None = None,
        crl: CrlSet | CrlRefresher | None = None,
        crl_interval: float = 1800.0,
        instance: socket.socket | None = None,
        carried: Iterable[tuple[Opening, float]] = (),
        ledger: GrantLedger | None = None,
        replay: ReplayGate | None = None,
        metrics_server: bool = False,
        capture_drops: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        watchdog: float | None = None,
        reopen_log: Callable[[], None] | None = None,
        log_relay: LogRelay | None = None,
    ) -> None:
        self.firewall = firewall
        # The service manager (systemd's notify socket), told READY, STATUS and WATCHDOG by self.heartbeat.
        self.notifier = notifier
        self.heartbeat = Heartbeat(watchdog=watchdog)
        self.reopen_log = reopen_log  # SIGHUP: reopen logFile (logrotate)
        self.log_relay = log_relay  # with a logFile: the children's lines, copied into it here
        self.max_duration = max_duration
        self.spawn = spawn
        self.control = control
        # The CRLs, one refresher per source (a single refresher is a set of one).
        self.crl = CrlSet([crl]) if isinstance(crl, CrlRefresher) else crl
        self.crl_interval = crl_interval
        self.instance = instance
        self.clock = clock
        self.wall_clock = wall_clock
        self.grants = GrantTable()
        now = clock()
        for opening, remaining in carried:
            if remaining > max_duration + 1:  # + the kernel's rounding up to whole seconds
                # no knock can grant that long: put there by hand before this start (the first check removes it)
                log.error("not keeping %s from before this start: %g s left, more than a knock grants "
                          "(maxOpenDuration %g s)", opening, remaining, max_duration)
                continue
            self.grants.open(opening, remaining, now, "(from before the restart)")
        # A backend that cannot end grants by itself (command) has them recorded, so a restart ends them.
        self.ledger = ledger if not firewall.kernel_expiry else None
        self._ledger_dirty = False
        if self.ledger is not None:
            self._reopen_ledger(now, wall_clock())
        self.journal = journal or KnockJournal(None, capacity=NONCE_CAPACITY, now=wall_clock(), window=window)
        self.replay = replay or ReplayGate(LocalReplayStore())  # the fleet's shared replay memory, if any
        # Children: workers given as channels (tests, or forked by the caller) are never respawned.
        self.children: list[Child] = []
        pids = list(worker_pids) + [0] * (len(channels) - len(worker_pids))
        for index, (channel, pid) in enumerate(zip(channels, pids, strict=False)):
            channel.setblocking(False)
            self.children.append(Child("worker", index, pid, channel))
        self.children += [Child("worker", len(self.children) + i) for i in range(workers)]  # spawned by run()
        self._fetcher: Child | None = Child("crl fetcher", 0) if fetcher else None
        # The counts are kept whether or not they are served (a few integer additions per batch).
        self.metrics = Metrics()
        self._metrics_server: Child | None = Child("metrics server", 0) if metrics_server else None
        self._capture_drops = capture_drops
        self._next_snapshot = now
        self._by_channel: dict[socket.socket, Child] = {c.channel: c for c in self.children if c.channel}
        # One receive buffer, reused: a fresh 4 MiB bytes object per message would cost more than a grant.
        self._buffer = receive_buffer()
        self._ids: IdCache = {}  # revocation ids parsed before: one tuple per client, shared by its grants
        self._running = True
        self._hangup = False
        self._batch = BatchRule()
        self._pending: list[GrantRequest] = []
        self._pending_since = 0.0
        self._next_watch = now
        self._next_foreign = now
        self._next_crl = now + crl_interval
        self._selector: selectors.BaseSelector | None = None
        # What a held batch waits on: the selector without the workers' channels (see turn()).
        self._holding: selectors.BaseSelector | None = None
        self._revoked: frozenset[RevocationId] = frozenset()
        self._note_revocations()
        self.exit_code = 0

    @property
    def channels(self) -> list[socket.socket]:
        """The monitor's end of each running worker's channel."""
        return [c.channel for c in self.children if c.channel is not None]

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the running workers (the CRL fetcher is not among them)."""
        return [c.pid for c in self.children if c.pid]

    # -- signals -----------------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """SIGTERM and SIGINT: leave the loop at the end of this turn.  The firewall policy stays (see
        :meth:`shutdown`)."""
        self._running = False

    def hangup(self, *_: object) -> None:
        """SIGHUP: refresh the CRL now (what an admin does after revoking someone); done in the loop."""
        self._hangup = True

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run the loop until stopped: start the children, serve the channels, the control socket and the
        timers, then :meth:`shutdown`.  Returns the exit code: 0, or 1 after MAX_LOOP_FAILURES unexpected
        errors in a row.  The firewall policy stays either way."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.hangup)
        self._selector = selector = selectors.DefaultSelector()
        self._holding = holding = selectors.DefaultSelector()
        try:
            for child in self.children:
                if child.channel is not None:
                    selector.register(child.channel, selectors.EVENT_READ, child)
            for both in (selector, holding):
                if self.control is not None:
                    both.register(self.control.socket, selectors.EVENT_READ, "control")
                if self.instance is not None:
                    both.register(self.instance, selectors.EVENT_READ, "instance")
                if self.log_relay is not None:  # the children's log lines flow while a batch is held too
                    both.register(self.log_relay.fileno(), selectors.EVENT_READ, "log")
            self._start_children()
            self._tell_manager(self.clock())
            failures = 0
            while self._running:
                try:
                    self.turn(self._timeout())
                    failures = 0
                except Exception:  # a bug: log it and go on; a stop would not open anything, but keeps knocks out
                    failures += 1
                    log.exception("unexpected error in the monitor (%d in a row); the firewall policy stays", failures)
                    if failures >= MAX_LOOP_FAILURES:
                        self.exit_code = 1
                        break
                    time.sleep(0.1)
        finally:
            self.shutdown()
            selector.close()
            holding.close()
            self._selector = self._holding = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _timeout(self) -> float:
        now = self.clock()
        wake = [self._next_watch, now + 1.0]
        deadline = self.grants.next_deadline()
        if deadline is not None:
            wake.append(deadline)
        if self._pending:
            wake.append(now + self._batch.hold(now))
        if self.crl is not None and self.crl.local():
            wake.append(self._next_crl)
        wake.extend(c.respawn_at for c in self._all_children() if c.respawn_at is not None)
        return max(0.0, min(wake) - now)

    def turn(self, timeout: float) -> None:
        """One pass of the loop: wait at most ``timeout`` on the selector, then do what is due.

        While a batch is held (:class:`BatchRule`) the workers' channels are not watched: each message
        would wake the monitor for a turn that only queues it, and the worker that sent it would pay for
        the wake-up.  What they send meanwhile is read when the hold ends, before the batch is applied."""
        assert self._selector is not None
        held = self._holding is not None and bool(self._pending) and self._batch.hold(self.clock()) > 0
        selector = self._holding if held and self._holding is not None else self._selector
        for key, _ in selector.select(timeout):
            if key.data == "control":
                if self.control is not None:
                    self.control.serve_one({"status": lambda _: self.status(), "close": self.close_command})
            elif key.data == "instance":
                self._answer_instance_probe()
            elif key.data == "log":
                if self.log_relay is not None:
                    self.log_relay.pump()
            else:
                child: Child = key.data
                if child.role == "worker":
                    self._pending += self.read(key.fileobj)  # type: ignore[arg-type]
                elif child.role == "metrics server":
                    self._read_metrics_server(child)
                else:
                    self._read_fetcher(child)
        if self._pending:
            now = self.clock()
            if self._batch.hold(now) <= 0:
                if held:  # what the workers sent during the hold joins the batch
                    for child in list(self.children):
                        if child.channel is not None:
                            self._pending += self.read(child.channel)
                pending, self._pending = self._pending, []
                self.apply(pending)
                self._batch.applied(self.clock(), len(pending))
        self.expire()
        now = self.clock()
        if now >= self._next_watch:
            self._next_watch = now + WATCH_INTERVAL
            self.watch()
        if self._hangup:
            self._hangup = False
            if self.reopen_log is not None:
                self.reopen_log()
            self.refresh_crl(now_requested=True)
        elif self.crl is not None and self.crl.local() and now >= self._next_crl:
            self.refresh_crl()
        self._respawn_due(now)
        self._tell_manager(now)
        if self._metrics_server is not None and now >= self._next_snapshot:
            self._next_snapshot = now + REPORT_INTERVAL
            try:
                self._send_snapshot(self._metrics_server)
            except Exception:  # a bug in the metrics must not count toward stopping the monitor
                log.exception("cannot send the metrics a snapshot")
        if self._ledger_dirty and self.ledger is not None:
            self._ledger_dirty = False
            try:
                self._save_ledger()
            except OSError as exc:
                log.error("cannot update %s: %s", self.ledger.path, exc)

    # -- the ledger of grants a backend cannot end by itself ------------------------------------------

    def _save_ledger(self, extra: Sequence[tuple[Opening, float, str]] = ()) -> None:
        assert self.ledger is not None
        offset = self.wall_clock() - self.clock()
        entries = {e.opening: (e.opening, e.expires_at + offset, e.client) for e in self.grants.entries()}
        for opening, expires, client in extra:
            held = entries.get(opening)
            entries[opening] = (opening, max(expires, held[1]) if held else expires, client)
        self.ledger.save(entries.values())

    def _reopen_ledger(self, now: float, wall: float) -> None:
        """Take over what a previous run left open: close now what is past its time, the rest on time."""
        assert self.ledger is not None
        try:
            left = self.ledger.load()
        except LedgerError as exc:
            log.error("cannot read the grants a previous run left open (%s): sknock cannot close them; check "
                      "the firewall (%s) by hand", exc, self.firewall.name)
            return
        self.firewall.take_over([opening for opening, _, _ in left])
        for opening, expires, client in left:
            if opening not in self.grants:
                self.grants.open(opening, expires - wall, now, client)
        if left:
            log.warning("%d grant(s) left open by a previous run (%s cannot end them by itself): those past "
                        "their time are closed now, the rest on time", len(left), self.firewall.name)

    # -- requests from workers -----------------------------------------------------------------------

    def read(self, channel: socket.socket) -> list[GrantRequest]:
        """Everything one worker has sent since the last turn (at most MAX_BATCH messages)."""
        requests = []
        for _ in range(MAX_BATCH):
            data = self._receive(channel)
            if data is None:
                break
            try:
                if data.startswith(STATS_PREFIX):
                    self.metrics.add_worker(parse_stats(data))
                else:
                    requests.append(parse_request(data, max_duration=self.max_duration, id_cache=self._ids))
            except PrivsepError as exc:
                log.error("refused a malformed request from a worker: %s", exc)
        return requests

    def _receive(self, channel: socket.socket) -> bytes | None:
        """One message from a child's channel, or None when none is waiting.  A channel that has closed
        (or failed) means the child has gone: it is reaped and its replacement planned."""
        try:
            size = channel.recv_into(self._buffer)
        except BlockingIOError:
            return None
        except OSError as exc:
            log.error("channel failed: %s", exc)
            size = 0
        if size == 0:
            self._child_gone(self._by_channel.get(channel), channel)
            return None
        return bytes(memoryview(self._buffer)[:size])

    def apply(self, requests: Sequence[GrantRequest]) -> None:
        """Refuse knocks applied before, record the rest in the journal, then apply the last word on
        each opening in one batch."""
        wall = self.wall_clock()
        journal = self.journal
        fresh: dict[bytes, GrantRequest] = {}
        revoked = self._revoked
        for request in requests:
            if revoked and not revoked.isdisjoint(request.revocation_ids):
                # verified by a worker that did not have the newest CRL yet
                log.info("refused knock from %s: cert-revoked (%s; the monitor's CRL)", request.opening.address,
                         request.client, extra=_refusal(request, "cert-revoked"))
                self.metrics.refuse(Reason.CERT_REVOKED)
                continue
            key = request.replay_key
            if key in fresh or journal.seen(key, request.expires, wall):
                log.info("refused knock from %s: replay (its nonce was granted by another worker or before a "
                         "restart)", request.opening.address, extra=_refusal(request, "replay"))
                self.metrics.refuse(Reason.REPLAY)
                continue
            fresh[key] = request
        if fresh and self.replay.store.shared:
            self._claim_shared(fresh, wall)
        try:
            taken = journal.record(((key, r.expires) for key, r in fresh.items()), wall)
        except OSError as exc:
            log.error("refused %d knock request(s): cannot record them in %s (%s); a knock that is not "
                      "recorded could be replayed after a restart", len(fresh), journal.path, exc)
            self.metrics.refuse(Reason.INTERNAL_ERROR, len(fresh))
            return
        final: dict[Opening, GrantRequest] = {}
        for index, request in enumerate(fresh.values()):
            if index >= taken:
                log.warning("refused knock from %s: overload (replay memory full)", request.opening.address,
                            extra=_refusal(request, "overload"))
                self.metrics.refuse(Reason.OVERLOAD)
                continue
            final[request.opening] = request
        opens = [(o, r.duration) for o, r in final.items() if r.op == "open"]
        closes = [o for o, r in final.items() if r.op == "close"]
        grants = self.grants
        if self.ledger is not None and opens:
            try:  # before the grants exist: a crash after this point leaves them recorded, to be closed
                self._save_ledger(extra=[(o, wall + d, final[o].client) for o, d in opens])
            except OSError as exc:
                log.error("refused %d knock request(s): cannot record them in %s (%s); a grant that is not "
                          "recorded would stay open if the server were killed", len(opens), self.ledger.path, exc)
                self.metrics.refuse(Reason.INTERNAL_ERROR, len(final))
                return
        known = {o for o, _ in opens if o in grants}
        failed = {opening for opening, _ in self._apply(opens, closes, known)} if final else set()
        now = self.clock()
        knocks: dict[bytes, tuple[GrantRequest, list[str]]] = {}  # a knock is its nonce; its ports go together
        for opening, request in final.items():
            if opening in failed:
                continue
            if request.op == "open":
                grants.open(opening, request.duration, now, request.client, request.revocation_ids)
            else:
                grants.close(opening)
            port = f"{opening.protocol.label}/{opening.port}"
            entry = knocks.get(request.nonce)
            if entry is None:
                knocks[request.nonce] = (request, [port])
            else:
                entry[1].append(port)
        self._log_applied(knocks.values(), known)
        self.metrics.applied(knocks.values(), now)
        self._ledger_dirty = True

    def _claim_shared(self, fresh: dict[bytes, GrantRequest], wall: float) -> None:
        """Claim ``fresh`` in the fleet's shared replay store; drop from it what another server applied, and what
        the store cannot confirm when the fallback refuses it (see :mod:`~sknock.server.replaystore`)."""
        verdicts = self.replay.admit([(key, r.expires) for key, r in fresh.items()], wall, self.clock())
        for (key, request), verdict in zip(list(fresh.items()), verdicts, strict=True):
            if verdict is True:
                continue
            del fresh[key]
            if verdict is False:
                log.info("refused knock from %s: replay (its nonce was granted by another server of the fleet)",
                         request.opening.address, extra=_refusal(request, "replay"))
                self.metrics.refuse(Reason.REPLAY)
            else:
                log.warning("refused knock from %s: replay-unconfirmed (the shared replay store %s cannot say "
                            "whether another server granted it; replayStoreFallback = refuse)",
                            request.opening.address, self.replay.store.name,
                            extra=_refusal(request, Reason.REPLAY_UNCONFIRMED.value))
                self.metrics.refuse(Reason.REPLAY_UNCONFIRMED)

    @staticmethod
    def _log_applied(knocks: Iterable[tuple[GrantRequest, list[str]]], known: set[Opening]) -> None:
        """Every applied knock, by address and client, once the firewall has it.  Knocks for the same
        ports and duration share a line (at most LOG_GROUP of them): at thousands of grants a second, a
        log record per knock cost the monitor as much as the firewall itself."""
        groups: dict[tuple[str, str, float, bool], list[GrantRequest]] = {}
        for request, ports in knocks:
            key = (request.op, ",".join(ports), request.duration, request.opening in known)
            groups.setdefault(key, []).append(request)
        for (op, port_list, duration, extending), requests in groups.items():
            for start in range(0, len(requests), LOG_GROUP):
                part = requests[start : start + LOG_GROUP]
                clients = ", ".join(f"{r.opening.address} ({r.client})" for r in part)
                # the same facts as fields, for logFormat = json (the plain line stays as it was)
                extra = _who(part, "close-request" if op == "close" else "grant")
                extra.update(ports=port_list.split(","), duration=duration)
                if op == "close":
                    log.info("closing %s for %s at its request", port_list, clients, extra=extra)
                else:
                    log.info("granted %s to %s for %g s%s", port_list, clients, duration,
                             ", extending an open grant" if extending else "", extra=extra)

    def _apply(
        self, opens: list[tuple[Opening, float]], closes: list[Opening], known: set[Opening] | None = None
    ) -> list[tuple[Opening, SknockError]]:
        try:
            failures: list[tuple[Opening, SknockError]] = list(self.firewall.apply(opens, closes, known))
        except SknockError as exc:  # a backend that fails as a whole
            failures = [(o, exc) for o, _ in opens] + [(o, exc) for o in closes]
        for opening, error in failures:
            log.error("firewall: %s: %s", opening, error)
        return failures

    # -- time ----------------------------------------------------------------------------------------

    def expire(self) -> None:
        """Close the grants whose window has ended; a close that fails stays listed, overdue, and is
        retried with a backoff until the firewall confirms it."""
        now = self.clock()
        due = self.grants.due(now)
        if not due:
            return
        failed = {opening for opening, _ in self._apply([], due)}
        self._ledger_dirty = True
        self.metrics.close("expiry", len(due) - len(failed))
        for opening in due:
            if opening in failed:
                delay = self.grants.close_failed(opening, now)
                log.error("could not close %s/%d for %s; it stays listed as overdue and is retried in %g s",
                          opening.protocol.label, opening.port, opening.address, delay)
            else:
                log.info("closed %s/%d for %s: window ended", opening.protocol.label, opening.port, opening.address,
                         extra={"event": "expiry", "source": str(opening.address),
                                "ports": [f"{opening.protocol.label}/{opening.port}"]})

    def watch(self) -> None:
        """Put sknock's firewall back if something else removed or rewrote it (``nft flush ruleset``,
        a firewall service restart), with the grants still due; and every FOREIGN_INTERVAL, or when the
        firewall is not as installed, remove from it what no knock granted (:meth:`remove_foreign`)
        first -- a rule added to the iptables chain changes its length, and is then named and removed
        rather than swept away by a restore."""
        now = self.clock()
        try:
            intact = self.firewall.intact()
        except SknockError as exc:
            log.error("cannot check the firewall: %s", exc)
            intact = False
        if not intact or now >= self._next_foreign:
            self._next_foreign = now + FOREIGN_INTERVAL
            if self.remove_foreign(quiet=not intact) and not intact:
                with contextlib.suppress(SknockError):  # said above; a restore follows
                    intact = self.firewall.intact()
        if intact:
            return
        remaining = self.grants.remaining(self.clock())
        log.error("sknock's firewall (%s) was removed or changed by something else: restoring it with %d "
                  "grant(s) still due", self.firewall.name, len(remaining))
        try:
            self.firewall.restore(remaining)
        except SknockError as exc:
            log.error("restoring the firewall failed (tried again in %g s): %s", WATCH_INTERVAL, exc)

    def remove_foreign(self, *, quiet: bool = False) -> int:
        """Remove from sknock's set or chain every entry that is not a grant in the table (someone added
        it by hand: it would let in a source no knock let in), and log each at ERROR level -- one line
        each, or one line with the count and the first few when there are more than FOREIGN_NAMED.
        Returns how many were removed.  ``quiet``: the firewall is known not to be intact, so a listing
        that fails (no table) is no news."""
        try:
            found = foreign(self.firewall.held(), self.grants.openings())
        except SknockError as exc:
            if not quiet:
                log.error("cannot list the entries of sknock's firewall (%s): %s", self.firewall.name, exc)
            return 0
        if not found:
            return 0
        failures: list[tuple[Held, SknockError]]
        try:
            failures = list(self.firewall.remove(found))
        except SknockError as exc:
            failures = [(entry, exc) for entry in found]
        failed = {id(entry) for entry, _ in failures}
        removed = [entry for entry in found if id(entry) not in failed]
        self.metrics.foreign_removed += len(removed)
        why = "not granted by a knock (added by hand?); a permanent exception belongs in your own ruleset"
        if len(removed) <= FOREIGN_NAMED:
            for entry in removed:
                log.error("removed %s from sknock's firewall (%s): %s", entry, self.firewall.name, why,
                          extra=_foreign(entry))
        else:
            log.error("removed %d entries from sknock's firewall (%s): %s, all %s", len(removed),
                      self.firewall.name, summary(removed, FOREIGN_NAMED), why,
                      extra={"event": "foreign", "reason": why, "detail": len(removed)})
        for entry, error in failures[:FOREIGN_NAMED]:
            log.error("could not remove %s, which no knock granted, from sknock's firewall (tried again in %g s): "
                      "%s", entry, FOREIGN_INTERVAL, error)
        return len(removed)

    # -- the CRL -------------------------------------------------------------------------------------

    def _now_utc(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.wall_clock(), dt.UTC)

    def crls(self) -> list[x509.CertificateRevocationList]:
        """The CRLs in hand, the ones every worker verifies with: the newest of each CA's (empty with
        ``revocation = none``, or before any source brought a good CRL)."""
        return self.crl.crls() if self.crl is not None else []

    def refresh_crl(self, *, now_requested: bool = False) -> None:
        """Re-read the CRL sources that are files (the monitor reads them itself, as root), and on SIGHUP
        ask the CRL fetcher to fetch the URLs now."""
        if self.crl is None:
            return
        fetched = self.crl.fetched()
        if now_requested and fetched and self._fetcher is not None and self._fetcher.pid:
            log.info("SIGHUP: asking the CRL fetcher to fetch %s now", ", ".join(self.crl.sources[i] for i in fetched))
            _signal(self._fetcher.pid, signal.SIGHUP)
        local = self.crl.local()
        if not local:
            return
        if now_requested:
            log.info("SIGHUP: reading the CRL from %s now", ", ".join(self.crl.sources[i] for i in local))
        self._next_crl = self.clock() + self.crl_interval
        results = self.crl.refresh(self._now_utc(), local)
        self.metrics.crl_refreshed(r.status for r in results)
        self._adopt(results)

    def offer_crl(self, data: bytes, source: int = 0) -> None:
        """CRL bytes from the CRL fetcher for URL source number ``source`` (unprivileged: trusted for
        nothing): verified against the CAs and refused if older than the CRL in hand from that source, or
        another CA's, before they are written or used."""
        if self.crl is None:
            return
        if source not in self.crl.fetched():
            log.error("refused a CRL from the CRL fetcher for source %d, which is not a URL it fetches", source)
            return
        result = self.crl.accept(source, data, self._now_utc())
        if result.status == "failed":  # the fetcher's own result says how the download went
            self.metrics.crl_refreshed(["failed"])
        self._adopt([result])

    def _adopt(self, results: Sequence[RefreshResult]) -> None:
        """Hand the set to the workers when a refresh brought a new CRL."""
        updated = [r.crl for r in results if r.status == "updated"]
        if not updated:
            return
        workers = [c for c in self.children if c.channel is not None]
        log.info("using the new CRL%s %s: handed to %d worker(s) with %d CRL(s) in all, whose certificate caches "
                 "are dropped", "s" if len(updated) > 1 else "", "; ".join(_describe_crl(c) for c in updated),
                 len(workers), len(self.crls()))
        self._send_crl(workers)
        self._note_revocations()
        self._close_revoked()

    def _note_revocations(self) -> None:
        """Every (issuer, serial) the CRLs in hand revoke, as a set: checked for each request and grant."""
        revoked: set[RevocationId] = set()
        for crl in self.crls():
            for entry in crl:
                revoked.add(revocation_id(crl.issuer, entry.serial_number))
        self._revoked = frozenset(revoked)

    def _close_revoked(self) -> None:
        """Revocation ends access: close at once every grant made for a certificate (or under a CA) that
        the CRLs in hand now revoke."""
        revoked = self._revoked
        doomed = [e for e in self.grants.entries() if not revoked.isdisjoint(e.revocation_ids)]
        self._close_now(doomed, "its certificate, or a CA above it, is revoked by the new CRL", "revocation")

    def _close_now(self, entries: Sequence[GrantEntry], why: str, cause: str) -> list[GrantEntry]:
        """Close ``entries`` in the firewall now; a close that fails stays listed, overdue, and is retried.
        ``cause`` is the metrics' name for ``why`` (:data:`~sknock.server.metrics.CLOSE_CAUSES`)."""
        if not entries:
            return []
        failed = {opening for opening, _ in self._apply([], [e.opening for e in entries])}
        self._ledger_dirty = True
        now = self.clock()
        closed = []
        for entry in entries:
            opening = entry.opening
            what = f"{opening.protocol.label}/{opening.port} for {opening.address} ({entry.client})"
            if opening in failed:
                self.grants.end_now(opening, now)
                log.error("could not close %s (%s); it stays listed and is retried", what, why)
            else:
                self.grants.close(opening)
                closed.append(entry)
                log.warning("closed %s: %s", what, why,
                            extra={"event": "close", "source": str(opening.address), "subject": entry.client,
                                   "serial": entry.serial, "ports": [f"{opening.protocol.label}/{opening.port}"],
                                   "reason": why})
        self.metrics.close(cause, len(closed))
        return closed

    def close_command(self, arguments: dict[str, Any]) -> dict[str, object]:
        """``sknock-server close``: close the open grants of a client (by subject or certificate serial
        number) or of a source address, now."""
        given = {k: v for k, v in arguments.items() if k in ("client", "serial", "address") and v is not None}
        if len(given) != 1 or len(arguments) != 1:
            return {"error": "close takes exactly one of: client, serial, address"}
        (key, value), = given.items()
        try:
            match = _matcher(key, value)
        except ValueError as exc:
            return {"error": f"close --{key}: {exc}"}
        entries = [e for e in self.grants.entries() if match(e)]
        closed = self._close_now(entries, f"closed by the operator (close --{key} {value})", "operator")
        return {"closed": [_describe(e) for e in closed],
                "failed": [_describe(e) for e in entries if e not in closed]}

    def _crl_message(self) -> bytes:
        """``CRL_PREFIX`` and the DER of every CRL in hand, one after the other (one CRL: its DER alone; none:
        nothing).  One message, so that a worker never runs with half a set."""
        return CRL_PREFIX + (self.crl.encoded() if self.crl is not None else b"")

    def _send_crl(self, children: Iterable[Child]) -> None:
        """Hand the CRLs in hand to workers.  A worker that cannot take them is replaced (it would go on
        with the old CRLs, and a revoked client with them); its successor starts with the new ones."""
        if self.crl is None:
            return
        message = self._crl_message()
        for child in children:
            if child.role != "worker" or child.channel is None:
                continue
            try:
                child.channel.send(message)
            except OSError as exc:
                log.error("%s (pid %d) cannot take the new CRLs (%s): replacing it", child.name, child.pid, exc)
                _signal(child.pid, signal.SIGKILL)

    def _read_fetcher(self, child: Child) -> None:
        assert child.channel is not None
        data = self._receive(child.channel)
        if data is None:
            return
        start = len(CRL_PREFIX) + FETCHED_HEADER.size
        if data.startswith(CRL_PREFIX) and len(data) >= start:
            (source,) = FETCHED_HEADER.unpack_from(data, len(CRL_PREFIX))
            self.offer_crl(data[start:], source)
        elif data.startswith(FETCH_RESULT_PREFIX):
            try:
                source, status = parse_fetch_result(data)
            except PrivsepError as exc:
                log.error("refused a malformed message from the CRL fetcher: %s", exc)
                return
            if self.crl is not None and source in self.crl.fetched():
                self.metrics.crl_refreshed([status])
        else:
            log.error("refused a malformed message from the CRL fetcher (%d bytes)", len(data))

    # -- metrics -------------------------------------------------------------------------------------

    def _send_snapshot(self, child: Child) -> None:
        """The figures now, to the metrics server; skipped while it is not running or not reading."""
        if child.channel is None:
            return
        crls = crl_figures(self.crl.refreshers, self.wall_clock()) if self.crl is not None else []
        drops = self._capture_drops() if self._capture_drops is not None else 0
        snapshot = self.metrics.snapshot(grants_open=len(self.grants), crls=crls, capture_drops=drops)
        with contextlib.suppress(OSError):  # full: the next one will do; gone: its channel says so
            child.channel.send(snapshot.encode())

    def _read_metrics_server(self, child: Child) -> None:
        """The metrics server sends nothing: its channel readable means it has gone (or misbehaves)."""
        assert child.channel is not None
        data = self._receive(child.channel)
        if data is not None:
            log.error("ignored a message of %d bytes from the metrics server", len(data))

    # -- children ------------------------------------------------------------------------------------

    def _all_children(self) -> list[Child]:
        return self.children + [c for c in (self._fetcher, self._metrics_server) if c is not None]

    def _start_children(self) -> None:
        if self.spawn is None:
            return
        for helper in (self._fetcher, self._metrics_server):
            if helper is not None:
                self._spawn(helper)
        for child in self.children:
            if not child.pid:
                self._spawn(child)

    def _own_fds(self) -> list[int]:
        """What a forked child must close: the monitor's sockets and its other children's channels."""
        fds = [c.channel.fileno() for c in self._all_children() if c.channel is not None]
        if self.control is not None:
            fds.append(self.control.socket.fileno())
        if self.instance is not None:
            fds.append(self.instance.fileno())
        if self.log_relay is not None:
            fds.append(self.log_relay.fileno())
        return fds

    def _spawn(self, child: Child) -> None:
        assert self.spawn is not None
        child.respawn_at = None
        self.replay.store.disconnect()  # no child may inherit the connection to the shared store
        try:
            pid, channel = self.spawn(child.role, child.index, self._own_fds())
        except (OSError, SknockError) as exc:
            log.error("cannot start %s: %s", child.name, exc)
            child.respawn_at = self.clock() + MAX_RESTART_DELAY
            return
        channel.setblocking(False)
        child.pid, child.channel = pid, channel
        child.starts.append(self.clock())
        self._by_channel[channel] = child
        if self._selector is not None:
            self._selector.register(channel, selectors.EVENT_READ, child)
        if child.role == "worker":
            self._send_crl([child])  # before it reads any packet: the CRL in hand, not the one it was born with
        log.info("%s running: pid %d", child.name, pid)

    def _child_gone(self, child: Child | None, channel: socket.socket) -> None:
        """A child's channel closed: it died (or is dying).  Reap it and plan its replacement; the
        firewall policy stays as it is."""
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(channel)
        self._by_channel.pop(channel, None)
        channel.close()
        if child is None:
            return
        child.channel = None
        how = _reap(child.pid) if child.pid else "gone"
        child.pid = 0
        if not self._running or self.spawn is None:
            log.error("%s has gone (%s); the firewall policy stays in place", child.name, how)
            return
        if child.role == "worker":
            self.metrics.worker_restarts += 1
        now = self.clock()
        while child.starts and child.starts[0] < now - RESTART_WINDOW:
            child.starts.popleft()
        extra = len(child.starts) - FREE_RESTARTS
        delay = 0.0 if extra < 0 else min(MAX_RESTART_DELAY, 2.0**extra)
        child.respawn_at = now + delay
        log.error("%s has gone (%s); the firewall policy stays in place; starting a new one%s",
                  child.name, how, f" in {delay:g} s" if delay else "")

    def _respawn_due(self, now: float) -> None:
        for child in self._all_children():
            if child.respawn_at is not None and child.respawn_at <= now and self._running:
                self._spawn(child)

    def _answer_instance_probe(self) -> None:
        """Another server asked who holds this namespace (it has read our pid already): hang up."""
        assert self.instance is not None
        with contextlib.suppress(OSError):
            conn, _ = self.instance.accept()
            conn.close()

    # -- the service manager --------------------------------------------------------------------------

    def all_running(self) -> bool:
        """Every child (each worker, and the CRL fetcher if any) is running now: its channel is open."""
        return all(c.channel is not None for c in self._all_children())

    def status_line(self) -> str:
        """The one line ``systemctl status`` shows: open grants, running workers, the age of the oldest CRL."""
        crls = self.crls()
        if self.crl is None or not len(self.crl):
            crl = "no CRL checked (revocation none)"
        elif not crls:
            crl = "no CRL yet"
        else:
            age = self.wall_clock() - min(c.last_update_utc.timestamp() for c in crls)
            crl = f"oldest CRL issued {_duration(age)} ago"
        running = sum(1 for c in self.children if c.channel is not None)
        return f"{len(self.grants)} open grant(s); {running}/{len(self.children)} worker(s); {crl}"

    def _tell_manager(self, now: float) -> None:
        """Send what :attr:`heartbeat` says is due: READY once every child runs, STATUS, WATCHDOG."""
        if self.notifier is None:
            return
        fields = self.heartbeat.fields(now, ready=self.all_running(), alive=self.all_running(),
                                       status=self.status_line())
        if fields:
            self.notifier.send(**fields)

    # -- status and stop -----------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """What ``sknock-server status`` shows: the backend, the children, the CRLs and every grant with the
        seconds it has left."""
        now = self.clock()
        crls = self.crls()
        updates = [c.next_update_utc for c in crls if c.next_update_utc is not None]
        return {
            "backend": self.firewall.name,
            "kernel_expiry": self.firewall.kernel_expiry,
            "workers": len(self.children),
            "worker_pids": self.worker_pids,
            "revocation": "crl" if self.crl is not None and len(self.crl) else "none",
            "crl_next_update": min(updates).isoformat() if updates else None,  # the earliest of the set
            "crls": self._crl_status(),
            "replay_store": self.replay.status(now),
            "grants": [
                {
                    "address": str(e.opening.address),
                    "protocol": e.opening.protocol.label,
                    "port": e.opening.port,
                    "client": e.client,
                    "opened_seconds_ago": round(now - e.opened_at, 3),
                    "expires_in": round(e.expires_at - now, 3),
                    "overdue": e.overdue,
                    "close_failures": e.close_failures,
                    "serial": e.serial,
                }
                for e in self.grants.entries()
            ],
        }

    def _crl_status(self) -> list[dict[str, object]]:
        """Each CRL source and what it holds now."""
        out: list[dict[str, object]] = []
        if self.crl is None:
            return out
        wall = self._now_utc()
        for refresher in self.crl.refreshers:
            crl = refresher.current
            entry: dict[str, object] = {"source": refresher.source, "file": str(refresher.crl_file)}
            if isinstance(crl, x509.CertificateRevocationList):
                next_update = crl.next_update_utc
                entry.update(
                    issuer=log_safe(crl.issuer.rfc4514_string()),
                    issued=crl.last_update_utc.isoformat(),
                    next_update=next_update.isoformat() if next_update is not None else None,
                    stale=next_update is not None and next_update < wall,
                    revoked=len(crl),
                )
            else:
                entry["issuer"] = None  # no good CRL from this source yet
            out.append(entry)
        return out

    def shutdown(self) -> None:
        """Stop the children and the control socket.  The firewall policy stays: a stop must not open
        the door.  Grants end on time in the kernel; a backend that cannot end them by itself has them
        closed now."""
        self._running = False
        if self.notifier is not None:
            self.notifier.send(STOPPING="1", STATUS="stopping; the firewall policy stays in place")
        children = [c for c in self._all_children() if c.pid]
        for child in children:
            _signal(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in children:
            _reap(child.pid, deadline)
            child.pid = 0
            if child.channel is not None:
                child.channel.close()
                child.channel = None
        if self.log_relay is not None:
            self.log_relay.pump()  # the children's last lines
        if not self.firewall.kernel_expiry:
            self._close_now(self.grants.entries(),
                            f"the server stops, and {self.firewall.name} cannot end a grant on time by itself", "stop")
            if self.ledger is not None:
                try:
                    self._save_ledger()  # what could not be closed stays recorded for the next start
                except OSError as exc:
                    log.error("cannot update %s: %s", self.ledger.path, exc)
        log.info("the firewall policy stays in place: protected ports stay closed while the server is "
                 "stopped (sknock-server -c CONFIG teardown removes it)")
        if self.control is not None:
            self.control.close()
        self.journal.close()
        if self.instance is not None:
            self.instance.close()


def _matcher(key: str, value: object) -> Callable[[GrantEntry], bool]:
    """What ``close --KEY VALUE`` selects."""
    if key == "serial":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a serial number")
        return lambda e: e.serial == value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a {key}")
    if key == "address":
        address = ipaddress.ip_address(value)  # ValueError: not an address
        return lambda e: e.opening.address == address
    # a client: its whole subject as status shows it, or one of its parts (CN=alice), or a CN's value (alice)
    wanted = {value, f"CN={value}"}
    return lambda e: e.client in wanted or not wanted.isdisjoint(e.client.split(","))


def _serial(request: GrantRequest) -> int | None:
    """The client certificate's serial number (the first revocation id is the client's own)."""
    return request.revocation_ids[0][1] if request.revocation_ids else None


def _who(requests: Sequence[GrantRequest], event: str) -> dict[str, Any]:
    """The structured fields of a log line about ``requests``: each one's source, subject and serial (and
    at the top level too when the line is about one knock)."""
    grants = [{"source": str(r.opening.address), "subject": r.client, "serial": _serial(r)} for r in requests]
    extra: dict[str, Any] = {"event": event, "grants": grants}
    if len(grants) == 1:
        extra.update(grants[0])
    return extra


def _refusal(request: GrantRequest, reason: str) -> dict[str, Any]:
    """The structured fields of a refusal the monitor makes (see :mod:`sknock.server.logs`)."""
    opening = request.opening
    return {"event": "refusal", "reason": reason, "source": str(opening.address), "subject": request.client,
            "serial": _serial(request), "ports": [f"{opening.protocol.label}/{opening.port}"]}


def _describe(entry: GrantEntry) -> str:
    opening = entry.opening
    return f"{opening.protocol.label}/{opening.port} for {opening.address} ({entry.client})"


def _foreign(entry: Held) -> dict[str, Any]:
    """The structured fields of the line that says an entry no knock granted was removed."""
    extra: dict[str, Any] = {"event": "foreign", "detail": str(entry)}
    if entry.opening is not None:
        extra.update(source=str(entry.opening.address),
                     ports=[f"{entry.opening.protocol.label}/{entry.opening.port}"])
    return extra


def _describe_crl(crl: object) -> str:
    """``of CN=X (CRL number 7 issued …, next update …)`` for the log."""
    issuer = getattr(crl, "issuer", None)
    next_update = getattr(crl, "next_update_utc", None)
    try:
        name = log_safe(issuer.rfc4514_string()) if isinstance(issuer, x509.Name) else "?"
    except ValueError:
        name = "<undecodable name>"
    issue = describe_crl_issue(crl) if isinstance(crl, x509.CertificateRevocationList) else "issued ?"
    return f"of {name} ({issue}, next update {next_update.isoformat() if next_update else 'none'})"


def _duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``5 h``, ``3 d``: a CRL's age for the status line."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _signal(pid: int, sig: int) -> None:
    """Signal one child by its pid (never 0 or a negative pid, which would reach a whole group)."""
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap(pid: int, deadline: float | None = None) -> str:
    """Wait for child ``pid`` (SIGKILL once ``deadline`` passes, or at once without one); say how it ended."""
    end = time.monotonic() + 1.0 if deadline is None else deadline
    status = 0
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "gone"
        if done:
            break
        if time.monotonic() >= end:
            _signal(pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                return "gone"
            break
        time.sleep(0.01)
    if os.WIFSIGNALED(status):
        return f"pid {pid} killed by signal {os.WTERMSIG(status)}"
    return f"pid {pid} exited with status {os.WEXITSTATUS(status)}"
