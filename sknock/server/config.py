"""The server's configuration file: read it, check every value, hand back one frozen object.

The file is an INI file with a single ``[DEFAULT]`` section, as in the original sKnock, and the
original's option names keep their meaning and defaults (``KNOCKPACKET_MIN_LENGTH``, ``crlFile``,
``PFXPasswd`` ...).  sknock's own options sit beside them.

Why so strict: a port-knock server that silently runs with a typo'd option is worse than one that
refuses to start -- ``firewalPolicy = drop`` ignored means a host that the admin believes closed is
open.  So unknown keys, other sections, duplicate keys, values out of range and missing files all
raise :class:`~sknock.errors.ConfigError` with one message naming the file, the key and the problem.

Every option is one row of :data:`OPTIONS` -- its name, the :class:`ServerConfig` attribute it fills,
its default, its parser and its line of documentation -- and loading, :meth:`ServerConfig.describe`
and the options tables of docs/configuration.md (``python -m sknock.server.config --doc-table``) all
come from that table.  Loading goes in four steps: each option alone is parsed into its typed value;
the options read together (the CRL sources, the PFX password) are put together; the rules between
options run on the built :class:`ServerConfig`; and last, what the options name on disk is checked.

This module only parses and checks; it never opens sockets, touches the firewall or loads keys.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import ipaddress
import os
import pwd
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from ..carrier import Carrier
from ..credentials import resolve_password
from ..errors import ConfigError, CredentialError, PortSpecError
from ..fileio import read_text
from ..ini import parse_ini
from ..ports import PortSet, Protocol, parse_ports
from ..protocol.wire import DEFAULT_WORK_BITS
from .firewall.base import PolicyMode
from .firewall.command import TemplateError, split_template
from .firewall.detect import FirewallBackend
from .replaystore import DEFAULT_TIMEOUT_MS, Fallback, StoreAddress, parse_store_address

__all__ = [
    "ServerConfig",
    "PolicyMode",
    "FirewallBackend",
    "CaptureMode",
    "LogFormat",
    "KnockDestinations",
    "MetricsListen",
    "Revocation",
    "CrlSource",
    "Option",
    "OPTIONS",
    "SECTIONS",
    "MAX_CRL_SOURCES",
    "load_config",
    "doc_tables",
    "update_doc",
    "MIN_RECV_BUFFER",
    "MAX_UDP_KNOCK_PORTS",
    "Fallback",
]

#: The smallest receive buffer that holds any knock as captured: the packet is read whole, IP header
#: included, so a 1232-byte knock over IPv6 needs 1232 + 40 + 8 bytes plus room for extension headers.
MIN_RECV_BUFFER = 1400

#: At most this many worker processes verify knocks in parallel.
MAX_WORKERS = 8

#: In ``captureMode = udp`` the server binds one socket per knock port; more than this is a mistake.
MAX_UDP_KNOCK_PORTS = 256

#: At most this many CRL sources (crlFile entries): one per CA in the chains the server accepts.
MAX_CRL_SOURCES = 16

_MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB; refuse to slurp anything huge
_SIGNATURE_SIZE_NOTICE = "SIGNATURE_SIZE is ignored: sknock's protocol carries the signature length"
_PLAINTEXT_IN_CONFIG_NOTICE = "PFXPasswd puts the PFX password in the config file; use PFXPasswdFile in production"
_NO_REVOCATION_NOTICE = (
    "revocation = none: no CRL is checked, so a revoked or stolen client certificate opens ports until it "
    "expires; use it only with short-lived certificates or a PKI that never publishes CRLs"
)
_PASSWORD_KEYS = ("PFXPasswd", "PFXPasswdFile", "PFXPasswdEnv")
_STORE_PASSWORD_IN_URL_NOTICE = (  # a notice about a password, not one
    "replayStore puts the replay store's password in the config file; use replayStorePasswordFile in production"  # noqa: S105
)


class Revocation(enum.StrEnum):
    """Whether client certificates are checked against CRLs."""

    CRL = "crl"  # every CA in a client's chain must have a CRL in hand (crlFile, crlUrl)
    NONE = "none"  # no CRL at all: short-lived certificates, or a PKI that never published one


@dataclass(frozen=True, slots=True)
class CrlSource:
    """One CRL the server keeps: ``file`` on disk, refreshed from ``url`` (an http(s) URL or a local
    path) when that is set, else re-read as it is."""

    file: Path
    url: str | None


class LogFormat(enum.StrEnum):
    """How log lines look: ``plain`` text, or one ``json`` object per line (sknock.server.logs)."""

    PLAIN = "plain"
    JSON = "json"


class CaptureMode(enum.StrEnum):
    """How knocks are received: ``packet`` sniffs with no port open, ``udp`` binds real UDP sockets."""

    PACKET = "packet"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class KnockDestinations:
    """The destination addresses a captured knock may have: the host's own (``local``) and ``extra``."""

    local: bool
    extra: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()

    def __str__(self) -> str:
        return ", ".join((["local"] if self.local else []) + [str(a) for a in self.extra])


@dataclass(frozen=True, slots=True)
class MetricsListen:
    """Where the Prometheus metrics are served: an IP address (never a name, never the wildcard) and a
    TCP port."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else f"{self.address}:{self.port}"


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_E = TypeVar("_E", bound=enum.Enum)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A checked server configuration.  Paths are absolute (resolved against the config's folder).

    ``pfx_password`` is kept out of ``repr`` and :meth:`describe`; it is ``None`` only when the
    file was loaded with ``check_files=False`` and the password lives in ``PFXPasswdFile``.
    """

    source: Path
    # -- the original sKnock's options --
    knockpacket_min_length: int
    port_open_duration: int
    timestamp_threshold: int
    crl_update_interval_minutes: int
    recv_buffer: int
    crl_file: Path | None  # the first CRL source's (None only with revocation = none)
    crl_url: str | None  # the first CRL source's
    server_pfx_file: Path
    pfx_password: bytes | None = field(repr=False)
    pfx_password_source: str  # e.g. "PFXPasswdFile /etc/sknock/pfx.pass": safe to log
    firewall_policy: PolicyMode
    # -- sknock's options --
    firewall_backend: FirewallBackend
    open_command: str | None
    close_command: str | None
    interfaces: tuple[str, ...] | None  # None: any interface
    knock_destinations: KnockDestinations | None  # None: any destination address
    knock_ports: tuple[tuple[int, int], ...] | None  # inclusive (first, last) UDP ports; None: any
    capture_mode: CaptureMode
    knock_carriers: tuple[Carrier, ...]  # UDP always, then ICMP when taken (in Carrier's order)
    protected_ports: PortSet | None  # None: all ports
    emergency_ssh: bool
    ca_file: Path | None
    log_file: Path | None  # None: stderr
    log_level: str
    log_format: LogFormat
    require_source_address: bool
    max_open_duration: int
    work_bits: int
    workers: int  # processes that verify knocks ("auto": one per CPU, at most 8)
    user: str
    control_socket: Path
    state_dir: Path  # root-only folder for what must survive a restart (the applied-knock journal)
    revocation: Revocation = Revocation.CRL
    crl_sources: tuple[CrlSource, ...] = ()  # every CRL source, in the file's order (empty: revocation = none)
    notices: tuple[str, ...] = ()
    # -- the fleet's shared replay store (docs/fleet.md) --
    replay_store: StoreAddress | None = None  # None: local, this server's own memory only
    replay_store_password: str | None = field(default=None, repr=False)  # from replayStorePasswordFile or the URL
    replay_store_password_file: Path | None = None
    replay_store_ca_file: Path | None = None
    replay_store_timeout_ms: int = DEFAULT_TIMEOUT_MS
    replay_store_fallback: Fallback = Fallback.REFUSE
    metrics_listen: MetricsListen | None = None  # None: no metrics

    def describe(self) -> str:
        """One ``key = value`` line per option, in the file's spelling and the order of :data:`OPTIONS`,
        for the startup log.  The password itself never appears, only where it came from."""
        lines = [f"config = {self.source}"]
        for option in OPTIONS:
            value = option.shown(self)
            if value is not None:
                lines.append(f"{option.label or option.key} = {value}")
        lines.extend(f"notice: {n}" for n in self.notices)
        return "\n".join(lines)


