"""Deciding whether a client certificate is one of ours: chain, dates, usage, revocation.

Pure: the caller passes the time in and the CRLs already loaded; nothing here reads a clock or a
file, so the verifier is tested against any timeline and the daemon decides when to refresh CRLs.

Chain building is cryptography's (:mod:`cryptography.x509.verification`), with one deliberate
loosening for the original sKnock's CA, whose basicConstraints is not marked critical: the CA
policy accepts basicConstraints at any criticality (it must still be present and say CA).  On top
of the chain this module enforces what a knock needs -- EKU clientAuth and keyUsage
digitalSignature on the leaf -- and checks revocation of the leaf and of every intermediate
against the CRL of its issuer, which cryptography's verifier leaves to us.  The original never
checked a CRL's signature; :func:`load_crl` always does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from .certificate import authorized_ports, describe_name, quiet_certificate_warnings
from .credentials import server_certificate_problem
from .errors import CertificateError, Reason
from .ports import PortSet
from .protocol import fingerprint

__all__ = [
    "VerifiedClient",
    "ClientVerifier",
    "parse_client_certificate",
    "check_well_formed",
    "load_crl",
    "crl_signer",
    "crl_number",
    "crl_rollback",
    "current_crls",
    "describe_crl_issue",
    "cas_without_crl",
    "verify_server_certificate",
    "RevocationId",
    "revocation_id",
]

#: What a CRL entry names: the SHA-256 of the issuer's name (DER) and the serial number.  A grant carries
#: one per certificate of its chain below the trust anchor, so the monitor can close it when a CRL
#: revokes the client or a CA above it, without parsing a certificate.
RevocationId = tuple[bytes, int]


def revocation_id(issuer: x509.Name, serial: int) -> RevocationId:
    """The :data:`RevocationId` of the certificate ``serial`` from ``issuer``: how a CRL entry names it."""
    return hashlib.sha256(issuer.public_bytes()).digest(), serial


class VerifiedClient(NamedTuple):
    """A client certificate that chains to a trusted CA, is in date, unrevoked, and fit for knocking."""

    certificate: x509.Certificate
    subject: str  # RFC 4514, escaped with log_safe: it goes into logs and grant requests as it is
    ports: PortSet
    not_after: dt.datetime
    revocation_ids: tuple[RevocationId, ...] = ()  # the leaf's first, then each intermediate's

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the certificate's DER.  Computed when asked, not on every verification: the
        verifier already hashed the DER once, as its certificate cache's key."""
        return fingerprint(self.certificate)


def _aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(dt.UTC)


def check_well_formed(cert: x509.Certificate, what: str = "client certificate") -> None:
    """Read every field of ``cert`` that a verdict or a message may use, once, so that a malformed one
    is refused here as ``cert-invalid`` instead of raising something else later.

    cryptography parses most of a certificate lazily: a certificate that loads may still claim a version
    it does not have, hold a subject or issuer that does not decode (a UTF8String with byte 0xFF, a
    BIT STRING where a string belongs), extensions that do not parse, or a key of an unknown type, and
    then raise ValueError, TypeError, InvalidVersion or UnsupportedAlgorithm at the first read.  Whatever
    it raises while reading what a stranger sent us means the certificate is malformed, so every
    exception is caught here: this is the one place that decides it, on the uncached path only.
    """
    try:
        with quiet_certificate_warnings():
            if cert.version is not x509.Version.v3:
                raise CertificateError(Reason.CERT_INVALID, f"{what}: version {cert.version.name}, not v3")
            # Each read parses (and so checks) one part; the values themselves are not needed here.
            _ = cert.serial_number, cert.tbs_certificate_bytes, cert.signature_hash_algorithm, cert.public_key()
            _ = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
            _ = [extension.value for extension in cert.extensions]
            before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    except CertificateError:
        raise
    except Exception as exc:  # noqa: BLE001 -- see above: any failure to read it means malformed
        raise CertificateError(Reason.CERT_INVALID, f"{what} is malformed: {type(exc).__name__}: {exc}") from None
    if before > after:
        raise CertificateError(Reason.CERT_INVALID, f"{what}: validity ends before it begins")


