"""Knock capture end to end, in two network namespaces joined by a veth pair, with real netfilter.

The capture runs in a subprocess inside the server namespace and prints what it receives as JSON
lines; the client namespace sends with plain sockets (or a packet socket for malformed packets).

Deciding that something was *not* captured never relies on sleeping: a counter on the nftables rule
that drops the packets tells us the kernel has processed them (packet taps run before netfilter, so
the capture socket has already accepted or refused them), and a marker datagram sent afterwards and
seen by the capture tells us the subprocess has read everything queued before it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sknock.protocol import wire
from tests.netns import Host, TestNet, netns_available
from tests.test_packet import ipv4, ipv6, udp

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
PORTS = [[7000, 7010]]
MIN_PAYLOAD = 8

CAPTURE_SCRIPT = r"""
import json, os, pwd, select, sys, time
from sknock.server.capture import open_packet_capture, open_udp_capture
cfg = json.loads(sys.argv[1])
if cfg["kind"] == "packet":
    ports = [tuple(p) for p in cfg["ports"]] if cfg["ports"] is not None else None
    cap = open_packet_capture(interfaces=cfg["interfaces"], ports=ports, min_payload=cfg["min_payload"])
else:
    cap = open_udp_capture(bind=[tuple(b) for b in cfg["bind"]])
if cfg.get("drop_to"):
    user = pwd.getpwnam(cfg["drop_to"])
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
print(json.dumps({"ready": True, "uid": os.getuid(), "euid": os.geteuid()}), flush=True)
deadline = time.monotonic() + 60
fds = cap.filenos() + [0]
while time.monotonic() < deadline:
    readable, _, _ = select.select(fds, [], [], 0.5)
    if 0 in readable and not sys.stdin.readline():
        break
    batch = cap.receive(max_count=cfg.get("max_count", 64))
    copies = cap.take_copies()
    if copies:
        print(json.dumps({"copies": [c.hex() for c in copies]}), flush=True)
    if batch:
        print(json.dumps({"batch": len(batch)}), flush=True)
    for d in batch:
        if cfg.get("remember"):
            cap.remember(d.payload, d.source)  # as the worker does once a datagram passed its cheap checks
        print(json.dumps({"payload": d.payload.hex(), "source": str(d.source), "destination": str(d.destination),
                          "source_port": d.source_port, "dest_port": d.dest_port, "ifindex": d.ifindex}), flush=True)
print(json.dumps({"stats": dict(cap.stats)}), flush=True)
cap.close()
"""

SEND_SCRIPT = r"""
import json, os, socket, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: packets leave in order
for action in json.loads(sys.argv[1]):
    if action["op"] == "raw":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        s.sendto(bytes.fromhex(action["packet"]), (action["ifname"], action["ethertype"], 0, 0,
                                                  bytes.fromhex(action["mac"])))
        s.close()
        print(json.dumps({}), flush=True)
        continue
    family = socket.AF_INET if action["family"] == 4 else socket.AF_INET6
    count = action.get("count", 1)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((action["dst"], action["port"]))
        for _ in range(count):
            s.send(bytes.fromhex(action["payload"]))
        answer = None
        if action.get("listen"):
            s.settimeout(action["listen"])
            try:
                s.recv(2048)
                answer = "data"
            except ConnectionRefusedError:
                answer = "refused"
            except TimeoutError:
                answer = "timeout"
        print(json.dumps({"sport": s.getsockname()[1], "answer": answer}), flush=True)
