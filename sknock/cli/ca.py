"""``sknock-ca``: the PKI admin's tool, a thin argparse layer over :mod:`sknock.ca`.

Passwords never appear on the command line (they would show in ``ps`` and shell history): the
CA password comes from ``--password-file``, ``$SKNOCK_PFX_PASSWORD`` or a prompt; the password
protecting a newly issued PKCS#12 from ``--pfx-password-file``, ``$SKNOCK_NEW_PFX_PASSWORD`` or a
prompt.  A new .pfx never shares the CA's password: one equal to it is refused, and with none given
(and no terminal to ask on) a random one is made and written, mode 0600, beside the .pfx as
``NAME.pfx.pass``, so that handing someone a .pfx and its password never hands them the CA.
A new intermediate CA's key gets its own password (``--new-ca-password-file``,
``$SKNOCK_NEW_CA_PASSWORD`` or a prompt), never its parent's: whoever runs the intermediate does not
learn the root's.  ``client NAME --csr FILE`` issues for a key made elsewhere (on a token): no key, no
.pfx, no password but the CA's.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hmac
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from cryptography import x509

from .. import ca as ca_lib
from ..credentials import load_certificate_request, resolve_password
from ..errors import CAError, CredentialError, SknockError
from ..ports import PortSet, parse_ports

PROG = "sknock-ca"
NEW_PFX_ENV = "SKNOCK_NEW_PFX_PASSWORD"
_Issuer = Callable[[bytes], None]
NEW_CA_ENV = "SKNOCK_NEW_CA_PASSWORD"


class _Usage(Exception):
    """A command-line mistake, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _interactive() -> bool:
    return sys.stdin.isatty()


def _ca_password(args: argparse.Namespace, *, confirm: bool = False) -> bytes:
    cached = getattr(args, "_ca_password", None)
    if isinstance(cached, bytes):  # asked once per run: _pfx_password compares against it
        return cached
    password = resolve_password(
        getattr(args, "password_file", None),
        prompt="CA password: ",
        interactive=_interactive(),
    )
    if confirm and getattr(args, "password_file", None) is None and _interactive() and not _from_env():
        again = getpass.getpass("CA password again: ").encode("utf-8")
        if again != password:
            raise CredentialError("the two passwords differ")
    args._ca_password = password
    return password


def _from_env() -> bool:
    return bool(os.environ.get("SKNOCK_PFX_PASSWORD"))


def _pfx_password(args: argparse.Namespace, name: str) -> bytes | None:
    """The password given for the new ``NAME.pfx`` (file, environment, or a prompt on a terminal), or None
    when none is: then the caller makes a random one (:func:`_issue`).  Refused when it is the CA's."""
    path = getattr(args, "pfx_password_file", None)
    if path is None and not os.environ.get(NEW_PFX_ENV):
        if not _interactive():
            return None
        first = getpass.getpass(f"Password for {name}.pfx: ").encode("utf-8")
        if first != getpass.getpass(f"Password for {name}.pfx again: ").encode("utf-8"):
            raise CredentialError("the two passwords differ")
        if not first:
            raise CredentialError("empty password entered")
        password = first
    else:
        password = resolve_password(path, env_var=NEW_PFX_ENV, interactive=False)
    if hmac.compare_digest(password, _ca_password(args)):
        raise CredentialError(
            f"the password given for {name}.pfx is the CA's: a .pfx never shares the CA's secret; give it its own "
            f"(--pfx-password-file or ${NEW_PFX_ENV}), or none for a random one"
        )
    return password


