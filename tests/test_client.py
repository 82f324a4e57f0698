"""The client library against real sockets on loopback: real certificates, real crypto, real datagrams.

A test "server" here is a plain UDP socket (the knock lands there) plus the sans-I/O KnockVerifier
(the server's whole decision), and for ``verify=True`` a plain TCP socket that is listening (the port
"opened") or bound without listening (connections refused: the port stayed closed).  Every wait is
bounded by a socket timeout.  Knocks are stamped and checked at the test PKI's fixed :data:`NOW` (the
clients are given it as their clock); only the waits read the (monotonic) clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sknock import ca as ca_lib
from sknock.addresses import IPAddress
from sknock.certificate import ports_general_name
from sknock.client import AsyncKnockClient, KnockClient, knock, resolve
from sknock.credentials import ClientCredentials, ServerCredentials, load_client_pfx, load_server_pfx
from sknock.errors import (
    ClientError,
    CredentialError,
    KnockBuildError,
    KnockRefused,
    NotAuthorizedError,
    Reason,
    ResolveError,
    ServerCertificateError,
)
from sknock.ports import Protocol, parse_ports
from sknock.protocol import MAX_DATAGRAM, Action
from sknock.trust import ClientVerifier
from sknock.verifier import Grant, KnockVerifier
from tests.pki import ISSUED_AT, NOW, PASSWORD, PASSWORD_BYTES, TestPKI, at
from tests.servercerts import odd_server, write_cer

WAIT = 5.0  # seconds a test waits at most for a datagram that should come
QUIET = 0.3  # seconds a test listens for a datagram that must not come


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _has_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) on this host")
LOOPBACKS = [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6", marks=needs_ipv6)]


# -- helpers shared with test_client_cli.py --------------------------------------------------------


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@contextlib.contextmanager
def udp_listener(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    """A UDP socket on ``host``, a free port; the knock destination in these tests."""
    with socket.socket(_family_of(host), socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        yield s


def receive(sock: socket.socket, wait: float = WAIT) -> tuple[bytes, IPAddress]:
    """One datagram and its source address, or fail after ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        data, addr = sock.recvfrom(65536)
    except TimeoutError:
        pytest.fail(f"no datagram arrived on {sock.getsockname()} within {wait} s")
    return data, ipaddress.ip_address(addr[0])


