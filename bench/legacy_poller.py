"""Counts the rules of legacy iptables' filter table, run inside the server namespace by
:class:`bench.watch.LegacyCounter` (stdlib only, so it starts fast):

    python -m bench.legacy_poller SECONDS

Every 0.5 ms for at most SECONDS it asks x_tables for the filter table's info (``IPT_SO_GET_INFO``, one
getsockopt on a raw socket) and, whenever the rule count changed, writes one record to stdout: the
CLOCK_MONOTONIC time it read it and the new count (struct ``"dI"``, :data:`RECORD`).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import time

RECORD = struct.Struct("dI")  # (monotonic seconds, number of rules)
SO_IPT_GET_INFO = 64  # IPT_SO_GET_INFO, linux/netfilter_ipv4/ip_tables.h
INFO_SIZE = 84  # struct ipt_getinfo
NUM_ENTRIES_OFFSET = 76  # its num_entries
INTERVAL = 0.0005  # seconds between readings


def main() -> int:
    seconds = float(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    buf = ctypes.create_string_buffer(INFO_SIZE)
    buf.raw = b"filter".ljust(INFO_SIZE, b"\0")
    size = ctypes.c_uint(INFO_SIZE)
    out = sys.stdout.buffer
    end = time.monotonic() + seconds
    last = -1
    while time.monotonic() < end:
        size.value = INFO_SIZE
        if libc.getsockopt(sock.fileno(), socket.IPPROTO_IP, SO_IPT_GET_INFO, buf, ctypes.byref(size)) == 0:
            (count,) = struct.unpack_from("I", buf.raw, NUM_ENTRIES_OFFSET)
            if count != last:
                out.write(RECORD.pack(time.monotonic(), count))
                out.flush()
                last = count
        time.sleep(INTERVAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
