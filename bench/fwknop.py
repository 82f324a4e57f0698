"""fwknopd side by side: Debian's fwknop-server (2.6.10, iptables -- here iptables-nft -- its default),
packets built beforehand with Debian's fwknop client, measured by the same phases as sknock.

* One throwaway Rijndael + HMAC-SHA256 key pair (random, base64), one access.conf stanza: SOURCE ANY,
  OPEN_PORTS tcp/22, FW_ACCESS_TIMEOUT 600 s for the load phases (nothing expires while counting) and
  2 s for the expiry phase.
* fwknopd.conf: PCAP_INTF the server's veth, ENABLE_PCAP_PROMISC N, PCAP_FILTER udp port 62201,
  FIREWALL_EXE iptables, MAX_SPA_PACKET_AGE 3600 (packets are built before the timed part); everything
  else fwknopd's defaults (PCAP_LOOP_SLEEP 100 ms, digest cache on).  Each phase starts a fresh fwknopd
  in the foreground (-f) with its own config, run dir and digest cache in a temporary folder, kills it
  by pid (SIGTERM: it flushes its chains) and removes the folder.
* Packets: ``fwknop -A tcp/22 -a <source i> -D <server> --use-hmac -T -B file -b``, one per source
  address (each has its own random nonce, so the digest cache refuses none of them), written in the
  sender's length-prefixed format and sent from the matching source to udp/62201.
* Grants: the rules fwknopd's iptables-nft adds to table ip filter, chain FWKNOP_INPUT, seen by the
  same watcher as sknock's set elements, as ``nft -a monitor`` (``add rule ip filter FWKNOP_INPUT ip
  saddr X tcp dport 22 ... # handle N``, ``delete rule ip filter FWKNOP_INPUT handle N``; without ``-a``
  there is no handle, so closes could not be matched).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import lab
from bench.phases import FLOOD_FIRST, Phases, Plan, run_plan
from bench.sender import frame
from bench.watch import Watcher
from tests.netns import TestNet

SPA_PORT = 62201
OPEN_PORT = 22
LOAD_TIMEOUT = 600  # FW_ACCESS_TIMEOUT for the load phases
EXPIRY_TIMEOUT = 2  # ... for the expiry phase (Phases.expiry's duration)
KEY = "fwknopd-iptables"


class Keys:
    """One random Rijndael key and HMAC key, base64, shared by the packets and fwknopd's access.conf."""

    def __init__(self) -> None:
        self.rijndael = base64.b64encode(os.urandom(32)).decode()
        self.hmac = base64.b64encode(os.urandom(64)).decode()


