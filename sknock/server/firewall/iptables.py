"""iptables backend: a chain ``SKNOCK`` in the legacy x_tables filter tables, through python-iptables.

For hosts whose firewall is still legacy iptables (see detect.py).  Layout, the same for IPv4
(``iptc.Table``) and IPv6 (``iptc.Table6``)::

    INPUT  1: -j SKNOCK
    SKNOCK:   grants (newest first)  -s ADDR -p PROTO --dport PORT -m time --datestop UTC
                                     -m comment --comment sknock-grant -j ACCEPT
              -i lo -j ACCEPT
              -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
              ICMP the network needs -j ACCEPT
              tcp/22 (emergency ssh), always_open -j ACCEPT
              protected ports (or everything) -j REJECT / DROP  (nothing with policy none)

Grants are inserted at the top of the chain: every rule before the final verdicts is an ACCEPT, and
ACCEPTs commute, so a grant's place among them does not matter, while inserting at 1 needs no index
bookkeeping.  The comment marks grants so :meth:`openings` can tell them from the fixed rules.

Kernel expiry (``kernel_expiry`` True): each grant also matches ``-m time --datestop`` (xt_time), the
last whole second (UTC; no ``--kerneltz``) in which it holds.  xt_time compares the packet's arrival
time in whole seconds of UTC with the datestop and matches while it is not later, so a grant of D
seconds opened at t holds until ceil(t + D) -- to the second, like the nftables backend's whole-second
timeouts -- and after that the kernel ignores the rule even if the server is dead.  The rule itself
stays until the monitor closes it or the next :meth:`setup` drops it.  An extension rewrites the rule
with its new datestop.

A rule someone adds to ``SKNOCK`` by hand changes the chain's length, which :meth:`IptablesFirewall.intact`
compares; :meth:`IptablesFirewall.held` lists every rule of the chain that is not one of the policy
rules as installed (grant rules, and anything else), so that the monitor can name and remove what it
never granted (:meth:`IptablesFirewall.remove`) -- a rule replaced in place (``iptables -R``) included,
which keeps the length.  It decodes every rule through python-iptables (about 0.16 ms a rule), so the
monitor runs it only every few seconds.

python-iptables writes legacy tables only; on a host whose firewall is nftables (iptables-nft) its
ACCEPT cannot override a drop in the nft ruleset -- use the nftables backend there.
"""

from __future__ import annotations

import calendar
import ipaddress
import math
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ...ports import PortRange, PortSet, Protocol
from .base import Firewall, FirewallError, FirewallPolicy, Grant, Held, Opening, check_duration

__all__ = ["IptablesFirewall", "load_iptc", "datestop_for", "CHAIN", "GRANT_COMMENT"]

NAME = "iptables"
CHAIN = "SKNOCK"
GRANT_COMMENT = "sknock-grant"
_MULTIPORT_SLOTS = 15  # the multiport match takes at most 15 ports, a range counting as two
_DATESTOP_FORMAT = "%Y-%m-%dT%H:%M:%S"  # what xt_time's --datestop takes and iptables-save prints

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


def datestop_for(now: float, seconds: float) -> int:
    """The ``--datestop`` (seconds since the epoch, UTC) of a grant of ``seconds`` from ``now``: xt_time
    matches while the whole second of a packet's arrival is not later than it, so the grant holds until
    ``datestop + 1 = ceil(now + seconds)``."""
    return math.ceil(now + seconds) - 1


def _datestop_text(stop: int) -> str:
    return time.strftime(_DATESTOP_FORMAT, time.gmtime(stop))


def _set_datestop(match: Any, stop: int) -> None:
    """Give an xt_time match its datestop.  libxt_time parses the date in this process and, to read it
    as UTC, does ``setenv("TZ", "UTC"); tzset()`` -- which would leave the whole server (its log
    timestamps) on UTC from the first grant on.  Put the process's time zone back afterwards."""
    saved = os.environ.get("TZ")
    try:
        match.datestop = _datestop_text(stop)
    finally:
        if saved is None:
            os.unsetenv("TZ")
        else:
            os.putenv("TZ", saved)
        time.tzset()


