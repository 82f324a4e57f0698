"""The monitor (root, CAP_NET_ADMIN): the only part of the server that changes the firewall.

It runs no parser of network bytes and no crypto.  It listens to its workers, one socketpair each,
re-checks each request (:func:`privsep.parse_request`), refuses a knock's nonce it has seen before (a
replay that reached another worker), and applies everything the workers asked for since its last turn as
one batch (one nftables transaction).  It closes grants when their time is up, answers ``status`` on the
root-only control socket, writes CRLs a worker verified, and tears everything down on SIGTERM/SIGINT or
when a worker dies (fail closed: a restart brings it all back).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import SknockError
from ..fileio import write_atomic
from ..replay import ReplayCache
from .control import ControlServer
from .firewall.base import Firewall, Opening
from .grants import GrantTable
from .privsep import GrantRequest, PrivsepError, parse_request

__all__ = ["Monitor", "CRL_PREFIX", "MAX_CRL_MESSAGE", "MAX_BATCH"]

log = logging.getLogger("sknock.monitor")
CRL_PREFIX = b"CRL\0"
MAX_CRL_MESSAGE = 4 << 20
MAX_BATCH = 2048  # messages read from one worker before the batch is applied
NONCE_CAPACITY = 1_000_000
LOG_GROUP = 32  # knocks named in one log line
# One firewall transaction costs about 120 us whatever its size, 15 us more per grant (nftables,
# measured): applying one grant per transaction under load took the monitor 72 us a grant.
MIN_BATCH_INTERVAL = 0.001  # seconds
# Coalescing only pays under load; at 1,000 grants a second it added up to 1 ms to every grant.
BUSY_RATE = 2000.0  # requests a second, over the last RATE_WINDOW
RATE_WINDOW = 0.01  # seconds


class RecentRate:
    """Requests a second over the last ``window`` seconds (time passed in)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._count = 0

    def add(self, now: float, count: int) -> None:
        self._events.append((now, count))
        self._count += count

    def per_second(self, now: float) -> float:
        events = self._events
        while events and events[0][0] < now - self.window:
            self._count -= events.popleft()[1]
        return self._count / self.window


