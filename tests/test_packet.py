"""The captured-packet parser: round trips over packets built here, every refusal reason, and a
property that arbitrary bytes only ever give a Datagram or a PacketError."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sknock.server.packet import MAX_EXTENSION_HEADERS, REASONS, Datagram, PacketError, parse_datagram


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp(payload: bytes, sport: int, dport: int, *, length: int | None = None) -> bytes:
    return struct.pack("!HHHH", sport, dport, len(payload) + 8 if length is None else length, 0) + payload


def ipv4(
    segment: bytes,
    src: str = "198.18.0.2",
    dst: str = "198.18.0.1",
    *,
    options: bytes = b"",
    proto: int = 17,
    frag: int = 0,
    total: int | None = None,
    ihl: int | None = None,
    good_checksum: bool = True,
) -> bytes:
    assert len(options) % 4 == 0
    header_len = 20 + len(options)
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | (header_len // 4 if ihl is None else ihl),
            0,
            header_len + len(segment) if total is None else total,
            0x1234,
            frag,
            64,
            proto,
            0,
            IPv4Address(src).packed,
            IPv4Address(dst).packed,
        )
        + options
    )
    csum = checksum(header) if good_checksum else checksum(header) ^ 0x0101
    header = header[:10] + struct.pack("!H", csum) + header[12:]
    return header + segment


def ipv6(
    segment: bytes,
    src: str = "fd00:5e::2",
    dst: str = "fd00:5e::1",
    *,
    extensions: list[tuple[int, bytes]] | None = None,
    last: int = 17,
    payload_len: int | None = None,
) -> bytes:
    """``extensions``: (header type, body after the two-byte next/length prefix); bodies are padded
    to a multiple of 8 with PadN-free zero bytes (Pad1 options)."""
    chain = b""
    types = [t for t, _ in extensions or []]
    bodies = [b for _, b in extensions or []]
    first = types[0] if types else last
    for i, body in enumerate(bodies):
        nxt = types[i + 1] if i + 1 < len(types) else last
        raw = body + b"\0" * (-(len(body) + 2) % 8)
        chain += bytes([nxt, (len(raw) + 2) // 8 - 1]) + raw
    body = chain + segment
    return (
        struct.pack("!IHBB", 0x60000000, len(body) if payload_len is None else payload_len, first, 64)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + body
    )


def refused(data: bytes) -> str:
    with pytest.raises(PacketError) as info:
        parse_datagram(data)
    assert info.value.reason in REASONS
    return info.value.reason


# -- round trips ----------------------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
payloads = st.binary(max_size=1400)
v4_addresses = st.ip_addresses(v=4).filter(
    lambda a: not (a.is_multicast or a.is_unspecified or a == IPv4Address("255.255.255.255"))
)
v6_addresses = st.ip_addresses(v=6).filter(lambda a: not (a.is_multicast or a.is_unspecified))
# IPv4 options: NOPs and harmless TLVs, padded with End-of-options to a 4-byte boundary.
v4_option = st.one_of(
    st.just(b"\x01"),
    st.binary(max_size=6).map(lambda body: bytes([0x44, len(body) + 2]) + body),
)
v4_options = (
    st.lists(v4_option, max_size=6)
    .map(lambda opts: b"".join(opts))
    .filter(lambda o: len(o) <= 36)
    .map(lambda o: o + b"\0" * (-len(o) % 4))
)
# IPv6 option TLVs a receiver may skip (high bits 00): PadN and an unassigned skippable type.
v6_option = st.one_of(
    st.binary(max_size=8).map(lambda b: bytes([1, len(b)]) + b"\0" * len(b)),
    st.binary(max_size=8).map(lambda b: bytes([0x1E, len(b)]) + b),
)
v6_extension = st.one_of(
    st.lists(v6_option, max_size=3).map(lambda opts: (60, b"".join(opts))),
    st.binary(min_size=2, max_size=14).map(lambda b: (43, bytes([b[0], 0]) + b[2:])),  # segments left 0
)


@given(
    payload=payloads,
    src=v4_addresses,
    dst=st.ip_addresses(v=4),
    sport=ports,
    dport=ports,
    options=v4_options,
    padding=st.binary(max_size=20),
)
def test_ipv4_round_trip(
    payload: bytes, src: IPv4Address, dst: IPv4Address, sport: int, dport: int, options: bytes, padding: bytes
) -> None:
    # ``padding`` stands for Ethernet padding after the IP total length: it must be ignored.
    packet = ipv4(udp(payload, sport, dport), str(src), str(dst), options=options) + padding
    assert parse_datagram(packet, ifindex=7) == Datagram(payload, src, dst, sport, dport, 7)


@given(
    payload=payloads,
    src=v6_addresses,
    dst=st.ip_addresses(v=6),
    sport=ports,
    dport=ports,
    hop=st.none() | st.lists(v6_option, max_size=2).map(lambda o: b"".join(o)),
    extensions=st.lists(v6_extension, max_size=MAX_EXTENSION_HEADERS - 1),
)
def test_ipv6_round_trip(
    payload: bytes,
    src: IPv6Address,
    dst: IPv6Address,
    sport: int,
    dport: int,
    hop: bytes | None,
    extensions: list[tuple[int, bytes]],
) -> None:
    chain = ([(0, hop)] if hop is not None else []) + extensions
    packet = ipv6(udp(payload, sport, dport), str(src), str(dst), extensions=chain)
    assert parse_datagram(packet, ifindex=3) == Datagram(payload, src, dst, sport, dport, 3)


@given(payload=payloads, extra=st.binary(min_size=1, max_size=30))
def test_udp_length_shorter_than_ip_payload_is_honoured(payload: bytes, extra: bytes) -> None:
    packet = ipv4(udp(payload, 1, 2) + extra)
    assert parse_datagram(packet).payload == payload


# -- any bytes at all -----------------------------------------------------------------------------


@given(st.binary(max_size=200))
@example(b"")
@example(b"\x45")
@example(b"\x60" + b"\0" * 39)
def test_arbitrary_bytes_give_datagram_or_packet_error(data: bytes) -> None:
    try:
        result = parse_datagram(data)
    except PacketError as error:
        assert error.reason in REASONS
    else:
        assert isinstance(result, Datagram)


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    """Valid packets with some bytes overwritten or the tail cut: closer to the parser's edges than
    random bytes, which mostly die at the version nibble."""
    payload = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        packet = bytearray(ipv4(udp(payload, 1000, 22), options=draw(v4_options)))
    else:
        packet = bytearray(ipv6(udp(payload, 1000, 22), extensions=draw(st.lists(v6_extension, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, len(packet) - 1))
        packet[index] = draw(st.integers(0, 255))
    return bytes(packet[: draw(st.integers(0, len(packet)))])


@given(mutated_packets())
def test_mutated_packets_give_datagram_or_packet_error(data: bytes) -> None:
    try:
        result = parse_datagram(data)
    except PacketError as error:
        assert error.reason in REASONS
    else:
        assert isinstance(result, Datagram)
        assert len(result.payload) <= len(data)


# -- each refusal ---------------------------------------------------------------------------------


def test_not_ip() -> None:
    assert refused(b"\x50" + b"\0" * 40) == "not-ip"
    assert refused(b"") == "truncated"


def test_ipv4_header_checks() -> None:
    good = ipv4(udp(b"knock", 5, 6))
    assert parse_datagram(good).payload == b"knock"
    assert refused(good[:19]) == "truncated"
    assert refused(ipv4(udp(b"knock", 5, 6), ihl=4)) == "ipv4-options-bad"
    assert refused(ipv4(udp(b"", 5, 6), ihl=15)) == "truncated"  # IHL says 60 bytes, 28 present
    assert refused(ipv4(udp(b"knock", 5, 6), good_checksum=False)) == "ipv4-checksum"
    assert refused(ipv4(udp(b"knock", 5, 6), options=b"\x44\x09\0\0")) == "ipv4-options-bad"  # overruns
    assert refused(ipv4(udp(b"knock", 5, 6), options=b"\x01\x01\x01\x44")) == "ipv4-options-bad"  # no length
    assert refused(ipv4(udp(b"knock", 5, 6), options=b"\x44\x01\0\0")) == "ipv4-options-bad"  # length < 2
    assert refused(ipv4(udp(b"knock", 5, 6), total=10)) == "bad-length"
    assert refused(ipv4(udp(b"knock", 5, 6), total=200)) == "truncated"


def test_ipv4_fragments_refused() -> None:
    assert refused(ipv4(udp(b"knock", 5, 6), frag=0x2000)) == "fragment"  # more fragments
    assert refused(ipv4(udp(b"knock", 5, 6), frag=0x0001)) == "fragment"  # offset 8
    assert parse_datagram(ipv4(udp(b"knock", 5, 6), frag=0x4000)).payload == b"knock"  # DF is fine


def test_ipv4_not_udp_and_bad_udp() -> None:
    assert refused(ipv4(udp(b"knock", 5, 6), proto=6)) == "not-udp"
    assert refused(ipv4(b"1234567")) == "truncated"
    assert refused(ipv4(udp(b"knock", 5, 6, length=7))) == "bad-length"
    assert refused(ipv4(udp(b"knock", 5, 6, length=14))) == "bad-length"


@pytest.mark.parametrize("source", ["0.0.0.0", "224.0.0.1", "255.255.255.255"])
def test_ipv4_bad_sources(source: str) -> None:
    assert refused(ipv4(udp(b"knock", 5, 6), src=source)) == "bad-source"


def test_ipv6_header_checks() -> None:
    good = ipv6(udp(b"knock", 5, 6))
    assert parse_datagram(good).payload == b"knock"
    assert refused(good[:39]) == "truncated"
    assert refused(ipv6(udp(b"knock", 5, 6), payload_len=0)) == "bad-length"
    assert refused(ipv6(udp(b"knock", 5, 6), payload_len=100)) == "truncated"
    assert refused(ipv6(udp(b"knock", 5, 6), last=6)) == "not-udp"
    assert refused(ipv6(udp(b"knock", 5, 6), last=59)) == "not-udp"  # no next header
    assert refused(ipv6(udp(b"knock", 5, 6), src="::")) == "bad-source"
    assert refused(ipv6(udp(b"knock", 5, 6), src="ff02::1")) == "bad-source"


def test_ipv6_extension_headers_refused() -> None:
    segment = udp(b"knock", 5, 6)
    assert refused(ipv6(segment, extensions=[(44, b"\0" * 6)])) == "fragment"
    assert refused(ipv6(segment, extensions=[(60, b""), (0, b"")])) == "ext-header"  # hop-by-hop not first
    assert refused(ipv6(segment, extensions=[(43, b"\0\x01")])) == "ext-header"  # segments left 1
    assert refused(ipv6(segment, extensions=[(51, b"\0" * 6)])) == "ext-header"  # AH
    assert refused(ipv6(segment, extensions=[(60, b"\xc9\x04\0\0\0\0")])) == "ext-header"  # must understand
    assert refused(ipv6(segment, extensions=[(60, b"\x1e\x09\0\0\0\0")])) == "ext-header"  # option overruns
    too_many = [(60, b"")] * (MAX_EXTENSION_HEADERS + 1)
    assert refused(ipv6(segment, extensions=too_many)) == "ext-header"
    just_enough = [(60, b"")] * MAX_EXTENSION_HEADERS
    assert parse_datagram(ipv6(segment, extensions=just_enough)).payload == b"knock"
    # A header whose length byte points past the payload.
    packet = bytearray(ipv6(segment, extensions=[(60, b"")]))
    packet[41] = 200
    assert refused(bytes(packet)) == "truncated"