def parse_client_certificate(der: bytes) -> x509.Certificate:
    """The one way in for a client certificate from the wire: DER to a certificate whose every field
    reads (:func:`check_well_formed`), or ``CertificateError`` with reason ``cert-invalid``."""
    try:
        with quiet_certificate_warnings():
            cert = x509.load_der_x509_certificate(der)
    except Exception as exc:  # noqa: BLE001 -- ValueError, InvalidVersion, ...: not a certificate we can read
        raise CertificateError(
            Reason.CERT_INVALID, f"client certificate is not valid DER: {type(exc).__name__}: {exc}"
        ) from None
    check_well_formed(cert)
    return cert


def _issued_by(child_issuer: x509.Name, candidates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    return [c for c in candidates if c.subject == child_issuer]


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return bool(crl.is_signature_valid(ca.public_key()))  # type: ignore[arg-type]
    except (TypeError, ValueError, InvalidSignature):
        return False


def load_crl(data: bytes, issuers: Sequence[x509.Certificate], *, source: str) -> x509.CertificateRevocationList:
    """Parse a CRL (DER or PEM) and check it is signed by one of ``issuers``.

    ``source`` (a path or URL) names it in errors.  A CRL nobody we trust signed is worthless:
    anyone could publish an empty one to un-revoke a key.
    """
    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CertificateError(Reason.CRL_UNAVAILABLE, f"CRL {source}: not a DER or PEM CRL ({exc})") from None
    try:
        named = _issued_by(crl.issuer, issuers)
    except ValueError as exc:  # an issuer name that does not decode
        raise CertificateError(Reason.CRL_UNAVAILABLE, f"CRL {source}: malformed issuer ({exc})") from None
    if not named:
        raise CertificateError(
            Reason.CRL_UNAVAILABLE, f"CRL {source}: issued by {describe_name(crl.issuer)}, which is not a known CA"
        )
    for ca in named:
        if _crl_signed_by(crl, ca):
            if not _may_sign_crls(ca):
                raise CertificateError(
                    Reason.CRL_UNAVAILABLE, f"CRL {source}: issuer {describe_name(ca.subject)} may not sign CRLs"
                )
            problem = _partial_crl(crl)
            if problem:
                raise CertificateError(
                    Reason.CRL_UNAVAILABLE, f"CRL {source} of {describe_name(crl.issuer)}: {problem}"
                )
            return crl
    raise CertificateError(
        Reason.CRL_UNAVAILABLE, f"CRL {source}: signature does not verify against {describe_name(crl.issuer)}"
    )


def _partial_crl(crl: x509.CertificateRevocationList) -> str | None:
    """Why ``crl`` cannot stand for every certificate of its CA, or None.  The verifier looks a serial up
    in the one CRL it holds for the issuer and takes absence as "not revoked": a delta CRL, a CRL limited
    to some certificates or reasons, an indirect CRL, or one with a critical extension we do not
    understand could leave out a revoked serial, so it is refused (RFC 5280 6.3.3 asks as much)."""
    try:
        for extension in crl.extensions:
            value = extension.value
            if isinstance(value, x509.DeltaCRLIndicator):
                return "it is a delta CRL (only the changes since a base CRL); publish the complete CRL"
            if isinstance(value, x509.IssuingDistributionPoint):
                if (
                    value.only_contains_user_certs
                    or value.only_contains_ca_certs
                    or value.only_contains_attribute_certs
                    or value.only_some_reasons
                    or value.indirect_crl
                ):
                    return ("its issuingDistributionPoint limits it to some certificates or reasons; publish a CRL "
                            "that covers every certificate of the CA")
            elif extension.critical and isinstance(value, x509.UnrecognizedExtension):
                return f"critical extension {extension.oid.dotted_string} is not understood"
        for entry in crl:
            for extension in entry.extensions:
                if extension.critical:  # certificateIssuer (an indirect CRL) or something unknown
                    return f"an entry carries critical extension {extension.oid.dotted_string}"
    except ValueError as exc:
        return f"malformed extension ({exc})"
    return None


def crl_signer(
    crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The CA among ``cas`` that signed ``crl``, or None."""
    for ca in _issued_by(crl.issuer, cas):
        if _crl_signed_by(crl, ca):
            return ca
    return None


def cas_without_crl(
    cas: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList]
) -> list[x509.Certificate]:
    """The CAs of ``cas`` that signed none of ``crls``.  With ``require_crl`` every client whose chain
    passes through one of them is refused (``crl-unavailable``): a root's CRL is what says whether the
    intermediates under it are revoked, the intermediate's what says it of the clients."""
    signers = {fingerprint(ca) for crl in crls if (ca := crl_signer(crl, cas)) is not None}
    return [ca for ca in cas if fingerprint(ca) not in signers]


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL's cRLNumber, which RFC 5280 (5.2.3) has grow from each CRL of a CA to the next; None without one."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except (x509.ExtensionNotFound, ValueError):
        return None


def describe_crl_issue(crl: x509.CertificateRevocationList) -> str:
    """``CRL number 7 issued 2026-…`` (or ``a CRL without a number issued …``): which issue of a CA's CRL it is."""
    number = crl_number(crl)
    which = f"CRL number {number}" if number is not None else "a CRL without a number"
    return f"{which} issued {crl.last_update_utc.isoformat()}"


def crl_rollback(new: x509.CertificateRevocationList, held: x509.CertificateRevocationList) -> str | None:
    """Why ``new`` must not take the place of ``held`` (two CRLs of one CA), or None when it may.

    ``new`` is older, and refused, when its thisUpdate is earlier or (both carrying one) its CRL number is
    lower: thisUpdate has whole seconds, so two CRLs a CA signs within one second (a revocation right after
    the last CRL) differ only in their number, and the older must never come back to un-revoke a key.  It
    is newer when one of the two is later and neither earlier.  When neither tells (one second and no
    numbers, or one number signed twice), ``new`` is taken only if it revokes every certificate ``held``
    revokes: fail closed, a revocation is never dropped on a guess.  The one decision for every place that
    chooses between two CRLs of a CA: a CRL source's refresh, the set handed to the workers, the verifier."""
    signs = [(new.last_update_utc > held.last_update_utc) - (new.last_update_utc < held.last_update_utc)]
    new_number, held_number = crl_number(new), crl_number(held)
    if new_number is not None and held_number is not None:
        signs.append((new_number > held_number) - (new_number < held_number))
    if min(signs) < 0:
        return (f"it is {describe_crl_issue(new)}, older than the CRL in hand ({describe_crl_issue(held)}); "
                "an older CRL could un-revoke keys")
    if max(signs) > 0:
        return None
    dropped = {entry.serial_number for entry in held} - {entry.serial_number for entry in new}
    if not dropped:
        return None
    return (f"it is {describe_crl_issue(new)} and the CRL in hand is {describe_crl_issue(held)}: which is newer "
            f"cannot be told, and it leaves out {len(dropped)} certificate(s) the CRL in hand revokes; an older "
            "CRL could un-revoke keys")


def current_crls(crls: Iterable[x509.CertificateRevocationList]) -> list[x509.CertificateRevocationList]:
    """Of CRLs of one CA (from several sources), the ones a certificate must be checked against: each CRL
    that another may replace (:func:`crl_rollback`) is dropped, in the order given.  Usually one is left.
    Two are kept when neither may replace the other -- issued in the same second without CRL numbers (or
    with one number twice), and each revoking a certificate the other does not: which is newer cannot be
    told, so a certificate is revoked if either lists it (fail closed)."""
    kept: list[x509.CertificateRevocationList] = []
    for crl in crls:
        if any(crl_rollback(crl, k) is not None and crl_rollback(k, crl) is None for k in kept):
            continue  # an older one
        kept = [k for k in kept if crl_rollback(crl, k) is not None] + [crl]
    return kept


def _may_sign_crls(ca: x509.Certificate) -> bool:
    try:
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # old CAs without keyUsage may sign anything
    return bool(ku.crl_sign)


def _in_date(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


class ClientVerifier:
    """Verifies client certificates against fixed roots, intermediates and CRLs.

    Build a new one when the CRLs change; it holds no mutable state, so one instance can serve
    many threads.  ``require_crl=True`` refuses (``crl-unavailable``) a chain in which some issuer
    has no CRL loaded, or only one past its nextUpdate -- unless ``accept_stale_crl``, with which a CRL
    past its nextUpdate still counts (the monitor keeps the last good CRL while the CRL URL is down, and
    reports it loudly).
    """

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        crls: Sequence[x509.CertificateRevocationList] = (),
        *,
        require_crl: bool = False,
        accept_stale_crl: bool = False,
        max_chain_depth: int = 4,
    ) -> None:
        if not roots:
            raise ValueError("ClientVerifier needs at least one root CA certificate")
        self._roots = tuple(roots)
        self._intermediates = list(intermediates)
        self._store = Store(list(roots))
        self._require_crl = require_crl
        self._accept_stale_crl = accept_stale_crl
        self._max_chain_depth = max_chain_depth
        # The original sKnock CA marks basicConstraints non-critical; accept any criticality.
        self._ca_policy = ExtensionPolicy.webpki_defaults_ca().require_present(
            x509.BasicConstraints, Criticality.AGNOSTIC, None
        )
        # A client with no ports extension has no subjectAltName; it is still a valid client.
        self._ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
        by_ca: dict[bytes, list[x509.CertificateRevocationList]] = {}
        cas = [*roots, *intermediates]
        for crl in crls:
            signers = [ca for ca in _issued_by(crl.issuer, cas) if _crl_signed_by(crl, ca)]
            if not signers:
                raise CertificateError(
                    Reason.CRL_UNAVAILABLE, f"CRL from {describe_name(crl.issuer)} is not signed by any configured CA"
                )
            for ca in signers:
                by_ca.setdefault(fingerprint(ca), []).append(crl)
        # Each CA's CRLs to check against: the newest, or more than one where which is newer cannot be told.
        self._crls = {key: current_crls(held) for key, held in by_ca.items()}

    def verify(self, leaf: x509.Certificate, now: dt.datetime) -> VerifiedClient:
        """Return the verified client, or raise CertificateError with reason ``cert-expired``,
        ``cert-untrusted``, ``cert-invalid``, ``cert-revoked`` or ``crl-unavailable``."""
        now = _aware(now)
        with quiet_certificate_warnings():
            check_well_formed(leaf)
            return self._verify(leaf, now)

    def _verify(self, leaf: x509.Certificate, now: dt.datetime) -> VerifiedClient:
        subject = describe_name(leaf.subject)
        if not _in_date(leaf, now):
            when = "not valid before" if now < leaf.not_valid_before_utc else "expired at"
            at = leaf.not_valid_before_utc if now < leaf.not_valid_before_utc else leaf.not_valid_after_utc
            raise CertificateError(Reason.CERT_EXPIRED, f"client certificate {subject}: {when} {at.isoformat()}")
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now.replace(tzinfo=None))
            .max_chain_depth(self._max_chain_depth)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
            .build_client_verifier()
        )
        try:
            chain = verifier.verify(leaf, self._intermediates).chain
        except VerificationError as exc:
            raise self._chain_error(leaf, now, exc) from None
        except ValueError as exc:
            raise CertificateError(Reason.CERT_INVALID, f"client certificate {subject}: malformed: {exc}") from None
        self._check_usage(leaf, subject)
        self._check_revocation(chain, now)
        return VerifiedClient(
            certificate=leaf,
            subject=subject,
            ports=authorized_ports(leaf),
            not_after=leaf.not_valid_after_utc,
            revocation_ids=tuple(revocation_id(c.issuer, c.serial_number) for c in chain[:-1]),
        )

    def _chain_error(self, leaf: x509.Certificate, now: dt.datetime, exc: VerificationError) -> CertificateError:
        """Say ``cert-expired`` when the chain failed only because an issuer is out of date."""
        subject = describe_name(leaf.subject)
        cas = [*self._roots, *self._intermediates]
        cert = leaf
        for _ in range(self._max_chain_depth + 1):
            issuers = _issued_by(cert.issuer, cas)
            if not issuers:
                break
            if all(not _in_date(i, now) for i in issuers):
                return CertificateError(
                    Reason.CERT_EXPIRED,
                    f"client certificate {subject}: issuer {describe_name(issuers[0].subject)} "
                    f"is not valid at {now.isoformat()}",
                )
            cert = issuers[0]
            if cert.subject == cert.issuer:
                break
        return CertificateError(Reason.CERT_UNTRUSTED, f"client certificate {subject}: no trusted chain: {exc}")

    @staticmethod
    def _check_usage(leaf: x509.Certificate, subject: str) -> None:
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
                raise CertificateError(Reason.CERT_INVALID, f"client certificate {subject}: EKU lacks clientAuth")
        except x509.ExtensionNotFound:
            raise CertificateError(
                Reason.CERT_INVALID, f"client certificate {subject}: no EKU (needs clientAuth)"
            ) from None
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise CertificateError(
                Reason.CERT_INVALID, f"client certificate {subject}: no keyUsage (needs digitalSignature)"
            ) from None
        if not ku.digital_signature:
            raise CertificateError(
                Reason.CERT_INVALID, f"client certificate {subject}: keyUsage lacks digitalSignature"
            )

    def _check_revocation(self, chain: Sequence[x509.Certificate], now: dt.datetime) -> None:
        # chain is leaf first, trust anchor last; the anchor is trusted by configuration, not by CRL.
        for cert, issuer in zip(chain, chain[1:], strict=False):
            crls = self._crls.get(fingerprint(issuer), [])
            what = "client certificate" if cert is chain[0] else "intermediate CA"
            expired = [c.next_update_utc for c in crls if c.next_update_utc is not None and c.next_update_utc < now]
            if not crls or (expired and not self._accept_stale_crl):
                if self._require_crl:
                    state = "no CRL loaded" if not crls else f"its CRL expired at {min(expired)}"
                    raise CertificateError(
                        Reason.CRL_UNAVAILABLE,
                        f"issuer {describe_name(issuer.subject)} of {describe_name(cert.subject)}: {state}",
                    )
                if not crls:
                    continue
            if any(c.get_revoked_certificate_by_serial_number(cert.serial_number) is not None for c in crls):
                raise CertificateError(
                    Reason.CERT_REVOKED,
                    f"{what} {describe_name(cert.subject)} (serial {cert.serial_number:x}) is revoked",
                )


