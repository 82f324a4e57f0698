"""Test-only entry point: the real knock server, except that its first worker behaves as if a packet had
taken it over.  ``python tests/compromised_worker_server.py MARKER -c CONFIG``.

The first worker started (the one that creates MARKER, as root, before it drops its privileges) tries to
run a program where it would send its first grant to the monitor -- after the drop and the seccomp filter,
as injected code would.  Every later worker is the real one.  Nothing of this is in sknock: the change is
made here, to the modules' functions, in a process only a root test starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sknock.cli.server import main  # noqa: E402
from sknock.server import daemon, worker  # noqa: E402

MARKER = Path(sys.argv.pop(1))
_real_run_worker = daemon._run_worker
_real_send = worker.Worker.send
_state = {"compromised": False}


def _run_worker(*args: Any) -> None:
    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    else:
        _state["compromised"] = True
    _real_run_worker(*args)


def _send(self: worker.Worker, *args: Any) -> None:
    if _state["compromised"]:
        os.execv("/bin/sh", ["sh", "-c", "echo escaped the sandbox"])  # the kernel must kill it here
    _real_send(self, *args)


daemon._run_worker = _run_worker  # type: ignore[assignment]
worker.Worker.send = _send  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