# -- reading one option ----------------------------------------------------------------------------------


def _error(file: Path, key: str, problem: str) -> ConfigError:
    """The one line every configuration problem is: the file, the key, the problem."""
    return ConfigError(f"{file}: {key}: {problem}")


@dataclass(frozen=True, slots=True)
class _Field:
    """The option being parsed: its problems name the file and its key."""

    file: Path
    key: str

    def fail(self, problem: str) -> ConfigError:
        return _error(self.file, self.key, problem)

    def path(self, text: str) -> Path:
        """Resolve ``text`` against the config file's folder (absolute paths stay as they are)."""
        if "\x00" in text:
            raise self.fail("path contains a NUL byte")
        return self.file.parent / Path(text).expanduser()


_INT_RE = re.compile(r"^[0-9]{1,9}$")
_BOOLS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
_IFNAME_BAD = re.compile(r"[\s/:]")
_USER_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10})$")


@dataclass(frozen=True, slots=True)
class _Integer:
    """A whole number in ``low..high`` (no sign, no ``_``); with ``auto``, the word auto means ``auto()``."""

    low: int
    high: int
    auto: Callable[[], int] | None = None

    def __call__(self, f: _Field, text: str) -> int:
        if self.auto is not None and text == "auto":
            return self.auto()
        if not _INT_RE.match(text):
            raise f.fail(f"{text!r} is not a whole number")
        number = int(text)
        if not self.low <= number <= self.high:
            raise f.fail(f"{number} is out of range: must be {self.low}..{self.high}")
        return number


@dataclass(frozen=True, slots=True)
class _Choice(Generic[_E]):
    """One of an enum's values, in any case."""

    kind: type[_E]

    def __call__(self, f: _Field, text: str) -> _E:
        for member in self.kind:
            if member.value == text.lower():
                return member
        allowed = "|".join(str(m.value) for m in self.kind)
        raise f.fail(f"{text!r} is not one of {allowed}")


def _text(f: _Field, text: str) -> str:
    return text


def _path(f: _Field, text: str) -> Path:
    return f.path(text)


def _boolean(f: _Field, text: str) -> bool:
    try:
        return _BOOLS[text.lower()]
    except KeyError:
        raise f.fail(f"{text!r} is not yes/no (also accepted: true/false, on/off, 1/0)") from None


def _cpus() -> int:
    return min(os.cpu_count() or 1, MAX_WORKERS)


def _any_or_list(f: _Field, text: str, others: str) -> list[str] | None:
    """A comma list of non-empty entries, or None for ``any`` (which stands alone)."""
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise f.fail(f"{text!r} has an empty entry")
    if "any" in items:
        if len(items) > 1:
            raise f.fail(f"'any' cannot be combined with {others}")
        return None
    return items


def _interfaces(f: _Field, text: str) -> tuple[str, ...] | None:
    names = _any_or_list(f, text, "interface names")
    if names is None:
        return None
    for name in names:
        if len(name) > 15 or name in (".", "..") or _IFNAME_BAD.search(name):
            raise f.fail(f"{name!r} is not a valid interface name")
    return tuple(dict.fromkeys(names))


def _knock_destinations(f: _Field, text: str) -> KnockDestinations | None:
    items = _any_or_list(f, text, "other entries")
    if items is None:
        return None
    extra = []
    for item in items:
        if item == "local":
            continue
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            raise f.fail(f"{item!r} is not 'local', 'any' or an IP address") from None
        if address.is_multicast or address.is_unspecified:
            raise f.fail(f"{item!r} cannot be a knock's destination")
        extra.append(address)
    return KnockDestinations("local" in items, tuple(dict.fromkeys(extra)))


def _knock_ports(f: _Field, text: str) -> tuple[tuple[int, int], ...] | None:
    if text.lower() == "any":
        return None
    if "/" in text:
        raise f.fail(f"bad entry in {text!r}: knock ports are UDP, write 62201, not udp/62201")
    try:  # knock ports are UDP ports: reuse the admin port-list parser with the protocol filled in
        entries = (entry.strip() for entry in text.split(","))
        ports = parse_ports(",".join(f"udp/{entry}" if entry else "" for entry in entries))
    except PortSpecError as exc:
        raise f.fail(f"{exc} (write any, a port, a range like 10000-10100, or a comma list)") from None
    return tuple((span.first, span.last) for span in ports.ranges)


def _knock_carriers(f: _Field, text: str) -> tuple[Carrier, ...]:
    """knockCarriers: a comma list of carriers, which must include udp (it cannot be turned off)."""
    items = [item.strip().lower() for item in text.split(",")]
    if any(not item for item in items):
        raise f.fail(f"{text!r} has an empty entry")
    allowed = "|".join(c.value for c in Carrier)
    unknown = next((item for item in items if item not in set(allowed.split("|"))), None)
    if unknown is not None:
        raise f.fail(f"{unknown!r} is not a carrier (write a comma list of {allowed}, e.g. udp, icmp)")
    if Carrier.UDP.value not in items:
        raise f.fail(f"{text!r} leaves out udp, which is always taken: write udp, or udp, icmp")
    return tuple(c for c in Carrier if c.value in items)


