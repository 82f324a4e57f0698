"""The load generator, run inside the client namespace (stdlib only, so it starts fast).

    python -m bench.sender --server 198.18.7.1 --knocks FILE --out TIMES [--rate R] [--first N]
    python -m bench.sender --server 198.18.7.1 --junk SIZE --seconds S --out STATS   (flood)
    python -m bench.sender --server 198.18.7.1 --replay FILE --seconds S --out STATS (flood of replays)
    python -m bench.sender --server 198.18.7.1 --probe N --out /dev/null              (per-packet cost)
    ... --icmp: knocks and floods carried as the data of ICMP echo requests (the ICMP carrier)

Knocks: FILE holds datagrams built beforehand, each framed by :func:`frame` (the one definition of the
knock file format, used by every writer and reader of these files); datagram i is sent from its own source
address (198.19.0.0 + 256 + N + i; the client namespace has ``local 198.19.0.0/16 dev lo``), chosen
per packet with IP_PKTINFO on one socket, to UDP port 40000 + i % 1000 of the server (or
``--dest-port``).  ``--rate 0`` sends as fast as possible, otherwise each datagram is due at
t0 + i / rate.  The monotonic send time of each datagram is written to TIMES (array of doubles),
after a one-line JSON summary on stdout.

Flood: the same datagram size (random bytes, or one captured knock replayed) from rotating sources,
as fast as one process can, for a bounded time and count.

``--icmp``: each datagram goes as the data of an ICMP echo request (:func:`sknock.carrier.echo_request`,
built before the timed part) through a raw socket, its source chosen with IP_PKTINFO as for UDP.  The
only import from sknock is that small module (no cryptography), so the sender still starts fast.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ipaddress
import json
import os
import socket
import struct
import sys
import time

from sknock.carrier import echo_request

IP_PKTINFO = 8
SOURCE_NET = int(ipaddress.IPv4Address("198.19.0.0"))
MAX_FLOOD_PACKETS = 20_000_000


def source_bytes(index: int) -> bytes:
    return (SOURCE_NET + 256 + index).to_bytes(4, "big")


def source_text(index: int) -> str:
    return str(ipaddress.IPv4Address(SOURCE_NET + 256 + index))


def frame(datagram: bytes) -> bytes:
    """One datagram as it is stored in a knock file: its length (2 bytes, big-endian), then itself."""
    return struct.pack("!H", len(datagram)) + datagram


def read_knocks(path: str | os.PathLike[str], limit: int | None = None) -> list[bytes]:
    """The datagrams of a knock file (the first ``limit`` of them, if given)."""
    with open(path, "rb") as f:
        data = f.read()
    out: list[bytes] = []
    pos = 0
    while pos < len(data) and (limit is None or len(out) < limit):
        (n,) = struct.unpack_from("!H", data, pos)
        out.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out


def make_socket(icmp: bool = False) -> socket.socket:
    """A UDP socket, or with ``icmp`` a raw ICMP socket (root), with a large send buffer."""
    if icmp:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return s


def carried(datagram: bytes, index: int, icmp: bool) -> bytes:
    """What is sent for ``datagram``: itself over UDP, or an echo request carrying it."""
    return echo_request(datagram, version=4, identifier=index, sequence=index >> 16) if icmp else datagram


def send_one(s: socket.socket, payload: bytes, src: bytes, server: str, port: int) -> bool:
    info = struct.pack("=I4s4s", 0, src, b"\0\0\0\0")
    for _ in range(1000):  # bounded retry when the local queue is momentarily full
        try:
            s.sendmsg([payload], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, (server, port))
            return True
        except BlockingIOError:
            time.sleep(0.0001)
        except OSError as exc:
            if exc.errno != 105:  # ENOBUFS
                raise
            time.sleep(0.0001)
    return False


def knocks(args: argparse.Namespace) -> dict[str, object]:
    datagrams = read_knocks(args.knocks)
    if args.count:
        datagrams = datagrams[: args.count]
    datagrams = [carried(d, i, args.icmp) for i, d in enumerate(datagrams)]
    s = make_socket(args.icmp)
    times = array.array("d", bytes(8 * len(datagrams)))
    failed = 0
    t0 = time.monotonic() + 0.05
    rate = args.rate
    for i, payload in enumerate(datagrams):
        if rate > 0:
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0.002:
                time.sleep(delay - 0.001)
            while time.monotonic() < due:
                pass
        times[i] = time.monotonic()
        port = args.dest_port or 40000 + i % 1000
        if not send_one(s, payload, source_bytes(args.first + i), args.server, port):
            failed += 1
    with open(args.out, "wb") as f:
        times.tofile(f)
    return {"sent": len(datagrams) - failed, "failed": failed, "first": times[0] if datagrams else 0,
            "last": times[-1] if datagrams else 0}


def flood(args: argparse.Namespace) -> dict[str, object]:
    payload = carried(read_knocks(args.replay)[0] if args.replay else os.urandom(args.junk), 1, args.icmp)
    s = make_socket(args.icmp)
    s.setblocking(False)
    sent = dropped = 0
    start = time.monotonic()
    end = start + args.seconds
    i = 0
    while i < MAX_FLOOD_PACKETS:
        if i % 256 == 0 and time.monotonic() >= end:
            break
        info = struct.pack("=I4s4s", 0, source_bytes(30000 + (i & 0x7FFF)), b"\0\0\0\0")
        try:
            port = args.dest_port or 41000 + (i & 0x3FF)
            s.sendmsg([payload], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, (args.server, port))
            sent += 1
        except (BlockingIOError, OSError):
            dropped += 1
        i += 1
    elapsed = time.monotonic() - start
    return {"sent": sent, "local_drops": dropped, "seconds": elapsed, "rate": sent / elapsed if elapsed else 0}


def probe(args: argparse.Namespace) -> dict[str, object]:
    """Per-packet cost: ``--probe N`` UDP packets from this host's own (never granted) address to a
    protected port, which the server's firewall evaluates in full and drops.  veth delivers in the
    sender's context, so the sender's time per packet includes the server's filter work."""
    payload = b"x" * 64
    s = make_socket()
    best_wall = best_cpu = float("inf")
    for _ in range(args.repeat):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(args.probe):
            with contextlib.suppress(OSError):
                s.sendto(payload, (args.server, args.port))
        best_wall = min(best_wall, (time.perf_counter() - w) / args.probe)
        best_cpu = min(best_cpu, (time.process_time() - c) / args.probe)
    return {"packets": args.probe, "repeat": args.repeat, "wall_ns": best_wall * 1e9, "cpu_ns": best_cpu * 1e9}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--knocks")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--first", type=int, default=0, help="index of the first source address")
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--out", required=True)
    p.add_argument("--junk", type=int, default=0)
    p.add_argument("--replay")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--probe", type=int, default=0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--port", type=int, default=9999, help="the probe's destination port")
    p.add_argument("--icmp", action="store_true", help="carry knocks and floods in ICMP echo requests")
    p.add_argument("--dest-port", type=int, default=0,
                   help="one destination port for knocks and floods (fwknopd's 62201); 0: rotating ports")
    args = p.parse_args()
    result = probe(args) if args.probe else knocks(args) if args.knocks else flood(args)
    if not args.knocks:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
