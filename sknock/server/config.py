"""The server's configuration file: read it, check every value, hand back one frozen object.

The file is an INI file with a single ``[DEFAULT]`` section, as in the original sKnock, and the
original's option names keep their meaning and defaults (``KNOCKPACKET_MIN_LENGTH``, ``crlFile``,
``PFXPasswd`` ...).  sknock's own options sit beside them.

Why so strict: a port-knock server that silently runs with a typo'd option is worse than one that
refuses to start -- ``firewalPolicy = drop`` ignored means a host that the admin believes closed is
open.  So unknown keys, other sections, duplicate keys, values out of range and missing files all
raise :class:`~sknock.errors.ConfigError` with one message naming the file, the key and the problem.

This module only parses and checks; it never opens sockets, touches the firewall or loads keys.
"""

from __future__ import annotations

import configparser
import difflib
import enum
import ipaddress
import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from ..credentials import resolve_password
from ..errors import ConfigError, CredentialError, PortSpecError
from ..ports import PortSet, parse_ports
from .firewall.base import PolicyMode
from .firewall.command import TemplateError, split_template
from .firewall.detect import FirewallBackend

__all__ = [
    "ServerConfig",
    "PolicyMode",
    "FirewallBackend",
    "CaptureMode",
    "KnockDestinations",
    "Revocation",
    "CrlSource",
    "MAX_CRL_SOURCES",
    "load_config",
    "MIN_RECV_BUFFER",
    "MAX_UDP_KNOCK_PORTS",
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


class CaptureMode(enum.StrEnum):
    """How knocks are received: ``packet`` sniffs with no port open, ``udp`` binds real UDP sockets."""

    PACKET = "packet"
    UDP = "udp"


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
    protected_ports: PortSet | None  # None: all ports
    emergency_ssh: bool
    ca_file: Path | None
    log_file: Path | None  # None: stderr
    log_level: str
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

    def describe(self) -> str:
        """One ``key = value`` line per option, in the file's spelling, for the startup log.

        The password itself never appears, only where it came from."""

        def opt(value: object, absent: str = "(not set)") -> str:
            return absent if value is None else str(value)

        knock_ports = (
            "any"
            if self.knock_ports is None
            else ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.knock_ports)
        )
        rows: list[tuple[str, str]] = [
            ("config", str(self.source)),
            ("KNOCKPACKET_MIN_LENGTH", str(self.knockpacket_min_length)),
            ("PORT_OPEN_DURATION_IN_SECONDS", str(self.port_open_duration)),
            ("TIMESTAMP_THRESHOLD_IN_SECONDS", str(self.timestamp_threshold)),
            ("CRL_UPDATE_INTERVAL_IN_MINUTES", str(self.crl_update_interval_minutes)),
            ("RECV_BUFFER", str(self.recv_buffer)),
            ("revocation", self.revocation.value),
            ("crlFile", ", ".join(str(s.file) for s in self.crl_sources) or "(not set)"),
            ("crlUrl", ", ".join(s.url or "" for s in self.crl_sources)
             if any(s.url for s in self.crl_sources) else "(not set)"),
            ("serverPFXFile", str(self.server_pfx_file)),
            ("password", f"(hidden, from {self.pfx_password_source})"),
            ("firewallPolicy", self.firewall_policy.value),
            ("firewallBackend", self.firewall_backend.value),
            ("openCommand", opt(self.open_command)),
            ("closeCommand", opt(self.close_command)),
            ("interfaces", "any" if self.interfaces is None else ",".join(self.interfaces)),
            ("knockPorts", knock_ports),
            ("knockDestinations", "any" if self.knock_destinations is None else str(self.knock_destinations)),
            ("captureMode", self.capture_mode.value),
            ("protectedPorts", "all" if self.protected_ports is None else str(self.protected_ports)),
            ("emergencySSH", "yes" if self.emergency_ssh else "no"),
            ("caFile", opt(self.ca_file)),
            ("logFile", opt(self.log_file, "(stderr)")),
            ("logLevel", self.log_level),
            ("requireSourceAddress", "yes" if self.require_source_address else "no"),
            ("maxOpenDuration", str(self.max_open_duration)),
            ("workBits", str(self.work_bits)),
            ("workers", str(self.workers)),
            ("user", self.user),
            ("controlSocket", str(self.control_socket)),
            ("stateDir", str(self.state_dir)),
        ]
        lines = [f"{key} = {value}" for key, value in rows]
        lines.extend(f"notice: {n}" for n in self.notices)
        return "\n".join(lines)


