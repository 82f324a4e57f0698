"""The table of open grants, sans-I/O: which (address, protocol, port) is open until when.

The monitor owns one.  Time is passed in (monotonic seconds); :meth:`GrantTable.due` says what to
close now and :meth:`GrantTable.next_deadline` when to wake up next.  A new knock for an open grant
extends it; a close-now request ends it.

:meth:`GrantTable.due` takes the grants it returns out of the table; the monitor closes them in the
firewall at once and hands back each close that failed to :meth:`GrantTable.close_failed`, which puts
the grant back, marked overdue, to fall due again after a backoff.  So a failing firewall command is
retried until it works, and ``status`` (which never runs between the two) shows what is still open.

:func:`foreign` is the other direction: of what the kernel holds in sknock's set or chain, what no grant
in the table accounts for (someone added it by hand), which the monitor removes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container, Iterable, KeysView
from dataclasses import dataclass, replace

from .firewall.base import Held, Opening

__all__ = ["GrantTable", "GrantEntry", "RETRY_FIRST", "RETRY_MAX", "foreign", "summary"]

RETRY_FIRST = 1.0  # seconds before the first retry of a failed close
RETRY_MAX = 60.0  # the backoff doubles up to this
MAX_REVOCATION_IDS = 32  # kept per grant, from every knock that extended it


@dataclass(frozen=True, slots=True)
class GrantEntry:
    """One open grant.  After a close failed (``close_failures`` times so far), ``retry_at`` is when
    it is tried again."""

    opening: Opening
    opened_at: float
    expires_at: float
    client: str
    close_failures: int = 0
    retry_at: float | None = None
    revocation_ids: tuple[tuple[bytes, int], ...] = ()  # the client's chain as CRLs name it (trust.revocation_id)

    @property
    def serial(self) -> int | None:
        """The client certificate's serial number, when known."""
        return self.revocation_ids[0][1] if self.revocation_ids else None

    @property
    def due_at(self) -> float:
        """When the monitor acts on it next: its expiry, or the next retry of its close."""
        return self.expires_at if self.retry_at is None else self.retry_at

    @property
    def overdue(self) -> bool:
        """Its window has ended but the firewall has not yet confirmed the close."""
        return self.close_failures > 0


