"""The service manager's notify protocol (sd_notify), spoken at the edge in a few lines.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` naming an AF_UNIX datagram socket: a
path, or an abstract address written with a leading ``@``.  The service sends it newline-separated
``KEY=VALUE`` assignments, one datagram per message: ``READY=1`` once it serves, ``STATUS=...`` for
``systemctl status``, ``WATCHDOG=1`` as a keep-alive within ``WatchdogSec``, ``RELOADING=1`` and
``STOPPING=1``.  Without ``$NOTIFY_SOCKET`` (not started by systemd) every send does nothing.

A failed send is never fatal: the server serves knocks whether or not its manager hears of it (a
missed ``WATCHDOG=1`` makes systemd restart it, which leaves the firewall policy in place).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Notifier", "SocketNotifier", "Heartbeat", "notifier_from_environment", "watchdog_interval",
           "forget_environment", "NOTIFY_SOCKET"]

NOTIFY_SOCKET = "NOTIFY_SOCKET"
_log = logging.getLogger("sknock.notify")


class Notifier(Protocol):
    """Where the monitor tells its service manager how it is: :class:`SocketNotifier`, or anything with
    ``send`` (tests record the messages)."""

    def send(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` fields (``ready="1"`` becomes ``READY=1``) as one message; True if sent."""


def _address(name: str) -> str | bytes:
    """The socket address ``$NOTIFY_SOCKET`` names: ``@name`` is abstract (a leading NUL byte)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class SocketNotifier:
    """Sends to the AF_UNIX datagram socket ``address`` (a path, or ``@name`` for an abstract one);
    ``address`` None: every send is a no-op."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._socket: socket.socket | None = None
        self._failed = False

    def send(self, **fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines.  A value must be one line (a newline would start another
        assignment): newlines are replaced by spaces.  False when nothing was sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value.replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), _address(self.address))
        except OSError as exc:
            if not self._failed:  # say it once, not at every watchdog tick
                _log.error("cannot notify the service manager at %s: %s", self.address, exc)
            self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        """Close the socket (a later send opens it again)."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def notifier_from_environment(environ: Mapping[str, str] = os.environ) -> SocketNotifier:
    """A notifier for ``$NOTIFY_SOCKET`` (a no-op one when it is not set)."""
    return SocketNotifier(environ.get(NOTIFY_SOCKET))


def forget_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Drop the notify variables once read, so that the processes the monitor forks (and whatever they run)
    do not inherit the address (systemd's ``NotifyAccess=main`` would ignore them anyway)."""
    for name in (NOTIFY_SOCKET, "WATCHDOG_USEC", "WATCHDOG_PID"):
        environ.pop(name, None)


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` messages: half of ``$WATCHDOG_USEC`` as systemd advises, or None
    when the watchdog is off (not set, not a number, or ``$WATCHDOG_PID`` names another process)."""
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


@dataclass
class Heartbeat:
    """What to tell the service manager, and when, sans-I/O: the monitor asks :meth:`fields` each turn with
    the time and its state, and sends what comes back (nothing, most turns).

    * ``READY=1`` once, the first time ``ready`` is true (the firewall, the captures and the workers are up);
    * ``STATUS=`` when the status line changed, at most once per ``status_interval`` seconds;
    * ``WATCHDOG=1`` every ``watchdog`` seconds (None: off) after READY, and only while ``alive`` (every
      child running): a monitor whose workers are gone goes silent, and systemd restarts it.
    """

    watchdog: float | None = None
    status_interval: float = 5.0
    ready_sent: bool = False
    _last_status: str | None = None
    _next_status: float = 0.0
    _next_watchdog: float = field(default=0.0)

    def fields(self, now: float, *, ready: bool, alive: bool, status: str) -> dict[str, str]:
        """The fields to send now (empty: nothing to send)."""
        out: dict[str, str] = {}
        if not self.ready_sent:
            if not ready:
                return out
            self.ready_sent = True
            out["READY"] = "1"
        if status != self._last_status and now >= self._next_status:
            self._last_status = status
            self._next_status = now + self.status_interval
            out["STATUS"] = status
        if self.watchdog is not None and alive and now >= self._next_watchdog:
            self._next_watchdog = now + self.watchdog
            out["WATCHDOG"] = "1"
        return out
