"""Two real knock servers, each in its own namespace with the real kernel firewall, sharing one real Redis
(docs/fleet.md): a knock granted by one and replayed to the other within its window is refused; with Redis
stopped mid-run the documented behaviour holds (replayStoreFallback = refuse: knocks are refused, and
``status`` says the store is down); with Redis back (empty: after about one timestamp window in which
it cannot vouch for any knock), sharing resumes.  With replayStoreFallback = local, a server grants on its
own memory while Redis is down, and the documented cost shows: the same knock replayed to the other server
is granted there too.

Topology: two TestNets (server and client namespaces each), and one more veth link between the two
server namespaces, 198.19.N.1 and 198.19.N.2, on which redis-server runs in the first server's namespace
(its port is not among the protected ones: the admin lets the fleet reach its store)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sknock.server.replaystore import SINCE_KEY
from tests.netns import TestNet, require_netns, run
from tests.pki import TestPKI
from tests.redis_harness import RedisServer, require_redis
from tests.server_harness import (
    METRICS,
    RunningServer,
    client_script,
    run_in_client,
    scrape_metrics,
    wait_for_metrics,
)

pytestmark = pytest.mark.root
PORT = 2001  # in the test PKI alice's certificate names tcp/2000-2010
UNCONFIRMED = 'sknock_knocks_refused_total{reason="replay-unconfirmed"}'
_links = itertools.count()


@dataclass
class Fleet:
    nets: tuple[TestNet, TestNet]
    servers: tuple[RunningServer, RunningServer]
    redis: RedisServer


def link_servers(first: TestNet, second: TestNet) -> tuple[str, str]:
    """A veth link between the two server namespaces (removed with them); their addresses on it."""
    n = next(_links)
    subnet = (os.getpid() + n) % 250 + 1
    tag = f"{os.getpid() % 100000}x{n}"
    a, b = f"skfa{tag}"[:15], f"skfb{tag}"[:15]
    run("ip", "link", "add", a, "netns", first.server.ns, "type", "veth", "peer", "name", b, "netns", second.server.ns)
    addresses = (f"198.19.{subnet}.1", f"198.19.{subnet}.2")
    for net, name, address in ((first, a, addresses[0]), (second, b, addresses[1])):
        net.server.run("ip", "addr", "add", f"{address}/24", "dev", name)
        net.server.run("ip", "link", "set", name, "up")
    return addresses


@pytest.fixture
def fleet(pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    fallback = getattr(request, "param", "refuse")
    require_netns()
    require_redis()
    with TestNet.create("skf") as first, TestNet.create("skg") as second:
        store_address, _ = link_servers(first, second)
        with RedisServer.start(store_address, netns=first.server) as redis:
            # a store up for a while: its memory began long before the first knock (after a restart the test
            # shows the blackout of a store that starts empty)
            redis.command("SET", SINCE_KEY.decode(), repr(time.time() - 100))
            options = {"replayStore": redis.url, "protectedPorts": f"tcp/{PORT}", "emergencySSH": "no",
                       "PORT_OPEN_DURATION_IN_SECONDS": "30", "workers": "1", "replayStoreFallback": fallback,
                       "metricsListen": METRICS}  # each on its own namespace's loopback
            with RunningServer.start(first, pki, **options) as one, RunningServer.start(second, pki, **options) as two:
                one.serve_tcp(PORT)
                two.serve_tcp(PORT)
                yield Fleet((first, second), (one, two), redis)


def build(pki: TestPKI, net: TestNet) -> bytes:
    """A fresh knock for tcp/PORT, built in ``net``'s client namespace."""
    body = f"print(c.build_knock([(Protocol.TCP, {PORT})], now=time.time()).hex())\n"
    result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
    assert result.returncode == 0, result.stderr
    return bytes.fromhex(result.stdout.strip().splitlines()[-1])