# Every key the file may hold, with its default as written in the file (None: no default, optional
# unless checked otherwise).  Order is the order of the shipped config.ini and of error hints.
_DEFAULTS: dict[str, str | None] = {
    # the original sKnock's names
    "KNOCKPACKET_MIN_LENGTH": "800",
    "PORT_OPEN_DURATION_IN_SECONDS": "15",
    "TIMESTAMP_THRESHOLD_IN_SECONDS": "7",
    "CRL_UPDATE_INTERVAL_IN_MINUTES": "30",
    "RECV_BUFFER": "1600",
    "SIGNATURE_SIZE": None,
    "crlFile": None,
    "crlUrl": None,
    "serverPFXFile": None,
    "PFXPasswd": None,
    "firewallPolicy": "none",
    # sknock's names
    "PFXPasswdFile": None,
    "PFXPasswdEnv": None,
    "firewallBackend": "auto",
    "openCommand": None,
    "closeCommand": None,
    "interfaces": "any",
    "knockPorts": "any",
    "knockDestinations": "local",
    "captureMode": "packet",
    "protectedPorts": "all",
    "emergencySSH": "yes",
    "caFile": None,
    "revocation": "crl",
    "logFile": None,
    "logLevel": "INFO",
    "requireSourceAddress": "no",
    "maxOpenDuration": "300",
    "workBits": "12",
    "workers": "auto",
    "user": "nobody",
    "controlSocket": "/run/sknock/control.sock",
    "stateDir": "/var/lib/sknock",
}

_INT_RE = re.compile(r"^[0-9]{1,9}$")
_BOOLS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
_IFNAME_BAD = re.compile(r"[\s/:]")
_USER_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10})$")


class _Reader:
    """Reads values for one file and turns every problem into a ConfigError naming file and key."""

    def __init__(self, path: Path, values: Mapping[str, str]) -> None:
        self.file = path
        self.folder = path.parent
        self.values = values

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key}: {problem}")

    def raw(self, key: str) -> str | None:
        """The stripped value, or the default; an empty value counts as not set."""
        value = self.values.get(key)
        if value is not None:
            # before stripping: "key =" with an indented line under it is that line, not an empty value
            if "\n" in value or "\r" in value:
                raise self.fail(key, "value spans several lines; put it on one line")
            value = value.strip()
            if value:
                return value
        return _DEFAULTS[key]

    def required(self, key: str) -> str:
        value = self.raw(key)
        if value is None:
            raise self.fail(key, "is required but not set")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        text = self.required(key)
        if not _INT_RE.match(text):
            raise self.fail(key, f"{text!r} is not a whole number")
        number = int(text)
        if not low <= number <= high:
            raise self.fail(key, f"{number} is out of range: must be {low}..{high}")
        return number

    def boolean(self, key: str) -> bool:
        text = self.required(key)
        try:
            return _BOOLS[text.lower()]
        except KeyError:
            raise self.fail(key, f"{text!r} is not yes/no (also accepted: true/false, on/off, 1/0)") from None

    def choice(self, key: str, kind: type[_E]) -> _E:
        text = self.required(key)
        for member in kind:
            if member.value == text.lower():
                return member
        allowed = "|".join(str(m.value) for m in kind)
        raise self.fail(key, f"{text!r} is not one of {allowed}")

    def path(self, key: str, text: str) -> Path:
        """Resolve ``text`` against the config file's folder (absolute paths stay as they are)."""
        if "\x00" in text:
            raise self.fail(key, "path contains a NUL byte")
        return self.folder / Path(text).expanduser()

    def optional_path(self, key: str) -> Path | None:
        text = self.raw(key)
        return None if text is None else self.path(key, text)

    def check_readable(self, key: str, path: Path) -> None:
        """Open the file for reading: the only honest test (``os.access`` lies to root)."""
        if not path.exists():
            raise self.fail(key, f"file {path} does not exist")
        if not path.is_file():
            raise self.fail(key, f"{path} is not a regular file")
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise self.fail(key, f"cannot read {path}: {exc.strerror or exc}") from None

    def check_folder(self, key: str, path: Path) -> None:
        if not path.parent.is_dir():
            raise self.fail(key, f"folder {path.parent} (for {path.name}) does not exist")


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 (byte {exc.start})") from None


