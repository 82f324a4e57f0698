"""``sknock-knock``: knock on a server's door from the command line (also ``python -m sknock.cli.knock``).

    sknock-knock gateway                           # a named server (client.ini): knock its ports
    sknock-knock gateway -p 443                    # another port on it
    sknock-knock --pfx a.pfx --server-cert s.cer -p 22 server.example
    sknock-knock -u -p 8000 server.example         # open udp/8000 (cannot be confirmed: sent = success)
    sknock-knock --close -p 22 server.example      # close tcp/22 for this host now
    sknock-knock --via icmp gateway                # the knock in a ping (echo request), not UDP
    sknock-knock ssh-proxy %n %h %p                # as an ssh ProxyCommand (see sknock.sshproxy)

A named server is a section of the client configuration file (:mod:`sknock.clientconfig`); options on the
command line override what it says.  Exit status: 0 the port(s) opened (or, with ``-u``, ``--no-verify``
or ``--close``, the knock was sent); 1 it did not open within the timeout; 2 bad input (usage, files,
password, a server certificate that is not a server's, a port the certificate does not name, a host that
does not resolve, a knock that cannot be sent), reported as one line on stderr.
The status line goes to stdout on a terminal, else to stderr (so stdout stays clean for a pipe), and
nowhere with ``--quiet``.
The PKCS#12 password never comes from the command line: ``--password-file``, the named server's password
source, ``$SKNOCK_PFX_PASSWORD``, or a prompt when stdin is a terminal.  ``--pfx`` (and a named server's
``credentials``) also takes a ``pkcs11:`` URI (a key on a token, :mod:`sknock.token`); its PIN comes from
the URI's pin-source, ``--password-file``, the named server's password source, ``$SKNOCK_TOKEN_PIN`` or a
prompt.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..carrier import Carrier
from ..client import KnockClient, load_server_certificate, resolve
from ..clientconfig import PASSWORD_ENV, Profile, default_files, find_profile
from ..credentials import is_pkcs11_uri
from ..errors import CredentialError, ResolveError, SknockError
from ..ports import Protocol
from ..protocol.request import MAX_DURATION
from ..protocol.wire import DEFAULT_WORK_BITS, MAX_WORK_BITS

PROG = "sknock-knock"
_MAX_RETRIES = 100


class _Usage(Exception):
    """A command-line mistake, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low}..{high}, not {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout must be a number of seconds, not {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"timeout must be more than 0 and at most 3600 seconds, not {text}")
    return value


def _source(text: str) -> str:
    if text in ("auto", "any"):
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"source must be auto, any or an IP address, not {text!r}") from None


def _must_exist(path: Path, what: str, option: str) -> None:
    if not path.exists():
        raise CredentialError(f"{what} {path}: no such file (give {option} FILE)")


