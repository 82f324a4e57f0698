"""The table of open grants, sans-I/O: which (address, protocol, port) is open until when.

The monitor owns one.  Time is passed in (monotonic seconds); :meth:`GrantTable.due` says what
to close now and :meth:`GrantTable.next_deadline` when to wake up next.  A new knock for an open grant
extends it; a close-now request ends it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from .firewall.base import Opening

__all__ = ["GrantTable", "GrantEntry"]


@dataclass(frozen=True, slots=True)
class GrantEntry:
    opening: Opening
    opened_at: float
    expires_at: float
    client: str


class GrantTable:
    __slots__ = ("_entries", "_heap", "_sequence")

    def __init__(self) -> None:
        self._entries: dict[Opening, GrantEntry] = {}
        self._heap: list[tuple[float, int, Opening]] = []
        # Heap tie-breaker: unique for the table's life, so two rows never compare their Openings
        # (not ordered).  id(entry) was not: a replaced entry's id is reused at once.
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, opening: object) -> bool:
        return opening in self._entries

    def open(self, opening: Opening, duration: float, now: float, client: str = "") -> bool:
        """Record a grant until ``now + duration``; True when it extends one already open."""
        existing = self._entries.get(opening)
        opened_at = existing.opened_at if existing else now
        entry = GrantEntry(opening, opened_at, now + duration, client or (existing.client if existing else ""))
        self._entries[opening] = entry
        heapq.heappush(self._heap, (entry.expires_at, next(self._sequence), opening))
        return existing is not None

    def close(self, opening: Opening) -> bool:
        """Forget a grant; True when it was open."""
        return self._entries.pop(opening, None) is not None

    def due(self, now: float) -> list[Opening]:
        """Remove and return the grants whose time is up at ``now``."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires_at, _, opening = heapq.heappop(heap)
            entry = self._entries.get(opening)
            if entry is not None and entry.expires_at == expires_at:
                del self._entries[opening]
                out.append(opening)
        return out

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            expires_at, _, opening = heap[0]
            entry = self._entries.get(opening)
            if entry is not None and entry.expires_at == expires_at:
                return expires_at
            heapq.heappop(heap)  # superseded by an extension, or closed
        return None

    def entries(self) -> list[GrantEntry]:
        return sorted(self._entries.values(), key=lambda e: e.expires_at)
