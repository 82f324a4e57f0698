"""The ``sknock-knock`` console script: :func:`sknock.cli.knock.main` in a process that starts and ends fast.

ssh starts ``sknock-knock ssh-proxy`` for every new connection, and the user waits for all of it (issue
12: the knock should add at most 100 ms to a login).  Two costs of a short-lived Python process are
not the knock's, and this entry point avoids them:

* the cyclic garbage collector runs over and over while the imports allocate (cryptography's and
  ours; they create no garbage cycles worth collecting).  It is off while they load, then what they
  loaded is frozen (``gc.freeze``: never scanned again) and the collector is on for the run itself;
* the interpreter's teardown (every module and object freed one by one).  Once ``main`` has returned
  and stdout and stderr are flushed there is nothing left to do, so the process ends with ``os._exit``:
  open files and sockets are closed by the kernel as at any exit.  (An exception, ``--help``'s
  SystemExit included, ends it the ordinary way.)

This measured 6 ms and 10 ms on the benchmark's machine on 2026-12-03 (bench/sshlogin.py).
``python -m sknock.cli.knock`` runs the same ``main`` without these shortcuts.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import NoReturn


def knock() -> NoReturn:
    """Run ``sknock-knock`` (see :mod:`sknock.cli.knock`) and exit with its status."""
    gc.disable()
    try:
        from .knock import main
    finally:
        gc.freeze()
        gc.enable()
    status = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: what it could not take is lost anyway
            stream.flush()
    os._exit(status)
