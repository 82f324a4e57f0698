"""The grants a backend cannot end by itself, kept on disk so that a restart ends them.

nftables set elements and iptables rules with a datestop end in the kernel on time, whatever happens to
the server.  The ``command`` backend's grants (a ``ufw allow`` rule, say) end only when sknock runs the
close command: if the server is killed, nobody does, and the port stays open to that address.  So, for
such a backend, the monitor writes its open grants with their wall-clock expiry to
``stateDir/grants.json`` whenever they change (atomically: a crash leaves the old file or the new one),
and the next start reads it back: grants whose time is up are closed at once, the others on time.

The file is the server's own, in a root-only folder; it is still checked in full, and a file that
cannot be read is reported as an ERROR naming it (sknock cannot know what is open then).
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable
from pathlib import Path

from ..errors import SknockError
from ..fileio import write_atomic
from ..ports import Protocol
from .firewall.base import Opening

__all__ = ["GrantLedger", "LedgerEntry", "LedgerError"]

LedgerEntry = tuple[Opening, float, str]  # the opening, its expiry (Unix time), the client


class LedgerError(SknockError):
    """The ledger file exists but cannot be read or is not what sknock writes."""


class GrantLedger:
    """The ledger file at ``path``: what a backend without kernel expiry has open, read at the start and
    rewritten by the monitor whenever its grants change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: list[dict[str, object]] | None = None

    def load(self) -> list[LedgerEntry]:
        """The grants a previous run left open; [] when there is no file."""
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise LedgerError(f"{self.path}: {exc}") from None
        entries: list[LedgerEntry] = []
        try:
            if not isinstance(raw, dict) or not isinstance(raw.get("grants"), list):
                raise ValueError("no list of grants")
            for item in raw["grants"]:
                opening = Opening(ipaddress.ip_address(item["address"]), Protocol.from_label(item["protocol"]),
                                  item["port"])
                expires, client = item["expires"], item["client"]
                if not isinstance(expires, int | float) or not math.isfinite(expires) or not isinstance(client, str):
                    raise ValueError(f"bad entry {item!r}")
                entries.append((opening, float(expires), client))
        except (ValueError, KeyError, TypeError, AttributeError, SknockError) as exc:
            raise LedgerError(f"{self.path}: not a grant ledger ({exc})") from None
        return entries

    def save(self, grants: Iterable[LedgerEntry]) -> None:
        """Write the grants open now (only when they changed).  Raises OSError."""
        document = [
            {"address": str(o.address), "protocol": o.protocol.label, "port": o.port, "expires": round(e, 3),
             "client": c}
            for o, e, c in grants
        ]
        if document == self._written:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"grants": document}, indent=1).encode() + b"\n", mode=0o600)
        self._written = document
