"""The server's decision, sans-I/O: ``check(datagram, source, now) -> Grant`` or :class:`KnockRefused`.

This is the whole verification pipeline of a knock server with no sockets, no clock and no firewall:
the daemon feeds it datagrams and the time, and applies the grants it returns.  Cheapest checks first::

    length, version, suite, clear time, key id, proof of work     (wire.precheck: two hashes)
    pre-crypto replay cache on the body digest                     (a dict lookup)
    ECDH + HKDF + AES-GCM, strict parse                            (protocol.open_knock)
    timestamp window, authoritative replay cache on the nonce
    certificate well-formed, chain + validity + CRL (cached per certificate fingerprint; trust.py)
    signature, source address binding, authorization of every port

State: two replay caches and a certificate cache, all bounded.  :meth:`KnockVerifier.set_trust` swaps
the trust (new CRL) and drops the certificate cache.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import CertificateError, KnockRefused, Reason
from .ports import Protocol
from .protocol import Action, OpenedKnock, Prechecked, fingerprint, open_knock, precheck, verify_signature
from .replay import ReplayCache
from .trust import ClientVerifier, VerifiedClient, parse_client_certificate

__all__ = ["VerifierPolicy", "Grant", "KnockVerifier"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class VerifierPolicy:
    timestamp_threshold: float = 7.0  # TIMESTAMP_THRESHOLD_IN_SECONDS
    min_work_bits: int = 12
    default_duration: float = 15.0  # PORT_OPEN_DURATION_IN_SECONDS
    max_duration: float = 3600.0  # the longest a client may ask for
    require_source_address: bool = False
    replay_capacity: int = 1_000_000
    certificate_cache_size: int = 10_000


@dataclass(frozen=True, slots=True)
class Grant:
    """What the firewall should do: open (or close) ``ports`` for ``address`` for ``duration`` seconds."""

    action: Action
    address: IPAddress
    ports: tuple[tuple[Protocol, int], ...]
    duration: float
    client: str  # certificate subject, escaped for logs
    serial: int
    nonce: bytes
    nonce_expires: float = 0.0  # Unix time after which the nonce can no longer be replayed (out of the window)


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class KnockVerifier:
    """Holds the server identity, the trust, the policy and the caches; decides on each datagram."""

    def __init__(
        self,
        *,
        server_key: ec.EllipticCurvePrivateKey,
        server_certificate: x509.Certificate,
        trust: ClientVerifier,
        policy: VerifierPolicy = VerifierPolicy(),  # noqa: B008 -- frozen, so sharing the default is safe
    ) -> None:
        if server_key.public_key().public_numbers() != server_certificate.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError("the server key does not match the server certificate")
        self._server_key = server_key
        self._fingerprint = fingerprint(server_certificate.public_bytes(serialization.Encoding.DER))
        self._key_ids = frozenset({self._fingerprint[:4]})
        self._trust = trust
        self.policy = policy
        window = policy.timestamp_threshold
        self._seen_digests = ReplayCache(policy.replay_capacity, evict_when_full=True)
        self._seen_nonces = ReplayCache(policy.replay_capacity, evict_when_full=False)
        self._window = window
        # fingerprint -> (verdict, valid from, valid until), in Unix seconds
        self._certificates: OrderedDict[bytes, tuple[VerifiedClient | CertificateError, float, float]] = OrderedDict()
        self.counters: Counter[str] = Counter()

    # -- trust -----------------------------------------------------------------------------------

    def set_trust(self, trust: ClientVerifier) -> None:
        """Use new trust (typically a new CRL): every cached certificate verdict is dropped."""
        self._trust = trust
        self._certificates.clear()

    # -- the pipeline ----------------------------------------------------------------------------

    def check(self, datagram: bytes, source: IPAddress, now: float) -> Grant:
        """Decide on one datagram from ``source`` at Unix time ``now``.  Raises :class:`KnockRefused`."""
        return self.complete(self.precheck(datagram, now), source, now)

    def precheck(self, datagram: bytes, now: float) -> Prechecked:
        """The stage that costs no public-key operation (refusals are counted)."""
        try:
            pre = precheck(
                datagram,
                now=now,
                window=self._window,
                min_work_bits=self.policy.min_work_bits,
                key_ids=self._key_ids,
            )
            if self._seen_digests.seen(pre.body_digest, now):
                raise KnockRefused(Reason.REPLAY_SEEN)
            self._seen_digests.add(pre.body_digest, pre.header.coarse_time + self._window + 1, now)
            return pre
        except KnockRefused as exc:
            self.counters[exc.reason.value] += 1
            raise

    def complete(self, pre: Prechecked, source: IPAddress, now: float) -> Grant:
        """The expensive stage, for a datagram :meth:`precheck` passed."""
        try:
            grant = self._complete(pre, _unmap(source), now)
        except KnockRefused as exc:
            self.counters[exc.reason.value] += 1
            raise
        self.counters["granted" if grant.action is Action.OPEN else "closed"] += 1
        return grant

    def _complete(self, pre: Prechecked, source: IPAddress, now: float) -> Grant:
        opened = open_knock(pre, server_key=self._server_key, server_fingerprint=self._fingerprint)
        request = opened.request
        age = now - request.timestamp_ms / 1000
        if abs(age) > self._window:
            raise KnockRefused(Reason.TIMESTAMP, f"knock is {age:+.3f} s old, window {self._window:g} s")
        if self._seen_nonces.seen(request.nonce, now):
            raise KnockRefused(Reason.REPLAY, "nonce seen before")
        client = self._verify_certificate(opened, now)
        verify_signature(client.certificate.public_key(), opened.signature, opened.signed_message)
        bound = request.source_address
        if bound is None:
            if self.policy.require_source_address:
                raise KnockRefused(Reason.SOURCE_REQUIRED, f"from {source}: knock carries no source address")
        elif _unmap(bound) != source:
            raise KnockRefused(Reason.SOURCE_MISMATCH, f"signed for {bound}, came from {source}")
        refused = [f"{p.label}/{port}" for p, port in request.ports if (p, port) not in client.ports]
        if refused:
            raise KnockRefused(Reason.NOT_AUTHORIZED, f"{client.subject} may not open {','.join(refused)}")
        # Only knocks that passed every check enter the authoritative cache, so nobody without a valid
        # certificate can fill it; full means a flood by valid clients, and refusing is fail-closed.
        if not self._seen_nonces.add(request.nonce, request.timestamp_ms / 1000 + self._window, now):
            raise KnockRefused(Reason.OVERLOAD, "replay cache full")
        duration = min(float(request.duration or self.policy.default_duration), self.policy.max_duration)
        return Grant(
            action=request.action,
            address=source,
            ports=request.ports,
            duration=duration,
            client=client.subject,
            serial=client.certificate.serial_number,
            nonce=request.nonce,
            nonce_expires=request.timestamp_ms / 1000 + self._window,
        )

    def _verify_certificate(self, opened: OpenedKnock, now: float) -> VerifiedClient:
        """Well-formedness, chain, dates, usage and CRL, cached per certificate fingerprint.  A success
        is reused while the certificate is in date; a failure is re-examined after a minute (a clock or
        a CA file may have been fixed); :meth:`set_trust` drops all of it."""
        key = fingerprint(opened.certificate)
        cached = self._certificates.get(key)
        if cached is not None and cached[1] <= now < cached[2]:
            self._certificates.move_to_end(key)
            verdict = cached[0]
        else:
            verdict, valid_from, valid_until = self._verify_uncached(opened.certificate, now)
            self._certificates[key] = (verdict, valid_from, valid_until)
            if len(self._certificates) > self.policy.certificate_cache_size:
                self._certificates.popitem(last=False)
        if isinstance(verdict, CertificateError):
            raise KnockRefused(verdict.reason, str(verdict))
        return verdict

    def _verify_uncached(self, der: bytes, now: float) -> tuple[VerifiedClient | CertificateError, float, float]:
        try:
            certificate = parse_client_certificate(der)
            client = self._trust.verify(certificate, dt.datetime.fromtimestamp(now, dt.UTC))
        except CertificateError as exc:
            return CertificateError(exc.reason, str(exc)), now, now + 60  # cached: without its traceback
        return client, certificate.not_valid_before_utc.timestamp(), client.not_after.timestamp()

