"""One certificate per server (issue 9 §6, docs/pki.md "One certificate per server").

Two servers given the same server .pfx (an HA pair) accept each other's knocks: each keeps its own replay
store, so a knock granted by one and replayed to the other from another address is granted again.  Servers
with a certificate each, as ``sknock-ca server NAME`` makes them, refuse a knock made for the other
(``wrong-server``).  These tests pin both statements of the docs on the server's real decision (the
verifier every worker runs), with real certificates and real knocks."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sknock import ca as ca_lib
from sknock.client import KnockClient
from sknock.credentials import load_server_pfx
from sknock.errors import KnockRefused
from sknock.ports import Protocol, parse_ports
from sknock.trust import ClientVerifier
from sknock.verifier import KnockVerifier
from tests.pki import NOW, PASSWORD, PASSWORD_BYTES, TestPKI, at

ALICE = ipaddress.ip_address("198.18.0.2")
EVE = ipaddress.ip_address("198.18.0.66")


def server_verifier(pfx: Path, trust: ClientVerifier) -> KnockVerifier:
    server = load_server_pfx(pfx, PASSWORD)
    return KnockVerifier(server_key=server.key, server_certificate=server.certificate, trust=trust)


def test_two_servers_sharing_a_certificate_accept_each_others_replayed_knocks(pki: TestPKI) -> None:
    first, second = (server_verifier(pki.server.pfx, pki.verifier()) for _ in range(2))
    alice = KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=pki.server.cer, clock=at(NOW))
    now = NOW
    datagram = alice.build_knock([(Protocol.TCP, 22)], now=now)
    assert first.check(datagram, ALICE, now).address == ALICE
    with pytest.raises(KnockRefused):  # the first server refuses the copy ...
        first.check(datagram, EVE, now + 1)
    # ... the second, with its own replay store, grants it to whoever sent it: what docs/pki.md warns of
    assert second.check(datagram, EVE, now + 1).address == EVE


def test_servers_with_their_own_certificates_refuse_each_others_knocks(tmp_path: Path) -> None:
    authority = ca_lib.init_ca(tmp_path / "ca", PASSWORD_BYTES, name="HA pair CA", clock=at(NOW))
    for name in ("ha-a", "ha-b"):
        authority.issue_server(name, PASSWORD_BYTES)
    authority.issue_client("alice", parse_ports("tcp/22"), PASSWORD_BYTES)
    trust = ClientVerifier([authority.certificate])
    pfx_a, pfx_b = (authority.directory / "server" / f"{name}.pfx" for name in ("ha-a", "ha-b"))
    a, b = server_verifier(pfx_a, trust), server_verifier(pfx_b, trust)
    assert load_server_pfx(pfx_a, PASSWORD).key.public_key() != load_server_pfx(pfx_b, PASSWORD).key.public_key()
    alice = KnockClient(client_pfx=authority.directory / "client" / "alice.pfx", pfx_password=PASSWORD,
                        server_cert=authority.directory / "server" / "ha-a.cer", clock=at(NOW))
    now = NOW
    datagram = alice.build_knock([(Protocol.TCP, 22)], now=now)
    assert a.check(datagram, ALICE, now).address == ALICE
    with pytest.raises(KnockRefused) as info:
        b.check(datagram, EVE, now + 1)
    assert info.value.reason == "wrong-server"