def _parse_ini(path: Path, text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False, default_section="DEFAULT"
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        parser.read_string(text, source=str(path))
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: options must follow a [DEFAULT] section header") from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(f"{path}: {exc.option}: set twice (line {exc.lineno}); keep one") from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(f"{path}: section [{exc.section}] appears twice (line {exc.lineno})") from None
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc.message}") from None
    others = parser.sections()
    if others:
        raise ConfigError(f"{path}: [{others[0]}]: unknown section; every option goes in [DEFAULT]")
    return dict(parser.defaults())


def _check_keys(path: Path, values: Mapping[str, str]) -> None:
    for key in values:
        if key in _DEFAULTS:
            continue
        by_case = [k for k in _DEFAULTS if k.lower() == key.lower()]
        close = by_case or difflib.get_close_matches(key, list(_DEFAULTS), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{path}: {key}: unknown option{hint}")


def _password(r: _Reader, environ: Mapping[str, str], check_files: bool) -> tuple[bytes | None, str, list[str]]:
    """Exactly one of PFXPasswd, PFXPasswdFile, PFXPasswdEnv.  Returns (password, source, notices)."""
    given = [k for k in ("PFXPasswd", "PFXPasswdFile", "PFXPasswdEnv") if r.raw(k) is not None]
    if not given:
        raise r.fail("PFXPasswd", "no PFX password given: set one of PFXPasswd, PFXPasswdFile or PFXPasswdEnv")
    if len(given) > 1:
        raise r.fail(given[1], f"both {given[0]} and {given[1]} are set; give the PFX password exactly one way")
    key = given[0]
    value = r.required(key)
    if key == "PFXPasswd":
        return value.encode("utf-8"), "PFXPasswd in the config file", [_PLAINTEXT_IN_CONFIG_NOTICE]
    if key == "PFXPasswdEnv":
        if value not in environ:
            raise r.fail(key, f"environment variable {value} is not set")
        secret = environ[value]
        if not secret:
            raise r.fail(key, f"environment variable {value} is empty")
        return secret.encode("utf-8"), f"PFXPasswdEnv {value}", []
    file = r.path(key, value)
    source = f"PFXPasswdFile {file}"
    if not check_files:
        return None, source, []
    r.check_readable(key, file)
    try:  # the same rule as every sknock password file: its first line, without the newline
        return resolve_password(file), source, []
    except CredentialError as exc:
        raise r.fail(key, str(exc)) from None


def _crl_url(r: _Reader, text: str, check_files: bool) -> str:
    """One crlUrl entry: an http(s) URL as it is, or a local path made absolute."""
    parts = urlsplit(text)
    if parts.scheme.lower() in ("http", "https"):
        if not parts.hostname:
            raise r.fail("crlUrl", f"{text!r} has no host name")
        return text
    if parts.scheme:
        raise r.fail("crlUrl", f"{text!r}: only http://, https:// or a local path are supported")
    local = r.path("crlUrl", text)
    if check_files:
        r.check_readable("crlUrl", local)
    return str(local)


@dataclass(frozen=True, slots=True)
class KnockDestinations:
    """The destination addresses a captured knock may have: the host's own (``local``) and ``extra``."""

    local: bool
    extra: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()

    def __str__(self) -> str:
        return ", ".join((["local"] if self.local else []) + [str(a) for a in self.extra])


def _any_or_list(r: _Reader, key: str, others: str) -> list[str] | None:
    """A comma list of non-empty entries, or None for ``any`` (which stands alone)."""
    text = r.required(key)
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise r.fail(key, f"{text!r} has an empty entry")
    if "any" in items:
        if len(items) > 1:
            raise r.fail(key, f"'any' cannot be combined with {others}")
        return None
    return items


def _knock_destinations(r: _Reader) -> KnockDestinations | None:
    items = _any_or_list(r, "knockDestinations", "other entries")
    if items is None:
        return None
    extra = []
    for item in items:
        if item == "local":
            continue
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            raise r.fail("knockDestinations", f"{item!r} is not 'local', 'any' or an IP address") from None
        if address.is_multicast or address.is_unspecified:
            raise r.fail("knockDestinations", f"{item!r} cannot be a knock's destination")
        extra.append(address)
    return KnockDestinations("local" in items, tuple(dict.fromkeys(extra)))


def _crl_sources(r: _Reader, revocation: Revocation, check_files: bool) -> tuple[CrlSource, ...]:
    """crlFile and crlUrl: one entry each (the original's meaning), or comma lists paired by position,
    one CRL per CA.  An empty crlUrl entry leaves its crlFile to be re-read as it is."""
    files_text, urls_text = r.raw("crlFile"), r.raw("crlUrl")
    if revocation is Revocation.NONE:
        for key, value in (("crlFile", files_text), ("crlUrl", urls_text)):
            if value is not None:
                raise r.fail(key, "is set, but revocation = none says no CRL is checked: remove one of the two")
        return ()
    if files_text is None:
        raise r.fail(
            "crlFile",
            "is required: the CRL of each CA (or revocation = none, for certificates that are never revoked)",
        )
    files = [entry.strip() for entry in files_text.split(",")]
    if any(not entry for entry in files):
        raise r.fail("crlFile", f"{files_text!r} has an empty entry")
    if len(files) > MAX_CRL_SOURCES:
        raise r.fail("crlFile", f"{len(files)} CRLs is too many (at most {MAX_CRL_SOURCES}: one for each CA)")
    paths = [r.path("crlFile", entry) for entry in files]
    duplicate = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if duplicate is not None:
        raise r.fail("crlFile", f"{duplicate} is named twice; give each CA's CRL once")
    urls: list[str | None] = [None] * len(paths)
    if urls_text is not None:
        entries = [entry.strip() for entry in urls_text.split(",")]
        if len(entries) != len(paths):
            raise r.fail(
                "crlUrl",
                f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} but crlFile has {len(paths)}: give one "
                "per crlFile, in the same order (leave an entry empty for a crlFile that is read as it is)",
            )
        if all(not entry for entry in entries):
            raise r.fail("crlUrl", f"{urls_text!r} has only empty entries")
        urls = [_crl_url(r, entry, check_files) if entry else None for entry in entries]
    # A local crlUrl that is its own crlFile means: read crlFile as it is (never rewrite the admin's file).
    return tuple(
        CrlSource(path, None if url is not None and _same_path(url, path) else url)
        for path, url in zip(paths, urls, strict=True)
    )


