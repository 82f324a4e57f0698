"""Ports and protocols: the two spellings sknock reads and writes.

* The admin form, used on command lines and in config files: ``tcp/22,udp/8000,tcp/8000-8010``.
* The certificate form of the original sKnock, inside the authorization extension:
  ``1.22,0.8000,1.8000-8010`` -- ``PROTO.PORT`` with 1 = TCP and 0 = UDP.  Ranges are sknock's
  addition; every entry the original accepted means the same here.

Everything here is pure and strict: a malformed entry raises :class:`PortSpecError` naming it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import NamedTuple

from .errors import PortSpecError

__all__ = ["Protocol", "PortRange", "PortSet", "parse_ports", "parse_certificate_ports"]


class Protocol(enum.IntEnum):
    """Transport protocol, numbered as in the original sKnock's certificate extension."""

    UDP = 0
    TCP = 1

    @property
    def label(self) -> str:
        """The protocol's name as people and the firewall write it: ``tcp`` or ``udp``."""
        return self.name.lower()

    @classmethod
    def from_label(cls, text: str) -> Protocol:
        """Parse ``tcp`` or ``udp`` (any case); raises :class:`PortSpecError` for anything else."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise PortSpecError(f"unknown protocol {text!r}: expected tcp or udp") from None


_PORT_RE = re.compile(r"^[0-9]{1,5}(?:-[0-9]{1,5})?$")


class _RangeFields(NamedTuple):
    protocol: Protocol
    first: int
    last: int


class PortRange(_RangeFields):
    """``first``..``last`` inclusive, for one protocol.  A single port has ``first == last``.  Ordered
    by protocol, then first, then last."""

    __slots__ = ()

    def __new__(cls, protocol: Protocol, first: int, last: int) -> PortRange:
        if not 1 <= first <= last <= 65535:
            raise PortSpecError(f"bad port range {first}-{last}: ports run from 1 to 65535, first <= last")
        return super().__new__(cls, protocol, first, last)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        protocol, port = item
        return bool(protocol == self.protocol and isinstance(port, int) and self.first <= port <= self.last)

    def ports(self) -> range:
        """Every port of the range, in order."""
        return range(self.first, self.last + 1)

    def __str__(self) -> str:
        span = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{self.protocol.label}/{span}"

    def certificate_form(self) -> str:
        """The range as the certificate extension writes it: ``<protocol number>.<first>[-<last>]``."""
        span = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{int(self.protocol)}.{span}"


class PortSet:
    """A set of (protocol, port) pairs, held as ranges; immutable.  (Not a tuple: ``in`` asks whether a
    (protocol, port) pair is in the set.)"""

    __slots__ = ("ranges",)
    ranges: tuple[PortRange, ...]

    def __init__(self, ranges: tuple[PortRange, ...]) -> None:
        object.__setattr__(self, "ranges", tuple(ranges))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"PortSet is immutable: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        return other.ranges == self.ranges if isinstance(other, PortSet) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __repr__(self) -> str:
        return f"PortSet(ranges={self.ranges!r})"

    @classmethod
    def of(cls, ranges: Iterable[PortRange]) -> PortSet:
        """A port set from ``ranges`` in any order; duplicates are dropped and the ranges sorted."""
        return cls(tuple(sorted(set(ranges))))

    def __contains__(self, item: object) -> bool:
        return any(item in r for r in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.ranges) or "(none)"

    def certificate_form(self) -> str:
        """The set as the certificate extension writes it: comma-separated
        :meth:`PortRange.certificate_form`."""
        return ",".join(r.certificate_form() for r in self.ranges)


def _parse_span(protocol: Protocol, span: str, entry: str) -> PortRange:
    if not _PORT_RE.match(span):
        raise PortSpecError(f"bad port entry {entry!r}: expected a port 1-65535 or a range like 8000-8010")
    first_text, _, last_text = span.partition("-")
    first = int(first_text)
    last = int(last_text) if last_text else first
    if not 1 <= first <= last <= 65535:
        raise PortSpecError(f"bad port entry {entry!r}: ports run from 1 to 65535, first <= last")
    return PortRange(protocol, first, last)


def _entries(text: str) -> list[str]:
    if not isinstance(text, str):
        raise PortSpecError(f"port list must be text, not {type(text).__name__}")
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise PortSpecError(f"bad port list {text!r}: empty entry")
    return entries


def parse_ports(text: str) -> PortSet:
    """Parse the admin form ``tcp/22,udp/8000,tcp/8000-8010``."""
    ranges = []
    for entry in _entries(text):
        proto_text, slash, span = entry.partition("/")
        if not slash:
            raise PortSpecError(f"bad port entry {entry!r}: expected PROTO/PORT such as tcp/22 or udp/8000-8010")
        ranges.append(_parse_span(Protocol.from_label(proto_text), span.strip(), entry))
    return PortSet.of(ranges)


def parse_certificate_ports(text: str) -> PortSet:
    """Parse the certificate form of the original sKnock: ``1.22,0.8000`` (1 = TCP, 0 = UDP)."""
    ranges = []
    for entry in _entries(text):
        proto_text, dot, span = entry.partition(".")
        if not dot or proto_text not in ("0", "1"):
            raise PortSpecError(
                f"bad certificate port entry {entry!r}: expected PROTO.PORT with PROTO 1 (TCP) or 0 (UDP)"
            )
        ranges.append(_parse_span(Protocol(int(proto_text)), span, entry))
    return PortSet.of(ranges)