def _datestop_value(text: str) -> int:
    return calendar.timegm(time.strptime(text, _DATESTOP_FORMAT))


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

    def grant_rule(self, opening: Opening, stop: int) -> Any:
        rule = self.rule("ACCEPT", opening.protocol.label)
        rule.src = f"{opening.address}/{self.host_bits}"
        rule.create_match(opening.protocol.label).dport = str(opening.port)
        _set_datestop(rule.create_match("time"), stop)
        rule.create_match("comment").comment = GRANT_COMMENT
        return rule

    @staticmethod
    def tail(table: Any, chain: str, size: int) -> tuple[int, list[Any]]:
        """How many rules ``chain`` holds, and its last ``size`` entries, walking libiptc's cache of the
        table with its own iterator: python-iptables' ``Chain.rules`` would decode every rule (seconds
        with thousands of grants), and its ``next_rule`` re-wraps each pointer in a Python object.
        Uses python-iptables' handle and function table, which it does not document."""
        lib, handle = table._iptc, table._handle
        entry = lib.iptc_first_rule(chain.encode(), handle)
        last: deque[Any] = deque(maxlen=size)
        count = 0
        while entry:
            count += 1
            last.append(entry)
            entry = lib.iptc_next_rule(entry, handle)
        return count, [e[0] for e in last]


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


def _parse_grant(fam: _Family, rule: Any) -> tuple[Opening, list[Any]] | None:
    """The opening a rule grants (and the rule's matches, for :func:`_datestop_of`), or None when the
    rule is not one of sknock's grants."""
    matches = rule.matches
    if not any(m.name == "comment" and m.comment == GRANT_COMMENT for m in matches):
        return None
    try:
        network = ipaddress.ip_network(rule.src, strict=True)
        if network.prefixlen != fam.host_bits:
            return None
        protocol = Protocol.from_label(rule.protocol)
        port = next(int(m.dport) for m in matches if m.name == protocol.label)
        return Opening(network.network_address, protocol, port), matches
    except (ValueError, StopIteration, TypeError, AttributeError):
        return None


def _datestop_of(matches: list[Any]) -> int | None:
    """A grant rule's datestop; None for a rule without one (as sknock wrote them before it used
    xt_time).  Read only where needed: it costs a call into libxt_time's printer per rule."""
    for m in matches:
        if m.name == "time":
            try:
                return _datestop_value(m.datestop)
            except (ValueError, TypeError):
                return None
    return None


def _rule_text(fam: _Family, rule: Any) -> str:
    """A rule that is neither policy nor a grant, for the log: its source, protocol and port, and target."""
    try:
        source = str(ipaddress.ip_network(rule.src, strict=False))
    except ValueError:
        source = str(rule.src)
    protocol = rule.protocol if rule.protocol not in (None, "", "ip", "ipv6") else "any protocol"
    ports = [m.dport for m in rule.matches if m.name in ("tcp", "udp", "multiport") and m.dport]
    ports += [m.dports for m in rule.matches if m.name == "multiport" and m.dports]
    target = rule.target.name if rule.target else "no target"
    where = f"{protocol}/{','.join(ports)}" if ports else protocol
    return f"{source} -> {where} (rule in {CHAIN}, IPv{fam.version}, -j {target})"


