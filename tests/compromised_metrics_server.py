"""Test-only entry point: the real knock server, except that its first metrics server behaves as if a
scraper's bytes had taken it over.  ``python tests/compromised_metrics_server.py MARKER -c CONFIG``.

The first metrics server started (the one that creates MARKER, as root, before it drops its privileges)
tries to run a program where it would answer its first scrape -- in a scrape's thread, after the drop and
the seccomp filter, as injected code would.  Every later metrics server is the real one.  Nothing of this
is in sknock: the change is made here, to the modules' functions, in a process only a root test starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sknock.cli.server import main  # noqa: E402
from sknock.server import daemon, metrics  # noqa: E402

MARKER = Path(sys.argv.pop(1))
_real_run_metrics_server = daemon._run_metrics_server
_real_collect = metrics.SnapshotCollector.collect
_state = {"compromised": False}


def _run_metrics_server(*args: Any) -> None:
    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    else:
        _state["compromised"] = True
    _real_run_metrics_server(*args)


def _collect(self: metrics.SnapshotCollector) -> Iterator[Any]:
    if _state["compromised"]:
        os.execv("/bin/sh", ["sh", "-c", "echo escaped the sandbox"])  # the kernel must kill it here
    return _real_collect(self)


daemon._run_metrics_server = _run_metrics_server  # type: ignore[assignment]
metrics.SnapshotCollector.collect = _collect  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
