"""The capture filter, run by the real kernel: crafted packets are injected on the loopback device of
a private network namespace and we look at which ones a packet socket carrying the filter receives.

How "not received" is decided without timing: a second packet socket with no filter (the witness)
sees every packet.  After the packet under test we send a marker; the device layer offers each
packet to all packet sockets in turn before the next packet, and the sending thread is pinned to one
CPU so that both packets go through the same backlog queue in order.  Once the witness holds the
marker, the filtered socket has already accepted or dropped the packet under test.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sknock.errors import ConfigError, KnockRefused
from sknock.protocol import wire
from sknock.server.bpf import MAX_PORT_RANGES, Instruction, build_filter, pack
from sknock.server.packet import MAX_EXTENSION_HEADERS
from tests.netns import TestNet, netns_available
from tests.test_packet import ipv4, ipv6, udp

T = TypeVar("T")
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0003, 0x0800, 0x86DD, 0x0806
SO_ATTACH_FILTER = 26
CLONE_NEWNET = 0x40000000
MARK_PORT = 9
#: A real knock (docs/protocol.md's test vector): 1024 bytes, suite 1.
REAL_KNOCK = bytes.fromhex(json.loads((Path(__file__).parent / "vectors" / "knock-v1.json").read_text())["datagram"])


def in_netns(ns: str, make: Callable[[], T]) -> T:
    """Run ``make`` in a thread that has entered ``ns``: sockets it creates belong to that namespace
    for life, while this process stays where it is (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as error:  # handed to the caller
            errors.append(error)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=30)
    if errors:
        raise errors[0]
    assert result, "namespace thread did not finish"
    return result[0]


def attach(sock: socket.socket, program: tuple[Instruction, ...]) -> None:
    code = ctypes.create_string_buffer(pack(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("@HP", len(program), ctypes.addressof(code)))


class Kernel:
    """A filtered packet socket, a witness and a sender on ``lo`` of one namespace."""

    def __init__(self, ns: str) -> None:
        def make() -> tuple[socket.socket, socket.socket, socket.socket]:
            filtered = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            attach(filtered, (Instruction(0x06, 0, 0, 0),))  # nothing until a test attaches its program
            filtered.bind(("lo", ETH_P_ALL))
            witness = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            witness.bind(("lo", ETH_P_ALL))
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            return filtered, witness, sender

        self.filtered, self.witness, self.sender = in_netns(ns, make)
        for sock in (self.filtered, self.witness):
            sock.setblocking(False)
        self.serial = 0

    def close(self) -> None:
        for sock in (self.filtered, self.witness, self.sender):
            sock.close()

    def _send(self, packet: bytes, ethertype: int) -> None:
        self.sender.sendto(packet, ("lo", ethertype, 0, 0, b"\0" * 6))

    @staticmethod
    def _drain(sock: socket.socket) -> list[tuple[bytes, int]]:
        out = []
        for _ in range(10_000):
            try:
                data, address = sock.recvfrom(70_000)
            except BlockingIOError:
                break
            out.append((data, address[2]))
        return out

    def passes(self, program: tuple[Instruction, ...], packet: bytes, ethertype: int | None = None) -> bool:
        """Whether the kernel, running ``program``, delivers ``packet`` (received as PACKET_HOST)."""
        if ethertype is None:
            ethertype = ETH_P_IPV6 if packet and packet[0] >> 4 == 6 else ETH_P_IP
        attach(self.filtered, program)
        self._drain(self.filtered)
        self._drain(self.witness)
        self.serial += 1
        marker = ipv4(udp(b"marker %d" % self.serial, 1, MARK_PORT), "127.0.0.1", "127.0.0.1")
        self._send(packet, ethertype)
        self._send(marker, ETH_P_IP)
        seen: list[tuple[bytes, int]] = []
        for _ in range(100):  # bounded: each wait is at most 0.1 s
            if any(data == marker for data, _ in seen):
                break
            select.select([self.witness], [], [], 0.1)
            seen += self._drain(self.witness)
        else:
            pytest.fail("the marker never reached the witness socket")
        assert any(data == packet and kind == socket.PACKET_HOST for data, kind in seen), "injection failed"
        got = [(data, kind) for data, kind in self._drain(self.filtered) if data != marker]
        assert all(data == packet for data, _ in got), f"unexpected packets passed: {got!r}"
        return bool(got)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})  # one CPU, one backlog queue: packets stay in order
    net = TestNet.create("skb")
    k: Kernel | None = None
    try:
        k = Kernel(net.server.ns)
        yield k
    finally:
        if k is not None:
            k.close()
        net.close()
        os.sched_setaffinity(0, affinity)