def _params(extension: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(sorted((k, tuple(v)) for k, v in extension.get_all_parameters().items()))


def _describe(rule: Any) -> tuple[Any, ...]:
    """What a rule matches and does, comparable between two reads of the table (counters left out)."""
    target = rule.target
    return (rule.src, rule.dst, rule.protocol, rule.in_interface, rule.out_interface,
            tuple((m.name, _params(m)) for m in rule.matches),
            target.name if target else None, _params(target) if target else ())


@dataclass(frozen=True)
class _Installed:
    """One family's chain as this process last left it, for :meth:`IptablesFirewall.intact`."""

    jump: tuple[Any, ...]  # INPUT's first rule
    policy: tuple[tuple[Any, ...], ...]  # the chain's last rules: the policy
    count: int  # rules in the chain, grants included


class IptablesFirewall(Firewall):
    """Grants as timed ACCEPT rules in sknock's own legacy iptables chain; see the module docstring."""

    name = NAME
    kernel_expiry = True

    def __init__(self, policy: FirewallPolicy, *, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        iptc = load_iptc()
        self._iptc = iptc
        self._families = (_Family(iptc, 4), _Family(iptc, 6))
        self._clock = clock  # wall-clock time: datestops are UTC dates
        self._installed: dict[int, _Installed] = {}  # by IP version; see intact()
        self._tampered: set[int] = set()  # families whose chain was found gone since setup/restore

    def _family(self, opening: Opening) -> _Family:
        return self._families[0] if opening.address.version == 4 else self._families[1]

    def _apply(self, what: str, fam: _Family, change: Any, *, write: bool = True, track: bool = True) -> Any:
        """Run ``change(table)`` and commit it as one table replacement, naming the step on failure
        (``write`` False: a read, nothing to commit).

        ``track``, for a change to the grants: the number of rules :meth:`intact` expects moves by what
        this change added or removed, no more, so a difference someone else made before it -- an
        ``iptables-restore`` without sknock's grants, a rule added by hand -- stays visible (a chain
        gone altogether is noted for :meth:`intact` as it is)."""
        try:
            table = fam.table()
            if not write:
                return change(table)
            installed = self._installed.get(fam.version) if track else None
            before = None
            if installed and table.is_chain(CHAIN):
                before = fam.tail(table, CHAIN, 0)[0]
            elif installed:
                self._tampered.add(fam.version)
            result = change(table)
            table.commit()
            table.refresh()
            if installed and before is not None and table.is_chain(CHAIN):
                expected = installed.count + fam.tail(table, CHAIN, 0)[0] - before
                self._installed[fam.version] = _Installed(installed.jump, installed.policy, expected)
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

    def _install(self, what: str, grants: Callable[[_Family, Any], dict[Opening, int]]) -> list[Grant]:
        """Per family, :meth:`_install_family`; returns the grants installed with their remaining time."""
        kept: dict[Opening, int] = {}
        for fam in self._families:
            kept.update(self._install_family(what, fam, grants))
        now = self._clock()
        return [(opening, stop + 1 - now) for opening, stop in kept.items()]

    def _install_family(self, what: str, fam: _Family,
                        grants: Callable[[_Family, Any], dict[Opening, int]]) -> dict[Opening, int]:
        """One table replacement: the leftover chain and jumps out, the policy and the grants
        ``grants(family, table)`` names (opening -> datestop) in, the jump first in INPUT; then remember
        the result for :meth:`intact`.  If that fails, the policy alone first (the ports must not stay
        open because of one grant), then the grants one by one."""
        wanted: dict[Opening, int] = {}

        def install(table: Any, with_grants: bool = True) -> None:
            if with_grants:
                wanted.update(grants(fam, table))
            self._remove(table)
            chain = table.create_chain(CHAIN)
            for rule in _policy_rules(fam, self.policy):
                chain.append_rule(rule)
            for opening, stop in wanted.items() if with_grants else ():
                chain.insert_rule(fam.grant_rule(opening, stop), 0)
            jump = fam.rule_cls()
            jump.create_target(CHAIN)
            next(c for c in table.chains if c.name == "INPUT").insert_rule(jump, 0)

        self._installed.pop(fam.version, None)
        self._tampered.discard(fam.version)
        one_by_one = False
        try:
            self._apply(what, fam, install, track=False)
        except FirewallError:
            if not wanted:
                raise
            self._apply(what, fam, lambda table: install(table, with_grants=False), track=False)
            one_by_one = True
        size = len(_policy_rules(fam, self.policy))
        self._installed[fam.version] = self._apply(
            f"reading chain {CHAIN}", fam, lambda table: self._read_installed(fam, table, size), write=False)
        if not one_by_one:
            return wanted
        kept: dict[Opening, int] = {}
        for opening, stop in wanted.items():
            try:
                self._change(fam, {opening: stop}, [])
            except FirewallError:
                continue  # not installed: fail closed
            kept[opening] = stop
        return kept

    def _read_installed(self, fam: _Family, table: Any, policy_size: int) -> _Installed:
        count, last = fam.tail(table, CHAIN, policy_size) if table.is_chain(CHAIN) else (0, [])
        chain = self._iptc.Chain(table, CHAIN)
        policy = tuple(_describe(table.create_rule(entry, chain)) for entry in last)
        first = table.first_rule("INPUT")
        jump = _describe(table.create_rule(first, self._iptc.Chain(table, "INPUT"))) if first else ()
        return _Installed(jump, policy, count)

    def setup(self) -> list[Grant]:
        """Replace a leftover chain (per family, in one table replacement) and keep its grants whose
        datestop has not passed, with the same datestop; grants without one (sknock before xt_time)
        and the rest are dropped."""
        now = self._clock()

        def live(fam: _Family, table: Any) -> dict[Opening, int]:
            keep: dict[Opening, int] = {}
            if table.is_chain(CHAIN):
                for rule in self._chain(table).rules:
                    grant = _parse_grant(fam, rule)
                    stop = _datestop_of(grant[1]) if grant is not None else None
                    if grant is not None and stop is not None and stop + 1 > now:
                        keep[grant[0]] = max(stop, keep.get(grant[0], stop))
            return keep

        return self._install(f"installing chain {CHAIN}", live)

    def restore(self, grants: Sequence[Grant]) -> list[Grant]:
        """Reinstall the policy with exactly ``grants``, each until ``datestop_for(now, remaining)``; one
        table replacement per family."""
        now = self._clock()
        stops: dict[Opening, int] = {}
        for opening, remaining in grants:
            if remaining > 0:
                stops[opening] = datestop_for(now, check_duration(NAME, remaining))
        return self._install(f"restoring chain {CHAIN}",
                             lambda fam, _: {o: t for o, t in stops.items() if o.address.version == fam.version})

    def intact(self) -> bool:
        """True while, in both families, INPUT's first rule is the jump to SKNOCK (an ACCEPT ahead of it
        in legacy INPUT would be final and bypass sknock), the chain ends with the policy rules as
        installed, and it holds as many rules as this process left in it (so a reload that drops the
        grants, or a rule added by hand, is noticed).  Its cost is almost all libiptc reading the table from the kernel
        (iptc_init), which grows with the number of grant rules; rules are counted on libiptc's cache without
        being parsed, and only the policy rules and INPUT's first are decoded."""
        for fam in self._families:
            installed = self._installed.get(fam.version)
            if installed is None or fam.version in self._tampered:
                return False

            def check(table: Any, fam: _Family = fam, installed: _Installed = installed) -> bool:
                if not table.is_chain(CHAIN):
                    return False
                return self._read_installed(fam, table, len(installed.policy)) == installed

            if not self._apply(f"checking chain {CHAIN}", fam, check, write=False):
                return False
        return True

    def held(self) -> list[Held]:
        """Every rule of sknock's chain, in both families, that is not a policy rule as installed: grant
        rules (written by sknock or not) as their opening, anything else with a description of its own.
        A rule the same as a policy rule is policy, wherever it is (it lets in nothing more).  Raises
        :class:`FirewallError` before :meth:`setup`, or when the chain cannot be read."""
        held: list[Held] = []
        for fam in self._families:
            installed = self._installed.get(fam.version)
            if installed is None:
                raise FirewallError(NAME, f"chain {CHAIN} (IPv{fam.version}) is not installed by this process")
            policy = set(installed.policy)

            def read(table: Any, fam: _Family = fam, policy: set[tuple[Any, ...]] = policy) -> list[Held]:
                found = []
                for rule in self._chain(table).rules:
                    grant = _parse_grant(fam, rule)
                    if grant is not None:
                        found.append(Held(grant[0], "", (fam.version, _describe(rule))))
                    elif (description := _describe(rule)) not in policy:
                        found.append(Held(None, _rule_text(fam, rule), (fam.version, description)))
                return found

            held += self._apply(f"listing chain {CHAIN}", fam, read, write=False)
        return held

    def remove(self, entries: Sequence[Held]) -> list[tuple[Held, FirewallError]]:
        """Delete these rules (from :meth:`held`) from sknock's chain, one commit per family: each rule of
        the chain as read now that matches and does what one of them did (a rule that is gone already
        is not there to delete).  The count :meth:`intact` compares is left as it was: the chain is back
        to what this process left in it once what someone added is out."""
        failures: list[tuple[Held, FirewallError]] = []
        for fam in self._families:
            mine = [e for e in entries if isinstance(e.handle, tuple) and e.handle[0] == fam.version]
            if not mine:
                continue
            doomed = {entry.handle[1] for entry in mine}  # type: ignore[index]

            def change(table: Any, doomed: set[tuple[Any, ...]] = doomed) -> None:
                chain = self._chain(table)
                for rule in chain.rules:
                    if _describe(rule) in doomed:
                        chain.delete_rule(rule)

            try:
                self._apply(f"removing {len(mine)} rule(s) no knock granted", fam, change, track=False)
            except FirewallError as exc:
                failures += [(entry, exc) for entry in mine]
        return failures

    def _chain(self, table: Any) -> Any:
        if not table.is_chain(CHAIN):
            raise FirewallError(NAME, f"chain {CHAIN} is missing: call setup() first")
        return self._iptc.Chain(table, CHAIN)

    def open(self, opening: Opening, duration: float) -> None:
        """Grant ``opening`` until now + ``duration`` (a ``--datestop`` rule, so the kernel ends it on time);
        an existing grant gets the new datestop.  Raises :class:`FirewallError`."""
        stop = datestop_for(self._clock(), check_duration(NAME, duration))
        self._change(self._family(opening), {opening: stop}, [])

    def close(self, opening: Opening) -> None:
        """Remove ``opening``'s rule, if there is one; raises :class:`FirewallError`."""
        self._change(self._family(opening), {}, [opening])

    def apply(
        self,
        opens: Sequence[tuple[Opening, float]],
        closes: Sequence[Opening],
        known: Collection[Opening] | None = None,
    ) -> list[tuple[Opening, FirewallError]]:
        """One table replacement per address family for the whole batch: the chain is read and parsed
        once, instead of once per grant (each commit replaces the whole table, so per-grant commits
        cost O(rules) each).  On failure, one change at a time for that family."""
        now = self._clock()
        stops = [(o, datestop_for(now, check_duration(NAME, d))) for o, d in opens]
        failures: list[tuple[Opening, FirewallError]] = []
        for fam in self._families:
            fam_opens = {o: t for o, t in stops if o.address.version == fam.version}
            fam_closes = [o for o in closes if o.address.version == fam.version]
            if not fam_opens and not fam_closes:
                continue
            try:
                self._change(fam, fam_opens, fam_closes)
            except FirewallError:
                for opening, stop in fam_opens.items():
                    try:
                        self._change(fam, {opening: stop}, [])
                    except FirewallError as exc:
                        failures.append((opening, exc))
                for opening in fam_closes:
                    try:
                        self._change(fam, {}, [opening])
                    except FirewallError as exc:
                        failures.append((opening, exc))
        return failures

    def _change(self, fam: _Family, opens: dict[Opening, int], closes: list[Opening]) -> None:
        """Close ``closes`` and put ``opens`` (opening -> datestop) in place, in one commit.  A grant
        already there with the same datestop stays as it is; with another one it is rewritten."""

        def change(table: Any) -> None:
            if not opens and not table.is_chain(CHAIN):
                return  # closing in a chain that is gone: nothing to close
            chain = self._chain(table)
            present: dict[Opening, list[tuple[Any, list[Any]]]] = {}
            for rule in chain.rules:
                grant = _parse_grant(fam, rule)
                if grant is not None:
                    present.setdefault(grant[0], []).append((rule, grant[1]))
            for opening in closes:
                for rule, _ in present.pop(opening, []):  # duplicates too
                    chain.delete_rule(rule)
            for opening, stop in opens.items():
                rules = present.pop(opening, [])
                if len(rules) == 1 and _datestop_of(rules[0][1]) == stop:
                    continue
                for rule, _ in rules:
                    chain.delete_rule(rule)
                chain.insert_rule(fam.grant_rule(opening, stop), 0)

        if len(opens) + len(closes) == 1:
            what = f"opening {next(iter(opens))}" if opens else f"closing {closes[0]}"
        else:
            what = f"applying {len(opens)} opening(s), {len(closes)} closing(s)"
        self._apply(what, fam, change)

    def expiries(self) -> dict[Opening, float | None]:
        """Each grant the kernel still honours and the seconds it has left (None: a rule without a
        datestop, left by sknock before it used xt_time)."""
        now = self._clock()
        found: dict[Opening, float | None] = {}
        for fam in self._families:
            def read(table: Any, fam: _Family = fam) -> list[tuple[Opening, int | None]]:
                if not table.is_chain(CHAIN):
                    return []
                return [(g[0], _datestop_of(g[1])) for r in self._chain(table).rules
                        if (g := _parse_grant(fam, r)) is not None]

            for opening, stop in self._apply(f"listing chain {CHAIN}", fam, read, write=False):
                if stop is None:
                    found[opening] = None
                elif stop + 1 > now:
                    found[opening] = max(stop + 1 - now, found.get(opening) or 0.0)
        return found

    def openings(self) -> list[Opening]:
        """The grants whose rules are in sknock's chain and not yet past their datestop."""
        return sorted(self.expiries(), key=lambda o: (o.address.version, int(o.address), o.protocol, o.port))

    def teardown(self) -> None:
        """Remove sknock's chain and its jump in every family: the protected ports fall back to the host's
        own rules.  For ``sknock-server teardown``, never for a stop."""
        self._installed.clear()
        for fam in self._families:
            self._apply(f"removing chain {CHAIN}", fam, self._remove, track=False)