def _protected_ports(f: _Field, text: str) -> PortSet | None:
    if text.lower() == "all":
        return None
    try:
        return parse_ports(text)
    except PortSpecError as exc:
        raise f.fail(f"{exc} (write 'all' or a list like tcp/22,tcp/3389)") from None


_PORT_RE = re.compile(r"^[0-9]{1,5}$")


def _metrics_listen(f: _Field, text: str) -> MetricsListen:
    """``PORT`` (on 127.0.0.1), ``ADDRESS:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise f.fail(f"{text!r}: write an IPv6 address in brackets, as [::1]:9465")
    if not _PORT_RE.match(port) or not 1 <= int(port) <= 65535:
        raise f.fail(f"{text!r}: the port must be 1..65535 (write 9465, 127.0.0.1:9465 or [::1]:9465)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise f.fail(f"{host!r} is not an IP address (a host name is not taken: it could resolve to a "
                     "knock-facing address)") from None
    if address.is_unspecified:
        raise f.fail(f"{text!r} would serve the metrics on every address, the knock-facing ones too: name the "
                     "address of the interface Prometheus scrapes from")
    if address.is_multicast:
        raise f.fail(f"{address} is a multicast address")
    return MetricsListen(address, int(port))


def _command(f: _Field, text: str) -> str:
    """An openCommand / closeCommand template, by the command backend's own rule."""
    try:
        split_template(text)
    except TemplateError as exc:
        raise f.fail(str(exc)) from None
    except ValueError as exc:
        raise f.fail(f"cannot split into words: {exc}") from None
    return text


def _crl_files(f: _Field, text: str) -> tuple[Path, ...]:
    """crlFile: one path (the original's meaning), or a comma list, one CRL per CA."""
    files = [entry.strip() for entry in text.split(",")]
    if any(not entry for entry in files):
        raise f.fail(f"{text!r} has an empty entry")
    if len(files) > MAX_CRL_SOURCES:
        raise f.fail(f"{len(files)} CRLs is too many (at most {MAX_CRL_SOURCES}: one for each CA)")
    paths = [f.path(entry) for entry in files]
    duplicate = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if duplicate is not None:
        raise f.fail(f"{duplicate} is named twice; give each CA's CRL once")
    return tuple(paths)


def _crl_urls(f: _Field, text: str) -> tuple[str | None, ...]:
    """crlUrl: one entry per crlFile entry, each an http(s) URL, a local path (made absolute), or empty
    (None: that crlFile is read as it is)."""
    entries = [entry.strip() for entry in text.split(",")]
    if all(not entry for entry in entries):
        raise f.fail(f"{text!r} has only empty entries")
    return tuple(_crl_url(f, entry) if entry else None for entry in entries)


