"""iptables backend: a chain ``SKNOCK`` in the legacy x_tables filter tables, through python-iptables.

For hosts whose firewall is still legacy iptables (see detect.py).  Layout, the same for IPv4
(``iptc.Table``) and IPv6 (``iptc.Table6``)::

    INPUT  1: -j SKNOCK
    SKNOCK:   grants (newest first)  -s ADDR -p PROTO --dport PORT -m comment --comment sknock-grant -j ACCEPT
              -i lo -j ACCEPT
              -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
              ICMP the network needs -j ACCEPT
              tcp/22 (emergency ssh), always_open -j ACCEPT
              protected ports (or everything) -j REJECT / DROP  (nothing with policy none)

Grants are inserted at the top of the chain: every rule before the final verdicts is an ACCEPT, and
ACCEPTs commute, so a grant's place among them does not matter, while inserting at 1 needs no index
bookkeeping.  The comment marks grants so :meth:`openings` can tell them from the fixed rules.

The kernel does not expire these rules (``kernel_expiry`` False): the daemon closes grants on time.
python-iptables writes legacy tables only; on a host whose firewall is nftables (iptables-nft) its
ACCEPT cannot override a drop in the nft ruleset -- use the nftables backend there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from ...ports import PortRange, PortSet, Protocol
from .base import Firewall, FirewallError, FirewallPolicy, Grant, Opening, check_duration

__all__ = ["IptablesFirewall", "load_iptc", "CHAIN", "GRANT_COMMENT"]

NAME = "iptables"
CHAIN = "SKNOCK"
GRANT_COMMENT = "sknock-grant"
_MULTIPORT_SLOTS = 15  # the multiport match takes at most 15 ports, a range counting as two

ICMP4_TYPES = ["echo-request", "echo-reply", "destination-unreachable", "time-exceeded", "parameter-problem"]
ICMP6_TYPES = [
    "echo-request",
    "echo-reply",
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "router-solicitation",
    "router-advertisement",
    "neighbour-solicitation",
    "neighbour-advertisement",
]


def load_iptc() -> Any:
    """Import python-iptables (which loads libiptc / libxtables), or name the package to install."""
    try:
        import iptc
    except ImportError:
        raise FirewallError(NAME, "python module 'iptc' is missing: pip install python-iptables "
                                  "(or Debian package python3-iptables)") from None
    except Exception as exc:  # iptc raises various errors when libxtables is absent
        raise FirewallError(NAME, f"python-iptables cannot load libxtables ({exc}): install Debian package "
                                  "iptables (libxtables12)") from None
    return iptc


def _multiport_chunks(ranges: list[PortRange]) -> Iterator[str]:
    """``dports`` values for the multiport match, split to respect its 15-slot limit."""
    chunk: list[str] = []
    used = 0
    for r in ranges:
        text, cost = (str(r.first), 1) if r.first == r.last else (f"{r.first}:{r.last}", 2)
        if used + cost > _MULTIPORT_SLOTS:
            yield ",".join(chunk)
            chunk, used = [], 0
        chunk.append(text)
        used += cost
    if chunk:
        yield ",".join(chunk)


def _by_protocol(ports: PortSet) -> dict[Protocol, list[PortRange]]:
    grouped: dict[Protocol, list[PortRange]] = {}
    for r in ports.ranges:
        grouped.setdefault(r.protocol, []).append(r)
    return grouped


class _Family:
    """One address family's table: IPv4 or IPv6 differ only in class names and ICMP spelling."""

    def __init__(self, iptc: Any, version: int) -> None:
        self.iptc = iptc
        self.version = version
        self.table_cls = iptc.Table if version == 4 else iptc.Table6
        self.rule_cls = iptc.Rule if version == 4 else iptc.Rule6
        self.host_bits = 32 if version == 4 else 128

    def table(self) -> Any:
        table = self.table_cls(self.table_cls.FILTER)
        table.autocommit = False
        table.refresh()
        return table

    def rule(self, target: str, protocol: str | None = None) -> Any:
        rule = self.rule_cls()
        if protocol:
            rule.protocol = protocol
        rule.create_target(target)
        return rule

    def icmp_rules(self) -> list[Any]:
        rules = []
        for icmp_type in ICMP4_TYPES if self.version == 4 else ICMP6_TYPES:
            # 58 is ICMPv6: a number, because /etc/protocols may not know the name
            rule = self.rule("ACCEPT", "icmp" if self.version == 4 else "58")
            if self.version == 4:
                rule.create_match("icmp").icmp_type = icmp_type
            else:
                rule.create_match("icmp6").icmpv6_type = icmp_type
            rules.append(rule)
        return rules

    def port_rules(self, ports: PortSet, target: str, reject_with: str | None = None) -> list[Any]:
        rules = []
        for protocol, ranges in sorted(_by_protocol(ports).items()):
            for dports in _multiport_chunks(ranges):
                rule = self.rule(target, protocol.label)
                rule.create_match("multiport").dports = dports
                if reject_with:
                    rule.target.reject_with = reject_with if protocol is Protocol.TCP else self.port_unreachable
                rules.append(rule)
        return rules

    @property
    def port_unreachable(self) -> str:
        return "icmp-port-unreachable" if self.version == 4 else "icmp6-port-unreachable"

    def grant_rule(self, opening: Opening) -> Any:
        rule = self.rule("ACCEPT", opening.protocol.label)
        rule.src = f"{opening.address}/{self.host_bits}"
        rule.create_match(opening.protocol.label).dport = str(opening.port)
        rule.create_match("comment").comment = GRANT_COMMENT
        return rule


