"""Where the server's log goes, and how its lines look.

Three places, chosen once at the start (:func:`setup_logging`):

* **the journal**: under systemd, stderr is a stream to journald (``$JOURNAL_STREAM`` names its device
  and inode, and stderr is that file).  Each line then starts with its syslog priority, ``<3>`` for an
  error ... ``<7>`` for debug, and carries no timestamp: journald keeps the level and the time itself.
* **logFile**: the file the configuration names.  SIGHUP reopens it (the monitor calls :meth:`LogOutput.reopen`),
  so logrotate can rename it and signal.  The monitor's children cannot reopen a root-only file (and
  should open nothing), so with a logFile they write their lines into a pipe that the monitor copies
  into the file (:class:`LogOutput` relays): after a reopen every process writes to the new file.
* **stderr** otherwise, as before.

Two formats (``logFormat``): ``plain``, the lines as they always were, and ``json``: one object per line
with ``time``, ``level``, ``logger``, ``pid``, ``event``, ``message`` and the structured fields a grant or
refusal passes with ``extra=`` (``source``, ``subject``, ``serial``, ``ports``, ``reason``, ``detail``,
``duration``, ``grants``).  Every text field is passed through :func:`~sknock.logsafe.log_safe` again
here, so what came from the wire stays one printable line in either format.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ..logsafe import log_safe
from .config import LogFormat, ServerConfig

__all__ = [
    "LogOutput",
    "PriorityStream",
    "journal_stderr",
    "JournalFormatter",
    "JsonFormatter",
    "PLAIN_FORMAT",
    "STRUCTURED_FIELDS",
    "setup_logging",
    "under_journal",
]

#: The plain format, as sknock's lines have always looked.
PLAIN_FORMAT = "%(asctime)s sknock[%(process)d] %(levelname)s %(name)s: %(message)s"
#: The fields a log call may pass with ``extra=`` that the JSON format writes as its own keys.
STRUCTURED_FIELDS = ("event", "source", "subject", "serial", "ports", "reason", "detail", "duration", "grants")
_PIPE_CHUNK = 1 << 16


def _priority(levelno: int) -> int:
    """The syslog priority of a logging level: 3 error (and above: 2 critical), 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>`` and the line of ``inner`` (without its time): the sd-daemon convention that lets journald
    keep each line's level."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        """``<priority>`` then the inner format's line."""
        return f"<{_priority(record.levelno)}>{self.inner.format(record)}"


def _safe(value: Any) -> Any:
    """A structured value with every text in it escaped (lists and dicts walked)."""
    if isinstance(value, str):
        return log_safe(value)
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _safe(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float):
        return value
    return log_safe(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module's docstring); ``with_time`` False leaves the time to the
    journal."""

    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (ASCII only: any other character is a ``\\u`` escape)."""
        out: dict[str, Any] = {}
        if self.with_time:
            out["time"] = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        out.update(level=record.levelname, logger=record.name, pid=record.process)
        out["event"] = getattr(record, "event", None) or "message"
        for key in STRUCTURED_FIELDS[1:]:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = _safe(value)
        out["message"] = log_safe(record.getMessage(), 4000)
        if record.exc_info:
            out["exception"] = log_safe(self.formatException(record.exc_info), 4000)
        return json.dumps(out, ensure_ascii=True, separators=(",", ":"))


class _ReopenableFileHandler(logging.FileHandler):
    """A FileHandler that can close its file and open the same path again (after logrotate renamed it)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                with contextlib.suppress(OSError):
                    self.stream.close()
            self.stream = self._open()
        finally:
            self.release()

    def write_raw(self, text: str) -> None:
        """Lines already formatted (by a child), as they are."""
        self.acquire()
        try:
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(text)
            self.stream.flush()
        finally:
            self.release()


class _PipeHandler(logging.Handler):
    """A child's handler with a logFile: each line in one ``write`` to the monitor's pipe (lines up to
    PIPE_BUF bytes arrive whole, never mixed with another process's)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:  # noqa: BLE001 -- logging must not end a worker; the monitor may be gone
            self.handleError(record)


def under_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Is ``stream`` the journal stream systemd gave this process (``$JOURNAL_STREAM`` = its
    ``device:inode``)?  A stderr redirected elsewhere by the operator is not, even under systemd."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


class PriorityStream:
    """stderr under the journal: each line without a ``<N>`` prefix gets ``<3>`` (error).  Such lines are
    what the command line prints when it cannot start (a bad configuration, not root) and tracebacks;
    without a prefix journald would file them at info.  Lines of the log keep their own priority."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        """Prefix each complete line that has no priority; keep a partial line until its newline."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            prefixed = len(line) >= 3 and line[0] == "<" and line[1].isdigit() and line[2] == ">"
            self.stream.write(("" if prefixed else "<3>") + line + "\n")
        return len(text)

    def flush(self) -> None:
        """Flush the stream (a partial line stays until its newline)."""
        self.stream.flush()

    def fileno(self) -> int:
        """The journal stream's descriptor."""
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def journal_stderr(environ: Mapping[str, str] = os.environ) -> bool:
    """Under the journal, make ``sys.stderr`` a :class:`PriorityStream`; True if it did."""
    if isinstance(sys.stderr, PriorityStream) or not under_journal(sys.stderr, environ):
        return False
    sys.stderr = PriorityStream(sys.stderr)
    return True


