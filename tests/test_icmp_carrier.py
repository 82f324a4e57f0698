"""The ICMP carrier (issue 13 §1) below the server: the echo request the client builds, the parser's
strict reading of ICMP and ICMPv6 echo requests (round trips, every refusal, hypothesis over hostile
bytes), the kernel filter's decisions run by the real kernel (tests/test_bpf.py's harness), and the
configuration option that turns it on."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sknock.carrier import Carrier, echo_request, internet_checksum
from sknock.client import AsyncKnockClient, KnockClient
from sknock.errors import ConfigError
from sknock.ports import Protocol
from sknock.protocol import wire
from sknock.server.bpf import build_filter, pack
from sknock.server.config import load_config
from sknock.server.packet import MAX_EXTENSION_HEADERS, REASONS, Datagram, PacketError, parse_datagram
from tests.pki import PASSWORD, TestPKI
from tests.test_bpf import REAL_KNOCK, Kernel, header, junk, kernel, knock_shaped, shaped_payloads, v4, v6
from tests.test_packet import (
    checksum,
    ipv4,
    ipv6,
    udp,
    v4_addresses,
    v4_options,
    v6_addresses,
    v6_extension,
    v6_option,
)

__all__ = ["kernel"]  # the fixture, imported from test_bpf

ICMP, ICMPV6 = 1, 58


def echo(payload: bytes, *, kind: int = 8, code: int = 0, ident: int = 0x1234, seq: int = 1) -> bytes:
    """An echo message built here, independently of sknock.carrier (ICMPv4 checksum filled in)."""
    message = struct.pack("!BBHHH", kind, code, 0, ident, seq) + payload
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def icmp4(payload: bytes, src: str = "198.18.0.2", dst: str = "198.18.0.1", **kw: object) -> bytes:
    kind = kw.pop("kind", 8)
    code = kw.pop("code", 0)
    return ipv4(echo(payload, kind=kind, code=code), src, dst, proto=ICMP, **kw)  # type: ignore[arg-type]


def icmp6(payload: bytes, src: str = "fd00:5e::2", dst: str = "fd00:5e::1", **kw: object) -> bytes:
    kind = kw.pop("kind", 128)
    code = kw.pop("code", 0)
    return ipv6(echo(payload, kind=kind, code=code), src, dst, last=ICMPV6, **kw)  # type: ignore[arg-type]


def refused(data: bytes, icmp: bool = True) -> str:
    with pytest.raises(PacketError) as info:
        parse_datagram(data, icmp=icmp)
    assert info.value.reason in REASONS
    return info.value.reason


# -- the client's echo request ----------------------------------------------------------------------


def test_echo_request_layout_and_checksum() -> None:
    message = echo_request(REAL_KNOCK, version=4, identifier=0xBEEF, sequence=7)
    assert message[:2] == b"\x08\x00" and message[4:8] == b"\xbe\xef\x00\x07" and message[8:] == REAL_KNOCK
    assert internet_checksum(message) == 0  # the checksum field makes the sum come out right
    assert message == echo(REAL_KNOCK, ident=0xBEEF, seq=7)
    v6message = echo_request(b"abc", version=6, identifier=1, sequence=2)
    assert v6message[:4] == b"\x80\x00\x00\x00"  # ICMPv6: the kernel fills in the checksum
    # What the client sends is what the server takes.
    parsed = parse_datagram(ipv4(message, proto=ICMP), icmp=True)
    assert parsed.payload == REAL_KNOCK and parsed.carrier is Carrier.ICMP


def test_carrier_names() -> None:
    assert Carrier.parse("ICMP") is Carrier.ICMP and Carrier.parse(Carrier.UDP) is Carrier.UDP
    for bad in ("tcp", "", None, 1):
        with pytest.raises(ValueError, match="via must be 'udp' or 'icmp'"):
            Carrier.parse(bad)  # type: ignore[arg-type]


# -- the parser -------------------------------------------------------------------------------------

payloads = st.binary(max_size=1400)


@given(payload=payloads, src=v4_addresses, dst=st.ip_addresses(v=4), options=v4_options, padding=st.binary(max_size=20))
def test_icmp4_round_trip(
    payload: bytes, src: IPv4Address, dst: IPv4Address, options: bytes, padding: bytes
) -> None:
    # Bytes after the IP total length (Ethernet padding) are not part of the knock.
    packet = icmp4(payload, str(src), str(dst), options=options) + padding
    assert parse_datagram(packet, ifindex=7, icmp=True) == Datagram(payload, src, dst, 0, 0, 7, Carrier.ICMP)


@given(
    payload=payloads,
    src=v6_addresses,
    dst=st.ip_addresses(v=6),
    hop=st.none() | st.lists(v6_option, max_size=2).map(lambda o: b"".join(o)),
    extensions=st.lists(v6_extension, max_size=MAX_EXTENSION_HEADERS - 1),
)
def test_icmp6_round_trip(
    payload: bytes,
    src: IPv6Address,
    dst: IPv6Address,
    hop: bytes | None,
    extensions: list[tuple[int, bytes]],
) -> None:
    chain = ([(0, hop)] if hop is not None else []) + extensions
    packet = icmp6(payload, str(src), str(dst), extensions=chain)
    assert parse_datagram(packet, ifindex=3, icmp=True) == Datagram(payload, src, dst, 0, 0, 3, Carrier.ICMP)


def test_udp_datagrams_say_udp() -> None:
    assert parse_datagram(ipv4(udp(b"knock", 5, 6)), icmp=True).carrier is Carrier.UDP
    assert parse_datagram(ipv6(udp(b"knock", 5, 6))).carrier is Carrier.UDP


def test_icmp_is_not_taken_unless_asked() -> None:
    assert refused(icmp4(REAL_KNOCK), icmp=False) == "not-udp"
    assert refused(icmp6(REAL_KNOCK), icmp=False) == "not-udp"


def test_icmp_refusals() -> None:
    # Other ICMP messages: replies, unreachables, the other family's echo type, a non-zero code.
    for kind, code in ((0, 0), (3, 3), (128, 0), (8, 1), (13, 0)):
        assert refused(icmp4(REAL_KNOCK, kind=kind, code=code)) == "not-echo"
    for kind, code in ((129, 0), (1, 4), (8, 0), (128, 1), (135, 0)):
        assert refused(icmp6(REAL_KNOCK, kind=kind, code=code)) == "not-echo"
    # An echo header cut short, and lengths that contradict the bytes present.
    assert refused(ipv4(b"\x08\x00\x00\x00\x00\x00\x00", proto=ICMP)) == "truncated"
    assert refused(ipv6(b"\x80\x00\x00\x00\x00\x00\x00", last=ICMPV6)) == "truncated"
    assert refused(icmp4(REAL_KNOCK, total=2000)) == "truncated"
    assert refused(icmp6(REAL_KNOCK, payload_len=2000)) == "truncated"
    assert refused(icmp6(REAL_KNOCK, payload_len=0)) == "bad-length"
    # The IP layer's rules are the UDP carrier's.
    assert refused(icmp4(REAL_KNOCK, frag=0x2000)) == "fragment"
    assert refused(icmp4(REAL_KNOCK, good_checksum=False)) == "ipv4-checksum"
    assert refused(icmp4(REAL_KNOCK, src="255.255.255.255")) == "bad-source"
    assert refused(icmp6(REAL_KNOCK, src="ff02::1")) == "bad-source"
    assert refused(icmp6(REAL_KNOCK, extensions=[(44, b"\0" * 6)])) == "fragment"
    assert refused(icmp6(REAL_KNOCK, extensions=[(60, b"\xc9\x04\0\0\0\0")])) == "ext-header"
    # ICMP behind IPv4 as protocol 58, or ICMPv6's number behind IPv6 as 1: not ICMP for that family.
    assert refused(ipv4(echo(REAL_KNOCK), proto=ICMPV6)) == "not-udp"
    assert refused(ipv6(echo(REAL_KNOCK, kind=128), last=ICMP)) == "not-udp"


def test_checksum_not_verified() -> None:
    """Like UDP's: the knock is authenticated, so a corrupted one fails in the verifier."""
    packet = bytearray(icmp4(b"knock"))
    packet[22] ^= 0xFF
    assert parse_datagram(bytes(packet), icmp=True).payload == b"knock"


