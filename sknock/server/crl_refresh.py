"""Keep the server's CRL fresh: fetch it, check it, store it -- and never lose the last good one.

The CRL is the only way a stolen client key stops opening ports, so this edge is careful about two
failure modes that pull in opposite directions:

* A bad CRL must never replace a good one.  New bytes are verified (by the caller's ``verify``,
  which checks the CA's signature) *before* they are used or written, a CRL older than the one in
  hand is refused (a stale mirror must not un-revoke a key), and the file is replaced atomically
  so a crash mid-write leaves the old file, never half a file.
* A fetch problem must never take the server down.  Network trouble, HTTP errors, oversize or
  garbage bodies become a ``"failed"`` :class:`RefreshResult` that keeps the last good CRL; only a
  CRL past its nextUpdate is shouted about (``stale`` and a WARNING), since the server keeps
  working on it but revocations may be missing.

HTTP uses a conditional GET (If-None-Match / If-Modified-Since from the last good response) so a
30-minute poll costs the CA a 304; a Last-Modified within a minute of the response's Date is not sent back
(whole seconds could hide a CRL written again in the second it was served).  Time is passed in
(``refresh(now)``); nothing here reads a clock except to bound a download's duration.

A server may be given several CRL sources, one per CA in its chains (a root kept offline and the
intermediate that issues the clients).  Each source is one :class:`CrlRefresher`, kept to the CA whose
CRL it first brought (a source that starts serving another CA's CRL is refused, so that the rollback
check always compares CRLs of one issuer); :class:`CrlSet` holds them together for the monitor and
encodes the whole set as one message for the workers (:func:`encode_crl_set`, :func:`split_crl_set`).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
import schedule
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..fileio import write_atomic
from ..logsafe import log_safe
from ..trust import crl_rollback, current_crls

__all__ = [
    "CrlRefresher", "CrlSet", "RefreshResult", "schedule_refresh", "MAX_CRL_BYTES", "encode_crl_set", "split_crl_set",
    "FETCHED_HEADER",
]

#: A CRL larger than this is refused: even big CAs' CRLs are a few MiB, and the monitor and each worker hold it
#: in memory.
MAX_CRL_BYTES = 16 * 1024 * 1024

#: What the CRL fetcher puts before the bytes it downloaded: the index of their source (u16, big-endian).
FETCHED_HEADER = struct.Struct("!H")

_log = logging.getLogger("sknock.crl")
_CHUNK = 64 * 1024

Status = Literal["updated", "unchanged", "failed"]


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What one refresh did.

    ``crl`` is the CRL the server should use now (the new one, or the last good one; ``None`` only
    if there has never been a good one).  ``stale`` is true when that CRL is past its nextUpdate.
    """

    status: Status
    message: str
    crl: x509.CertificateRevocationList | None
    stale: bool


class _FetchFailed(Exception):
    """Internal: the source could not deliver bytes; the message says why."""


@dataclass(frozen=True, slots=True)
class _Fetched:
    body: bytes | None  # None: not modified (HTTP 304)
    etag: str | None = None
    last_modified: str | None = None


def _is_url(source: str) -> bool:
    return urlsplit(source).scheme.lower() in ("http", "https")


