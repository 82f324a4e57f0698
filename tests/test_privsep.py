"""The worker -> monitor messages (every byte hostile) and the privilege drop itself."""

from __future__ import annotations

import ipaddress
import math
import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sknock.ports import Protocol
from sknock.server.firewall.base import Opening
from sknock.server.privsep import (
    CRL_PREFIX,
    MAX_CRL_MESSAGE,
    MAX_ID_CACHE,
    MAX_MESSAGE,
    GrantRequest,
    PrivsepError,
    encode_request,
    parse_request,
    printable_client,
    receive_buffer,
)

MAX = 3600.0
LAYOUT = struct.Struct("!BBBBHddd16s16sB")  # written out again here, as the docstring of privsep.py states it
ID = struct.Struct("!32s21s")
GOOD: dict[str, Any] = {
    "op": 1,
    "family": 4,
    "protocol": 1,
    "reserved": 0,
    "port": 22,
    "duration": 15.0,
    "expires": 1767225607.5,
    "received": 0.0,
    "address": bytes([198, 18, 0, 2]) + bytes(12),
    "nonce": bytes.fromhex("00112233445566778899aabbccddeeff"),
    "ids": [],
    "client": b"CN=alice",
}
ALICE = GrantRequest(
    "open", Opening(ipaddress.ip_address("198.18.0.2"), Protocol.TCP, 22), 15.0, "CN=alice",
    bytes.fromhex("00112233445566778899aabbccddeeff"), 1767225607.5,
)


def message(**changes: Any) -> bytes:
    f = {**GOOD, **changes}
    fixed = LAYOUT.pack(f["op"], f["family"], f["protocol"], f["reserved"], f["port"], f["duration"], f["expires"],
                        f["received"], f["address"], f["nonce"], f.get("count", len(f["ids"])))
    ids = b"".join(ID.pack(issuer, serial.to_bytes(21, "big", signed=True)) for issuer, serial in f["ids"])
    return fixed + ids + f["client"]


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def refused(data: bytes, max_duration: float = MAX) -> str:
    with pytest.raises(PrivsepError) as info:
        parse_request(data, max_duration=max_duration)
    return str(info.value)


def test_the_good_message_parses() -> None:
    assert message() == encode_request(ALICE)
    request = parse_request(message(), max_duration=MAX)
    assert request == ALICE
    assert isinstance(request.duration, float)
    close = parse_request(message(op=2, protocol=0, family=6, address=v6("fd00::2")), max_duration=MAX)
    assert (close.op, close.opening.protocol, str(close.opening.address)) == ("close", Protocol.UDP, "fd00::2")


def test_revocation_ids_travel_with_the_request() -> None:
    ids = ((b"\x01" * 32, 0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0_1234), (b"\x02" * 32, 0), (b"\x03" * 32, -5))
    data = message(ids=list(ids))
    assert data == encode_request(GrantRequest(ALICE.op, ALICE.opening, ALICE.duration, ALICE.client, ALICE.nonce,
                                               ALICE.expires, ids))
    assert parse_request(data, max_duration=MAX).revocation_ids == ids
    assert "revocation id count 9" in refused(message(ids=[(b"\x01" * 32, 1)] * 9))
    assert "shorter than its 2 revocation id(s)" in refused(message(count=2, ids=[(b"\x01" * 32, 1)], client=b""))


def test_a_client_s_revocation_ids_are_parsed_once_and_shared() -> None:
    ids = ((b"\x01" * 32, 77), (b"\x02" * 32, -5))
    cache: dict[bytes, tuple[tuple[bytes, int], ...]] = {}
    first = parse_request(message(ids=list(ids)), max_duration=MAX, id_cache=cache)
    again = parse_request(message(ids=list(ids), port=23, nonce=bytes(16)), max_duration=MAX, id_cache=cache)
    assert first.revocation_ids == again.revocation_ids == ids
    assert again.revocation_ids is first.revocation_ids  # one tuple for every grant of the client
    assert parse_request(message(ids=list(ids)), max_duration=MAX) == first  # the same request without a cache
    other = parse_request(message(ids=[(b"\x01" * 32, 78)]), max_duration=MAX, id_cache=cache)
    assert other.revocation_ids == ((b"\x01" * 32, 78),)
    # bounded: whatever a worker sends, the cache never holds more than MAX_ID_CACHE lists
    for serial in range(MAX_ID_CACHE + 10):
        assert parse_request(message(ids=[(b"\x05" * 32, serial)]), max_duration=MAX,
                             id_cache=cache).revocation_ids == ((b"\x05" * 32, serial),)
        assert len(cache) <= MAX_ID_CACHE