def assert_nothing_arrives(sock: socket.socket, wait: float = QUIET) -> None:
    sock.settimeout(wait)
    with pytest.raises(TimeoutError):
        data, addr = sock.recvfrom(65536)
        pytest.fail(f"unexpected datagram of {len(data)} bytes from {addr}")


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def tcp_port(host: str = "127.0.0.1", *, listening: bool) -> Iterator[int]:
    """A TCP port on ``host``: listening (connections complete in the kernel's backlog), or only bound,
    so that connecting is refused and no other program can take the port meanwhile."""
    with socket.socket(_family_of(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        if listening:
            s.listen(16)
        yield port_of(s)


def pki_verifier(pki: TestPKI) -> KnockVerifier:
    """The server's decision for the test PKI's server1 (default policy: 12 work bits, 7 s window)."""
    return KnockVerifier(
        server_key=pki.server.credentials.key, server_certificate=pki.server.certificate, trust=pki.verifier()
    )


@dataclass(frozen=True)
class OwnPKI:
    """A second, small PKI whose client is authorized for ports chosen at run time (free on loopback)."""

    root: Path
    ca_cert: x509.Certificate
    server_cer: Path
    server: ServerCredentials
    client_pfx: Path
    client: ClientCredentials

    def verifier(self) -> KnockVerifier:
        return KnockVerifier(
            server_key=self.server.key,
            server_certificate=self.server.certificate,
            trust=ClientVerifier([self.ca_cert]),
        )


def build_own_pki(root: Path, ports: str) -> OwnPKI:
    authority = ca_lib.init_ca(root, PASSWORD_BYTES, name="sknock client-test CA", clock=at(ISSUED_AT))
    authority.issue_server("knockd", PASSWORD_BYTES, ips=["127.0.0.1", "::1"])
    authority.issue_client("knocker", parse_ports(ports), PASSWORD_BYTES)
    pfx = root / "client" / "knocker.pfx"
    return OwnPKI(
        root=root,
        ca_cert=authority.certificate,
        server_cer=root / "server" / "knockd.cer",
        server=load_server_pfx(root / "server" / "knockd.pfx", PASSWORD),
        client_pfx=pfx,
        client=load_client_pfx(pfx, PASSWORD),
    )


def alice_client(pki: TestPKI, **kwargs: object) -> KnockClient:
    """Alice as an application would make her: from her .pfx file and the server's .cer file (at NOW)."""
    return KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=pki.server.cer, clock=at(NOW),
                       **kwargs)  # type: ignore[arg-type]


# -- delivery: one datagram, granted by the server's verifier -------------------------------------


@pytest.mark.parametrize("host", LOOPBACKS)
def test_knock_arrives_as_one_datagram_and_is_granted(pki: TestPKI, host: str) -> None:
    client = alice_client(pki)
    with udp_listener(host) as sock:
        assert client.knock(host, 2005, verify=False, knock_port=port_of(sock)) is True
        data, source = receive(sock)
        assert_nothing_arrives(sock)  # one knock is one datagram
    assert len(data) <= MAX_DATAGRAM == 1232
    grant = pki_verifier(pki).check(data, source, NOW)
    assert grant.action is Action.OPEN
    assert grant.ports == ((Protocol.TCP, 2005),)
    assert grant.address == ipaddress.ip_address(host)
    assert "alice" in grant.client


@pytest.mark.parametrize("host", LOOPBACKS)
def test_udp_port_and_duration_reach_the_server(pki: TestPKI, host: str) -> None:
    client = alice_client(pki)
    with udp_listener(host) as sock:
        # verify=True cannot confirm UDP: sent is success, and it is sent once.
        assert client.knock(host, 8000, "udp", knock_port=port_of(sock), duration=60) is True
        data, source = receive(sock)
        assert_nothing_arrives(sock)
    grant = pki_verifier(pki).check(data, source, NOW)
    assert grant.ports == ((Protocol.UDP, 8000),)
    assert grant.duration == 60.0


@pytest.mark.parametrize("host", LOOPBACKS)
def test_source_auto_binds_the_knock_to_this_hosts_address(pki: TestPKI, host: str) -> None:
    client = alice_client(pki)
    with udp_listener(host) as sock:
        client.knock(host, 22, verify=False, knock_port=port_of(sock), source_address="auto")
        data, source = receive(sock)
    assert source == ipaddress.ip_address(host)
    # Bound to the loopback address: the same knock "arriving" from elsewhere is refused ...
    verifier = pki_verifier(pki)
    other = ipaddress.ip_address("198.18.0.2" if source.version == 4 else "fd00::2")
    with pytest.raises(KnockRefused) as info:
        verifier.check(data, other, NOW)
    assert info.value.reason is Reason.SOURCE_MISMATCH
    # ... and from the real source it is granted (a fresh verifier: the first one saw the digest).
    assert pki_verifier(pki).check(data, source, NOW).ports == ((Protocol.TCP, 22),)


def test_each_knock_is_new_so_a_second_knock_is_not_a_replay(pki: TestPKI) -> None:
    client = alice_client(pki)
    verifier = pki_verifier(pki)
    grants: list[Grant] = []
    with udp_listener() as sock:
        for _ in range(2):
            client.knock("127.0.0.1", 22, verify=False, knock_port=port_of(sock))
            data, source = receive(sock)
            grants.append(verifier.check(data, source, NOW))
    assert grants[0].nonce != grants[1].nonce


def test_knock_port_is_random_per_call(pki: TestPKI) -> None:
    client = alice_client(pki)
    loopback = ipaddress.ip_address("127.0.0.1")
    # Nothing listens on these ports: the datagrams (not knocks, so nothing could act on them) die on loopback.
    ports = [client.send(b"not a knock", loopback) for _ in range(8)]
    assert all(1024 <= p <= 65535 for p in ports)
    assert len(set(ports)) > 1  # 8 draws from 64,512 ports all equal: probability about 1e-34
    with udp_listener() as sock:  # an explicit knock_port is used as given
        assert client.send(b"not a knock", loopback, port_of(sock)) == port_of(sock)
        assert receive(sock)[0] == b"not a knock"


def test_module_level_knock(pki: TestPKI) -> None:
    with udp_listener() as sock:
        sent = knock(
            "127.0.0.1", 2000, client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=pki.server.cer,
            verify=False, knock_port=port_of(sock), clock=at(NOW),
        )
        data, source = receive(sock)
    assert sent is True
    assert pki_verifier(pki).check(data, source, NOW).ports == ((Protocol.TCP, 2000),)


def test_close_asks_the_server_to_close(pki: TestPKI) -> None:
    with udp_listener() as sock:
        alice_client(pki).close("127.0.0.1", 22, knock_port=port_of(sock))
        data, source = receive(sock)
    grant = pki_verifier(pki).check(data, source, NOW)
    assert grant.action is Action.CLOSE
    assert grant.ports == ((Protocol.TCP, 22),)


# -- verify=True: confirmed by connecting ----------------------------------------------------------


@pytest.fixture(scope="module")
def reserved() -> Iterator[dict[str, int]]:
    """TCP ports held for the module: ``open4``/``open6`` listening, ``closed4`` bound but refusing."""
    with contextlib.ExitStack() as stack:
        ports = {
            "open4": stack.enter_context(tcp_port("127.0.0.1", listening=True)),
            "closed4": stack.enter_context(tcp_port("127.0.0.1", listening=False)),
        }
        if HAS_IPV6:
            ports["open6"] = stack.enter_context(tcp_port("::1", listening=True))
        yield ports


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, reserved: dict[str, int]) -> OwnPKI:
    """A client authorized for exactly the reserved ports (plus tcp/22)."""
    ports = ",".join(f"tcp/{p}" for p in sorted(set(reserved.values())))
    return build_own_pki(tmp_path_factory.mktemp("own-pki"), f"tcp/22,{ports}")


