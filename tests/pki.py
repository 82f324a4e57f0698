"""A complete test PKI, made once per test session with :mod:`sknock.ca` (real keys, real files).

Use the session fixture ``pki`` (from conftest.py), a :class:`TestPKI`.  Everything is under
``pki.root`` (a tmp dir); every PKCS#12 and the CA key use :data:`PASSWORD`.

Attributes (each client is a :class:`Issued` with ``.name``, ``.pfx`` path, ``.certificate``,
``.credentials`` (a loaded ClientCredentials) and ``.ports``):

=================  ==========================================================================
``ca``             the opened root :class:`~sknock.ca.CertificateAuthority` (``ca.certificate``)
``ca_dir``         its directory: ``ca.cer``, ``ca.pem``, ``crl.der``, ``crl.pem``, ``index.json``
``ca_cert``        the root CA certificate
``crl``            the root's CRL (lists ``mallory``), loaded and signature-checked
``server``         server "server1": ``.pfx``, ``.cer`` (DER), ``.certificate``, ``.credentials``
                   (a ServerCredentials, EC P-256), ``.ips`` = ("198.18.0.1", "fd00:5e::1")
``alice``          client allowing tcp/22, tcp/2000-2010, udp/8000 -- the good client
``mallory``        client allowing tcp/22, revoked (in ``crl``)
``old``            client allowing tcp/22, expired (not_after a day before the session starts)
``stranger``       client allowing tcp/22, signed by another CA (``stranger_ca``), not ours
``noports``        client with no authorization extension: valid, authorizes nothing
``ed25519``        client with an Ed25519 key allowing tcp/22
``rsa``            client with an RSA-2048 key allowing tcp/22
``intermediate``   intermediate CA "sub-ca" under the root (a CertificateAuthority)
``intermediate_crl`` the intermediate's CRL (empty)
``bob``            client allowing tcp/22 issued by ``intermediate``
``stranger_ca``    the other CA (a CertificateAuthority in its own directory)
=================  ==========================================================================

``pki.verifier(**kw)`` builds a :class:`~sknock.trust.ClientVerifier` trusting the root, with
the intermediate and both CRLs; ``pki.now()`` is :data:`NOW` as a datetime, a time at which all but
``old`` are valid.

Time: the PKI is issued at :data:`ISSUED_AT`, the in-memory tests' one reading of the real clock (the
end-to-end tests use the same PKI with a real server, which reads its own clock, so it must be current).
In-memory tests run at :data:`NOW` and fixed offsets from it, and hand the client and the CA
:func:`at` as their clock, so they replay the same timeline whatever the real time is.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from sknock import ca as ca_lib
from sknock.credentials import ClientCredentials, ServerCredentials, load_client_pfx, load_server_pfx
from sknock.ports import PortSet, parse_ports
from sknock.trust import ClientVerifier, load_crl

PASSWORD = "test-password"
PASSWORD_BYTES = PASSWORD.encode()
ALICE_PORTS = "tcp/22,tcp/2000-2010,udp/8000"

#: When the session's test PKI is issued (Unix seconds, whole): read once, at import.
ISSUED_AT = float(int(time.time()))
#: The in-memory tests' "now" (Unix seconds): a minute after the PKI was issued.
NOW = ISSUED_AT + 60.0


def at(when: float) -> Callable[[], float]:
    """A clock that always says ``when`` (Unix seconds): for ``clock=`` of a KnockClient or a CA."""
    return lambda: when


def unnumbered_crl(
    authority: ca_lib.CertificateAuthority, *serials: int, issued: dt.datetime
) -> x509.CertificateRevocationList:
    """A CRL of ``authority`` without a CRL number (``sknock-ca`` always writes one), issued at ``issued``,
    valid a week, revoking ``serials``: two of them from one second cannot be told apart by age."""
    builder = (
        x509.CertificateRevocationListBuilder().issuer_name(authority.certificate.subject)
        .last_update(issued).next_update(issued + dt.timedelta(days=7))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build()
        )
    return builder.sign(authority.key, hashes.SHA256())


@dataclass(frozen=True)
class Issued:
    """One issued client: its name, PKCS#12 path, certificate, loaded credentials, ports."""

    name: str
    pfx: Path
    certificate: x509.Certificate
    credentials: ClientCredentials
    ports: PortSet


