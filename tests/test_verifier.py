"""The server's decision in memory: real certificates from the test PKI, real crypto, any timeline.

Each refusal class is shown refused with its reason, and counted.  No test reads the clock: each runs
at :data:`NOW` (the test PKI's fixed "now") or a fixed offset from it, and the clients' clock is fixed there."""

from __future__ import annotations

import ipaddress
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import sknock.trust
import sknock.verifier
from sknock.client import KnockClient
from sknock.credentials import ClientCredentials
from sknock.errors import KnockRefused, NotAuthorizedError, Reason
from sknock.ports import Protocol, parse_ports
from sknock.protocol import Action, fingerprint, solve_work
from sknock.trust import ClientVerifier, load_crl
from sknock.verifier import KnockVerifier, VerifierPolicy
from tests.forged import MALFORMED, seal
from tests.pki import NOW, TestPKI, at

SOURCE = ipaddress.ip_address("198.18.0.2")
TCP22 = [(Protocol.TCP, 22)]


def make_verifier(pki: TestPKI, **policy: object) -> KnockVerifier:
    return KnockVerifier(
        server_key=pki.server.credentials.key,
        server_certificate=pki.server.certificate,
        trust=pki.verifier(),
        policy=VerifierPolicy(**{"min_work_bits": 4, **policy}),  # type: ignore[arg-type]
    )


def client_for(pki: TestPKI, issued: object, **kw: object) -> KnockClient:
    creds: ClientCredentials = issued.credentials  # type: ignore[attr-defined]
    return KnockClient(credentials=creds, server_cert=pki.server.certificate, work_bits=4, clock=at(NOW), **kw)  # type: ignore[arg-type]


def refused(verifier: KnockVerifier, datagram: bytes, now: float, source: object = SOURCE) -> Reason:
    with pytest.raises(KnockRefused) as info:
        verifier.check(datagram, source, now)  # type: ignore[arg-type]
    return info.value.reason


