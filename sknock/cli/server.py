"""``sknock-server``: run the knock server, install it as a service, check its configuration, or act on
the running server.

    sknock-server [-c CONFIG] [run]                run the server (as root; the default)
    sknock-server [-c CONFIG] --check-config       validate and exit (0 good, 2 bad)
    sknock-server [-c CONFIG] status               the grants open now (root: the control socket is 0600)
    sknock-server [-c CONFIG] close --client SUBJECT | --serial N | --address ADDR
                                                   close those open grants now (root)
    sknock-server [-c CONFIG] teardown             remove sknock's firewall policy (the server must be stopped)
    sknock-server [-c CONFIG] boot-ruleset         print sknock's policy as nft text, for the host's ruleset at boot
    sknock-server install-service [--root DIR]     /etc/sknock, the workers' user, the systemd unit (as root)

Stopping the server (SIGTERM, Ctrl-C, a crash) leaves its firewall policy in place, so the protected
ports stay closed; ``teardown`` is the one way to remove it.

``--check-config`` checks everything a start checks, and what a running server would only report and
live with (:mod:`sknock.server.preflight`): one line and exit 2 for the first problem found.  Installed
without its ``server`` extra, the command says in one line what to install.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ..errors import SknockError

#: The configuration ``install-service`` writes, and the one used when ``-c`` is not given (if it exists).
SYSTEM_CONFIG = Path("/etc/sknock/config.ini")

_COMMANDS = {
    "run": "run the server (the default): as root; it logs to stderr, the journal or logFile, and stops on "
           "SIGTERM leaving its firewall policy in place; SIGHUP refreshes the CRL and reopens logFile",
    "status": "print the backend, the CRLs and the grants open now (asks the running server; root)",
    "close": "close the open grants of one client or address now: --client, --serial or --address (root); a "
             "revoked client's grants close by themselves at the CRL refresh",
    "teardown": "remove sknock's firewall policy, which a stop leaves in place (refused while the server runs)",
    "boot-ruleset": "print the policy as nft text to include in /etc/nftables.conf, so the ports are closed "
                    "from boot, before the server starts",
    "install-service": "as root: write a commented /etc/sknock/config.ini (never overwriting one), make the "
                       "unprivileged system user it names, install the systemd unit sknock-server.service "
                       "and enable it (see docs/service.md)",
}


def _parser() -> argparse.ArgumentParser:
    commands = "\n".join(
        textwrap.fill(text, 100, initial_indent=f"  {name:<17}", subsequent_indent=" " * 19, break_on_hyphens=False)
        for name, text in _COMMANDS.items()
    )
    p = argparse.ArgumentParser(
        prog="sknock-server",
        description="sknock knock server: certificate-authenticated single-packet authorization.",
        epilog=f"commands:\n{commands}\n",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "-c", "--config", default=None,
        help=f"configuration file (default: {SYSTEM_CONFIG} when it exists, else ./config.ini)",
    )
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("command", nargs="?", choices=list(_COMMANDS), default="run", metavar="COMMAND",
                   help="one of: " + ", ".join(_COMMANDS) + " (below)")
    which = p.add_argument_group("close: which grants (exactly one)")
    which.add_argument("--client", help="a client certificate's subject as status shows it, or its CN")
    which.add_argument("--serial", help="a client certificate's serial number (decimal, or hex with 0x)")
    which.add_argument("--address", help="a source address")
    install = p.add_argument_group("install-service")
    install.add_argument("--root", type=Path, default=Path("/"),
                         help="install into this tree instead of / (an image, a package, a test)")
    install.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"),
                         help="where the unit goes, under --root (default: /etc/systemd/system)")
    install.add_argument("--exec", dest="executable", type=Path, default=None,
                         help="the sknock-server the unit runs (default: this one, by its absolute path)")
    return p


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's list of commands as written."""


def _config_path(given: str | None) -> Path:
    if given:
        return Path(given)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else Path("config.ini")


def status(config_path: Path) -> int:
    """``sknock-server status``: print the backend, the CRLs and the open grants of the running server.  Exit
    0, or 2 when the configuration or the server cannot be read."""
    from ..server.config import load_config
    from ..server.control import query_status

    try:
        config = load_config(config_path, check_files=False)
        answer = query_status(config.control_socket)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    grants = answer.get("grants", [])
    assert isinstance(grants, list)
    print(f"backend {answer.get('backend')}, {len(grants)} open grant(s), revocation {answer.get('revocation')}")
    crls = answer.get("crls", [])
    for c in crls if isinstance(crls, list) else []:
        if c.get("issuer") is None:
            print(f"CRL from {c['source']}: none yet (clients under its CA are refused)")
        else:
            stale = "  STALE: past its next update" if c.get("stale") else ""
            print(f"CRL of {c['issuer']}: issued {c['issued']}, next update {c['next_update']}, "
                  f"{c['revoked']} revoked, from {c['source']}{stale}")
    store = answer.get("replay_store")
    if isinstance(store, dict) and store.get("shared"):
        if store.get("state") == "ok":
            health = "ok"
        else:
            what = "refusing knocks" if store.get("fallback") == "refuse" else "checking knocks on this server alone"
            health = f"DOWN for {store.get('down_for')} s, {what}: {store.get('last_error')}"
        print(f"replay store {store.get('store')}: {health} ({store.get('claimed')} claimed, {store.get('replays')} "
              f"replays refused, {store.get('refused_unconfirmed')} refused and {store.get('granted_unconfirmed')} "
              f"granted unconfirmed, {store.get('outages')} outage(s))")
    elif isinstance(store, dict):
        print("replay store local (this server's own memory)")
    if grants:
        print(f"{'ADDRESS':<40} {'PORT':<10} {'EXPIRES IN':>10}  CLIENT")
        for g in grants:
            port = f"{g['protocol']}/{g['port']}"
            overdue = f"  OVERDUE: close failed {g['close_failures']} time(s), retrying" if g.get("overdue") else ""
            serial = f"  serial {g['serial']:#x}" if isinstance(g.get("serial"), int) else ""
            print(f"{g['address']:<40} {port:<10} {g['expires_in']:>9.1f}s  {g['client']}{serial}{overdue}")
    return 0


