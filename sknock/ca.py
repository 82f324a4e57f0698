"""A small certificate authority for sknock: issue, revoke, and publish a CRL.

One CA lives in one directory::

    DIR/ca.cer, DIR/ca.pem         the CA certificate (DER for the original sKnock, PEM for people)
    DIR/ca-chain.pem               only for an intermediate: the certificates above it
    DIR/private/ca.key             the CA key, PKCS#8 encrypted with the CA password (0600)
    DIR/server/NAME.pfx, NAME.cer  a server's PKCS#12 (0600) and its certificate alone (DER)
    DIR/client/NAME.pfx            a client's PKCS#12 (0600)
    DIR/intermediate/NAME/         an intermediate CA, laid out the same way (or anywhere else: ``out=``)
    DIR/crl.der, DIR/crl.pem       the signed CRL, with nextUpdate
    DIR/index.json                 what was issued: names, serials, kinds, ports, revocation

A two-level hierarchy is a root CA kept offline and an issuing intermediate: the root's key is needed
only to create (and revoke) the intermediate and to sign the root's CRL; the intermediate's directory,
with its own key and password, issues the clients and servers, revokes them and signs its own CRL.

Certificates follow the original sKnock's profile so its servers and clients accept ours, with the
criticality RFC 5280 asks for.  Files are written atomically (temporary file, fsync, rename), so a
crash never leaves half an index or a CRL that does not parse.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certificate import ports_general_name
from .credentials import SERVER_CURVES, client_key_problem
from .errors import CAError, CredentialError
from .fileio import write_atomic
from .ports import PortSet
from .protocol import SUITE_CURVES_TEXT, ClientKey

__all__ = [
    "KEY_TYPES",
    "SERVER_KEY_TYPES",
    "Entry",
    "CertificateAuthority",
    "init_ca",
    "open_ca",
    "read_index",
    "require_ca",
]

Kind = Literal["server", "client", "intermediate"]

_EC_CURVES: dict[str, ec.EllipticCurve] = {
    "ec-p256": ec.SECP256R1(),
    "ec-p384": ec.SECP384R1(),
    "ec-p521": ec.SECP521R1(),
}
KEY_TYPES = (*_EC_CURVES, "ed25519", "rsa-2048", "rsa-3072", "rsa-4096")
#: A server's key: knocks are encrypted to it with ECDH, so only the curves of the protocol's suites
#: (:data:`~sknock.credentials.SERVER_CURVES`) will do.
SERVER_KEY_TYPES = tuple(name for name, curve in _EC_CURVES.items() if curve.name in SERVER_CURVES)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clock skew between the CA and servers
_INDEX_VERSION = 1
#: PBKDF2-HMAC-SHA256 rounds for the key (and certificate) bags of the PKCS#12 files written here:
#: OpenSSL 3's default (``openssl pkcs12 -export``).  More would not protect the key better: the file's
#: MAC, which cryptography always derives with 2048 rounds of the PKCS#12 KDF, already tells a password
#: guess right or wrong, so a thief's cost per guess is set by the MAC.  The 100 000 rounds used before
#: cost every client start ~26 ms (two derivations) for nothing; such files still load.
_KDF_ROUNDS = 2048


@dataclass(frozen=True, slots=True)
class Entry:
    """One certificate the CA issued, as recorded in ``index.json``."""

    name: str
    kind: Kind
    serial: int
    not_after: dt.datetime
    ports: str  # admin form, "" for servers and CAs
    revoked_at: dt.datetime | None

    @property
    def revoked(self) -> bool:
        """Whether the CA has revoked this certificate (it then appears on the CRLs the CA issues)."""
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        """This entry as it is written to ``index.json`` (serial in hex, dates in ISO 8601)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
            "ports": self.ports,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }

    @classmethod
    def from_json(cls, raw: Any, source: Path) -> Entry:
        """Read one entry of ``index.json`` (``source`` names the file in errors); raises :class:`CAError`
        when the entry is malformed."""
        try:
            kind = raw["kind"]
            if kind not in ("server", "client", "intermediate"):
                raise ValueError(f"unknown kind {kind!r}")
            revoked_at = raw.get("revoked_at")
            return cls(
                name=str(raw["name"]),
                kind=kind,
                serial=int(raw["serial"], 16),
                not_after=dt.datetime.fromisoformat(raw["not_after"]),
                ports=str(raw.get("ports", "")),
                revoked_at=dt.datetime.fromisoformat(revoked_at) if revoked_at else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CAError(f"{source}: bad entry {raw!r}: {exc}") from None


def _utc(clock: Callable[[], float]) -> dt.datetime:
    """The time ``clock`` says (Unix seconds, like ``time.time``) as an aware UTC datetime, as X.509 wants it."""
    return dt.datetime.fromtimestamp(clock(), dt.UTC)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise CAError(f"bad name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")


def _new_key(key_type: str) -> ClientKey:
    curve = _EC_CURVES.get(key_type)
    if curve is not None:
        return ec.generate_private_key(curve)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise CAError(f"unknown key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")


def _serial() -> int:
    """A random 128-bit serial: unpredictable (so colliding-prefix attacks on the CA fail) and
    positive and non-zero, as RFC 5280 requires."""
    return secrets.randbits(128) or 1


def _pkcs12_encryption(password: bytes) -> serialization.KeySerializationEncryption:
    """Modern PKCS#12 protection: AES-256-CBC with PBKDF2, HMAC-SHA256 for the MAC."""
    return (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )


def _require_password(password: bytes) -> bytes:
    if not password:
        raise CAError("an empty password is not allowed")
    return password


class CertificateAuthority:
    """An opened CA directory: its key, certificate, chain above it, and index.

    ``clock`` (Unix seconds, ``time.time`` unless given) is the one place the CA reads the time: when
    certificates start and CRLs are signed.  The intermediates it creates get the same clock; the tests
    issue their PKI at a fixed time with it."""

    def __init__(
        self,
        directory: Path,
        key: ClientKey,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.key = key
        self.certificate = certificate
        self.chain = tuple(chain)  # certificates above this CA, nearest first; empty for a root
        self.clock = clock

    def now(self) -> dt.datetime:
        """What the CA's clock says, as an aware UTC datetime."""
        return _utc(self.clock)

    # -- reading -------------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        """The CA's ``index.json``: the record of every certificate it issued and its CRL number."""
        return self.directory / "index.json"

    def _load_index(self) -> dict[str, Any]:
        return _read_index_doc(self.index_path)

    def entries(self) -> list[Entry]:
        """Everything this CA issued, in issue order."""
        return read_index(self.directory)

    def entry(self, name: str) -> Entry:
        """The issued certificate called ``name``; raises :class:`CAError` when this CA issued none by that
        name."""
        for e in self.entries():
            if e.name == name:
                return e
        raise CAError(f"no certificate named {name!r} in {self.directory}")

    def _save_index(self, entries: Iterable[Entry], crl_number: int) -> None:
        doc = {"version": _INDEX_VERSION, "crl_number": crl_number, "entries": [e.to_json() for e in entries]}
        write_atomic(self.index_path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))

    def _record(self, entry: Entry) -> None:
        index = self._load_index()
        entries = self.entries()
        if any(e.name == entry.name for e in entries):
            raise CAError(f"a certificate named {entry.name!r} already exists in {self.directory}")
        self._save_index([*entries, entry], int(index.get("crl_number", 0)))

    def ensure_new(self, name: str) -> None:
        """CAError unless ``name`` is a good name that this CA has not used yet."""
        self._ensure_new(name)

    def _ensure_new(self, name: str) -> None:
        _check_name(name)
        if any(e.name == name for e in self.entries()):
            raise CAError(f"a certificate named {name!r} already exists in {self.directory}")

    # -- issuing -------------------------------------------------------------------------------

    def _sign_algorithm(self) -> hashes.HashAlgorithm | None:
        return None if isinstance(self.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()

    def _builder(
        self,
        common_name: str,
        public_key: Any,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
        days: int,
    ) -> x509.CertificateBuilder:
        now = self.now()
        start = not_before or (now - _BACKDATE)
        end = not_after or (now + dt.timedelta(days=days))
        if end <= start:
            raise CAError(f"certificate for {common_name!r} would end ({end}) before it starts ({start})")
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )

    def _write_pfx(self, path: Path, name: str, key: ClientKey, cert: x509.Certificate, password: bytes) -> None:
        data = pkcs12.serialize_key_and_certificates(
            name.encode("utf-8"),
            key,
            cert,
            [self.certificate, *self.chain],
            _pkcs12_encryption(_require_password(password)),
        )
        write_atomic(path, data, 0o600)

    def issue_server(
        self,
        name: str,
        pfx_password: bytes,
        *,
        ips: Sequence[str] = (),
        dns: Sequence[str] = (),
        days: int = 825,
        key_type: str = "ec-p256",
    ) -> x509.Certificate:
        """Issue a server certificate (keyAgreement, serverAuth) to ``server/NAME.pfx`` and ``.cer``.

        One per server: two servers sharing a certificate accept each other's knocks (docs/pki.md), so a
        name already issued, or whose files are already in ``server/``, is refused rather than replaced."""
        self._ensure_new(name)
        if key_type not in SERVER_KEY_TYPES:
            raise CAError(
                f"server keys must be EC {SUITE_CURVES_TEXT} ({', '.join(SERVER_KEY_TYPES)}: knocks are encrypted "
                f"to them with ECDH), not {key_type!r}"
            )
        for existing in (self.directory / "server" / f"{name}.pfx", self.directory / "server" / f"{name}.cer"):
            if existing.exists():
                raise CAError(f"{existing} already exists: a server named {name!r} was issued before; "
                              "give this server a name of its own")
        key = _new_key(key_type)
        sans: list[x509.GeneralName] = []
        for ip in ips:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise CAError(f"bad --ip {ip!r}: not an IPv4 or IPv6 address") from None
        for d in dns:
            try:
                sans.append(x509.DNSName(d.encode("idna").decode("ascii")))
            except UnicodeError:
                raise CAError(f"bad --dns {d!r}: not a DNS name") from None
        builder = (
            self._builder(name, key.public_key(), None, None, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(key_agreement=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, self._sign_algorithm())  # type: ignore[arg-type]
        self._write_pfx(self.directory / "server" / f"{name}.pfx", name, key, cert, pfx_password)
        write_atomic(self.directory / "server" / f"{name}.cer", cert.public_bytes(serialization.Encoding.DER))
        self._record(Entry(name, "server", cert.serial_number, cert.not_valid_after_utc, "", None))
        return cert

    def issue_client(
        self,
        name: str,
        ports: PortSet | None,
        pfx_password: bytes,
        *,
        days: int = 365,
        key_type: str = "ec-p256",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Issue a client certificate (digitalSignature, clientAuth, the ports extension) to
        ``client/NAME.pfx``.  ``ports=None`` leaves the extension out: such a client can open
        nothing.  ``not_before``/``not_after`` override ``days`` (tests use them for expired certificates).
        """
        self._ensure_new(name)
        key = _new_key(key_type)
        cert = self._client_certificate(name, key.public_key(), ports, days, not_before, not_after)
        self._write_pfx(self.directory / "client" / f"{name}.pfx", name, key, cert, pfx_password)
        self._record(Entry(name, "client", cert.serial_number, cert.not_valid_after_utc, str(ports or ""), None))
        return cert

    def issue_client_for_request(
        self,
        name: str,
        ports: PortSet | None,
        request: x509.CertificateSigningRequest,
        *,
        days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Issue a client certificate for the key of a certificate request made elsewhere (on a token: the
        private key never comes here) to ``client/NAME.cer`` (DER) and ``client/NAME.pem``.

        The request's signature must verify (whoever made it holds the key) and its key must be one a
        client signs knocks with (:func:`~sknock.credentials.client_key_problem`).  Only its key is used:
        the subject is CN=NAME and the extensions are the same as :meth:`issue_client` gives, whatever the
        request asks for."""
        self._ensure_new(name)
        for existing in (self.directory / "client" / f"{name}.cer", self.directory / "client" / f"{name}.pem"):
            if existing.exists():
                raise CAError(f"{existing} already exists: a client named {name!r} was issued before")
        try:
            valid = request.is_signature_valid
            public = request.public_key()
        except Exception as exc:  # noqa: BLE001 -- an algorithm or key cryptography cannot read
            raise CAError(f"the request for {name!r} cannot be checked ({type(exc).__name__})") from None
        if not valid:
            raise CAError(f"the request for {name!r}: its signature does not verify")
        problem = client_key_problem(public)
        if problem is not None:
            raise CAError(f"the request for {name!r}: {problem}")
        cert = self._client_certificate(name, public, ports, days, not_before, not_after)
        client_dir = self.directory / "client"
        write_atomic(client_dir / f"{name}.cer", cert.public_bytes(serialization.Encoding.DER))
        write_atomic(client_dir / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        self._record(Entry(name, "client", cert.serial_number, cert.not_valid_after_utc, str(ports or ""), None))
        return cert

    def _client_certificate(
        self,
        name: str,
        public: Any,
        ports: PortSet | None,
        days: int,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> x509.Certificate:
        builder = (
            self._builder(name, public, not_before, not_after, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # keyAgreement like the original, where it means something (EC keys).
            .add_extension(
                _key_usage(digital_signature=True, key_agreement=isinstance(public, ec.EllipticCurvePublicKey)),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if ports is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([ports_general_name(ports)]), critical=False)
        return builder.sign(self.key, self._sign_algorithm())  # type: ignore[arg-type]

    def issue_intermediate(
        self, name: str, ca_password: bytes, *, days: int = 1825, out: str | os.PathLike[str] | None = None
    ) -> CertificateAuthority:
        """Create an issuing intermediate CA and return it, opened: its directory is ``out`` (anywhere, for
        instance on the machine that will run it) or ``intermediate/NAME/`` here.  pathLen 0: it issues
        only clients and servers.  Its key is encrypted with ``ca_password``, its own.  It never outlives
        this CA (its end is cut to this CA's).  It is recorded here, so ``revoke NAME`` revokes it (and
        with it every certificate it issued) in this CA's CRL."""
        self._ensure_new(name)
        limit = _path_length(self.certificate)
        if limit is not None and limit < 1:
            raise CAError(f"{self.directory}: this CA (pathLen {limit}) may not have intermediate CAs under it")
        directory = Path(out) if out is not None else self.directory / "intermediate" / name
        if directory.resolve() == self.directory.resolve():
            raise CAError(f"{directory} is this CA's own directory; give the intermediate another one")
        end = min(self.now() + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._builder(name, key.public_key(), None, end, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .sign(self.key, self._sign_algorithm())  # type: ignore[arg-type]
        )
        sub = _write_ca(directory, key, cert, [self.certificate, *self.chain], ca_password, self.clock)
        self._record(Entry(name, "intermediate", cert.serial_number, cert.not_valid_after_utc, "", None))
        return sub

    # -- revoking ------------------------------------------------------------------------------

    def revoke(
        self, name: str, *, now: dt.datetime | None = None, crl_days: int = 30
    ) -> x509.CertificateRevocationList:
        """Mark ``name`` revoked and publish a new CRL (returned)."""
        when = now or self.now()
        index = self._load_index()
        entries = self.entries()
        for i, e in enumerate(entries):
            if e.name == name:
                if e.revoked:
                    raise CAError(f"{name!r} is already revoked (since {e.revoked_at})")
                entries[i] = Entry(e.name, e.kind, e.serial, e.not_after, e.ports, when)
                break
        else:
            raise CAError(f"no certificate named {name!r} in {self.directory}")
        self._save_index(entries, int(index.get("crl_number", 0)))
        return self.write_crl(days=crl_days, now=when)

    def write_crl(self, *, days: int = 30, now: dt.datetime | None = None) -> x509.CertificateRevocationList:
        """Sign a CRL of every revoked certificate, valid ``days``, to ``crl.der`` and ``crl.pem``."""
        if days < 1:
            raise CAError(f"CRL validity must be at least one day, not {days}")
        when = now or self.now()
        index = self._load_index()
        number = int(index.get("crl_number", 0)) + 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(when - _BACKDATE)
            .next_update(when + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        entries = self.entries()
        for e in entries:
            if e.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(e.serial).revocation_date(e.revoked_at).build()
                )
        crl = builder.sign(self.key, self._sign_algorithm())  # type: ignore[arg-type]
        write_atomic(self.directory / "crl.der", crl.public_bytes(serialization.Encoding.DER))
        write_atomic(self.directory / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        self._save_index(entries, number)
        return crl


def _path_length(cert: x509.Certificate) -> int | None:
    """The pathLen constraint of a CA certificate (None: no limit)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


def _key_usage(
    *,
    digital_signature: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_ca(
    directory: Path,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    password: bytes,
    clock: Callable[[], float],
) -> CertificateAuthority:
    if (directory / "ca.cer").exists() or (directory / "private" / "ca.key").exists():
        raise CAError(f"{directory} already holds a CA")
    (directory / "private").mkdir(parents=True, exist_ok=True)
    os.chmod(directory / "private", 0o700)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(_require_password(password)),
    )
    write_atomic(directory / "private" / "ca.key", pem_key, 0o600)
    write_atomic(directory / "ca.cer", cert.public_bytes(serialization.Encoding.DER))
    write_atomic(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    if chain:
        write_atomic(directory / "ca-chain.pem", b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    ca = CertificateAuthority(directory, key, cert, chain, clock=clock)
    ca._save_index([], 0)
    ca.write_crl()
    return ca


def init_ca(
    directory: str | os.PathLike[str],
    password: bytes,
    *,
    name: str = "sknock CA",
    days: int = 3650,
    clock: Callable[[], float] = time.time,
) -> CertificateAuthority:
    """Create a root CA in ``directory`` (EC P-256, self-signed) and publish an empty CRL.  The CA
    returned keeps ``clock`` (see :class:`CertificateAuthority`)."""
    directory = Path(directory)
    if not name.strip():
        raise CAError("the CA name must not be empty")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _utc(clock)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_ca(directory, key, cert, [], password, clock)


def _read_index_doc(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {"version": _INDEX_VERSION, "crl_number": 0, "entries": []}
    except (OSError, ValueError) as exc:
        raise CAError(f"{path}: cannot read the index: {exc}") from None
    if not isinstance(raw, dict) or raw.get("version") != _INDEX_VERSION or not isinstance(raw.get("entries"), list):
        raise CAError(f"{path}: not a sknock CA index (version {_INDEX_VERSION})")
    return raw


def read_index(directory: str | os.PathLike[str]) -> list[Entry]:
    """What the CA in ``directory`` issued, read without its key (for listing)."""
    path = Path(directory) / "index.json"
    return [Entry.from_json(e, path) for e in _read_index_doc(path)["entries"]]


def require_ca(directory: str | os.PathLike[str]) -> Path:
    """``directory`` as a Path, or CAError when no CA lives there (checked before asking a password)."""
    directory = Path(directory)
    if not (directory / "ca.cer").exists() or not (directory / "private" / "ca.key").exists():
        raise CAError(f"{directory}: no CA here (run 'sknock-ca --dir {directory} init' first)")
    return directory


def open_ca(
    directory: str | os.PathLike[str], password: bytes, *, clock: Callable[[], float] = time.time
) -> CertificateAuthority:
    """Open the CA in ``directory`` with its password; it reads the time from ``clock``."""
    directory = require_ca(directory)
    key_path = directory / "private" / "ca.key"
    cert_path = directory / "ca.cer"
    try:
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
        chain_path = directory / "ca-chain.pem"
        chain = x509.load_pem_x509_certificates(chain_path.read_bytes()) if chain_path.exists() else []
    except (OSError, ValueError) as exc:
        raise CAError(f"{directory}: cannot read the CA certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password)
    except (TypeError, ValueError):
        raise CredentialError(f"CA key {key_path}: wrong password or not a PEM private key") from None
    except OSError as exc:
        raise CredentialError(f"CA key {key_path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(key, ClientKey):
        raise CAError(f"CA key {key_path}: unsupported key type {type(key).__name__}")
    if key.public_key() != cert.public_key():
        raise CAError(f"CA key {key_path} does not match {cert_path}")
    return CertificateAuthority(directory, key, cert, chain, clock=clock)