def test_the_receive_buffer_holds_the_largest_message_and_is_reused() -> None:
    import socket

    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with here, there:
        for end in (here, there):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_CRL_MESSAGE + 4096)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_CRL_MESSAGE + 4096)
        buffer = receive_buffer()
        largest = CRL_PREFIX + os.urandom(MAX_CRL_MESSAGE)
        there.send(largest)
        assert bytes(memoryview(buffer)[: here.recv_into(buffer)]) == largest
        there.send(message())  # a short message after a long one: only its own bytes are read
        size = here.recv_into(buffer)
        assert parse_request(bytes(memoryview(buffer)[:size]), max_duration=MAX) == ALICE


# -- hostile input: anything is a GrantRequest or a PrivsepError ------------------------------------------------


def _parse_or_privsep_error(data: bytes) -> GrantRequest | None:
    try:
        request = parse_request(data, max_duration=MAX)
    except PrivsepError:
        return None
    assert isinstance(request, GrantRequest)
    assert request.op in ("open", "close")
    assert 1 <= request.opening.port <= 65535
    assert 0 < request.duration <= MAX
    assert not request.opening.address.is_multicast and not request.opening.address.is_unspecified
    assert request.opening.address != _BROADCAST
    assert request.client.isprintable() and len(request.client) <= 200
    return request


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=MAX_MESSAGE + 64))
def test_any_bytes_give_a_request_or_a_privsep_error(data: bytes) -> None:
    _parse_or_privsep_error(data)


_fields = {
    "op": st.integers(0, 255),
    "family": st.sampled_from([4, 6]) | st.integers(0, 255),
    "protocol": st.integers(0, 255),
    "reserved": st.integers(0, 255),
    "port": st.integers(0, 65535),
    "duration": st.floats(allow_nan=True, allow_infinity=True),
    "expires": st.floats(allow_nan=True, allow_infinity=True),
    "received": st.floats(allow_nan=True, allow_infinity=True),
    "address": st.binary(min_size=16, max_size=16)
    | st.ip_addresses(v=4).map(lambda a: a.packed + bytes(12))
    | st.sampled_from([bytes(16), bytes([224, 0, 0, 1]) + bytes(12), b"\xff" * 4 + bytes(12), v6("ff02::1")]),
    "nonce": st.binary(min_size=16, max_size=16),
    "client": st.binary(max_size=900) | st.text(max_size=250).map(str.encode),
}


@settings(max_examples=600, deadline=None)
@given(st.fixed_dictionaries({}, optional=_fields))
def test_any_field_values_give_a_request_or_a_privsep_error(fields: dict[str, Any]) -> None:
    """Structured input reaches the field checks (random bytes rarely pass the first ones)."""
    request = _parse_or_privsep_error(message(**fields))
    if request is not None:
        # whatever was accepted is exactly what the worker could have sent
        assert parse_request(encode_request(request), max_duration=MAX) == request


_addresses = st.ip_addresses().filter(lambda a: not a.is_multicast and not a.is_unspecified and a != _BROADCAST)
_requests = st.builds(
    GrantRequest,
    op=st.sampled_from(["open", "close"]),
    opening=st.builds(Opening, address=_addresses, protocol=st.sampled_from(Protocol),
                      port=st.integers(1, 65535)),
    duration=st.floats(min_value=0.001, max_value=MAX) | st.integers(1, int(MAX)).map(float),
    client=st.text(max_size=300),
    nonce=st.binary(min_size=16, max_size=16),
    expires=st.floats(0, 2**40, exclude_max=True),
    received=st.floats(0, 2**40, exclude_max=True),
)


@settings(max_examples=400, deadline=None)
@given(_requests)
def test_round_trip(request: GrantRequest) -> None:
    """Every request the worker can make fits one message and comes back unchanged -- whatever the
    client's subject holds (a certificate subject may be any Unicode): the name is cut to 200
    characters and its control characters become '?'."""
    data = encode_request(request)
    assert len(data) <= MAX_MESSAGE
    back = parse_request(data, max_duration=MAX)
    assert (back.op, back.opening, back.duration) == (request.op, request.opening, request.duration)
    assert (back.nonce, back.expires, back.received) == (request.nonce, request.expires, request.received)
    assert back.client == printable_client(request.client)
    assert len(back.client) == min(200, len(request.client))


def test_client_names_are_cut_to_200_characters_and_kept_printable() -> None:
    opening = Opening(ipaddress.ip_address("198.18.0.2"), Protocol.TCP, 22)
    back = parse_request(encode_request(GrantRequest("open", opening, 1.0, "x" * 500)), max_duration=MAX)
    assert back.client == "x" * 200
    forged = "CN=alice\n2026-11-22 05:00:00,000 sknock[1] INFO sknock.firewall: granted tcp/22 to 203.0.113.9"
    back = parse_request(encode_request(GrantRequest("open", opening, 1.0, forged)), max_duration=MAX)
    assert "\n" not in back.client and back.client.startswith("CN=alice?2026")


