"""The firewall process (root, CAP_NET_ADMIN): the only part of the server that changes the firewall.

It runs no parser of network bytes and no crypto.  It listens to the worker on a socketpair, re-checks
each request (:func:`privsep.parse_request`), applies it to the firewall backend and the grant table, closes
grants when their time is up, answers ``status`` on the root-only control socket, writes CRLs the worker
verified, and tears everything down on SIGTERM/SIGINT or when the worker dies.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import SknockError
from ..fileio import write_atomic
from .control import ControlServer
from .firewall.base import Firewall
from .grants import GrantTable
from .privsep import PrivsepError, parse_request

__all__ = ["Gatekeeper", "CRL_PREFIX", "MAX_CRL_MESSAGE"]

log = logging.getLogger("sknock.firewall")
CRL_PREFIX = b"CRL\0"
MAX_CRL_MESSAGE = 4 << 20


class Gatekeeper:
    def __init__(
        self,
        *,
        firewall: Firewall,
        channel: socket.socket,
        max_duration: float,
        control: ControlServer | None = None,
        crl_file: Path | None = None,
        worker_pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.firewall = firewall
        self.channel = channel
        self.max_duration = max_duration
        self.control = control
        self.crl_file = crl_file
        self.worker_pid = worker_pid
        self.clock = clock
        self.grants = GrantTable()
        # One receive buffer, reused: a fresh 4 MiB bytes object per grant message would cost more than
        # the grant itself.
        self._buffer = bytearray(MAX_CRL_MESSAGE + len(CRL_PREFIX))
        self._running = True
        self.exit_code = 0

    def stop(self, *_: object) -> None:
        self._running = False

    def hangup(self, *_: object) -> None:
        """SIGHUP: the worker refreshes the CRL at once (what an admin does after revoking someone)."""
        if self.worker_pid is not None:
            log.info("SIGHUP: asking the worker to refresh the CRL now")
            os.kill(self.worker_pid, signal.SIGHUP)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.hangup)
        selector = selectors.DefaultSelector()
        selector.register(self.channel, selectors.EVENT_READ, "channel")
        if self.control is not None:
            selector.register(self.control.socket, selectors.EVENT_READ, "control")
        try:
            while self._running:
                deadline = self.grants.next_deadline()
                timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - self.clock()))
                for key, _ in selector.select(timeout):
                    if key.data == "channel":
                        self.on_channel()
                    elif self.control is not None:
                        self.control.serve_one(self.status)
                self.expire()
        finally:
            self.shutdown()
        return self.exit_code

    def on_channel(self) -> None:
        try:
            size = self.channel.recv_into(self._buffer)
        except OSError as exc:
            size = 0
            log.error("worker channel failed: %s", exc)
        data = bytes(memoryview(self._buffer)[:size])
        if not data:
            log.error("the worker has gone: shutting down (fail closed: every grant is removed)")
            self.exit_code = 1
            self._running = False
            return
        if data.startswith(CRL_PREFIX):
            self.store_crl(data[len(CRL_PREFIX) :])
            return
        try:
            request = parse_request(data, max_duration=self.max_duration)
        except PrivsepError as exc:
            log.error("refused a malformed request from the worker: %s", exc)
            return
        try:
            if request.op == "open":
                self.firewall.open(request.opening, request.duration)
                extended = self.grants.open(request.opening, request.duration, self.clock(), request.client)
                log.debug("%s %s for %g s", "extended" if extended else "opened", request.opening, request.duration)
            else:
                self.firewall.close(request.opening)
                self.grants.close(request.opening)
        except SknockError as exc:
            log.error("firewall: %s", exc)

    def expire(self) -> None:
        for opening in self.grants.due(self.clock()):
            try:
                self.firewall.close(opening)
            except SknockError as exc:
                log.error("firewall: closing %s failed: %s", opening, exc)
            else:
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
        if self.worker_pid is not None:
            try:
                os.kill(self.worker_pid, signal.SIGTERM)
                os.waitpid(self.worker_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.worker_pid = None
        try:
            self.firewall.teardown()
            log.info("firewall rules removed")
        except SknockError as exc:
            log.error("teardown: %s", exc)
            self.exit_code = self.exit_code or 1
        if self.control is not None:
            self.control.close()
