"""sknock's benchmark: measures, reports, never fails on a number.  Run by bench/run.sh, as root, from
the repository's root:

    python -m bench [--quick] [--only nftables,redis,iptables,fwknopd] [--profile]

One run, one machine: the crypto bound and the client's costs in-process, then for each server (sknock
with nftables, the same with a Redis replay store (bench/fleet.py), sknock with iptables, fwknopd with
iptables) a series of phases, each against a freshly started server in a fresh pair of namespaces' server
host.  Knocks are built before the timed part and
sent from distinct source addresses; a grant counts when it is in the kernel.  Results go to
bench/results/<date>-<time>.{json,md,png}; the table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import cryptography

from bench import fleet, fwknop, lab, micro, report
from bench.phases import Phases, run_plan, sknock_plan
from bench.sender import read_knocks
from tests.netns import TestNet, netns_available

RESULTS = Path(__file__).resolve().parent / "results"
QUIET_LOAD = 0.5  # 1-minute load average at the start above which a run is marked preliminary


def run_sknock(backend: str, pki: lab.Pki, net: TestNet, folder: Path, args: argparse.Namespace, started: float,
               results: dict[str, Any]) -> None:
    """sknock's phases with ``backend`` into ``results["servers"]["sknock-<backend>"]``."""
    key = f"sknock-{backend}"
    res: dict[str, Any] = {"phases": {}}
    results["servers"][key] = res
    knocks = folder / f"knocks-{backend}.bin"
    expiry = folder / f"expiry-{backend}.bin"
    stamp = time.time() + 290  # the servers accept +-300 s: knocks stay valid ~10 min from here
    res["build_seconds"] = lab.build_knocks(pki, knocks, 2000 if args.quick else 20000, stamp, None)
    lab.build_knocks(pki, expiry, 1000, stamp, 2)
    ph = Phases(net, pki, backend, knocks, expiry)
    plan = sknock_plan(ph, quick=args.quick, profile=args.profile, metrics=args.metrics and backend == "nftables")
    run_plan(key, plan, res["phases"], started, args.phases)


def merge(results: dict[str, Any], earlier: dict[str, Any], name: str) -> None:
    """Servers and in-process figures of an earlier run that this one lacks, each marked ``from_run``."""
    for key, server in earlier.get("servers", {}).items():
        if key not in results["servers"] and "phases" in server:
            results["servers"][key] = {**server, "from_run": name}
    for key in ("crypto_bound", "verifier", "client"):
        if key not in results and key in earlier:
            results[key] = {**earlier[key], "from_run": name}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts, to try the harness")
    p.add_argument("--only", default="nftables,redis,iptables,fwknopd")
    p.add_argument("--profile", action="store_true",
                   help="one more 20,000 burst with py-spy on the monitor and a worker")
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--metrics", action="store_true",
                   help="run sknock-nftables' 1,000/s, 5,000/s, scale and 20,000-burst phases twice, the second "
                        "time with metrics on (NAME+metrics), side by side in the table")
    p.add_argument("--phases", default="", help="comma-separated phase names to run (default: all), e.g. "
                                                "burst-20000,flood-replay; for trying a change, not for the README")
    p.add_argument("--merge", action="append", default=[], metavar="RESULTS.json",
                   help="add the servers (and in-process figures) of an earlier run that this run did not "
                        "measure, marked with that run's date (first file wins); e.g. fwknopd alone, side by "
                        "side with sknock's latest figures")
    args = p.parse_args()
    reason = netns_available()
    if reason:
        print(f"bench: {reason}: run bench/run.sh (it re-executes with sudo)", file=sys.stderr)
        return 2
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "cryptography": cryptography.__version__,
                    "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]},
        "servers": {},
    }
    load = float(results["machine"]["loadavg_start"][0])
    if load > QUIET_LOAD:
        results["caveat"] = (f"PRELIMINARY: the machine was busy when the run started (1-minute load average "
                             f"{load:.2f} > {QUIET_LOAD}); figures may be low")
    folder = Path(tempfile.mkdtemp(prefix="sknock-bench-pki-"))
    try:
        with lab.hosts() as net:
            pki = lab.make_pki(folder, net.server.ipv4)
            if not args.no_micro:
                print("bench: crypto bound, verifier rate, client", flush=True)
                results["crypto_bound"] = micro.crypto_bound()
                vk = folder / "verifier-knocks.bin"
                lab.build_knocks(pki, vk, 1000, time.time(), None)
                results["verifier"] = micro.verifier_rate(pki, read_knocks(vk, 1000))
                results["sandbox"] = micro.sandbox_cost(pki, read_knocks(vk, 1000))
                results["client"] = micro.client_figures(net, pki)
            for name in args.only.split(","):
                if name in ("nftables", "iptables"):
                    run_sknock(name, pki, net, folder, args, started, results)
                elif name == "redis":
                    fleet.run(pki, net, folder, args, started, results)
                elif name == "fwknopd":
                    try:
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
    results["cpu_per_grant"] = report.cpu_per_grant(results)
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / stamp
    base.with_suffix(".json").write_text(report.to_json(results))
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