def _crl_url(f: _Field, text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme.lower() in ("http", "https"):
        if not parts.hostname:
            raise f.fail(f"{text!r} has no host name")
        return text
    if parts.scheme:
        raise f.fail(f"{text!r}: only http://, https:// or a local path are supported")
    return str(f.path(text))


def _is_local(url: str) -> bool:
    return not urlsplit(url).scheme


def _replay_store(f: _Field, text: str) -> StoreAddress | None:
    if text.lower() == "local":
        return None
    try:
        return parse_store_address(text)
    except ValueError as exc:
        raise f.fail(str(exc)) from None


def _log_level(f: _Field, text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        raise f.fail(f"{text!r} is not one of {'|'.join(_LOG_LEVELS)}")
    return level


def _user(f: _Field, text: str) -> str:
    if not _USER_RE.match(text):
        raise f.fail(f"{text!r} is not a valid user name")
    return text  # whether it exists on this system is checked with the files


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _crl_files_shown(config: ServerConfig) -> str:
    return ", ".join(str(s.file) for s in config.crl_sources) or "(not set)"


def _crl_urls_shown(config: ServerConfig) -> str:
    if not any(s.url for s in config.crl_sources):
        return "(not set)"
    return ", ".join(s.url or "" for s in config.crl_sources)


def _password_shown(config: ServerConfig) -> str:
    return f"(hidden, from {config.pfx_password_source})"


# -- the table of options ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    """One option of the file, said once: what loading, :meth:`ServerConfig.describe` and the options
    tables of docs/configuration.md know of it."""

    key: str  # as written in the file (case-sensitive)
    attr: str | None  # the ServerConfig attribute its value fills; None: read with other options
    default: str | None  # as written in the file; None: not set unless given
    parse: Callable[[_Field, str], Any]  # the (stripped, non-empty) text -> its typed value
    doc: str  # one line: the Meaning column of its docs table
    section: str  # which docs table
    original: bool = False  # the original sKnock's option: same name, meaning and default
    required: bool = False  # must be set (options required only with others are checked with them)
    fmt: Callable[[Any], str] = str  # its value in describe()
    absent: str = "(not set)"  # describe() when the value is None
    show: Callable[[ServerConfig], str] | None = None  # describe() when not from ``attr`` alone
    label: str | None = None  # describe()'s key when not ``key``
    doc_default: str | None = None  # the docs' Default cell when ``default`` alone does not say it

    def shown(self, config: ServerConfig) -> str | None:
        """Its value in ``config`` as :meth:`ServerConfig.describe` writes it; None: it has no line."""
        if self.show is not None:
            return self.show(config)
        if self.attr is None:
            return None
        value = getattr(config, self.attr)
        return self.absent if value is None else self.fmt(value)


_RECEPTION, _FIREWALL, _CREDENTIALS, _DAEMON = "Knock reception", "Firewall", "Credentials and revocation", "Daemon"
_FLEET = "Fleet: the shared replay store"
SECTIONS = (_RECEPTION, _FIREWALL, _CREDENTIALS, _DAEMON, _FLEET)  # the docs tables, in this order

#: Every option, in the order of the shipped config.ini and of docs/configuration.md.
OPTIONS: tuple[Option, ...] = (
    # -- Knock reception --
    Option(
        "KNOCKPACKET_MIN_LENGTH", "knockpacket_min_length", "800", _Integer(1, 65535),
        doc=(
            "Datagrams shorter than this (bytes) are dropped before any crypto. 1..65535, and at most "
            "`RECV_BUFFER`. With packet capture the kernel filter already passes only datagrams of exactly a "
            "knock's sizes (1024 or 1232 bytes) that start like a knock, so this matters only when set above "
            "1024 (then only 1232-byte knocks pass)."
        ),
        section=_RECEPTION, original=True,
    ),
    Option(
        "RECV_BUFFER", "recv_buffer", "1600", _Integer(MIN_RECV_BUFFER, 65535),
        doc=(
            "Bytes read per captured packet, IP and UDP headers included; longer packets are dropped in the "
            "kernel. 1400..65535: a sknock knock is at most 1232 bytes of UDP payload (what survives the IPv6 "
            "minimum MTU), plus 48 bytes of IPv6 and UDP headers and room for extension headers."
        ),
        section=_RECEPTION, original=True,
    ),
    Option(
        "SIGNATURE_SIZE", None, None, _text,
        doc=(
            "Accepted and ignored; `ServerConfig.notices` says so. sknock's protocol carries the signature "
            "length."
        ),
        section=_RECEPTION, original=True,
    ),
    Option(
        "TIMESTAMP_THRESHOLD_IN_SECONDS", "timestamp_threshold", "7", _Integer(1, 300),
        doc="How far a knock's timestamp may be from the server's clock. 1..300.",
        section=_RECEPTION, original=True,
    ),
    Option(
        "workBits", "work_bits", str(DEFAULT_WORK_BITS), _Integer(0, 24),
        doc="Proof of work demanded of every knock, in bits. 0..24.",
        section=_RECEPTION,
    ),
    Option(
        "workers", "workers", "auto", _Integer(1, MAX_WORKERS, auto=_cpus),
        doc=(
            "Unprivileged processes that verify knocks in parallel, each with its own capture socket (AF_PACKET "
            "fanout): `auto` (one per CPU, at most 8) or 1..8. A replayed knock that reaches another worker is "
            "refused by the monitor, which checks every nonce."
        ),
        section=_RECEPTION,
    ),
    Option(
        "interfaces", "interfaces", "any", _interfaces,
        doc="Comma list of interface names (`eth0,wg0`), or `any`.",
        section=_RECEPTION, fmt=",".join, absent="any",
    ),
    Option(
        "knockPorts", "knock_ports", "any", _knock_ports,
        doc=(
            "UDP destination ports that may carry knocks: `any`, a port, a range `10000-10100`, or a comma list "
            "of those. Stored as `((first, last), ...)` or `None` for any."
        ),
        section=_RECEPTION, fmt=_ranges, absent="any",
    ),
    Option(
        "knockDestinations", "knock_destinations", "local", _knock_destinations,
        doc=(
            "Destination addresses a knock may be sent to: `local` (this host's own addresses, read from the "
            "kernel and re-read when a new one appears), a comma list that adds addresses (`local, "
            "203.0.113.5`) or names only those, or `any`. On a host that routes, the packet capture also sees "
            "datagrams passing through to other hosts; with `local` a knock addressed to another host is "
            "refused (`wrong-destination`). Not used with `captureMode = udp`, whose sockets only receive this "
            "host's traffic."
        ),
        section=_RECEPTION, absent="any",
    ),
    Option(
        "captureMode", "capture_mode", "packet", _Choice(CaptureMode),
        doc=(
            "`packet`: capture knocks with no port open. `udp`: bind real UDP sockets on `knockPorts`, which "
            "must then name ports (not `any`), at most 256 of them."
        ),
        section=_RECEPTION,
    ),
    Option(
        "knockCarriers", "knock_carriers", "udp", _knock_carriers,
        doc=(
            "What may carry a knock: `udp`, or `udp, icmp` to take knocks in ICMP and ICMPv6 echo requests "
            "too (`sknock-knock --via icmp`, for clients on networks that let only ping out; needs "
            "`captureMode = packet`). The ICMP carrier has no ports, so `knockPorts` does not apply to it; "
            "sknock sends no echo reply (the host's kernel and firewall decide whether one goes out). With "
            "`udp` alone the kernel filter is exactly the UDP-only one."
        ),
        section=_RECEPTION, fmt=", ".join,
    ),
    Option(
        "requireSourceAddress", "require_source_address", "no", _boolean,
        doc=(
            "`yes`: a knock must carry a signed source address equal to the packet's source (defeats a knock "
            "being replayed from elsewhere; breaks clients behind NAT that cannot know their public address)."
        ),
        section=_RECEPTION, fmt=_yes_no,
    ),
    # -- Firewall --
    Option(
        "PORT_OPEN_DURATION_IN_SECONDS", "port_open_duration", "15", _Integer(1, 86400),
        doc="How long an opened port stays open. 1..86400, at most `maxOpenDuration`.",
        section=_FIREWALL, original=True,
    ),
    Option(
        "maxOpenDuration", "max_open_duration", "300", _Integer(1, 86400),
        doc=(
            "The longest duration (seconds) a client may ask for. 1..86400. Why 300 (it was 3600): a grant is "
            "for *starting* connections, which outlive it (`ct state established`), so a few minutes cover a "
            "session that opens several (ssh, then scp); the longer a grant, the longer an address the client "
            "has left (a NAT, a café's Wi-Fi, a reassigned DHCP lease) stays open to whoever has it next. A "
            "revoked client's grants close when the CRL is refreshed, and `sknock-server close` closes any "
            "grant by hand."
        ),
        section=_FIREWALL,
    ),
    Option(
        "firewallPolicy", "firewall_policy", "none", _Choice(PolicyMode),
        doc=(
            "`none`, `reject` or `drop`: what happens to unknocked traffic to the protected ports. The shipped "
            "config says `none` so a first run locks nobody out."
        ),
        section=_FIREWALL, original=True,
    ),
    Option(
        "protectedPorts", "protected_ports", "all", _protected_ports,
        doc=(
            "`all`, or a list like `tcp/22,tcp/3389,udp/1194`. A list needs `firewallPolicy` `reject` or `drop` "
            "(see [Options that contradict each other](#options-that-contradict-each-other))."
        ),
        section=_FIREWALL, absent="all",
    ),
    Option(
        "emergencySSH", "emergency_ssh", "yes", _boolean,
        doc=(
            "Keep tcp/22 reachable under a `reject`/`drop` policy, so a broken knock setup cannot lock the "
            "administrator out. Must be `no` when a `protectedPorts` list names tcp/22."
        ),
        section=_FIREWALL, fmt=_yes_no,
    ),
    Option(
        "firewallBackend", "firewall_backend", "auto", _Choice(FirewallBackend),
        doc="`auto`, `nftables`, `iptables` or `command`.",
        section=_FIREWALL,
    ),
    Option(
        "openCommand", "open_command", None, _command,
        doc=(
            "Only with `firewallBackend = command`, and then required. A command template; placeholders `%IP%` "
            "`%PROTO%` `%PORT%` `%DURATION%`; must contain `%IP%`; split into words like a shell would (no "
            "shell runs it); the program itself cannot be a placeholder. Unknown `%NAME%` placeholders are errors. "
            "The command backend checks a template by the same rule."
        ),
        section=_FIREWALL,
    ),
    Option(
        "closeCommand", "close_command", None, _command,
        doc="As `openCommand`, to remove the rule.",
        section=_FIREWALL,
    ),
    # -- Credentials and revocation --
    Option(
        "serverPFXFile", "server_pfx_file", None, _path,
        doc="The server's certificate and private key (PKCS#12).",
        section=_CREDENTIALS, original=True, required=True,
    ),
    Option(
        "PFXPasswd", None, None, _text,
        doc=(
            "The PFX password, in the clear in the config file. Fine for the demo; adds a notice suggesting "
            "`PFXPasswdFile`."
        ),
        section=_CREDENTIALS, original=True, show=_password_shown, label="password",
    ),
    Option(
        "PFXPasswdFile", None, None, _path,
        doc=(
            "A file whose first line (without its newline) is the PFX password: the same rule as every sknock "
            "password file. Use this in production, readable by root only."
        ),
        section=_CREDENTIALS,
    ),
    Option(
        "PFXPasswdEnv", None, None, _text,
        doc="The name of an environment variable holding the PFX password.",
        section=_CREDENTIALS,
    ),
    Option(
        "caFile", "ca_file", None, _path,
        doc=(
            "Extra trusted CA / intermediate certificates beside the CA inside the PFX. A self-signed "
            "certificate is a trust anchor (a root); any other is an intermediate that a client's chain may "
            "pass through."
        ),
        section=_CREDENTIALS,
    ),
    Option(
        "revocation", "revocation", "crl", _Choice(Revocation),
        doc=(
            "`crl`: every CA in a client's chain must have a CRL in hand, and a client (or a CA above it) that "
            "a CRL lists is refused. `none`: no CRL is checked at all, and a WARNING says so at every start and "
            "in `--check-config`; then `crlFile` and `crlUrl` must not be set. See [Revocation](#revocation)."
        ),
        section=_CREDENTIALS,
    ),
    Option(
        "crlFile", None, None, _crl_files,
        doc=(
            "Where the CRL lives on disk; with several CAs, a comma list, one CRL per CA (see "
            "[Revocation](#revocation)). Each must exist unless its `crlUrl` entry is set (then its folder must "
            "exist; the first fetch writes it)."
        ),
        section=_CREDENTIALS, original=True, show=_crl_files_shown,
        doc_default="— (required with `revocation = crl`)",
    ),
    Option(
        "crlUrl", None, None, _crl_urls,
        doc=(
            "Where fresh CRLs come from: an `http://` or `https://` URL, or a local path (relative to the "
            "config's folder). Other schemes are errors. Not set: each `crlFile` is used as it is. With several "
            "`crlFile` entries, exactly as many entries, paired by position; an empty entry leaves its "
            "`crlFile` to be read as it is."
        ),
        section=_CREDENTIALS, original=True, show=_crl_urls_shown,
    ),
    Option(
        "CRL_UPDATE_INTERVAL_IN_MINUTES", "crl_update_interval_minutes", "30", _Integer(1, 7 * 24 * 60),
        doc=(
            "How often every `crlUrl` entry is fetched (and every `crlFile` without one re-read). 1..10080 (a "
            "week)."
        ),
        section=_CREDENTIALS, original=True,
    ),
    # -- Daemon --
    Option(
        "logFile", "log_file", None, _path,
        doc="Log file; its folder must exist.",
        section=_DAEMON, absent="(stderr)", doc_default="— (stderr)",
    ),
    Option(
        "logLevel", "log_level", "INFO", _log_level,
        doc="`DEBUG`, `INFO`, `WARNING` or `ERROR` (any case).",
        section=_DAEMON,
    ),
    Option(
        "logFormat", "log_format", "plain", _Choice(LogFormat),
        doc=(
            "`plain`: one line of text per event. `json`: one JSON object per line (time, level, event, source, "
            "client subject and serial, ports, reason) for a SIEM. Under systemd either goes to the journal "
            "with its level and without a second timestamp; see [docs/service.md](service.md)."
        ),
        section=_DAEMON,
    ),
    Option(
        "user", "user", "sknock", _user,
        doc="The unprivileged system user the workers and the CRL fetcher run as; must exist (a name or a "
        "numeric uid in the user database) and must not be root. `sknock-server install-service` creates "
        "`sknock`; `nobody` works but is shared with other daemons.",
        section=_DAEMON,
    ),
    Option(
        "controlSocket", "control_socket", "/run/sknock/control.sock", _path,
        doc="Path of the monitor's control socket (`sknock-server status`, `close`); its folder is made 0700.",
        section=_DAEMON,
    ),
    Option(
        "metricsListen", "metrics_listen", None, _metrics_listen,
        doc=(
            "Serve Prometheus metrics over HTTP here ([docs/metrics.md](metrics.md)): a port (on 127.0.0.1), "
            "`ADDRESS:PORT` or `[IPV6]:PORT`; not set: no metrics, no socket. An IP address, never a host name "
            "nor `0.0.0.0`/`::`, nor a `knockDestinations` address; an address on an interface knocks are "
            "captured on gets a warning at start. Served by an unprivileged process."
        ),
        section=_DAEMON, absent="(off)", doc_default="— (off)",
    ),
    Option(
        "stateDir", "state_dir", "/var/lib/sknock", _path,
        doc=(
            "Root-only folder (made 0700) for what must outlive a restart: `replay.journal`, the knocks the "
            "monitor applied while they can still be replayed (a knock captured before a restart is refused "
            "after it, however short the restart); and with `firewallBackend = command`, `grants.json`, the "
            "grants open now, so that a start after a crash closes what the dead server left open."
        ),
        section=_DAEMON,
    ),
    # -- Fleet: the shared replay store --
    Option(
        "replayStore", "replay_store", "local", _replay_store,
        doc=(
            "`local`: this server remembers the knocks it applied (`stateDir`), nothing is shared. "
            "`redis://HOST:PORT/DB` (`rediss://` for TLS): servers that may see the same knocks (an HA pair "
            "sharing one server certificate, anycast, a load balancer) also claim each knock in one Redis or "
            "Valkey with `SET key 1 NX PX`, and a knock one of them applied is refused by all the others. The "
            "key is a hash: no client data reaches Redis. Needs `pip install 'sknock[fleet]'`. See "
            "[docs/fleet.md](fleet.md)."
        ),
        section=_FLEET, absent="local",
    ),
    Option(
        "replayStorePasswordFile", "replay_store_password_file", None, _path,
        doc=(
            "A file whose first line is the replay store's password (Redis `requirepass`, or the ACL user named "
            "in the URL). Must not be readable by group or others. Only with a `redis://` or `rediss://` "
            "`replayStore`, and not with a password in its URL (which works, with a notice)."
        ),
        section=_FLEET,
    ),
    Option(
        "replayStoreCaFile", "replay_store_ca_file", None, _path,
        doc=(
            "With `rediss://`: the CA certificate(s) (PEM) the store's TLS certificate must chain to, and its "
            "name must match the URL's host. Not set: the system's CAs."
        ),
        section=_FLEET,
    ),
    Option(
        "replayStoreTimeout", "replay_store_timeout_ms", str(DEFAULT_TIMEOUT_MS), _Integer(10, 2000),
        doc=(
            "Milliseconds the monitor waits for the store (to connect, and for each answer) before it counts "
            "the store as down. 10..2000. While it is down it is asked again at most every 2 s; the knocks in "
            "between are decided at once by `replayStoreFallback`."
        ),
        section=_FLEET,
    ),
    Option(
        "replayStoreFallback", "replay_store_fallback", "refuse", _Choice(Fallback),
        doc=(
            "While the store cannot confirm a knock: `refuse` it (fail closed; `emergencySSH` keeps the admin's "
            "way in), or `local`: grant it on this server's own replay memory, with an ERROR line and a counter "
            "in `status` (a knock replayed to another server during the outage may then be granted there too)."
        ),
        section=_FLEET,
    ),
)

_KEYS = tuple(option.key for option in OPTIONS)


# -- the file ----------------------------------------------------------------------------------------------


def _parse_ini(path: Path, text: str) -> dict[str, str]:
    defaults, sections = parse_ini(text, path, error=ConfigError, first_header="[DEFAULT]", default_section="DEFAULT")
    if sections:
        raise ConfigError(f"{path}: [{next(iter(sections))}]: unknown section; every option goes in [DEFAULT]")
    return defaults


def _check_keys(path: Path, values: Mapping[str, str]) -> None:
    for key in values:
        if key in _KEYS:
            continue
        by_case = [k for k in _KEYS if k.lower() == key.lower()]
        close = by_case or difflib.get_close_matches(key, list(_KEYS), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{path}: {key}: unknown option{hint}")


def _parse_options(path: Path, values: Mapping[str, str]) -> dict[str, Any]:
    """Step 1: every option alone, in the table's order: its typed value, or None when it is not set and
    has no default.  An empty value counts as not set."""
    parsed: dict[str, Any] = {}
    for option in OPTIONS:
        f = _Field(path, option.key)
        text = values.get(option.key)
        if text is not None:
            # before stripping: "key =" with an indented line under it is that line, not an empty value
            if "\n" in text or "\r" in text:
                raise f.fail("value spans several lines; put it on one line")
            text = text.strip() or None
        if text is None:
            text = option.default
        if text is None and option.required:
            raise f.fail("is required but not set")
        parsed[option.key] = None if text is None else option.parse(f, text)
    return parsed


# -- the options read together -----------------------------------------------------------------------------


def _crl_sources(path: Path, parsed: Mapping[str, Any]) -> tuple[CrlSource, ...]:
    """crlFile and crlUrl paired by position (an empty crlUrl entry leaves its crlFile to be re-read as it
    is), as revocation asks."""
    files: tuple[Path, ...] | None = parsed["crlFile"]
    urls: tuple[str | None, ...] | None = parsed["crlUrl"]
    if parsed["revocation"] is Revocation.NONE:
        for key in ("crlFile", "crlUrl"):
            if parsed[key] is not None:
                raise _error(path, key, "is set, but revocation = none says no CRL is checked: remove one of the two")
        return ()
    if files is None:
        raise _error(
            path, "crlFile",
            "is required: the CRL of each CA (or revocation = none, for certificates that are never revoked)",
        )
    if urls is None:
        urls = (None,) * len(files)
    elif len(urls) != len(files):
        raise _error(
            path, "crlUrl",
            f"{len(urls)} entr{'y' if len(urls) == 1 else 'ies'} but crlFile has {len(files)}: give one "
            "per crlFile, in the same order (leave an entry empty for a crlFile that is read as it is)",
        )
    # A local crlUrl that is its own crlFile means: read crlFile as it is (never rewrite the admin's file).
    return tuple(
        CrlSource(file, None if url is not None and _same_path(url, file) else url)
        for file, url in zip(files, urls, strict=True)
    )


def _same_path(url: str, path: Path) -> bool:
    if not _is_local(url):
        return False
    try:
        return Path(url).resolve() == path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not the same file as far as we can tell
        return False


def _password(
    path: Path, parsed: Mapping[str, Any], environ: Mapping[str, str], check_files: bool
) -> tuple[bytes | None, str, list[str]]:
    """Exactly one of PFXPasswd, PFXPasswdFile, PFXPasswdEnv.  Returns (password, source, notices)."""
    given = [k for k in _PASSWORD_KEYS if parsed[k] is not None]
    if not given:
        raise _error(path, "PFXPasswd", "no PFX password given: set one of PFXPasswd, PFXPasswdFile or PFXPasswdEnv")
    if len(given) > 1:
        raise _error(path, given[1], f"both {given[0]} and {given[1]} are set; give the PFX password exactly one way")
    key = given[0]
    if key == "PFXPasswd":
        text: str = parsed[key]
        return text.encode("utf-8"), "PFXPasswd in the config file", [_PLAINTEXT_IN_CONFIG_NOTICE]
    if key == "PFXPasswdEnv":
        name: str = parsed[key]
        if name not in environ:
            raise _error(path, key, f"environment variable {name} is not set")
        secret = environ[name]
        if not secret:
            raise _error(path, key, f"environment variable {name} is empty")
        return secret.encode("utf-8"), f"PFXPasswdEnv {name}", []
    file: Path = parsed[key]
    source = f"PFXPasswdFile {file}"
    if not check_files:
        return None, source, []
    _check_readable(path, key, file)
    try:  # the same rule as every sknock password file: its first line, without the newline
        return resolve_password(file), source, []
    except CredentialError as exc:
        raise _error(path, key, str(exc)) from None


def _store_password(path: Path, parsed: Mapping[str, Any], check_files: bool) -> tuple[str | None, list[str]]:
    """The replay store's password: from replayStorePasswordFile (root-only), or the URL; (password, notices)."""
    address: StoreAddress | None = parsed["replayStore"]
    key = "replayStorePasswordFile"
    file: Path | None = parsed[key]
    if address is None:
        for other in (key, "replayStoreCaFile"):
            if parsed[other] is not None:
                raise _error(path, other, "is set, but replayStore = local shares nothing: set replayStore, or "
                             "remove it")
        return None, []
    notices = []
    if not _is_ip(address.host):
        notices.append(f"replayStore names the host {address.host}: it is resolved at every (re)connect, and a "
                       "resolver that does not answer holds the monitor for its own timeout (seconds), beyond "
                       "replayStoreTimeout; an IP address avoids that")
    if parsed["replayStoreCaFile"] is not None and not address.tls:
        raise _error(path, "replayStoreCaFile", f"is only used with rediss:// (TLS), and replayStore is {address}")
    if file is None:
        if address.password is None:
            return None, notices
        return address.password, [*notices, _STORE_PASSWORD_IN_URL_NOTICE]
    if address.password is not None:
        raise _error(path, key, "is set, and replayStore has a password in its URL too: give the password one way")
    if not check_files:
        return None, notices
    _check_readable(path, key, file)
    mode = file.stat().st_mode & 0o777
    if mode & 0o077:
        raise _error(path, key, f"{file} is readable by others than its owner (mode {mode:o}): chmod 600 {file}")
    try:
        return resolve_password(file).decode("utf-8"), notices
    except CredentialError as exc:
        raise _error(path, key, str(exc)) from None
    except UnicodeDecodeError:
        raise _error(path, key, f"the first line of {file} is not UTF-8") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] = os.environ,
    check_files: bool = True,
) -> ServerConfig:
    """Read and check the server configuration at ``path``.

    ``environ`` is where ``PFXPasswdEnv`` looks (injected so tests need not touch os.environ).
    With ``check_files=False`` nothing but the config file itself is opened: referenced files are
    not checked and a ``PFXPasswdFile`` is not read (``pfx_password`` is then ``None``).  That is for
    checking a config on a machine that does not hold the keys; the daemon always checks files.
    """
    config_path = Path(path).expanduser().absolute()
    text = read_text(config_path, limit=_MAX_CONFIG_BYTES, what="config file", error=ConfigError)
    values = _parse_ini(config_path, text)
    _check_keys(config_path, values)
    parsed = _parse_options(config_path, values)

    notices: list[str] = []
    if parsed["SIGNATURE_SIZE"] is not None:
        notices.append(_SIGNATURE_SIZE_NOTICE)
    if parsed["revocation"] is Revocation.NONE:
        notices.append(_NO_REVOCATION_NOTICE)
    crl_sources = _crl_sources(config_path, parsed)
    password, password_source, password_notices = _password(config_path, parsed, environ, check_files)
    notices.extend(password_notices)
    store_password, store_notices = _store_password(config_path, parsed, check_files)
    notices.extend(store_notices)

    config = ServerConfig(
        source=config_path,
        crl_file=crl_sources[0].file if crl_sources else None,
        crl_url=crl_sources[0].url if crl_sources else None,
        crl_sources=crl_sources,
        pfx_password=password,
        pfx_password_source=password_source,
        notices=tuple(notices),
        replay_store_password=store_password,
        **{option.attr: parsed[option.key] for option in OPTIONS if option.attr is not None},
    )
    for rule in _RULES:
        rule(config)
    if check_files:
        _check_files(config, parsed)
    return config