def own_client(own: OwnPKI) -> KnockClient:
    return KnockClient(client_pfx=own.client_pfx, pfx_password=PASSWORD, server_cert=own.server_cer, clock=at(NOW))


@pytest.mark.parametrize(("host", "key"), [("127.0.0.1", "open4"), pytest.param("::1", "open6", marks=needs_ipv6)])
def test_verify_true_when_the_port_accepts(own: OwnPKI, reserved: dict[str, int], host: str, key: str) -> None:
    client = own_client(own)
    with udp_listener(host) as sock:
        assert client.knock(host, reserved[key], knock_port=port_of(sock), timeout=5, retries=2) is True
        data, source = receive(sock)
        assert_nothing_arrives(sock)  # confirmed at the first try: no second knock
    assert own.verifier().check(data, source, NOW).ports == ((Protocol.TCP, reserved[key]),)


def test_verify_false_within_the_timeout_when_nothing_listens(own: OwnPKI, reserved: dict[str, int]) -> None:
    client = own_client(own)
    with udp_listener() as sock:
        started = time.monotonic()
        result = client.knock("127.0.0.1", reserved["closed4"], knock_port=port_of(sock), timeout=0.6, retries=2)
        elapsed = time.monotonic() - started
        first, source = receive(sock)
        second, _ = receive(sock)
        assert_nothing_arrives(sock)
    assert result is False
    assert elapsed < 0.6 + 5  # bounded by the timeout (plus signing and the proof of work), never hangs
    # retries=2: two knocks, each fresh and each one the server would grant.
    verifier = own.verifier()
    assert len({verifier.check(d, source, NOW).nonce for d in (first, second)}) == 2


# -- the asyncio variant ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", LOOPBACKS)
def test_async_knock_arrives_and_is_granted(pki: TestPKI, host: str) -> None:
    client = AsyncKnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=pki.server.cer,
                              clock=at(NOW))
    with udp_listener(host) as sock:
        assert asyncio.run(client.knock(host, 2001, verify=False, knock_port=port_of(sock))) is True
        data, source = receive(sock)
        assert_nothing_arrives(sock)
    assert len(data) <= MAX_DATAGRAM
    assert pki_verifier(pki).check(data, source, NOW).ports == ((Protocol.TCP, 2001),)