def v4(payload: bytes, dport: int, **kw: object) -> bytes:
    return ipv4(udp(payload, 40000, dport), "127.0.0.1", "127.0.0.1", **kw)  # type: ignore[arg-type]


def v6(payload: bytes, dport: int, **kw: object) -> bytes:
    return ipv6(udp(payload, 40000, dport), "::1", "::1", **kw)  # type: ignore[arg-type]


# -- pure checks ----------------------------------------------------------------------------------


def test_program_shape() -> None:
    program = build_filter(min_payload=10, ports=[(22, 22), (8000, 8010)])
    assert all(0 <= i.jt <= 255 and 0 <= i.jf <= 255 and 0 <= i.k < 2**32 for i in program)
    assert len(pack(program)) == 8 * len(program)
    assert program[-1] == Instruction(0x06, 0, 0, 0)  # falls off into a drop, never into accept


def test_bad_arguments_refused() -> None:
    with pytest.raises(ConfigError):
        build_filter(min_payload=-1, ports=None)
    with pytest.raises(ConfigError):
        build_filter(min_payload=0, ports=[(10, 9)])
    with pytest.raises(ConfigError):
        build_filter(min_payload=0, ports=[(1, 65536)])
    with pytest.raises(ConfigError):
        build_filter(min_payload=0, ports=[])
    with pytest.raises(ConfigError):
        build_filter(min_payload=0, ports=[(p * 2, p * 2) for p in range(MAX_PORT_RANGES + 1)])
    # As many ranges as allowed still fit (short conditional jumps, under BPF_MAXINSNS).
    assert build_filter(min_payload=0, ports=[(p * 3, p * 3 + 1) for p in range(MAX_PORT_RANGES)])


# -- in the kernel --------------------------------------------------------------------------------


def test_ipv4_decisions(kernel: Kernel) -> None:
    program = build_filter(min_payload=5, ports=[(8000, 8010), (22, 22)], knock_shape=False)
    assert kernel.passes(program, v4(b"knock", 22))
    assert kernel.passes(program, v4(b"knock", 8000))
    assert kernel.passes(program, v4(b"knock", 8010))
    assert kernel.passes(program, v4(b"knock!" * 100, 8005))
    assert not kernel.passes(program, v4(b"knock", 23))
    assert not kernel.passes(program, v4(b"knock", 7999))
    assert not kernel.passes(program, v4(b"knock", 8011))
    assert not kernel.passes(program, v4(b"knoc", 22))  # payload below min_payload
    assert kernel.passes(program, v4(b"knock", 22, options=b"\x01\x01\x01\x00"))  # IHL 6
    assert kernel.passes(program, v4(b"knock", 22, options=b"\x01" * 40))  # IHL 15
    assert not kernel.passes(program, v4(b"knock", 22, frag=0x2000))  # MF
    assert not kernel.passes(program, v4(b"knock", 22, frag=0x0010))  # offset
    assert kernel.passes(program, v4(b"knock", 22, frag=0x4000))  # DF only
    assert not kernel.passes(program, v4(b"knock", 22, proto=6))
    assert not kernel.passes(program, v4(b"knock", 22, ihl=4))
    # A UDP length claiming more than is present.
    assert not kernel.passes(program, ipv4(udp(b"knock", 1, 22, length=200), "127.0.0.1", "127.0.0.1"))