def _same_path(url: str, path: Path) -> bool:
    if urlsplit(url).scheme:
        return False
    try:
        return Path(url).resolve() == path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not the same file as far as we can tell
        return False


def _interfaces(r: _Reader) -> tuple[str, ...] | None:
    names = _any_or_list(r, "interfaces", "interface names")
    if names is None:
        return None
    for name in names:
        if len(name) > 15 or name in (".", "..") or _IFNAME_BAD.search(name):
            raise r.fail("interfaces", f"{name!r} is not a valid interface name")
    return tuple(dict.fromkeys(names))


def _knock_ports(r: _Reader) -> tuple[tuple[int, int], ...] | None:
    text = r.required("knockPorts")
    if text.lower() == "any":
        return None
    if "/" in text:
        raise r.fail("knockPorts", f"bad entry in {text!r}: knock ports are UDP, write 62201, not udp/62201")
    try:  # knock ports are UDP ports: reuse the admin port-list parser with the protocol filled in
        entries = (entry.strip() for entry in text.split(","))
        ports = parse_ports(",".join(f"udp/{entry}" if entry else "" for entry in entries))
    except PortSpecError as exc:
        raise r.fail("knockPorts", f"{exc} (write any, a port, a range like 10000-10100, or a comma list)") from None
    return tuple((span.first, span.last) for span in ports.ranges)


def _protected_ports(r: _Reader) -> PortSet | None:
    text = r.required("protectedPorts")
    if text.lower() == "all":
        return None
    try:
        return parse_ports(text)
    except PortSpecError as exc:
        raise r.fail("protectedPorts", f"{exc} (write 'all' or a list like tcp/22,tcp/3389)") from None


def _command(r: _Reader, key: str) -> str | None:
    text = r.raw(key)
    if text is None:
        return None
    try:  # the command backend's own rule
        split_template(text)
    except TemplateError as exc:
        raise r.fail(key, str(exc)) from None
    except ValueError as exc:
        raise r.fail(key, f"cannot split into words: {exc}") from None
    return text