def _policy_rules(fam: _Family, policy: FirewallPolicy) -> list[Any]:
    lo = fam.rule("ACCEPT")
    lo.in_interface = "lo"
    ct = fam.rule("ACCEPT")
    ct.create_match("conntrack").ctstate = "ESTABLISHED,RELATED"
    rules = [lo, ct, *fam.icmp_rules()]
    if policy.emergency_ssh:
        rules += fam.port_rules(PortSet((PortRange(Protocol.TCP, 22, 22),)), "ACCEPT")
    rules += fam.port_rules(policy.always_open, "ACCEPT")
    if policy.mode == "none":
        return rules
    target = "REJECT" if policy.mode == "reject" else "DROP"
    if policy.protected is not None:
        rules += fam.port_rules(policy.protected, target, "tcp-reset" if target == "REJECT" else None)
    elif target == "REJECT":
        tcp = fam.rule("REJECT", "tcp")
        tcp.target.reject_with = "tcp-reset"
        rest = fam.rule("REJECT")
        rest.target.reject_with = fam.port_unreachable
        rules += [tcp, rest]
    else:
        rules.append(fam.rule("DROP"))
    return rules


def _parse_grant(fam: _Family, rule: Any) -> Opening | None:
    """The opening a rule grants, or None when the rule is not one of sknock's grants."""
    if not any(m.name == "comment" and m.comment == GRANT_COMMENT for m in rule.matches):
        return None
    try:
        network = ipaddress.ip_network(rule.src, strict=True)
        if network.prefixlen != fam.host_bits:
            return None
        protocol = Protocol.from_label(rule.protocol)
        port = next(int(m.dport) for m in rule.matches if m.name == protocol.label)
        return Opening(network.network_address, protocol, port)
    except (ValueError, StopIteration, TypeError, AttributeError):
        return None