def _build_chunk(server_ip: str, keys: Keys, first: int, count: int, out: Path) -> None:
    """Packets for sources ``first`` to ``first + count - 1``, one ``fwknop`` process each (about 1 ms),
    appended to ``out`` one a line."""
    for i in range(first, first + count):
        subprocess.run(["fwknop", "--no-rc-file", "--no-save-args", "-A", f"tcp/{OPEN_PORT}",
                        "-a", lab.source_text(i), "-D", server_ip, "--use-hmac",
                        "--key-base64-rijndael", keys.rijndael, "--key-base64-hmac", keys.hmac,
                        "-T", "-B", str(out), "-b"],
                       check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def build_packets(server_ip: str, keys: Keys, path: Path, count: int, first: int = 0, workers: int = 2) -> float:
    """``count`` SPA packets, packet i allowing source ``first + i``, in the sender's format; returns the
    seconds it took."""
    t = time.monotonic()
    step = max(1, -(-count // (workers * 4)))
    chunks = [(first + i, min(step, count - i)) for i in range(0, count, step)]
    folder = Path(tempfile.mkdtemp(prefix="fwknop-bench-build-"))
    try:
        parts = [folder / f"{n}.txt" for n in range(len(chunks))]
        with ThreadPoolExecutor(workers) as ex:
            for f in [ex.submit(_build_chunk, server_ip, keys, start, n, part)
                      for (start, n), part in zip(chunks, parts, strict=True)]:
                f.result()
        with path.open("wb") as out:
            total = 0
            for part in parts:
                for line in part.read_bytes().split(b"\n"):
                    line = line.strip()
                    if line:
                        out.write(frame(line))
                        total += 1
        if total != count:
            raise RuntimeError(f"fwknop built {total} packets, {count} wanted")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return time.monotonic() - t


class Fwknopd(lab.ServerProcesses):
    """fwknopd in the foreground in the server namespace, with its own config dir; stopped by pid."""

    def __init__(self, net: TestNet, keys: Keys, timeout: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fwknop-bench-"))
        conf = self.folder / "fwknopd.conf"
        conf.write_text("".join(f"{k} {v};\n" for k, v in {
            "PCAP_INTF": net.server.ifname,
            "ENABLE_PCAP_PROMISC": "N",
            "PCAP_FILTER": f"udp port {SPA_PORT}",
            "FIREWALL_EXE": shutil.which("iptables") or "/usr/sbin/iptables",
            "ENABLE_SPA_PACKET_AGING": "Y",
            "MAX_SPA_PACKET_AGE": "3600",
            "FWKNOP_RUN_DIR": str(self.folder),
            "FWKNOP_CONF_DIR": str(self.folder),
            "DIGEST_FILE": str(self.folder / "digest.cache"),
            "FWKNOP_PID_FILE": str(self.folder / "fwknopd.pid"),
        }.items()))
        access = self.folder / "access.conf"
        access.write_text(f"SOURCE ANY\nKEY_BASE64 {keys.rijndael}\nHMAC_KEY_BASE64 {keys.hmac}\n"
                          f"OPEN_PORTS tcp/{OPEN_PORT}\nFW_ACCESS_TIMEOUT {timeout}\n"
                          f"MAX_FW_TIMEOUT {max(timeout, 600)}\n")
        access.chmod(0o600)
        conf.chmod(0o600)
        self.log = self.folder / "fwknopd.log"
        self._log_file = self.log.open("wb")
        self.process = net.server.popen(
            "fwknopd", "-f", "-c", str(conf), "-a", str(access), "-d", str(self.folder / "digest.cache"),
            "-p", str(self.folder / "fwknopd.pid"), "-r", str(self.folder),
            stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, "LC_ALL": "C"})
        deadline = time.monotonic() + 20
        while "main event loop" not in self.log_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                text = self.log_text()
                self.stop()
                raise RuntimeError(f"fwknopd did not start:\n{text[-3000:]}")
            time.sleep(0.05)
        self.net = net

    def pids(self) -> list[int]:
        return [self.process.pid]  # `ip netns exec` execs fwknopd: same pid (iptables children are brief)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)  # it flushes its chains on exit (one iptables call per chain)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log_file.close()
        self.summary = _log_summary(self.log_text())
        shutil.rmtree(self.folder, ignore_errors=True)


def _log_summary(text: str) -> dict[str, int]:
    """Counts of fwknopd's own log lines (what it accepted, refused, and why)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        low = line.lower()
        for key, needle in (("added_rules", "added access rule"), ("replays", "replay"),
                            ("removed_rules", "removed rule"), ("errors", "error")):
            if needle in low:
                counts[key] = counts.get(key, 0) + 1
    counts["log_lines"] = len(text.splitlines())
    counts["tail"] = text.splitlines()[-3:]  # type: ignore[assignment]
    return counts


class FwknopPhases(Phases):
    knock_port = SPA_PORT
    # fwknopd's measured rate is a few dozen grants/s (and falls as its chain grows): each load phase
    # waits at most 30 s after its last knock is due, so that the whole run stays < 20 min.  A phase cut
    # this way says so (wait_end "limit"); its grants/s covers the first, smaller-chain part, which
    # flatters fwknopd.
    wait_extra = 30.0
    # 1,000 expiry knocks at 25/s, below fwknopd's capacity (at 100/s a third of them were lost)
    expiry_rate = 25.0
    expiry_wait = 40.0

    def __init__(self, net: TestNet, keys: Keys, knocks: Path, flood_knocks: Path) -> None:
        super().__init__(net, None, "fwknopd", knocks, knocks)
        self.keys = keys
        self.flood_knocks = flood_knocks
        self.last: Fwknopd | None = None

    def flood(self, kind: str, seconds: float = 10.0) -> dict[str, Any]:
        # fwknop packets name the address to open (-a): the floods' valid knocks (sent from sources
        # 20,000 + i) and the replayed one (its packet 500) come from a file built for those sources.
        main = self.knocks
        self.knocks = self.flood_knocks
        try:
            return super().flood(kind, seconds)
        finally:
            self.knocks = main

    def server(self, expiry: bool = False, icmp: bool = False) -> Fwknopd:
        if icmp:
            raise ValueError("fwknopd takes SPA packets over UDP only")
        self.last = Fwknopd(self.net, self.keys, EXPIRY_TIMEOUT if expiry else LOAD_TIMEOUT)
        return self.last

    def watch(self, limit: float) -> Watcher:
        return Watcher(self.net, handles=True).start()


def run(net: TestNet, folder: Path, args: argparse.Namespace, started: float, results: dict[str, Any]) -> None:
    """fwknopd's phases into ``results["servers"]["fwknopd-iptables"]``."""
    if not shutil.which("fwknopd") or not shutil.which("fwknop"):
        results["servers"][KEY] = {"error": "fwknop-server / fwknop-client not installed (bench/run.sh installs them)"}
        return
    res: dict[str, Any] = {"phases": {}, "version": _version()}
    results["servers"][KEY] = res
    keys = Keys()
    big = 2000 if args.quick else 20000
    knocks = folder / "fwknop-packets.bin"
    flood_knocks = folder / "fwknop-flood-packets.bin"
    res["build_seconds"] = build_packets(net.server.ipv4, keys, knocks, big)
    build_packets(net.server.ipv4, keys, flood_knocks, 600, first=FLOOD_FIRST)  # the floods' sources
    ph = FwknopPhases(net, keys, knocks, flood_knocks)
    scale = min(big, 10000)
    plan: Plan = [
        ("burst-2000", lambda: ph.run_load(2000, 0, label="burst-2000")),
        # below fwknopd's capacity: its own knock-to-open latency, without queueing
        ("rate-10", lambda: ph.run_load(100, 10, label="rate-10")),
        ("rate-100", lambda: ph.run_load(200 if args.quick else 2000, 100, label="rate-100")),
        ("rate-1000", lambda: ph.run_load(2000, 1000, label="rate-1000")),
        ("expiry", lambda: ph.expiry(200 if args.quick else 1000)),
        ("rate-5000", lambda: ph.run_load(2000, 5000, label="rate-5000")),
        ("burst-20000", lambda: ph.run_load(big, 0, label="burst-20000")),
        ("flood-junk", lambda: ph.flood("junk")),
        ("flood-replay", lambda: ph.flood("replay")),
        ("scale-10000", lambda: ph.run_load(scale, 2500, label="scale-10000", scale=True)),
    ]

    def log_summary(_name: str, result: dict[str, Any]) -> None:
        if ph.last is not None and getattr(ph.last, "summary", None):
            result["fwknopd_log"] = ph.last.summary

    run_plan(KEY, plan, res["phases"], started, args.phases, after=log_summary)
    if "expiry" in res["phases"]:
        res["phases"]["expiry"]["note"] = (
            "fwknopd stamps each rule _exp_<epoch seconds> (time(NULL) + 2) and deletes it at the first check "
            "with time(NULL) >= that: a close can come up to 1 s early, plus its 100 ms loop sleep late")


def _version() -> str:
    r = subprocess.run(["fwknopd", "--version"], capture_output=True, text=True, timeout=10, check=False)
    return re.sub(r"\s+", " ", (r.stdout or r.stderr).strip())[:80]
