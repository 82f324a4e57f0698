"""The server's decision, sans-I/O: ``check(datagram, source, now) -> Grant`` or :class:`KnockRefused`.

This is the whole verification pipeline of a knock server with no sockets, no clock and no firewall:
a worker feeds it datagrams and the time, and applies the grants it returns.  Cheapest checks first::

    length, version, suite, clear time, key id, proof of work     (wire.precheck: two hashes)
    copies: what is known of the body digest already               (a dict lookup)
    ECDH + HKDF + AES-GCM, strict parse                            (protocol.open_knock)
    timestamp window, authoritative replay cache on the nonce
    certificate well-formed, chain + validity + CRL (cached per certificate fingerprint)
    signature; source address required?; which ports it may open
    source address binding, authorization, then the nonce is spent

Nothing a datagram carries makes these methods raise anything but :class:`KnockRefused`: every
failure is a typed refusal (tests/fuzz shows it for raw datagrams, decrypted plaintexts and
certificates built by an attacker).

Copies of one datagram (the same body digest) are decided by what the first one cost: everything up
to the signature does not depend on who sent the datagram, so its verdict is kept per digest and a copy
pays only for the checks that do (the source binding).  Hence a copy of a knock bound to an address,
sent first from another address, cannot burn the genuine one: the copy is refused ``source-mismatch``
and the genuine sender's is still granted, once.  A knock that was granted (bound or not) is final
for every source; a refused one is refused for every source.  While the first copy waits for the
expensive stage, copies from at most :data:`MAX_SOURCES_PER_KNOCK` distinct sources are admitted, so
a captured knock replayed from many spoofed sources costs one public-key operation in all.

State: the copy memory and the nonce replay cache, and a certificate cache, all bounded.
:meth:`KnockVerifier.set_trust` swaps the trust (new CRL) and drops the certificate cache.
"""

from __future__ import annotations

import datetime as dt
import heapq
import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from .addresses import IPAddress
from .errors import CertificateError, KnockRefused, Reason
from .ports import Protocol
from .protocol import (
    Action,
    KnockRequest,
    OpenedKnock,
    Prechecked,
    fingerprint,
    open_knock,
    precheck,
    verify_signature,
)
from .protocol.wire import DEFAULT_WORK_BITS
from .replay import ReplayCache
from .trust import ClientVerifier, RevocationId, VerifiedClient, parse_client_certificate

__all__ = ["VerifierPolicy", "Grant", "KnockVerifier", "KnockMemory", "MAX_SOURCES_PER_KNOCK"]

#: Distinct sources whose copies of one knock may wait for the expensive stage while its verdict is
#: still pending (the genuine sender's copy among them).  Once the verdict is known a copy is decided
#: at once, and a copy from the address the knock is bound to is always admitted.
MAX_SOURCES_PER_KNOCK = 8


@dataclass(frozen=True, slots=True)
class VerifierPolicy:
    """The verifier's limits, from the server's configuration: times in seconds, work in leading zero bits,
    capacities in entries."""

    timestamp_threshold: float = 7.0  # TIMESTAMP_THRESHOLD_IN_SECONDS
    min_work_bits: int = DEFAULT_WORK_BITS
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
    revocation_ids: tuple[RevocationId, ...] = ()  # what a CRL would name to revoke this client (trust.py)


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _Authentic:
    """The verdict on a knock that does not depend on its source: it decrypted, is in its window, its
    nonce is new, and a trusted certificate signed it.  What is left is per copy: the source binding
    (or its absence, when the policy requires one), then the ports (``denied``: the not-authorized
    detail, empty when every port may be opened).  A plain class: one is made per knock."""

    __slots__ = ("request", "client", "bound", "denied")

    def __init__(self, request: KnockRequest, client: VerifiedClient, bound: IPAddress | None, denied: str) -> None:
        self.request = request
        self.client = client
        self.bound = bound
        self.denied = denied


