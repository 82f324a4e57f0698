"""The client library: knock on a server's door from an application.

    from sknock.client import knock
    if knock("server.example", 22, client_pfx="alice.pfx", pfx_password=pw, server_cert="server.cer"):
        ...  # tcp/22 is open for this host for the server's PORT_OPEN_DURATION

:class:`KnockClient` loads the credentials once for repeated knocks; :class:`AsyncKnockClient` does the
same for asyncio applications.  Every failure the caller can act on is a typed exception from
:mod:`sknock.errors` with a message naming the file, host or port: CredentialError (missing file, wrong
password; its subclass ServerCertificateError when the certificate given as the server's is a CA's, a
client's or otherwise not a server's: checked before anything is sent), NotAuthorizedError (the
certificate does not name the port: checked before sending), KnockBuildError (certificate too large
for one datagram), ResolveError (host does not resolve), ClientError (anything else about where or
how to send: a bad source address, no route, a failed send; its subclass CarrierUnavailableError when
``via="icmp"`` may open neither a ping socket nor a raw socket).
Wrong argument types and out-of-range numbers (port 0, timeout -1) are ValueError.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .addresses import IPAddress
from .carrier import Carrier
from .carrier import send as send_by
from .certificate import authorized_ports, describe_name
from .credentials import ClientCredentials, load_certificate, load_client_credentials, server_certificate_problem
from .errors import (
    CertificateError,
    ClientError,
    CredentialError,
    NotAuthorizedError,
    ResolveError,
    ServerCertificateError,
)
from .ports import PortSet, Protocol
from .protocol import Action, KnockRequest, fingerprint, seal_knock
from .protocol.wire import DEFAULT_WORK_BITS
from .trust import verify_server_certificate

__all__ = [
    "knock",
    "KnockClient",
    "AsyncKnockClient",
    "DEFAULT_WORK_BITS",
    "Target",
    "check_server_certificate",
    "load_server_certificate",
]

Target = tuple[int, str, IPAddress]  # (family, host as given, resolved address)


def _family(family: int | str | None) -> int:
    if family in (None, 0, socket.AF_UNSPEC):
        return socket.AF_UNSPEC
    if family in (4, "4", "ipv4", socket.AF_INET):
        return socket.AF_INET
    if family in (6, "6", "ipv6", socket.AF_INET6):
        return socket.AF_INET6
    raise ValueError(f"family must be None, 4 or 6, not {family!r}")


def _protocol(protocol: str | Protocol) -> Protocol:
    return protocol if isinstance(protocol, Protocol) else Protocol.from_label(str(protocol))


_VERSION: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}


def resolve(host: str, family: int | str | None = None) -> tuple[int, IPAddress]:
    """Resolve ``host`` through getaddrinfo (IPv4 and IPv6); the first address of the family asked."""
    fam = _family(family)
    try:
        infos = socket.getaddrinfo(host, None, fam, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:  # ValueError: e.g. an embedded NUL
        wanted = {4: " to an IPv4 address", 6: " to an IPv6 address"}.get(_VERSION.get(fam, 0), "")
        raise ResolveError(f"cannot resolve {host!r}{wanted}: {exc}") from None
    for info_family, _, _, _, sockaddr in infos:
        if info_family in (socket.AF_INET, socket.AF_INET6):
            return info_family, ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
    raise ResolveError(f"{host!r} has no {'IPv6' if fam == socket.AF_INET6 else 'IPv4'} address")


def local_address_towards(address: IPAddress) -> IPAddress:
    """The source address this host would use towards ``address`` (a routing lookup; nothing is sent)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((str(address), 9))
            return ipaddress.ip_address(str(s.getsockname()[0]).split("%")[0])
    except OSError as exc:
        raise ClientError(f"no local address towards {address}: {exc.strerror or exc}") from None


def check_server_certificate(cert: x509.Certificate, where: str = "server certificate") -> None:
    """Raise :class:`~sknock.errors.ServerCertificateError` unless ``cert`` has a server's profile (an EC
    P-256/P-384 key, not a CA, keyAgreement and serverAuth where those extensions are present), so that a
    CA's or a client's certificate given in its place is reported at once instead of knocks that no
    server can read.  ``where`` names it in the message (a path)."""
    problem = server_certificate_problem(cert)
    if problem is not None:
        raise ServerCertificateError(
            f"{where}: {describe_name(cert.subject)} is not a server certificate: {problem}; give the knock "
            "server's own certificate (sknock-ca: DIR/server/NAME.cer)"
        )