def send(net: TestNet, datagram: bytes) -> None:
    """``datagram`` as one UDP packet from ``net``'s client to its server (any port: the capture sees it)."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.sendto(bytes.fromhex({datagram.hex()!r}), ({net.server.ipv4!r}, 40000))\n"
    )
    assert run_in_client(net, code).returncode == 0


def test_a_fleet_refuses_a_knock_another_server_granted_and_fails_closed_while_redis_is_down(
    fleet: Fleet, pki: TestPKI
) -> None:
    (net1, net2), (one, two), redis = fleet.nets, fleet.servers, fleet.redis
    assert not one.reachable(PORT) and not two.reachable(PORT)

    # 1. granted by the first server; the same datagram replayed to the second within its window: refused
    knock = build(pki, net1)
    send(net1, knock)
    one.wait_log(f"granted tcp/{PORT}")
    assert one.reachable(PORT)
    mark = two.mark()
    send(net2, knock)
    two.wait_log("replay (its nonce was granted by another server of the fleet)", since=mark)
    assert not two.reachable(PORT)
    assert f"granted tcp/{PORT}" not in two.log_text()
    assert redis.command("DBSIZE") == "2"  # one knock, one key (a hash: no address or subject in it), and `since`
    assert "198.18." not in redis.command("KEYS", "*")

    # 2. redis killed mid-run: the documented default (refuse) holds on both, status says so, and the
    # refusal is counted by its reason
    assert scrape_metrics(net2)[UNCONFIRMED] == 0.0
    redis.stop()
    mark = two.mark()
    send(net2, build(pki, net2))
    two.wait_log("every knock is refused until it answers", since=mark)
    two.wait_log(f"refused knock from {net2.client.ipv4}: replay-unconfirmed (the shared replay store", since=mark)
    assert not two.reachable(PORT)
    status = two.status()["replay_store"]
    assert status["state"] == "down" and status["refused_unconfirmed"] == 1
    wait_for_metrics(net2, {UNCONFIRMED: 1.0, "sknock_knocks_granted_total": 0.0})
    assert "DOWN for" in two.status_cli() and "refusing knocks" in two.status_cli()

    # 3. redis back (empty, as after a crash): sharing resumes; the replay memory is shared again
    redis.start_again()  # its memory begins anew: for about one window, knocks are still unconfirmed
    deadline = time.monotonic() + 30
    while True:
        mark = two.mark()
        knock = build(pki, net2)
        send(net2, knock)
        time.sleep(0.5)
        if f"granted tcp/{PORT}" in two.log_text()[mark:]:
            break
        assert time.monotonic() < deadline, two.log_text()[-3000:]
    assert "answers again" in two.log_text()
    assert two.reachable(PORT)
    mark = one.mark()
    send(net1, knock)  # the second's knock, replayed to the first
    one.wait_log("replay (its nonce was granted by another server of the fleet)", since=mark)
    assert two.status()["replay_store"]["state"] == "ok"
    assert "replay store redis://" in one.status_cli()


@pytest.mark.parametrize("fleet", ["local"], indirect=True)
def test_with_the_local_fallback_a_server_grants_on_its_own_memory_while_redis_is_down(
    fleet: Fleet, pki: TestPKI
) -> None:
    (net1, net2), (one, two), redis = fleet.nets, fleet.servers, fleet.redis
    redis.stop()
    knock = build(pki, net2)
    mark = two.mark()
    send(net2, knock)
    two.wait_log(f"granted tcp/{PORT}", since=mark)
    assert "replayStoreFallback = local" in two.log_text()[mark:]  # the ERROR line says what that costs
    assert two.reachable(PORT)
    assert two.status()["replay_store"]["granted_unconfirmed"] == 1
    wait_for_metrics(net2, {"sknock_knocks_granted_total": 1.0, UNCONFIRMED: 0.0})  # granted: no refusal
    mark = two.mark()
    send(net2, knock)  # its own memory still refuses a replay to the same server
    two.wait_log("refused knock from", since=mark)
    assert two.log_text()[mark:].count(f"granted tcp/{PORT}") == 0
    # the documented cost of `local`: the same knock replayed to the other server is granted there too
    send(net1, knock)
    one.wait_log(f"granted tcp/{PORT}")
