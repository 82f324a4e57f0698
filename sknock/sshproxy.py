"""``sknock-knock ssh-proxy NAME HOST PORT``: an ssh ProxyCommand that knocks, then hands ssh the connection.

In ``~/.ssh/config``::

    Host gateway
        ProxyCommand sknock-knock ssh-proxy %n %h %p
        ProxyUseFdpass yes

The named server (:mod:`sknock.clientconfig`) is the one called ``NAME`` (ssh's ``%n``, the alias typed on
its command line), else the one called ``HOST`` (``%h``) or whose ``host`` it is: it gives the
credentials and the settings.  Where to connect is ssh's to say: ``HOST``, unless it is the alias
itself (no ``HostName`` in the ssh config) or the server's name, in which case the named server's
``host``.  That host is resolved once; the knock and the connection go to that one address, so they
share an address family.  The port is awaited by connecting with a short backoff (no fixed sleep)
within the named server's ``timeout``.

The connection is handed to ssh: with ``ProxyUseFdpass yes`` (ssh then gives the proxy a socket as
stdout), by passing the connected socket itself over it (SCM_RIGHTS with one byte, as OpenSSH receives
it), after which this process exits; otherwise by relaying stdin to the connection and the connection to
stdout until both ends are done.  ``--fdpass`` / ``--relay`` force one or the other.  Nothing but the
connection is ever written to stdout; an error is one line on stderr and a non-zero exit (1: the port
did not open; 2: anything else).  With ControlMaster/ControlPersist, ssh runs the ProxyCommand, and so
knocks, only when it makes a new connection.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import stat
import sys
from collections.abc import Sequence
from typing import NoReturn

from .client import KnockClient, resolve
from .clientconfig import Profile, default_files, find_profile
from .errors import ClientError, SknockError

PROG = "sknock-knock ssh-proxy"
_CHUNK = 1 << 16


class _Usage(Exception):
    """A command-line mistake, reported as one line."""


class _NotOpened(Exception):
    """The port did not open within the timeout (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Knock for tcp/PORT on a named server, connect, and give ssh the connection (ProxyCommand "
        "sknock-knock ssh-proxy %n %h %p).",
        epilog="Exit status: 0 connection handed over (or relayed to its end), 1 the port did not open, 2 anything "
        "else (one line on stderr).",
    )
    p.add_argument("name", metavar="NAME", help="ssh's %%n: the host alias typed (the named server's name)")
    p.add_argument("host", metavar="HOST", help="ssh's %%h: the host to connect to")
    p.add_argument("port", metavar="PORT", help="ssh's %%p: the port")
    p.add_argument("--config", metavar="FILE", help="read named servers from FILE only")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fdpass", dest="fdpass", action="store_const", const=True,
                      help="pass the socket to ssh (ProxyUseFdpass yes); default: when stdout is a socket")
    mode.add_argument("--relay", dest="fdpass", action="store_const", const=False,
                      help="relay stdin/stdout to the connection")
    return p


def choose(name: str, host: str, config: str | None) -> tuple[Profile, str]:
    """The named server for ssh's ``%n`` and ``%h``, and the host to knock and connect to.

    :raises ProfileError: no such server, or a bad configuration file.
    """
    profile = find_profile(name, config, host=host)
    if profile is None:
        files = [config] if config is not None else [str(f) for f in default_files()]
        looked = repr(name) if name == host else f"{name!r} or {host!r}"
        raise ClientError(f"no server named {looked} in {' or '.join(files)}")
    # ssh's HOST is the alias itself (no HostName) or a server's name: where to go is the server's host.
    return profile, profile.host if host in (name, profile.name) else host


def connect(profile: Profile, host: str, port: int) -> socket.socket:
    """Resolve ``host`` once, knock for tcp/``port`` and connect to that same address.

    :raises _NotOpened: it did not open within the profile's timeout.
    :raises SknockError: what :meth:`KnockClient.connect` raises before that.
    """
    family, address = resolve(host, profile.family)
    client = KnockClient.for_profile(profile)  # stdin is ssh's: no prompt, the file says where the password is
    arguments = {**profile.knock_arguments(), "family": family}
    connection = client.connect(str(address), port, **arguments)
    if connection is None:
        raise _NotOpened(f"tcp/{port} on {host} ({address}) did not open within {profile.timeout:g} s")
    return connection


def stdout_is_socket() -> bool:
    """What ssh gives a ProxyCommand's stdout with ``ProxyUseFdpass yes``: a Unix socket (else a pipe)."""
    try:
        return stat.S_ISSOCK(os.fstat(1).st_mode)
    except OSError:
        return False


def pass_fd(connection: socket.socket) -> None:
    """Send ``connection`` to ssh over stdout: one byte with the descriptor (SCM_RIGHTS)."""
    with socket.socket(fileno=os.dup(1)) as channel:
        socket.send_fds(channel, [b"\0"], [connection.fileno()])


def relay(connection: socket.socket) -> None:
    """Copy stdin to ``connection`` and ``connection`` to stdout until the connection's end; stdin's end
    is passed on as a half-close."""
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(connection, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj == 0:
                    data = os.read(0, _CHUNK)
                    if data:
                        connection.sendall(data)
                    else:
                        selector.unregister(0)
                        with contextlib.suppress(OSError):
                            connection.shutdown(socket.SHUT_WR)
                    continue
                data = connection.recv(_CHUNK)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]
    finally:
        selector.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sknock-knock ssh-proxy``; return the exit status (0 handed over, 1 not opened, 2 else)."""
    try:
        args = _parser().parse_args(argv)
        if not args.port.isdigit() or not 1 <= int(args.port) <= 65535:
            raise _Usage(f"PORT must be 1..65535, not {args.port!r}")
        profile, host = choose(args.name, args.host, args.config)
        connection = connect(profile, host, int(args.port))
        with connection:
            if stdout_is_socket() if args.fdpass is None else args.fdpass:
                pass_fd(connection)
            else:
                relay(connection)
        return 0
    except _Usage as exc:
        _error(f"{exc} (see {PROG} --help)")
    except _NotOpened as exc:
        _error(str(exc))
        return 1
    except (SknockError, ValueError) as exc:
        _error(str(exc))
    except OSError as exc:
        _error(f"{exc.filename or 'connection'}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    return 2


def _error(line: str) -> None:
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