def test_async_verify_true_and_false(own: OwnPKI, reserved: dict[str, int]) -> None:
    client = AsyncKnockClient(client_pfx=own.client_pfx, pfx_password=PASSWORD, server_cert=own.server_cer,
                              clock=at(NOW))

    async def both(knock_port: int) -> tuple[bool, bool]:
        opened = await client.knock("127.0.0.1", reserved["open4"], knock_port=knock_port, timeout=5, retries=2)
        closed = await client.knock("127.0.0.1", reserved["closed4"], knock_port=knock_port, timeout=0.6, retries=2)
        return opened, closed

    with udp_listener() as sock:
        started = time.monotonic()
        opened, closed = asyncio.run(both(port_of(sock)))
        elapsed = time.monotonic() - started
        knocks = [receive(sock) for _ in range(3)]  # one that opened, two that did not
        assert_nothing_arrives(sock)
    assert opened is True
    assert closed is False
    assert elapsed < 5 + 0.6 + 5
    verifier = own.verifier()
    granted = [verifier.check(data, source, NOW).ports for data, source in knocks]
    assert granted == [((Protocol.TCP, reserved[k]),) for k in ("open4", "closed4", "closed4")]


def test_async_close_and_typed_errors(pki: TestPKI) -> None:
    client = AsyncKnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=pki.server.cer,
                              clock=at(NOW))
    with udp_listener() as sock:
        asyncio.run(client.close("127.0.0.1", 2002, knock_port=port_of(sock)))
        data, source = receive(sock)
        with pytest.raises(NotAuthorizedError):
            asyncio.run(client.knock("127.0.0.1", 23, verify=False, knock_port=port_of(sock)))
        with pytest.raises(ResolveError):
            asyncio.run(client.knock("127.0.0.1", 22, verify=False, family=6, knock_port=port_of(sock)))
        assert_nothing_arrives(sock)
    assert pki_verifier(pki).check(data, source, NOW).action is Action.CLOSE
    with pytest.raises(CredentialError):
        AsyncKnockClient(client_pfx=pki.alice.pfx, pfx_password="wrong", server_cert=pki.server.cer)


# -- typed errors ----------------------------------------------------------------------------------


def test_missing_pfx_file(pki: TestPKI, tmp_path: Path) -> None:
    missing = tmp_path / "nobody.pfx"
    with pytest.raises(CredentialError, match="nobody.pfx: no such file"):
        KnockClient(client_pfx=missing, pfx_password=PASSWORD, server_cert=pki.server.cer)


def test_missing_server_certificate(pki: TestPKI, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="server.cer: no such file"):
        KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=tmp_path / "server.cer")


def test_wrong_password(pki: TestPKI) -> None:
    with pytest.raises(CredentialError, match="wrong password") as info:
        KnockClient(client_pfx=pki.alice.pfx, pfx_password="not-the-password", server_cert=pki.server.cer)
    assert str(pki.alice.pfx) in str(info.value)
    assert "not-the-password" not in str(info.value)


@pytest.mark.parametrize(("port", "protocol"), [(23, "tcp"), (22, "udp"), (8000, "tcp"), (2011, "tcp")])
def test_port_the_certificate_does_not_name_is_refused_and_nothing_is_sent(
    pki: TestPKI, port: int, protocol: str
) -> None:
    client = alice_client(pki)
    with udp_listener() as sock:
        with pytest.raises(NotAuthorizedError, match=f"does not authorize {protocol}/{port}") as info:
            client.knock("127.0.0.1", port, protocol, verify=False, knock_port=port_of(sock))
        assert_nothing_arrives(sock)
    assert "alice" in str(info.value)


