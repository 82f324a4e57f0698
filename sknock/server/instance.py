"""One knock server per network namespace.

Two servers in one network namespace would fight over the same firewall table: the second one's setup
would replace the first one's table and drop its grants, and whichever stopped last would decide what
is left.  So the monitor claims a name before it touches anything: an abstract Unix socket, whose
namespace is the network namespace (two servers in two namespaces never collide, two in one always
do).  The kernel releases the name when the process that holds it dies, however it dies, so a crash
or ``kill -9`` never leaves a stale lock behind, and no file is involved.

A second server finds the name taken, connects to it and reads the holder's pid with SO_PEERCRED, so
it can say which process is running.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from ..errors import SknockError

__all__ = ["AlreadyRunning", "claim", "running_pid", "NAME"]

NAME = b"\0sknock-server"
_UCRED = struct.Struct("iII")  # pid, uid, gid


class AlreadyRunning(SknockError):
    """Another knock server holds this network namespace; ``pid`` is its monitor (0 if unknown)."""

    def __init__(self, pid: int) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"a knock server is already running in this network namespace ({who}); "
                         "it was left alone")
        self.pid = pid


def running_pid(name: bytes = NAME) -> int | None:
    """The pid of the server holding ``name`` in this network namespace, or None when there is none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(name)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError:
            return 0  # the name exists but cannot be reached: someone holds it
        raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, _, _ = _UCRED.unpack(raw)
    return int(pid)


def claim(name: bytes = NAME) -> socket.socket:
    """Hold ``name`` for as long as the returned socket is open (close it in forked children).
    Raises :class:`AlreadyRunning` when another process holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
    except OSError:
        sock.close()
        pid = running_pid(name)
        raise AlreadyRunning(pid or 0) from None
    try:
        sock.listen(4)  # so that a second server can connect and learn our pid
        sock.setblocking(False)
        sock.set_inheritable(False)
    except OSError:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    return sock
