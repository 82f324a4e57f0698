#!/usr/bin/env python3
"""The sknock knock server, run from a checkout: ``python server/knock-server.py [-c config.ini]``.

The same as the ``sknock-server`` console script; see ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sknock.cli.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
