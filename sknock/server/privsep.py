"""Privilege separation: the messages the unprivileged worker sends the firewall process, and the
privilege drop itself.

The worker reads packets and runs the parser and crypto as an unprivileged user.  It asks the firewall
process (root, CAP_NET_ADMIN) to open or close a grant with one small JSON datagram over a
SOCK_SEQPACKET socketpair.  The firewall process treats those messages as hostile too: it re-checks
every field (address, protocol, port, duration bound) before the firewall sees it, so a compromised
worker can at most open ports for the durations the configuration allows -- never run commands, never
touch other tables.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import math
import os
import pwd
import re
from dataclasses import dataclass
from typing import Literal

from ..errors import SknockError
from ..ports import Protocol
from .firewall.base import Opening

__all__ = ["GrantRequest", "PrivsepError", "encode_request", "parse_request", "drop_privileges", "MAX_MESSAGE"]

MAX_MESSAGE = 512
_FIELDS = frozenset({"op", "address", "protocol", "port", "duration", "client", "nonce", "expires"})
_NONCE_RE = re.compile(r"[0-9a-f]{32}")


class PrivsepError(SknockError):
    """A message between the worker and the firewall process is malformed, or privileges cannot be dropped."""


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """One port of one verified knock.  ``nonce`` is the knock's signed nonce and ``expires`` (Unix
    time) when it falls out of the timestamp window: the firewall process refuses a nonce it has seen,
    which catches a replay that reached another worker."""

    op: Literal["open", "close"]
    opening: Opening
    duration: float
    client: str
    nonce: bytes = bytes(16)
    expires: float = 0.0

    @property
    def replay_key(self) -> tuple[bytes, Protocol, int]:
        # Not the address: a replay from another source must collide with the original.
        return (self.nonce, self.opening.protocol, self.opening.port)


def encode_request(request: GrantRequest) -> bytes:
    """One message of at most MAX_MESSAGE bytes: the client name (for logs only) is cut to 200
    characters, and further if its JSON escapes (any non-ASCII subject) would not fit."""
    client = request.client[:200]
    while True:
        data = json.dumps(
            {
                "op": request.op,
                "address": str(request.opening.address),
                "protocol": request.opening.protocol.label,
                "port": request.opening.port,
                "duration": request.duration,
                "client": client,
                "nonce": request.nonce.hex(),
                "expires": request.expires,
            },
            separators=(",", ":"),
        ).encode()
        if len(data) <= MAX_MESSAGE or not client:
            return data
        client = client[: -max(1, (len(data) - MAX_MESSAGE) // 12)]  # an escaped character is at most 12 bytes


def parse_request(data: bytes, *, max_duration: float) -> GrantRequest:
    """Strictly parse and re-check one message from the worker."""
    if len(data) > MAX_MESSAGE:
        raise PrivsepError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PrivsepError(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict) or set(message) != _FIELDS:
        raise PrivsepError("message has the wrong fields")
    op = message["op"]
    if op not in ("open", "close"):
        raise PrivsepError(f"unknown op {op!r}")
    # Text only: ip_address() would also take an integer, and from_label() a non-string would crash.
    if not isinstance(message["address"], str) or not isinstance(message["protocol"], str):
        raise PrivsepError("bad address or protocol: not text")
    try:
        address = ipaddress.ip_address(message["address"])
        protocol = Protocol.from_label(message["protocol"])
    except (ValueError, TypeError, SknockError) as exc:
        raise PrivsepError(f"bad address or protocol: {exc}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # The worker never sends one; a scope id is free text that would reach the firewall backend.
        raise PrivsepError(f"bad address or protocol: scoped address {message['address']!r}")
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise PrivsepError(f"address {address} cannot be granted")
    port = message["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise PrivsepError(f"bad port {port!r}")
    duration = message["duration"]
    if (
        not isinstance(duration, int | float)
        or isinstance(duration, bool)
        or not 0 < duration <= max_duration  # before isfinite: a 400-digit int would overflow it
        or not math.isfinite(duration)
    ):
        raise PrivsepError(f"bad duration {duration!r} (at most {max_duration:g} s)")
    client = message["client"]
    if not isinstance(client, str):
        raise PrivsepError("bad client name")
    nonce = message["nonce"]
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise PrivsepError("bad nonce")
    expires = message["expires"]
    if not isinstance(expires, float) or not math.isfinite(expires) or not 0 <= expires < 2**40:
        raise PrivsepError(f"bad nonce expiry {expires!r}")
    return GrantRequest(
        op, Opening(address, protocol, port), float(duration), client[:200], bytes.fromhex(nonce), expires
    )


_PR_SET_NO_NEW_PRIVS = 38


def drop_privileges(user: str) -> tuple[int, int]:
    """Become ``user`` for good: no supplementary groups, its gid and uid, and no way back through
    setuid binaries (PR_SET_NO_NEW_PRIVS).  Sockets opened before keep working.  Returns (uid, gid)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivsepError(f"user {user!r} does not exist") from None
    uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0:
        raise PrivsepError(f"user {user!r} is root: the worker must run unprivileged")
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivsepError(f"cannot drop privileges to {user} ({uid}:{gid}): {exc}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PrivsepError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise PrivsepError("privileges were not dropped")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivsepError("could regain root after dropping privileges")
    return uid, gid
