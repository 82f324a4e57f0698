"""sknock's benchmark: measures, reports, never fails on a number.  Run by bench/run.sh, as root.

    python bench/bench.py [--quick] [--only nftables,iptables,fwknopd] [--profile]

One run, one machine: the crypto bound and the client's costs in-process, then for each server (sknock
with nftables, sknock with iptables, fwknopd with iptables) a series of phases, each against a freshly
started server in a fresh pair of namespaces' server host.  Knocks are built before the timed part and
sent from distinct source addresses; a grant counts when it is in the kernel.  Results go to
bench/results/<date>-<time>.{json,md,png}; the table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab  # noqa: E402
import micro  # noqa: E402
import report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUN_LIMIT = 18 * 60  # seconds: phases not started by then are skipped (and said so)
QUIET_LOAD = 0.5  # 1-minute load average at the start above which a run is marked preliminary
BURST_REPEATS = 3  # the 20,000 burst, each on a fresh server; the median is reported


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def latency_summary(lat: list[float]) -> dict[str, float]:
    ms = [1000 * x for x in lat]
    return {"p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99), "max_ms": max(ms) if ms else math.nan}


class Phases:
    """The phases for one sknock backend; each returns a dict of figures."""

    def __init__(self, net: Any, pki: lab.Pki, backend: str, knocks: Path, expiry_knocks: Path, started: float,
                 quick: bool, profile: bool) -> None:
        self.net, self.pki, self.backend = net, pki, backend
        self.knocks, self.expiry_knocks = knocks, expiry_knocks
        self.started, self.quick, self.profile = started, quick, profile

    expiry_rate = 1000.0
    expiry_wait = 20.0  # seconds past the grant duration to wait for every close
    knock_port = 0  # 0: the sender's rotating ports (sknock sniffs them all); fwknopd: 62201
    wait_extra = 60.0  # seconds to wait for grants after the last knock is due

    def server(self, expiry: bool = False) -> Any:
        """A freshly started server (a context manager with rss_kib/pss_kib/pids)."""
        return lab.Server.start(self.net, self.pki, self.backend)

    def watch(self, limit: float) -> Any:
        if self.backend == "iptables":
            return lab.LegacyCounter(self.net, limit)
        return lab.SetWatcher(self.net).start()

    def grants(self, watcher: Any, first: int, count: int, times: list[float]) -> list[float | None]:
        """Grant time per knock sent (None: not seen in the kernel)."""
        if isinstance(watcher, lab.LegacyCounter):
            seen = watcher.grant_times()
            return [seen[i] if i < len(seen) else None for i in range(len(times))]
        return [watcher.opened.get(lab.source_text(first + i)) for i in range(len(times))]

    def run_load(self, count: int, rate: float, *, label: str, scale: bool = False) -> dict[str, Any]:
        limit = self.wait_extra + (count / rate if rate else 0)
        with self.server() as server:
            out: dict[str, Any] = {"label": label, "knocks": count, "rate": rate or "max"}
            if scale:
                out["probe_0_grants"] = self.probe()
                out["rss_kib_0_grants"] = sum(server.rss_kib().values())
                out["pss_kib_0_grants"] = sum(server.pss_kib().values())
                out["resident_kib_0_grants"] = server.resident_kib()
            watcher = self.watch(limit + 10)
            profilers = ([self.start_profiler(pid, label) for pid in server.pids()]
                         if label == "profile" else [])
            try:
                summary, times = lab.send_knocks(self.net, self.knocks, rate=rate, count=count,
                                                 port=self.knock_port)
                if isinstance(watcher, lab.Watcher | lab.SetWatcher):
                    out["wait_end"] = watcher.wait_quiet(count, limit=limit)
                else:
                    wait_counter(watcher, count, limit)
            finally:
                watcher.stop()
                if profilers:
                    out["profile"] = {name: self.stop_profiler(p) for name, p in zip(("firewall", "worker"), profilers,
                                                                                   strict=False) if p is not None}
            granted = self.grants(watcher, 0, count, times)
            seen = [g for g in granted if g is not None]
            out["sent"] = summary["sent"]
            out["send_seconds"] = times[-1] - times[0] if times else math.nan
            out["granted"] = len(seen)
            out["grants_per_s"] = len(seen) / (max(seen) - times[0]) if seen else 0.0
            lat = [g - t for g, t in zip(granted, times, strict=True) if g is not None]
            if isinstance(watcher, lab.LegacyCounter) and len(seen) != len(times):
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
    def repeated(times: int, run: Any) -> dict[str, Any]:
        """The run with the median grants/s of ``times`` runs (each on a fresh server), with every
        run's figure in ``repeats``: on 2 cores shared with the load generator one burst varies by
        +-15 %, so a single one would say more about scheduling luck than about the server."""
        runs = [run() for _ in range(times)]
        ordered = sorted(runs, key=lambda r: r["grants_per_s"])
        middle = dict(ordered[len(ordered) // 2])
        middle["repeats"] = [r["grants_per_s"] for r in runs]
        return middle

    def probe(self) -> dict[str, Any]:
        r = self.net.client.run(lab.PY, str(lab.SENDER), "--server", self.net.server.ipv4, "--probe", "100000",
                                "--repeat", "5", "--port", str(lab.PROBE_UDP), "--out", "/dev/null", timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])

    def start_profiler(self, pid: int, label: str) -> Any:
        spy = Path(sys.executable).with_name("py-spy")
        if pid is None or not spy.exists():
            return None
        out = Path(tempfile.mkstemp(prefix=f"sknock-bench-{label}-", suffix=".txt")[1])
        proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                                 "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return proc, out

    def stop_profiler(self, profiler: Any) -> dict[str, Any]:
        import signal

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
        duration = 2.0
        with self.server(expiry=True) as _server:
            watcher = self.watch(duration + 40)
            try:
                summary, times = lab.send_knocks(self.net, self.expiry_knocks, rate=self.expiry_rate, count=count,
                                                 port=self.knock_port)
                deadline = time.monotonic() + duration + self.expiry_wait
                while time.monotonic() < deadline:
                    closed = (len(watcher.closed) if isinstance(watcher, lab.Watcher | lab.SetWatcher)
                              else len(close_times(watcher)))
                    if closed >= count:
                        break
                    time.sleep(0.1)
                time.sleep(0.5)
            finally:
                watcher.stop()
            late: list[float] = []
            if isinstance(watcher, lab.Watcher | lab.SetWatcher):
                for i in range(count):
                    src = lab.source_text(i)
                    if src in watcher.opened and src in watcher.closed:
                        late.append(watcher.closed[src] - (watcher.opened[src] + duration))
            else:
                opened, closed = watcher.grant_times(), close_times(watcher)
                late = [c - (o + duration) for o, c in zip(opened, closed, strict=False)]
            ms = [1000 * x for x in late]
            return {"grants": count, "duration_s": duration, "rate": self.expiry_rate, "closes_seen": len(late),
                    "late_p50_ms": pct(ms, 50), "late_p99_ms": pct(ms, 99), "late_max_ms": max(ms) if ms else None,
                    "sent": summary["sent"],
                    "note": ("nftables: the kernel's own element timeout ends the grant at its due time; this is "
                             "when the firewall process's delete reached the kernel")
                    if self.backend == "nftables" else "the firewall process's rule delete"}

    def flood(self, kind: str, seconds: float = 10.0) -> dict[str, Any]:
        """Valid knocks at 10/s from distinct sources while one sender floods as fast as it can."""
        valid = int(10 * seconds)
        first = 20_000  # source indexes not used by the load phases
        with self.server() as _server:
            watcher = self.watch(seconds + 40)
            flood_file = None
            args = ["--junk", "1024"]
            if kind == "replay":
                flood_file = Path(tempfile.mkstemp(prefix="sknock-bench-replay-")[1])
                one = micro.read_knock_file(self.knocks, 501)[-1]
                import struct

                flood_file.write_bytes(struct.pack("!H", len(one)) + one)
                args = ["--replay", str(flood_file)]
            stats = Path(tempfile.mkstemp(prefix="sknock-bench-flood-")[1])
            flooder = self.net.client.popen(lab.PY, str(lab.SENDER), "--server", self.net.server.ipv4, *args,
                                            "--seconds", str(seconds + 1), "--out", str(stats),
                                            "--dest-port", str(self.knock_port),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                summary, times = lab.send_knocks(self.net, self.knocks, rate=10, count=valid, first=first,
                                                 port=self.knock_port)
                flooder.wait(seconds + 30)
                if isinstance(watcher, lab.Watcher | lab.SetWatcher):
                    watcher.wait_quiet(valid, quiet=2.0, limit=15)
                else:
                    wait_counter(watcher, valid, 15)
            finally:
                if flooder.poll() is None:
                    flooder.kill()
                    flooder.wait(5)
                watcher.stop()
                if flood_file is not None:
                    flood_file.unlink(missing_ok=True)
            flood_stats = json.loads(stats.read_text() or "{}")
            stats.unlink(missing_ok=True)
            if isinstance(watcher, lab.Watcher | lab.SetWatcher):
                granted = [watcher.opened.get(lab.source_text(first + i)) for i in range(valid)]
            else:
                seen = watcher.grant_times()
                if kind == "replay":  # the replayed knock's own grant came first, before the valid knocks
                    seen = seen[1:]
                granted = [seen[i] if i < len(seen) else None for i in range(valid)]
            lat = [g - t for g, t in zip(granted, times, strict=True) if g is not None]
            return {"kind": kind, "valid_sent": summary["sent"], "valid_granted": len(lat),
                    "share_granted": len(lat) / valid, "latency": latency_summary(lat),
                    "flood_pps": flood_stats.get("rate"), "flood_packets": flood_stats.get("sent")}


def wait_counter(counter: lab.LegacyCounter, expected: int, limit: float, quiet: float = 3.0) -> None:
    start = last_change = time.monotonic()
    last = -1
    while time.monotonic() - start < limit:
        n = len(counter.grant_times())
        if n >= expected:
            return
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return
        time.sleep(0.05)


def close_times(counter: lab.LegacyCounter) -> list[float]:
    times: list[float] = []
    peak = None
    for t, n in counter.changes:
        if peak is None or n >= peak:
            peak = n
            continue
        times += [t] * (peak - n)
        peak = n
    return times


def run_sknock(backend: str, pki: lab.Pki, net: Any, folder: Path, args: argparse.Namespace, started: float,
               results: dict[str, Any]) -> None:
    key = f"sknock-{backend}"
    res: dict[str, Any] = {"phases": {}}
    results["servers"][key] = res
    knocks = folder / f"knocks-{backend}.bin"
    expiry = folder / f"expiry-{backend}.bin"
    big = 2000 if args.quick else 20000
    stamp = time.time() + 290  # the servers accept +-300 s: knocks stay valid ~10 min from here
    res["build_seconds"] = lab.build_knocks(pki, knocks, big, stamp, None)
    lab.build_knocks(pki, expiry, 1000, stamp, 2)
    ph = Phases(net, pki, backend, knocks, expiry, started, args.quick, args.profile)
    plan: list[tuple[str, Any]] = [
        ("burst-2000", lambda: ph.run_load(2000, 0, label="burst-2000")),
        ("rate-100", lambda: ph.run_load(200 if args.quick else 2000, 100, label="rate-100")),
        ("rate-1000", lambda: ph.run_load(2000, 1000, label="rate-1000")),
        ("rate-5000", lambda: ph.run_load(2000, 5000, label="rate-5000")),
        ("expiry", lambda: ph.expiry(1000)),
        # sent at a rate the server sustains, so that 10,000 grants are really reached (at once, most
        # knocks would be lost in the socket buffer: see burst-20000)
        ("scale-10000", lambda: ph.run_load(min(big, 10000), 2500, label="scale-10000", scale=True)),
        ("burst-20000", lambda: ph.repeated(BURST_REPEATS, lambda: ph.run_load(big, 0, label="burst-20000"))),
        ("flood-junk", lambda: ph.flood("junk")),
        ("flood-replay", lambda: ph.flood("replay")),
    ]
    if args.profile:
        # The burst once more, with py-spy sampling both server processes: sampling takes CPU from the
        # server, so these figures are not the throughput figures (burst-20000 runs unprofiled).
        plan.append(("profile", lambda: ph.run_load(big, 0, label="profile")))
    run_plan(key, plan, res["phases"], started, args.phases)


def run_plan(key: str, plan: list[tuple[str, Any]], phases: dict[str, Any], started: float, only: str = "",
             after: Any = None) -> None:
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


def merge(results: dict[str, Any], earlier: dict[str, Any], name: str) -> None:
    """Servers and in-process figures of an earlier run that this one lacks, each marked ``from_run``."""
    for key, server in earlier.get("servers", {}).items():
        if key not in results["servers"] and "phases" in server:
            results["servers"][key] = {**server, "from_run": name}
    for key in ("crypto_bound", "verifier", "client"):
        if key not in results and key in earlier:
            results[key] = {**earlier[key], "from_run": name}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts, to try the harness")
    p.add_argument("--only", default="nftables,iptables,fwknopd")
    p.add_argument("--profile", action="store_true", help="one more 20,000 burst with py-spy on both server processes")
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--phases", default="", help="comma-separated phase names to run (default: all), e.g. "
                                                "burst-20000,flood-replay; for trying a change, not for the README")
    p.add_argument("--merge", action="append", default=[], metavar="RESULTS.json",
                   help="add the servers (and in-process figures) of an earlier run that this run did not "
                        "measure, marked with that run's date (first file wins); e.g. fwknopd alone, side by "
                        "side with sknock's latest figures")
    args = p.parse_args()
    from tests.netns import netns_available

    reason = netns_available()
    if reason:
        print(f"bench: {reason}: run bench/run.sh (it re-executes with sudo)", file=sys.stderr)
        return 2
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(),
                    "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]},
        "servers": {},
    }
    load = float(results["machine"]["loadavg_start"][0])
    if load > QUIET_LOAD:
        results["caveat"] = (f"PRELIMINARY: the machine was busy when the run started (1-minute load average "
                             f"{load:.2f} > {QUIET_LOAD}); figures may be low")
    try:
        import cryptography

        results["machine"]["cryptography"] = cryptography.__version__
    except ImportError:
        pass
    folder = Path(tempfile.mkdtemp(prefix="sknock-bench-pki-"))
    try:
        with lab.hosts() as net:
            pki = lab.make_pki(folder, net.server.ipv4)
            if not args.no_micro:
                print("bench: crypto bound, verifier rate, client", flush=True)
                results["crypto_bound"] = micro.crypto_bound()
                vk = folder / "verifier-knocks.bin"
                lab.build_knocks(pki, vk, 1000, time.time(), None)
                results["verifier"] = micro.verifier_rate(pki, micro.read_knock_file(vk, 1000))
                results["client"] = micro.client_figures(net, pki)
            for name in args.only.split(","):
                if name in ("nftables", "iptables"):
                    run_sknock(name, pki, net, folder, args, started, results)
                elif name == "fwknopd":
                    try:
                        import fwknop

                        fwknop.run(net, folder, args, started, results)
                    except Exception as exc:  # noqa: BLE001
                        results["servers"]["fwknopd-iptables"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                        traceback.print_exc()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["run_seconds"] = time.monotonic() - started
    for earlier in args.merge:
        merge(results, json.loads(Path(earlier).read_text()), Path(earlier).stem)
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / stamp
    base.with_suffix(".json").write_text(json.dumps(_rounded(results), separators=(",", ":"), default=str))
    table = report.markdown(results)
    base.with_suffix(".md").write_text(table)
    try:
        report.plot(results, base.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001
        print(f"bench: no plot: {exc}", file=sys.stderr)
    print(table)
    print(f"bench: wrote {base}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