class CrlRefresher:
    """Fetches the CRL from ``source`` (an http(s) URL or a local path) into ``crl_file``.

    ``verify`` turns bytes into a CRL object or raises (the daemon passes ``sknock.trust.load_crl``
    bound to the CA).  Any exception from it means "refuse these bytes".  The object it returns is
    handed back in :attr:`RefreshResult.crl`; its ``next_update_utc`` drives the stale check, and its CRL
    number and thisUpdate the rollback check (:func:`sknock.trust.crl_rollback`).
    """

    def __init__(
        self,
        source: str,
        crl_file: Path,
        verify: Callable[[bytes], x509.CertificateRevocationList],
        session: requests.Session | None = None,
        timeout: float = 10.0,
        *,
        max_bytes: int = MAX_CRL_BYTES,
        store: Callable[[bytes], None] | None = None,
        announce: bool = True,
        read_existing: bool = True,
    ) -> None:
        # Where a verified new CRL goes: by default written atomically to crl_file; the unprivileged
        # CRL fetcher instead hands the bytes to the monitor, which may write there.
        self._store = store or (lambda data: write_atomic(self.crl_file, data))
        if not source or "\x00" in source:
            raise ValueError(f"bad CRL source {source!r}")
        scheme = urlsplit(source).scheme.lower()
        if scheme and scheme not in ("http", "https"):
            raise ValueError(f"CRL source {source!r}: only http://, https:// or a local path")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.source = source
        self.crl_file = Path(crl_file)
        self._verify = verify
        self._session = session
        self._own_session: requests.Session | None = None
        self._timeout = float(timeout)
        self._max_bytes = max_bytes
        self._current: x509.CertificateRevocationList | None = None
        self._current_bytes: bytes | None = None
        self._etag: str | None = None
        self._last_modified: str | None = None
        # False in the CRL fetcher, which never reads the operator's files (the monitor does, as root).
        self._adopted_file = not read_existing
        # False in the CRL fetcher, which only hands bytes on: the monitor announces what it adopts,
        # so that each CRL event is logged once.
        self._announce = announce

    @property
    def current(self) -> x509.CertificateRevocationList | None:
        """The last good CRL, or ``None`` if there has not been one."""
        return self._current

    def close(self) -> None:
        """Close the HTTP session this refresher made for itself (a caller's session is the caller's)."""
        if self._own_session is not None:
            self._own_session.close()
            self._own_session = None

    # -- the one public operation ---------------------------------------------------------------

    def refresh(self, now: datetime) -> RefreshResult:
        """Fetch, verify and store the CRL once.  Never raises for network trouble or bad bytes.

        ``now`` must be timezone-aware; it decides whether the CRL in hand is stale.
        """
        if now.tzinfo is None:
            raise ValueError("refresh(now) needs a timezone-aware datetime")
        self._adopt_existing_file()
        try:
            fetched = self._fetch_url() if _is_url(self.source) else self._fetch_path()
        except _FetchFailed as exc:
            return self._result("failed", f"cannot fetch CRL from {self.source}: {exc}", now)

        if fetched.body is None:
            return self._result("unchanged", f"CRL at {self.source} not modified", now)
        return self.accept(fetched.body, now, fetched)

    def accept(self, body: bytes, now: datetime, fetched: _Fetched | None = None) -> RefreshResult:
        """Verify ``body`` as the new CRL from this source, refuse it if it is older than the one in
        hand, store it and adopt it.  The monitor calls this with the bytes its unprivileged CRL
        fetcher sends: it trusts nothing from that process that it can check itself."""
        if now.tzinfo is None:
            raise ValueError("accept(now) needs a timezone-aware datetime")
        fetched = fetched or _Fetched(body)
        if self._current is not None and body == self._current_bytes:
            self._remember(fetched)
            return self._result("unchanged", f"CRL at {self.source} has not changed", now)
        try:
            crl = self._verify(body)
        except Exception as exc:  # verify is the caller's; anything it raises means "refuse"
            return self._result("failed", f"refused CRL from {self.source}: {exc}", now)
        other = _other_issuer(crl, self._current)
        if other:
            return self._result("failed", f"refused CRL from {self.source}: {other}", now)
        rollback = crl_rollback(crl, self._current) if self._current is not None else None
        if rollback:
            return self._result("failed", f"refused CRL from {self.source}: {rollback}", now)

        try:
            self._store(body)
        except OSError as exc:
            # The new CRL is verified and newer: use it in memory, but forget the validators so the
            # next refresh fetches again and retries the write.
            self._adopt(crl, body, _Fetched(body))
            return self._result(
                "failed", f"verified a new CRL from {self.source} but cannot write {self.crl_file}: {exc}", now
            )
        self._adopt(crl, body, fetched)
        where = f"into {self.crl_file}" if self._announce else "(handed on)"
        return self._result("updated", f"CRL updated from {self.source} {where}", now)

    def seed(self, crl: x509.CertificateRevocationList, body: bytes) -> None:
        """Start from a CRL already verified elsewhere (the CRL fetcher starts from the monitor's), so
        that nothing older is taken and the file need not be read."""
        self._current = crl
        self._current_bytes = body
        self._adopted_file = True

    @property
    def current_bytes(self) -> bytes | None:
        """The encoding of :attr:`current`, as it came from the source."""
        return self._current_bytes

    # -- state ----------------------------------------------------------------------------------

    def _adopt(self, crl: x509.CertificateRevocationList, body: bytes, fetched: _Fetched) -> None:
        self._current = crl
        self._current_bytes = body
        self._remember(fetched)

    def _remember(self, fetched: _Fetched) -> None:
        self._etag = fetched.etag
        self._last_modified = fetched.last_modified

    def _adopt_existing_file(self) -> None:
        """On the first refresh, take the CRL already on disk as the last good one if it verifies,
        so a CA that is down at startup does not leave the server without a CRL."""
        if self._adopted_file:
            return
        self._adopted_file = True
        try:
            data = _read_capped(self.crl_file, self._max_bytes)
        except FileNotFoundError:
            return
        except (OSError, _FetchFailed) as exc:
            _log.warning("existing CRL %s not usable: %s", self.crl_file, exc)
            return
        try:
            crl = self._verify(data)
        except Exception as exc:  # the caller's verify: anything means "refuse"
            _log.warning("existing CRL %s refused: %s", self.crl_file, exc)
            return
        self._current = crl
        self._current_bytes = data

    def _result(self, status: Status, message: str, now: datetime) -> RefreshResult:
        if status == "failed":
            message += "; keeping the last good CRL" if self._current is not None else "; there is no good CRL yet"
            _log.warning("%s", message)
        elif status == "updated" and self._announce:
            _log.info("%s", message)
        else:
            _log.debug("%s", message)
        stale = False
        next_update = _utc_attr(self._current, "next_update_utc")
        if next_update is not None and next_update < now:
            stale = True
            if self._announce:
                _log.warning(
                    "CRL %s is past its nextUpdate (%s): revocations since then may be missing; publish a "
                    "fresh CRL at %s (sknock-ca --dir CA_DIR crl signs one)",
                    self.crl_file,
                    next_update.isoformat(),
                    self.source,
                )
            message += f" (STALE: past nextUpdate {next_update.isoformat()})"
        return RefreshResult(status, message, self._current, stale)

    # -- fetching -------------------------------------------------------------------------------

    def _fetch_path(self) -> _Fetched:
        try:
            return _Fetched(_read_capped(Path(self.source), self._max_bytes))
        except OSError as exc:
            raise _FetchFailed(exc.strerror or str(exc)) from None

    def _fetch_url(self) -> _Fetched:
        headers = {"Accept-Encoding": "identity"}
        if self._current is not None:
            if self._etag:
                headers["If-None-Match"] = self._etag
            if self._last_modified:
                headers["If-Modified-Since"] = self._last_modified
        conditional = len(headers) > 1
        session = self._session
        if session is None:
            if self._own_session is None:
                self._own_session = requests.Session()
            session = self._own_session
        try:
            with session.get(self.source, headers=headers, timeout=self._timeout, stream=True) as response:
                if response.status_code == 304:
                    if not conditional:
                        raise _FetchFailed("HTTP 304 Not Modified, but there was no conditional request")
                    return _Fetched(None, self._etag, self._last_modified)
                if response.status_code != 200:
                    raise _FetchFailed(f"HTTP {response.status_code} {response.reason or ''}".rstrip())
                body = self._read_body(response)
                last_modified = _settled(response.headers.get("Last-Modified"), response.headers.get("Date"))
                return _Fetched(body, response.headers.get("ETag"), last_modified)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # raw reads raise urllib3's errors (requests wraps only its own iterators)
            raise _FetchFailed(f"{type(exc).__name__}: {exc}") from None

    def _read_body(self, response: requests.Response) -> bytes:
        """Read at most max_bytes within a deadline: a huge or slow-dripping body is refused."""
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max_bytes:
            raise _FetchFailed(f"CRL is {int(declared)} bytes, more than the {self._max_bytes}-byte limit")
        deadline = time.monotonic() + 3 * self._timeout
        raw: Any = response.raw
        chunks: list[bytes] = []
        size = 0
        for _ in range(self._max_bytes // _CHUNK + 2 + 10_000):  # bounded: read1 may return short reads
            chunk = raw.read1(_CHUNK, decode_content=True)
            if not chunk:
                break
            size += len(chunk)
            if size > self._max_bytes:
                raise _FetchFailed(f"CRL is more than the {self._max_bytes}-byte limit")
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise _FetchFailed(f"download took longer than {3 * self._timeout:g} seconds")
        else:
            raise _FetchFailed("download arrived in too many pieces")
        return b"".join(chunks)

    # -- storing --------------------------------------------------------------------------------


#: A Last-Modified at least this long before the response's Date is a safe If-Modified-Since (RFC 9110, 8.8.2.2).
SETTLED = timedelta(seconds=60)


def _settled(last_modified: str | None, date: str | None) -> str | None:
    """``last_modified`` if it may be sent back as If-Modified-Since, else None (the next fetch is unconditional).

    Last-Modified has whole seconds: a CRL served in the second it was written and written again within that
    second keeps its Last-Modified, and every later If-Modified-Since would bring a 304 that hides the new CRL
    (and its revocations) until the CA publishes again.  So it is kept only when the response's Date is at
    least :data:`SETTLED` later, as RFC 9110 asks of a strong validator; an unparsable or missing date is
    not trusted either.  A CRL of a few KiB fetched again in full costs less than a hidden revocation."""
    if not last_modified or not date:
        return None
    try:
        modified, served = parsedate_to_datetime(last_modified), parsedate_to_datetime(date)
        settled = modified.tzinfo is not None and served.tzinfo is not None and served - modified >= SETTLED
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return last_modified if settled else None


def _read_capped(path: Path, max_bytes: int) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _FetchFailed(f"{path} is more than the {max_bytes}-byte limit")
    return data


def _utc_attr(crl: object | None, name: str) -> datetime | None:
    value = getattr(crl, name, None) if crl is not None else None
    return value if isinstance(value, datetime) and value.tzinfo is not None else None


def _issuer_text(crl: object | None) -> str | None:
    issuer = getattr(crl, "issuer", None) if crl is not None else None
    if not isinstance(issuer, x509.Name):
        return None
    try:
        return issuer.rfc4514_string()
    except Exception:  # noqa: BLE001 -- a name that does not decode: compare nothing, refuse nothing here
        return None


def _other_issuer(new: object, current: object | None) -> str | None:
    """A reason to refuse ``new`` because it is another CA's CRL than the one this source brought."""
    new_issuer, current_issuer = _issuer_text(new), _issuer_text(current)
    if new_issuer is not None and current_issuer is not None and new_issuer != current_issuer:
        return (
            f"it is the CRL of {log_safe(new_issuer)}, but this source serves the CRL of {log_safe(current_issuer)} "
            "(each CRL source keeps one CA's CRL)"
        )
    return None


def schedule_refresh(
    refresher: CrlRefresher,
    minutes: int,
    scheduler: schedule.Scheduler,
    clock: Callable[[], datetime],
    on_result: Callable[[RefreshResult], None] = lambda result: None,
) -> Any:
    """Run ``refresher.refresh(clock())`` every ``minutes`` on ``scheduler`` and hand each result to
    ``on_result``; returns the schedule Job (``job.run()`` refreshes now, as on SIGHUP).

    The caller (the CRL fetcher process) owns the Scheduler and calls ``run_pending()`` from its loop, so no
    thread is started here.  An unexpected exception in a refresh or in ``on_result`` is logged, not raised, so a bug in
    the CRL edge does not stop the knock server (which keeps its last good CRL).
    """
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
        raise ValueError(f"CRL refresh interval must be a whole number of minutes >= 1, not {minutes!r}")

    def job() -> None:
        try:
            on_result(refresher.refresh(clock()))
        except Exception:
            _log.exception("CRL refresh from %s crashed; keeping the last good CRL", refresher.source)

    return scheduler.every(minutes).minutes.do(job)


# -- several sources ------------------------------------------------------------------------------


def encode_crl_set(crls: Iterable[x509.CertificateRevocationList]) -> bytes:
    """The CRLs as one byte string: their DER encodings one after the other (DER says its own length,
    so nothing else is needed).  One CRL encodes as exactly its DER, and none as ``b""``."""
    return b"".join(crl.public_bytes(serialization.Encoding.DER) for crl in crls)


def split_crl_set(data: bytes) -> list[bytes]:
    """The DER CRLs in ``data`` (made by :func:`encode_crl_set`), each still to be parsed and verified.
    Raises ValueError unless ``data`` is a whole number of DER SEQUENCEs."""
    parts: list[bytes] = []
    pos, size = 0, len(data)
    while pos < size:
        if size - pos < 2 or data[pos] != 0x30:
            raise ValueError(f"byte {pos}: not the start of a DER CRL")
        first = data[pos + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or size - pos < 2 + count:
                raise ValueError(f"byte {pos}: bad DER length")
            length, head = int.from_bytes(data[pos + 2 : pos + 2 + count], "big"), 2 + count
        end = pos + head + length
        if end > size:
            raise ValueError(f"byte {pos}: a CRL of {length} bytes, but only {size - pos - head} follow")
        parts.append(data[pos:end])
        pos = end
    return parts


class CrlSet:
    """The server's CRLs: one :class:`CrlRefresher` per configured source, in the configuration's order.

    The monitor keeps one; it reads the sources that are local paths itself (:meth:`local`) and is handed
    the bytes of the http(s) sources (:meth:`fetched`) by the unprivileged CRL fetcher.  Every source is
    verified against its own issuer (the refresher's ``verify``), refused when older than the CRL in hand
    from it, and kept to one CA.  :meth:`crls` is what the workers get: the newest CRL of each issuer.
    """

    def __init__(self, refreshers: Sequence[CrlRefresher]) -> None:
        self.refreshers = tuple(refreshers)

    def __len__(self) -> int:
        return len(self.refreshers)

    @property
    def sources(self) -> list[str]:
        """Each refresher's source (URL or path), in the configuration's order."""
        return [r.source for r in self.refreshers]

    def fetched(self) -> list[int]:
        """The sources the CRL fetcher downloads (http and https URLs), by index."""
        return [i for i, r in enumerate(self.refreshers) if _is_url(r.source)]

    def local(self) -> list[int]:
        """The sources the monitor reads itself (local paths), by index."""
        return [i for i, r in enumerate(self.refreshers) if not _is_url(r.source)]

    def refresh(self, now: datetime, indexes: Iterable[int]) -> list[RefreshResult]:
        """Refresh the sources ``indexes`` once each (see :meth:`CrlRefresher.refresh`)."""
        return [self.refreshers[i].refresh(now) for i in indexes]

    def accept(self, index: int, body: bytes, now: datetime) -> RefreshResult:
        """Bytes for source ``index`` (see :meth:`CrlRefresher.accept`)."""
        return self.refreshers[index].accept(body, now)

    def crls(self) -> list[x509.CertificateRevocationList]:
        """The CRLs in hand: for each issuer the newest one (when two sources serve one CA, the older
        CRL must not hide a revocation the newer lists; :func:`sknock.trust.current_crls`), in the order of
        the sources."""
        by_issuer: dict[bytes, list[x509.CertificateRevocationList]] = {}
        for refresher in self.refreshers:
            crl = refresher.current
            if isinstance(crl, x509.CertificateRevocationList):
                by_issuer.setdefault(crl.issuer.public_bytes(), []).append(crl)
        return [crl for held in by_issuer.values() for crl in current_crls(held)]

    def encoded(self) -> bytes:
        """:meth:`crls` as one message body (:func:`encode_crl_set`)."""
        return encode_crl_set(self.crls())

    def missing(self) -> list[str]:
        """The sources that have not brought a good CRL yet."""
        return [r.source for r in self.refreshers if r.current is None]