# -- rules between options ---------------------------------------------------------------------------------
# Each option may be fine alone and the combination still not do what the file says: the server would run,
# say "configuration OK", and leave open what the operator meant closed, or refuse every knock.  Each check
# raises naming the option to change and the other one (docs/configuration.md, "Options that contradict
# each other").


def _check_buffer(config: ServerConfig) -> None:
    if config.knockpacket_min_length > config.recv_buffer:
        raise _error(
            config.source, "KNOCKPACKET_MIN_LENGTH",
            f"{config.knockpacket_min_length} is larger than RECV_BUFFER ({config.recv_buffer}): no knock could "
            "ever be accepted",
        )


def _check_durations(config: ServerConfig) -> None:
    if config.port_open_duration > config.max_open_duration:
        raise _error(
            config.source, "PORT_OPEN_DURATION_IN_SECONDS",
            f"{config.port_open_duration} is longer than maxOpenDuration ({config.max_open_duration})",
        )


def _check_commands(config: ServerConfig) -> None:
    commands = (("openCommand", config.open_command), ("closeCommand", config.close_command))
    for key, value in commands:
        if config.firewall_backend is FirewallBackend.COMMAND and value is None:
            raise _error(config.source, key, "is required when firewallBackend = command")
        if config.firewall_backend is not FirewallBackend.COMMAND and value is not None:
            raise _error(
                config.source, key, f"is only used with firewallBackend = command (it is {config.firewall_backend})"
            )