class _Knock:
    """What is known of one body digest: the sources admitted to the expensive stage, its verdict once
    known, and whether a copy was granted.  A granted knock is final for every source, so its verdict and
    sources are let go then: the memory holds a granted knock for its whole window, and every copy of it
    is refused on ``granted`` alone."""

    __slots__ = ("expiry", "sources", "verdict", "granted")

    def __init__(self, source: IPAddress | None, expiry: float) -> None:
        self.expiry = expiry
        self.sources: list[IPAddress] = [] if source is None else [source]
        self.verdict: _Authentic | KnockRefused | None = None
        self.granted = False

    def grant(self) -> None:
        """A copy was granted: nothing but ``granted`` is read any more."""
        self.granted = True
        self.verdict = None
        self.sources.clear()


class KnockMemory:
    """Body digests until they expire, each with its :class:`_Knock`; at most ``capacity`` of them.

    Anyone who solves the proof of work can add entries, so when full the entry that expires first is
    dropped (a copy of it then meets the nonce cache behind).  ``evict_when_full`` must be True; it is
    there so that this class is built like :class:`~sknock.replay.ReplayCache`.
    """

    __slots__ = ("_entries", "_heap", "capacity")

    def __init__(self, capacity: int, *, evict_when_full: bool = True) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        if not evict_when_full:
            raise ValueError("the copy memory must evict when full: anyone can fill it")
        self.capacity = capacity
        self._entries: dict[bytes, _Knock] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> _Knock | None:
        """What is known of ``digest``, or None when it was never seen or has expired by ``now``."""
        knock = self._entries.get(digest)
        return knock if knock is not None and knock.expiry >= now else None

    def seen(self, digest: bytes, now: float) -> bool:
        """Whether ``digest`` is remembered and not expired at ``now``."""
        return self.get(digest, now) is not None

    def add(self, digest: bytes, knock: _Knock, now: float) -> None:
        """Remember ``knock`` under ``digest`` until its expiry, first dropping what has expired and, when
        full, what expires first."""
        heap, entries = self._heap, self._entries
        while heap and (heap[0][0] < now or len(entries) >= self.capacity):
            expiry, old = heapq.heappop(heap)
            held = entries.get(old)
            if held is not None and held.expiry == expiry:
                del entries[old]
        entries[digest] = knock
        heapq.heappush(heap, (knock.expiry, digest))


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
        self._fingerprint = fingerprint(server_certificate)
        self._key_ids = frozenset({self._fingerprint[:4]})
        self._trust = trust
        self.policy = policy
        window = policy.timestamp_threshold
        self._seen_digests = KnockMemory(policy.replay_capacity, evict_when_full=True)
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
        return self.complete(self.precheck(datagram, now, source), source, now)

    def precheck(self, datagram: bytes, now: float, source: IPAddress | None = None) -> Prechecked:
        """The stage that costs no public-key operation (refusals are counted).

        A copy of a datagram seen before (the same body digest) passes only when it may still be
        granted to ``source``: see the module's docstring.  Without ``source`` every copy is refused
        ``replay-seen``."""
        try:
            pre = precheck(
                datagram,
                now=now,
                window=self._window,
                min_work_bits=self.policy.min_work_bits,
                key_ids=self._key_ids,
            )
            self._admit(pre, None if source is None else _unmap(source), now)
            return pre
        except KnockRefused as exc:
            self.counters[exc.reason.value] += 1
            raise

    def _admit(self, pre: Prechecked, source: IPAddress | None, now: float) -> None:
        """Remember the first copy of a digest; decide on a later one from what is known of it."""
        digest = pre.body_digest
        knock = self._seen_digests.get(digest, now)
        if knock is None:
            self._seen_digests.add(digest, _Knock(source, pre.header.coarse_time + self._window + 1), now)
            return
        if source is None or knock.granted or source in knock.sources:
            raise KnockRefused(Reason.REPLAY_SEEN)
        verdict = knock.verdict
        if verdict is None:  # the first copy still waits for the expensive stage
            if len(knock.sources) >= MAX_SOURCES_PER_KNOCK:
                raise KnockRefused(Reason.REPLAY_SEEN, f"copies from {len(knock.sources)} sources already wait")
        elif not isinstance(verdict, _Authentic) or verdict.bound is None:
            raise KnockRefused(Reason.REPLAY_SEEN)  # refused for every source, or unbound and spent
        elif verdict.bound != source:
            raise KnockRefused(Reason.SOURCE_MISMATCH, f"signed for {verdict.bound}, came from {source}")
        knock.sources.append(source)

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
        knock = self._seen_digests.get(pre.body_digest, now)
        if knock is not None and knock.granted:  # a copy that waited while the first was granted
            raise KnockRefused(Reason.REPLAY_SEEN)
        verdict = None if knock is None else knock.verdict
        cached = verdict is not None
        if verdict is None:
            try:
                verdict = self._authenticate(pre, now)
            except KnockRefused as refusal:
                # Kept without its traceback, whose frames hold the plaintext and the shared secret.
                verdict = KnockRefused(refusal.reason, refusal.detail)
            if knock is not None:
                knock.verdict = verdict
        if isinstance(verdict, KnockRefused):
            raise KnockRefused(verdict.reason, verdict.detail)
        return self._grant(verdict, source, now, knock, recheck=cached)

    def _authenticate(self, pre: Prechecked, now: float) -> _Authentic:
        """Every check that does not depend on who sent the datagram: the public-key work."""
        opened = open_knock(pre, server_key=self._server_key, server_fingerprint=self._fingerprint)
        request = opened.request
        self._check_fresh(request, now)
        client = self._verify_certificate(opened, now)
        verify_signature(client.certificate.public_key(), opened.signature, opened.signed_message)
        bound = request.source_address
        refused = [f"{p.label}/{port}" for p, port in request.ports if (p, port) not in client.ports]
        denied = f"{client.subject} may not open {','.join(refused)}" if refused else ""
        return _Authentic(request, client, None if bound is None else _unmap(bound), denied)

    def _check_fresh(self, request: KnockRequest, now: float) -> None:
        age = now - request.timestamp_ms / 1000
        if abs(age) > self._window:
            raise KnockRefused(Reason.TIMESTAMP, f"knock is {age:+.3f} s old, window {self._window:g} s")
        if self._seen_nonces.seen(request.nonce, now):
            raise KnockRefused(Reason.REPLAY, "nonce seen before")

    def _grant(
        self, verdict: _Authentic, source: IPAddress, now: float, knock: _Knock | None, *, recheck: bool
    ) -> Grant:
        """The checks that depend on the copy's source, then the nonce is spent."""
        if verdict.bound is None:
            if self.policy.require_source_address:
                raise KnockRefused(Reason.SOURCE_REQUIRED, f"from {source}: knock carries no source address")
        elif verdict.bound != source:
            raise KnockRefused(Reason.SOURCE_MISMATCH, f"signed for {verdict.bound}, came from {source}")
        if verdict.denied:
            raise KnockRefused(Reason.NOT_AUTHORIZED, verdict.denied)
        request = verdict.request
        if recheck:  # the verdict is an earlier copy's: time has passed, another knock may have used the nonce
            self._check_fresh(request, now)
        # Only knocks that passed every check enter the authoritative cache, so nobody without a valid
        # certificate can fill it; full means a flood by valid clients, and refusing is fail-closed.
        if not self._seen_nonces.add(request.nonce, request.timestamp_ms / 1000 + self._window, now):
            raise KnockRefused(Reason.OVERLOAD, "replay cache full")
        if knock is not None:
            knock.grant()
        duration = min(float(request.duration or self.policy.default_duration), self.policy.max_duration)
        return Grant(
            action=request.action,
            address=source,
            ports=request.ports,
            duration=duration,
            client=verdict.client.subject,
            serial=verdict.client.certificate.serial_number,
            nonce=request.nonce,
            nonce_expires=request.timestamp_ms / 1000 + self._window,
            revocation_ids=verdict.client.revocation_ids,
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
