"""The client library: knock on a server's door from an application.

    from sknock.client import knock
    if knock("server.example", 22, client_pfx="alice.pfx", pfx_password=pw, server_cert="server.cer"):
        ...  # tcp/22 is open for this host for the server's PORT_OPEN_DURATION

:class:`KnockClient` loads the credentials once for repeated knocks; :class:`AsyncKnockClient` does the
same for asyncio applications.  ``KnockClient.from_profile("NAME")`` makes one for a named
server of the client configuration file (:mod:`sknock.clientconfig`); :meth:`KnockClient.connect`
knocks and returns the connection (what ``sknock-knock ssh-proxy`` hands to ssh).  Every failure the
caller can act on is a typed exception from :mod:`sknock.errors` with a message naming the file, host
or port: CredentialError (missing file, wrong password; its subclass ServerCertificateError when the
certificate given as the server's is a CA's, a client's or otherwise not a server's: checked before
anything is sent), NotAuthorizedError (the certificate does not name the port: checked before
sending), KnockBuildError (certificate too large for one datagram), ResolveError (host does not
resolve), ProfileError (a bad configuration file, no such named server), ClientError (anything else
about where or how to send: a bad source address, no route, a failed send; its subclass
CarrierUnavailableError when ``via="icmp"`` may open neither a ping socket nor a raw socket).
Wrong argument types and out-of-range numbers (port 0, timeout -1) are ValueError.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import ipaddress
import os
import secrets
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .addresses import IPAddress
from .carrier import Carrier
from .carrier import send as send_by
from .certificate import authorized_ports, describe_name
from .clientconfig import Profile, get_profile, load_credentials
from .credentials import ClientCredentials, load_certificate, load_client_credentials, server_certificate_problem
from .errors import (
    CertificateError,
    ClientError,
    CredentialError,
    NotAuthorizedError,
    ProfileError,
    ResolveError,
    ServerCertificateError,
)
from .ports import PortSet, Protocol
from .protocol import Action, KnockRequest, fingerprint, seal_knock
from .protocol.wire import DEFAULT_WORK_BITS
from .trust import verify_server_certificate

if TYPE_CHECKING:
    import asyncio

# asyncio is imported by the async client's functions, where used: it is a quarter of this module's import
# time, which every ssh connection through ``sknock-knock ssh-proxy`` pays and the sync client never needs.

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
_Prepared = tuple[int, IPAddress, bytes, Protocol]  # (family, address, datagram, protocol) of one knock


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
    """Resolve ``host`` through getaddrinfo (IPv4 and IPv6).

    :param host: a name or an IPv4/IPv6 address.
    :param family: None (either), 4 or 6.
    :returns: (socket family, address): the first address of the family asked for.
    :raises ResolveError: the host does not resolve, to an address of that family; the message says so
        in plain words (``cannot resolve 'HOST': ...``), never a codec's error.
    :raises ValueError: ``family`` is not None, 4 or 6.
    """
    fam = _family(family)
    wanted = {4: " to an IPv4 address", 6: " to an IPv6 address"}.get(_VERSION.get(fam, 0), "")
    try:
        infos = socket.getaddrinfo(host, None, fam, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ResolveError(f"cannot resolve {host!r}{wanted}: {_resolver_says(exc, bool(wanted))}") from None
    except (UnicodeError, ValueError):  # the IDNA codec's complaint, or an embedded NUL
        raise ResolveError(f"cannot resolve {host!r}: not a valid host name") from None
    for info_family, _, _, _, sockaddr in infos:
        if info_family in (socket.AF_INET, socket.AF_INET6):
            return info_family, ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
    raise ResolveError(f"cannot resolve {host!r}{wanted}: it has no such address")


def _resolver_says(exc: socket.gaierror, one_family: bool) -> str:
    """The resolver's answer in a user's words."""
    if exc.errno == getattr(socket, "EAI_ADDRFAMILY", None):
        return "it has no such address"
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
        return "no such host, or no address of that family" if one_family else "no such host"
    if exc.errno == socket.EAI_AGAIN:
        return "the name server did not answer (try again)"
    return str(exc.strerror or exc).lower()


def local_address_towards(address: IPAddress) -> IPAddress:
    """The source address this host would use towards ``address`` (a routing lookup; nothing is sent).

    :raises ClientError: there is no route to ``address``.
    """
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
    server can read.  ``where`` names it in the message (a path).

    :raises ServerCertificateError: it is not a server's certificate.
    """
    problem = server_certificate_problem(cert)
    if problem is not None:
        raise ServerCertificateError(
            f"{where}: {describe_name(cert.subject)} is not a server certificate: {problem}; give the knock "
            "server's own certificate (sknock-ca: DIR/server/NAME.cer)"
        )