"""


def shaped(tag: bytes) -> bytes:
    """A payload with a knock's shape (the capture filter drops anything else in the kernel):
    a version-1 header, then ``tag``, zero-padded to the smallest bucket."""
    payload = wire.MAGIC + bytes([wire.VERSION, 1, 0, 0]) + tag
    return payload + bytes(wire.BUCKETS[0] - len(payload))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


class Capture:
    """The capture subprocess in the server namespace."""

    def __init__(self, host: Host, **cfg: Any) -> None:
        self.proc = host.popen(
            sys.executable,
            "-c",
            CAPTURE_SCRIPT,
            json.dumps(cfg),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env(),
        )
        self.lines: list[dict[str, Any]] = []
        self._buffer = b""
        self.ready = self.wait_for(lambda line: "ready" in line)

    def _read(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            return
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            pytest.fail(f"capture process ended early: {err}")
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        self.lines += [json.loads(line) for line in complete if line]

    def wait_for(self, predicate: Any, timeout: float = 20) -> dict[str, Any]:
        end = time.monotonic() + timeout
        for _ in range(10_000):
            for line in self.lines:
                if predicate(line):
                    return line
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self._read(min(remaining, 0.5))
        pytest.fail(f"capture never printed the expected line; got {self.lines}")

    def wait_payload(self, payload: bytes) -> dict[str, Any]:
        return self.wait_for(lambda line: line.get("payload") == payload.hex())

    def datagrams(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "payload" in line]

    def finish(self) -> dict[str, int]:
        """Stop the subprocess and return its stats."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        stats = self.wait_for(lambda line: "stats" in line)
        self.close()
        return dict(stats["stats"])

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by pid
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def send(host: Host, *actions: dict[str, Any]) -> list[dict[str, Any]]:
    result = host.run(sys.executable, "-c", SEND_SCRIPT, json.dumps(list(actions)), timeout=60)
    return [json.loads(line) for line in result.stdout.splitlines()]


def knock(host_to: str, port: int, payload: bytes, **extra: Any) -> dict[str, Any]:
    family = 6 if ":" in host_to else 4
    return {"op": "send", "family": family, "dst": host_to, "port": port, "payload": payload.hex(), **extra}


def nft(host: Host, script: str) -> None:
    subprocess.run(host.cmd("nft", "-f", "-"), input=script, text=True, check=True, capture_output=True, timeout=30)


def counter(host: Host, family_table: str, chain: str) -> int:
    out = host.run("nft", "list", "chain", *family_table.split(), chain).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


def wait_counter(host: Host, family_table: str, chain: str, at_least: int) -> int:
    for _ in range(200):  # bounded: at most 200 polls
        value = counter(host, family_table, chain)
        if value >= at_least:
            return value
        time.sleep(0.05)
    pytest.fail(f"nft counter in {family_table} {chain} stayed below {at_least}")


DROP_INPUT = """
table inet sknocktest {
    chain input {
        type filter hook input priority 0; policy accept;
        meta l4proto udp counter drop
    }
}
"""


def ifindex(host: Host, name: str) -> int:
    return int(json.loads(host.run("ip", "-j", "link", "show", name).stdout)[0]["ifindex"])


def mac(host: Host, name: str) -> str:
    return str(json.loads(host.run("ip", "-j", "link", "show", name).stdout)[0]["address"]).replace(":", "")


@pytest.fixture
def net() -> Iterator[TestNet]:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    if subprocess.run(["nft", "--version"], capture_output=True).returncode != 0:
        pytest.skip("needs the nft command")
    with TestNet.create("skc") as created:
        yield created


def packet_capture(net: TestNet, **cfg: Any) -> Capture:
    cfg = {"kind": "packet", "interfaces": None, "ports": PORTS, "min_payload": MIN_PAYLOAD, **cfg}
    return Capture(net.server, **cfg)


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("interfaces", [None, ["eth0"]])
def test_knocks_captured_although_input_drops_udp(net: TestNet, interfaces: list[str] | None) -> None:
    server, client = net.server, net.client
    cap = packet_capture(net, interfaces=interfaces)
    try:
        # Control: with no firewall the closed port answers with ICMP port unreachable.
        before = send(client, knock(server.ipv4, 7001, shaped(b"control-knock"), listen=5))
        assert before[0]["answer"] == "refused"
        cap.wait_payload(shaped(b"control-knock"))

        nft(server, DROP_INPUT)
        sent = send(
            client,
            knock(server.ipv4, 7001, shaped(b"knock-over-ipv4"), listen=1),
            knock(server.ipv6, 7002, shaped(b"knock-over-ipv6"), listen=1),
        )
        assert [s["answer"] for s in sent] == ["timeout", "timeout"]  # dropped: no ICMP, nothing
        got4 = cap.wait_payload(shaped(b"knock-over-ipv4"))
        got6 = cap.wait_payload(shaped(b"knock-over-ipv6"))
        eth0 = ifindex(server, "eth0")
        assert got4 == {
            "payload": shaped(b"knock-over-ipv4").hex(),
            "source": client.ipv4,
            "destination": server.ipv4,
            "source_port": sent[0]["sport"],
            "dest_port": 7001,
            "ifindex": eth0,
        }
        assert got6 == {
            "payload": shaped(b"knock-over-ipv6").hex(),
            "source": client.ipv6,
            "destination": server.ipv6,
            "source_port": sent[1]["sport"],
            "dest_port": 7002,
            "ifindex": eth0,
        }
        assert counter(server, "inet sknocktest", "input") >= 2  # netfilter really dropped them
        assert cap.finish() == {}
    finally:
        cap.close()