@dataclass(frozen=True)
class IssuedServer:
    name: str
    pfx: Path
    cer: Path
    certificate: x509.Certificate
    credentials: ServerCredentials
    ips: tuple[str, ...]


@dataclass
class TestPKI:
    __test__ = False

    root: Path
    ca: ca_lib.CertificateAuthority
    ca_dir: Path
    ca_cert: x509.Certificate
    crl: x509.CertificateRevocationList
    server: IssuedServer
    alice: Issued
    mallory: Issued
    old: Issued
    stranger: Issued
    noports: Issued
    ed25519: Issued
    rsa: Issued
    intermediate: ca_lib.CertificateAuthority
    intermediate_crl: x509.CertificateRevocationList
    bob: Issued
    stranger_ca: ca_lib.CertificateAuthority

    @staticmethod
    def now() -> dt.datetime:
        return dt.datetime.fromtimestamp(NOW, dt.UTC)

    def verifier(self, **kwargs: Any) -> ClientVerifier:
        return ClientVerifier(
            [self.ca_cert],
            [self.intermediate.certificate],
            [self.crl, self.intermediate_crl],
            **kwargs,
        )


def _client(authority: ca_lib.CertificateAuthority, name: str, ports: str | None, **kwargs: Any) -> Issued:
    port_set = parse_ports(ports) if ports else None
    cert = authority.issue_client(name, port_set, PASSWORD_BYTES, **kwargs)
    pfx = authority.directory / "client" / f"{name}.pfx"
    return Issued(name, pfx, cert, load_client_pfx(pfx, PASSWORD), port_set or PortSet(()))


def build_pki(root: Path) -> TestPKI:
    """Make the whole PKI under ``root``, issued at :data:`ISSUED_AT` (takes a few seconds, mostly the RSA key)."""
    ca_dir = root / "ca"
    issued = dt.datetime.fromtimestamp(ISSUED_AT, dt.UTC)
    authority = ca_lib.init_ca(ca_dir, PASSWORD_BYTES, name="sknock Test Root CA", clock=at(ISSUED_AT))
    server_cert = authority.issue_server("server1", PASSWORD_BYTES, ips=["198.18.0.1", "fd00:5e::1"])
    server_pfx = ca_dir / "server" / "server1.pfx"
    server = IssuedServer(
        "server1",
        server_pfx,
        ca_dir / "server" / "server1.cer",
        server_cert,
        load_server_pfx(server_pfx, PASSWORD),
        ("198.18.0.1", "fd00:5e::1"),
    )
    alice = _client(authority, "alice", ALICE_PORTS)
    mallory = _client(authority, "mallory", "tcp/22")
    start = issued - dt.timedelta(days=30)
    old = _client(authority, "old", "tcp/22", not_before=start, not_after=start + dt.timedelta(days=29))
    noports = _client(authority, "noports", None)
    ed = _client(authority, "ed25519", "tcp/22", key_type="ed25519")
    rsa_client = _client(authority, "rsa", "tcp/22", key_type="rsa-2048")
    sub = authority.issue_intermediate("sub-ca", PASSWORD_BYTES)
    bob = _client(sub, "bob", "tcp/22")
    authority.revoke("mallory")
    crl = load_crl((ca_dir / "crl.der").read_bytes(), [authority.certificate], source=str(ca_dir / "crl.der"))
    sub_crl = load_crl((sub.directory / "crl.pem").read_bytes(), [sub.certificate], source="sub crl.pem")
    other = ca_lib.init_ca(  # the same name on purpose
        root / "stranger-ca", PASSWORD_BYTES, name="sknock Test Root CA", clock=at(ISSUED_AT)
    )
    stranger = _client(other, "stranger", "tcp/22")
    return TestPKI(
        root=root,
        ca=authority,
        ca_dir=ca_dir,
        ca_cert=authority.certificate,
        crl=crl,
        server=server,
        alice=alice,
        mallory=mallory,
        old=old,
        stranger=stranger,
        noports=noports,
        ed25519=ed,
        rsa=rsa_client,
        intermediate=sub,
        intermediate_crl=sub_crl,
        bob=bob,
        stranger_ca=other,
    )