def _user(r: _Reader, check_files: bool) -> str:
    name = r.required("user")
    if not _USER_RE.match(name):
        raise r.fail("user", f"{name!r} is not a valid user name")
    if check_files and not name.isdigit():
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise r.fail("user", f"user {name!r} does not exist on this system") from None
    return name


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
    values = _parse_ini(config_path, _read_text(config_path))
    _check_keys(config_path, values)
    r = _Reader(config_path, values)
    notices: list[str] = []

    if r.raw("SIGNATURE_SIZE") is not None:  # ignored, but read like any value: a continuation line is refused
        notices.append(_SIGNATURE_SIZE_NOTICE)

    recv_buffer = r.integer("RECV_BUFFER", MIN_RECV_BUFFER, 65535)
    min_length = r.integer("KNOCKPACKET_MIN_LENGTH", 1, 65535)
    if min_length > recv_buffer:
        raise r.fail(
            "KNOCKPACKET_MIN_LENGTH",
            f"{min_length} is larger than RECV_BUFFER ({recv_buffer}): no knock could ever be accepted",
        )
    max_open = r.integer("maxOpenDuration", 1, 86400)
    open_duration = r.integer("PORT_OPEN_DURATION_IN_SECONDS", 1, 86400)
    if open_duration > max_open:
        raise r.fail("PORT_OPEN_DURATION_IN_SECONDS", f"{open_duration} is longer than maxOpenDuration ({max_open})")
    threshold = r.integer("TIMESTAMP_THRESHOLD_IN_SECONDS", 1, 300)
    crl_interval = r.integer("CRL_UPDATE_INTERVAL_IN_MINUTES", 1, 7 * 24 * 60)
    work_bits = r.integer("workBits", 0, 24)
    auto_workers = r.raw("workers") == "auto"
    workers = min(os.cpu_count() or 1, MAX_WORKERS) if auto_workers else r.integer("workers", 1, MAX_WORKERS)

    revocation = r.choice("revocation", Revocation)
    if revocation is Revocation.NONE:
        notices.append(_NO_REVOCATION_NOTICE)
    crl_sources = _crl_sources(r, revocation, check_files)
    pfx_file = r.path("serverPFXFile", r.required("serverPFXFile"))
    ca_file = r.optional_path("caFile")
    log_file = r.optional_path("logFile")
    control_socket = r.path("controlSocket", r.required("controlSocket"))
    state_dir = r.path("stateDir", r.required("stateDir"))
    password, password_source, password_notices = _password(r, environ, check_files)
    notices.extend(password_notices)

    backend = r.choice("firewallBackend", FirewallBackend)
    open_command = _command(r, "openCommand")
    close_command = _command(r, "closeCommand")
    if backend is FirewallBackend.COMMAND:
        for key, value in (("openCommand", open_command), ("closeCommand", close_command)):
            if value is None:
                raise r.fail(key, "is required when firewallBackend = command")
    else:
        for key, value in (("openCommand", open_command), ("closeCommand", close_command)):
            if value is not None:
                raise r.fail(key, f"is only used with firewallBackend = command (it is {backend.value})")

    capture_mode = r.choice("captureMode", CaptureMode)
    knock_ports = _knock_ports(r)
    if capture_mode is CaptureMode.UDP:
        if knock_ports is None:
            raise r.fail("knockPorts", "captureMode = udp binds real sockets, so knockPorts must name ports, not any")
        count = sum(last - first + 1 for first, last in knock_ports)
        if count > MAX_UDP_KNOCK_PORTS:
            raise r.fail(
                "knockPorts", f"{count} ports is too many for captureMode = udp (at most {MAX_UDP_KNOCK_PORTS})"
            )

    level = r.required("logLevel").upper()
    if level not in _LOG_LEVELS:
        raise r.fail("logLevel", f"{r.required('logLevel')!r} is not one of {'|'.join(_LOG_LEVELS)}")

    if check_files:
        checks: list[tuple[str, Path, Callable[[str, Path], None]]] = [("serverPFXFile", pfx_file, r.check_readable)]
        for crl_source in crl_sources:
            crl_file = crl_source.file
            checks.append(("crlFile", crl_file, r.check_readable if crl_source.url is None else r.check_folder))
            if crl_source.url is not None and crl_file.exists():
                checks.append(("crlFile", crl_file, r.check_readable))
        if ca_file is not None:
            checks.append(("caFile", ca_file, r.check_readable))
        if log_file is not None:
            checks.append(("logFile", log_file, r.check_folder))
        for key, file, check in checks:
            check(key, file)

    config = ServerConfig(
        source=config_path,
        knockpacket_min_length=min_length,
        port_open_duration=open_duration,
        timestamp_threshold=threshold,
        crl_update_interval_minutes=crl_interval,
        recv_buffer=recv_buffer,
        crl_file=crl_sources[0].file if crl_sources else None,
        crl_url=crl_sources[0].url if crl_sources else None,
        server_pfx_file=pfx_file,
        pfx_password=password,
        pfx_password_source=password_source,
        firewall_policy=r.choice("firewallPolicy", PolicyMode),
        firewall_backend=backend,
        open_command=open_command,
        close_command=close_command,
        interfaces=_interfaces(r),
        knock_destinations=_knock_destinations(r),
        knock_ports=knock_ports,
        capture_mode=capture_mode,
        protected_ports=_protected_ports(r),
        emergency_ssh=r.boolean("emergencySSH"),
        ca_file=ca_file,
        log_file=log_file,
        log_level=level,
        require_source_address=r.boolean("requireSourceAddress"),
        max_open_duration=max_open,
        work_bits=work_bits,
        workers=workers,
        user=_user(r, check_files),
        control_socket=control_socket,
        state_dir=state_dir,
        revocation=revocation,
        crl_sources=crl_sources,
        notices=tuple(notices),
    )
    _check_what_is_meant(r, config)
    return config