def close(config_path: Path, args: argparse.Namespace) -> int:
    """``sknock-server close``: ask the running server to close the grants of one client, serial or address
    now.  Exit 0; 1 when some could not be closed (the server retries them); 2 on a usage or connection
    error."""
    from ..server.config import load_config
    from ..server.control import query

    given = {k: getattr(args, k) for k in ("client", "serial", "address") if getattr(args, k) is not None}
    if len(given) != 1:
        print("sknock-server: close takes exactly one of --client, --serial, --address", file=sys.stderr)
        return 2
    if "serial" in given:
        try:
            given["serial"] = int(given["serial"], 0)
        except ValueError:
            print(f"sknock-server: close --serial: {given['serial']!r} is not a number", file=sys.stderr)
            return 2
    try:
        config = load_config(config_path, check_files=False)
        answer = query(config.control_socket, "close", given)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    closed = answer.get("closed", [])
    failed = answer.get("failed", [])
    assert isinstance(closed, list) and isinstance(failed, list)
    print(f"closed {len(closed)} grant(s)" + "".join(f"\n  {c}" for c in closed))
    for item in failed:
        print(f"could not close {item} now: it stays listed and is retried (see the server's log)")
    return 1 if failed else 0


def boot_ruleset(config_path: Path) -> int:
    """``sknock-server boot-ruleset``: print the file the host's firewall should load at boot so sknock's
    policy holds before the server starts.  Exit 2 when the backend has none."""
    from ..server.config import load_config
    from ..server.daemon import make_server_firewall

    try:
        firewall = make_server_firewall(load_config(config_path, check_files=False))
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    text = firewall.boot_ruleset()
    if text is None:
        print(f"sknock-server: firewallBackend {firewall.name} has no nft ruleset to include at boot; "
              "see docs/firewall.md", file=sys.stderr)
        return 2
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def check_config(config_path: Path) -> int:
    """``--check-config``: load and check everything a start would, plus :func:`check_deployment`; change
    nothing.  Exit 0 with ``configuration OK``, or 2 with one line naming the file and the reason."""
    from ..server.daemon import load, replay_store_summary, revocation_summary
    from ..server.preflight import check_deployment

    try:
        server = load(config_path)
        check_deployment(server)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    config = server.config
    for notice in config.notices:
        logging.getLogger("sknock.server").warning("%s", notice)
    try:
        store = replay_store_summary(config)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    print(f"sknock-server: {config.source}: configuration OK (firewall backend {server.firewall.name}; "
          f"{revocation_summary(server)}; {store})")
    return 0


def _missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """The one line for a module of the server's dependencies that is not installed (``pip install sknock``
    without the ``server`` extra), or None when the missing module is sknock's own (a broken install)."""
    name = (exc.name or "").partition(".")[0]
    if not name or name == "sknock":
        return None
    return (f"sknock-server: the server's Python dependencies are not installed (no module named {name!r}): "
            "pip install 'sknock[server]'")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sknock-server``: parse ``argv`` and run the command; returns the exit code."""
    try:
        from ..server.logs import journal_stderr

        journal_stderr()  # under systemd: the lines printed on a failure reach the journal as errors
    except ModuleNotFoundError:
        pass  # without the server's dependencies: _missing_dependency says so below
    args = _parser().parse_args(argv)
    path = _config_path(args.config)
    try:
        return _command(args, path)
    except ModuleNotFoundError as exc:
        message = _missing_dependency(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def install(args: argparse.Namespace) -> int:
    """``sknock-server install-service``: see :mod:`sknock.server.service`.  Exit 0 (each step said in one
    line), or 2 with one line naming what could not be done."""
    from ..server.service import install_service

    if args.root == Path("/") and os.geteuid() != 0:
        print("sknock-server: install-service must run as root (or give --root DIR)", file=sys.stderr)
        return 2
    try:
        done = install_service(args.root, executable=args.executable, unit_dir=args.unit_dir)
    except (SknockError, OSError) as exc:
        print(f"sknock-server: install-service: {exc}", file=sys.stderr)
        return 2
    for step in done.steps:
        print(f"sknock-server: {step}")
    return 0


def _command(args: argparse.Namespace, path: Path) -> int:
    if args.command == "install-service":
        return install(args)
    if args.command == "status":
        return status(path)
    if args.command == "close":
        return close(path, args)
    if args.command == "boot-ruleset":
        return boot_ruleset(path)
    if args.command == "teardown":
        from ..server.daemon import teardown

        return teardown(path)
    if args.check_config:
        return check_config(path)
    from ..server.daemon import run

    try:
        return run(path)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