def verify_server_certificate(
    cert: x509.Certificate, cas: Sequence[x509.Certificate], now: dt.datetime
) -> x509.Certificate:
    """Check a server certificate was issued directly by one of ``cas``, is in date, and has the server
    profile (:func:`~sknock.credentials.server_certificate_problem`: an EC P-256/P-384 key, not a CA,
    keyAgreement where keyUsage is present, serverAuth where EKU is present).  Returns the issuing CA;
    raises CertificateError otherwise."""
    now = _aware(now)
    with quiet_certificate_warnings():
        subject = describe_name(cert.subject)
        if not _in_date(cert, now):
            raise CertificateError(Reason.CERT_EXPIRED, f"server certificate {subject}: not valid at {now.isoformat()}")
        issuer = None
        for ca in _issued_by(cert.issuer, cas):
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            issuer = ca
            break
        if issuer is None:
            raise CertificateError(Reason.CERT_UNTRUSTED, f"server certificate {subject}: not issued by a trusted CA")
        if not _in_date(issuer, now):
            raise CertificateError(
                Reason.CERT_EXPIRED, f"server certificate {subject}: issuer {describe_name(issuer.subject)} not in date"
            )
        problem = server_certificate_problem(cert)
        if problem is not None:
            raise CertificateError(Reason.CERT_INVALID, f"server certificate {subject}: {problem}")
        return issuer