def _check_udp_ports(config: ServerConfig) -> None:
    if config.capture_mode is not CaptureMode.UDP:
        return
    if config.knock_ports is None:
        raise _error(
            config.source, "knockPorts", "captureMode = udp binds real sockets, so knockPorts must name ports, not any"
        )
    count = sum(last - first + 1 for first, last in config.knock_ports)
    if count > MAX_UDP_KNOCK_PORTS:
        raise _error(
            config.source, "knockPorts",
            f"{count} ports is too many for captureMode = udp (at most {MAX_UDP_KNOCK_PORTS})",
        )


def _check_knock_size(config: ServerConfig) -> None:
    from ..protocol.wire import MAX_DATAGRAM

    if config.knockpacket_min_length > MAX_DATAGRAM:
        raise _error(
            config.source, "KNOCKPACKET_MIN_LENGTH",
            f"{config.knockpacket_min_length} is larger than the largest knock ({MAX_DATAGRAM} bytes): every knock "
            f"would be dropped; use at most {MAX_DATAGRAM}",
        )


def _check_policy_backend(config: ServerConfig) -> None:
    if config.firewall_backend is FirewallBackend.COMMAND and config.firewall_policy is not PolicyMode.NONE:
        raise _error(
            config.source, "firewallPolicy",
            f"{config.firewall_policy} is not applied with firewallBackend = command, which only runs "
            "openCommand and closeCommand: the ports would stay as the firewall behind them has them; close them "
            "there and set firewallPolicy = none, or use firewallBackend = nftables or iptables",
        )


