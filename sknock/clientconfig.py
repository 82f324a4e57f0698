"""The client's configuration file: named servers, so that ``sknock-knock NAME`` and ``ssh NAME`` need no
paths on the command line.

An INI file whose sections are servers, by the name the user calls them (an ssh host alias works)::

    [gateway]
    host = gw.example.org
    serverCert = ~/.config/sknock/gateway.cer
    credentials = ~/.config/sknock/alice.pfx
    passwordFile = ~/.config/sknock/alice.pass
    ports = tcp/22

Files, later ones overriding earlier ones server by server (a section replaces the whole section of the
same name): the system-wide ``/etc/sknock/client.ini``, then the user's
``$XDG_CONFIG_HOME/sknock/client.ini`` (``~/.config/sknock/client.ini`` when XDG_CONFIG_HOME is unset);
or only the file given with ``--config FILE`` / ``config=``.  Relative paths in a file are relative to
that file's folder; ``~`` is the user's home.

Every key is said once, in :data:`PROFILE_KEYS`: parsing, the error messages and the table of
docs/client.md (``python -m sknock.clientconfig --doc-table``) all come from it.  Everything in a file is
checked before it is used; a bad file is one :class:`~sknock.errors.ProfileError` naming the file, the
section and the key.

The password (or, for a token, the PIN) that unlocks the credentials is never required in clear: it comes
from ``passwordFile``, ``passwordEnv``, the desktop keyring (``passwordKeyring = yes``, through the
``keyring`` library: ``pip install 'sknock[keyring]'``), or a clear-text ``password`` the user wrote
there on purpose; with none of them, from ``$SKNOCK_PFX_PASSWORD`` or a prompt, like ``sknock-knock``.
The credentials themselves are loaded in one place, :func:`load_credentials`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .carrier import Carrier
from .credentials import ClientCredentials, is_pkcs11_uri, load_client_credentials, resolve_password
from .errors import ProfileError
from .fileio import read_text
from .ini import parse_ini
from .ports import Protocol
from .protocol.wire import DEFAULT_WORK_BITS, MAX_WORK_BITS

__all__ = [
    "PASSWORD_ENV",
    "PROFILE_KEYS",
    "SYSTEM_FILE",
    "KEYRING_SERVICE",
    "Profile",
    "ProfileKey",
    "default_files",
    "parse_profiles",
    "read_profiles",
    "load_profiles",
    "find_profile",
    "get_profile",
    "profile_secret",
    "load_credentials",
    "doc_table",
]

#: The environment variable a password comes from when nothing else says where (as for sknock-knock).
PASSWORD_ENV = "SKNOCK_PFX_PASSWORD"  # noqa: S105 -- the variable's name, not a password
SYSTEM_FILE = Path("/etc/sknock/client.ini")
#: The keyring service a ``passwordKeyring = yes`` password is stored under (the user name is the server's).
KEYRING_SERVICE = "sknock"
_MAX_FILE_BYTES = 1 << 20
_MAX_TIMEOUT = 3600.0
_MAX_RETRIES = 100


# -- the values ----------------------------------------------------------------------------------------------


def _text(value: str, base: Path) -> str:
    if any(c.isspace() for c in value):
        raise ValueError(f"must be one word, not {value!r}")
    return value


def _path(value: str, base: Path) -> Path:
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~name of no such user
        raise ValueError(f"cannot expand {value.split('/', 1)[0]!r}: no such user") from None
    return path if path.is_absolute() else base / path


def _credentials(value: str, base: Path) -> str:
    # A PKCS#11 URI is kept as written; anything else is a file.
    if value.lower().startswith("pkcs11:"):
        return value
    return str(_path(value, base))


def _yes_no(value: str, base: Path) -> bool:
    lowered = value.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"must be yes or no, not {value!r}")


def _protocol(value: str, base: Path) -> Protocol:
    try:
        return Protocol.from_label(value.lower())
    except ValueError:
        raise ValueError(f"must be tcp or udp, not {value!r}") from None


def _port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port must be 1..65535, not {text!r}")
    return int(text)


def _ports(value: str, base: Path) -> tuple[tuple[Protocol | None, int], ...]:
    found: list[tuple[Protocol | None, int]] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            raise ValueError(f"an empty entry in {value!r}; write tcp/22, udp/8000 or 22")
        label, _, number = entry.rpartition("/")
        protocol = _protocol(label, base) if label else None
        port = (protocol, _port_number(number))
        if port not in found:
            found.append(port)
    return tuple(found)


def _source(value: str, base: Path) -> str:
    if value in ("any", "auto"):
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"must be any, auto or an IP address, not {value!r}") from None


def _carrier(value: str, base: Path) -> Carrier:
    try:
        return Carrier.parse(value.lower())
    except ValueError:
        raise ValueError(f"must be {' or '.join(c.value for c in Carrier)}, not {value!r}") from None


def _family(value: str, base: Path) -> int | None:
    choices: dict[str, int | None] = {"any": None, "4": 4, "ipv4": 4, "6": 6, "ipv6": 6}
    if value.lower() not in choices:
        raise ValueError(f"must be any, 4 or 6, not {value!r}")
    return choices[value.lower()]


def _knock_port(value: str, base: Path) -> int | None:
    return None if value == "random" else _port_number(value)


def _seconds(value: str, base: Path) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, not {value!r}") from None
    if not 0 < seconds <= _MAX_TIMEOUT:
        raise ValueError(f"must be more than 0 and at most {_MAX_TIMEOUT:g} seconds, not {value}")
    return seconds


def _integer(low: int, high: int) -> Callable[[str, Path], int]:
    def parse(value: str, base: Path) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise ValueError(f"must be a whole number {low}..{high}, not {value!r}")
        return int(value)

    return parse


def _env_name(value: str, base: Path) -> str:
    if not value.replace("_", "a").isalnum() or value[0].isdigit() or not value.isascii():
        raise ValueError(f"must be an environment variable's name, not {value!r}")
    return value


def _any_text(value: str, base: Path) -> str:
    return value


class ProfileKey(NamedTuple):
    """One key of a server's section, said once: parsing, error messages and the docs table know it."""

    key: str  # as written in the file (case-sensitive)
    attr: str  # the Profile attribute it fills
    parse: Callable[[str, Path], Any]  # (stripped, non-empty text, the file's folder) -> value; ValueError
    default: str  # the docs' Default cell
    doc: str  # the docs' Meaning cell