def load_server_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load a server certificate (DER or PEM) and check it is one (:func:`check_server_certificate`)."""
    cert = load_certificate(path)
    check_server_certificate(cert, f"server certificate {Path(path)}")
    return cert


def _check_port(port: object, what: str = "port") -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be 1..65535, not {port!r}")
    return port


def _source(source_address: str | IPAddress | None, target: IPAddress) -> IPAddress | None:
    """The address a knock is bound to: None for "any", the routing choice for "auto", or the one given."""
    if source_address is None or source_address == "any":
        return None
    if source_address == "auto":
        return local_address_towards(target)
    if isinstance(source_address, IPAddress):
        bound: IPAddress = source_address
    else:
        try:
            bound = ipaddress.ip_address(str(source_address))
        except ValueError:
            raise ClientError(
                f"source address {source_address!r} is not an IP address (nor 'auto' or 'any')"
            ) from None
    if bound.version != target.version:
        raise ClientError(
            f"source address {bound} is IPv{bound.version} but the server address {target} is IPv{target.version}"
        )
    return bound


class KnockClient:
    """Credentials loaded once; :meth:`knock` as often as needed.

    ``server_cert`` is the server's certificate (DER or PEM file, or a loaded certificate); the knock
    is encrypted to its key.  When the client PKCS#12 carries CA certificates, the server certificate
    must be issued by one of them (``check_server_cert=False`` skips that).

    ``clock`` (Unix seconds, ``time.time`` unless given) is where the client reads the time: the
    timestamp of each knock it sends and the date the server certificate is checked at.  Timeouts
    while confirming a knock run on the monotonic clock, as they must.
    """

    def __init__(
        self,
        *,
        client_pfx: str | os.PathLike[str] | None = None,
        pfx_password: str | bytes | None = None,
        server_cert: str | os.PathLike[str] | x509.Certificate,
        credentials: ClientCredentials | None = None,
        work_bits: int = DEFAULT_WORK_BITS,
        check_server_cert: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        if credentials is None:
            if client_pfx is None:
                raise CredentialError("no client credentials: pass client_pfx (a PKCS#12 file or a pkcs11: URI)")
            credentials = load_client_credentials(client_pfx, pfx_password)
        self.credentials = credentials
        if isinstance(server_cert, x509.Certificate):
            self.server_certificate = server_cert
            where = "server certificate"
        else:
            self.server_certificate = load_certificate(server_cert)
            where = f"server certificate {Path(server_cert)}"
        # Whatever check_server_cert says: a CA's or a client's certificate can receive no knock.
        check_server_certificate(self.server_certificate, where)
        key = self.server_certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)  # check_server_certificate made sure
        self._server_key = key
        self._server_fingerprint = fingerprint(self.server_certificate)
        self._certificate_der = credentials.certificate.public_bytes(serialization.Encoding.DER)
        if check_server_cert and credentials.ca_certificates:
            try:
                when = dt.datetime.fromtimestamp(clock(), dt.UTC)
                verify_server_certificate(self.server_certificate, credentials.ca_certificates, when)
            except CertificateError as exc:
                raise CredentialError(f"{where} is not one this client's CA issued: {exc}") from None
        self.ports: PortSet = authorized_ports(credentials.certificate)
        self.work_bits = work_bits

    # -- building (no I/O) -------------------------------------------------------------------------

    def build_knock(
        self,
        ports: Sequence[tuple[Protocol, int]],
        *,
        now: float,
        action: Action = Action.OPEN,
        source_address: IPAddress | None = None,
        duration: int | None = None,
        nonce: bytes | None = None,
    ) -> bytes:
        """One knock datagram for ``ports`` at Unix time ``now``.  Checks locally that the certificate
        authorizes every port, so a request the server would refuse is never sent."""
        missing = [f"{p.label}/{n}" for p, n in ports if (p, n) not in self.ports]
        if missing:
            subject = self.credentials.certificate.subject.rfc4514_string()
            raise NotAuthorizedError(
                f"certificate {subject} does not authorize {','.join(missing)} (it names {self.ports})"
            )
        request = KnockRequest(
            ports=tuple(ports),
            timestamp_ms=int(now * 1000),
            nonce=nonce or secrets.token_bytes(16),
            action=action,
            source_address=source_address,
            duration=duration,
        )
        return seal_knock(
            request,
            client_key=self.credentials.key,
            client_certificate=self._certificate_der,
            server_public_key=self._server_key,
            server_fingerprint=self._server_fingerprint,
            work_bits=self.work_bits,
        )

    def _prepare(
        self,
        host: str,
        port: int,
        protocol: str | Protocol,
        *,
        family: int | str | None,
        source_address: str | IPAddress | None,
        action: Action,
        duration: int | None,
    ) -> tuple[int, IPAddress, bytes, Protocol]:
        proto = _protocol(protocol)
        _check_port(port)
        fam, address = resolve(host, family)
        bound = _source(source_address, address)
        datagram = self.build_knock(
            [(proto, port)], now=self.clock(), action=action, source_address=bound, duration=duration
        )
        return fam, address, datagram, proto

    # -- knocking (I/O) ----------------------------------------------------------------------------

    def send(
        self, datagram: bytes, address: IPAddress, knock_port: int | None = None, via: str | Carrier = Carrier.UDP
    ) -> int:
        """Send one datagram by the carrier ``via`` (:mod:`sknock.carrier`): over UDP to a random destination
        port (1024..65535) per call unless ``knock_port`` is given, or over ICMP as an echo request (no port:
        ``knock_port`` must be None).  Returns the UDP port used, 0 over ICMP.  A failed send (no route, ...)
        is a ClientError; over ICMP without a ping or raw socket, a CarrierUnavailableError."""
        carrier = Carrier.parse(via)
        if carrier is Carrier.ICMP:
            if knock_port is not None:
                raise ValueError("knock_port is a UDP port: it has no meaning with via='icmp'")
            send_by(datagram, address, carrier)
            return 0
        random_port = 1024 + secrets.randbelow(65536 - 1024)
        port = random_port if knock_port is None else _check_port(knock_port, "knock_port")
        send_by(datagram, address, carrier, port)
        return port

    def knock(
        self,
        host: str,
        port: int,
        protocol: str | Protocol = "tcp",
        *,
        knock_port: int | None = None,
        verify: bool = True,
        timeout: float = 10.0,
        retries: int = 3,
        source_address: str | IPAddress | None = None,
        family: int | str | None = None,
        duration: int | None = None,
        via: str | Carrier = Carrier.UDP,
    ) -> bool:
        """Knock for ``protocol/port`` on ``host``.  With ``verify`` (TCP only), confirm by connecting,
        knocking again up to ``retries`` times; True when the port is open.  Otherwise True once sent.
        ``via``: the carrier, ``"udp"`` or ``"icmp"`` (see :meth:`send`)."""
        _check_timeout(timeout)
        Carrier.parse(via)  # a bad value is reported before any work
        tries = max(1, retries if verify else 1)
        for _ in range(tries):
            fam, address, datagram, proto = self._prepare(
                host, port, protocol, family=family, source_address=source_address,
                action=Action.OPEN, duration=duration,
            )
            self.send(datagram, address, knock_port, via)
            if not verify or proto is not Protocol.TCP:
                return True
            if _tcp_open(address, port, timeout / tries):
                return True
        return False

    def close(
        self,
        host: str,
        port: int,
        protocol: str | Protocol = "tcp",
        *,
        knock_port: int | None = None,
        source_address: str | IPAddress | None = None,
        family: int | str | None = None,
        via: str | Carrier = Carrier.UDP,
    ) -> None:
        """Ask the server to close ``protocol/port`` for this client now."""
        Carrier.parse(via)
        _, address, datagram, _ = self._prepare(
            host, port, protocol, family=family, source_address=source_address, action=Action.CLOSE, duration=None
        )
        self.send(datagram, address, knock_port, via)


def _check_timeout(timeout: float) -> None:
    if not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _tcp_open(address: IPAddress, port: int, budget: float) -> bool:
    """Try to connect until ``budget`` seconds have passed (the knock may still be on its way).

    Connect timeouts start short and double: with a drop policy the first SYN may be silently
    dropped just before the grant lands, and waiting out the kernel's SYN retry would waste a second.
    """
    deadline = time.monotonic() + budget
    attempt_timeout = 0.25
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            with socket.create_connection((str(address), port), timeout=min(remaining, attempt_timeout)):
                return True
        except OSError:
            attempt_timeout = min(attempt_timeout * 2, 2.0)
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


class AsyncKnockClient:
    """:class:`KnockClient` for asyncio applications: the same arguments, ``await client.knock(...)``."""

    def __init__(
        self,
        *,
        client_pfx: str | os.PathLike[str] | None = None,
        pfx_password: str | bytes | None = None,
        server_cert: str | os.PathLike[str] | x509.Certificate,
        credentials: ClientCredentials | None = None,
        work_bits: int = DEFAULT_WORK_BITS,
        check_server_cert: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Loading a PKCS#12 takes milliseconds: done here, once, like KnockClient.
        self._client = KnockClient(
            client_pfx=client_pfx,
            pfx_password=pfx_password,
            server_cert=server_cert,
            credentials=credentials,
            work_bits=work_bits,
            check_server_cert=check_server_cert,
            clock=clock,
        )

    @property
    def client(self) -> KnockClient:
        """The synchronous :class:`KnockClient` this wraps (its credentials and server certificate)."""
        return self._client

    async def knock(
        self,
        host: str,
        port: int,
        protocol: str | Protocol = "tcp",
        *,
        knock_port: int | None = None,
        verify: bool = True,
        timeout: float = 10.0,
        retries: int = 3,
        source_address: str | IPAddress | None = None,
        family: int | str | None = None,
        duration: int | None = None,
        via: str | Carrier = Carrier.UDP,
    ) -> bool:
        """Knock for ``protocol/port`` on ``host`` without blocking the event loop (signing and the proof of
        work run in an executor).  With ``verify`` (TCP only), confirm by connecting, knocking again up to
        ``retries`` times within ``timeout`` seconds in all; True when the port is open.  Otherwise True once
        sent.  ``via`` as for :meth:`KnockClient.knock`."""
        _check_timeout(timeout)
        Carrier.parse(via)
        loop = asyncio.get_running_loop()
        tries = max(1, retries if verify else 1)
        for _ in range(tries):
            # Resolving, signing and the proof of work block: run them off the event loop.
            fam, address, datagram, proto = await loop.run_in_executor(
                None,
                lambda: self._client._prepare(
                    host, port, protocol, family=family, source_address=source_address,
                    action=Action.OPEN, duration=duration,
                ),
            )
            self._client.send(datagram, address, knock_port, via)
            if not verify or proto is not Protocol.TCP:
                return True
            if await _tcp_open_async(address, port, timeout / tries):
                return True
        return False

    async def close(
        self,
        host: str,
        port: int,
        protocol: str | Protocol = "tcp",
        *,
        knock_port: int | None = None,
        source_address: str | IPAddress | None = None,
        family: int | str | None = None,
        via: str | Carrier = Carrier.UDP,
    ) -> None:
        """Ask the server to close ``protocol/port`` for this client now."""
        Carrier.parse(via)
        loop = asyncio.get_running_loop()
        _, address, datagram, _ = await loop.run_in_executor(
            None,
            lambda: self._client._prepare(
                host, port, protocol, family=family, source_address=source_address, action=Action.CLOSE, duration=None
            ),
        )
        self._client.send(datagram, address, knock_port, via)


async def _tcp_open_async(address: IPAddress, port: int, budget: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    attempt_timeout = 0.25  # short, then doubling: see _tcp_open
    while (remaining := deadline - loop.time()) > 0:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(str(address), port), min(remaining, attempt_timeout)
            )
        except (TimeoutError, OSError):
            attempt_timeout = min(attempt_timeout * 2, 2.0)
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False


def knock(
    host: str,
    port: int,
    protocol: str = "tcp",
    *,
    client_pfx: str | os.PathLike[str],
    pfx_password: str | bytes | None,
    server_cert: str | os.PathLike[str],
    knock_port: int | None = None,
    verify: bool = True,
    timeout: float = 10.0,
    retries: int = 3,
    source_address: str | None = None,
    family: int | str | None = None,
    duration: int | None = None,
    work_bits: int = DEFAULT_WORK_BITS,
    clock: Callable[[], float] = time.time,
    via: str | Carrier = Carrier.UDP,
) -> bool:
    """Knock once (the original sKnock's call shape).  See :meth:`KnockClient.knock` (``via``: ``"udp"`` or
    ``"icmp"``); ``clock`` as for :class:`KnockClient`."""
    client = KnockClient(
        client_pfx=client_pfx, pfx_password=pfx_password, server_cert=server_cert, work_bits=work_bits, clock=clock
    )
    return client.knock(
        host, port, protocol, knock_port=knock_port, verify=verify, timeout=timeout, retries=retries,
        source_address=source_address, family=family, duration=duration, via=via,
    )