def _check_protected_ports_policy(config: ServerConfig) -> None:
    if config.firewall_policy is PolicyMode.NONE and config.protected_ports is not None:
        raise _error(
            config.source, "protectedPorts",
            f"{config.protected_ports} would not be protected: firewallPolicy = none closes nothing; "
            "set firewallPolicy = drop or reject to close them, or protectedPorts = all",
        )


def _check_emergency_ssh(config: ServerConfig) -> None:
    protected = config.protected_ports
    if (
        config.emergency_ssh
        and config.firewall_policy is not PolicyMode.NONE
        and protected is not None
        and (Protocol.TCP, 22) in protected
    ):
        raise _error(
            config.source, "emergencySSH",
            f"yes keeps tcp/22 open to everyone, but protectedPorts ({protected}) names tcp/22 "
            f"under firewallPolicy = {config.firewall_policy}: set emergencySSH = no to protect it (once "
            "knocking works), or take tcp/22 out of protectedPorts",
        )


def _check_udp_capture(config: ServerConfig) -> None:
    if config.capture_mode is not CaptureMode.UDP:
        return
    if Carrier.ICMP in config.knock_carriers:
        raise _error(
            config.source, "knockCarriers",
            "icmp needs captureMode = packet: captureMode = udp receives on UDP sockets, which never see an "
            "echo request; use captureMode = packet, or knockCarriers = udp",
        )
    if config.interfaces is not None:
        raise _error(
            config.source, "interfaces",
            f"{','.join(config.interfaces)} would not limit where knocks are taken: captureMode = udp binds its "
            "sockets on every interface; use captureMode = packet, or interfaces = any",
        )
    protected = config.protected_ports
    if config.firewall_policy is PolicyMode.NONE or protected is None or config.knock_ports is None:
        return  # with protectedPorts = all the knock ports are the documented exception
    knock_ports = (port for first, last in config.knock_ports for port in range(first, last + 1))
    inside = [port for port in knock_ports if (Protocol.UDP, port) in protected]
    if inside:
        raise _error(
            config.source, "knockPorts",
            f"udp/{inside[0]} is in protectedPorts ({protected}), but captureMode = udp keeps the knock "
            "ports open to everyone so that knocks reach its sockets: take it out of protectedPorts, or use "
            "captureMode = packet (which needs no open port)",
        )