def test_ipv6_decisions(kernel: Kernel) -> None:
    program = build_filter(min_payload=5, ports=[(22, 22)], knock_shape=False)
    assert kernel.passes(program, v6(b"knock", 22))
    assert not kernel.passes(program, v6(b"knock", 23))
    assert not kernel.passes(program, v6(b"kno", 22))
    walked = [(0, b""), (43, b"\0\0" + b"\0" * 20), (60, b"\x01\x02\0\0")]
    assert kernel.passes(program, v6(b"knock", 22, extensions=walked))
    assert not kernel.passes(program, v6(b"knock", 23, extensions=walked))
    assert kernel.passes(program, v6(b"knock", 22, extensions=[(60, b"")] * MAX_EXTENSION_HEADERS))
    assert not kernel.passes(program, v6(b"knock", 22, extensions=[(60, b"")] * (MAX_EXTENSION_HEADERS + 1)))
    assert not kernel.passes(program, v6(b"knock", 22, extensions=[(44, b"\0" * 6)]))  # fragment
    assert not kernel.passes(program, v6(b"knock", 22, extensions=[(51, b"\0" * 6)]))  # AH
    assert not kernel.passes(program, v6(b"knock", 22, last=58))


def test_link_level_decisions(kernel: Kernel) -> None:
    program = build_filter(min_payload=0, ports=None, max_packet=600, knock_shape=False)
    assert kernel.passes(program, v4(b"x" * 572, 1))  # 600 bytes from the IP header
    assert not kernel.passes(program, v4(b"x" * 573, 1))  # dropped, not truncated
    assert not kernel.passes(program, v4(b"knock", 1), ETH_P_ARP)
    assert not kernel.passes(program, v4(b"knock", 1), ETH_P_IPV6)  # version disagrees with ethertype
    assert not kernel.passes(program, v6(b"knock", 1), ETH_P_IP)


def test_own_outgoing_packets_not_passed(kernel: Kernel) -> None:
    # passes() checks that only PACKET_HOST copies arrive; the sender's PACKET_OUTGOING copy of
    # the same bytes reached the witness but must not reach the filtered socket.
    program = build_filter(min_payload=0, ports=None)
    packet = v4(REAL_KNOCK, 1)
    assert kernel.passes(program, packet)
    kinds = []
    kernel._send(packet, ETH_P_IP)
    for _ in range(50):
        select.select([kernel.witness], [], [], 0.1)
        kinds += [kind for data, kind in kernel._drain(kernel.witness) if data == packet]
        if socket.PACKET_HOST in kinds:
            break
    assert socket.PACKET_OUTGOING in kinds  # the witness did see our outgoing copy
    assert [d for d, kind in kernel._drain(kernel.filtered) if kind != socket.PACKET_HOST] == []


def header(
    *,
    size: int = 1024,
    magic: bytes = wire.MAGIC,
    version: int = wire.VERSION,
    suite: int = 1,
    work_bits: int = 12,
    flags: int = 0,
) -> bytes:
    """A knock-shaped payload of ``size`` bytes with these header fields (the rest is random)."""
    head = magic + bytes([version, suite, work_bits, flags]) + os.urandom(wire.HEADER_SIZE - 6)
    return (head + os.urandom(max(0, size - len(head))))[:size]


def junk(size: int) -> bytes:
    """Random bytes that do not happen to start like a knock."""
    for _ in range(100):
        data = os.urandom(size)
        if data[:3] != wire.MAGIC + bytes([wire.VERSION]):
            return data
    raise AssertionError("os.urandom keeps starting with the magic")


def test_knock_shape_is_the_default() -> None:
    assert build_filter(min_payload=0, ports=None) == build_filter(min_payload=0, ports=None, knock_shape=True)
    assert build_filter(min_payload=0, ports=None) != build_filter(min_payload=0, ports=None, knock_shape=False)
    assert knock_shaped(REAL_KNOCK) and not knock_shaped(junk(1024))