@st.composite
def mutated_echoes(draw: st.DrawFn) -> bytes:
    """Valid echo requests with bytes overwritten or the tail cut."""
    payload = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        packet = bytearray(icmp4(payload, options=draw(v4_options)))
    else:
        packet = bytearray(icmp6(payload, extensions=draw(st.lists(v6_extension, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, len(packet) - 1))
        packet[index] = draw(st.integers(0, 255))
    return bytes(packet[: draw(st.integers(0, len(packet)))])


@given(mutated_echoes())
@example(b"\x45\x00\x00\x1c" + b"\0" * 5 + b"\x01" + b"\0" * 18)
@example(b"\x60\x00\x00\x00\x00\x00\x3a\x40" + b"\0" * 32)
def test_hostile_echoes_give_datagram_or_packet_error(data: bytes) -> None:
    try:
        result = parse_datagram(data, icmp=True)
    except PacketError as error:
        assert error.reason in REASONS
    else:
        assert isinstance(result, Datagram)
        assert len(result.payload) <= len(data)
        assert (result.source_port, result.dest_port) == (0, 0) or result.carrier is Carrier.UDP


@given(st.binary(max_size=200))
def test_arbitrary_bytes_with_icmp_give_datagram_or_packet_error(data: bytes) -> None:
    try:
        assert isinstance(parse_datagram(data, icmp=True), Datagram)
    except PacketError as error:
        assert error.reason in REASONS


# -- the kernel filter ------------------------------------------------------------------------------


def test_without_icmp_the_filter_is_byte_for_byte_the_udp_one() -> None:
    """knockCarriers = udp must keep today's filter exactly: the program built before the ICMP carrier
    existed, recorded here as its SHA-256, for the daemon's defaults and a port list."""
    import hashlib

    expected = {
        (800, None): "393dd1a29ad86d73",
        (800, ((22, 22), (8000, 8010))): "3f925cb82348f285",
    }
    for (min_payload, ports), digest in expected.items():
        program = build_filter(min_payload=min_payload, ports=ports)
        assert program == build_filter(min_payload=min_payload, ports=ports, icmp=False)
        assert hashlib.sha256(pack(program)).hexdigest()[:16] == digest
        assert build_filter(min_payload=min_payload, ports=ports, icmp=True) != program


def test_icmp_filter_with_every_port_range_still_fits() -> None:
    program = build_filter(min_payload=0, ports=[(p * 3, p * 3 + 1) for p in range(1000)], icmp=True)
    assert all(0 <= i.jt <= 255 and 0 <= i.jf <= 255 for i in program) and len(program) <= 4096


def test_no_open_port_and_no_knock_without_icmp(kernel: Kernel) -> None:
    udp_only = build_filter(min_payload=800, ports=None)
    assert not kernel.passes(udp_only, icmp4(REAL_KNOCK, "127.0.0.1", "127.0.0.1"))
    assert not kernel.passes(udp_only, icmp6(REAL_KNOCK, "::1", "::1"))
    assert kernel.passes(udp_only, v4(REAL_KNOCK, 22))


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_shape_decisions(kernel: Kernel, family: int) -> None:
    def send(payload: bytes, **kw: object) -> bytes:
        if family == 4:
            return icmp4(payload, "127.0.0.1", "127.0.0.1", **kw)
        return icmp6(payload, "::1", "::1", **kw)

    request, reply = (8, 0) if family == 4 else (128, 129)
    program = build_filter(min_payload=800, ports=[(22, 22)], max_packet=1600, icmp=True)
    assert kernel.passes(program, send(REAL_KNOCK))
    assert kernel.passes(program, (v4 if family == 4 else v6)(REAL_KNOCK, 22))  # UDP still passes
    assert not kernel.passes(program, (v4 if family == 4 else v6)(REAL_KNOCK, 23))  # with its ports
    for size in wire.BUCKETS:
        for suite in sorted(wire.SUITES):
            assert kernel.passes(program, send(header(size=size, suite=suite)))
        assert not kernel.passes(program, send(junk(size)))
        assert not kernel.passes(program, send(header(size=size, flags=1)))
        assert not kernel.passes(program, send(header(size=size, suite=3)))
        assert not kernel.passes(program, send(header(size=size, magic=b"sk")))
        for wrong in (size - 1, size + 1, size - 8, size + 8):
            assert not kernel.passes(program, send(header(size=wrong)))
        assert not kernel.passes(program, send(header(size=size), kind=reply))
        assert not kernel.passes(program, send(header(size=size), kind=request, code=1))
    for size in (0, 6, 64, 800):  # an ordinary ping is not a knock
        assert not kernel.passes(program, send(header(size=size)))
    assert not kernel.passes(program, send(b"\0" * 56))


def test_icmp_behind_ipv4_options_and_fragments(kernel: Kernel) -> None:
    program = build_filter(min_payload=800, ports=[(22, 22)], icmp=True)
    for options in (b"\x01\x01\x01\x00", b"\x01" * 40):
        assert kernel.passes(program, icmp4(REAL_KNOCK, "127.0.0.1", "127.0.0.1", options=options))
        assert not kernel.passes(program, icmp4(junk(1024), "127.0.0.1", "127.0.0.1", options=options))
    assert kernel.passes(program, icmp4(REAL_KNOCK, "127.0.0.1", "127.0.0.1", frag=0x4000))  # DF only
    assert not kernel.passes(program, icmp4(REAL_KNOCK, "127.0.0.1", "127.0.0.1", frag=0x2000))  # MF
    assert not kernel.passes(program, icmp4(REAL_KNOCK, "127.0.0.1", "127.0.0.1", frag=0x0010))  # offset
    # A total length that claims more than is present, or less than a knock.
    assert not kernel.passes(program, icmp4(REAL_KNOCK[:1000], "127.0.0.1", "127.0.0.1", total=28 + 1024))
    assert not kernel.passes(program, icmp4(REAL_KNOCK, "127.0.0.1", "127.0.0.1", total=28 + 1000))
    assert not kernel.passes(program, icmp4(REAL_KNOCK, "127.0.0.1", "127.0.0.1", total=10))
    loose = build_filter(min_payload=0, ports=None, knock_shape=False, icmp=True)
    assert kernel.passes(loose, icmp4(b"ping", "127.0.0.1", "127.0.0.1"))
    assert not kernel.passes(loose, icmp4(b"ping", "127.0.0.1", "127.0.0.1", total=20))  # ends before the header
    assert not kernel.passes(loose, icmp4(b"ping", "127.0.0.1", "127.0.0.1", total=10))  # ends before the header
    assert not kernel.passes(loose, icmp6(b"ping", "::1", "::1", payload_len=4))


def test_icmp6_behind_extension_headers(kernel: Kernel) -> None:
    program = build_filter(min_payload=800, ports=[(22, 22)], max_packet=1600, icmp=True)
    walked = [(0, b""), (43, b"\0\0" + b"\0" * 20), (60, b"\x01\x02\0\0")]
    for extensions in (walked, [(60, b"")] * MAX_EXTENSION_HEADERS):
        assert kernel.passes(program, icmp6(REAL_KNOCK, "::1", "::1", extensions=extensions))
        assert kernel.passes(program, icmp6(header(size=1232, suite=2), "::1", "::1", extensions=extensions))
        assert not kernel.passes(program, icmp6(junk(1024), "::1", "::1", extensions=extensions))
    too_many = [(60, b"")] * (MAX_EXTENSION_HEADERS + 1)
    assert not kernel.passes(program, icmp6(REAL_KNOCK, "::1", "::1", extensions=too_many))
    assert not kernel.passes(program, icmp6(REAL_KNOCK, "::1", "::1", extensions=[(44, b"\0" * 6)]))
    # A payload length that claims more than is present, or that is a jumbogram's 0.
    assert not kernel.passes(program, icmp6(REAL_KNOCK[:1000], "::1", "::1", payload_len=8 + 1024))
    assert not kernel.passes(program, icmp6(REAL_KNOCK, "::1", "::1", payload_len=0))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=shaped_payloads(),
    family=st.sampled_from([4, 6]),
    kind=st.sampled_from(["request", "request", "reply", "other-family", "udp"]),
    code=st.sampled_from([0, 0, 0, 1]),
    min_payload=st.integers(0, 64) | st.sampled_from([1023, 1024, 1025, 1232, 1233]),
    knock_shape=st.booleans(),
)
def test_kernel_agrees_with_model_for_icmp(
    kernel: Kernel, payload: bytes, family: int, kind: str, code: int, min_payload: int, knock_shape: bool
) -> None:
    """The filter with icmp on, against a model: an echo request (right type for its family, code 0)
    passes when its data would pass as a UDP payload; UDP goes on as before."""
    program = build_filter(min_payload=min_payload, ports=[(22, 22)], icmp=True, knock_shape=knock_shape)
    size_ok = len(payload) >= min_payload and (not knock_shape or knock_shaped(payload))
    if kind == "udp":
        packet = (v4 if family == 4 else v6)(payload, 22)
        expected = size_ok
    else:
        types = {"request": (8, 128), "reply": (0, 129), "other-family": (128, 8)}[kind]
        kind_byte = types[0] if family == 4 else types[1]
        build = icmp4 if family == 4 else icmp6
        where = ("127.0.0.1", "127.0.0.1") if family == 4 else ("::1", "::1")
        packet = build(payload, *where, kind=kind_byte, code=code)
        expected = size_ok and kind == "request" and code == 0
    assert kernel.passes(program, packet) == expected


# -- the option ---------------------------------------------------------------------------------------


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "config.ini"
    path.write_text("[DEFAULT]\nserverPFXFile = s.pfx\nPFXPasswd = x\nrevocation = none\n" + extra)
    return path


def test_knock_carriers_option(tmp_path: Path) -> None:
    def load(extra: str) -> tuple[Carrier, ...]:
        return load_config(_config(tmp_path, extra), check_files=False).knock_carriers

    assert load("") == (Carrier.UDP,)
    assert load("knockCarriers = udp\n") == (Carrier.UDP,)
    assert load("knockCarriers = udp, icmp\n") == (Carrier.UDP, Carrier.ICMP)
    assert load("knockCarriers = ICMP,udp\n") == (Carrier.UDP, Carrier.ICMP)
    config = load_config(_config(tmp_path, "knockCarriers = icmp, udp\n"), check_files=False)
    assert "knockCarriers = udp, icmp" in config.describe()
    for value, words in (
        ("icmp", "leaves out udp"),
        ("udp, tcp", "'tcp' is not a carrier"),
        ("udp,,icmp", "empty entry"),
    ):
        with pytest.raises(ConfigError, match=words) as info:
            load(f"knockCarriers = {value}\n")
        assert str(info.value).count("\n") == 0 and "knockCarriers" in str(info.value)


def test_icmp_needs_packet_capture(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="icmp needs captureMode = packet") as info:
        load_config(
            _config(tmp_path, "captureMode = udp\nknockPorts = 62201\nknockCarriers = udp, icmp\n"),
            check_files=False,
        )
    assert "knockCarriers" in str(info.value) and "\n" not in str(info.value)


# -- the client's carrier argument ------------------------------------------------------------------


def _alice(pki: TestPKI) -> KnockClient:
    return KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=pki.server.cer)


