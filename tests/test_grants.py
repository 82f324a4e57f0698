"""GrantTable, sans-I/O: which grants are open until when, against a simple model under hypothesis; and
:func:`foreign`, what of the kernel's entries no grant in the table accounts for."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sknock.ports import Protocol
from sknock.server.firewall.base import Held, Opening
from sknock.server.grants import GrantEntry, GrantTable, foreign, summary

A = Opening(ipaddress.ip_address("198.18.0.2"), Protocol.TCP, 22)
B = Opening(ipaddress.ip_address("198.18.0.2"), Protocol.UDP, 22)
C = Opening(ipaddress.ip_address("fd00:5e::2"), Protocol.TCP, 2005)


def test_open_due_and_next_deadline() -> None:
    table = GrantTable()
    assert table.next_deadline() is None and table.due(1e9) == [] and len(table) == 0
    assert table.open(A, 15, now=100.0, client="CN=alice") is False
    assert table.open(B, 5, now=101.0) is False
    assert A in table and B in table and C not in table and len(table) == 2
    assert table.next_deadline() == 106.0
    assert table.due(105.999) == []
    assert table.due(106.0) == [B]  # exactly at the deadline: closed
    assert B not in table
    assert table.next_deadline() == 115.0
    assert table.due(200.0) == [A]
    assert table.next_deadline() is None and len(table) == 0


def test_a_new_knock_extends_and_keeps_when_it_opened() -> None:
    table = GrantTable()
    table.open(A, 10, now=0.0, client="CN=alice")
    assert table.open(A, 10, now=8.0) is True  # extends
    assert table.due(10.0) == []  # the first deadline is superseded
    assert table.next_deadline() == 18.0
    [entry] = table.entries()
    assert entry == GrantEntry(A, opened_at=0.0, expires_at=18.0, client="CN=alice")  # the client name is kept
    assert table.due(18.0) == [A]


def test_an_extension_may_also_shorten() -> None:
    """The newest knock decides: a short knock after a long one ends the grant sooner."""
    table = GrantTable()
    table.open(A, 100, now=0.0)
    table.open(A, 5, now=1.0, client="CN=new")
    assert table.next_deadline() == 6.0
    assert table.entries()[0].client == "CN=new"
    assert table.due(6.0) == [A]
    assert table.due(100.0) == []  # the old deadline is not acted on again


def test_close_now() -> None:
    table = GrantTable()
    table.open(A, 10, now=0.0)
    table.open(C, 20, now=0.0)
    assert table.close(A) is True
    assert table.close(A) is False
    assert table.close(B) is False
    assert table.next_deadline() == 20.0  # the closed grant's deadline is skipped
    assert table.due(15.0) == []
    assert [e.opening for e in table.entries()] == [C]
    assert table.open(A, 1, now=12.0) is False  # reopened after close: a fresh grant
    assert table.entries()[0] == GrantEntry(A, opened_at=12.0, expires_at=13.0, client="")
    assert table.due(13.0) == [A]
    assert [e.opening for e in table.entries()] == [C]


def test_equal_deadlines_after_an_extension() -> None:
    """Two grants with the same deadline, one of them extended at the same instant: the heap must
    never have to compare two Openings (they are not ordered)."""
    table = GrantTable()
    openings = [A, B, C, *(Opening(ipaddress.ip_address(f"198.18.2.{i}"), Protocol.TCP, 22) for i in range(1, 9))]
    for _ in range(100):  # freed entries' memory (and so any id()) is reused at once by CPython
        for opening in openings:
            table.open(opening, 10, now=0.0)
    assert len(table) == len(openings)
    assert set(table.due(10.0)) == set(openings)


def test_entries_are_sorted_by_expiry() -> None:
    table = GrantTable()
    table.open(A, 30, now=0.0)
    table.open(B, 10, now=0.0)
    table.open(C, 20, now=0.0)
    assert [e.opening for e in table.entries()] == [B, C, A]


def test_same_deadline_for_many_grants() -> None:
    table = GrantTable()
    openings = [Opening(ipaddress.ip_address(f"198.18.1.{i}"), Protocol.TCP, 22) for i in range(1, 50)]
    for opening in openings:
        table.open(opening, 5, now=0.0)
    assert sorted(table.due(5.0), key=str) == sorted(openings, key=str)
    assert len(table) == 0


def test_the_heap_does_not_grow_without_bound() -> None:
    """A client re-knocking every second for a day leaves one live entry; stale heap rows are dropped
    by next_deadline (which the monitor calls every turn)."""
    table = GrantTable()
    for second in range(10_000):
        table.open(A, 15, now=float(second))
        assert table.next_deadline() == second + 15.0
        assert table.due(float(second)) == []
    assert len(table) == 1
    assert len(table._heap) < 50


# -- against a model ----------------------------------------------------------------------------------------------

_openings = st.sampled_from([A, B, C, Opening(ipaddress.ip_address("198.18.0.3"), Protocol.TCP, 22)])


class GrantTableMachine(RuleBasedStateMachine):
    """The model: a dict opening -> (opened_at, expires_at, client), and a clock that only moves forward."""

    def __init__(self) -> None:
        super().__init__()
        self.table = GrantTable()
        self.model: dict[Opening, tuple[float, float, str]] = {}
        self.now = 0.0

    @rule(opening=_openings, duration=st.floats(0.001, 100) | st.integers(1, 100).map(float),
          client=st.sampled_from(["", "CN=alice", "CN=bob"]))
    def open(self, opening: Opening, duration: float, client: str) -> None:
        existed = opening in self.model
        assert self.table.open(opening, duration, self.now, client) is existed
        old = self.model.get(opening)
        self.model[opening] = (
            old[0] if old else self.now,
            self.now + duration,
            client or (old[2] if old else ""),
        )

    @rule(opening=_openings)
    def close(self, opening: Opening) -> None:
        assert self.table.close(opening) is (self.model.pop(opening, None) is not None)

    @rule(step=st.floats(0, 50) | st.sampled_from([0.0, 0.001]))
    def advance_and_expire(self, step: float) -> None:
        self.now += step
        expected = {o for o, (_, expires, _) in self.model.items() if expires <= self.now}
        due = self.table.due(self.now)
        assert len(due) == len(set(due))
        assert set(due) == expected
        for opening in expected:
            del self.model[opening]

    @precondition(lambda self: bool(self.model))
    @rule()
    def jump_to_next_deadline(self) -> None:
        deadline = self.table.next_deadline()
        assert deadline is not None
        assert deadline >= self.now  # due() already took everything earlier
        self.now = deadline
        due = self.table.due(self.now)
        assert due  # waking at next_deadline always finds something to close
        for opening in due:
            assert self.model.pop(opening)[1] == deadline

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert len(self.table) == len(self.model)
        for opening in (A, B, C):
            assert (opening in self.table) is (opening in self.model)
        assert self.table.next_deadline() == (min(e for _, e, _ in self.model.values()) if self.model else None)
        entries = self.table.entries()
        assert [e.expires_at for e in entries] == sorted(e.expires_at for e in entries)
        assert {e.opening: (e.opened_at, e.expires_at, e.client) for e in entries} == self.model


GrantTableMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_grant_table_against_a_model = GrantTableMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_openings, st.floats(0.5, 30), st.floats(0, 10)), max_size=30))
def test_every_grant_is_closed_exactly_once_when_time_runs_out(ops: list[tuple[Opening, float, float]]) -> None:
    """Whatever the knocks, walking next_deadline -> due closes each live grant once, at its last deadline."""
    table = GrantTable()
    now = 0.0
    last: dict[Opening, float] = {}
    for opening, duration, gap in ops:
        now += gap
        for closed in table.due(now):
            assert last.pop(closed) <= now
        table.open(opening, duration, now)
        last[opening] = now + duration
    closed_at: dict[Opening, float] = {}
    for _ in range(len(ops) + 1):
        deadline = table.next_deadline()
        if deadline is None:
            break
        for opening in table.due(deadline):
            assert opening not in closed_at
            closed_at[opening] = deadline
    assert table.next_deadline() is None and len(table) == 0
    assert closed_at == last


def test_end_now_makes_a_grant_due_at_once_and_keeps_what_it_knows() -> None:
    table = GrantTable()
    table.open(A, 60, now=0.0, client="CN=alice", revocation_ids=((b"\x01" * 32, 7),))
    table.end_now(A, 5.0)
    assert table.next_deadline() == 5.0
    [entry] = table.entries()
    assert (entry.opened_at, entry.expires_at, entry.client, entry.serial) == (0.0, 5.0, "CN=alice", 7)
    assert table.due(5.0) == [A]
    table.end_now(A, 6.0)  # no longer listed: nothing to do
    assert len(table) == 0


# -- foreign: what in the kernel no grant accounts for -------------------------------------------------

_addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
_openings = st.builds(Opening, _addresses, st.sampled_from(list(Protocol)), st.integers(1, 65535))


@settings(max_examples=300)
@given(granted=st.lists(_openings, max_size=12, unique=True), strangers=st.lists(_openings, max_size=6),
       odd=st.integers(0, 3), steps=st.lists(st.sampled_from(["due", "fail", "end_now", "reopen"]), max_size=6),
       durations=st.lists(st.floats(0.001, 100), min_size=12, max_size=12))
def test_foreign_is_exactly_what_the_table_does_not_hold(
    granted: list[Opening], strangers: list[Opening], odd: int, steps: list[str], durations: list[float]
) -> None:
    """Whatever the table went through -- windows ended, closes failed (overdue), closes brought
    forward, grants opened again in the same turn -- an entry whose opening the table holds is never
    foreign, however close to (or past) its end; everything else is, and so is every entry that is not
    a grant at all."""
    table = GrantTable()
    now = 0.0
    for opening, duration in zip(granted, durations, strict=False):
        table.open(opening, duration, now)
    for step in steps:
        now += 7.0
        if step == "due":
            table.due(now)
        elif step == "fail":
            for opening in table.due(now):
                table.close_failed(opening, now)  # overdue: still ours until the firewall confirms the close
        elif step == "end_now" and granted:
            table.end_now(granted[0], now)
        elif step == "reopen" and granted:
            table.open(granted[-1], 0.001, now)  # applied this turn, ends at once
    held = [Held(o) for o in granted + strangers] + [Held(None, f"odd {i}") for i in range(odd)]
    found = foreign(held, table.openings())
    assert all(entry.opening is None or entry.opening not in table for entry in found)
    assert [e for e in held if e not in found] == [e for e in held if e.opening is not None and e.opening in table]
    assert sum(1 for e in found if e.opening is None) == odd


def test_foreign_keeps_a_grant_opened_in_the_same_turn_and_an_overdue_one() -> None:
    table = GrantTable()
    table.open(A, 1, now=0.0)
    assert table.due(5.0) == [A]
    assert foreign([Held(A)], table.openings()) == [Held(A)]  # closed: its element, if left, is not ours
    table.close_failed(A, 5.0)  # ... unless the close failed: overdue, retried, still ours
    table.open(B, 30, now=5.0)  # opened this turn, before the listing
    assert foreign([Held(A), Held(B), Held(C), Held(None, "198.18.9.0/24 -> any")], table.openings()) == [
        Held(C), Held(None, "198.18.9.0/24 -> any")]


def test_summary_names_the_first_few_and_counts_the_rest() -> None:
    entries = [Held(A), Held(B), Held(None, "x")]
    assert summary(entries, 5) == "198.18.0.2 -> tcp/22, 198.18.0.2 -> udp/22, x"
    assert summary(entries, 1) == "198.18.0.2 -> tcp/22 and 2 more"