@pytest.mark.parametrize("family", [4, 6])
def test_knock_shape_decisions(kernel: Kernel, family: int) -> None:
    send = v4 if family == 4 else v6
    program = build_filter(min_payload=800, ports=[(22, 22), (8000, 8010)])  # the daemon's default minimum
    assert kernel.passes(program, send(REAL_KNOCK, 22))
    for size in wire.BUCKETS:
        for suite in sorted(wire.SUITES):
            for work_bits in (0, 12, 255):  # not the filter's business
                assert kernel.passes(program, send(header(size=size, suite=suite, work_bits=work_bits), 8005))
        for _ in range(5):
            assert not kernel.passes(program, send(junk(size), 22))
        assert not kernel.passes(program, send(bytes(size), 22))
        for magic in (b"sk", b"Ks", b"SK", b"\0K", b"s\0"):
            assert not kernel.passes(program, send(header(size=size, magic=magic), 22))
        for version in (0, 2, 255):
            assert not kernel.passes(program, send(header(size=size, version=version), 22))
        for suite in (0, 3, 255):
            assert suite not in wire.SUITES
            assert not kernel.passes(program, send(header(size=size, suite=suite), 22))
        for flags in (1, 0x80, 0xFF):
            assert not kernel.passes(program, send(header(size=size, flags=flags), 22))
        for wrong in (size - 1, size + 1, size - 8, size + 8):
            assert not kernel.passes(program, send(header(size=wrong), 22))
    for size in (0, 5, 6, 22, 800, 2000):
        assert not kernel.passes(program, send(header(size=size), 22))
    # The other checks still apply to a knock-shaped payload.
    assert not kernel.passes(program, send(REAL_KNOCK, 23))
    assert not kernel.passes(program, send(REAL_KNOCK, 8011))
    # A knock-shaped header on a UDP length that claims more than is present.
    assert not kernel.passes(program, _udp_claiming(family, REAL_KNOCK[:1000], 1024))


def _udp_claiming(family: int, payload: bytes, claimed: int) -> bytes:
    """A packet whose UDP length field says 8 + ``claimed`` while only ``payload`` follows."""
    segment = udp(payload, 40000, 22, length=8 + claimed)
    return ipv4(segment, "127.0.0.1", "127.0.0.1") if family == 4 else ipv6(segment, "::1", "::1")


def test_knock_shape_behind_ipv4_options_and_fragments(kernel: Kernel) -> None:
    program = build_filter(min_payload=800, ports=[(22, 22)])
    for options in (b"\x01\x01\x01\x00", b"\x01" * 40):  # IHL 6 and 15
        assert kernel.passes(program, v4(REAL_KNOCK, 22, options=options))
        assert kernel.passes(program, v4(header(size=1232, suite=2), 22, options=options))
        assert not kernel.passes(program, v4(junk(1024), 22, options=options))
        assert not kernel.passes(program, v4(junk(1232), 22, options=options))
        assert not kernel.passes(program, v4(header(flags=1), 22, options=options))
        assert not kernel.passes(program, v4(header(size=1025), 22, options=options))
    assert kernel.passes(program, v4(REAL_KNOCK, 22, frag=0x4000))  # DF only
    assert not kernel.passes(program, v4(REAL_KNOCK, 22, frag=0x2000))  # MF
    assert not kernel.passes(program, v4(REAL_KNOCK, 22, frag=0x0010))  # offset
    assert not kernel.passes(program, v4(REAL_KNOCK, 22, proto=6))


def test_knock_shape_behind_ipv6_extension_headers(kernel: Kernel) -> None:
    program = build_filter(min_payload=800, ports=[(22, 22)], max_packet=1600)  # the daemon's RECV_BUFFER
    walked = [(0, b""), (43, b"\0\0" + b"\0" * 20), (60, b"\x01\x02\0\0")]
    for extensions in (walked, [(60, b"")] * MAX_EXTENSION_HEADERS):
        assert kernel.passes(program, v6(REAL_KNOCK, 22, extensions=extensions))
        assert kernel.passes(program, v6(header(size=1232, suite=2), 22, extensions=extensions))
        assert not kernel.passes(program, v6(junk(1024), 22, extensions=extensions))
        assert not kernel.passes(program, v6(junk(1232), 22, extensions=extensions))
        assert not kernel.passes(program, v6(header(suite=3), 22, extensions=extensions))
        assert not kernel.passes(program, v6(header(size=1231), 22, extensions=extensions))
        assert not kernel.passes(program, v6(REAL_KNOCK, 23, extensions=extensions))
    too_many = [(60, b"")] * (MAX_EXTENSION_HEADERS + 1)
    assert not kernel.passes(program, v6(REAL_KNOCK, 22, extensions=too_many))
    assert not kernel.passes(program, v6(REAL_KNOCK, 22, extensions=[(44, b"\0" * 6)]))  # fragment