def _new_password_file(path: Path) -> bytes:
    """A random password for a new .pfx, written to ``path`` (mode 0600, created: never replacing a file)."""
    password = secrets.token_urlsafe(24).encode("ascii")  # 192 bits, no character a shell or a file mangles
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise CredentialError(f"{path} already exists: it is another .pfx's password; nothing was issued") from None
    try:
        os.write(fd, password + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return password


def _issue(args: argparse.Namespace, authority: ca_lib.CertificateAuthority, kind: str, issue: _Issuer) -> Path:
    """Run ``issue(password)`` for ``DIR/KIND/NAME.pfx`` with the password given for it, or with a new random
    one written beside it as ``NAME.pfx.pass`` (removed again if issuing fails).  Returns the .pfx path."""
    name: str = args.name
    authority._ensure_new(name)  # a bad or taken name is refused before any password is asked for or made
    pfx = authority.directory / kind / f"{name}.pfx"
    pass_file = pfx.with_name(pfx.name + ".pass")
    for existing in (pfx, pass_file):
        if existing.exists():
            raise CAError(f"{existing} already exists: a {kind} named {name!r} was issued before; "
                                 "give this one a name of its own")
    password = _pfx_password(args, name)
    if password is not None:
        issue(password)
        return pfx
    password = _new_password_file(pass_file)
    try:
        issue(password)
    except BaseException:
        with contextlib.suppress(OSError):
            pass_file.unlink()
        raise
    print(f"{PROG}: {pfx.name} is protected by a new random password, written to {pass_file} (mode 0600): "
          "hand it over with the .pfx, by another channel if you can", file=sys.stderr)
    return pfx


def _new_ca_password(args: argparse.Namespace, name: str, parent: bytes) -> bytes:
    """The password of a new intermediate CA's key: its own, never its parent's."""
    path = getattr(args, "new_ca_password_file", None)
    if path is None and not os.environ.get(NEW_CA_ENV):
        if not _interactive():
            raise CredentialError(
                f"the intermediate CA {name} needs its own password: give --new-ca-password-file FILE or "
                f"set ${NEW_CA_ENV}"
            )
        first = getpass.getpass(f"Password for the intermediate CA {name}: ").encode("utf-8")
        if first != getpass.getpass(f"Password for the intermediate CA {name} again: ").encode("utf-8"):
            raise CredentialError("the two passwords differ")
        password = first
    else:
        password = resolve_password(path, env_var=NEW_CA_ENV, interactive=False)
    if not password:
        raise CredentialError("empty password entered")
    if password == parent:
        raise CredentialError(
            f"the intermediate CA {name} needs a password of its own, not its parent's (whoever runs the "
            "intermediate would know the parent's)"
        )
    return password


def _directory(args: argparse.Namespace) -> Path:
    d = getattr(args, "dir", None)
    if not d:
        raise _Usage("--dir DIR is required (the CA directory)")
    return Path(d)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _cmd_init(args: argparse.Namespace) -> int:
    directory = _directory(args)
    authority = ca_lib.init_ca(directory, _ca_password(args, confirm=True), name=args.name, days=args.days)
    print(f"created CA {authority.certificate.subject.rfc4514_string()} in {directory}")
    print(f"  certificate: {directory / 'ca.cer'} (DER), {directory / 'ca.pem'}")
    print(f"  CRL:         {directory / 'crl.der'}")
    return 0


def _open(args: argparse.Namespace) -> ca_lib.CertificateAuthority:
    directory = ca_lib.require_ca(_directory(args))
    return ca_lib.open_ca(directory, _ca_password(args))


def _cmd_server(args: argparse.Namespace) -> int:
    authority = _open(args)
    issued: list[x509.Certificate] = []

    def issue(password: bytes) -> None:
        issued.append(authority.issue_server(
            args.name, password, ips=args.ip, dns=args.dns, days=args.days, key_type=args.key_type
        ))

    pfx = _issue(args, authority, "server", issue)
    cer = pfx.with_suffix(".cer")
    print(f"issued server {args.name} (serial {issued[0].serial_number:x})")
    print(f"  {pfx}, {cer}")
    print(f"next: copy {pfx.name} to the server {args.name} alone and name it in serverPFXFile (its password in "
          f"PFXPasswdFile); give {cer.name} to its clients; another server gets its own certificate: "
          f"sknock-ca --dir {authority.directory} server OTHER-NAME")
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    ports = parse_ports(args.allow)
    if args.csr is not None:
        return _cmd_client_csr(args, ports)
    authority = _open(args)
    issued: list[x509.Certificate] = []

    def issue(password: bytes) -> None:
        issued.append(authority.issue_client(
            args.name, ports, password, days=args.days, key_type=args.key_type or "ec-p256"
        ))

    pfx = _issue(args, authority, "client", issue)
    print(f"issued client {args.name} for {ports} (serial {issued[0].serial_number:x})")
    print(f"  {pfx}")
    return 0


def _cmd_client_csr(args: argparse.Namespace, ports: PortSet) -> int:
    """``client NAME --csr FILE``: a certificate for a key made elsewhere (a token's); no .pfx, no password."""
    if args.key_type is not None:
        raise _Usage("--key-type makes a new key; with --csr the key is the request's")
    request = load_certificate_request(args.csr)  # a bad file is reported before the CA password is asked for
    authority = _open(args)
    cert = authority.issue_client_for_request(args.name, ports, request, days=args.days)
    cer = authority.directory / "client" / f"{args.name}.cer"
    print(f"issued client {args.name} for {ports} (serial {cert.serial_number:x}) for the key of {args.csr}")
    print(f"  {cer} (DER), {cer.with_suffix('.pem')}")
    print(f"next: put {cer.name} on the token beside the key (same id), or give it to sknock-knock with the "
          "pkcs11: URI (docs/client.md, Keys on a token)")
    return 0


def _cmd_intermediate(args: argparse.Namespace) -> int:
    directory = ca_lib.require_ca(_directory(args))
    parent_password = _ca_password(args)
    authority = ca_lib.open_ca(directory, parent_password)
    authority.ensure_new(args.name)  # before asking for another password
    sub = authority.issue_intermediate(
        args.name, _new_ca_password(args, args.name, parent_password), days=args.days, out=args.out
    )
    d = sub.directory
    print(f"created intermediate CA {args.name} (serial {sub.certificate.serial_number:x}, until "
          f"{sub.certificate.not_valid_after_utc:%Y-%m-%d}) in {d}, under "
          f"{authority.certificate.subject.rfc4514_string()}")
    print(f"  certificate: {d / 'ca.cer'}, {d / 'ca.pem'}; the CAs above it: {d / 'ca-chain.pem'}")
    print(f"  its CRL:     {d / 'crl.der'}; servers need it and this CA's, {authority.directory / 'crl.der'}")
    print(f"  issue with:  {PROG} --dir {d} client|server NAME ...   (its own password)")
    print(f"  revoke it:   {PROG} --dir {authority.directory} revoke {args.name}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    authority = _open(args)
    crl = authority.revoke(args.name, crl_days=args.crl_days)
    print(f"revoked {args.name}; CRL now lists {len(crl)} certificate(s): {authority.directory / 'crl.der'}")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    authority = _open(args)
    crl = authority.write_crl(days=args.days)
    print(f"CRL with {len(crl)} revoked certificate(s), next update {crl.next_update_utc:%Y-%m-%d %H:%M} UTC")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    entries = ca_lib.read_index(ca_lib.require_ca(_directory(args)))
    rows = [("NAME", "KIND", "SERIAL", "EXPIRES", "STATUS", "PORTS")]
    for e in entries:
        status = f"revoked {e.revoked_at:%Y-%m-%d}" if e.revoked_at else "valid"
        rows.append((e.name, e.kind, f"{e.serial:x}", f"{e.not_after:%Y-%m-%d}", status, e.ports or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if not entries:
        print("(no certificates issued yet)")
    return 0


def _parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the subcommand (SUPPRESS keeps the later one
    # from overwriting the earlier with a default).
    common = _Parser(add_help=False)
    common.add_argument("--dir", default=argparse.SUPPRESS, help="the CA directory")
    common.add_argument("--password-file", default=argparse.SUPPRESS, help="file whose first line is the CA password")
    common.add_argument(
        "--pfx-password-file",
        default=argparse.SUPPRESS,
        help=f"file whose first line protects a newly issued .pfx (else ${NEW_PFX_ENV}, a prompt on a terminal, "
        "or a random one written to NAME.pfx.pass)",
    )
    parser = _Parser(prog=PROG, description="Run the sknock certificate authority.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("init", parents=[common], help="create a new CA")
    p.add_argument("--name", default="sknock CA", help="the CA's common name")
    p.add_argument("--days", type=_positive, default=3650)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("server", parents=[common], help="issue a server certificate")
    p.add_argument("name")
    p.add_argument("--ip", action="append", default=[], help="server address for subjectAltName (repeatable)")
    p.add_argument("--dns", action="append", default=[], help="server DNS name for subjectAltName (repeatable)")
    p.add_argument("--days", type=_positive, default=825)
    p.add_argument("--key-type", choices=ca_lib.SERVER_KEY_TYPES, default="ec-p256")
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("client", parents=[common], help="issue a client certificate")
    p.add_argument("name")
    p.add_argument("--allow", required=True, help="ports the client may open, e.g. tcp/22,udp/8000-8010")
    p.add_argument("--days", type=_positive, default=365)
    p.add_argument("--key-type", choices=ca_lib.KEY_TYPES, default=None, help="the new key's type (ec-p256)")
    p.add_argument("--csr", type=Path, default=None, metavar="FILE",
                   help="issue for the key of this certificate request (PEM or DER; e.g. made on a token) "
                        "instead of making a key and a .pfx: writes client/NAME.cer and NAME.pem")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("intermediate", parents=[common], help="create an intermediate CA under this one")
    p.add_argument("name")
    p.add_argument("--days", type=_positive, default=1825)
    p.add_argument("--out", type=Path, default=None,
                   help="the new CA's directory (default: DIR/intermediate/NAME); use it as --dir afterwards")
    p.add_argument("--new-ca-password-file", default=None,
                   help=f"file whose first line protects the new CA's key (else ${NEW_CA_ENV} or a prompt); "
                        "never the parent's password")
    p.set_defaults(func=_cmd_intermediate)

    p = sub.add_parser("revoke", parents=[common], help="revoke a certificate and publish a new CRL")
    p.add_argument("name")
    p.add_argument("--crl-days", type=_positive, default=30)
    p.set_defaults(func=_cmd_revoke)

    p = sub.add_parser("crl", parents=[common], help="publish a fresh CRL")
    p.add_argument("--days", type=_positive, default=30, help="days until nextUpdate")
    p.set_defaults(func=_cmd_crl)

    p = sub.add_parser("list", parents=[common], help="show what this CA issued")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sknock-ca``; return the exit status (0, or 2 on any error)."""
    try:
        args = _parser().parse_args(argv)
        result: int = args.func(args)
        return result
    except _Usage as exc:
        print(f"{PROG}: error: {exc} (see {PROG} --help)", file=sys.stderr)
    except SknockError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
