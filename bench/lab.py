"""The benchmark's lab: a PKI, prebuilt knocks, the two hosts, the real server, and kernel watchers.

Everything here is bounded in count and time, and everything it starts it stops by pid.  The hosts are
tests/netns.py's TestNet (198.18.N.0/24 on a veth pair) plus one route in the client namespace,
``local 198.19.0.0/16 dev lo``, so that the sender can use thousands of distinct source addresses.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.netns import TestNet  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PASSWORD = "sknock-bench"  # noqa: S105 -- a throwaway PKI made for one run
PROTECTED_TCP = 8080
PROBE_UDP = 9999  # protected too: the per-packet cost probe sends here from a non-granted address
SENDER = Path(__file__).with_name("sender.py")
SOURCE_ROUTE = "198.19.0.0/16"


def source_text(index: int) -> str:
    sys.path.insert(0, str(SENDER.parent))
    from sender import source_text as st  # the one definition of "source i"

    return st(index)


# -- PKI and knocks ----------------------------------------------------------------------------------


@dataclass
class Pki:
    folder: Path
    server_pfx: Path
    server_cer: Path
    client_pfx: Path
    crl: Path
    ca_cer: Path


def make_pki(folder: Path, server_ip: str) -> Pki:
    from sknock import ca as ca_lib
    from sknock.ports import parse_ports

    pw = PASSWORD.encode()
    authority = ca_lib.init_ca(folder / "ca", pw, name="sknock bench CA")
    authority.issue_server("server", pw, ips=[server_ip])
    authority.issue_client("client", parse_ports(f"tcp/{PROTECTED_TCP}"), pw)
    d = folder / "ca"
    for path in (folder, d, d / "server", d / "client"):
        path.chmod(0o755)
    for path in (d / "server" / "server.pfx", d / "crl.der", d / "client" / "client.pfx"):
        path.chmod(0o644)
    return Pki(folder, d / "server" / "server.pfx", d / "server" / "server.cer", d / "client" / "client.pfx",
               d / "crl.der", d / "ca.cer")


_builder: object = None


def _init_builder(pfx: str, cer: str) -> None:
    global _builder
    from sknock.client import KnockClient

    _builder = KnockClient(client_pfx=pfx, pfx_password=PASSWORD, server_cert=cer, check_server_cert=False)


def _build_chunk(args: tuple[int, float, int | None]) -> bytes:
    from sknock.ports import Protocol

    count, stamp, duration = args
    out = bytearray()
    for _ in range(count):
        d = _builder.build_knock([(Protocol.TCP, PROTECTED_TCP)], now=stamp, duration=duration)  # type: ignore[attr-defined]
        out += struct.pack("!H", len(d)) + d
    return bytes(out)


def build_knocks(pki: Pki, path: Path, count: int, stamp: float, duration: int | None, workers: int = 2) -> float:
    """Write ``count`` valid knocks (timestamp ``stamp``) to ``path``; returns the seconds it took."""
    t = time.monotonic()
    chunks = [(min(500, count - i), stamp, duration) for i in range(0, count, 500)]
    init = (str(pki.client_pfx), str(pki.server_cer))
    with ProcessPoolExecutor(workers, initializer=_init_builder, initargs=init) as ex, path.open("wb") as f:
        for blob in ex.map(_build_chunk, chunks):
            f.write(blob)
    return time.monotonic() - t


# -- hosts -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hosts() -> Iterator[TestNet]:
    net = TestNet.create("skb")
    try:
        net.client.run("ip", "route", "add", "local", SOURCE_ROUTE, "dev", "lo")
        yield net
    finally:
        net.close()


# -- the server --------------------------------------------------------------------------------------


def resident_kib(pids: list[int]) -> int:
    """The resident memory of a group of processes with every physical page counted once.

    Forked processes share most of their pages (the interpreter, the libraries, everything imported
    before the fork), so summing their RSS counts those pages once per process, and PSS counts only a
    share of pages also mapped by processes outside the group.  This reads each process's page table
    (/proc/PID/pagemap; the frame numbers need root) and counts distinct frames.
    """
    frames: set[int] = set()
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                start_text, end_text = line.split()[0].split("-")
                start, end = int(start_text, 16) // page, int(end_text, 16) // page
                if start >= 1 << 35:  # [vsyscall]
                    continue
                try:
                    pagemap.seek(8 * start)
                    data = pagemap.read(8 * (end - start))
                except OSError:
                    continue
                for (entry,) in struct.iter_unpack("=Q", data):
                    if entry >> 63:  # present in RAM
                        frames.add(entry & ((1 << 55) - 1))
    return len(frames) * page // 1024


def _proc_kib(pids: list[int], file: str, field: str) -> dict[int, int]:
    """``field`` (in kB) of /proc/PID/``file`` for each process that still exists."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
                if line.startswith(field):
                    out[pid] = int(line.split()[1])
                    break
    return out