def test_alice_is_granted(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = NOW
    grant = verifier.check(client_for(pki, pki.alice).build_knock([(Protocol.TCP, 2005)], now=now), SOURCE, now)
    assert grant.action is Action.OPEN
    assert grant.address == SOURCE
    assert grant.ports == ((Protocol.TCP, 2005),)
    assert grant.duration == 15.0
    assert "alice" in grant.client
    assert verifier.counters["granted"] == 1


@pytest.mark.parametrize("name", ["bob", "ed25519", "rsa"])
def test_intermediate_and_other_key_types_are_granted(pki: TestPKI, name: str) -> None:
    verifier = make_verifier(pki)
    now = NOW
    grant = verifier.check(client_for(pki, getattr(pki, name)).build_knock(TCP22, now=now), SOURCE, now)
    assert grant.ports == ((Protocol.TCP, 22),)


def test_exact_replay_is_refused_before_any_public_key_operation(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = NOW
    datagram = client_for(pki, pki.alice).build_knock(TCP22, now=now)
    verifier.check(datagram, SOURCE, now)
    assert refused(verifier, datagram, now + 0.5) is Reason.REPLAY_SEEN


def test_replay_with_resolved_work_is_refused_by_the_nonce_cache(pki: TestPKI) -> None:
    verifier = make_verifier(pki, min_work_bits=0)
    now = NOW
    datagram = client_for(pki, pki.alice).build_knock(TCP22, now=now)
    verifier.check(datagram, SOURCE, now)
    # Another verifier instance has not seen the digest (e.g. it was evicted); the nonce cache still holds.
    again = solve_work(datagram, datagram[4], start=int.from_bytes(datagram[14:22], "big") + 1)
    verifier._seen_digests = type(verifier._seen_digests)(10, evict_when_full=True)
    assert refused(verifier, again, now + 1) is Reason.REPLAY


def test_replay_cache_covers_the_whole_window(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = NOW
    datagram = client_for(pki, pki.alice).build_knock(TCP22, now=now)
    verifier.check(datagram, SOURCE, now)
    for later in (1.0, 6.9):
        assert refused(verifier, datagram, now + later) is Reason.REPLAY_SEEN
    assert refused(verifier, datagram, now + 9) is Reason.STALE


def test_timestamp_outside_the_window(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = int(NOW) + 0.9  # so that the whole-second clear time of now - 7.6 is within 8 s
    alice = client_for(pki, pki.alice)
    # 7.6 s old: the coarse clear time (1 s slack) passes, the signed millisecond timestamp does not.
    assert refused(verifier, alice.build_knock(TCP22, now=now - 7.6), now) is Reason.TIMESTAMP
    assert refused(verifier, alice.build_knock(TCP22, now=now + 7.6), now) is Reason.TIMESTAMP
    assert refused(verifier, alice.build_knock(TCP22, now=now - 60), now) is Reason.STALE
    verifier.check(alice.build_knock(TCP22, now=now - 6.5), SOURCE, now)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("mallory", Reason.CERT_REVOKED),
        ("old", Reason.CERT_EXPIRED),
        ("stranger", Reason.CERT_UNTRUSTED),
    ],
)
def test_certificate_refusals(pki: TestPKI, name: str, reason: Reason) -> None:
    verifier = make_verifier(pki)
    now = NOW
    client = KnockClient(credentials=getattr(pki, name).credentials, server_cert=pki.server.certificate,
                         work_bits=4, check_server_cert=False, clock=at(NOW))
    assert refused(verifier, client.build_knock(TCP22, now=now), now) is reason
    assert verifier.counters[reason.value] == 1


def test_port_not_named_in_the_certificate(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = NOW
    alice = client_for(pki, pki.alice)
    # The client library refuses locally; a hand-built knock is refused by the server.
    with pytest.raises(NotAuthorizedError, match="tcp/23"):
        alice.build_knock([(Protocol.TCP, 23)], now=now)
    # Make the client's local check permissive to reach the server's own check.
    alice.ports = parse_ports("tcp/1-65535,udp/1-65535")
    assert refused(verifier, alice.build_knock([(Protocol.TCP, 23)], now=now), now) is Reason.NOT_AUTHORIZED
    assert refused(verifier, alice.build_knock([(Protocol.UDP, 22)], now=now), now) is Reason.NOT_AUTHORIZED
    noports = client_for(pki, pki.noports)
    noports.ports = parse_ports("tcp/22")
    assert refused(verifier, noports.build_knock(TCP22, now=now), now) is Reason.NOT_AUTHORIZED


def test_signature_by_a_key_that_is_not_the_certificates(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = NOW
    thief = ClientCredentials(ec.generate_private_key(ec.SECP256R1()), pki.alice.certificate, ())
    client = KnockClient(credentials=thief, server_cert=pki.server.certificate, work_bits=4, clock=at(NOW))
    assert refused(verifier, client.build_knock(TCP22, now=now), now) is Reason.BAD_SIGNATURE


def test_source_address_binding(pki: TestPKI) -> None:
    now = NOW
    alice = client_for(pki, pki.alice)
    verifier = make_verifier(pki)
    bound = alice.build_knock(TCP22, now=now, source_address=ipaddress.ip_address("198.18.0.2"))
    assert refused(verifier, bound, now, ipaddress.ip_address("198.18.0.66")) is Reason.SOURCE_MISMATCH
    verifier = make_verifier(pki)
    assert verifier.check(bound, ipaddress.ip_address("::ffff:198.18.0.2"), now).address == SOURCE
    strict = make_verifier(pki, require_source_address=True)
    assert refused(strict, alice.build_knock(TCP22, now=now), now) is Reason.SOURCE_REQUIRED
    v6 = ipaddress.ip_address("fd00:5e::2")
    assert strict.check(alice.build_knock(TCP22, now=now, source_address=v6), v6, now).address == v6


def test_duration_is_capped_and_close_is_passed_on(pki: TestPKI) -> None:
    verifier = make_verifier(pki, max_duration=60)
    now = NOW
    alice = client_for(pki, pki.alice)
    assert verifier.check(alice.build_knock(TCP22, now=now, duration=3600), SOURCE, now).duration == 60
    assert verifier.check(alice.build_knock(TCP22, now=now, duration=30), SOURCE, now).duration == 30
    grant = verifier.check(alice.build_knock(TCP22, now=now, action=Action.CLOSE), SOURCE, now)
    assert grant.action is Action.CLOSE


def test_new_crl_drops_the_certificate_cache(pki: TestPKI, tmp_path: object) -> None:
    from sknock import ca as ca_lib
    from tests.pki import PASSWORD_BYTES

    authority = ca_lib.init_ca(tmp_path / "ca", PASSWORD_BYTES, name="cache CA", clock=at(NOW))  # type: ignore[operator]
    server_cert = authority.issue_server("s", PASSWORD_BYTES)
    from sknock.credentials import load_client_pfx, load_server_pfx

    server = load_server_pfx(authority.directory / "server" / "s.pfx", PASSWORD_BYTES)
    authority.issue_client("carol", pki.alice.ports, PASSWORD_BYTES)
    carol = load_client_pfx(authority.directory / "client" / "carol.pfx", PASSWORD_BYTES)

    def trust() -> ClientVerifier:
        crl = load_crl((authority.directory / "crl.der").read_bytes(), [authority.certificate], source="crl")
        return ClientVerifier([authority.certificate], (), [crl])

    verifier = KnockVerifier(server_key=server.key, server_certificate=server_cert, trust=trust(),
                             policy=VerifierPolicy(min_work_bits=0))
    client = KnockClient(credentials=carol, server_cert=server_cert, work_bits=0, clock=at(NOW))
    now = NOW
    verifier.check(client.build_knock(TCP22, now=now), SOURCE, now)
    authority.revoke("carol")
    verifier.check(client.build_knock(TCP22, now=now), SOURCE, now)  # cached verdict, old CRL
    verifier.set_trust(trust())
    assert refused(verifier, client.build_knock(TCP22, now=now), now) is Reason.CERT_REVOKED


def test_knock_for_another_server_is_refused_cheaply(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = NOW
    other = pki.stranger_ca.issue_server("other", b"test-password")
    client = KnockClient(credentials=pki.alice.credentials, server_cert=other, work_bits=4, check_server_cert=False,
                         clock=at(NOW))
    assert refused(verifier, client.build_knock(TCP22, now=now), now) is Reason.WRONG_SERVER


def test_junk_is_counted_and_never_raises_anything_else(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = NOW
    for size in (0, 10, 800, 1024, 1232, 1500):
        refused(verifier, os.urandom(size), now)
    assert sum(verifier.counters.values()) == 6
    assert verifier.counters["granted"] == 0


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_sealed_knock_with_a_malformed_certificate_is_refused_cert_invalid(pki: TestPKI, kind: str) -> None:
    """Anyone holding the server certificate can seal such a knock (issue 8): a typed refusal, counted,
    and a valid knock right after it is granted."""
    verifier = make_verifier(pki)
    now = NOW
    attacker = ec.generate_private_key(ec.SECP256R1())
    knock = seal(MALFORMED[kind](attacker), attacker, pki.server.certificate, TCP22, now=now, work_bits=4)
    assert refused(verifier, knock, now) is Reason.CERT_INVALID
    assert verifier.counters == {"cert-invalid": 1}
    assert verifier.check(client_for(pki, pki.alice).build_knock(TCP22, now=now), SOURCE, now).ports == tuple(TCP22)


# -- copies of one knock from several sources (issue 8, point 5) ----------------------------------------

A = ipaddress.ip_address("198.18.0.2")  # the address the knock is bound to
B = ipaddress.ip_address("198.18.0.66")  # an attacker who captured it
C = ipaddress.ip_address("fd00:5e::66")


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Counts the verifier's public-key work: each call of open_knock (one ECDH) is recorded."""
    import sknock.verifier as module

    calls: list[bytes] = []
    real = module.open_knock

    def counting(pre, **kw):  # type: ignore[no-untyped-def]
        calls.append(pre.body_digest)
        return real(pre, **kw)

    monkeypatch.setattr(module, "open_knock", counting)
    return calls


def test_a_copy_of_a_bound_knock_sent_first_from_elsewhere_does_not_burn_it(pki: TestPKI, opened: list[bytes]) -> None:
    verifier = make_verifier(pki)
    now = 1_000.0 + NOW  # every time below is this one or a fixed offset from it
    bound = client_for(pki, pki.alice).build_knock(TCP22, now=now, source_address=A)
    assert refused(verifier, bound, now + 0.01, B) is Reason.SOURCE_MISMATCH  # the attacker's copy, first
    grant = verifier.check(bound, A, now + 0.02)  # the genuine sender's: granted
    assert grant.address == A and grant.ports == tuple(TCP22)
    assert refused(verifier, bound, now + 0.03, A) is Reason.REPLAY_SEEN  # granted once
    assert refused(verifier, bound, now + 0.04, C) is Reason.REPLAY_SEEN  # and final for every source
    assert len(opened) == 1  # one public-key operation for all four copies
    assert verifier.counters == {"source-mismatch": 1, "granted": 1, "replay-seen": 2}


def test_copies_waiting_together_are_decided_by_one_verdict(pki: TestPKI, opened: list[bytes]) -> None:
    """As in the worker: every copy passes the cheap stage before the first reaches the expensive one."""
    verifier = make_verifier(pki)
    now = 1_000.0 + NOW
    bound = client_for(pki, pki.alice).build_knock(TCP22, now=now, source_address=A)
    waiting = [(verifier.precheck(bound, now, source), source) for source in (B, C, A)]
    with pytest.raises(KnockRefused) as info:
        verifier.precheck(bound, now, B)  # the same source again: a plain replay
    assert info.value.reason is Reason.REPLAY_SEEN
    outcomes = []
    for pre, source in waiting:
        try:
            outcomes.append(verifier.complete(pre, source, now + 0.01).address)
        except KnockRefused as refusal:
            outcomes.append(refusal.reason)
    assert outcomes == [Reason.SOURCE_MISMATCH, Reason.SOURCE_MISMATCH, A]
    assert len(opened) == 1


def test_a_knock_replayed_from_many_spoofed_sources_costs_one_public_key_operation(
    pki: TestPKI, opened: list[bytes]
) -> None:
    from sknock.verifier import MAX_SOURCES_PER_KNOCK

    verifier = make_verifier(pki)
    now = 1_000.0 + NOW
    bound = client_for(pki, pki.alice).build_knock(TCP22, now=now, source_address=A)
    spoofed = [ipaddress.ip_address(f"203.0.113.{i}") for i in range(1, 201)]
    waiting = []
    for source in spoofed[:100]:  # while the first copy waits: a bounded number of sources is admitted
        try:
            waiting.append((verifier.precheck(bound, now, source), source))
        except KnockRefused as refusal:
            assert refusal.reason is Reason.REPLAY_SEEN
    assert len(waiting) == MAX_SOURCES_PER_KNOCK
    for pre, source in waiting:
        with pytest.raises(KnockRefused) as info:
            verifier.complete(pre, source, now)
        assert info.value.reason is Reason.SOURCE_MISMATCH
    for source in spoofed[100:]:  # once the verdict is known, every copy is decided at once
        with pytest.raises(KnockRefused) as info:
            verifier.precheck(bound, now + 0.5, source)
        assert info.value.reason is Reason.SOURCE_MISMATCH
    assert verifier.check(bound, A, now + 1).address == A  # the genuine sender is still granted
    assert len(opened) == 1


def test_a_granted_unbound_knock_is_final_for_every_source(pki: TestPKI, opened: list[bytes]) -> None:
    verifier = make_verifier(pki)
    now = 1_000.0 + NOW
    unbound = client_for(pki, pki.alice).build_knock(TCP22, now=now)
    first, second = verifier.precheck(unbound, now, A), verifier.precheck(unbound, now, B)
    assert verifier.complete(first, A, now).address == A
    with pytest.raises(KnockRefused) as info:
        verifier.complete(second, B, now)
    assert info.value.reason is Reason.REPLAY_SEEN
    for source in (A, B, C):
        assert refused(verifier, unbound, now + 1, source) is Reason.REPLAY_SEEN
    assert len(opened) == 1


def test_a_refused_knock_is_refused_for_every_source_without_more_work(pki: TestPKI, opened: list[bytes]) -> None:
    verifier = make_verifier(pki)
    now = 1_000.0 + NOW
    mallory = KnockClient(credentials=pki.mallory.credentials, server_cert=pki.server.certificate, work_bits=4,
                          check_server_cert=False, clock=at(NOW))
    revoked = mallory.build_knock(TCP22, now=now, source_address=A)
    first, second = verifier.precheck(revoked, now, B), verifier.precheck(revoked, now, A)
    for pre, source in ((first, B), (second, A)):  # the verdict does not depend on the source
        with pytest.raises(KnockRefused) as info:
            verifier.complete(pre, source, now)
        assert info.value.reason is Reason.CERT_REVOKED
    assert refused(verifier, revoked, now + 1, C) is Reason.REPLAY_SEEN
    assert len(opened) == 1


def test_a_kept_verdict_is_still_held_to_the_time_window(pki: TestPKI) -> None:
    verifier = make_verifier(pki)
    now = float(int(1_000 + NOW)) + 0.5
    bound = client_for(pki, pki.alice).build_knock(TCP22, now=now, source_address=A)
    assert refused(verifier, bound, now, B) is Reason.SOURCE_MISMATCH
    # 7.4 s later the clear coarse time still passes the cheap check; the signed timestamp does not.
    assert refused(verifier, bound, now + 7.4, A) is Reason.TIMESTAMP


def test_a_nonce_granted_under_another_digest_is_not_granted_again_from_a_kept_verdict(pki: TestPKI) -> None:
    verifier = make_verifier(pki, min_work_bits=0)
    now = 1_000.0 + NOW
    bound = client_for(pki, pki.alice).build_knock(TCP22, now=now, source_address=A)
    assert refused(verifier, bound, now, B) is Reason.SOURCE_MISMATCH
    # The same knock reaches a verifier that has forgotten the digest and is granted there ...
    other = make_verifier(pki, min_work_bits=0)
    other._seen_nonces = verifier._seen_nonces
    assert other.check(bound, A, now).address == A
    # ... so the kept verdict here no longer grants it: the nonce is spent.
    assert refused(verifier, bound, now + 0.1, A) is Reason.REPLAY


def test_knock_memory_is_bounded_and_forgets_expired_digests() -> None:
    from sknock.verifier import KnockMemory, _Knock

    memory = KnockMemory(3)
    for i in range(5):
        memory.add(bytes([i]), _Knock(A, expiry=100.0 + i), now=0.0)
    assert len(memory) == 3
    assert memory.get(b"\x00", 0.0) is None and memory.get(b"\x01", 0.0) is None  # the earliest expiring went
    assert memory.get(b"\x04", 0.0) is not None
    assert memory.get(b"\x02", 102.5) is None  # expired
    memory.add(b"\x09", _Knock(A, expiry=200.0), now=103.5)
    assert len(memory) == 2  # the expired ones were dropped
    with pytest.raises(ValueError, match="must evict"):
        KnockMemory(3, evict_when_full=False)


def test_the_client_certificate_is_hashed_once_per_knock(pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier's certificate cache keys on the fingerprint; the trust check must not hash the DER again."""
    alice_der = pki.alice.certificate.public_bytes(serialization.Encoding.DER)
    hashed: list[bytes] = []

    def counting(certificate: object) -> bytes:
        digest = fingerprint(certificate)  # type: ignore[arg-type]
        hashed.append(digest)
        return digest

    monkeypatch.setattr(sknock.verifier, "fingerprint", counting)
    monkeypatch.setattr(sknock.trust, "fingerprint", counting)
    verifier = make_verifier(pki)
    now = NOW
    verifier.check(client_for(pki, pki.alice).build_knock(TCP22, now=now), SOURCE, now)  # not cached yet
    assert hashed.count(fingerprint(alice_der)) == 1