def _check_metrics_listen(config: ServerConfig) -> None:
    listen, destinations = config.metrics_listen, config.knock_destinations
    if listen is not None and destinations is not None and listen.address in destinations.extra:
        raise _error(
            config.source, "metricsListen",
            f"{listen.address} is a knock destination (knockDestinations): the metrics must not be served on "
            "the knock-facing side; use 127.0.0.1 or a management address",
        )


#: Run in this order on the built configuration; the first that fails is the error.
_RULES: tuple[Callable[[ServerConfig], None], ...] = (
    _check_buffer,
    _check_durations,
    _check_commands,
    _check_udp_ports,
    _check_knock_size,
    _check_policy_backend,
    _check_protected_ports_policy,
    _check_emergency_ssh,
    _check_udp_capture,
    _check_metrics_listen,
)


# -- what the options name on disk -------------------------------------------------------------------------


def _check_readable(path: Path, key: str, file: Path) -> None:
    """Open the file for reading: the only honest test (``os.access`` lies to root)."""
    if not file.exists():
        raise _error(path, key, f"file {file} does not exist")
    if not file.is_file():
        raise _error(path, key, f"{file} is not a regular file")
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise _error(path, key, f"cannot read {file}: {exc.strerror or exc}") from None


def _check_folder(path: Path, key: str, file: Path) -> None:
    if not file.parent.is_dir():
        raise _error(path, key, f"folder {file.parent} (for {file.name}) does not exist")


def _check_files(config: ServerConfig, parsed: Mapping[str, Any]) -> None:
    """The files the options name exist and can be read (a file still to be fetched or written: its
    folder), and the user exists on this system.  (A PFXPasswdFile was read already.)"""
    path = config.source
    for url in parsed["crlUrl"] or ():
        if url is not None and _is_local(url):
            _check_readable(path, "crlUrl", Path(url))
    _check_readable(path, "serverPFXFile", config.server_pfx_file)
    for crl_source in config.crl_sources:
        if crl_source.url is None or crl_source.file.exists():
            _check_readable(path, "crlFile", crl_source.file)
        else:
            _check_folder(path, "crlFile", crl_source.file)
    if config.ca_file is not None:
        _check_readable(path, "caFile", config.ca_file)
    if config.replay_store_ca_file is not None:
        _check_readable(path, "replayStoreCaFile", config.replay_store_ca_file)
    if config.log_file is not None:
        _check_folder(path, "logFile", config.log_file)
    _check_user(path, config.user)


#: How to make the default user: what the error for a missing ``user`` says.
_USER_FIX = (
    "create it with `sknock-server install-service` (which also installs the service) or "
    "`useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {user}`"
)


def _check_user(path: Path, user: str) -> None:
    """``user`` is in the user database and is not root: the workers parse what anyone on the network sends.
    Root is refused rather than warned about: a worker refuses to run as root anyway, so the server would
    start and then serve nobody."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise _error(path, "user", f"user {user!r} does not exist on this system: {_USER_FIX.format(user=user)}"
                     ) from None
    if entry.pw_uid == 0:
        raise _error(path, "user", f"user {user!r} is root (uid 0): the workers must run as an unprivileged user "
                     "(the default is sknock)")


# -- the options tables of docs/configuration.md -----------------------------------------------------------


def _doc_default(option: Option) -> str:
    if option.doc_default is not None:
        return option.doc_default
    if option.default is not None:
        return f"`{option.default}`"
    return "— (required)" if option.required else "—"


def doc_table(section: str) -> str:
    """The Markdown table of the options in ``section`` (one of :data:`SECTIONS`), as the docs hold it."""
    rows = [["Option", "Default", "Original", "Meaning"], ["---", "---", "---", "---"]]
    rows += [
        [f"`{o.key}`", _doc_default(o), "yes" if o.original else "", o.doc] for o in OPTIONS if o.section == section
    ]
    return "\n".join("|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|" for row in rows) + "\n"


def doc_tables() -> str:
    """Every options table under its ``###`` heading: what docs/configuration.md holds."""
    return "\n".join(f"### {section}\n\n{doc_table(section)}" for section in SECTIONS)


def update_doc(text: str) -> str:
    """``text`` (docs/configuration.md) with each section's options table, the one right under its
    ``### `` heading, replaced by :func:`doc_table`; the prose around the tables stays as it is."""
    for section in SECTIONS:
        heading = f"\n### {section}\n\n"
        start = text.find(heading)
        if start < 0 or not text.startswith("|", start + len(heading)):
            raise ValueError(f"no options table right under the heading '### {section}'")
        start += len(heading)
        end = text.find("\n\n", start)
        end = len(text) if end < 0 else end + 1
        text = text[:start] + doc_table(section) + text[end:]
    return text


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sknock.server.config", description="The options tables of docs/configuration.md."
    )
    parser.add_argument("--doc-table", action="store_true", help="print the tables, each under its heading")
    parser.add_argument("--update-doc", metavar="FILE", type=Path, help="rewrite the tables in FILE in place")
    args = parser.parse_args(argv)
    if args.update_doc is not None:
        text = args.update_doc.read_text(encoding="utf-8")
        args.update_doc.write_text(update_doc(text), encoding="utf-8")
    if args.doc_table or args.update_doc is None:
        sys.stdout.write(doc_tables())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
