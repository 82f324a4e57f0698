#!/usr/bin/env python3
"""The proof-of-concept client, like the original sKnock's ``client/knock-client.py``.

    python client/knock-client.py --pfx alice.pfx --server-cert server.cer -p 2000 server.example
    python client/knock-client.py -4 -u -p 8000 gateway        # a named server of client.ini

A thin wrapper: it runs from a checkout without installing, by putting the repository root on
``sys.path``, and hands everything to :func:`sknock.cli.knock.main` (``sknock-knock --help`` lists the
options; there are no default files: give --pfx and --server-cert, or a named server).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sknock.cli.knock import main  # noqa: E402 -- needs the path above

if __name__ == "__main__":
    sys.exit(main())
