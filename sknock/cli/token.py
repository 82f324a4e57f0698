"""``sknock-token``: helpers for a client key on a PKCS#11 token (also ``python -m sknock.cli.token``).

    sknock-token csr 'pkcs11:token=...;id=%01?module-path=...' --name alice --out alice.csr

``csr`` writes a certificate request (PEM) for the key the URI names, signed on the token, for
``sknock-ca client NAME --csr FILE``: the private key never leaves the token.  The PIN: the URI's
pin-source or pin-value, ``--pin-file``, ``$SKNOCK_TOKEN_PIN`` or a prompt when stdin is a terminal.
Exit status 0, or 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ..credentials import resolve_password
from ..errors import SknockError
from ..token import PIN_ENV, open_token_key, token_csr

PROG = "sknock-token"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="PKCS#11 token helpers for sknock clients.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("csr", help="write a certificate request (PEM) for the key the URI names, signed on the token")
    p.add_argument("uri", help="pkcs11: URI of the private key (RFC 7512)")
    p.add_argument("--name", required=True, help="the request's common name (sknock-ca names the certificate NAME)")
    p.add_argument("--out", type=Path, required=True, help="where to write the request (PEM)")
    p.add_argument("--pin-file", type=Path, default=None, help="file whose first line is the token's PIN")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sknock-token``; return the exit status (0, or 2 on any error)."""
    args = _parser().parse_args(argv)

    def ask(prompt: str) -> bytes:
        return resolve_password(args.pin_file, env_var=PIN_ENV, prompt=prompt, interactive=sys.stdin.isatty())

    try:
        found = open_token_key(args.uri, ask)
        try:
            csr = token_csr(found.signer, args.name)
        finally:
            found.signer.close()
        args.out.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    except SknockError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"wrote a certificate request for {found.signer.uri.describe()} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
