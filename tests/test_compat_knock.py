"""Knocks made with the original sKnock's dev credentials (../shared/compat/sknock-v1-devpki).

A client holding devclient.pfx, encrypting to devserver.cer, builds knocks that a verifier holding
devserver.pfx's key and trusting the CA from that PKCS#12 (no CRL: the original published none)
grants, for exactly the ports the original certificate names: tcp/2000, tcp/3000, udp/8000.
Everything runs at a fixed time inside the certificates' validity, so the test does not rot.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from sknock.client import KnockClient
from sknock.credentials import ServerCredentials, load_certificate, load_server_pfx
from sknock.errors import KnockRefused, NotAuthorizedError, Reason
from sknock.ports import Protocol
from sknock.protocol import MAX_DATAGRAM, Action
from sknock.trust import ClientVerifier, verify_server_certificate
from sknock.verifier import KnockVerifier
from tests.pki import TestPKI

DEVPKI = Path(__file__).resolve().parents[2] / "shared/compat/sknock-v1-devpki"
PASSWORD = "portknocking"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # inside 2017-06-27 .. 2027-06-25
SOURCE = ipaddress.ip_address("198.18.0.2")

pytestmark = pytest.mark.skipif(not DEVPKI.is_dir(), reason=f"no sKnock v1 dev PKI at {DEVPKI} (../shared absent)")


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> Iterator[None]:
    # The original CA has serial 0; sknock silences exactly that warning, so any warning fails here.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture
def server() -> ServerCredentials:
    return load_server_pfx(DEVPKI / "devserver.pfx", PASSWORD)


@pytest.fixture
def verifier(server: ServerCredentials) -> KnockVerifier:
    assert server.ca_certificates, "devserver.pfx carries the sKnock Test CA"
    return KnockVerifier(
        server_key=server.key,
        server_certificate=server.certificate,
        trust=ClientVerifier(list(server.ca_certificates)),
    )


def dev_client(**kwargs: object) -> KnockClient:
    # check_server_cert=False: the client's own check of devserver.cer against its CA uses today's
    # date; it is checked at NOW below, and at today's date in the test after (while still valid).
    return KnockClient(
        client_pfx=DEVPKI / "devclient.pfx",
        pfx_password=PASSWORD,
        server_cert=DEVPKI / "devserver.cer",
        check_server_cert=False,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("protocol", "port"), [(Protocol.TCP, 2000), (Protocol.TCP, 3000), (Protocol.UDP, 8000)], ids=str
)
def test_original_client_knocks_are_granted(verifier: KnockVerifier, protocol: Protocol, port: int) -> None:
    now = NOW.timestamp()
    datagram = dev_client().build_knock([(protocol, port)], now=now)
    assert len(datagram) <= MAX_DATAGRAM
    grant = verifier.check(datagram, SOURCE, now)
    assert grant.action is Action.OPEN
    assert grant.ports == ((protocol, port),)
    assert grant.address == SOURCE
    assert grant.client.startswith("CN=sKnock Test Client")


def test_all_three_ports_in_one_knock(verifier: KnockVerifier) -> None:
    now = NOW.timestamp()
    ports = [(Protocol.TCP, 2000), (Protocol.TCP, 3000), (Protocol.UDP, 8000)]
    assert verifier.check(dev_client().build_knock(ports, now=now), SOURCE, now).ports == tuple(ports)


@pytest.mark.parametrize(
    ("protocol", "port"), [(Protocol.TCP, 22), (Protocol.UDP, 2000), (Protocol.TCP, 8000)], ids=str
)
def test_ports_the_original_certificate_does_not_name_are_refused_locally(protocol: Protocol, port: int) -> None:
    with pytest.raises(NotAuthorizedError, match=f"does not authorize {protocol.label}/{port}") as info:
        dev_client().build_knock([(protocol, port)], now=NOW.timestamp())
    assert "sKnock Test Client" in str(info.value)


def test_server_certificate_is_the_one_the_client_ca_issued(server: ServerCredentials) -> None:
    client = dev_client()
    assert client.server_certificate == load_certificate(DEVPKI / "devserver.cer") == server.certificate
    verify_server_certificate(client.server_certificate, client.credentials.ca_certificates, NOW)


@pytest.mark.skipif(
    dt.datetime.now(dt.UTC) >= dt.datetime(2027, 6, 25, tzinfo=dt.UTC), reason="the original dev certificates expired"
)
def test_default_client_accepts_the_original_server_today(verifier: KnockVerifier) -> None:
    client = KnockClient(
        client_pfx=DEVPKI / "devclient.pfx", pfx_password=PASSWORD, server_cert=DEVPKI / "devserver.cer"
    )
    now = dt.datetime.now(dt.UTC).timestamp()
    assert verifier.check(client.build_knock([(Protocol.TCP, 2000)], now=now), SOURCE, now).ports == (
        (Protocol.TCP, 2000),
    )


def test_an_original_knock_is_good_once(verifier: KnockVerifier) -> None:
    now = NOW.timestamp()
    datagram = dev_client().build_knock([(Protocol.TCP, 3000)], now=now)
    verifier.check(datagram, SOURCE, now)
    with pytest.raises(KnockRefused) as info:
        verifier.check(datagram, SOURCE, now + 1)
    assert info.value.reason is Reason.REPLAY_SEEN


def test_a_knock_for_the_original_server_is_refused_by_ours(pki: TestPKI) -> None:
    now = NOW.timestamp()
    datagram = dev_client().build_knock([(Protocol.TCP, 2000)], now=now)
    ours = KnockVerifier(
        server_key=pki.server.credentials.key, server_certificate=pki.server.certificate, trust=pki.verifier()
    )
    with pytest.raises(KnockRefused) as info:
        ours.check(datagram, SOURCE, now)
    assert info.value.reason is Reason.WRONG_SERVER
