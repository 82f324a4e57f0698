"""What sees grants in the kernel, each stamped on CLOCK_MONOTONIC (the sender's clock too) when read.

* :class:`SetWatcher`: sknock's nftables set ``grants4``, from nf_tables' own netlink events, read by a
  thread of the benchmark that enters the server namespace.
* :class:`Watcher`: ``nft monitor`` (with ``-a``, the rules iptables-nft makes: fwknopd's).
* :class:`LegacyCounter`: legacy iptables' rule count, polled by :mod:`bench.legacy_poller` in the
  server namespace.

Each is bounded in time and stops what it started by pid.
"""

from __future__ import annotations

import ctypes
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bench.lab import PY
from bench.legacy_poller import RECORD
from tests.netns import TestNet


def _wait_quiet(count: Callable[[], int], expected: int, quiet: float, limit: float) -> str:
    """Until ``count()`` reaches ``expected``, or it did not change for ``quiet`` s, or ``limit`` s
    passed; returns which ("all", "quiet" or "limit": still granting when the time ran out)."""
    start = time.monotonic()
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() - start < limit:
        n = count()
        if n >= expected:
            return "all"
        if n != last_count:
            last_count, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return "quiet"
        time.sleep(0.05)
    return "limit"


_NFT_ELEM = re.compile(r"^(add|delete) element inet sknock grants4 \{ (198\.19\.[0-9.]+) \. ")
_NFT_RULE_ADD = re.compile(r"^add rule ip filter (\S+) .*?saddr (198\.19\.[0-9.]+).*# handle (\d+)")
_NFT_RULE_DEL = re.compile(r"^delete rule ip filter (\S+) handle (\d+)")


@dataclass
class Watcher:
    """Time (CLOCK_MONOTONIC, the sender's clock too) at which each source's grant appeared in the
    kernel and was last removed, from ``nft monitor`` events (sknock's set elements, and, with
    ``handles``, the rules iptables-nft makes for fwknopd -- ``nft monitor`` prints a rule's handle, which
    its delete names, only with ``-a``), stamped when read."""

    net: TestNet
    handles: bool = False  # ``nft -a monitor``: rules with their handles (iptables-nft rules: fwknopd's)
    opened: dict[str, float] = field(default_factory=dict)
    closed: dict[str, float] = field(default_factory=dict)
    events: int = 0
    _handles: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        flags = ["-a"] if self.handles else []
        self._proc = self.net.server.popen("stdbuf", "-oL", "nft", *flags, "monitor", stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # subscribed before anything is sent
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            t = time.monotonic()
            line = raw.decode(errors="replace")
            self.events += 1
            m = _NFT_ELEM.match(line)
            if m:
                # An open is one batch "add, delete, add" (restarts the timeout); a close is "add, delete".
                # So a delete counts as the close only if no add follows it.
                if m.group(1) == "add":
                    self.opened.setdefault(m.group(2), t)
                    self.closed.pop(m.group(2), None)
                else:
                    self.closed[m.group(2)] = t
                continue
            m = _NFT_RULE_ADD.match(line)
            if m:
                self.opened.setdefault(m.group(2), t)
                self._handles[m.group(3)] = m.group(2)
                continue
            m = _NFT_RULE_DEL.match(line)
            if m and m.group(2) in self._handles:
                self.closed[self._handles[m.group(2)]] = t

    def wait_quiet(self, expected: int, *, quiet: float = 3.0, limit: float = 120.0) -> str:
        """Until ``expected`` grants are seen, or none came for ``quiet`` s, or ``limit`` s passed;
        returns which ("all", "quiet" or "limit": still granting when the time ran out)."""
        return _wait_quiet(lambda: len(self.opened), expected, quiet, limit)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)


# nf_tables over netlink (linux/netfilter/nfnetlink.h, nf_tables.h)
_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
_NFNLGRP_NFTABLES = 7
_NFT_NEWSETELEM = (10 << 8) | 12
_NFT_DELSETELEM = (10 << 8) | 14
_CLONE_NEWNET = 0x40000000
_SO_RCVBUFFORCE = 33


