"""The benchmark's lab: a PKI, prebuilt knocks, the two hosts, the real server, what its processes use.

Everything here is bounded in count and time, and everything it starts it stops by pid.  The hosts are
tests/netns.py's TestNet (198.18.N.0/24 on a veth pair) plus one route in the client namespace,
``local 198.19.0.0/16 dev lo``, so that the sender can use thousands of distinct source addresses.
Programs run in a namespace are this package's modules (``python -m bench.sender``): they find it as
this process did, from the working directory (the repository's root) or PYTHONPATH, both inherited.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from bench.sender import frame
from bench.sender import source_text as source_text  # the one definition of "source i"
from sknock import ca as ca_lib
from sknock.client import KnockClient
from sknock.ports import Protocol, parse_ports
from tests.netns import TestNet

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # for the server, started from its script
PASSWORD = "sknock-bench"  # noqa: S105 -- a throwaway PKI made for one run
PROTECTED_TCP = 8080
PROBE_UDP = 9999  # protected too: the per-packet cost probe sends here from a non-granted address
SOURCE_ROUTE = "198.19.0.0/16"


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
    """A CA, a server certificate for ``server_ip``, one client allowed tcp/8080, and the CRL, in
    ``folder``; readable by the server (it drops root)."""
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


_builder: KnockClient | None = None  # one per process of build_knocks' pool


def _init_builder(pfx: str, cer: str) -> None:
    global _builder
    _builder = KnockClient(client_pfx=pfx, pfx_password=PASSWORD, server_cert=cer, check_server_cert=False)


def _build_chunk(args: tuple[int, float, int | None]) -> bytes:
    count, stamp, duration = args
    assert _builder is not None
    out = bytearray()
    for _ in range(count):
        out += frame(_builder.build_knock([(Protocol.TCP, PROTECTED_TCP)], now=stamp, duration=duration))
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


@dataclass(frozen=True)
class CpuTimes:
    """One process's CPU time so far, in seconds (/proc/PID/stat): its own, and that of the children it
    has waited for (fwknopd's ``iptables`` processes, for instance)."""

    user: float
    system: float
    children_user: float
    children_system: float


def cpu_times(pids: list[int]) -> dict[int, CpuTimes]:
    """:class:`CpuTimes` of each process that still exists (all its threads together)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()  # after "pid (comm)": field 3, state, is fields[0]
        utime, stime, cutime, cstime = (int(f) / tick for f in fields[11:15])  # fields 14 to 17
        out[pid] = CpuTimes(utime, stime, cutime, cstime)
    return out


def cpu_spent(before: dict[int, CpuTimes], after: dict[int, CpuTimes], main: int) -> dict[str, Any]:
    """The CPU time a server's processes spent between two readings of :func:`cpu_times`, in seconds:
    each one's own user and system time, plus that of children they waited for in between.  A process
    that started in between counts whole; one that ended in between is lost (``ended`` says how many)."""
    zero = CpuTimes(0, 0, 0, 0)
    processes: list[dict[str, Any]] = []
    user = system = reaped = 0.0
    for pid, end in after.items():
        start = before.get(pid, zero)
        u, s = end.user - start.user, end.system - start.system
        # (+ 0.0: no "-0.0" from subtracting equal tick counts)
        c = round(end.children_user + end.children_system - start.children_user - start.children_system, 6) + 0.0
        processes.append({"pid": pid, "role": "main" if pid == main else "child", "user_s": u, "system_s": s,
                          "reaped_children_s": c})
        user, system, reaped = user + u, system + s, reaped + c
    return {"user_s": user, "system_s": system, "reaped_children_s": reaped, "total_s": user + system + reaped,
            "processes": processes, "ended": len(set(before) - set(after))}


class ServerProcesses:
    """What the benchmark reads of a server under test, sknock's or fwknopd's: its log and the memory
    and CPU time of its processes.  Subclasses set ``log`` and say which ``pids()`` are theirs, the
    main process first."""

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

    def cpu_times(self) -> dict[int, CpuTimes]:
        return cpu_times(self.pids())

    def cpu_since(self, before: dict[int, CpuTimes]) -> dict[str, Any]:
        """:func:`cpu_spent` from ``before`` (a :meth:`cpu_times`) to now."""
        return cpu_spent(before, self.cpu_times(), self.pids()[0])

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Server(ServerProcesses):
    """sknock's server (server/knock-server.py) in the server namespace, with its own folder; its
    processes are the monitor (``process``, the main one) and the workers it forked."""

    net: TestNet
    folder: Path
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, net: TestNet, pki: Pki, backend: str, **options: str) -> Server:
        """Started with ``backend`` and ready (its log says a worker is), or RuntimeError."""
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
        with (folder / "stdout.log").open("wb") as out:
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


def send_knocks(net: TestNet, knocks: Path, *, rate: float = 0, count: int = 0, first: int = 0,
                timeout: float = 180, port: int = 0, icmp: bool = False) -> tuple[dict[str, Any], list[float]]:
    """Run the sender in the client namespace; returns its summary and the send time of each knock.
    ``icmp``: the knocks go in ICMP echo requests (the server must take that carrier)."""
    out = Path(tempfile.mkstemp(prefix="sknock-bench-times-")[1])
    try:
        result = net.client.run(PY, "-m", "bench.sender", "--server", net.server.ipv4, "--knocks", str(knocks),
                                "--rate", str(rate), "--count", str(count), "--first", str(first),
                                "--dest-port", str(port), "--out", str(out), *(["--icmp"] if icmp else []),
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sender failed: {result.stderr[-2000:]}")
        times = array.array("d")
        times.frombytes(out.read_bytes())
        summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return summary, list(times)
    finally:
        out.unlink(missing_ok=True)