def test_via_is_checked_before_anything_is_sent(pki: TestPKI) -> None:
    client = _alice(pki)
    with pytest.raises(ValueError, match="via must be 'udp' or 'icmp'"):
        client.knock("host.invalid", 22, verify=False, via="tcp")  # before resolving
    with pytest.raises(ValueError, match="via must be"):
        client.close("host.invalid", 22, via="sctp")
    with pytest.raises(ValueError, match="knock_port is a UDP port"):
        client.send(b"x", IPv4Address("127.0.0.1"), knock_port=4000, via="icmp")
    with pytest.raises(ValueError, match="via must be"):
        asyncio.run(AsyncKnockClient(credentials=client.credentials, server_cert=pki.server.cer).knock(
            "host.invalid", 22, verify=False, via="ping"))


def _icmp_listener(family: int) -> socket.socket:
    """A raw socket that receives every ICMP (or ICMPv6) message this host gets (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a raw ICMP socket")
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    sock = socket.socket(family, socket.SOCK_RAW, proto)
    sock.settimeout(0.2)
    return sock


def _echo_data(sock: socket.socket, family: int, kind: int, seconds: float = 5) -> list[bytes]:
    """The data of the echo requests received within ``seconds`` (bounded)."""
    found: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not found:
        try:
            packet = sock.recv(4096)
        except TimeoutError:
            continue
        message = packet[(packet[0] & 0x0F) * 4 :] if family == socket.AF_INET else packet  # raw v4 has the IP header
        if message[0] == kind:
            found.append(message[8:])
    return found


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_library_sends_the_knock_as_an_echo_request_on_loopback(pki: TestPKI, family: int) -> None:
    """Over loopback only: what KnockClient and AsyncKnockClient send with via='icmp' is an echo request
    whose data is the knock, whole."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    kind = 8 if family == socket.AF_INET else 128
    client = _alice(pki)
    with _icmp_listener(family) as listener:
        datagram = client.build_knock([(Protocol.TCP, 2005)], now=time.time())
        assert client.send(datagram, ipaddress.ip_address(host), via="icmp") == 0
        assert datagram in _echo_data(listener, family, kind)
        assert client.knock(host, 2005, verify=False, via=Carrier.ICMP) is True
        sent = _echo_data(listener, family, kind)
        assert sent and wire.parse_header(sent[0]) and len(sent[0]) in wire.BUCKETS
        asynchronous = AsyncKnockClient(credentials=client.credentials, server_cert=pki.server.cer)
        assert asyncio.run(asynchronous.knock(host, 2005, verify=False, via="icmp")) is True
        assert _echo_data(listener, family, kind)