class GrantTable:
    """Open grants keyed by :class:`Opening`, with a heap of when each falls due."""

    __slots__ = ("_entries", "_heap", "_sequence", "_last_due")

    def __init__(self) -> None:
        self._entries: dict[Opening, GrantEntry] = {}
        self._heap: list[tuple[float, int, Opening]] = []
        # Heap tie-breaker: unique for the table's life, so two rows never compare their Openings
        # (not ordered).  id(entry) was not: a replaced entry's id is reused at once.
        self._sequence = itertools.count()
        self._last_due: dict[Opening, GrantEntry] = {}  # what the latest due() took out

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, opening: object) -> bool:
        return opening in self._entries

    def _schedule(self, entry: GrantEntry) -> None:
        self._entries[entry.opening] = entry
        heapq.heappush(self._heap, (entry.due_at, next(self._sequence), entry.opening))

    def open(
        self, opening: Opening, duration: float, now: float, client: str = "",
        revocation_ids: tuple[tuple[bytes, int], ...] = (),
    ) -> bool:
        """Record a grant until ``now + duration``; True when it extends one already open.  The newest
        knock's client is the one listed; the revocation ids of every knock that kept the grant open
        stay with it (a CRL that revokes any of them closes it: fail closed)."""
        existing = self._entries.get(opening)
        opened_at = existing.opened_at if existing else now
        client = client or (existing.client if existing else "")
        ids = revocation_ids
        if existing is not None and existing.revocation_ids != revocation_ids:
            ids = tuple(dict.fromkeys(revocation_ids + existing.revocation_ids))[:MAX_REVOCATION_IDS]
        self._schedule(GrantEntry(opening, opened_at, now + duration, client, revocation_ids=ids))
        return existing is not None

    def close(self, opening: Opening) -> bool:
        """Forget a grant (closed at a client's request); True when it was open."""
        return self._entries.pop(opening, None) is not None

    def end_now(self, opening: Opening, now: float) -> None:
        """Bring a grant's end forward to ``now`` (its close failed outside :meth:`due`): :meth:`due`
        returns it next, and from there a close that keeps failing is retried with the backoff."""
        entry = self._entries.get(opening)
        if entry is not None and entry.due_at > now:
            self._schedule(replace(entry, expires_at=now, retry_at=None))

    def due(self, now: float) -> list[Opening]:
        """Remove and return the grants to close at ``now``: windows that ended, and failed closes
        whose retry is due.  Hand each close the firewall refuses to :meth:`close_failed`."""
        out = []
        taken: dict[Opening, GrantEntry] = {}
        heap = self._heap
        while heap and heap[0][0] <= now:
            due_at, _, opening = heapq.heappop(heap)
            entry = self._entries.get(opening)
            if entry is not None and entry.due_at == due_at:
                del self._entries[opening]
                taken[opening] = entry
                out.append(opening)
        self._last_due = taken
        return out

    def close_failed(self, opening: Opening, now: float) -> float:
        """The firewall refused to close ``opening``, which the latest :meth:`due` returned: put it
        back, overdue, to fall due again after a backoff that doubles from RETRY_FIRST up to
        RETRY_MAX.  Returns the delay (0 if it was not due, or was opened again meanwhile)."""
        entry = self._last_due.pop(opening, None)
        if entry is None or opening in self._entries:
            return 0.0
        delay = min(RETRY_MAX, RETRY_FIRST * 2.0**entry.close_failures)
        self._schedule(replace(entry, retry_at=now + delay, close_failures=entry.close_failures + 1))
        return delay

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has something to return (None: nothing is open)."""
        heap = self._heap
        while heap:
            due_at, _, opening = heap[0]
            entry = self._entries.get(opening)
            if entry is not None and entry.due_at == due_at:
                return due_at
            heapq.heappop(heap)  # superseded by an extension or a retry, or closed
        return None

    def remaining(self, now: float) -> list[tuple[Opening, float]]:
        """Each grant whose window has not ended, with the seconds it has left: what to put back when
        the firewall lost its state."""
        return [(e.opening, e.expires_at - now) for e in self._entries.values() if e.expires_at > now]

    def openings(self) -> KeysView[Opening]:
        """Every opening the table holds (live or overdue), as a live view: what :func:`foreign` compares with."""
        return self._entries.keys()

    def entries(self) -> list[GrantEntry]:
        """Every grant the monitor holds, soonest to expire first (for ``status`` and the ledger)."""
        return sorted(self._entries.values(), key=lambda e: e.expires_at)


def foreign(held: Iterable[Held], granted: Container[Opening]) -> list[Held]:
    """The entries of sknock's set or chain (``held``, as the kernel lists them) that no grant in
    ``granted`` (:meth:`GrantTable.openings`) accounts for: not expressible as a grant at all, or a
    grant the table does not hold.

    Membership in the table is the whole test, on purpose.  The monitor is one thread: by the time it
    lists the kernel, every grant it applied (this turn's included) is in the table, and one leaves the
    table only once the firewall confirmed its close (a close that failed puts it back, overdue).  So a
    grant of ours is never judged foreign, however close to its end -- its remaining time is not looked
    at -- and an entry the kernel's timeout ended is not listed at all."""
    return [entry for entry in held if entry.opening is None or entry.opening not in granted]


def summary(entries: Iterable[Held], first: int) -> str:
    """The first ``first`` entries named, and how many more: ``a, b, c and 97 more``."""
    items = list(entries)
    named = ", ".join(str(e) for e in items[:first])
    return named if len(items) <= first else f"{named} and {len(items) - first} more"
