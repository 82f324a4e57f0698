"""The worker -> firewall process messages (every byte hostile) and the privilege drop itself."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import pwd
import select
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sknock.ports import Protocol
from sknock.server.firewall.base import Opening
from sknock.server.privsep import (
    MAX_MESSAGE,
    GrantRequest,
    PrivsepError,
    drop_privileges,
    encode_request,
    parse_request,
)

MAX = 3600.0
GOOD: dict[str, Any] = {
    "op": "open",
    "address": "198.18.0.2",
    "protocol": "tcp",
    "port": 22,
    "duration": 15,
    "client": "CN=alice",
    "nonce": "00112233445566778899aabbccddeeff",
    "expires": 1767225607.5,
}


def message(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def refused(data: bytes, max_duration: float = MAX) -> str:
    with pytest.raises(PrivsepError) as info:
        parse_request(data, max_duration=max_duration)
    return str(info.value)


def test_the_good_message_parses() -> None:
    request = parse_request(message(), max_duration=MAX)
    assert request == GrantRequest(
        "open", Opening(ipaddress.ip_address("198.18.0.2"), Protocol.TCP, 22), 15.0, "CN=alice",
        bytes.fromhex("00112233445566778899aabbccddeeff"), 1767225607.5,
    )
    assert isinstance(request.duration, float)
    assert parse_request(message(op="close", protocol="udp", address="fd00::2"), max_duration=MAX).op == "close"


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
    return request


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=MAX_MESSAGE + 64))
def test_any_bytes_give_a_request_or_a_privsep_error(data: bytes) -> None:
    _parse_or_privsep_error(data)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["open", "close", "tcp", "udp", "TCP", " tcp", "198.18.0.2", "fd00::2", "fe80::1%eth0",
                       "224.0.0.1", "0.0.0.0", "::", "ff02::1", "1.2.3.4/32"])
)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(GOOD)), _json_values), st.booleans())
def test_any_json_fields_give_a_request_or_a_privsep_error(fields: dict[str, Any], complete: bool) -> None:
    """Structured input reaches the field checks (random bytes almost never do)."""
    data = json.dumps({**GOOD, **fields} if complete else fields).encode()
    request = _parse_or_privsep_error(data)
    if request is not None:
        # whatever was accepted is exactly what the worker could have sent
        assert parse_request(encode_request(request), max_duration=MAX) == request


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_addresses = st.ip_addresses().filter(lambda a: not a.is_multicast and not a.is_unspecified and a != _BROADCAST)
_requests = st.builds(
    GrantRequest,
    op=st.sampled_from(["open", "close"]),
    opening=st.builds(Opening, address=_addresses, protocol=st.sampled_from(Protocol),
                      port=st.integers(1, 65535)),
    duration=st.floats(min_value=0.001, max_value=MAX) | st.integers(1, int(MAX)).map(float),
    client=st.text(max_size=200),
    nonce=st.binary(min_size=16, max_size=16),
    expires=st.floats(0, 2**40, exclude_max=True),
)


@settings(max_examples=400, deadline=None)
@given(_requests)
def test_round_trip(request: GrantRequest) -> None:
    """Every request the worker can make fits one message and comes back unchanged -- whatever the
    client's subject holds (a certificate subject may be any Unicode)."""
    data = encode_request(request)
    assert len(data) <= MAX_MESSAGE
    back = parse_request(data, max_duration=MAX)
    assert (back.op, back.opening, back.duration) == (request.op, request.opening, request.duration)
    assert (back.nonce, back.expires) == (request.nonce, request.expires)
    assert request.client.startswith(back.client)


def test_client_names_are_cut_to_200_characters() -> None:
    opening = Opening(ipaddress.ip_address("198.18.0.2"), Protocol.TCP, 22)
    back = parse_request(encode_request(GrantRequest("open", opening, 1.0, "x" * 500)), max_duration=MAX)
    assert back.client == "x" * 200
    assert parse_request(message(client="y" * 300), max_duration=MAX).client == "y" * 200