class Monitor:
    def __init__(
        self,
        *,
        firewall: Firewall,
        channels: Sequence[socket.socket],
        max_duration: float,
        control: ControlServer | None = None,
        crl_file: Path | None = None,
        worker_pids: Sequence[int] = (),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.firewall = firewall
        self.channels = list(channels)
        for channel in self.channels:
            channel.setblocking(False)
        self.max_duration = max_duration
        self.control = control
        self.crl_file = crl_file
        self.worker_pids = list(worker_pids)
        self.clock = clock
        self.wall_clock = wall_clock
        self.grants = GrantTable()
        # Nonces of applied knocks, until they leave the timestamp window: the workers each keep their
        # own replay caches, and this one catches a replay that reached a different worker.
        self.nonces = ReplayCache(NONCE_CAPACITY, evict_when_full=False)
        # One receive buffer, reused: a fresh 4 MiB bytes object per message would cost more than a grant.
        self._buffer = bytearray(MAX_CRL_MESSAGE + len(CRL_PREFIX))
        self._running = True
        self._rate = RecentRate(RATE_WINDOW)
        self.exit_code = 0

    def stop(self, *_: object) -> None:
        self._running = False

    def hangup(self, *_: object) -> None:
        """SIGHUP: the workers refresh the CRL at once (what an admin does after revoking someone)."""
        log.info("SIGHUP: asking the workers to refresh the CRL now")
        for pid in self.worker_pids:
            os.kill(pid, signal.SIGHUP)

    def run(self) -> int:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.hangup)
        selector = selectors.DefaultSelector()
        for channel in self.channels:
            selector.register(channel, selectors.EVENT_READ, channel)
        if self.control is not None:
            selector.register(self.control.socket, selectors.EVENT_READ, None)
        last_apply = -math.inf
        try:
            while self._running:
                deadline = self.grants.next_deadline()
                timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - self.clock()))
                pending: list[GrantRequest] = []
                for key, _ in selector.select(timeout):
                    if key.data is None:
                        if self.control is not None:
                            self.control.serve_one(self.status)
                    else:
                        pending += self.read(key.data)
                if pending:
                    # Under load (BUSY_RATE grants a second or more), at most one transaction per
                    # MIN_BATCH_INTERVAL: the process sleeps out the rest of the interval (not woken by
                    # every message) and what came meanwhile joins the batch.  Below that rate, or when
                    # the last transaction is older than the interval, a request is applied at once.
                    now = self.clock()
                    wait = last_apply + MIN_BATCH_INTERVAL - now
                    if wait > 0 and self._rate.per_second(now) >= BUSY_RATE:
                        time.sleep(wait)
                        for channel in self.channels:
                            pending += self.read(channel)
                    self.apply(pending)
                    last_apply = self.clock()
                    self._rate.add(last_apply, len(pending))
                self.expire()
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def read(self, channel: socket.socket) -> list[GrantRequest]:
        """Everything one worker has sent since the last turn (at most MAX_BATCH messages)."""
        requests = []
        for _ in range(MAX_BATCH):
            try:
                size = channel.recv_into(self._buffer)
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("worker channel failed: %s", exc)
                size = 0
            if size == 0:
                log.error("a worker has gone: shutting down (fail closed: every grant is removed)")
                self.exit_code = 1
                self._running = False
                break
            data = bytes(memoryview(self._buffer)[:size])
            if data.startswith(CRL_PREFIX):
                self.store_crl(data[len(CRL_PREFIX) :])
                continue
            try:
                requests.append(parse_request(data, max_duration=self.max_duration))
            except PrivsepError as exc:
                log.error("refused a malformed request from a worker: %s", exc)
        return requests

    def apply(self, requests: Sequence[GrantRequest]) -> None:
        """Refuse replayed nonces, then apply the last word on each opening in one batch."""
        wall = self.wall_clock()
        nonces = self.nonces
        final: dict[Opening, GrantRequest] = {}
        for request in requests:
            opening = request.opening
            replay = request.replay_key
            if nonces.seen(replay, wall):
                log.info("refused knock from %s: replay (its nonce was granted by another worker)", opening.address)
                continue
            if not nonces.add(replay, request.expires, wall):
                log.warning("refused knock from %s: overload (nonce cache full)", opening.address)
                continue
            final[opening] = request
        opens = [(o, r.duration) for o, r in final.items() if r.op == "open"]
        closes = [o for o, r in final.items() if r.op == "close"]
        grants = self.grants
        known = {o for o, _ in opens if o in grants}
        failed = {opening for opening, _ in self._apply(opens, closes, known)} if final else set()
        now = self.clock()
        knocks: dict[bytes, tuple[GrantRequest, list[str]]] = {}  # a knock is its nonce; its ports go together
        for opening, request in final.items():
            if opening in failed:
                continue
            if request.op == "open":
                grants.open(opening, request.duration, now, request.client)
            else:
                grants.close(opening)
            port = f"{opening.protocol.label}/{opening.port}"
            entry = knocks.get(request.nonce)
            if entry is None:
                knocks[request.nonce] = (request, [port])
            else:
                entry[1].append(port)
        self._log_applied(knocks.values(), known)

    @staticmethod
    def _log_applied(knocks: Iterable[tuple[GrantRequest, list[str]]], known: set[Opening]) -> None:
        """Every applied knock, by address and client, once the firewall has it.  Knocks for the same
        ports and duration share a line (at most LOG_GROUP of them): at thousands of grants a second, a
        log record per knock cost the monitor as much as the firewall itself."""
        groups: dict[tuple[str, str, float, bool], list[str]] = {}
        for request, ports in knocks:
            key = (request.op, ",".join(ports), request.duration, request.opening in known)
            groups.setdefault(key, []).append(f"{request.opening.address} ({request.client})")
        for (op, port_list, duration, extending), who in groups.items():
            for start in range(0, len(who), LOG_GROUP):
                clients = ", ".join(who[start : start + LOG_GROUP])
                if op == "close":
                    log.info("closing %s for %s at its request", port_list, clients)
                else:
                    log.info("granted %s to %s for %g s%s", port_list, clients, duration,
                             ", extending an open grant" if extending else "")

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

    def expire(self) -> None:
        due = self.grants.due(self.clock())
        if not due:
            return
        failed = {opening for opening, _ in self._apply([], due)}
        for opening in due:
            if opening not in failed:
                log.info("closed %s/%d for %s: window ended", opening.protocol.label, opening.port, opening.address)

    def store_crl(self, data: bytes) -> None:
        if self.crl_file is None:
            return
        try:
            write_atomic(self.crl_file, data)
        except OSError as exc:
            log.error("cannot write the CRL to %s: %s", self.crl_file, exc)
        else:
            log.info("wrote the refreshed CRL to %s", self.crl_file)

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {
            "backend": self.firewall.name,
            "kernel_expiry": self.firewall.kernel_expiry,
            "workers": len(self.worker_pids),
            "grants": [
                {
                    "address": str(e.opening.address),
                    "protocol": e.opening.protocol.label,
                    "port": e.opening.port,
                    "client": e.client,
                    "opened_seconds_ago": round(now - e.opened_at, 3),
                    "expires_in": round(e.expires_at - now, 3),
                }
                for e in self.grants.entries()
            ],
        }

    def shutdown(self) -> None:
        for pid in self.worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in self.worker_pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.worker_pids = []
        try:
            self.firewall.teardown()
            log.info("firewall rules removed")
        except SknockError as exc:
            log.error("teardown: %s", exc)
            self.exit_code = self.exit_code or 1
        if self.control is not None:
            self.control.close()
