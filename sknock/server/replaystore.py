"""The replay memory a fleet of servers shares: a knock one server applied is refused by every other.

The monitor of each server keeps its own memory of applied knocks (:class:`~sknock.server.journal.KnockJournal`);
that is enough for one server.  When several servers can see the same knock (a VRRP pair, anycast, a load
balancer, all holding one server certificate), a knock captured on its way to one of them could be replayed
to another within its timestamp window.  With ``replayStore = redis://...`` every monitor also claims each
knock it is about to apply in one Redis (or Valkey) shared by the fleet, with the atomic
``SET key 1 NX PX <ms until the knock leaves its window>``: the first server to claim a knock applies it,
every other one finds the key and refuses the knock as a replay.

A Redis that starts empty (its first start, a restart without persistence, a flush) has forgotten the
claims made before: a knock granted before then could be replayed to another server.  So every pipeline
also sets, if absent, and reads ``sknock:replay:since``, the Unix time the store's memory began; a knock
that could have been claimed before that time (its expiry is less than two timestamp windows after it)
is not confirmed, but treated as when the store is down.  That is a blackout of about one window after
Redis loses its memory, the same rule as the journal's floor.

What reaches Redis is no client data: the key is ``sknock:replay:`` and 32 hex digits of a SHA-256 over a
fixed domain-separation prefix and the knock's replay key (its random nonce, port and protocol); no
subject, address or nonce in clear.  The claims of one batch of the monitor go in one pipeline: one round
trip per batch, however many knocks it holds.

When the store cannot answer within ``replayStoreTimeout`` (down, slow, refusing), :class:`ReplayGate`
decides, without I/O of its own: with ``replayStoreFallback = refuse`` (the default) the knocks of that
batch are refused, since no server can tell whether another one granted them (the monitor logs and counts
each with :attr:`~sknock.errors.Reason.REPLAY_UNCONFIRMED`, as for a store whose memory is too young);
with ``local`` they are granted on this server's own memory alone, with an ERROR line per outage and a
counter in ``status``.  Either way the store is not asked again on every knock while it is down: one try
per retry interval (doubling up to :data:`MAX_RETRY`), and knocks between tries are decided at once.
docs/fleet.md says why the default is to refuse.

:class:`LocalReplayStore` is today's behaviour and the default: nothing is shared, every claim is
confirmed, and the journal alone decides.  :class:`RedisReplayStore` is the only code here that does I/O;
the ``redis`` package (the ``fleet`` extra) is imported only when it is used.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from ..errors import SknockError

__all__ = [
    "ReplayStore",
    "ReplayStoreError",
    "LocalReplayStore",
    "RedisReplayStore",
    "StoreAddress",
    "Fallback",
    "ReplayGate",
    "parse_store_address",
    "store_key",
    "KEY_PREFIX",
    "SINCE_KEY",
    "DEFAULT_TIMEOUT_MS",
    "FIRST_RETRY",
    "MAX_RETRY",
]

log = logging.getLogger("sknock.replaystore")

#: Every key sknock writes starts with this, so that the fleet's keys are easy to find and to keep apart.
KEY_PREFIX = b"sknock:replay:"
#: The Unix time the store's memory began (set by the first claim it sees); never expires.
SINCE_KEY = KEY_PREFIX + b"since"
#: Hashed before the replay key: a key cannot be mistaken for a hash of the same bytes made for another use.
_DOMAIN = b"sknock fleet replay key v1\x00"
DEFAULT_TIMEOUT_MS = 150
FIRST_RETRY = 0.25  # seconds after a failure before the store is asked again
MAX_RETRY = 2.0  # the longest wait between tries while the store is down
DEFAULT_PORT = 6379
MAX_DB = 1_000_000  # a Redis database number; servers allow 16 by default


class ReplayStoreError(SknockError):
    """The shared replay store could not confirm a claim: it is down, too slow or refused the command."""


def store_key(replay_key: bytes) -> bytes:
    """The Redis key for a knock's replay key: :data:`KEY_PREFIX` and a hash, with no client data in it."""
    return KEY_PREFIX + hashlib.sha256(_DOMAIN + replay_key).hexdigest()[:32].encode("ascii")


class Fallback(enum.StrEnum):
    """What a server does with knocks while the shared store cannot confirm them."""

    REFUSE = "refuse"  # refuse them (fail closed): the default
    LOCAL = "local"  # grant them on this server's own replay memory, with an ERROR line and a counter


