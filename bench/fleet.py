"""The shared replay store's cost: sknock (nftables) with ``replayStore = redis://`` in the same run as
the local store, so that the two columns compare on one machine at one time.

Redis (Debian's ``redis-server``, started by :class:`tests.redis_harness.RedisServer`) runs in the server
namespace on its loopback: the round trip is the smallest a fleet can have, so the figures show what the
store costs the monitor itself (one pipelined round trip per batch), not a network's latency.  Its CPU time
is not counted in the server's.  Before each phase the store is emptied (knocks are reused across phases)
and its memory marked as begun long ago (a store up for a while, not one that just restarted empty).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import lab
from bench.phases import BURST_REPEATS, Phases, Plan, run_plan
from sknock.server.replaystore import SINCE_KEY
from tests.netns import TestNet
from tests.redis_harness import RedisServer

KEY = "sknock-nftables-redis"


class RedisPhases(Phases):
    """sknock's phases with nftables, its servers sharing ``redis`` as their replay store."""

    def __init__(self, net: TestNet, pki: lab.Pki, knocks: Path, expiry_knocks: Path, redis: RedisServer) -> None:
        super().__init__(net, pki, "nftables", knocks, expiry_knocks, {"replayStore": redis.url})
        self.redis = redis

    def server(self, expiry: bool = False, icmp: bool = False) -> lab.ServerProcesses:
        """A fresh server whose replay store (``replayStore`` in its options) is the emptied Redis."""
        self.redis.command("FLUSHDB")
        self.redis.command("SET", SINCE_KEY.decode(), repr(time.time() - 3600))
        return super().server(expiry, icmp)


def redis_plan(ph: Phases, *, quick: bool) -> Plan:
    """The load phases whose grants/s and latency the store could change."""
    big = 2000 if quick else 20000
    return [
        ("burst-2000", lambda: ph.run_load(2000, 0, label="burst-2000")),
        ("rate-1000", lambda: ph.run_load(2000, 1000, label="rate-1000")),
        ("rate-5000", lambda: ph.run_load(2000, 5000, label="rate-5000")),
        ("burst-20000", lambda: ph.repeated(BURST_REPEATS, lambda: ph.run_load(big, 0, label="burst-20000"))),
    ]


def run(pki: lab.Pki, net: TestNet, folder: Path, args: argparse.Namespace, started: float,
        results: dict[str, Any]) -> None:
    """The phases into ``results["servers"][KEY]``, with one redis-server for all of them."""
    res: dict[str, Any] = {"phases": {}, "replay_store": "redis-server on the server's loopback"}
    results["servers"][KEY] = res
    knocks, expiry = folder / "knocks-redis.bin", folder / "expiry-redis.bin"
    stamp = time.time() + 290  # as run_sknock: valid ~10 min with the servers' 300 s window
    res["build_seconds"] = lab.build_knocks(pki, knocks, 2000 if args.quick else 20000, stamp, None)
    lab.build_knocks(pki, expiry, 1000, stamp, 2)
    with RedisServer.start("127.0.0.1", netns=net.server) as redis:
        res["redis_version"] = redis.command("INFO", "server").split("redis_version:")[1].split()[0]

        def keys(name: str, result: dict[str, Any]) -> None:
            # the knocks the last server of the phase claimed in Redis (and `since`): proof the store was used
            result["redis_keys"] = int(redis.command("DBSIZE"))

        run_plan(KEY, redis_plan(RedisPhases(net, pki, knocks, expiry, redis), quick=args.quick), res["phases"],
                 started, args.phases, after=keys)