def test_knocks_captured_although_netdev_ingress_drops_udp(net: TestNet) -> None:
    server, client = net.server, net.client
    nft(
        server,
        """
table netdev sknocktest {
    chain ingress {
        type filter hook ingress device "eth0" priority -500; policy accept;
        meta l4proto udp counter drop
    }
}
""",
    )
    cap = packet_capture(net)
    try:
        sent = send(
            client,
            knock(server.ipv4, 7003, shaped(b"knock-past-ingress"), listen=1),
            knock(server.ipv6, 7003, shaped(b"knock-past-ingress6"), listen=1),
        )
        assert [s["answer"] for s in sent] == ["timeout", "timeout"]
        assert cap.wait_payload(shaped(b"knock-past-ingress"))["source"] == client.ipv4
        assert cap.wait_payload(shaped(b"knock-past-ingress6"))["source"] == client.ipv6
        assert counter(server, "netdev sknocktest", "ingress") >= 2
    finally:
        cap.close()


def test_short_or_shapeless_payloads_and_other_ports_filtered_in_kernel(net: TestNet) -> None:
    server, client = net.server, net.client
    nft(server, DROP_INPUT)
    cap = packet_capture(net)
    try:
        unwanted = [
            knock(server.ipv4, 7001, b"short"),  # 5 < MIN_PAYLOAD
            knock(server.ipv6, 7001, b"7 bytes"),
            knock(server.ipv4, 6999, shaped(b"long enough payload")),
            knock(server.ipv6, 7011, shaped(b"long enough payload")),
            knock(server.ipv4, 7001, bytes(wire.BUCKETS[0])),  # a knock's size, not its shape
            knock(server.ipv6, 7001, b"\xff" * wire.BUCKETS[-1]),
        ]
        send(client, *unwanted)
        wait_counter(server, "inet sknocktest", "input", len(unwanted))
        send(client, knock(server.ipv4, 7010, shaped(b"marker-payload")))
        cap.wait_payload(shaped(b"marker-payload"))
        assert [d["payload"] for d in cap.datagrams()] == [shaped(b"marker-payload").hex()]
        # Nothing reached the parser to be refused there: the kernel filtered them.
        assert cap.finish() == {}
    finally:
        cap.close()


def test_own_outgoing_packets_not_captured(net: TestNet) -> None:
    server, client = net.server, net.client
    cap = packet_capture(net, ports=None)
    try:
        send(
            server,
            knock(client.ipv4, 7001, shaped(b"server-outgoing-4")),
            knock(client.ipv6, 7001, shaped(b"server-outgoing-6")),
        )
        send(client, knock(server.ipv4, 7001, shaped(b"marker-payload")))
        cap.wait_payload(shaped(b"marker-payload"))
        payloads = [bytes.fromhex(d["payload"]) for d in cap.datagrams()]
        assert shaped(b"server-outgoing-4") not in payloads and shaped(b"server-outgoing-6") not in payloads
    finally:
        cap.close()


