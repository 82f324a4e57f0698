"""``sknock-knock``: knock on a server's door from the command line (also ``python -m sknock.cli.knock``).

    sknock-knock -p 22 server.example              # open tcp/22, confirm by connecting
    sknock-knock -u -p 8000 server.example         # open udp/8000 (cannot be confirmed: sent = success)
    sknock-knock --close -p 22 server.example      # close tcp/22 for this host now
    sknock-knock --via icmp -p 22 server.example   # the knock in a ping (echo request), not UDP

Exit status: 0 the port opened (or, with ``-u``, ``--no-verify`` or ``--close``, the knock was sent);
1 it did not open within the timeout; 2 bad input (usage, files, password, a server certificate that is
not a server's, a port the certificate does not name, a host that does not resolve, a knock that cannot be
sent), reported as one line on stderr.
The PKCS#12 password never comes from the command line: ``--password-file``, ``$SKNOCK_PFX_PASSWORD``,
or a prompt when stdin is a terminal.  ``--pfx`` also takes a ``pkcs11:`` URI (a key on a token,
:mod:`sknock.token`); its PIN comes from the URI's pin-source, ``--password-file``, ``$SKNOCK_TOKEN_PIN``
or a prompt.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ..carrier import Carrier
from ..client import DEFAULT_WORK_BITS, KnockClient, load_server_certificate, resolve
from ..credentials import load_client_credentials, resolve_password
from ..errors import CredentialError, SknockError
from ..ports import Protocol
from ..protocol.request import MAX_DURATION
from ..protocol.wire import MAX_WORK_BITS
from ..token import PIN_ENV, is_pkcs11_uri

PROG = "sknock-knock"
PASSWORD_ENV = "SKNOCK_PFX_PASSWORD"  # noqa: S105 -- the variable's name, not a password
_REPO_ROOT = Path(__file__).resolve().parents[2]
_DEVPKI = Path("certificates") / "devpki"
DEFAULT_PFX = _DEVPKI / "client" / "client.pfx"
DEFAULT_SERVER_CERT = _DEVPKI / "server" / "server.cer"
_MAX_RETRIES = 100


class _Usage(Exception):
    """A command-line mistake, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def default_path(relative: Path) -> Path:
    """``relative`` inside the repository checkout this module runs from, when it exists there;
    else relative to the current directory (an installed package has no certificates beside it)."""
    in_repo = _REPO_ROOT / relative
    return in_repo if in_repo.exists() else relative


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
    p = _Parser(
        prog=PROG,
        description="Send one sknock knock (a signed, encrypted datagram, over UDP or ICMP) asking HOST to open "
        "a port for you.",
        epilog="Exit status: 0 opened (or sent, with -u, --no-verify or --close), 1 did not open, 2 bad input. "
        f"Password: --password-file, else ${PASSWORD_ENV}, else a prompt on a terminal.",
    )
    p.add_argument("host", metavar="HOST", help="the knock server: a name or an IPv4/IPv6 address")
    p.add_argument(
        "-p", "--port", required=True, metavar="PORT", type=_int_in(1, 65535, "port"), help="the port to open"
    )
    p.add_argument("-u", "--udp", action="store_true", help="open a UDP port (default TCP)")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=4, help="use IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const=6, help="use IPv6 only")
    p.add_argument(
        "--pfx", metavar="FILE|URI", help=f"client PKCS#12, or a pkcs11: URI of a key on a token ({DEFAULT_PFX})"
    )
    p.add_argument("--client-cert", type=Path, metavar="FILE", help="with a pkcs11: URI: the client certificate "
                   "(default: the one on the token with the key's id)")
    p.add_argument(
        "--server-cert", type=Path, metavar="FILE", help=f"server certificate, DER or PEM ({DEFAULT_SERVER_CERT})"
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
        default=Carrier.UDP.value,
        help="what carries the knock: udp (default) or icmp, an echo request (for networks that let only ping "
        "out; the server needs knockCarriers = udp, icmp)",
    )
    p.add_argument(
        "--source",
        type=_source,
        default="any",
        metavar="auto|any|ADDR",
        help="bind the knock to a source address: any (default; works behind NAT), auto (this host's "
        "address towards HOST) or an address",
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
        "--timeout", type=_seconds, default=10.0, metavar="S", help="seconds to wait for the port to open in all (10)"
    )
    p.add_argument(
        "--retries",
        type=_int_in(1, _MAX_RETRIES, "retries"),
        default=3,
        metavar="N",
        help="knocks to send at most while the port stays closed (3)",
    )
    p.add_argument(
        "--work-bits",
        type=_int_in(0, MAX_WORK_BITS, "work bits"),
        default=DEFAULT_WORK_BITS,
        metavar="N",
        help=f"proof of work to attach; at least the server's minimum ({DEFAULT_WORK_BITS})",
    )
    return p


def _run(args: argparse.Namespace) -> int:
    protocol = Protocol.UDP if args.udp else Protocol.TCP
    if args.via == Carrier.ICMP and args.knock_port is not None:
        raise _Usage("--knock-port names a UDP port: it cannot be used with --via icmp")
    target = f"{protocol.label}/{args.port}"
    pfx: str = args.pfx if args.pfx is not None else str(default_path(DEFAULT_PFX))
    token = is_pkcs11_uri(pfx)
    server_cert: Path = args.server_cert if args.server_cert is not None else default_path(DEFAULT_SERVER_CERT)
    # Resolve first: a host that does not resolve is reported before any password is asked for, and
    # every retry goes to the same address.
    family, address = resolve(args.host, args.family)
    where = args.host if args.host == str(address) else f"{args.host} ({address})"
    # Missing files are reported before a password is asked for.
    if not token:
        _must_exist(Path(pfx), "client PKCS#12", "--pfx")
    _must_exist(server_cert, "server certificate", "--server-cert")
    # A CA's or a client's certificate given as the server's is reported before a password is asked for.
    load_server_certificate(server_cert)

    def secret(prompt: str) -> bytes:  # asked only when needed: a token's URI may carry its PIN source
        env_var = PIN_ENV if token else PASSWORD_ENV
        return resolve_password(args.password_file, env_var=env_var, prompt=prompt, interactive=sys.stdin.isatty())

    credentials = load_client_credentials(pfx, secret, certificate=args.client_cert)
    client = KnockClient(credentials=credentials, server_cert=server_cert, work_bits=args.work_bits)
    if args.close:
        client.close(
            str(address), args.port, protocol, knock_port=args.knock_port, source_address=args.source, family=family,
            via=args.via,
        )
        print(f"asked {where} to close {target} for this host")
        return 0
    verify = not args.no_verify and protocol is Protocol.TCP
    opened = client.knock(
        str(address), args.port, protocol, verify=verify, timeout=args.timeout, retries=args.retries,
        duration=args.duration, knock_port=args.knock_port, source_address=args.source, family=family,
        via=args.via,
    )
    if not verify:
        why = "UDP cannot be confirmed" if protocol is Protocol.UDP and not args.no_verify else "not verified"
        print(f"knock for {target} sent to {where} ({why})")
        return 0
    if opened:
        print(f"{target} is open on {where}")
        return 0
    print(f"{target} on {where} did not open within {args.timeout:g} s ({args.retries} knock(s) sent)")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sknock-knock``; return the exit status (0 opened/sent, 1 not opened, 2 bad input)."""
    try:
        return _run(_parser().parse_args(argv))
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
