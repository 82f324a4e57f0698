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

libnftables' JSON parser takes element timeouts as whole seconds and -- seen with 1.0.6 -- silently
stores an element with *no* timeout (a permanent grant) when given a float or a string such as
``"1500ms"``.  Durations are therefore always rounded up to a whole number of seconds here.

A stop is not a teardown.  The table stays when the server stops or dies, and grants end by their
timeouts; :func:`boot_ruleset` renders the same table for an include in /etc/nftables.conf, so the
policy is there from boot on.  :meth:`NftablesFirewall.setup` replaces a table it finds and carries its
live grants over with the time they have left.  :meth:`NftablesFirewall.intact` compares the table's
kernel handle, the chain and its rules with what setup/restore installed (raw netlink, see
nfnetlink.py: libnftables would read every set element first), so a ``flush ruleset`` -- even followed
by a reload that recreates an identical-looking, empty table -- is noticed, and
:meth:`NftablesFirewall.restore` puts the policy and the monitor's grants back in one transaction.

An element someone adds by hand (``nft add element inet sknock grants4 { ... }``) changes nothing
:meth:`intact` compares; :meth:`NftablesFirewall.held` lists the sets' elements (raw netlink again, and
not at all when the ruleset's generation has not moved since the last listing) so that the monitor can
remove what it never granted (:meth:`NftablesFirewall.remove`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Sequence
from typing import Any, cast

from ...addresses import IPAddress
from ...ports import PortRange, PortSet, Protocol
from . import nfnetlink
from .base import Firewall, FirewallError, FirewallPolicy, Grant, Held, Opening, check_duration

__all__ = ["NftablesFirewall", "boot_ruleset", "build_ruleset", "load_libnftables", "TABLE", "FAMILY"]

NAME = "nftables"
FAMILY = "inet"
TABLE = "sknock"
CHAIN = "input"
SET4 = "grants4"
SET6 = "grants6"
KEY_SIZES = {SET4: 12, SET6: 24}  # address . protocol . port, each field padded to 4 bytes
_PROTOCOLS = {6: Protocol.TCP, 17: Protocol.UDP}  # IP protocol numbers, as the sets hold them
_LABELS = {p.label: p for p in Protocol}

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


# --- the same table as nft text, for the boot-time include ---------------------------------------

_BARE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_QUOTED_KEYS = {"iif", "oif", "iifname", "oifname"}  # interface names are strings in nft's grammar


def _text_word(value: object, quoted: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FirewallError(NAME, f"cannot render {value!r} as nft text")
    text = str(value)
    if not _BARE.fullmatch(text):
        raise FirewallError(NAME, f"cannot render {text!r} as nft text")
    return f'"{text}"' if quoted else text


def _text_value(value: Any, quoted: bool = False) -> str:
    if isinstance(value, str) and value.startswith("@"):
        return "@" + _text_word(value[1:])
    if isinstance(value, dict) and "set" in value:
        return "{ " + ", ".join(_text_value(item, quoted) for item in value["set"]) + " }"
    if isinstance(value, dict) and "range" in value:
        first, last = value["range"]
        return f"{_text_word(first)}-{_text_word(last)}"
    return _text_word(value, quoted)


def _text_left(left: Json) -> str:
    if "concat" in left:
        return " . ".join(_text_left(part) for part in left["concat"])
    if "meta" in left:
        return f"meta {_text_word(left['meta']['key'])}"
    if "ct" in left:
        return f"ct {_text_word(left['ct']['key'])}"
    if "payload" in left:
        return f"{_text_word(left['payload']['protocol'])} {_text_word(left['payload']['field'])}"
    raise FirewallError(NAME, f"cannot render {left!r} as nft text")


def _text_statement(statement: Json) -> str:
    [(kind, body)] = statement.items()
    if kind == "match":
        left = body["left"]
        quoted = "meta" in left and left["meta"]["key"] in _QUOTED_KEYS
        if body["op"] == "in" and isinstance(body["right"], list):  # flags: ct state a,b
            return f"{_text_left(left)} {','.join(_text_word(v) for v in body['right'])}"
        if body["op"] != "==":
            raise FirewallError(NAME, f"cannot render operator {body['op']!r} as nft text")
        return f"{_text_left(left)} {_text_value(body['right'], quoted)}"
    if kind in ("accept", "drop"):
        return kind
    if kind == "reject":
        if body.get("type") == "tcp reset":
            return "reject with tcp reset"
        return f"reject with {_text_word(body['type'])} type {_text_word(body['expr'])}"
    raise FirewallError(NAME, f"cannot render {statement!r} as nft text")


def boot_ruleset(policy: FirewallPolicy, priority: int = 0) -> str:
    """sknock's table as nft text -- the policy, empty grant sets -- for an ``include`` in the host's
    /etc/nftables.conf, so the protected ports are shut from boot on, before sknock starts and after it
    stops.  The same rules as :func:`build_ruleset` (rendered from the same description; the kernel test
    compares what the two install).

    The file first declares and deletes the table, then creates it: ``nft -f`` loads a file as one
    transaction, so loading it over an existing sknock table (a reload without ``flush ruleset``)
    replaces that table atomically -- no moment without the policy, no duplicated rules (a plain
    ``table inet sknock { ... }`` block would *append* a second copy of every rule) -- and drops the
    grants it held; a running server sees the new table (:meth:`NftablesFirewall.intact`) and restores
    its grants within a second."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise FirewallError(NAME, f"chain priority must be an integer, not {priority!r}")
    lines = [
        "# sknock's firewall policy: include this file from /etc/nftables.conf (see docs/firewall.md).",
        "# Generated from sknock's configuration; regenerate it when the configuration changes.",
        "# The first two lines make a reload replace sknock's table in one step instead of adding rules",
        "# to it; grants held at that moment are dropped, and a running server restores them.",
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
    ]
    for name, addr_type in ((SET4, "ipv4_addr"), (SET6, "ipv6_addr")):
        lines += [f"\tset {name} {{", f"\t\ttype {addr_type} . inet_proto . inet_service",
                  "\t\tflags timeout", "\t}"]
    lines += [f"\tchain {CHAIN} {{", f"\t\ttype filter hook input priority {priority}; policy accept;"]
    lines += ["\t\t" + " ".join(_text_statement(statement) for statement in body) for body in _rule_bodies(policy)]
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


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


def _parse_element(item: object, set_name: str) -> tuple[Opening | None, int | None]:
    """One element of a listed set, in either JSON shape libnftables prints; its opening is None when
    it is no grant at all (another protocol, port 0: put there by hand), which is no error."""
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
    except (ValueError, TypeError) as exc:
        raise FirewallError(NAME, f"unexpected element in set {set_name}: {item!r} ({exc})") from None
    protocol = _PROTOCOLS.get(proto) if isinstance(proto, int) else _LABELS.get(proto)
    if protocol is None or isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return None, expires
    return Opening(address, protocol, port), expires


def _held(set_name: str, key: bytes) -> Held:
    """A set element's raw key as :class:`Held`; its handle is what :meth:`NftablesFirewall.remove` needs."""
    size = 4 if set_name == SET4 else 16
    address = ipaddress.IPv4Address(key[:4]) if size == 4 else ipaddress.IPv6Address(key[:16])
    number, port = key[size], int.from_bytes(key[size + 4 : size + 6], "big")
    protocol = _PROTOCOLS.get(number)
    if protocol is not None and 1 <= port <= 65535:
        return Held(Opening(address, protocol, port), "", (set_name, address, number, port))
    return Held(None, f"{address} -> protocol {number}/{port}", (set_name, address, number, port))


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
        self._installed: nfnetlink.Fingerprint | None = None  # what setup()/restore() left; see intact()
        self._listed: tuple[int, list[Held]] | None = None  # the last held(), with the generation it read
        self._decoded: dict[bytes, Held] = {}  # element key -> Held, from the last listing

    def _run(self, commands: list[Json], what: str) -> Any:
        rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            detail = str(error).strip().splitlines()
            raise FirewallError(NAME, f"{what} failed: {' / '.join(detail[-3:]) or f'libnftables returned {rc}'}")
        return output

    def setup(self) -> list[Grant]:
        """Replace whatever sknock table is there -- one transaction, never a moment without it -- and
        carry over its live grants.  Each keeps the whole seconds the kernel says it has left, which the
        listing rounds down (so a carried grant ends up to 1 s early, never late); one with less than
        a second left, or with no timeout at all, is dropped."""
        carried: list[tuple[Opening, int]] = []
        try:
            found = self.expiries()
        except FirewallError:
            found = {}  # no table (the usual case), or one this version cannot read: carry nothing
        for opening, expires in found.items():
            if expires is not None and expires >= 1:
                carried.append((opening, expires))
        return self._install(carried, f"installing table {FAMILY} {TABLE}")

    def restore(self, grants: Sequence[Grant]) -> list[Grant]:
        """Reinstall the policy with exactly ``grants`` in one transaction, whatever is left of the table.
        Remaining times are rounded up to whole seconds, as :meth:`open` rounds durations; a grant with
        no time left is skipped."""
        timed: list[tuple[Opening, int]] = []
        for opening, remaining in grants:
            if remaining > 0:
                timed.append((opening, max(1, math.ceil(check_duration(NAME, remaining)))))
        return self._install(timed, f"restoring table {FAMILY} {TABLE}")

    def _install(self, grants: list[tuple[Opening, int]], what: str) -> list[Grant]:
        """The table and ``grants`` in one batch, then remember what the kernel holds for intact().  If
        the kernel refuses the batch, the policy alone first (the ports must not stay open because of
        one grant), then the grants one by one."""
        self._installed = None
        elements = [{"add": {"element": e}} for e in _grouped([_element_of(o, t) for o, t in grants])]
        installed: list[Grant] = [(o, float(t)) for o, t in grants]
        try:
            self._run(build_ruleset(self.policy, self.priority) + elements, what)
        except FirewallError:
            if not grants:
                raise
            self._run(build_ruleset(self.policy, self.priority), what)
            failed = {o for o, _ in self.apply([(o, float(t)) for o, t in grants], [], known=set())}
            installed = [(o, t) for o, t in installed if o not in failed]
        self._installed = self._fingerprint()
        return installed

    def _fingerprint(self) -> nfnetlink.Fingerprint | None:
        try:
            return nfnetlink.fingerprint(FAMILY, TABLE, CHAIN)
        except nfnetlink.NetlinkError as exc:
            raise FirewallError(NAME, f"reading table {FAMILY} {TABLE} over netlink failed: {exc}") from None

    def intact(self) -> bool:
        """True while the kernel holds the very table this process installed last (same kernel handle:
        a recreated table gets a new one), with the chain and rules it installed.  Reads no set
        elements (over raw netlink, see :mod:`.nfnetlink`), so its cost does not grow with the number of
        grants, unlike libnftables' own ``list chain``."""
        return self._installed is not None and self._fingerprint() == self._installed

    def held(self) -> list[Held]:
        """Every element of sknock's sets, expired ones left out (the kernel does).  Reads the ruleset's
        generation first: unchanged since the last listing, nothing was added or removed, and that
        listing is the answer (one small netlink request).  Otherwise the keys over raw netlink, each
        decoded once for as long as it stays in the set.  Raises :class:`FirewallError` when a set is
        missing (the table is gone: :meth:`intact` says so) or the kernel cannot be asked."""
        try:
            generation = nfnetlink.generation()
            if self._listed is not None and self._listed[0] == generation:
                return self._listed[1]
            keys = {name: nfnetlink.set_keys(FAMILY, TABLE, name, size) for name, size in KEY_SIZES.items()}
        except nfnetlink.NetlinkError as exc:
            raise FirewallError(NAME, f"listing the sets of {FAMILY} {TABLE} over netlink failed: {exc}") from None
        decoded: dict[bytes, Held] = {}
        previous = self._decoded
        for name, found in keys.items():
            if found is None:
                raise FirewallError(NAME, f"set {name} of table {FAMILY} {TABLE} is missing")
            for key in found:
                entry = previous.get(key)
                decoded[key] = entry if entry is not None else _held(name, key)
        self._decoded = decoded
        held = list(decoded.values())
        self._listed = (generation, held)
        return held

    def remove(self, entries: Sequence[Held]) -> list[tuple[Held, FirewallError]]:
        """Take these elements out of sknock's sets in one transaction (add-then-delete, as :meth:`close`:
        one that is gone already is no error); if the kernel refuses it, one at a time."""

        def batch(items: Sequence[Held]) -> list[Json]:
            commands: list[Json] = []
            for entry in items:
                set_name, address, number, port = cast(tuple[str, IPAddress, int, int], entry.handle)
                where = {"family": FAMILY, "table": TABLE, "name": set_name}
                value = {"concat": [str(address), number, port]}
                commands += [{"add": {"element": {**where, "elem": [{"elem": {"val": value, "timeout": 1}}]}}},
                             {"delete": {"element": {**where, "elem": [value]}}}]
            return commands

        if not entries:
            return []
        try:
            self._run(batch(entries), f"removing {len(entries)} element(s) no knock granted")
            return []
        except FirewallError:
            pass
        failures = []
        for entry in entries:
            try:
                self._run(batch([entry]), f"removing element {entry}")
            except FirewallError as exc:
                failures.append((entry, exc))
        return failures

    def boot_ruleset(self) -> str:
        """The include for /etc/nftables.conf that puts sknock's table (empty of grants) in place at boot."""
        return boot_ruleset(self.policy, self.priority)

    def open(self, opening: Opening, duration: float) -> None:
        """Grant ``opening`` for ``duration`` seconds rounded up to whole seconds, restarting its timeout
        when it is already granted; raises :class:`FirewallError`."""
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
        """Remove ``opening`` from its set; closing what is not open is not an error.  Raises
        :class:`FirewallError`."""
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
        :meth:`close`.  (A plain add costs less than half of an add/delete/add, which is why ``known``
        is worth passing.)  If the kernel refuses the batch, one change at a time, so that one bad
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
                        if opening is not None:  # no grant (held() lists it, for the monitor to remove)
                            found[opening] = expires
        return found

    def openings(self) -> list[Opening]:
        """The grants in sknock's sets, as the kernel lists them now."""
        return sorted(self.expiries(), key=lambda o: (o.address.version, int(o.address), o.protocol, o.port))

    def teardown(self) -> None:
        """Delete sknock's table: the protected ports fall back to the host's own rules.  For ``sknock-server
        teardown``, never for a stop."""
        table = {"family": FAMILY, "name": TABLE}
        self._installed = None
        self._run([{"add": {"table": table}}, {"delete": {"table": table}}], f"removing table {FAMILY} {TABLE}")
