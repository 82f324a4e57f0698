"""The monitor's memory of applied knocks, kept on disk so that no restart forgets it.

Every knock the monitor applies is written here (its replay key and the Unix time it leaves the
timestamp window) *before* the firewall is changed.  A server that restarts -- after a stop, a crash,
``kill -9`` -- reads the file back, and a knock captured before the restart is refused after it, however
short the restart.  A crash between the write and the firewall change costs one knock (the client
knocks again); it never lets one through twice.

The file is a sequence of fixed 27-byte records (expiry as a big-endian double, the 19-byte replay key),
appended with one ``write`` a batch, and rewritten (atomically) without its expired records when it has
grown to twice what is live.  A torn last record (a crash mid-write) is ignored: that batch was never
applied.  The page cache keeps an appended record across the death of the process; only the loss of
the whole machine could lose the last records, and a reboot takes longer than a knock stays fresh.

If the file cannot be read at start, the monitor cannot know what was applied before: it then refuses
every knock signed before ``start + window`` (:attr:`KnockJournal.floor`), a blackout of one timestamp
window that lets nothing through twice.  If it cannot be written, the batch is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from ..fileio import write_atomic
from ..replay import ReplayCache

__all__ = ["KnockJournal", "RECORD", "KEY_SIZE"]

KEY_SIZE = 19  # nonce 16 bytes, port 2, protocol 1: GrantRequest.replay_key
RECORD = struct.Struct(f"!d{KEY_SIZE}s")
MIN_REWRITE = 65_536  # records appended before a rewrite is considered


class KnockJournal:
    """Replay keys of applied knocks until they expire, in memory and in ``path`` (None: in memory
    only, for tests of the monitor's logic)."""

    def __init__(self, path: Path | None, *, capacity: int, now: float, window: float) -> None:
        self.path = path
        self.cache = ReplayCache(capacity, evict_when_full=False)
        self.floor = -math.inf  # expiries at or below this are refused (see the module docstring)
        self.problem: str | None = None  # why the file could not be read, for the log
        self._fd = -1
        self._appended = 0
        if path is None:
            return
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            data = b""
            self.problem = f"cannot read {path}: {exc.strerror or exc}"
            self.floor = now + 2 * window
        usable = len(data) - len(data) % RECORD.size
        for expiry, key in RECORD.iter_unpack(data[:usable]):
            if math.isfinite(expiry) and expiry >= now:
                self.cache.add(key, expiry, now)
        self._rewrite(now)

    def seen(self, key: bytes, expiry: float, now: float) -> bool:
        """True when a knock with this key was applied before (or may have been: below the floor)."""
        return expiry <= self.floor or self.cache.seen(key, now)

    def record(self, entries: Iterable[tuple[bytes, float]], now: float) -> int:
        """Remember ``entries`` (key, expiry) on disk, then in memory; returns how many were taken.

        Raises OSError when the file cannot be written: the caller must then apply none of them.
        Stops early (returning fewer) when the memory is full: a flood of valid knocks, refused."""
        taken: list[tuple[bytes, float]] = []
        cache = self.cache
        cache.expire(now)
        room = cache.capacity - len(cache)
        for key, expiry in entries:
            if len(taken) >= room:
                break
            taken.append((key, expiry))
        if not taken:
            return 0
        if self.path is not None:
            data = b"".join(RECORD.pack(expiry, key) for key, expiry in taken)
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        for key, expiry in taken:
            cache.add(key, expiry, now)
        self._appended += len(taken)
        if self._appended > max(MIN_REWRITE, 2 * len(cache)):
            self._rewrite(now)
        return len(taken)

    def _rewrite(self, now: float) -> None:
        """Replace the file with the live records only, and append to the new file from now on."""
        self.cache.expire(now)
        if self.path is None:
            self._appended = 0
            return
        live = sorted(self.cache.items())
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path, b"".join(RECORD.pack(expiry, key) for key, expiry in live), mode=0o600)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._appended = 0

    def close(self) -> None:
        """Close the journal file; safe to call more than once.  What was appended is already on disk."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