# -- options that contradict each other -----------------------------------------------------------------
# Each option may be fine alone and the combination still not do what the file says: the server would run,
# say "configuration OK", and leave open what the operator meant closed, or refuse every knock.  Each check
# raises naming both options.


def _check_what_is_meant(r: _Reader, config: ServerConfig) -> None:
    """Refuse combinations of options that would silently not do what the file says (docs/configuration.md,
    "Options that contradict each other")."""
    _check_knock_size(r, config)
    _check_policy_backend(r, config)
    _check_protected_ports_policy(r, config)
    _check_emergency_ssh(r, config)
    _check_udp_capture(r, config)


def _check_knock_size(r: _Reader, config: ServerConfig) -> None:
    from ..protocol.wire import MAX_DATAGRAM

    if config.knockpacket_min_length > MAX_DATAGRAM:
        raise r.fail(
            "KNOCKPACKET_MIN_LENGTH",
            f"{config.knockpacket_min_length} is larger than the largest knock ({MAX_DATAGRAM} bytes): every knock "
            f"would be dropped; use at most {MAX_DATAGRAM}",
        )


def _check_policy_backend(r: _Reader, config: ServerConfig) -> None:
    if config.firewall_backend is FirewallBackend.COMMAND and config.firewall_policy is not PolicyMode.NONE:
        raise r.fail(
            "firewallPolicy",
            f"{config.firewall_policy.value} is not applied with firewallBackend = command, which only runs "
            "openCommand and closeCommand: the ports would stay as the firewall behind them has them; close them "
            "there and set firewallPolicy = none, or use firewallBackend = nftables or iptables",
        )


def _check_protected_ports_policy(r: _Reader, config: ServerConfig) -> None:
    if config.firewall_policy is PolicyMode.NONE and config.protected_ports is not None:
        raise r.fail(
            "protectedPorts",
            f"{config.protected_ports} would not be protected: firewallPolicy = none closes nothing; "
            "set firewallPolicy = drop or reject to close them, or protectedPorts = all",
        )


def _check_emergency_ssh(r: _Reader, config: ServerConfig) -> None:
    from ..ports import Protocol

    protected = config.protected_ports
    if (
        config.emergency_ssh
        and config.firewall_policy is not PolicyMode.NONE
        and protected is not None
        and (Protocol.TCP, 22) in protected
    ):
        raise r.fail(
            "emergencySSH",
            f"yes keeps tcp/22 open to everyone, but protectedPorts ({protected}) names tcp/22 "
            f"under firewallPolicy = {config.firewall_policy.value}: set emergencySSH = no to protect it (once "
            "knocking works), or take tcp/22 out of protectedPorts",
        )


def _check_udp_capture(r: _Reader, config: ServerConfig) -> None:
    if config.capture_mode is not CaptureMode.UDP:
        return
    if config.interfaces is not None:
        raise r.fail(
            "interfaces",
            f"{','.join(config.interfaces)} would not limit where knocks are taken: captureMode = udp binds its "
            "sockets on every interface; use captureMode = packet, or interfaces = any",
        )
    from ..ports import Protocol

    protected = config.protected_ports
    if config.firewall_policy is PolicyMode.NONE or protected is None or config.knock_ports is None:
        return  # with protectedPorts = all the knock ports are the documented exception
    knock_ports = (port for first, last in config.knock_ports for port in range(first, last + 1))
    inside = [port for port in knock_ports if (Protocol.UDP, port) in protected]
    if inside:
        raise r.fail(
            "knockPorts",
            f"udp/{inside[0]} is in protectedPorts ({protected}), but captureMode = udp keeps the knock "
            "ports open to everyone so that knocks reach its sockets: take it out of protectedPorts, or use "
            "captureMode = packet (which needs no open port)",
        )