def test_a_long_non_ascii_subject_still_fits_one_message() -> None:
    opening = Opening(ipaddress.ip_address("fd00:5e::2"), Protocol.TCP, 22)
    subject = "CN=" + "ж" * 64 + ",O=" + "漢" * 64 + ",OU=" + "😀" * 64
    data = encode_request(GrantRequest("open", opening, 15.0, subject))
    assert len(data) <= MAX_MESSAGE
    back = parse_request(data, max_duration=MAX)
    assert back.opening == opening and subject.startswith(back.client) and back.client.startswith("CN=ж")


# -- every rule ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nonce", ["", "00" * 15, "00" * 17, "0G" * 16, "AA" * 16, 7, None, ["00" * 16]])
def test_bad_nonces(nonce: object) -> None:
    assert "nonce" in refused(message(nonce=nonce))


@pytest.mark.parametrize("expires", [-1.0, float(2**40), 7, "1.0", None, True])
def test_bad_nonce_expiries(expires: object) -> None:
    assert "expir" in refused(message(expires=expires))


def test_replay_key_leaves_out_the_address() -> None:
    a = parse_request(message(), max_duration=MAX)
    b = parse_request(message(address="198.18.0.66"), max_duration=MAX)
    assert a.replay_key == b.replay_key
    assert parse_request(message(port=23), max_duration=MAX).replay_key != a.replay_key


@pytest.mark.parametrize("port", [0, 65536, -1, True, False, 22.0, "22", None, [22], 10**30])
def test_bad_ports(port: object) -> None:
    assert "bad port" in refused(message(port=port))


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds(port: int) -> None:
    assert parse_request(message(port=port), max_duration=MAX).opening.port == port


@pytest.mark.parametrize("duration", [0, 0.0, -1, -0.5, MAX + 0.001, MAX + 1, True, "15", None, 10**309, -(10**309)])
def test_bad_durations(duration: object) -> None:
    assert "bad duration" in refused(message(duration=duration))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_durations(literal: str) -> None:
    data = message().replace(b'"duration": 15', b'"duration": ' + literal.encode())
    assert literal.encode() in data
    assert "bad duration" in refused(data)


def test_duration_bounds_follow_max_duration() -> None:
    assert parse_request(message(duration=MAX), max_duration=MAX).duration == MAX
    assert parse_request(message(duration=0.001), max_duration=MAX).duration == 0.001
    assert "at most 60" in refused(message(duration=61), max_duration=60)
    assert math.isclose(parse_request(message(duration=59.5), max_duration=60).duration, 59.5)


@pytest.mark.parametrize("op", ["OPEN", "delete", "flush", "", None, 1, ["open"]])
def test_unknown_ops(op: object) -> None:
    assert "unknown op" in refused(message(op=op))


def test_fields_must_be_exactly_the_six() -> None:
    assert "wrong fields" in refused(message(extra=1))
    assert "wrong fields" in refused(message(command="rm -rf /"))
    for name in GOOD:
        fields = dict(GOOD)
        del fields[name]
        assert "wrong fields" in refused(json.dumps(fields).encode())
    for top in (b"[]", b'"open"', b"1", b"null", json.dumps([GOOD]).encode()):
        assert "wrong fields" in refused(top)


@pytest.mark.parametrize(
    "address",
    ["224.0.0.1", "239.255.255.250", "ff02::1", "ff05::2", "0.0.0.0", "::", "255.255.255.255"],
)
def test_multicast_and_unspecified_addresses(address: str) -> None:
    assert "cannot be granted" in refused(message(address=address))