def load_server_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load a server certificate (DER or PEM) from the file ``path`` and check it is one
    (:func:`check_server_certificate`).

    :returns: the certificate.
    :raises CredentialError: the file is missing, unreadable or holds no certificate.
    :raises ServerCertificateError: the certificate is not a server's.
    """
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

    Constructor arguments (keywords only): ``client_pfx`` and ``pfx_password`` (a PKCS#12 file and its
    password), or ``credentials`` (a loaded :class:`~sknock.credentials.ClientCredentials`) instead;
    ``server_cert``; ``work_bits`` (the proof of work attached, at least the server's ``workBits``);
    ``check_server_cert``; ``clock``.  :meth:`from_profile` makes one for a named server.

    :raises CredentialError: no credentials given, a file missing or unreadable, a wrong password, or
        a server certificate the client's CA did not issue.
    :raises ServerCertificateError: ``server_cert`` is not a server's certificate.
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
        #: The named server this client was made for (:meth:`from_profile`), else None.
        self.profile: Profile | None = None
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

    @classmethod
    def from_profile(
        cls, name: str, *, config: str | os.PathLike[str] | None = None, interactive: bool = False
    ) -> KnockClient:
        """A client for the server called ``name`` in the client configuration file
        (:mod:`sknock.clientconfig`: the user's and the system-wide one, or ``config`` alone).

        :param name: the server's section name.
        :param config: one configuration file to read instead of the default ones.
        :param interactive: prompt on the terminal for a password the file does not say how to find.
        :returns: a client whose ``profile`` is that server; :meth:`knock_profile` knocks its ports.
        :raises ProfileError: no such server, a bad file (naming file, section, key), no password source.
        :raises CredentialError: the credentials or the server certificate cannot be loaded.
        """
        return cls.for_profile(get_profile(name, config), interactive=interactive)

    @classmethod
    def for_profile(cls, profile: Profile, *, interactive: bool = False) -> KnockClient:
        """A client for ``profile`` (one already found, perhaps changed by a command line's options);
        ``interactive`` as for :meth:`from_profile`.

        :raises ProfileError, CredentialError: as :meth:`from_profile`.
        """
        server_cert = profile.require("serverCert")
        credentials = load_credentials(profile, interactive=interactive)
        client = cls(credentials=credentials, server_cert=server_cert, work_bits=profile.work_bits)
        client.profile = profile
        return client

    def knock_profile(self, ports: Sequence[tuple[Protocol, int]] | None = None, *, verify: bool = True) -> bool:
        """Knock on this client's named server (:meth:`from_profile`) for ``ports``, by default the
        server's ``ports``, with the server's settings (knock port, timeout, retries, source, family).

        :returns: True when every port opened (``verify``; UDP ports: once sent).
        :raises ProfileError: the client has no profile, or neither ``ports`` nor the profile names a port.
        :raises: what :meth:`knock` raises.
        """
        if self.profile is None:
            raise ProfileError("this client was not made from a named server (use KnockClient.from_profile)")
        wanted = tuple(ports) if ports is not None else self.profile.default_ports()
        if not wanted:
            raise ProfileError(f"{self.profile.where('ports')}: no port to knock for: give one or set ports")
        arguments = self.profile.knock_arguments()
        opened = [self.knock(self.profile.host, n, p, verify=verify, **arguments) for p, n in wanted]
        return all(opened)

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
        """One knock datagram for ``ports`` at Unix time ``now``, without any I/O.  Checks locally that the
        certificate authorizes every port, so a request the server would refuse is never sent.

        :param ports: (protocol, port) pairs, one request for all of them.
        :param now: the knock's timestamp, Unix seconds.
        :param action: open or close.
        :param source_address: the address the knock is bound to; None: the packet's source.
        :param duration: seconds to ask for; None: the server's.
        :param nonce: 16 bytes; random when None (tests pass one).
        :returns: the datagram.
        :raises NotAuthorizedError: the certificate does not name a port.
        :raises KnockBuildError: the certificate does not fit one datagram.
        """
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
    ) -> _Prepared:
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
        """Send one knock datagram to ``address`` by the carrier ``via`` (:mod:`sknock.carrier`).

        :param datagram: a knock from :meth:`build_knock`.
        :param address: the server's address (IPv4 or IPv6).
        :param knock_port: the UDP destination port; a random one (1024..65535) per call when None.  Over
            ICMP there is no port: it must be None.
        :param via: ``"udp"`` or ``"icmp"`` (the knock as an echo request's data).
        :returns: the UDP destination port used; 0 over ICMP.
        :raises ClientError: the kernel refused the send (no route, ...); over ICMP without a ping or raw
            socket, its subclass CarrierUnavailableError.
        :raises ValueError: ``knock_port`` is not 1..65535, or is given with ``via="icmp"``.
        """
        carrier, port = _destination(knock_port, via)
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
        """Knock for ``protocol/port`` on ``host``.

        :param host: the server: a name or an IPv4/IPv6 address (resolved with getaddrinfo).
        :param port: the port to open, 1..65535.
        :param protocol: ``"tcp"``, ``"udp"`` or a :class:`~sknock.ports.Protocol`.
        :param knock_port: the UDP port the knock is sent to; random per knock when None.
        :param verify: TCP only: confirm by connecting, knocking again (fresh, never a replay) up to
            ``retries`` times while the port stays closed.
        :param timeout: seconds for all the knocks and connection attempts together.
        :param retries: knocks at most when verifying.
        :param source_address: None or ``"any"``: the packet's source; ``"auto"``: bind the knock to this
            host's address towards the server; or an address of the server's family.
        :param family: None (either), 4 or 6.
        :param duration: seconds to ask the port to stay open (the server caps it); None: the server's.
        :param via: the carrier, ``"udp"`` or ``"icmp"`` (see :meth:`send`).
        :returns: True when the port is open (``verify``), or once the knock is sent (no ``verify``, or UDP);
            False when it did not open within ``timeout``.
        :raises NotAuthorizedError: the client certificate does not name the port (nothing is sent).
        :raises ResolveError: ``host`` does not resolve (to the family asked for).
        :raises KnockBuildError: the certificate does not fit one datagram.
        :raises ClientError: a bad source address, or a send the kernel refused (CarrierUnavailableError:
            ``via="icmp"`` without a ping or raw socket).
        :raises ValueError: an argument out of range, or an unknown carrier.
        """
        connection = self._knock(
            host, port, protocol, knock_port=knock_port, verify=verify, timeout=timeout, retries=retries,
            source_address=source_address, family=family, duration=duration, via=via,
        )
        if isinstance(connection, socket.socket):
            connection.close()
            return True
        return connection

    def connect(
        self,
        host: str,
        port: int,
        *,
        knock_port: int | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        source_address: str | IPAddress | None = None,
        family: int | str | None = None,
        duration: int | None = None,
        via: str | Carrier = Carrier.UDP,
    ) -> socket.socket | None:
        """Knock for ``tcp/port`` on ``host`` and return the TCP connection that shows it opened (for a
        program that wants the connection itself, such as ``sknock-knock ssh-proxy``).

        The knock and the connection go to the same resolved address, so they share one address family.
        Arguments as for :meth:`knock`.

        :returns: a connected, blocking TCP socket (the caller closes it), or None when the port did not
            open within ``timeout``.
        :raises: what :meth:`knock` raises.
        """
        connection = self._knock(
            host, port, Protocol.TCP, knock_port=knock_port, verify=True, timeout=timeout, retries=retries,
            source_address=source_address, family=family, duration=duration, via=via,
        )
        return connection if isinstance(connection, socket.socket) else None

    def _knock(
        self,
        host: str,
        port: int,
        protocol: str | Protocol,
        *,
        knock_port: int | None,
        verify: bool,
        timeout: float,
        retries: int,
        source_address: str | IPAddress | None,
        family: int | str | None,
        duration: int | None,
        via: str | Carrier,
    ) -> socket.socket | bool:
        _check_timeout(timeout)
        _destination(knock_port, via)  # a bad carrier or port is reported before any work
        tries = _tries(verify, retries)
        deadline = time.monotonic() + timeout
        for attempt in range(tries):
            fam, address, datagram, proto = self._prepare(
                host, port, protocol, family=family, source_address=source_address,
                action=Action.OPEN, duration=duration,
            )
            self.send(datagram, address, knock_port, via)
            if not verify or proto is not Protocol.TCP:
                return True
            connection = _tcp_connect(address, port, _share(deadline - time.monotonic(), tries - attempt))
            if connection is not None:
                return connection
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
        """Ask the server to close ``protocol/port`` for this client now (one knock, not confirmed).

        Arguments as for :meth:`knock`.

        :raises NotAuthorizedError, ResolveError, ClientError, ValueError: as :meth:`knock`.
        """
        _destination(knock_port, via)
        _, address, datagram, _ = self._prepare(
            host, port, protocol, family=family, source_address=source_address, action=Action.CLOSE, duration=None
        )
        self.send(datagram, address, knock_port, via)


# -- what both clients do alike, without I/O -------------------------------------------------------


def _check_timeout(timeout: float) -> None:
    if not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _tries(verify: bool, retries: int) -> int:
    if not isinstance(retries, int) or isinstance(retries, bool):
        raise ValueError(f"retries must be a whole number, not {retries!r}")
    return max(1, retries if verify else 1)


def _share(remaining: float, tries_left: int) -> float:
    """The seconds one knock may wait for its port: an equal share of what is left."""
    return max(0.0, remaining) / max(1, tries_left)


def _destination(knock_port: int | None, via: str | Carrier) -> tuple[Carrier, int]:
    """(carrier, UDP port) of a knock: a random port unless one is given; 0 over ICMP, which has none."""
    carrier = Carrier.parse(via)
    if carrier is Carrier.ICMP:
        if knock_port is not None:
            raise ValueError("knock_port is a UDP port: it has no meaning with via='icmp'")
        return carrier, 0
    port = 1024 + secrets.randbelow(65536 - 1024) if knock_port is None else _check_port(knock_port, "knock_port")
    return carrier, port


#: When a new connection attempt starts after a knock, in seconds since the knock (then every
#: ``_CONNECT_EVERY_MAX``).  With a drop policy the first SYN may reach the server just before the grant
#: and be dropped, and the kernel would resend it only after a second: a fresh attempt soon after does
#: not wait for that, while the earlier attempts stay pending, so a slow path still completes them.
#: A grant takes 1 to 2 ms on a local network (bench: latency p50 0.7 ms at 1,000 knocks/s, 1.2 ms at
#: 100/s), so the first gaps are 2 ms: ssh through the proxy (issue 12) usually has its connection from
#: the second or third attempt; each attempt is one SYN, and at most _CONNECT_PARALLEL wait at once.
_CONNECT_FIRST_GAPS = (0.0, 0.002, 0.002, 0.002, 0.002, 0.004, 0.008, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
_CONNECT_EVERY_MAX = 1.0
#: Attempts pending at once at most; the oldest is dropped for a new one.
_CONNECT_PARALLEL = 4


def _connect_times(budget: float) -> list[float]:
    """The offsets (seconds after the knock) at which connection attempts start, within ``budget``."""
    times: list[float] = []
    at = 0.0
    for gap in _CONNECT_FIRST_GAPS:
        at += gap
        if at >= budget:
            return times
        times.append(at)
    while (at := at + _CONNECT_EVERY_MAX) < budget:
        times.append(at)
    return times


def _tcp_connect(address: IPAddress, port: int, budget: float) -> socket.socket | None:
    """Connect to ``address:port`` within ``budget`` seconds (the knock may still be on its way): new
    attempts start at :func:`_connect_times` while earlier ones stay pending; the first that completes
    wins.  Returns it (blocking again), or None."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sockaddr = (str(address), port)
    start = time.monotonic()
    starts = _connect_times(budget)
    pending: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        while True:
            now = time.monotonic() - start
            while starts and starts[0] <= now:
                starts.pop(0)
                if len(pending) >= _CONNECT_PARALLEL:
                    oldest = pending.pop(0)
                    selector.unregister(oldest)
                    oldest.close()
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setblocking(False)
                if s.connect_ex(sockaddr) not in (0, errno.EINPROGRESS):
                    s.close()
                    continue
                pending.append(s)
                selector.register(s, selectors.EVENT_WRITE)
            wake = starts[0] if starts else budget
            if now >= budget:
                return None
            for key, _ in selector.select(max(0.0, wake - now)):
                done = key.fileobj
                assert isinstance(done, socket.socket)
                selector.unregister(done)
                pending.remove(done)
                if done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.setblocking(True)
                    return done
                done.close()
    finally:
        selector.close()
        for s in pending:
            s.close()


class AsyncKnockClient:
    """:class:`KnockClient` for asyncio applications: the same arguments, ``await client.knock(...)``.

    Nothing it does blocks the event loop: resolving, signing and the proof of work run in the loop's
    default executor, the knock is sent with ``loop.sock_sendto`` and the port is confirmed with
    ``loop.sock_connect``.  What it does like :class:`KnockClient` (preparing the knock, the destination
    port, sharing the timeout between knocks, when connection attempts start) is the same code.
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
        """Arguments as for :class:`KnockClient` (loading a PKCS#12 takes milliseconds: done here, once).

        :raises CredentialError: as :class:`KnockClient`.
        """
        self._client = KnockClient(
            client_pfx=client_pfx,
            pfx_password=pfx_password,
            server_cert=server_cert,
            credentials=credentials,
            work_bits=work_bits,
            check_server_cert=check_server_cert,
            clock=clock,
        )

    @classmethod
    def from_client(cls, client: KnockClient) -> AsyncKnockClient:
        """An AsyncKnockClient sharing ``client``'s credentials and server certificate (for example one
        from :meth:`KnockClient.from_profile`).  It loads nothing, so it raises nothing."""
        self = cls.__new__(cls)
        self._client = client
        return self

    @property
    def client(self) -> KnockClient:
        """The synchronous :class:`KnockClient` this wraps (its credentials and server certificate)."""
        return self._client

    async def send(
        self, datagram: bytes, address: IPAddress, knock_port: int | None = None, via: str | Carrier = Carrier.UDP
    ) -> int:
        """:meth:`KnockClient.send` without blocking the event loop: over UDP with ``loop.sock_sendto`` on a
        non-blocking socket, over ICMP in the loop's executor; the same arguments, result and errors."""
        import asyncio

        carrier, port = _destination(knock_port, via)
        loop = asyncio.get_running_loop()
        if carrier is not Carrier.UDP:
            await loop.run_in_executor(None, send_by, datagram, address, carrier, port)
            return port
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                await loop.sock_sendto(s, datagram, (str(address), port))
        except OSError as exc:
            raise ClientError(f"cannot send the knock to {address} udp/{port}: {exc.strerror or exc}") from None
        return port

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
        """:meth:`KnockClient.knock` as a coroutine: the same arguments, result and errors."""
        import asyncio

        _check_timeout(timeout)
        _destination(knock_port, via)
        loop = asyncio.get_running_loop()
        tries = _tries(verify, retries)
        deadline = loop.time() + timeout
        for attempt in range(tries):
            fam, address, datagram, proto = await self._prepare(
                host, port, protocol, family=family, source_address=source_address,
                action=Action.OPEN, duration=duration,
            )
            await self.send(datagram, address, knock_port, via)
            if not verify or proto is not Protocol.TCP:
                return True
            if await _tcp_open_async(address, port, _share(deadline - loop.time(), tries - attempt)):
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
        """:meth:`KnockClient.close` as a coroutine: the same arguments and errors."""
        _destination(knock_port, via)
        _, address, datagram, _ = await self._prepare(
            host, port, protocol, family=family, source_address=source_address, action=Action.CLOSE, duration=None
        )
        await self.send(datagram, address, knock_port, via)

    async def _prepare(self, host: str, port: int, protocol: str | Protocol, **how: Any) -> _Prepared:
        """:meth:`KnockClient._prepare` (the same arguments) off the event loop: resolving, signing and the
        proof of work block."""
        import asyncio

        prepare = functools.partial(self._client._prepare, host, port, protocol, **how)
        return await asyncio.get_running_loop().run_in_executor(None, prepare)


async def _tcp_open_async(address: IPAddress, port: int, budget: float) -> bool:
    """:func:`_tcp_connect` on the event loop: attempts start at :func:`_connect_times`; True when one
    completes within ``budget`` seconds."""
    import asyncio

    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sockaddr = (str(address), port)

    async def attempt(s: socket.socket) -> bool:
        try:
            await loop.sock_connect(s, sockaddr)
        except OSError:
            return False
        return True

    start = loop.time()
    starts = _connect_times(budget)
    pending: dict[asyncio.Task[bool], socket.socket] = {}
    try:
        while True:
            now = loop.time() - start
            while starts and starts[0] <= now:
                starts.pop(0)
                if len(pending) >= _CONNECT_PARALLEL:
                    oldest = next(iter(pending))
                    oldest.cancel()
                    pending.pop(oldest).close()
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setblocking(False)
                pending[asyncio.ensure_future(attempt(s))] = s
            if now >= budget:
                return False
            wake = starts[0] if starts else budget
            if not pending:
                await asyncio.sleep(wake - now)
                continue
            done, _ = await asyncio.wait(pending, timeout=wake - now, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                pending.pop(task).close()
                if task.result():
                    return True
    finally:
        for task, s in pending.items():
            task.cancel()
            s.close()


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
    """Knock once: load the credentials, knock for ``protocol/port`` on ``host`` (the original sKnock's
    call shape).  :class:`KnockClient` loads them once for repeated knocks.

    :param host: the server: a name or an IPv4/IPv6 address.
    :param port: the port to open, 1..65535.
    :param protocol: ``"tcp"`` or ``"udp"``.
    :param client_pfx: the client's PKCS#12 file.
    :param pfx_password: its password.
    :param server_cert: the server's certificate file (DER or PEM).
    :param knock_port: the UDP port the knock goes to; random when None.
    :param verify: TCP only: confirm by connecting (knocking again up to ``retries`` times).
    :param timeout: seconds for all knocks and connection attempts together.
    :param retries: knocks at most when verifying.
    :param source_address: None/``"any"``, ``"auto"`` or an address (see :meth:`KnockClient.knock`).
    :param family: None (either), 4 or 6.
    :param duration: seconds to ask the port to stay open; None: the server's.
    :param work_bits: the proof of work attached.
    :param clock: where the time is read (as for :class:`KnockClient`).
    :param via: the carrier, ``"udp"`` or ``"icmp"`` (see :meth:`KnockClient.send`).
    :returns: True when the port opened (``verify``) or the knock was sent; False when it did not open
        within ``timeout``.
    :raises CredentialError: a file missing or unreadable, a wrong password (ServerCertificateError: the
        server certificate is not a server's).
    :raises NotAuthorizedError: the certificate does not name the port; nothing is sent.
    :raises ResolveError: the host does not resolve.
    :raises KnockBuildError: the certificate does not fit one datagram.
    :raises ClientError: a bad source address, or a send the kernel refused.
    :raises ValueError: an argument out of range.
    """
    client = KnockClient(
        client_pfx=client_pfx, pfx_password=pfx_password, server_cert=server_cert, work_bits=work_bits, clock=clock
    )
    return client.knock(
        host, port, protocol, knock_port=knock_port, verify=verify, timeout=timeout, retries=retries,
        source_address=source_address, family=family, duration=duration, via=via,
    )
