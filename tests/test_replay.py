"""Replay caches: entries live exactly until their expiry; capacity bounds memory; the authoritative
cache refuses when full, the pre-crypto one evicts what expires first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sknock.replay import RecentKeys, ReplayCache


def test_seen_until_expiry() -> None:
    cache = ReplayCache(10, evict_when_full=False)
    assert cache.add(b"a", expiry=107.0, now=100.0)
    assert cache.seen(b"a", 100.0)
    assert cache.seen(b"a", 107.0)
    assert not cache.seen(b"a", 107.001)
    cache.expire(108.0)
    assert len(cache) == 0


def test_full_authoritative_cache_refuses() -> None:
    cache = ReplayCache(2, evict_when_full=False)
    assert cache.add(b"a", 110, 100)
    assert cache.add(b"b", 110, 100)
    assert not cache.add(b"c", 110, 100)
    assert not cache.seen(b"c", 100)
    assert cache.add(b"c", 130, 111)  # a and b expired: room again


def test_full_precrypto_cache_evicts_what_expires_first() -> None:
    cache = ReplayCache(2, evict_when_full=True)
    cache.add(b"late", 200, 100)
    cache.add(b"early", 150, 100)
    assert cache.add(b"new", 180, 100)
    assert cache.seen(b"late", 100) and cache.seen(b"new", 100)
    assert not cache.seen(b"early", 100)


def test_re_adding_extends_never_shortens() -> None:
    cache = ReplayCache(4, evict_when_full=False)
    cache.add(b"a", 120, 100)
    cache.add(b"a", 110, 100)
    assert cache.seen(b"a", 115)
    cache.add(b"a", 130, 100)
    cache.expire(125)
    assert cache.seen(b"a", 125)


operations = st.lists(
    st.tuples(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), st.floats(0, 20), st.floats(0, 5)),
    max_size=60,
)


@settings(max_examples=300)
@given(operations, st.integers(1, 4), st.booleans())
def test_matches_a_simple_model(ops: list[tuple[bytes, float, float]], capacity: int, evict: bool) -> None:
    """Against a dict model: whatever the cache says it holds, it really was added and has not expired;
    and it never holds more than its capacity.  The authoritative cache never forgets early."""
    cache = ReplayCache(capacity, evict_when_full=evict)
    model: dict[bytes, float] = {}
    now = 0.0
    for key, lifetime, step in ops:
        now += step
        model = {k: e for k, e in model.items() if e >= now}
        added = cache.add(key, now + lifetime, now)
        if added:
            model[key] = max(model.get(key, 0.0), now + lifetime)
        assert len(cache) <= capacity
        for k in (b"a", b"b", b"c", b"d", b"e"):
            if cache.seen(k, now):
                assert k in model
            elif not evict:
                assert k not in model, "the authoritative cache forgot an entry before its expiry"


def test_recent_keys_forget_the_oldest_first() -> None:
    recent = RecentKeys(3)
    for key in (1, 2, 3):
        recent.add(key)
    recent.add(2)  # already there: changes nothing
    assert [k in recent for k in (1, 2, 3)] == [True, True, True]
    recent.add(4)
    assert 1 not in recent and {2, 3, 4} == {k for k in range(6) if k in recent}
    assert len(recent) == 3


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(-5, 20), max_size=60))
def test_recent_keys_are_exactly_the_last_distinct_additions(capacity: int, keys: list[int]) -> None:
    recent = RecentKeys(capacity)
    model: list[int] = []
    for key in keys:
        recent.add(key)
        if key not in model:
            model.append(key)
            model = model[-capacity:]
    assert {k for k in range(-5, 21) if k in recent} == set(model)
    assert len(recent) == len(model)