#: Every key a server's section may hold.
PROFILE_KEYS: tuple[ProfileKey, ...] = (
    ProfileKey("host", "host", _text, "the section's name", "The server's host name or IPv4/IPv6 address."),
    ProfileKey(
        "serverCert", "server_cert", _path, "required",
        "The server's certificate (DER or PEM), the one knocks are encrypted to.",
    ),
    ProfileKey(
        "credentials", "credentials", _credentials, "required",
        "The client's credentials: its PKCS#12 (`.pfx`) file, or a `pkcs11:` URI of a key on a token.",
    ),
    ProfileKey(
        "clientCert", "client_cert", _path, "the token's",
        "With a `pkcs11:` URI: the client certificate file (default: the one on the token with the key's id).",
    ),
    ProfileKey(
        "passwordFile", "password_file", _path, "–",
        "A file whose first line is the password of `credentials` (a token's PIN).",
    ),
    ProfileKey(
        "passwordEnv", "password_env", _env_name, "–",
        "The environment variable holding the password of `credentials`.",
    ),
    ProfileKey(
        "passwordKeyring", "password_keyring", _yes_no, "no",
        "`yes`: the password is in the desktop keyring, service `sknock`, user the section's name "
        "(`keyring set sknock NAME`; needs `pip install 'sknock[keyring]'`).",
    ),
    ProfileKey(
        "password", "password", _any_text, "–",
        "The password itself, in clear: only if you mean it; refused unless the file is readable by its owner "
        "alone (`chmod 600`).",
    ),
    ProfileKey(
        "ports", "ports", _ports, "–",
        "The ports `sknock-knock NAME` knocks: `tcp/22`, `udp/8000`, or `22` (of `protocol`), comma-separated.",
    ),
    ProfileKey("protocol", "protocol", _protocol, "tcp", "`tcp` or `udp`: of `-p PORT` and of bare port numbers."),
    ProfileKey(
        "source", "source", _source, "any",
        "`any` (the packet's source; works behind NAT), `auto` (bind the knock to this host's address "
        "towards the server) or an address.",
    ),
    ProfileKey("family", "family", _family, "any", "`any`, `4` or `6`: the address family to use."),
    ProfileKey(
        "via", "via", _carrier, "udp",
        "`udp` or `icmp`: what carries the knock (`icmp`: an echo request; the server needs "
        "`knockCarriers = udp, icmp`).",
    ),
    ProfileKey(
        "knockPort", "knock_port", _knock_port, "random", "`random` or 1..65535: the UDP port knocks go to."
    ),
    ProfileKey(
        "timeout", "timeout", _seconds, "10", "Seconds to wait for a port to open, all knocks together (at most 3600)."
    ),
    ProfileKey(
        "retries", "retries", _integer(1, _MAX_RETRIES), "3",
        f"Knocks at most while a port stays closed, 1..{_MAX_RETRIES}.",
    ),
    ProfileKey(
        "workBits", "work_bits", _integer(0, MAX_WORK_BITS), str(DEFAULT_WORK_BITS),
        f"Proof of work, 0..{MAX_WORK_BITS}; at least the server's `workBits`.",
    ),
)
_BY_KEY = {k.key: k for k in PROFILE_KEYS}
_PASSWORD_KEYS = ("password", "passwordFile", "passwordEnv", "passwordKeyring")


