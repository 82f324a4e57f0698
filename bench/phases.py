"""The measured phases: each starts a fresh server, loads it, and returns a dict of figures.

:class:`Phases` runs them against sknock (one backend); :mod:`bench.fwknop` adapts it to fwknopd.
:func:`sknock_plan` is sknock's list of phases, :func:`run_plan` runs a list within the run's time limit.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import lab, report
from bench.sender import frame, read_knocks
from bench.watch import LegacyCounter, SetWatcher, Watcher
from tests.netns import TestNet

RUN_LIMIT = 18 * 60  # seconds: phases not started by then are skipped (and said so)
BURST_REPEATS = 3  # the 20,000 burst, each on a fresh server; the median is reported
FLOOD_FIRST = 20_000  # the floods' valid knocks come from sources 20,000 and up, not used by the load phases
METRICS_LISTEN = "127.0.0.1:9465"  # the server namespace's loopback: what the +metrics phases turn on
#: The phases run twice with --metrics, the second time with metrics on ("NAME+metrics"): throughput,
#: latency and memory, side by side in one run.
METRICS_TWINS = ("rate-1000", "rate-5000", "scale-10000", "burst-20000")

Phase = Callable[[], dict[str, Any]]
Plan = list[tuple[str, Phase]]
KernelWatcher = Watcher | SetWatcher | LegacyCounter


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank); NaN when there are no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def latency_summary(lat: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of latencies given in seconds, in ms."""
    ms = [1000 * x for x in lat]
    return {"p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99), "max_ms": max(ms) if ms else math.nan}


class Phases:
    """The phases for one sknock backend; each returns a dict of figures."""

    expiry_rate = 1000.0
    expiry_wait = 20.0  # seconds past the grant duration to wait for every close
    knock_port = 0  # 0: the sender's rotating ports (sknock sniffs them all); fwknopd: 62201
    wait_extra = 60.0  # seconds to wait for grants after the last knock is due

    def __init__(self, net: TestNet, pki: lab.Pki | None, backend: str, knocks: Path, expiry_knocks: Path,
                 options: dict[str, str] | None = None) -> None:
        self.net, self.pki, self.backend = net, pki, backend
        self.knocks, self.expiry_knocks = knocks, expiry_knocks
        self.options = options or {}  # more server options (metricsListen for the +metrics phases)

    def with_options(self, **options: str) -> Phases:
        """The same phases against servers started with ``options`` too."""
        return Phases(self.net, self.pki, self.backend, self.knocks, self.expiry_knocks, {**self.options, **options})

    def server(self, expiry: bool = False, icmp: bool = False) -> lab.ServerProcesses:
        """A freshly started server (a context manager that stops it); ``icmp``: with the ICMP carrier
        (``knockCarriers = udp, icmp``)."""
        assert self.pki is not None
        options = {**self.options, **({"knockCarriers": "udp, icmp"} if icmp else {})}
        return lab.Server.start(self.net, self.pki, self.backend, **options)

    def scrape(self) -> dict[str, float]:
        """The server's own metrics (when ``metricsListen`` is set): what it counted, beside what the kernel
        showed; the scrape also shows the metrics server answered under load."""
        listen = self.options.get("metricsListen")
        if not listen:
            return {}
        run = self.net.server.run(lab.PY, "-m", "bench.scrape", listen, timeout=30)
        figures: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
        return figures

    def watch(self, limit: float) -> KernelWatcher:
        """A started watcher of the grants in the server's kernel, for at most ``limit`` s."""
        if self.backend == "iptables":
            return LegacyCounter(self.net, limit)
        return SetWatcher(self.net).start()

    @staticmethod
    def grants(watcher: KernelWatcher, first: int, count: int) -> list[float | None]:
        """Grant time per knock sent from sources ``first`` on (None: not seen in the kernel)."""
        if isinstance(watcher, LegacyCounter):
            seen = watcher.grant_times()
            return [seen[i] if i < len(seen) else None for i in range(count)]
        return [watcher.opened.get(lab.source_text(first + i)) for i in range(count)]

    def run_load(self, count: int, rate: float, *, label: str, scale: bool = False, icmp: bool = False
                 ) -> dict[str, Any]:
        """``count`` knocks at ``rate`` a second (0: as fast as the sender can) to a fresh server: grants
        a second, latency, and the server's CPU time from the first knock until the grants stopped
        (``server_cpu``); with ``scale``, its memory and the per-packet cost before and after; with
        ``icmp``, the knocks go in echo requests to a server that takes the ICMP carrier."""
        limit = self.wait_extra + (count / rate if rate else 0)
        with self.server(icmp=icmp) as server:
            out: dict[str, Any] = {"label": label, "knocks": count, "rate": rate or "max", "carrier": "icmp" if icmp
                                   else "udp"}
            if scale:
                out["probe_0_grants"] = self.probe()
                out["rss_kib_0_grants"] = sum(server.rss_kib().values())
                out["pss_kib_0_grants"] = sum(server.pss_kib().values())
                out["resident_kib_0_grants"] = server.resident_kib()
            watcher = self.watch(limit + 10)
            # the monitor and one worker (the others do the same work)
            profilers = ([self.start_profiler(pid, label) for pid in server.pids()[:2]]
                         if label == "profile" else [])
            try:
                cpu_start, cpu_wall = server.cpu_times(), time.monotonic()
                summary, times = lab.send_knocks(self.net, self.knocks, rate=rate, count=count,
                                                 port=self.knock_port, icmp=icmp)
                out["wait_end"] = watcher.wait_quiet(count, limit=limit)
                cpu = server.cpu_since(cpu_start)
                cpu["wall_s"] = time.monotonic() - cpu_wall
                if self.options.get("metricsListen"):
                    time.sleep(2.5)  # workers report each second, the monitor snapshots each second
                    out["metrics"] = self.scrape()
            finally:
                watcher.stop()
                if profilers:
                    out["profile"] = {name: self.stop_profiler(p) for name, p in zip(("monitor", "worker"), profilers,
                                                                                   strict=False) if p is not None}
            granted = self.grants(watcher, 0, len(times))
            seen = [g for g in granted if g is not None]
            out["sent"] = summary["sent"]
            out["send_seconds"] = times[-1] - times[0] if times else math.nan
            out["granted"] = len(seen)
            out["grants_per_s"] = len(seen) / (max(seen) - times[0]) if seen else 0.0
            cpu["us_per_grant"] = 1e6 * cpu["total_s"] / len(seen) if seen else None
            out["server_cpu"] = cpu
            lat = [g - t for g, t in zip(granted, times, strict=True) if g is not None]
            if isinstance(watcher, LegacyCounter) and len(seen) != len(times):
                out["latency_note"] = "rule count polled: latency only when every knock was granted"
                lat = []
            out["latency"] = latency_summary(lat)
            out["grant_curve"] = sorted(g - times[0] for g in seen)[:: max(1, len(seen) // 200)]
            out["latencies_ms"] = sorted(1000 * x for x in lat)[:: max(1, len(lat) // 200)] if lat else []
            if scale:
                ordered = sorted(seen)
                out["time_to_10000_s"] = ordered[9999] - times[0] if len(ordered) >= 10000 else None
                out["rss_kib"] = server.rss_kib()
                out["rss_kib_total"] = sum(out["rss_kib"].values())
                out["pss_kib_total"] = sum(server.pss_kib().values())
                out["resident_kib"] = server.resident_kib()
                out["processes"] = len(server.pids())
                out["probe_with_grants"] = self.probe()
                out["grants_in_kernel"] = len(seen)
            return out

    @staticmethod
    def repeated(times: int, run: Phase) -> dict[str, Any]:
        """The run with the median grants/s of ``times`` runs (each on a fresh server), with every
        run's figure in ``repeats`` (and its CPU time per grant in ``repeats_cpu_us_per_grant``): on 2
        cores shared with the load generator one burst varies by +-15 %, so a single one would say more
        about scheduling luck than about the server."""
        runs = [run() for _ in range(times)]
        ordered = sorted(runs, key=lambda r: r["grants_per_s"])
        middle = dict(ordered[len(ordered) // 2])
        middle["repeats"] = [r["grants_per_s"] for r in runs]
        middle["repeats_cpu_us_per_grant"] = [r.get("server_cpu", {}).get("us_per_grant") for r in runs]
        return middle

    def probe(self) -> dict[str, Any]:
        """The sender's time per packet to a protected port from a non-granted address (best of 5)."""
        r = self.net.client.run(lab.PY, "-m", "bench.sender", "--server", self.net.server.ipv4, "--probe", "100000",
                                "--repeat", "5", "--port", str(lab.PROBE_UDP), "--out", "/dev/null", timeout=120)
        result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return result

    @staticmethod
    def start_profiler(pid: int, label: str) -> tuple[subprocess.Popen[bytes], Path] | None:
        """py-spy sampling process ``pid`` (None when py-spy is not installed)."""
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            return None
        out = Path(tempfile.mkstemp(prefix=f"sknock-bench-{label}-", suffix=".txt")[1])
        proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                                 "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return proc, out

    @staticmethod
    def stop_profiler(profiler: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any]:
        """Stops a :meth:`start_profiler` (SIGINT: py-spy writes what it sampled) and summarizes it."""
        proc, out = profiler
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        summary = report.summarize_profile(out)
        out.unlink(missing_ok=True)
        return summary

    def expiry(self, count: int) -> dict[str, Any]:
        """``count`` grants of 2 s: how late after its due time each one left the kernel."""
        duration = 2.0
        with self.server(expiry=True):
            watcher = self.watch(duration + 40)
            try:
                summary, times = lab.send_knocks(self.net, self.expiry_knocks, rate=self.expiry_rate, count=count,
                                                 port=self.knock_port)
                deadline = time.monotonic() + duration + self.expiry_wait
                while time.monotonic() < deadline:
                    closed = (len(watcher.close_times()) if isinstance(watcher, LegacyCounter)
                              else len(watcher.closed))
                    if closed >= count:
                        break
                    time.sleep(0.1)
                time.sleep(0.5)
            finally:
                watcher.stop()
            late: list[float] = []
            if isinstance(watcher, LegacyCounter):
                late = [c - (o + duration) for o, c in zip(watcher.grant_times(), watcher.close_times(), strict=False)]
            else:
                for i in range(count):
                    src = lab.source_text(i)
                    if src in watcher.opened and src in watcher.closed:
                        late.append(watcher.closed[src] - (watcher.opened[src] + duration))
            ms = [1000 * x for x in late]
            return {"grants": count, "duration_s": duration, "rate": self.expiry_rate, "closes_seen": len(late),
                    "late_p50_ms": pct(ms, 50), "late_p99_ms": pct(ms, 99), "late_max_ms": max(ms) if ms else None,
                    "sent": summary["sent"],
                    "note": ("nftables: the kernel's own element timeout ends the grant at its due time; this is "
                             "when the monitor's delete reached the kernel")
                    if self.backend == "nftables" else "the monitor's rule delete"}

    def flood(self, kind: str, seconds: float = 10.0, icmp: bool = False) -> dict[str, Any]:
        """Valid knocks at 10/s from distinct sources while one sender floods as fast as it can: junk
        (``kind`` "junk") or copies of one valid knock ("replay", the knock file's 501st).  ``icmp``: the
        flood and the valid knocks are echo requests, to a server that takes the ICMP carrier."""
        valid = int(10 * seconds)
        carrier = ["--icmp"] if icmp else []
        with self.server(icmp=icmp):
            watcher = self.watch(seconds + 40)
            flood_file = None
            args = ["--junk", "1024"]
            if kind == "replay":
                flood_file = Path(tempfile.mkstemp(prefix="sknock-bench-replay-")[1])
                flood_file.write_bytes(frame(read_knocks(self.knocks, 501)[-1]))
                args = ["--replay", str(flood_file)]
            stats = Path(tempfile.mkstemp(prefix="sknock-bench-flood-")[1])
            flooder = self.net.client.popen(lab.PY, "-m", "bench.sender", "--server", self.net.server.ipv4, *args,
                                            "--seconds", str(seconds + 1), "--out", str(stats),
                                            "--dest-port", str(self.knock_port), *carrier,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                summary, times = lab.send_knocks(self.net, self.knocks, rate=10, count=valid, first=FLOOD_FIRST,
                                                 port=self.knock_port, icmp=icmp)
                flooder.wait(seconds + 30)
                # (the rule count's poller has always waited 3 s for a change, the event watchers 2 s)
                watcher.wait_quiet(valid, quiet=3.0 if isinstance(watcher, LegacyCounter) else 2.0, limit=15)
            finally:
                if flooder.poll() is None:
                    flooder.kill()
                    flooder.wait(5)
                watcher.stop()
                if flood_file is not None:
                    flood_file.unlink(missing_ok=True)
            flood_stats = json.loads(stats.read_text() or "{}")
            stats.unlink(missing_ok=True)
            if isinstance(watcher, LegacyCounter):
                seen = watcher.grant_times()
                if kind == "replay":  # the replayed knock's own grant came first, before the valid knocks
                    seen = seen[1:]
                granted = [seen[i] if i < len(seen) else None for i in range(valid)]
            else:
                granted = self.grants(watcher, FLOOD_FIRST, valid)
            lat = [g - t for g, t in zip(granted, times, strict=True) if g is not None]
            return {"kind": kind, "carrier": "icmp" if icmp else "udp",
                    "valid_sent": summary["sent"], "valid_granted": len(lat),
                    "share_granted": len(lat) / valid, "latency": latency_summary(lat),
                    "flood_pps": flood_stats.get("rate"), "flood_packets": flood_stats.get("sent")}


def sknock_plan(ph: Phases, *, quick: bool, profile: bool, metrics: bool = False) -> Plan:
    """sknock's phases, in order (``quick``: small counts; ``profile``: one more burst with py-spy;
    ``metrics``: each of METRICS_TWINS again right after it, with metrics on, as ``NAME+metrics``)."""
    big = 2000 if quick else 20000
    plan: Plan = [
        ("burst-2000", lambda: ph.run_load(2000, 0, label="burst-2000")),
        ("rate-100", lambda: ph.run_load(200 if quick else 2000, 100, label="rate-100")),
        ("rate-1000", lambda: ph.run_load(2000, 1000, label="rate-1000")),
        ("rate-5000", lambda: ph.run_load(2000, 5000, label="rate-5000")),
        ("expiry", lambda: ph.expiry(1000)),
        # sent at a rate the server sustains, so that 10,000 grants are really reached (at once, most
        # knocks would be lost in the socket buffer: see burst-20000)
        ("scale-10000", lambda: ph.run_load(min(big, 10000), 2500, label="scale-10000", scale=True)),
        ("burst-20000", lambda: ph.repeated(BURST_REPEATS, lambda: ph.run_load(big, 0, label="burst-20000"))),
        ("flood-junk", lambda: ph.flood("junk")),
        ("flood-replay", lambda: ph.flood("replay")),
        # The ICMP carrier (knockCarriers = udp, icmp): the same floods and a latency figure, the knocks
        # and the flood in echo requests.
        ("rate-1000-icmp", lambda: ph.run_load(2000, 1000, label="rate-1000-icmp", icmp=True)),
        ("flood-junk-icmp", lambda: ph.flood("junk", icmp=True)),
        ("flood-replay-icmp", lambda: ph.flood("replay", icmp=True)),
    ]
    if ph.backend == "nftables":
        # ssh NAME true through the knock against ssh with the port open (bench/sshlogin.py)
        plan.append(("ssh-login", lambda: _ssh_login(ph, 20)))
    if metrics:
        on = ph.with_options(metricsListen=METRICS_LISTEN)
        twins = dict(sknock_plan(on, quick=quick, profile=False))
        plan = [step for name, fn in plan
                for step in [(name, fn)] + ([(f"{name}+metrics", twins[name])] if name in METRICS_TWINS else [])]
    if profile:
        # The burst once more, with py-spy sampling the monitor and a worker: sampling takes CPU from the
        # server, so these figures are not the throughput figures (burst-20000 runs unprofiled).
        plan.append(("profile", lambda: ph.run_load(big, 0, label="profile")))
    return plan


def _ssh_login(ph: Phases, logins: int) -> dict[str, Any]:
    from bench import sshlogin  # it builds on this module

    return sshlogin.run(ph, logins)


def run_plan(key: str, plan: Plan, phases: dict[str, Any], started: float, only: str = "",
             after: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Run each (name, phase) of ``plan`` into ``phases``: only those named in ``only`` (comma-separated;
    empty: all), none once the run has taken RUN_LIMIT; a failed phase is reported and the run goes on.
    ``after(name, result)`` may add to a phase's result."""
    for name, fn in plan:
        if only and name not in only.split(","):
            continue
        if time.monotonic() - started > RUN_LIMIT:
            phases[name] = {"skipped": "run time limit reached"}
            continue
        print(f"bench: {key}: {name}", flush=True)
        t = time.monotonic()
        try:
            phases[name] = fn()
        except Exception as exc:  # noqa: BLE001 -- a failed phase is reported, the run goes on
            phases[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            traceback.print_exc()
        if after is not None:
            after(name, phases[name])
        phases[name]["phase_seconds"] = time.monotonic() - t