class LogOutput:
    """The handler set up by :func:`setup_logging`, and what the monitor does with it: :meth:`reopen` on
    SIGHUP, and with a logFile the relay of its children's lines (:meth:`in_child`, :meth:`fileno`,
    :meth:`pump`)."""

    def __init__(self, handler: logging.Handler, destination: str) -> None:
        self.handler = handler
        self.destination = destination  # "journal", "stderr" or the file's path, for the start-up line
        self._pipe: tuple[int, int] | None = None

    def start_relay(self) -> bool:
        """With a logFile, make the pipe the children will write into (before the first fork); True if made."""
        if self._pipe is None and isinstance(self.handler, _ReopenableFileHandler):
            read, write = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read, False)
            self._pipe = (read, write)
        return self._pipe is not None

    @property
    def relays(self) -> bool:
        """True with a logFile: children write to the pipe and the monitor copies (:meth:`pump`)."""
        return self._pipe is not None

    def fileno(self) -> int:
        """The pipe's read end, for the monitor's selector (only when :attr:`relays`)."""
        assert self._pipe is not None
        return self._pipe[0]

    def reopen(self) -> None:
        """Reopen the logFile (SIGHUP, after logrotate moved it); nothing to do for stderr or the journal."""
        if isinstance(self.handler, _ReopenableFileHandler):
            self.handler.reopen()

    def pump(self) -> int:
        """Copy what the children wrote into the pipe to the log; the bytes copied."""
        if self._pipe is None or not isinstance(self.handler, _ReopenableFileHandler):
            return 0
        total = 0
        while True:
            try:
                data = os.read(self._pipe[0], _PIPE_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            total += len(data)
            try:
                self.handler.write_raw(data.decode("utf-8", "backslashreplace"))
            except OSError as exc:
                print(f"sknock-server: cannot write to {self.destination}: {exc}", file=sys.stderr)
                break
        return total

    def in_child(self) -> None:
        """In a child just forked: write this process's lines into the pipe (not to the monitor's file)."""
        if self._pipe is None:
            return
        read, write = self._pipe
        with contextlib.suppress(OSError):
            os.close(read)
        if isinstance(self.handler, _ReopenableFileHandler) and self.handler.stream is not None:
            with contextlib.suppress(OSError):
                self.handler.stream.close()  # flushed after every line: nothing of the monitor's is pending
        handler = _PipeHandler(write)
        handler.setFormatter(self.handler.formatter)
        handler.setLevel(self.handler.level)
        root = logging.getLogger("sknock")
        root.handlers[:] = [handler]
        self.handler = handler


def setup_logging(
    config: ServerConfig | None,
    level: str = "INFO",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
) -> LogOutput:
    """Send sknock's log to the configured ``logFile``, or to the journal, or to stderr (see the module's
    docstring), in the configured ``logFormat``, at the configured level (``level`` without a
    configuration)."""
    stream = sys.stderr if stream is None else stream
    log_file = config.log_file if config is not None else None
    json_format = config is not None and config.log_format is LogFormat.JSON
    handler: logging.Handler
    if log_file is not None:
        handler = _ReopenableFileHandler(log_file)
        destination = str(log_file)
    else:
        handler = logging.StreamHandler(stream)
        destination = "journal" if under_journal(stream, environ) else "stderr"
    formatter: logging.Formatter
    if destination == "journal":
        inner = JsonFormatter(with_time=False) if json_format else logging.Formatter(
            "sknock[%(process)d] %(levelname)s %(name)s: %(message)s")
        formatter = JournalFormatter(inner)
    else:
        formatter = JsonFormatter() if json_format else logging.Formatter(PLAIN_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger("sknock")
    for old in root.handlers:
        with contextlib.suppress(Exception):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level if config is not None else level)
    root.propagate = False
    return LogOutput(handler, destination)
