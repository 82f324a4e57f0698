"""The knock codec: test vectors checked step by step as docs/protocol.md describes them, round trips
for every supported key type, size limits, and total parsing under hypothesis."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sknock.errors import KnockBuildError, KnockRefused, Reason
from sknock.ports import Protocol
from sknock.protocol import (
    BUCKETS,
    Action,
    KnockRequest,
    fingerprint,
    max_certificate_size,
    open_knock,
    parse_plaintext,
    precheck,
    seal_knock,
    verify_signature,
)
from sknock.protocol.wire import leading_zero_bits, solve_work
from tests.pki import TestPKI

VECTOR = json.loads((Path(__file__).parent / "vectors" / "knock-v1.json").read_text())
NOW = 1767225600.5


def _key(scalar_hex: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(scalar_hex, 16), ec.SECP256R1())


SERVER = _key(VECTOR["server_private_scalar"])
CLIENT = _key(VECTOR["client_private_scalar"])
SERVER_FP = bytes.fromhex(VECTOR["server_fingerprint"])
KEY_IDS = frozenset({SERVER_FP[:4]})
DATAGRAM = bytes.fromhex(VECTOR["datagram"])


def vector_request() -> KnockRequest:
    return KnockRequest(
        ports=((Protocol.TCP, 22), (Protocol.UDP, 8000)),
        timestamp_ms=VECTOR["timestamp_ms"],
        nonce=bytes.fromhex(VECTOR["nonce"]),
        source_address=ipaddress.IPv4Address(VECTOR["source_address"]),
        duration=VECTOR["duration"],
    )


def full_open(datagram: bytes, *, now: float = NOW, min_work_bits: int = 0):  # type: ignore[no-untyped-def]
    pre = precheck(datagram, now=now, window=7, min_work_bits=min_work_bits, key_ids=KEY_IDS)
    return open_knock(pre, server_key=SERVER, server_fingerprint=SERVER_FP)


# --- test vector ---------------------------------------------------------------------------------


def test_vector_is_reproduced_exactly() -> None:
    datagram = seal_knock(
        vector_request(),
        client_key=CLIENT,
        client_certificate=bytes.fromhex(VECTOR["client_certificate"]),
        server_public_key=SERVER.public_key(),
        server_fingerprint=SERVER_FP,
        work_bits=VECTOR["work_bits"],
        ephemeral_key=_key(VECTOR["ephemeral_private_scalar"]),
    )
    assert datagram == DATAGRAM


def test_vector_decodes_by_the_documented_steps() -> None:
    """Re-derive everything with raw primitives, following docs/protocol.md, not sknock's code."""
    d = DATAGRAM
    assert len(d) == 1024
    magic, version, suite, work_bits, flags, coarse, key_id, work_nonce = struct.unpack("!2sBBBBI4sQ", d[:22])
    assert (magic, version, suite, work_bits, flags) == (b"sK", 1, 1, 8, 0)
    assert coarse == VECTOR["timestamp_ms"] // 1000
    assert key_id == SERVER_FP[:4]
    # proof of work
    digest = hashlib.sha256(d[:14] + d[22:]).digest()
    work = hashlib.sha256(b"sknock/v1/work" + digest + work_nonce.to_bytes(8, "big")).digest()
    assert work[0] == 0  # 8 leading zero bits
    # key agreement and derivation
    point = d[22:87]  # uncompressed P-256 point
    assert point[0] == 4
    assert point.hex() == VECTOR["ephemeral_public"]
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    shared = SERVER.exchange(ec.ECDH(), peer)
    assert shared.hex() == VECTOR["shared_secret"]
    okm = HKDF(hashes.SHA256(), 44, salt=SERVER_FP, info=b"sknock/v1/key" + bytes((1, 1)) + point).derive(shared)
    plaintext = AESGCM(okm[:32]).decrypt(okm[32:], d[87:], d[:14] + point)
    assert len(plaintext) == 1024 - 22 - 65 - 16
    # plaintext fields
    ts, nonce, action, family = struct.unpack_from("!Q16sBB", plaintext)
    assert (ts, nonce, action, family) == (VECTOR["timestamp_ms"], bytes(range(16)), 1, 4)
    assert plaintext[26:30] == ipaddress.IPv4Address("198.18.0.2").packed
    duration, count = struct.unpack_from("!IB", plaintext, 30)
    assert (duration, count) == (30, 2)
    assert plaintext[35:41] == bytes([1, 0, 22, 0, 0x1F, 0x40])
    cert_len = int.from_bytes(plaintext[41:43], "big")
    cert = plaintext[43 : 43 + cert_len]
    assert cert.hex() == VECTOR["client_certificate"]
    sig_at = 43 + cert_len
    sig_len = int.from_bytes(plaintext[sig_at : sig_at + 2], "big")
    signature = plaintext[sig_at + 2 : sig_at + 2 + sig_len]
    assert not any(plaintext[sig_at + 2 + sig_len :])
    message = b"sknock/v1/signature" + bytes((1, 1)) + point + SERVER_FP + plaintext[:sig_at]
    CLIENT.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_vector_opens_with_the_codec() -> None:
    opened = full_open(DATAGRAM, min_work_bits=8)
    assert opened.request == vector_request()
    assert opened.certificate.hex() == VECTOR["client_certificate"]
    verify_signature(CLIENT.public_key(), opened.signature, opened.signed_message)