@dataclass(frozen=True, slots=True)
class StoreAddress:
    """Where the shared store is: ``redis://[user[:password]@]host[:port][/db]``, ``rediss://`` for TLS.
    ``str()`` hides a password written in the URL."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        user = self.username or ""
        secret = ":***" if self.password is not None else ""
        at = "@" if user or secret else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{user}{secret}{at}{host}:{self.port}/{self.db}"


def parse_store_address(text: str) -> StoreAddress:
    """``redis://host:port/db`` (or rediss://) as a :class:`StoreAddress`; ValueError saying what is wrong."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"{text!r}: write local, redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: no ?query or #fragment (timeouts, TLS and the password have options of their own)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{text!r}: the port is not a number in 1..65535") from None
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    path = parts.path.strip("/")
    if path and (not path.isdigit() or not path.isascii() or int(path) > MAX_DB):
        raise ValueError(f"{text!r}: the database is {path!r}, not a number 0..{MAX_DB}")
    return StoreAddress(
        tls=scheme == "rediss",
        host=parts.hostname,
        port=port,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class ReplayStore(Protocol):
    """Where a monitor claims the knocks it is about to apply."""

    @property
    def name(self) -> str:
        """What logs and ``status`` call it (never a password)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other servers see its claims (False: this server's own memory only)."""
        ...

    def claim(self, entries: Sequence[tuple[bytes, float]], wall: float) -> list[bool | None]:
        """For each (replay key, Unix time it leaves the window): True when this call claimed it first, False
        when it was claimed before, None when the store cannot vouch for it (its memory began after the knock
        could have been claimed).  Raises :class:`ReplayStoreError` when the store cannot answer."""
        ...

    def disconnect(self) -> None:
        """Close any connection (before a fork: no child may inherit it); the next claim opens a new one."""
        ...


class LocalReplayStore:
    """Nothing shared: every claim is confirmed and the journal alone decides (the default, as before)."""

    name = "local"
    shared = False

    def claim(self, entries: Sequence[tuple[bytes, float]], wall: float) -> list[bool | None]:
        """Confirms every entry: this server's journal has already refused the ones it applied before."""
        return [True] * len(entries)

    def disconnect(self) -> None:
        """Nothing to close."""


class RedisReplayStore:
    """A Redis (or Valkey) shared by the fleet.  One connection, opened on first use; every command waits at
    most ``timeout`` seconds, and a failed one is never retried here (:class:`ReplayGate` decides when)."""

    shared = True

    def __init__(
        self, address: StoreAddress, *, password: str | None = None, ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_MS / 1000, window: float,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.window = window
        self._password = password if password is not None else address.password
        self._ca_file = ca_file
        self._client: Any = None

    @property
    def name(self) -> str:
        """The URL without its password."""
        return str(self.address)

    def _connect(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            address = self.address
            tls: dict[str, Any] = {}
            if address.tls:
                tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True,
                       "ssl_ca_certs": str(self._ca_file) if self._ca_file is not None else None}
            self._client = redis.Redis(
                host=address.host, port=address.port, db=address.db, username=address.username,
                password=self._password, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0), single_connection_client=True, health_check_interval=0, **tls,
            )
        return self._client

    def claim(self, entries: Sequence[tuple[bytes, float]], wall: float) -> list[bool | None]:
        """One pipeline of ``SET key 1 NX PX ms``, one round trip for the whole batch (with the memory's
        start, :data:`SINCE_KEY`)."""
        if not entries:
            return []
        import redis

        try:
            pipe = self._connect().pipeline(transaction=False)
            pipe.set(SINCE_KEY, repr(wall).encode("ascii"), nx=True)
            pipe.get(SINCE_KEY)
            for key, expiry in entries:
                pipe.set(store_key(key), b"1", nx=True, px=max(1, math.ceil((expiry - wall) * 1000)))
            answers = pipe.execute(raise_on_error=True)
        except (redis.RedisError, OSError, ValueError, TypeError) as exc:  # whatever it was, it did not confirm
            self.disconnect()
            raise ReplayStoreError(f"replay store {self.name}: {_describe(exc)}") from None
        try:
            since = float(answers[1])
        except (TypeError, ValueError, IndexError):
            since = math.nan
        if len(answers) != len(entries) + 2 or not math.isfinite(since):
            self.disconnect()
            raise ReplayStoreError(f"replay store {self.name}: unexpected answers (is {SINCE_KEY.decode()} "
                                   "written by something else?)")
        floor = since + 2 * self.window  # a knock expiring before this may have been claimed before `since`
        return [None if answer is True and expiry < floor else answer is True
                for answer, (_, expiry) in zip(answers[2:], entries, strict=True)]

    def begin(self, wall: float) -> float:
        """At the server's start: note ``wall`` as the start of the store's memory unless it has one; returns
        the one it has (so that a fresh store's blackout runs from now, not from the first knock)."""
        import redis

        try:
            pipe = self._connect().pipeline(transaction=False)
            pipe.set(SINCE_KEY, repr(wall).encode("ascii"), nx=True)
            pipe.get(SINCE_KEY)
            since = float(pipe.execute(raise_on_error=True)[1])
        except (redis.RedisError, OSError, TypeError, ValueError) as exc:
            raise ReplayStoreError(f"replay store {self.name}: {_describe(exc)}") from None
        finally:
            self.disconnect()
        return since

    def ping(self) -> float:
        """Seconds a PING took (for ``--check-config``); raises :class:`ReplayStoreError`."""
        import redis

        start = time.monotonic()
        try:
            self._connect().ping()
        except (redis.RedisError, OSError) as exc:
            raise ReplayStoreError(f"replay store {self.name}: {_describe(exc)}") from None
        finally:
            self.disconnect()
        return time.monotonic() - start

    def disconnect(self) -> None:
        """Close the connection, if one is open."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken socket may fail in any way; it is gone either way
                client.close()


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


class ReplayGate:
    """The shared check the monitor makes before it applies a batch, sans-I/O apart from the store it is given:
    which knocks to apply, what to do while the store is down, and when to ask it again (time passed in)."""

    def __init__(self, store: ReplayStore, *, fallback: Fallback = Fallback.REFUSE) -> None:
        self.store = store
        self.fallback = fallback
        self.down_since: float | None = None  # monotonic time of the first failure of this outage
        self.last_error: str | None = None
        self.counts = {"claimed": 0, "replays": 0, "refused_unconfirmed": 0, "granted_unconfirmed": 0, "outages": 0}
        self._retry_at = -math.inf
        self._retry = FIRST_RETRY

    def admit(self, entries: Sequence[tuple[bytes, float]], wall: float, now: float) -> list[bool | None]:
        """For each (replay key, expiry): True to apply it, False when another server claimed it first (a replay),
        None when the store could not confirm it (down, or its memory too young) and the fallback refuses it.
        ``now`` is monotonic."""
        if not entries:
            return []
        if self.down_since is not None and now < self._retry_at:
            return self._unconfirmed(len(entries))
        try:
            answers = self.store.claim(entries, wall)
        except ReplayStoreError as exc:
            self._failed(str(exc), now)
            return self._unconfirmed(len(entries))
        if self.down_since is not None:
            log.warning("replay store %s answers again after %.1f s: knocks are checked fleet-wide again",
                        self.store.name, now - self.down_since)
        self.down_since, self.last_error, self._retry = None, None, FIRST_RETRY
        claimed = answers.count(True)
        self.counts["claimed"] += claimed
        self.counts["replays"] += answers.count(False)
        young = answers.count(None)
        if not young:
            return list(answers)
        if self.fallback is Fallback.LOCAL:
            self.counts["granted_unconfirmed"] += young
            return [True if answer is None else answer for answer in answers]
        self.counts["refused_unconfirmed"] += young
        return list(answers)

    def _failed(self, error: str, now: float) -> None:
        if self.down_since is None:
            self.down_since = now
            self.counts["outages"] += 1
            if self.fallback is Fallback.REFUSE:
                consequence = "every knock is refused until it answers (replayStoreFallback = refuse)"
            else:
                consequence = ("knocks are checked against this server's own replay memory only, so a knock "
                               "replayed to another server of the fleet may be granted there too "
                               "(replayStoreFallback = local)")
            log.error("%s; %s; asking it again in %g s", error, consequence, self._retry)
        elif error != self.last_error:
            log.error("%s (still down, next try in %g s)", error, self._retry)
        self.last_error = error
        self._retry_at = now + self._retry
        self._retry = min(MAX_RETRY, self._retry * 2)

    def _unconfirmed(self, count: int) -> list[bool | None]:
        if self.fallback is Fallback.LOCAL:
            self.counts["granted_unconfirmed"] += count
            return [True] * count
        self.counts["refused_unconfirmed"] += count
        return [None] * count

    def status(self, now: float) -> dict[str, object]:
        """What ``sknock-server status`` shows of the replay store."""
        down = self.down_since is not None
        return {
            "store": self.store.name,
            "shared": self.store.shared,
            "state": "down" if down else "ok",
            "fallback": self.fallback.value,
            "down_for": round(now - self.down_since, 3) if self.down_since is not None else None,
            "last_error": self.last_error,
            **self.counts,
        }