class ServerProcesses:
    """What the benchmark reads of a server under test, sknock's or fwknopd's: its log and the memory
    of its processes.  Subclasses set ``log`` and say which ``pids()`` are theirs."""

    log: Path

    def pids(self) -> list[int]:
        raise NotImplementedError

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> dict[int, int]:
        return _proc_kib(self.pids(), "status", "VmRSS:")

    def pss_kib(self) -> dict[int, int]:
        """Proportional set size: pages forked processes share are counted once overall."""
        return _proc_kib(self.pids(), "smaps_rollup", "Pss:")

    def resident_kib(self) -> int:
        return resident_kib(self.pids())


@dataclass
class Server(ServerProcesses):
    net: TestNet
    folder: Path
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, net: TestNet, pki: Pki, backend: str, **options: str) -> Server:
        folder = Path(tempfile.mkdtemp(prefix="sknock-bench-"))
        folder.chmod(0o755)
        values = {
            "serverPFXFile": str(pki.server_pfx),
            "PFXPasswd": PASSWORD,
            "crlFile": str(pki.crl),
            "controlSocket": str(folder / "control.sock"),
            "stateDir": str(folder / "state"),
            "firewallBackend": backend,
            "firewallPolicy": "drop",
            "protectedPorts": f"tcp/{PROTECTED_TCP},udp/{PROBE_UDP}",
            # Knocks are built before the timed part; the widest clock window keeps them fresh through
            # the run.  It changes no per-knock work (the replay cache holds each nonce longer).
            "TIMESTAMP_THRESHOLD_IN_SECONDS": "300",
            "PORT_OPEN_DURATION_IN_SECONDS": "600",
            "maxOpenDuration": "600",
            "logFile": str(folder / "server.log"),
            **options,
        }
        config = folder / "config.ini"
        config.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
        log = folder / "server.log"
        out = (folder / "stdout.log").open("wb")
        process = net.server.popen(PY, str(ROOT / "server" / "knock-server.py"), "-c", str(config),
                                   stdout=out, stderr=subprocess.STDOUT, env=ENV)
        server = cls(net, folder, process, log)
        deadline = time.monotonic() + 30
        while "worker ready" not in server.log_text():
            if process.poll() is not None or time.monotonic() > deadline:
                text = server.log_text() + (folder / "stdout.log").read_text(errors="replace")
                server.stop()
                raise RuntimeError(f"server did not start ({backend}):\n{text[-3000:]}")
            time.sleep(0.05)
        return server

    def pids(self) -> list[int]:
        pids = [self.process.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            pids += [int(c) for c in children]
        return pids

    def worker_pid(self) -> int | None:
        pids = self.pids()
        return pids[1] if len(pids) > 1 else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        # A stop leaves sknock's policy and its live grants in place; the next server in this namespace
        # must start from nothing, so remove them as an operator would.
        script = str(ROOT / "server" / "knock-server.py")
        self.net.server.run(PY, script, "-c", str(self.folder / "config.ini"), "teardown", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- watching the kernel -----------------------------------------------------------------------------

_NFT_ELEM = re.compile(r"^(add|delete) element inet sknock grants4 \{ (198\.19\.[0-9.]+) \. ")
_NFT_RULE_ADD = re.compile(r"^add rule ip filter (\S+) .*?saddr (198\.19\.[0-9.]+).*# handle (\d+)")
_NFT_RULE_DEL = re.compile(r"^delete rule ip filter (\S+) handle (\d+)")


@dataclass
class Watcher:
    """Time (CLOCK_MONOTONIC, the sender's clock too) at which each source's grant appeared in the
    kernel and was last removed.  nftables: ``nft monitor`` events (sknock's set elements, and, with
    ``handles``, the rules iptables-nft makes for fwknopd -- ``nft monitor`` prints a rule's handle, which
    its delete names, only with ``-a``), stamped when read.  legacy iptables: polls the number of
    rules in x_tables' filter table (cheap getsockopt) -- see :class:`LegacyCounter`."""

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
        start = time.monotonic()
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() - start < limit:
            n = len(self.opened)
            if n >= expected:
                return "all"
            if n != last_count:
                last_count, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                return "quiet"
            time.sleep(0.05)
        return "limit"

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
        import ctypes

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
        return Watcher.wait_quiet(self, expected, quiet=quiet, limit=limit)  # type: ignore[arg-type]

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(5)


class LegacyCounter:
    """Polls how many rules legacy iptables' filter table holds (IPT_SO_GET_INFO, one getsockopt) every
    millisecond in the server namespace, and turns each increase into that many grant times.  Grants
    are applied in the order the knocks were sent (one worker queue in arrival order, one firewall
    process), so the k-th new rule is credited to the k-th knock sent."""

    POLLER = r"""
import ctypes, socket, struct, sys, time, array
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
buf = ctypes.create_string_buffer(84); buf.raw = b"filter".ljust(84, b"\0")
size = ctypes.c_uint(84)
end = time.monotonic() + float(sys.argv[1]); out = sys.stdout.buffer; last = -1
while time.monotonic() < end:
    size.value = 84
    if libc.getsockopt(s.fileno(), 0, 64, buf, ctypes.byref(size)) == 0:
        n = struct.unpack_from("I", buf.raw, 76)[0]
        if n != last:
            out.write(struct.pack("dI", time.monotonic(), n)); out.flush(); last = n
    time.sleep(0.0005)
"""

    def __init__(self, net: TestNet, limit: float) -> None:
        self.net = net
        self.changes: list[tuple[float, int]] = []
        self._proc = net.server.popen(PY, "-c", self.POLLER, str(limit), stdout=subprocess.PIPE)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.3)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        while True:
            chunk = self._proc.stdout.read(12)
            if len(chunk) < 12:
                return
            self.changes.append(struct.unpack("dI", chunk))

    def baseline(self) -> int:
        return self.changes[0][1] if self.changes else 0

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

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(5)
        self._thread.join(5)


def send_knocks(net: TestNet, knocks: Path, *, rate: float = 0, count: int = 0, first: int = 0,
                timeout: float = 180, port: int = 0) -> tuple[dict[str, object], list[float]]:
    """Run the sender in the client namespace; returns its summary and the send time of each knock."""
    import array
    import json

    out = Path(tempfile.mkstemp(prefix="sknock-bench-times-")[1])
    try:
        result = net.client.run(PY, str(SENDER), "--server", net.server.ipv4, "--knocks", str(knocks),
                                "--rate", str(rate), "--count", str(count), "--first", str(first),
                                "--dest-port", str(port), "--out", str(out), timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sender failed: {result.stderr[-2000:]}")
        times = array.array("d")
        times.frombytes(out.read_bytes())
        return json.loads(result.stdout.strip().splitlines()[-1]), list(times)
    finally:
        out.unlink(missing_ok=True)