def test_certificate_too_large_for_one_datagram(tmp_path: Path) -> None:
    # 250 single ports, each its own entry in the extension: a certificate of about 2 kB.
    ports = ",".join(f"tcp/{p}" for p in range(10_001, 10_501, 2))
    big = build_own_pki(tmp_path / "big", ports)
    assert len(big.client.certificate.public_bytes(serialization.Encoding.DER)) > MAX_DATAGRAM
    client = KnockClient(client_pfx=big.client_pfx, pfx_password=PASSWORD, server_cert=big.server_cer, clock=at(NOW))
    with udp_listener() as sock:
        with pytest.raises(KnockBuildError, match="too large"):
            client.knock("127.0.0.1", 10_001, verify=False, knock_port=port_of(sock))
        assert_nothing_arrives(sock)


def test_long_subject_too_large(pki: TestPKI, tmp_path: Path) -> None:
    """The same with a certificate made directly with cryptography: a 4 kB subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = pki.now()
    units = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"unit {i:02d} " + "x" * 55) for i in range(60)]
    name = x509.Name(units)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(pki.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([ports_general_name(parse_ports("tcp/22"))]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())
    )
    client = KnockClient(credentials=ClientCredentials(key, cert, (pki.ca_cert,)), server_cert=pki.server.cer,
                         clock=at(NOW))
    with pytest.raises(KnockBuildError, match=r"at most \d+ bytes fit"):
        client.build_knock([(Protocol.TCP, 22)], now=NOW)


@pytest.mark.parametrize(
    ("host", "family"),
    [("127.0.0.1", 6), ("::1", 4), ("a..b", None)],  # all fail inside this host: no DNS query is made
    ids=["ipv4-literal-as-ipv6", "ipv6-literal-as-ipv4", "empty-label"],
)
def test_unresolvable_host(pki: TestPKI, host: str, family: int | None) -> None:
    client = alice_client(pki)
    with pytest.raises(ResolveError, match="cannot resolve") as info:
        client.knock(host, 22, verify=False, family=family)
    assert repr(host) in str(info.value)
    with pytest.raises(ResolveError):
        resolve(host, family)


def test_server_certificate_from_another_ca(pki: TestPKI, own: OwnPKI) -> None:
    with pytest.raises(CredentialError, match="is not one this client's CA issued") as info:
        KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=own.server_cer, clock=at(NOW))
    assert str(own.server_cer) in str(info.value)
    # An explicit opt-out is possible (a client PKCS#12 made elsewhere, a server under another CA).
    KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=own.server_cer, check_server_cert=False)


def test_server_certificate_file_that_is_not_one(pki: TestPKI, tmp_path: Path) -> None:
    junk = tmp_path / "server.cer"
    junk.write_bytes(b"\x30\x03\x02\x01\x00 not DER")
    with pytest.raises(CredentialError, match="not a PEM or DER certificate"):
        KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=junk)


@pytest.mark.parametrize(
    ("which", "words"),
    [("ca", "it is a CA certificate"), ("client", "it is a client's certificate"), ("p521", "EC secp521r1")],
)
def test_a_certificate_that_is_not_a_servers_is_refused_before_anything_is_sent(
    pki: TestPKI, tmp_path: Path, which: str, words: str
) -> None:
    """A CA's or a client's certificate given as the server's used to be knocked to, and knock() waited for
    its timeout and returned False with no hint.  Now: a typed error naming the file, whatever
    check_server_cert says, and no datagram."""
    cert = {"ca": pki.ca_cert, "client": pki.alice.certificate}.get(which) or odd_server(pki, curve=ec.SECP521R1())[1]
    path = write_cer(tmp_path / f"{which}.cer", cert)
    for check in (True, False):
        with pytest.raises(ServerCertificateError) as info:
            KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=path, check_server_cert=check)
        message = str(info.value)
        assert message.startswith(f"server certificate {path}: ") and words in message, message
        assert "is not a server certificate" in message and "\n" not in message
        assert isinstance(info.value, CredentialError)
    with pytest.raises(ServerCertificateError):
        KnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=cert)
    with pytest.raises(ServerCertificateError):
        AsyncKnockClient(client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=path)
    with udp_listener() as sock:
        with pytest.raises(ServerCertificateError):
            knock("127.0.0.1", 22, client_pfx=pki.alice.pfx, pfx_password=PASSWORD, server_cert=path,
                  knock_port=port_of(sock), verify=False)
        assert_nothing_arrives(sock)


def test_bad_source_addresses(pki: TestPKI) -> None:
    client = alice_client(pki)
    with udp_listener() as sock:
        with pytest.raises(ClientError, match="not an IP address"):
            client.knock("127.0.0.1", 22, verify=False, knock_port=port_of(sock), source_address="my-laptop")
        with pytest.raises(ClientError, match="is IPv6 but the server address 127.0.0.1 is IPv4"):
            client.knock("127.0.0.1", 22, verify=False, knock_port=port_of(sock), source_address="::1")
        assert_nothing_arrives(sock)


def test_bad_numbers_are_value_errors(pki: TestPKI) -> None:
    client = alice_client(pki)
    with pytest.raises(ValueError, match="port must be 1..65535"):
        client.knock("127.0.0.1", 0, verify=False)
    with pytest.raises(ValueError, match="knock_port must be 1..65535"):
        client.knock("127.0.0.1", 22, verify=False, knock_port=70_000)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        client.knock("127.0.0.1", 22, timeout=0)


def test_a_failed_send_is_a_client_error(pki: TestPKI) -> None:
    # Too large for any UDP datagram: the kernel refuses it locally (EMSGSIZE), nothing leaves.
    with udp_listener() as sock:
        with pytest.raises(ClientError, match=f"cannot send the knock to 127.0.0.1 udp/{port_of(sock)}"):
            alice_client(pki).send(b"x" * 70_000, ipaddress.ip_address("127.0.0.1"), port_of(sock))
        assert_nothing_arrives(sock)


def test_async_knock_leaves_the_event_loop_free(own: OwnPKI, reserved: dict[str, int]) -> None:
    """While an AsyncKnockClient knocks and waits for a port that stays closed, other tasks run: the
    loop never stalls for long (signing runs in an executor, sending and connecting on the loop)."""
    client = AsyncKnockClient(client_pfx=own.client_pfx, pfx_password=PASSWORD, server_cert=own.server_cer,
                              clock=at(NOW))

    async def run(knock_port: int) -> tuple[bool, float, int]:
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def ticker() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.005)
                gaps.append(loop.time() - last)
                last = loop.time()

        tick = asyncio.create_task(ticker())
        opened = await client.knock("127.0.0.1", reserved["closed4"], knock_port=knock_port, timeout=1.0, retries=2)
        tick.cancel()
        return opened, max(gaps), len(gaps)

    with udp_listener() as sock:
        opened, worst, ticks = asyncio.run(run(port_of(sock)))
        receive(sock), receive(sock)
    assert opened is False
    assert ticks > 50  # the ticker ran throughout the second the knocks waited
    assert worst < 0.25, f"the event loop stalled for {worst:.3f} s"


def _public_callables() -> list[tuple[str, object]]:
    import inspect

    import sknock.client as module

    found: list[tuple[str, object]] = []
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isfunction(value):
            found.append((name, value))
        elif inspect.isclass(value):
            found.append((name, value))
            found += [(f"{name}.{m}", f) for m, f in vars(value).items()
                      if not m.startswith("_") and callable(getattr(value, m))]
    return found


@pytest.mark.parametrize(("name", "value"), _public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_name_documents_its_arguments_result_and_errors(name: str, value: object) -> None:
    """help(sknock.client.knock) and the like say what to pass, what comes back and what is raised."""
    import inspect

    function = getattr(value, "__func__", value)
    doc = " ".join((inspect.getdoc(function) or "").split())
    assert doc, f"{name} has no docstring"
    by_reference = "as for" in doc or "the same arguments" in doc or "Arguments as" in doc
    if inspect.isclass(function):
        return
    for parameter in inspect.signature(function).parameters:
        if parameter not in ("self", "cls") and not by_reference:
            assert f"``{parameter}``" in doc or f":param {parameter}:" in doc, f"{name}: {parameter} undocumented"
    assert "raise" in doc.lower() or "errors" in doc, f"{name}: exceptions not documented"