# --- round trips ---------------------------------------------------------------------------------


def _client_keys() -> list[object]:
    return [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 2048),
    ]


@pytest.mark.parametrize("server_curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["P-256", "P-384"])
@pytest.mark.parametrize("client_key", _client_keys(), ids=["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa2048"])
def test_round_trip(server_curve: ec.EllipticCurve, client_key: object) -> None:
    server = ec.generate_private_key(server_curve)
    fp = os.urandom(32)
    request = KnockRequest(
        ports=((Protocol.TCP, 2000), (Protocol.TCP, 65535), (Protocol.UDP, 1)),
        timestamp_ms=int(NOW * 1000),
        nonce=os.urandom(16),
        action=Action.CLOSE,
        source_address=ipaddress.IPv6Address("fd00::2"),
    )
    datagram = seal_knock(
        request,
        client_key=client_key,  # type: ignore[arg-type]
        client_certificate=os.urandom(700),
        server_public_key=server.public_key(),
        server_fingerprint=fp,
        work_bits=4,
    )
    assert len(datagram) in BUCKETS
    pre = precheck(datagram, now=NOW, window=7, min_work_bits=4, key_ids=frozenset({fp[:4]}))
    opened = open_knock(pre, server_key=server, server_fingerprint=fp)
    assert opened.request == request
    verify_signature(client_key.public_key(), opened.signature, opened.signed_message)  # type: ignore[attr-defined]


def _seal(cert: bytes, **kw: object) -> bytes:
    request = kw.pop("request", None) or KnockRequest(
        ports=((Protocol.TCP, 22),), timestamp_ms=int(NOW * 1000), nonce=os.urandom(16)
    )
    args: dict[str, object] = dict(
        client_key=CLIENT,
        client_certificate=cert,
        server_public_key=SERVER.public_key(),
        server_fingerprint=SERVER_FP,
        work_bits=0,
    )
    args.update(kw)
    return seal_knock(request, **args)  # type: ignore[arg-type]


def test_800_byte_p256_certificate_fits_one_ipv6_minimum_mtu_datagram() -> None:
    datagram = _seal(os.urandom(800))
    assert len(datagram) <= 1232
    assert max_certificate_size(CLIENT) >= 800


def test_packet_size_hides_certificate_size_within_a_bucket() -> None:
    sizes = {len(_seal(os.urandom(n))) for n in (300, 500, 650, 750)}
    assert sizes == {1024}
    assert len(_seal(os.urandom(1000))) == 1232


def test_too_large_certificate_is_refused_before_sending() -> None:
    with pytest.raises(KnockBuildError, match="too large"):
        _seal(os.urandom(max_certificate_size(CLIENT) + 60))


# --- refusals of the cheap checks ----------------------------------------------------------------


def _patched(offset: int, value: bytes) -> bytes:
    return DATAGRAM[:offset] + value + DATAGRAM[offset + len(value) :]


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (DATAGRAM[:-1], Reason.BAD_LENGTH),
        (DATAGRAM + b"\0", Reason.BAD_LENGTH),
        (b"", Reason.BAD_LENGTH),
        (_patched(0, b"SK"), Reason.BAD_MAGIC),
        (_patched(2, b"\x02"), Reason.UNSUPPORTED_VERSION),
        (_patched(3, b"\x09"), Reason.UNSUPPORTED_SUITE),
        (_patched(5, b"\x01"), Reason.MALFORMED_HEADER),
        (_patched(6, (VECTOR["timestamp_ms"] // 1000 - 60).to_bytes(4, "big")), Reason.STALE),
        (_patched(10, b"\0\0\0\0"), Reason.WRONG_SERVER),
        (_patched(4, b"\x10"), Reason.INSUFFICIENT_WORK),  # claims 16 bits it does not have
    ],
)
def test_precheck_refusals(datagram: bytes, reason: Reason) -> None:
    with pytest.raises(KnockRefused) as info:
        full_open(datagram)
    assert info.value.reason is reason


def test_server_demands_its_minimum_work() -> None:
    with pytest.raises(KnockRefused) as info:
        full_open(DATAGRAM, min_work_bits=12)
    assert info.value.reason is Reason.INSUFFICIENT_WORK


def test_stale_window_uses_the_callers_clock() -> None:
    full_open(DATAGRAM, now=NOW + 7)
    with pytest.raises(KnockRefused) as info:
        full_open(DATAGRAM, now=NOW + 30)
    assert info.value.reason is Reason.STALE


def test_replay_key_ignores_the_work_nonce() -> None:
    """Re-solving the proof of work gives another datagram with the same replay key."""
    again = solve_work(DATAGRAM, 8, start=int.from_bytes(DATAGRAM[14:22], "big") + 1)
    assert again != DATAGRAM
    assert full_open(again).replay_key == full_open(DATAGRAM).replay_key


def test_signature_binds_the_server_identity() -> None:
    opened = full_open(DATAGRAM)
    other_server = opened.signed_message.replace(SERVER_FP, os.urandom(32))
    with pytest.raises(KnockRefused) as info:
        verify_signature(CLIENT.public_key(), opened.signature, other_server)
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_signature_by_another_key_is_refused() -> None:
    opened = full_open(DATAGRAM)
    with pytest.raises(KnockRefused) as info:
        verify_signature(ec.generate_private_key(ec.SECP256R1()).public_key(), opened.signature, opened.signed_message)
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_clear_and_signed_timestamps_must_agree() -> None:
    # A knock whose clear coarse time was rewritten is refused (the AEAD covers it).
    with pytest.raises(KnockRefused) as info:
        full_open(solve_work(_patched(6, (VECTOR["timestamp_ms"] // 1000 + 1).to_bytes(4, "big")), 8))
    assert info.value.reason is Reason.DECRYPT_FAILED


# --- total parsing (hypothesis) ------------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1400))
def test_any_bytes_are_refused_cleanly(data: bytes) -> None:
    with pytest.raises(KnockRefused):
        full_open(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1024 - 22, max_size=1024 - 22))
def test_well_formed_header_with_random_body_is_refused_cleanly(body: bytes) -> None:
    datagram = solve_work(_patched(4, b"\x00")[:14] + bytes(8) + body, 0)  # valid header, work_bits 0
    with pytest.raises(KnockRefused):
        full_open(datagram)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_knocks_are_refused_unless_only_the_work_nonce_changed(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 8))
    mutated = bytearray(DATAGRAM)
    positions = data.draw(st.lists(st.integers(0, len(DATAGRAM) - 1), min_size=n, max_size=n, unique=True))
    for pos in positions:
        mutated[pos] ^= data.draw(st.integers(1, 255))
    try:
        opened = full_open(bytes(mutated))
    except KnockRefused:
        return
    # Only the unauthenticated work nonce may change and still open; the request is then identical
    # and so is the replay key, so the server's replay cache refuses it.
    assert all(14 <= pos < 22 for pos in positions)
    assert opened.request == vector_request()
    assert opened.replay_key == full_open(DATAGRAM).replay_key


@settings(max_examples=500)
@given(st.binary(max_size=1200))
def test_plaintext_parser_is_total(data: bytes) -> None:
    try:
        parsed = parse_plaintext(data)
    except KnockRefused as exc:
        assert exc.reason is Reason.MALFORMED
    else:
        assert 1 <= len(parsed.request.ports) <= 32


def test_leading_zero_bits() -> None:
    assert leading_zero_bits(b"\x00\x00\x80" + bytes(29)) == 16
    assert leading_zero_bits(b"\x01" + bytes(31)) == 7
    assert leading_zero_bits(bytes(32)) == 256


def test_fingerprint_is_sha256_of_der(pki: TestPKI) -> None:
    """One fingerprint function for DER and for a loaded certificate (it was two, in protocol and credentials)."""
    der = (pki.ca_dir / "ca.cer").read_bytes()
    assert fingerprint(pki.ca_cert) == hashlib.sha256(der).digest()
    assert fingerprint(der) == fingerprint(pki.ca_cert)
