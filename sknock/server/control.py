"""The control socket: ``sknock-server status`` asks the running server which grants are open.

A Unix stream socket in a root-only folder, mode 0600: only root can connect.  One JSON request
line, one JSON answer; a client that sends nothing within a second is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from ..errors import SknockError

__all__ = ["ControlServer", "query_status", "ControlError"]

MAX_REQUEST = 256


class ControlError(SknockError):
    """The control socket cannot be opened, or the server does not answer."""


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a crashed run
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                self.socket.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self.socket.listen(8)
            self.socket.setblocking(False)
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc}") from None

    def serve_one(self, status: Callable[[], dict[str, object]]) -> None:
        try:
            conn, _ = self.socket.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                request = conn.recv(MAX_REQUEST).strip()
                if request == b"status":
                    answer: dict[str, object] = status()
                else:
                    answer = {"error": "unknown request; try 'status'"}
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                return

    def close(self) -> None:
        self.socket.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def query_status(path: Path, timeout: float = 5.0) -> dict[str, object]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"status\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise ControlError(f"cannot reach the server at {path}: {exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"the server at {path} sent an unreadable answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the server at {path} sent an unreadable answer")
    return answer
