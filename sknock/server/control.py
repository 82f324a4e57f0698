"""The control socket: ``sknock-server status`` asks the running server which grants are open, and
``sknock-server close`` closes some of them.

A Unix stream socket in a root-only folder, mode 0600: only root can connect.  One request line -- a
command word, then optionally a JSON object of arguments (``close {"serial": 4660}``) -- and one JSON
answer; a client that sends nothing within a second is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import SknockError

__all__ = ["ControlServer", "query", "query_status", "ControlError", "Handler"]

MAX_REQUEST = 4096
#: Answers one command: its arguments (a JSON object, empty when none were given) in, a JSON object out.
Handler = Callable[[dict[str, Any]], dict[str, object]]


class ControlError(SknockError):
    """The control socket cannot be opened, or the server does not answer."""


class ControlServer:
    """The server's end of the control socket: created root-only at ``path`` (a stale socket left by a
    crashed run is replaced), non-blocking, served from the monitor's loop.  Raises :class:`ControlError`
    when it cannot be created."""

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

    def serve_one(self, handlers: Mapping[str, Handler]) -> None:
        """Answer one waiting client with ``handlers`` (command word to handler); returns at once when none
        is waiting.  A client that sends nothing within a second is dropped."""
        try:
            conn, _ = self.socket.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                request = conn.recv(MAX_REQUEST).strip()
                conn.sendall(json.dumps(_answer(request, handlers)).encode() + b"\n")
            except OSError:
                return

    def close(self) -> None:
        """Close the socket and remove its file."""
        self.socket.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _answer(request: bytes, handlers: Mapping[str, Handler]) -> dict[str, object]:
    word, _, rest = request.partition(b" ")
    handler = handlers.get(word.decode("ascii", "replace"))
    if handler is None:
        return {"error": f"unknown request; try one of: {', '.join(sorted(handlers))}"}
    try:
        arguments = json.loads(rest) if rest.strip() else {}
    except ValueError:
        return {"error": "the arguments are not JSON"}
    if not isinstance(arguments, dict):
        return {"error": "the arguments must be a JSON object"}
    return handler(arguments)


def query(path: Path, command: str, arguments: Mapping[str, object] | None = None,
          timeout: float = 5.0) -> dict[str, object]:
    """Send one command to the running server at ``path`` and return its answer."""
    line = command if arguments is None else f"{command} {json.dumps(dict(arguments))}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(line.encode() + b"\n")
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
    if isinstance(answer.get("error"), str):
        raise ControlError(f"the server at {path}: {answer['error']}")
    return answer


def query_status(path: Path, timeout: float = 5.0) -> dict[str, object]:
    """The running server's ``status`` answer (backend, CRLs, open grants); raises :class:`ControlError`."""
    return query(path, "status", timeout=timeout)