def test_a_long_non_ascii_subject_still_fits_one_message() -> None:
    opening = Opening(ipaddress.ip_address("fd00:5e::2"), Protocol.TCP, 22)
    subject = "CN=" + "ж" * 64 + ",O=" + "漢" * 64 + ",OU=" + "😀" * 64
    data = encode_request(GrantRequest("open", opening, 15.0, subject))
    assert len(data) <= MAX_MESSAGE
    back = parse_request(data, max_duration=MAX)
    assert back.opening == opening and subject.startswith(back.client) and back.client.startswith("CN=ж")


# -- every rule ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expires", [-1.0, float(2**40), math.nan, math.inf, -math.inf])
def test_bad_nonce_expiries(expires: float) -> None:
    assert "expir" in refused(message(expires=expires))


@pytest.mark.parametrize("received", [-1.0, float(2**40), math.nan, math.inf, -math.inf])
def test_bad_receipt_times(received: float) -> None:
    assert "receipt time" in refused(message(received=received))


def test_replay_key_leaves_out_the_address() -> None:
    a = parse_request(message(), max_duration=MAX)
    b = parse_request(message(address=bytes([198, 18, 0, 66]) + bytes(12)), max_duration=MAX)
    assert a.replay_key == b.replay_key
    assert parse_request(message(port=23), max_duration=MAX).replay_key != a.replay_key


def test_bad_port() -> None:
    assert "bad port" in refused(message(port=0))


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds(port: int) -> None:
    assert parse_request(message(port=port), max_duration=MAX).opening.port == port


@pytest.mark.parametrize("duration", [0.0, -0.0, -1.0, -0.5, MAX + 0.001, MAX + 1, math.nan, math.inf, -math.inf])
def test_bad_durations(duration: float) -> None:
    assert "bad duration" in refused(message(duration=duration))


def test_duration_bounds_follow_max_duration() -> None:
    assert parse_request(message(duration=MAX), max_duration=MAX).duration == MAX
    assert parse_request(message(duration=0.001), max_duration=MAX).duration == 0.001
    assert "at most 60" in refused(message(duration=61.0), max_duration=60)
    assert math.isclose(parse_request(message(duration=59.5), max_duration=60).duration, 59.5)


@pytest.mark.parametrize("op", [0, 3, 255])
def test_unknown_ops(op: int) -> None:
    assert "unknown op" in refused(message(op=op))


@pytest.mark.parametrize(("protocol", "reserved"), [(2, 0), (6, 0), (17, 0), (255, 0), (1, 1), (0, 255)])
def test_bad_protocols_and_reserved_byte(protocol: int, reserved: int) -> None:
    assert "bad protocol" in refused(message(protocol=protocol, reserved=reserved))


@pytest.mark.parametrize(
    ("family", "address"),
    [(4, "224.0.0.1"), (4, "239.255.255.250"), (4, "0.0.0.0"), (4, "255.255.255.255"),
     (6, "ff02::1"), (6, "ff05::2"), (6, "::")],
)
def test_multicast_unspecified_and_broadcast_addresses(family: int, address: str) -> None:
    packed = ipaddress.ip_address(address).packed.ljust(16, b"\0")
    assert "cannot be granted" in refused(message(family=family, address=packed))


def test_bad_address_families_and_padding() -> None:
    for family in (0, 2, 10, 41, 255):
        assert "bad address family" in refused(message(family=family))
    assert "after its fourth" in refused(message(address=bytes([198, 18, 0, 2]) + bytes(11) + b"\1"))
    # the same 16 bytes are a fine IPv6 address
    assert str(parse_request(message(family=6, address=v6("fd00::2")), max_duration=MAX).opening.address) == "fd00::2"


@pytest.mark.parametrize("client", [b"\xff\xfe", b"CN=\xc3", b"CN=alice\nINFO forged", b"\x00", b"x" * 201,
                                    "ж".encode() * 201])
def test_bad_client_names(client: bytes) -> None:
    assert "bad client" in refused(message(client=client))


def test_empty_client_name_is_fine() -> None:
    assert parse_request(message(client=b""), max_duration=MAX).client == ""


def test_oversize_and_truncated() -> None:
    assert "exceeds" in refused(message(client=b"x" * (MAX_MESSAGE + 1 - LAYOUT.size)))
    assert "exceeds" in refused(b"{" * 100_000)
    for junk in (b"", b"\x01", message()[: LAYOUT.size - 1], b"open 1.2.3.4 tcp 22"):
        assert "shorter" in refused(junk)