def _attributes(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of the netlink attributes in data[start:end]."""
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            return
        yield kind & 0x3FFF, start + 4, start + length
        start += (length + 3) & ~3


@dataclass
class SetWatcher:
    """Like :class:`Watcher`, for sknock's nftables set ``grants4``, but listening to nf_tables' netlink
    events itself (a thread that enters the server namespace) rather than through ``nft monitor``:
    nft formatting every event as text and this process parsing it cost the 2-core machine about 35 us
    of CPU a grant, taken from the server it measures; this costs a few.  Stamped when read."""

    net: TestNet
    opened: dict[str, float] = field(default_factory=dict)
    closed: dict[str, float] = field(default_factory=dict)
    events: int = 0
    overflows: int = 0
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: bool = False

    def start(self) -> SetWatcher:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._sock is None:
            raise RuntimeError("the netlink set watcher did not start")
        return self

    def _run(self, ready: threading.Event) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{self.net.server.ns}") as ns:
            if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:  # this thread only
                ready.set()
                return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
        sock.bind((0, 0))
        sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _NFNLGRP_NFTABLES)
        sock.settimeout(0.2)
        self._sock = sock
        ready.set()
        while not self._stop:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS: the kernel dropped events
                self.overflows += 1
                continue
            t = time.monotonic()
            self._parse(data, t)
        sock.close()

    def _parse(self, data: bytes, t: float) -> None:
        pos = 0
        while pos + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, pos)
            if length < 16:
                return
            end = pos + length
            if kind in (_NFT_NEWSETELEM, _NFT_DELSETELEM):
                self._elements(data, pos + 20, end, kind == _NFT_NEWSETELEM, t)
            pos += (length + 3) & ~3

    def _elements(self, data: bytes, start: int, end: int, add: bool, t: float) -> None:
        names = {}
        lists = []
        for kind, a, b in _attributes(data, start, end):
            if kind in (1, 2):  # table, set
                names[kind] = data[a:b].rstrip(b"\0")
            elif kind == 3:  # the elements
                lists.append((a, b))
        if names.get(1) != b"sknock" or names.get(2) != b"grants4":
            return
        for a, b in lists:
            for _, ea, eb in _attributes(data, a, b):  # one element
                for kind, ka, kb in _attributes(data, ea, eb):
                    if kind != 1:  # its key
                        continue
                    for vkind, va, _vb in _attributes(data, ka, kb):
                        if vkind == 1:  # the value: address . protocol . port, the address first
                            source = socket.inet_ntoa(data[va : va + 4])
                            self.events += 1
                            # An open is one add (or "add, delete, add" for an extension); a close is
                            # "add, delete". So a delete counts as the close only if no add follows it.
                            if add:
                                self.opened.setdefault(source, t)
                                self.closed.pop(source, None)
                            else:
                                self.closed[source] = t

    def wait_quiet(self, expected: int, *, quiet: float = 3.0, limit: float = 120.0) -> str:
        """As :meth:`Watcher.wait_quiet`."""
        return _wait_quiet(lambda: len(self.opened), expected, quiet, limit)

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(5)


class LegacyCounter:
    """Polls how many rules legacy iptables' filter table holds (:mod:`bench.legacy_poller`, in the server
    namespace, for at most ``limit`` s) and turns each increase into that many grant times.  Grants are
    applied in the order the knocks were sent (one worker queue in arrival order, one monitor), so the
    k-th new rule is credited to the k-th knock sent."""

    def __init__(self, net: TestNet, limit: float) -> None:
        self.net = net
        self.changes: list[tuple[float, int]] = []
        self._proc = net.server.popen(PY, "-m", "bench.legacy_poller", str(limit), stdout=subprocess.PIPE)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.3)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        while True:
            chunk = self._proc.stdout.read(RECORD.size)
            if len(chunk) < RECORD.size:
                return
            when, count = RECORD.unpack(chunk)
            self.changes.append((when, count))

    def grant_times(self) -> list[float]:
        """One time per rule added beyond the first reading, in order."""
        times: list[float] = []
        if not self.changes:
            return times
        prev = self.changes[0][1]
        for t, n in self.changes[1:]:
            times += [t] * max(0, n - prev)
            prev = max(prev, n)
        return times

    def close_times(self) -> list[float]:
        """One time per rule removed, in order (each fall from the highest count so far)."""
        times: list[float] = []
        peak = None
        for t, n in self.changes:
            if peak is None or n >= peak:
                peak = n
                continue
            times += [t] * (peak - n)
            peak = n
        return times

    def wait_quiet(self, expected: int, *, quiet: float = 3.0, limit: float = 120.0) -> str:
        """As :meth:`Watcher.wait_quiet`, counting rules added."""
        return _wait_quiet(lambda: len(self.grant_times()), expected, quiet, limit)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(5)
        self._thread.join(5)