class IptablesFirewall(Firewall):
    """Grants as ACCEPT rules in sknock's own legacy iptables chain; see the module docstring."""

    name = NAME
    kernel_expiry = False

    def __init__(self, policy: FirewallPolicy) -> None:
        self.policy = policy
        iptc = load_iptc()
        self._iptc = iptc
        self._families = (_Family(iptc, 4), _Family(iptc, 6))

    def _family(self, opening: Opening) -> _Family:
        return self._families[0] if opening.address.version == 4 else self._families[1]

    def _apply(self, what: str, fam: _Family, change: Any) -> Any:
        """Run ``change(table)`` and commit it as one table replacement, naming the step on failure."""
        try:
            table = fam.table()
            result = change(table)
            table.commit()
            table.refresh()
            return result
        except FirewallError:
            raise
        except Exception as exc:  # iptc raises IPTCError, ValueError, XTablesError...
            raise FirewallError(NAME, f"{what} (IPv{fam.version}) failed: {exc}") from None

    @staticmethod
    def _remove(table: Any) -> None:
        """Remove the jump(s) to SKNOCK and the chain itself, if present."""
        if not table.is_chain(CHAIN):
            return
        for chain in table.chains:
            for rule in list(chain.rules):
                if rule.target.name == CHAIN:
                    chain.delete_rule(rule)
        sknock = next(c for c in table.chains if c.name == CHAIN)
        sknock.flush()
        sknock.delete()

    def setup(self) -> list[Grant]:
        for fam in self._families:
            def install(table: Any, fam: _Family = fam) -> None:
                self._remove(table)
                chain = table.create_chain(CHAIN)
                for rule in _policy_rules(fam, self.policy):
                    chain.append_rule(rule)
                jump = fam.rule_cls()
                jump.create_target(CHAIN)
                next(c for c in table.chains if c.name == "INPUT").insert_rule(jump, 0)

            self._apply(f"installing chain {CHAIN}", fam, install)
        return []

    def _chain(self, table: Any) -> Any:
        if not table.is_chain(CHAIN):
            raise FirewallError(NAME, f"chain {CHAIN} is missing: call setup() first")
        return next(c for c in table.chains if c.name == CHAIN)

    def _find(self, fam: _Family, chain: Any, opening: Opening) -> Any | None:
        return next((r for r in chain.rules if _parse_grant(fam, r) == opening), None)

    def open(self, opening: Opening, duration: float) -> None:
        check_duration(NAME, duration)  # expiry is the daemon's job; the rule just stays until close()
        fam = self._family(opening)

        def add(table: Any) -> None:
            chain = self._chain(table)
            if self._find(fam, chain, opening) is None:
                chain.insert_rule(fam.grant_rule(opening), 0)

        self._apply(f"opening {opening}", fam, add)

    def close(self, opening: Opening) -> None:
        fam = self._family(opening)

        def remove(table: Any) -> None:
            if not table.is_chain(CHAIN):
                return
            chain = self._chain(table)
            for rule in [r for r in chain.rules if _parse_grant(fam, r) == opening]:  # duplicates too
                chain.delete_rule(rule)

        self._apply(f"closing {opening}", fam, remove)

    def apply(
        self,
        opens: Sequence[tuple[Opening, float]],
        closes: Sequence[Opening],
        known: Collection[Opening] | None = None,
    ) -> list[tuple[Opening, FirewallError]]:
        """One table replacement per address family for the whole batch: the chain is read and parsed
        once, instead of once per grant (each commit replaces the whole table, so per-grant commits
        cost O(rules) each).  On failure, one change at a time for that family."""
        failures: list[tuple[Opening, FirewallError]] = []
        for fam in self._families:
            fam_opens = [(o, d) for o, d in opens if o.address.version == fam.version]
            fam_closes = [o for o in closes if o.address.version == fam.version]
            if not fam_opens and not fam_closes:
                continue
            for _, duration in fam_opens:
                check_duration(NAME, duration)

            def change(table: Any, fam: _Family = fam, fam_opens: list[tuple[Opening, float]] = fam_opens,
                       fam_closes: list[Opening] = fam_closes) -> None:
                chain = self._chain(table)
                present: dict[Opening, list[Any]] = {}
                for rule in chain.rules:
                    grant = _parse_grant(fam, rule)
                    if grant is not None:
                        present.setdefault(grant, []).append(rule)
                for opening in fam_closes:
                    for rule in present.pop(opening, []):  # duplicates too
                        chain.delete_rule(rule)
                for opening, _ in fam_opens:
                    if opening not in present:
                        chain.insert_rule(fam.grant_rule(opening), 0)
                        present[opening] = []

            try:
                self._apply(f"applying {len(fam_opens)} opening(s), {len(fam_closes)} closing(s)", fam, change)
            except FirewallError:
                failures += super().apply(fam_opens, fam_closes)
        return failures

    def openings(self) -> list[Opening]:
        found: list[Opening] = []
        for fam in self._families:
            def read(table: Any, fam: _Family = fam) -> list[Opening]:
                if not table.is_chain(CHAIN):
                    return []
                return [o for r in self._chain(table).rules if (o := _parse_grant(fam, r)) is not None]

            found += self._apply(f"listing chain {CHAIN}", fam, read)
        return sorted(set(found), key=lambda o: (o.address.version, int(o.address), o.protocol, o.port))

    def teardown(self) -> None:
        for fam in self._families:
            self._apply(f"removing chain {CHAIN}", fam, self._remove)