def test_interfaces_limit_capture(net: TestNet) -> None:
    server, client = net.server, net.client
    nft(server, DROP_INPUT)
    cap = packet_capture(net, interfaces=["lo"])
    try:
        send(client, knock(server.ipv4, 7001, shaped(b"knock-via-eth0")))
        wait_counter(server, "inet sknocktest", "input", 1)  # the taps have seen it by now
        send(server, knock("127.0.0.1", 7001, shaped(b"marker-via-lo")))
        got = cap.wait_payload(shaped(b"marker-via-lo"))
        assert got["ifindex"] == ifindex(server, "lo")
        assert [bytes.fromhex(d["payload"]) for d in cap.datagrams()] == [shaped(b"marker-via-lo")]
    finally:
        cap.close()


def test_capture_keeps_working_after_dropping_privileges(net: TestNet) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to drop to")
    server, client = net.server, net.client
    nft(server, DROP_INPUT)
    cap = packet_capture(net, drop_to="nobody")
    try:
        assert cap.ready["uid"] == cap.ready["euid"] == nobody.pw_uid
        send(
            client,
            knock(server.ipv4, 7005, shaped(b"knock-after-setuid")),
            knock(server.ipv6, 7005, shaped(b"knock-after-setuid6")),
        )
        assert cap.wait_payload(shaped(b"knock-after-setuid"))["source"] == client.ipv4
        assert cap.wait_payload(shaped(b"knock-after-setuid6"))["source"] == client.ipv6
    finally:
        cap.close()


def test_malformed_packets_counted_not_raised(net: TestNet) -> None:
    server, client = net.server, net.client
    cap = packet_capture(net)
    try:
        server_mac = mac(server, "eth0")
        bad_checksum = ipv4(udp(shaped(b"bad header checksum"), 1, 7001), client.ipv4, server.ipv4, good_checksum=False)
        hop_not_first = ipv6(
            udp(shaped(b"hop-by-hop second"), 1, 7001), client.ipv6, server.ipv6, extensions=[(60, b""), (0, b"")]
        )
        send(
            client,
            {"op": "raw", "ifname": "eth0", "ethertype": 0x0800, "mac": server_mac, "packet": bad_checksum.hex()},
            {"op": "raw", "ifname": "eth0", "ethertype": 0x86DD, "mac": server_mac, "packet": hop_not_first.hex()},
            knock(server.ipv4, 7001, shaped(b"marker-payload")),
        )
        cap.wait_payload(shaped(b"marker-payload"))
        assert len(cap.datagrams()) == 1
        assert cap.finish() == {"ipv4-checksum": 1, "ext-header": 1}
    finally:
        cap.close()


@pytest.mark.parametrize("kind", ["packet", "udp"])
def test_exact_copies_of_a_remembered_payload_are_dropped_and_counted(net: TestNet, kind: str) -> None:
    """Once the worker remembers a payload from a source, exact copies from that source stop at the
    capture, over IPv4 and IPv6, while other payloads still come through.  A copy from another source
    goes on once (the verifier decides it without a public-key operation: a copy sent first from
    elsewhere must not stop the genuine sender's knock here), and is remembered with its source."""
    server, client = net.server, net.client
    if kind == "packet":
        nft(server, DROP_INPUT)  # no port-unreachable answers to break the sender's connected socket
        cap = packet_capture(net, remember=True)
    else:
        cap = Capture(server, kind="udp", bind=[["0.0.0.0", 7001], ["::", 7001]], remember=True)
    try:
        send(client, knock(server.ipv4, 7001, shaped(b"the-knock")))
        cap.wait_payload(shaped(b"the-knock"))
        send(client, knock(server.ipv4, 7001, shaped(b"the-knock"), count=4),
             knock(server.ipv6, 7001, shaped(b"the-knock")))
        # Once that copy from the new source is remembered, its own copies stop too.
        cap.wait_for(lambda line: line.get("payload") == shaped(b"the-knock").hex() and line["source"] == client.ipv6)
        send(client, knock(server.ipv6, 7001, shaped(b"the-knock"), count=2))
        send(client, knock(server.ipv4, 7001, shaped(b"another-knock")))
        cap.wait_payload(shaped(b"another-knock"))
        payloads = [(bytes.fromhex(d["payload"]), d["source"]) for d in cap.datagrams()]
        assert payloads == [(shaped(b"the-knock"), client.ipv4), (shaped(b"the-knock"), client.ipv6),
                            (shaped(b"another-knock"), client.ipv4)]
        copies = [bytes.fromhex(c) for line in cap.lines for c in line.get("copies", [])]
        assert sorted(copies) == sorted([ipaddress.ip_address(client.ipv4).packed] * 4
                                        + [ipaddress.ip_address(client.ipv6).packed] * 2)
        assert cap.finish() == {"duplicate": 6}
    finally:
        cap.close()