class Profile(NamedTuple):
    """One named server, as a file says it (see :data:`PROFILE_KEYS` for each attribute's key)."""

    name: str
    file: Path | None  # where it was read; None: made by a program
    host: str
    server_cert: Path | None = None
    credentials: str | None = None
    client_cert: Path | None = None
    password_file: Path | None = None
    password_env: str | None = None
    password_keyring: bool = False
    password: str | None = None  # never in repr()
    ports: tuple[tuple[Protocol | None, int], ...] = ()
    protocol: Protocol = Protocol.TCP
    source: str = "any"
    family: int | None = None
    via: Carrier = Carrier.UDP
    knock_port: int | None = None
    timeout: float = 10.0
    retries: int = 3
    work_bits: int = DEFAULT_WORK_BITS

    def __repr__(self) -> str:
        shown = (f"{name}={value!r}" for name, value in zip(self._fields, self, strict=True) if name != "password")
        return f"Profile({', '.join(shown)})"

    def where(self, key: str | None = None) -> str:
        """``FILE: [NAME]`` (and ``: KEY``): where an error about this server points."""
        place = f"{self.file}: [{self.name}]" if self.file is not None else f"[{self.name}]"
        return f"{place}: {key}" if key else place

    def default_ports(self) -> tuple[tuple[Protocol, int], ...]:
        """The ports ``sknock-knock NAME`` knocks, each with its protocol (bare numbers take ``protocol``)."""
        return tuple((self.protocol if proto is None else proto, port) for proto, port in self.ports)

    def knock_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`sknock.client.KnockClient.knock` this server sets."""
        return {
            "knock_port": self.knock_port,
            "timeout": self.timeout,
            "retries": self.retries,
            "source_address": self.source,
            "family": self.family,
            "via": self.via,
        }

    def require(self, key: str) -> Any:
        """The value of ``key``; ProfileError naming the file and section when it is not set."""
        value = getattr(self, _BY_KEY[key].attr)
        if value is None:
            raise ProfileError(f"{self.where(key)}: not set ({_BY_KEY[key].doc})")
        return value


_ATTRS = set(Profile._fields)
assert all(k.attr in _ATTRS for k in PROFILE_KEYS)  # noqa: S101 -- the table and the class agree


# -- files ---------------------------------------------------------------------------------------------------


def default_files(environ: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """The system-wide file and the user's, in the order they are read (the user's wins)."""
    env = os.environ if environ is None else environ
    config_home = env.get("XDG_CONFIG_HOME") or ""
    base = Path(config_home) if Path(config_home).is_absolute() else Path.home() / ".config"
    return SYSTEM_FILE, base / "sknock" / "client.ini"


def parse_profiles(text: str, file: Path) -> dict[str, Profile]:
    """The servers of one file's ``text`` (``file`` names it in errors and anchors relative paths).

    :raises ProfileError: one line naming ``file``, the section and the key.
    """
    _, sections = parse_ini(text, file, error=ProfileError, first_header="[SERVER]")
    base = file.parent
    profiles: dict[str, Profile] = {}
    for name, section in sections.items():
        if not name.strip() or name != name.strip() or not name.isprintable():
            raise ProfileError(f"{file}: [{name!r}]: a server's name must be printable, without edge spaces")
        profiles[name] = _profile(name, file, base, section)
    return profiles


def _profile(name: str, file: Path, base: Path, section: Mapping[str, str]) -> Profile:
    values: dict[str, Any] = {}
    for key, raw in section.items():
        where = f"{file}: [{name}]: {key}"
        spec = _BY_KEY.get(key)
        if spec is None:
            import difflib  # only for a misspelt key: not on every start-up

            close = [k for k in _BY_KEY if k.lower() == key.lower()] or difflib.get_close_matches(
                key, list(_BY_KEY), n=1, cutoff=0.75
            )
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ProfileError(f"{where}: unknown key{hint}")
        value = raw.strip()
        if not value:
            raise ProfileError(f"{where}: empty; give a value or remove the line")
        try:
            values[spec.attr] = spec.parse(value, base)
        except ValueError as exc:
            raise ProfileError(f"{where}: {exc}") from None
    given = [k for k in _PASSWORD_KEYS if k in section and values[_BY_KEY[k].attr] is not False]
    if len(given) > 1:
        raise ProfileError(f"{file}: [{name}]: {given[1]}: {given[0]} is set too; give the password one way")
    if values.get("via") is Carrier.ICMP and values.get("knock_port") is not None:
        raise ProfileError(f"{file}: [{name}]: knockPort: a UDP port, but via = icmp (an echo request has none)")
    values.setdefault("host", name)
    return Profile(name=name, file=file, **values)


def read_profiles(file: str | os.PathLike[str]) -> dict[str, Profile]:
    """The servers of one file.

    :raises ProfileError: the file cannot be read, is not UTF-8 or is invalid (see :func:`parse_profiles`).
    """
    path = Path(file)
    text = read_text(path, limit=_MAX_FILE_BYTES, what="client configuration file", error=ProfileError)
    profiles = parse_profiles(text, path)
    in_clear = [p for p in profiles.values() if p.password is not None]
    if in_clear and path.stat().st_mode & 0o077:
        # A password in clear that others can read is no secret: refuse it rather than use it.
        raise ProfileError(
            f"{in_clear[0].where('password')}: a password in clear in a file others can read; "
            f"chmod 600 {path}, or use passwordFile, passwordEnv or passwordKeyring"
        )
    return profiles


def load_profiles(config: str | os.PathLike[str] | None = None) -> dict[str, Profile]:
    """The servers of ``config`` alone when given (it must exist), else of :func:`default_files` that
    exist, the user's overriding the system's server by server.

    :raises ProfileError: as :func:`read_profiles`.
    """
    if config is not None:
        return read_profiles(config)
    profiles: dict[str, Profile] = {}
    for file in default_files():
        if file.exists():
            profiles.update(read_profiles(file))
    return profiles


def find_profile(
    name: str, config: str | os.PathLike[str] | None = None, *, host: str | None = None
) -> Profile | None:
    """The server called ``name``; else, when ``host`` is given, the one called ``host`` or the only one
    whose ``host`` it is; None when there is none.

    :raises ProfileError: a file is invalid, or several servers have that host (say which by name).
    """
    profiles = load_profiles(config)
    for candidate in (name, host):
        if candidate is not None and candidate in profiles:
            return profiles[candidate]
    if host is None:
        return None
    matching = [p for p in profiles.values() if p.host == host]
    if len(matching) > 1:
        names = ", ".join(f"[{p.name}]" for p in matching)
        raise ProfileError(f"{host}: several servers have this host ({names}); use a server's name")
    return matching[0] if matching else None


def get_profile(name: str, config: str | os.PathLike[str] | None = None) -> Profile:
    """The server called ``name``.

    :raises ProfileError: there is none (the message names the files looked in), or a file is invalid.
    """
    profile = find_profile(name, config)
    if profile is None:
        files = [Path(config)] if config is not None else list(default_files())
        raise ProfileError(f"no server named {name!r} in {' or '.join(str(f) for f in files)}")
    return profile


# -- unlocking the credentials --------------------------------------------------------------------------------


def profile_secret(
    profile: Profile, *, interactive: bool = False, prompt: str | None = None, env_var: str = PASSWORD_ENV
) -> bytes:
    """The password (or PIN) of ``profile``'s credentials, from where its file says.

    With no password key: ``$env_var`` (``$SKNOCK_PFX_PASSWORD``; a token's PIN: ``$SKNOCK_TOKEN_PIN``),
    else a prompt (``prompt``) when ``interactive``.

    :raises ProfileError: the environment variable is unset, the keyring has none or is not installed,
        or there is no password at all.
    :raises CredentialError: the password file is missing or empty.
    """
    if profile.password is not None:
        return profile.password.encode("utf-8")
    if profile.password_file is not None:
        return resolve_password(profile.password_file)
    if profile.password_env is not None:
        value = os.environ.get(profile.password_env)
        if not value:
            raise ProfileError(f"{profile.where('passwordEnv')}: ${profile.password_env} is not set")
        return value.encode("utf-8")
    if profile.password_keyring:
        return _keyring_password(profile)
    if os.environ.get(env_var) or interactive:
        asked = prompt or f"Password for {profile.name}: "
        return resolve_password(None, env_var=env_var, prompt=asked, interactive=True)
    if profile.file is None:  # not a named server: only the command line could have said where
        raise ProfileError(
            f"no password for {profile.credentials}: give --password-file FILE, or set ${env_var}, "
            "or run on a terminal to be asked"
        )
    raise ProfileError(
        f"{profile.where()}: no password for {profile.credentials}: set passwordFile, passwordEnv or "
        f"passwordKeyring there (or give --password-file, or set ${env_var})"
    )


def _keyring_password(profile: Profile) -> bytes:
    try:
        import keyring  # type: ignore[import-not-found,unused-ignore]
        import keyring.errors  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ProfileError(
            f"{profile.where('passwordKeyring')}: the keyring library is not installed "
            "(pip install 'sknock[keyring]')"
        ) from None
    try:
        value = keyring.get_password(KEYRING_SERVICE, profile.name)
    except keyring.errors.KeyringError as exc:
        raise ProfileError(f"{profile.where('passwordKeyring')}: the keyring cannot be read: {exc}") from None
    if not value:
        raise ProfileError(
            f"{profile.where('passwordKeyring')}: no password in the keyring for service {KEYRING_SERVICE!r}, "
            f"user {profile.name!r} (keyring set {KEYRING_SERVICE} {profile.name})"
        )
    return str(value).encode("utf-8")


def load_credentials(profile: Profile, *, interactive: bool = False) -> ClientCredentials:
    """Load ``profile``'s credentials: the one place a named server's ``credentials`` (a PKCS#12 file, or
    a ``pkcs11:`` URI with ``clientCert``: :func:`~sknock.credentials.load_client_credentials`) become a
    signing key and certificate, for :meth:`~sknock.client.KnockClient.from_profile`,
    ``sknock-knock`` and ``sknock-knock ssh-proxy`` alike.  The password is found (:func:`profile_secret`)
    only when it is needed.

    :raises ProfileError: ``credentials`` is not set, or no password source (see :func:`profile_secret`).
    :raises CredentialError: the file is missing, unreadable, or the password is wrong (TokenError: the
        token, its module, key or PIN).
    """
    spec = profile.require("credentials")
    env_var = PASSWORD_ENV
    if is_pkcs11_uri(spec):
        from .token import PIN_ENV  # only for a token: the .pfx path does not import sknock.token

        env_var = PIN_ENV

    def secret(prompt: str) -> bytes:  # asked only when needed: a token's URI may carry its PIN source
        return profile_secret(profile, interactive=interactive, prompt=prompt, env_var=env_var)

    return load_client_credentials(spec, secret, certificate=profile.client_cert)


# -- the docs --------------------------------------------------------------------------------------------------


def doc_table() -> str:
    """The Markdown table of :data:`PROFILE_KEYS` that docs/client.md holds."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{k.key}` | {k.default} | {k.doc} |" for k in PROFILE_KEYS]
    return "\n".join(rows) + "\n"


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sknock.clientconfig", description=__doc__.split("\n")[0])
    parser.add_argument("--doc-table", action="store_true", help="print the table of keys (docs/client.md)")
    args = parser.parse_args(argv)
    if args.doc_table:
        sys.stdout.write(doc_table())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