def test_knock_shape_with_min_payload_and_max_packet(kernel: Kernel) -> None:
    # min_payload still applies: above the small bucket only the large one passes.
    program = build_filter(min_payload=1100, ports=None)
    assert not kernel.passes(program, v4(REAL_KNOCK, 1))
    assert kernel.passes(program, v4(header(size=1232), 1))
    assert not kernel.passes(build_filter(min_payload=1233, ports=None), v4(header(size=1232), 1))
    # max_packet too: 1232 + 28 bytes do not fit in 1259.
    assert kernel.passes(build_filter(min_payload=0, ports=None, max_packet=1260), v4(header(size=1232), 1))
    assert not kernel.passes(build_filter(min_payload=0, ports=None, max_packet=1259), v4(header(size=1232), 1))
    # Turned off, well-sized junk passes again (the pre-check in Python refuses it).
    loose = build_filter(min_payload=800, ports=None, knock_shape=False)
    assert kernel.passes(loose, v4(junk(1024), 1)) and kernel.passes(loose, v6(junk(1232), 1))
    assert kernel.passes(loose, v4(header(size=1025), 1))


def knock_shaped(payload: bytes) -> bool:
    """What the filter's shape check stands for: the header checks of the Python pre-check."""
    try:
        wire.parse_header(payload)
    except KnockRefused:
        return False
    return True


def model(
    ranges: list[tuple[int, int]] | None, min_payload: int, dport: int, payload: bytes, knock_shape: bool
) -> bool:
    port_ok = ranges is None or any(first <= dport <= last for first, last in ranges)
    return port_ok and len(payload) >= min_payload and (not knock_shape or knock_shaped(payload))


def shaped_payloads() -> st.SearchStrategy[bytes]:
    """Payloads that are knocks, nearly knocks (one header byte or the length off) or junk."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        size = draw(st.integers(0, 80) | st.sampled_from([b + d for b in wire.BUCKETS for d in (-1, 0, 0, 1)]))
        magic = draw(st.sampled_from([wire.MAGIC, wire.MAGIC, b"sk", b"Ks", b"\0K"]))
        version = draw(st.sampled_from([wire.VERSION, wire.VERSION, 0, 2, 255]))
        suite = draw(st.sampled_from([*sorted(wire.SUITES), 0, 3, 255]))
        work_bits = draw(st.integers(0, 255))
        flags = draw(st.sampled_from([0, 0, 1, 0x80]))
        head = magic + bytes([version, suite, work_bits, flags])
        if draw(st.booleans()):
            return (head + draw(st.binary(min_size=16, max_size=16)) * (size // 16 + 1))[:size]
        return draw(st.binary(min_size=size, max_size=size))  # junk (rarely knock-shaped)

    return build()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ranges=st.none() | st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 300)), min_size=1, max_size=12),
    min_payload=st.integers(0, 64) | st.sampled_from([1023, 1024, 1025, 1232, 1233]),
    dport=st.integers(0, 65535),
    payload=shaped_payloads(),
    family=st.sampled_from([4, 6]),
    near=st.booleans(),
    knock_shape=st.booleans(),
)
def test_kernel_agrees_with_model(
    kernel: Kernel,
    ranges: list[tuple[int, int]] | None,
    min_payload: int,
    dport: int,
    payload: bytes,
    family: int,
    near: bool,
    knock_shape: bool,
) -> None:
    spans = None if ranges is None else [(first, min(first + width, 65535)) for first, width in ranges]
    if near and spans:
        dport = spans[dport % len(spans)][1] + (dport % 3) - 1  # at or next to a range's edge
    dport = max(0, min(dport, 65535))
    program = build_filter(min_payload=min_payload, ports=spans, knock_shape=knock_shape)
    packet = (v4 if family == 4 else v6)(payload, dport)
    assert kernel.passes(program, packet) == model(spans, min_payload, dport, payload, knock_shape)