def test_burst_drained_in_bounded_batches(net: TestNet) -> None:
    server, client = net.server, net.client
    nft(server, DROP_INPUT)
    cap = packet_capture(net, max_count=16)
    try:
        send(client, knock(server.ipv4, 7001, shaped(b"burst-payload"), count=300))
        wait_counter(server, "inet sknocktest", "input", 300)
        send(client, knock(server.ipv4, 7001, shaped(b"marker-payload")))
        cap.wait_payload(shaped(b"marker-payload"))
        assert sum(1 for d in cap.datagrams() if d["payload"] == shaped(b"burst-payload").hex()) == 300
        assert max(line["batch"] for line in cap.lines if "batch" in line) <= 16
    finally:
        cap.close()


def test_udp_capture_fallback(net: TestNet) -> None:
    server, client = net.server, net.client
    cap = Capture(server, kind="udp", bind=[[server.ipv4, 7100], [server.ipv6, 7100]])
    try:
        sent = send(client, knock(server.ipv4, 7100, b"udp-knock-4"), knock(server.ipv6, 7100, b"udp-knock-6"))
        eth0 = ifindex(server, "eth0")
        assert cap.wait_payload(b"udp-knock-4") == {
            "payload": b"udp-knock-4".hex(),
            "source": client.ipv4,
            "destination": server.ipv4,
            "source_port": sent[0]["sport"],
            "dest_port": 7100,
            "ifindex": eth0,
        }
        assert cap.wait_payload(b"udp-knock-6") == {
            "payload": b"udp-knock-6".hex(),
            "source": client.ipv6,
            "destination": server.ipv6,
            "source_port": sent[1]["sport"],
            "dest_port": 7100,
            "ifindex": eth0,
        }
        assert cap.finish() == {}
    finally:
        cap.close()


def test_interface_down_is_counted_and_capture_resumes(net: TestNet) -> None:
    server, client = net.server, net.client
    cap = packet_capture(net, interfaces=["eth0"])
    try:
        # The kernel reports ENETDOWN once on a packet socket bound to an interface going down.
        server.run("ip", "link", "set", "eth0", "down")
        server.run("ip", "link", "set", "eth0", "up")
        send(client, knock(server.ipv4, 7001, shaped(b"knock-after-link-flap")))
        assert cap.wait_payload(shaped(b"knock-after-link-flap"))["source"] == client.ipv4
        assert cap.finish() == {"socket-error": 1, "socket-error-ENETDOWN": 1}
    finally:
        cap.close()


def test_a_final_outcome_drops_copies_from_every_source() -> None:
    """Copies are dropped per source until the worker says the knock's outcome is final (granted, or
    refused for good); from then on, copies from any source stop at the capture."""
    from sknock.server.capture import UdpCapture

    receiver = UdpCapture([])
    payload = b"k" * 1024
    a, b = ipaddress.ip_address("198.18.0.2"), ipaddress.ip_address("198.18.0.3")
    receiver.remember(payload, a)
    assert receiver._is_copy(payload, a.packed) and not receiver._is_copy(payload, b.packed)
    receiver.remember_everywhere(payload)
    assert receiver._is_copy(payload, b.packed) and receiver._is_copy(payload, bytes(16))
    assert not receiver._is_copy(b"other" * 200, b.packed)
    assert receiver.stats["duplicate"] == 3
