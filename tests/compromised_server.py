"""Test-only entry point: the real knock server, except that the first of one kind of its unprivileged
children behaves as if hostile bytes had taken it over.
``python tests/compromised_server.py worker|metrics MARKER -c CONFIG``.

The first child of that kind (the one that creates MARKER, as root, before it drops its privileges) tries
to run a program where it would do its first piece of attacker-facing work, after the drop and the
seccomp filter, as injected code would: a worker when it sends its first grant to the monitor (a packet
took it over), the metrics server when it answers its first scrape, in the scrape's thread (a scraper took
it over).  Every later child is the real one.  Nothing of this is in sknock: the change is made here, to
the modules' functions, in a process only a root test starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sknock.cli.server import main  # noqa: E402
from sknock.server import daemon, metrics, worker  # noqa: E402

KIND = sys.argv.pop(1)
MARKER = Path(sys.argv.pop(1))
#: kind -> (the daemon's function that runs such a child, the class and method of its first hostile work)
TARGETS: dict[str, tuple[str, type, str]] = {
    "worker": ("_run_worker", worker.Worker, "send"),
    "metrics": ("_run_metrics_server", metrics.SnapshotCollector, "collect"),
}
_state = {"compromised": False}


def _first_claims_marker(run: Callable[..., None]) -> Callable[..., None]:
    def start(*args: Any) -> None:
        try:
            os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        else:
            _state["compromised"] = True
        run(*args)

    return start


def _escapes(real: Callable[..., Any]) -> Callable[..., Any]:
    def work(self: object, *args: Any) -> Any:
        if _state["compromised"]:
            os.execv("/bin/sh", ["sh", "-c", "echo escaped the sandbox"])  # the kernel must kill it here
        return real(self, *args)

    return work


runner, cls, method = TARGETS[KIND]
setattr(daemon, runner, _first_claims_marker(getattr(daemon, runner)))
setattr(cls, method, _escapes(getattr(cls, method)))

if __name__ == "__main__":
    sys.exit(main())
