"""nftables backend: one table of sknock's own, driven in-process through libnftables' JSON API.

Why this shape:

* ``table inet sknock`` holds everything sknock adds, so setup and teardown are one ``delete table``
  and sknock can never disturb an admin's tables.  One ``inet`` table serves IPv4 and IPv6.
* Grants are elements of the sets ``grants4``/``grants6`` (address . protocol . port) with
  ``flags timeout``: the kernel drops an element when its time is up, so access ends on time even when
  the server process is dead (``kernel_expiry``).  Adding or removing a grant is a set-element change,
  not a rule change: cheap, atomic, and the rule list stays fixed.
* Each change is one JSON batch, which libnftables commits as one netlink transaction: setup replaces
  a leftover table atomically (there is no moment with no table), and extending a grant is
  ``delete`` + ``add`` of its element in one batch -- on Debian 12 (nftables 1.0.6) re-adding an
  existing element did not refresh its expiry.
* Chain priority 0 (``filter``).  nftables runs every base chain on the input hook in priority order;
  an ``accept`` only ends *that* chain, a ``drop`` anywhere is final.  So sknock's accept cannot open a
  hole in an admin's table that drops the port: the admin's ruleset must accept the protected ports and
  leave the decision to sknock (see docs/firewall.md).

libnftables' JSON parser takes element timeouts as whole seconds and -- measured with 1.0.6 -- silently
stores an element with *no* timeout (a permanent grant) when given a float or a string such as
``"1500ms"``.  Durations are therefore always rounded up to a whole number of seconds here.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection, Sequence
from typing import Any

from ...ports import PortRange, PortSet, Protocol
from .base import Firewall, FirewallError, FirewallPolicy, Grant, Opening, check_duration

__all__ = ["NftablesFirewall", "build_ruleset", "load_libnftables", "TABLE", "FAMILY"]

NAME = "nftables"
FAMILY = "inet"
TABLE = "sknock"
CHAIN = "input"
SET4 = "grants4"
SET6 = "grants6"

# ICMP the network needs: reachability (echo), errors (path MTU discovery depends on them) and, for
# IPv6, neighbour and router discovery, without which the link itself stops working.
ICMP4_TYPES = ["echo-request", "echo-reply", "destination-unreachable", "time-exceeded", "parameter-problem"]
ICMP6_TYPES = [
    "echo-request",
    "echo-reply",
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-query",
]

Json = dict[str, Any]


def load_libnftables() -> Any:
    """Import pip-nftables and open libnftables.so.1, or say exactly which package is missing."""
    try:
        import nftables
    except ImportError:
        raise FirewallError(NAME, "python module 'nftables' is missing: pip install pip-nftables "
                                  "(or Debian package python3-nftables)") from None
    try:
        return nftables.Nftables()
    except OSError as exc:
        raise FirewallError(NAME, f"cannot load libnftables.so.1 ({exc}): "
                                  "install Debian package libnftables1") from None


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _ports_value(ranges: list[PortRange]) -> Any:
    """A single port as a number, otherwise an anonymous set of ports and ranges."""
    items: list[Any] = [r.first if r.first == r.last else {"range": [r.first, r.last]} for r in ranges]
    if len(items) == 1 and isinstance(items[0], int):
        return items[0]
    return {"set": items}


def _by_protocol(ports: PortSet) -> dict[Protocol, list[PortRange]]:
    grouped: dict[Protocol, list[PortRange]] = {}
    for r in ports.ranges:
        grouped.setdefault(r.protocol, []).append(r)
    return grouped


def _dport_match(protocol: Protocol, ranges: list[PortRange]) -> Json:
    return {"match": {"op": "==", "left": _payload(protocol.label, "dport"), "right": _ports_value(ranges)}}


def _verdict_for(mode: str, protocol: Protocol | None) -> Json:
    """Reject as a closed port would answer (TCP reset; ICMP port unreachable otherwise), or drop."""
    if mode == "drop":
        return {"drop": None}
    if protocol is Protocol.TCP:
        return {"reject": {"type": "tcp reset"}}
    return {"reject": {"type": "icmpx", "expr": "port-unreachable"}}


def _grant_match(family_payload: str, set_name: str) -> list[Json]:
    return [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}},
        {
            "match": {
                "op": "==",
                "left": {"concat": [_payload(family_payload, "saddr"), {"meta": {"key": "l4proto"}},
                                    _payload("th", "dport")]},
                "right": f"@{set_name}",
            }
        },
    ]


def _rule_bodies(policy: FirewallPolicy) -> list[list[Json]]:
    """The chain's rules in the original sKnock's order: accepts first, the verdict for the rest last."""
    accept: Json = {"accept": None}
    rules: list[list[Json]] = [
        [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, accept],
        # an established session survives the end of its window: the grant is for *starting* one
        [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, accept],
        [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "icmp"}},
         {"match": {"op": "==", "left": _payload("icmp", "type"), "right": {"set": ICMP4_TYPES}}}, accept],
        [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipv6-icmp"}},
         {"match": {"op": "==", "left": _payload("icmpv6", "type"), "right": {"set": ICMP6_TYPES}}}, accept],
    ]
    if policy.emergency_ssh:
        rules.append([_dport_match(Protocol.TCP, [PortRange(Protocol.TCP, 22, 22)]), accept])
    for protocol, ranges in sorted(_by_protocol(policy.always_open).items()):
        rules.append([_dport_match(protocol, ranges), accept])
    rules.append([*_grant_match("ip", SET4), accept])
    rules.append([*_grant_match("ip6", SET6), accept])
    if policy.mode == "none":
        return rules
    if policy.protected is None:
        if policy.mode == "reject":
            rules.append([{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                          _verdict_for("reject", Protocol.TCP)])
        rules.append([_verdict_for(policy.mode, None)])
    else:
        for protocol, ranges in sorted(_by_protocol(policy.protected).items()):
            rules.append([_dport_match(protocol, ranges), _verdict_for(policy.mode, protocol)])
    return rules


def build_ruleset(policy: FirewallPolicy, priority: int = 0) -> list[Json]:
    """The JSON commands that (re)create sknock's table.  Pure, so it can be inspected and tested
    without a kernel.  Starts with add+delete of the table so a leftover table goes in the same batch."""
    table = {"family": FAMILY, "name": TABLE}
    commands: list[Json] = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    for name, addr_type in ((SET4, "ipv4_addr"), (SET6, "ipv6_addr")):
        commands.append({"add": {"set": {"family": FAMILY, "table": TABLE, "name": name,
                                         "type": [addr_type, "inet_proto", "inet_service"], "flags": ["timeout"]}}})
    commands.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": CHAIN, "type": "filter",
                                       "hook": "input", "prio": priority, "policy": "accept"}}})
    for body in _rule_bodies(policy):
        commands.append({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": CHAIN, "expr": body}}})
    return commands


def _set_for(opening: Opening) -> str:
    return SET4 if opening.address.version == 4 else SET6


def _element(opening: Opening, timeout: int | None = None) -> Json:
    return _grouped([_element_of(opening, timeout)])[0]


def _element_of(opening: Opening, timeout: int | None) -> tuple[str, Json]:
    elem: Json = {"val": {"concat": [str(opening.address), opening.protocol.label, opening.port]}}
    if timeout is not None:
        elem["timeout"] = timeout
    return _set_for(opening), {"elem": elem}


def _grouped(elements: list[tuple[str, Json]]) -> list[Json]:
    """One element command per set, with all of that set's elements."""
    by_set: dict[str, list[Json]] = {}
    for set_name, elem in elements:
        by_set.setdefault(set_name, []).append(elem)
    return [{"family": FAMILY, "table": TABLE, "name": name, "elem": elems} for name, elems in by_set.items()]