def _parser() -> argparse.ArgumentParser:
    user_file = default_files()[1]
    p = _Parser(
        prog=PROG,
        description="Send one sknock knock (a signed, encrypted UDP datagram) asking a server to open a port for "
        f"you.  TARGET is a named server of the client configuration file ({user_file}, /etc/sknock/client.ini, "
        "or --config FILE), or a host name or address.  Also: sknock-knock ssh-proxy NAME HOST PORT (an ssh "
        "ProxyCommand; see sknock-knock ssh-proxy --help).",
        epilog="Exit status: 0 opened (or sent, with -u, --no-verify or --close), 1 did not open, 2 bad input. "
        f"Password: --password-file, else the named server's, else ${PASSWORD_ENV}, else a prompt on a terminal.",
    )
    p.add_argument("target", metavar="TARGET", help="a named server, or the knock server's name or IPv4/IPv6 address")
    p.add_argument(
        "-p", "--port", metavar="PORT", type=_int_in(1, 65535, "port"),
        help="the port to open (default: the named server's ports)",
    )
    p.add_argument("-u", "--udp", action="store_true", help="open a UDP port (default TCP, or the named server's)")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=4, help="use IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const=6, help="use IPv6 only")
    p.add_argument("--config", type=Path, metavar="FILE", help="read named servers from FILE only")
    p.add_argument(
        "--pfx", metavar="FILE|URI", help="client PKCS#12, or a pkcs11: URI of a key on a token (default: the named "
        "server's credentials)"
    )
    p.add_argument("--client-cert", type=Path, metavar="FILE", help="with a pkcs11: URI: the client certificate "
                   "(default: the one on the token with the key's id)")
    p.add_argument(
        "--server-cert", type=Path, metavar="FILE", help="server certificate, DER or PEM (default: the named server's)"
    )
    p.add_argument(
        "--password-file", type=Path, metavar="FILE", help="file whose first line is the PKCS#12 password (token PIN)"
    )
    p.add_argument("--no-verify", action="store_true", help="do not confirm by connecting: exit 0 once sent")
    p.add_argument(
        "--knock-port",
        type=_int_in(1, 65535, "knock port"),
        default=None,
        metavar="N",
        help="UDP port to send the knock to (default: random per knock; the server listens on all)",
    )
    p.add_argument(
        "--via",
        choices=[c.value for c in Carrier],
        default=None,
        help="what carries the knock: udp (default) or icmp, an echo request (for networks that let only ping "
        "out; the server needs knockCarriers = udp, icmp)",
    )
    p.add_argument(
        "--source",
        type=_source,
        default=None,
        metavar="auto|any|ADDR",
        help="bind the knock to a source address: any (default; works behind NAT), auto (this host's "
        "address towards the server) or an address",
    )
    p.add_argument(
        "--duration",
        type=_int_in(1, MAX_DURATION, "duration"),
        default=None,
        metavar="S",
        help="seconds to keep the port open (default: the server's; the server may cap it)",
    )
    p.add_argument("--close", action="store_true", help="ask the server to close the port for this host now")
    p.add_argument(
        "--timeout", type=_seconds, default=None, metavar="S", help="seconds to wait for the port to open in all (10)"
    )
    p.add_argument(
        "--retries",
        type=_int_in(1, _MAX_RETRIES, "retries"),
        default=None,
        metavar="N",
        help="knocks to send at most while the port stays closed (3)",
    )
    p.add_argument(
        "--work-bits",
        type=_int_in(0, MAX_WORK_BITS, "work bits"),
        default=None,
        metavar="N",
        help=f"proof of work to attach; at least the server's minimum ({DEFAULT_WORK_BITS})",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print no status line (errors still go to stderr)")
    return p


def profile_for(target: str, config: Path | None) -> Profile:
    """The named server ``target`` (or the one whose host it is), else a server known by its host alone."""
    return find_profile(target, config, host=target) or Profile(name=target, file=None, host=target)


def with_options(profile: Profile, args: argparse.Namespace) -> Profile:
    """``profile`` with what the command line says instead (the command line overrides everything)."""
    changes: dict[str, Any] = {}
    if args.password_file is not None:  # replaces the file's password source, whichever it was
        changes.update(password_file=args.password_file, password=None, password_env=None, password_keyring=False)
    for option, attr in (
        ("pfx", "credentials"), ("client_cert", "client_cert"), ("server_cert", "server_cert"), ("family", "family"),
        ("source", "source"), ("knock_port", "knock_port"), ("timeout", "timeout"), ("retries", "retries"),
        ("work_bits", "work_bits"),
    ):
        value = getattr(args, option)
        if value is not None:
            changes[attr] = value
    if args.via is not None:
        changes["via"] = Carrier.parse(args.via)
        if changes["via"] is Carrier.ICMP and args.knock_port is None:
            changes["knock_port"] = None  # the named server's UDP knock port means nothing in a ping
    changed = profile._replace(**changes)
    if changed.via is Carrier.ICMP and changed.knock_port is not None:
        raise _Usage("--knock-port names a UDP port: it cannot be used with --via icmp")
    return changed


def _ports(profile: Profile, args: argparse.Namespace) -> tuple[tuple[Protocol, int], ...]:
    if args.port is not None:
        return ((Protocol.UDP if args.udp else profile.protocol, args.port),)
    ports = profile.default_ports()
    if not ports:
        named = f" (the named server {profile.name} in {profile.file} has no ports)" if profile.file else ""
        raise _Usage(f"the following arguments are required: -p/--port{named}")
    return tuple((Protocol.UDP, n) if args.udp else (proto, n) for proto, n in ports)


def _files(profile: Profile) -> tuple[str, Path]:
    """The credentials spec and the server certificate, checked to exist before a password is asked for."""
    if profile.credentials is None:
        raise CredentialError(
            f"no client credentials for {profile.name}: give --pfx FILE, or name a server of the client "
            f"configuration file ({default_files()[1]})"
        )
    if not is_pkcs11_uri(profile.credentials):
        _must_exist(Path(profile.credentials), "client PKCS#12", "--pfx")
    if profile.server_cert is None:
        raise CredentialError(f"no server certificate for {profile.name}: give --server-cert FILE")
    _must_exist(profile.server_cert, "server certificate", "--server-cert")
    return profile.credentials, profile.server_cert


def status_printer(quiet: bool) -> Callable[[str], None]:
    """Where the status line goes: stdout on a terminal, else stderr; nowhere when ``quiet``."""
    stream = sys.stdout if sys.stdout.isatty() else sys.stderr

    def say(line: str) -> None:
        if not quiet:
            print(line, file=stream, flush=True)

    return say


def _run(args: argparse.Namespace) -> int:
    say = status_printer(args.quiet)
    profile = with_options(profile_for(args.target, args.config), args)
    ports = _ports(profile, args)
    # Resolve first: a host that does not resolve is reported before any password is asked for, and
    # every knock and retry goes to the same address.
    try:
        family, address = resolve(profile.host, profile.family)
    except ResolveError as exc:
        if profile.file is not None:
            raise
        files = [args.config] if args.config is not None else default_files()
        raise ResolveError(f"{exc}; nor is it a named server of {' or '.join(map(str, files))}") from None
    where = profile.host if profile.host == str(address) else f"{profile.host} ({address})"
    # Missing files, and a CA's or a client's certificate given as the server's, are reported before a
    # password is asked for.
    _, server_cert = _files(profile)
    load_server_certificate(server_cert)
    client = KnockClient.for_profile(profile, interactive=sys.stdin.isatty())
    arguments = {**profile.knock_arguments(), "family": family}
    if args.close:
        for protocol, port in ports:
            client.close(str(address), port, protocol, knock_port=profile.knock_port,
                         source_address=profile.source, family=family, via=profile.via)
            say(f"asked {where} to close {protocol.label}/{port} for this host")
        return 0
    status = 0
    for protocol, port in ports:
        target = f"{protocol.label}/{port}"
        verify = not args.no_verify and protocol is Protocol.TCP
        opened = client.knock(str(address), port, protocol, verify=verify, duration=args.duration, **arguments)
        if not verify:
            why = "UDP cannot be confirmed" if protocol is Protocol.UDP and not args.no_verify else "not verified"
            say(f"knock for {target} sent to {where} ({why})")
        elif opened:
            say(f"{target} is open on {where}")
        else:
            say(f"{target} on {where} did not open within {profile.timeout:g} s ({profile.retries} knock(s) sent)")
            status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sknock-knock``; return the exit status (0 opened/sent, 1 not opened, 2 bad input).

    ``sknock-knock ssh-proxy ...`` runs :func:`sknock.sshproxy.main`.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["ssh-proxy"]:
        from ..sshproxy import main as ssh_proxy

        return ssh_proxy(arguments[1:])
    try:
        return _run(_parser().parse_args(arguments))
    except _Usage as exc:
        print(f"{PROG}: error: {exc} (see {PROG} --help)", file=sys.stderr)
    except SknockError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except ValueError as exc:  # a library argument check the parser did not anticipate
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
