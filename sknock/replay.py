"""Replay caches: remember what was seen until it can no longer be fresh.

An entry lives until its expiry time (the moment a packet carrying it would be refused as too old
anyway), so the cache covers the whole timestamp window with memory bounded by the traffic of one
window.  Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

import heapq

__all__ = ["ReplayCache", "RecentKeys"]


class ReplayCache:
    """A set of keys, each with an expiry time.

    ``capacity`` bounds memory.  When full, :meth:`add` either evicts the entry that expires first
    (``evict_when_full=True``: for the pre-crypto cache, where anyone can add entries and the
    authoritative cache still stands behind it) or returns False (for the authoritative cache, which
    only authenticated knocks fill: refusing is the fail-closed answer).
    """

    __slots__ = ("_expiry", "_heap", "capacity", "evict_when_full")

    def __init__(self, capacity: int, *, evict_when_full: bool) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.evict_when_full = evict_when_full
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: object) -> bool:
        return key in self._expiry

    def items(self) -> list[tuple[bytes, float]]:
        """Every key with its expiry (expired ones too, until :meth:`expire` removes them)."""
        return list(self._expiry.items())

    def seen(self, key: bytes, now: float) -> bool:
        """True when ``key`` was added and has not expired by ``now``."""
        expiry = self._expiry.get(key)
        return expiry is not None and expiry >= now

    def expire(self, now: float) -> None:
        """Forget every key whose expiry is before ``now``."""
        heap = self._heap
        while heap and heap[0][0] < now:
            expiry, key = heapq.heappop(heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]

    def add(self, key: bytes, expiry: float, now: float) -> bool:
        """Remember ``key`` until ``expiry``.  False when the cache is full and may not evict."""
        self.expire(now)
        if key not in self._expiry and len(self._expiry) >= self.capacity:
            if not self.evict_when_full:
                return False
            while len(self._expiry) >= self.capacity:
                old_expiry, old_key = heapq.heappop(self._heap)
                if self._expiry.get(old_key) == old_expiry:
                    del self._expiry[old_key]
        if self._expiry.get(key, -1.0) < expiry:
            self._expiry[key] = expiry
            heapq.heappush(self._heap, (expiry, key))
        return True


class RecentKeys:
    """The last ``capacity`` integer keys added, as a set: adding one more forgets the oldest.

    For shortcuts that are safe to forget, such as the worker's "this exact datagram passed the
    cheap checks before" (a hash of it): an exact copy of a knock is never a new knock, and a copy
    missed here is still caught by the replay caches behind it.  No clock: entries leave by age only.
    """

    __slots__ = ("_keys", "_ring", "_next")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._keys: set[int] = set()
        self._ring: list[int | None] = [None] * capacity
        self._next = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: int) -> None:
        """Remember ``key``, forgetting the oldest key when ``capacity`` are held; adding a held key changes
        nothing."""
        if key in self._keys:
            return
        old = self._ring[self._next]
        if old is not None:
            self._keys.discard(old)
        self._ring[self._next] = key
        self._next = (self._next + 1) % len(self._ring)
        self._keys.add(key)