def _parse_element(item: object, set_name: str) -> tuple[Opening, int | None]:
    """One element of a listed set, in either JSON shape libnftables prints."""
    expires: int | None = None
    if isinstance(item, dict) and "elem" in item and isinstance(item["elem"], dict):
        raw_expires = item["elem"].get("expires")
        expires = raw_expires if isinstance(raw_expires, int) else None
        item = item["elem"].get("val")
    concat = item.get("concat") if isinstance(item, dict) else None
    if not isinstance(concat, list) or len(concat) != 3:
        raise FirewallError(NAME, f"unexpected element in set {set_name}: {item!r}")
    address_text, proto, port = concat
    try:
        address = ipaddress.ip_address(address_text)
        protocol = Protocol.from_label(proto) if isinstance(proto, str) else {6: Protocol.TCP, 17: Protocol.UDP}[proto]
        return Opening(address, protocol, port), expires
    except (ValueError, KeyError, TypeError) as exc:
        raise FirewallError(NAME, f"unexpected element in set {set_name}: {item!r} ({exc})") from None


class NftablesFirewall(Firewall):
    """Grants as timed elements of sknock's own nftables sets; see the module docstring."""

    name = NAME
    kernel_expiry = True

    def __init__(self, policy: FirewallPolicy, *, priority: int = 0) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not -400 <= priority <= 400:
            raise FirewallError(NAME, f"chain priority must be an integer -400..400, not {priority!r}")
        self.policy = policy
        self.priority = priority
        self._nft = load_libnftables()

    def _run(self, commands: list[Json], what: str) -> Any:
        rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            detail = str(error).strip().splitlines()
            raise FirewallError(NAME, f"{what} failed: {' / '.join(detail[-3:]) or f'libnftables returned {rc}'}")
        return output

    def setup(self) -> list[Grant]:
        self._run(build_ruleset(self.policy, self.priority), f"installing table {FAMILY} {TABLE}")
        return []

    def open(self, opening: Opening, duration: float) -> None:
        seconds = max(1, math.ceil(check_duration(NAME, duration)))
        # add (a no-op if present) + delete + add: one transaction that works whether or not the
        # element exists, and that always restarts its timeout
        self._run(
            [{"add": {"element": _element(opening, seconds)}},
             {"delete": {"element": _element(opening)}},
             {"add": {"element": _element(opening, seconds)}}],
            f"opening {opening} for {seconds} s",
        )

    def close(self, opening: Opening) -> None:
        # add-then-delete in one transaction makes close idempotent without a racy lookup first
        self._run([{"add": {"element": _element(opening, 1)}}, {"delete": {"element": _element(opening)}}],
                  f"closing {opening}")

    def apply(
        self,
        opens: Sequence[tuple[Opening, float]],
        closes: Sequence[Opening],
        known: Collection[Opening] | None = None,
    ) -> list[tuple[Opening, FirewallError]]:
        """Everything in one transaction (one netlink round trip, one JSON parse), element lists grouped
        per set.  A new grant is one add; one that may exist (``known``) gets the add/delete/add of
        :meth:`open`, since re-adding does not restart a timeout; a close is add/delete as in
        :meth:`close`.  (Measured here: 9 us per new grant in batches of 100, against 23 us for
        add/delete/add.)  If the kernel refuses the batch, one change at a time, so that one bad
        change does not hold back the others."""
        if not opens and not closes:
            return []
        timed = [(o, max(1, math.ceil(check_duration(NAME, d)))) for o, d in opens]
        replaced = timed if known is None else [(o, t) for o, t in timed if o in known]
        first_add = [_element_of(o, t) for o, t in timed] + [_element_of(o, 1) for o in closes]
        delete = [_element_of(o, None) for o, _ in replaced] + [_element_of(o, None) for o in closes]
        second_add = [_element_of(o, t) for o, t in replaced]
        commands = (
            [{"add": {"element": e}} for e in _grouped(first_add)]
            + [{"delete": {"element": e}} for e in _grouped(delete)]
            + [{"add": {"element": e}} for e in _grouped(second_add)]
        )
        try:
            self._run(commands, f"applying {len(opens)} opening(s) and {len(closes)} closing(s)")
        except FirewallError:
            return super().apply(opens, closes)
        return []

    def expiries(self) -> dict[Opening, int | None]:
        """Each grant and the whole seconds the kernel says it has left (None if it has no timeout)."""
        found: dict[Opening, int | None] = {}
        for set_name in (SET4, SET6):
            output = self._run([{"list": {"set": {"family": FAMILY, "table": TABLE, "name": set_name}}}],
                               f"listing set {set_name}")
            entries = output.get("nftables", []) if isinstance(output, dict) else []
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("set"), dict):
                    for item in entry["set"].get("elem", []):
                        opening, expires = _parse_element(item, set_name)
                        found[opening] = expires
        return found

    def openings(self) -> list[Opening]:
        return sorted(self.expiries(), key=lambda o: (o.address.version, int(o.address), o.protocol, o.port))

    def teardown(self) -> None:
        table = {"family": FAMILY, "name": TABLE}
        self._run([{"add": {"table": table}}, {"delete": {"table": table}}], f"removing table {FAMILY} {TABLE}")