@pytest.mark.parametrize(
    "address",
    ["198.18.0.256", "198.18.0.0/24", "example.org", "", "fe80::1%eth0", "fe80::1%$(reboot)", "fd00::2%a b",
     16909060, None, ["198.18.0.2"]],
)
def test_bad_addresses(address: object) -> None:
    """Only an address in text, as the worker writes it: no integers, networks, names or IPv6 scope
    ids (a scope is free text that would reach the firewall backend, e.g. a command template)."""
    assert "bad address" in refused(message(address=address))


@pytest.mark.parametrize("protocol", ["icmp", "sctp", "", 6, 1, None, ["tcp"]])
def test_bad_protocols(protocol: object) -> None:
    assert "bad address or protocol" in refused(message(protocol=protocol))


@pytest.mark.parametrize("client", [None, 1, ["CN=alice"], {"cn": "alice"}])
def test_bad_client_names(client: object) -> None:
    assert "bad client" in refused(message(client=client))


def test_oversize_and_not_json() -> None:
    big = message(client="x" * 100)
    big += b" " * (MAX_MESSAGE + 1 - len(big))
    assert len(big) == MAX_MESSAGE + 1
    assert "exceeds" in refused(big)
    assert "exceeds" in refused(b"{" * 100_000)
    padded = message(client="x") + b" " * (MAX_MESSAGE - len(message(client="x")))
    assert len(padded) == MAX_MESSAGE
    assert parse_request(padded, max_duration=MAX).client == "x"
    for junk in (b"", b"\xff\xfe", b"{", b"open 1.2.3.4 tcp 22", b"\x00" * 20):
        assert "not JSON" in refused(junk)


# -- drop_privileges --------------------------------------------------------------------------------------------------


def _in_child(body: Any, timeout: float = 20) -> dict[str, Any]:
    """Run ``body()`` in a forked child; return the dict it returns (or its exception's text)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        code = 0
        try:
            os.close(read_end)
            try:
                result = body()
            except BaseException as exc:  # noqa: BLE001 -- report anything to the parent
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child did not finish")
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(b"".join(chunks))  # type: ignore[no-any-return]


def _drop_and_look() -> dict[str, Any]:
    uid, gid = drop_privileges("nobody")
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    try:
        os.setgroups([0])
        groups_regained = True
    except PermissionError:
        groups_regained = False
    return {
        "returned": [uid, gid],
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
        "resuid": list(os.getresuid()),
        "groups": os.getgroups(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "cap_eff": status["CapEff"].strip(),
        "regained": regained,
        "groups_regained": groups_regained,
    }


def test_drop_privileges_really_drops_for_good() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    nobody = pwd.getpwnam("nobody")
    result = _in_child(_drop_and_look)
    assert "error" not in result, result
    assert result["returned"] == [nobody.pw_uid, nobody.pw_gid]
    assert result["ids"] == [nobody.pw_uid, nobody.pw_uid, nobody.pw_gid, nobody.pw_gid]
    assert result["resuid"] == [nobody.pw_uid] * 3  # no saved uid 0 to go back to
    assert result["groups"] == []
    assert result["no_new_privs"] == "1"
    assert int(result["cap_eff"], 16) == 0
    assert result["regained"] is False and result["groups_regained"] is False
    assert os.geteuid() == 0  # the test process itself is untouched


@pytest.mark.parametrize("user", ["root", "no-such-user-sknock-test"])
def test_drop_privileges_refuses_root_and_unknown_users(user: str) -> None:
    if user == "root" and pwd.getpwnam("root").pw_uid != 0:
        pytest.skip("no root user here")

    def attempt() -> dict[str, Any]:
        try:
            drop_privileges(user)
        except Exception as exc:  # noqa: BLE001
            return {"type": type(exc).__name__, "message": str(exc), "uid": os.getuid()}
        return {"type": None, "uid": os.getuid()}

    before = os.getuid()
    result = _in_child(attempt)
    assert result["type"] == "PrivsepError"
    assert ("is root" if user == "root" else "does not exist") in result["message"]
    assert result["uid"] == before  # nothing was changed before refusing
