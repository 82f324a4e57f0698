"""The one interface every firewall backend offers the monitor, and the values it speaks in.

The verifier decides *who* may reach *what* and for *how long*, the monitor *when*; a backend only turns
that into kernel state.  Keeping the contract this small (set up, open, close, list, check, restore, tear down) is what
lets the nftables, iptables and command backends be swapped by one config key, and lets the monitor,
the one privileged process that holds a backend, stay small.

Values are frozen dataclasses so a grant can be a dict key and be sent between processes without
anyone mutating it on the way.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from ...addresses import IPAddress
from ...errors import SknockError
from ...ports import PortSet, Protocol

__all__ = ["Opening", "FirewallPolicy", "Firewall", "FirewallError", "Grant", "Held", "PolicyMode", "check_duration"]



class PolicyMode(enum.StrEnum):
    """What the firewall does with traffic to protected ports that no knock opened (config ``firewallPolicy``,
    the original sKnock's option)."""

    NONE = "none"  # leave the firewall's policy alone: a first run locks nobody out
    REJECT = "reject"
    DROP = "drop"


class FirewallError(SknockError):
    """A backend could not do what was asked.  The message names the backend and the step that failed
    (and, for commands, the command's own error output), so an admin can act on the log line alone."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"firewall backend {backend}: {message}")
        self.backend = backend


@dataclass(frozen=True, slots=True)
class Opening:
    """One grant: traffic from ``address`` to local ``protocol``/``port`` is let through.

    Validated here, at the edge, because openings are built from network input (the knock's source
    address, the port named in a certificate) and a bad one must never reach a firewall call.
    """

    address: IPAddress
    protocol: Protocol
    port: int
    # Computed once: the monitor hashes each opening several times per grant, and an
    # ipaddress object hashes through hex() each time.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.address, IPAddress):
            raise FirewallError("-", f"opening address must be an IPv4Address or IPv6Address, not {self.address!r}")
        if not isinstance(self.protocol, Protocol):
            raise FirewallError("-", f"opening protocol must be a Protocol, not {self.protocol!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise FirewallError("-", f"opening port must be an integer 1..65535, not {self.port!r}")
        key = (int(self.address), self.address.version, int(self.protocol), self.port)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.address} -> {self.protocol.label}/{self.port}"


# A grant as the backends hand it over: the opening and the seconds it has left.
Grant = tuple[Opening, float]


@dataclass(frozen=True, slots=True)
class Held:
    """One entry of sknock's grant set or chain as the kernel holds it now, whoever put it there.

    ``opening`` is the grant it is when an :class:`Opening` can say it (one address, tcp or udp, a port
    1..65535), else None -- an element such as ``198.18.9.9 . sctp . 0`` or a rule for a whole
    network, which sknock never writes.  ``text`` names it for the log when ``opening`` cannot (empty:
    the opening names it); ``handle`` is the backend's own way back to this very entry for
    :meth:`Firewall.remove` (not compared)."""

    opening: Opening | None
    text: str = ""
    handle: object = field(default=None, compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        return self.text or str(self.opening)


@dataclass(frozen=True, slots=True)
class FirewallPolicy:
    """What the server's table does with traffic that holds no grant (config ``firewallPolicy``).

    ``protected`` None means every port, as the original sKnock did; a :class:`PortSet` limits the
    reject/drop to those ports so that the rest of the host's services are the admin's business.
    ``emergency_ssh`` keeps tcp/22 reachable so a broken knock setup cannot lock the admin out.
    ``always_open`` is for ports that must stay reachable without a knock, such as the knock port
    itself when the server captures with an ordinary UDP socket.
    """

    mode: PolicyMode
    protected: PortSet | None = None
    emergency_ssh: bool = True
    always_open: PortSet = field(default_factory=lambda: PortSet(()))

    def __post_init__(self) -> None:
        try:  # its value as a string is accepted too, and stored as the enum
            object.__setattr__(self, "mode", PolicyMode(self.mode))
        except ValueError:
            modes = ", ".join(PolicyMode)
            raise FirewallError("-", f"firewallPolicy must be one of {modes}, not {self.mode!r}") from None
        if self.protected is not None and not isinstance(self.protected, PortSet):
            raise FirewallError("-", f"protected ports must be a PortSet or None, not {self.protected!r}")
        if not isinstance(self.always_open, PortSet):
            raise FirewallError("-", f"always_open must be a PortSet, not {self.always_open!r}")


def check_duration(backend: str, duration: float) -> float:
    """Reject durations no kernel or scheduler can honour (NaN, infinite, zero, negative, absurd)."""
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not math.isfinite(duration):
        raise FirewallError(backend, f"open duration must be a finite number of seconds, not {duration!r}")
    if not 0 < duration <= 7 * 24 * 3600:
        raise FirewallError(backend, f"open duration must be more than 0 and at most one week, not {duration!r}")
    return float(duration)


class Firewall(abc.ABC):
    """A firewall backend.  Not thread-safe: the monitor drives it from its one loop.

    ``kernel_expiry`` is True when the kernel itself stops honouring a grant when its time is up
    (nftables set timeouts, iptables ``-m time --datestop``), so access ends on time even if the server
    dies; when False only :meth:`close` ends a grant.

    Stopping the server is not a teardown: the policy stays in the kernel and live grants end on time.
    :meth:`intact` tells when someone else removed or rewrote sknock's table, :meth:`restore` puts it
    back with the grants still due.
    """

    name: str
    kernel_expiry: bool

    @abc.abstractmethod
    def setup(self) -> list[Grant]:
        """Install sknock's policy, replacing in one step whatever an earlier run (stopped, killed) or the
        boot-time include left, and keep that run's grants that are still live, each with the time it has
        left.  Returns those carried-over grants as ``(opening, remaining_seconds)``; a caller that does
        not track them may ignore the value (the kernel, or the grant's own expiry, ends them).  A grant
        whose remaining time cannot be read is never carried over: fail closed."""

    @abc.abstractmethod
    def open(self, opening: Opening, duration: float) -> None:
        """Grant ``opening`` for ``duration`` seconds; if already granted, extend it (refresh expiry)."""

    @abc.abstractmethod
    def close(self, opening: Opening) -> None:
        """Withdraw ``opening``.  Closing something not open is not an error."""

    def apply(
        self,
        opens: Sequence[tuple[Opening, float]],
        closes: Sequence[Opening],
        known: Collection[Opening] | None = None,
    ) -> list[tuple[Opening, FirewallError]]:
        """Close ``closes``, then open (or extend) ``opens``; return what failed, with why (the rest is
        applied).  Backends that can do it in one kernel transaction override this: under load the
        monitor hands over everything its workers asked for since its last turn.  ``known``: the
        openings that may already be in place (the monitor's grant table); the others are new, which
        lets a backend skip the work of replacing them (None: any may exist)."""
        failures: list[tuple[Opening, FirewallError]] = []
        for opening in closes:
            try:
                self.close(opening)
            except FirewallError as exc:
                failures.append((opening, exc))
        for opening, duration in opens:
            try:
                self.open(opening, duration)
            except FirewallError as exc:
                failures.append((opening, exc))
        return failures

    def take_over(self, openings: Sequence[Opening]) -> None:
        """Grants a previous run of the server left open (from its ledger), which this object did not open
        itself: from now on :meth:`close` must act on them.  Nothing to do for a backend that reads its
        grants from the kernel."""
        return None

    @abc.abstractmethod
    def openings(self) -> list[Opening]:
        """The grants in force now, as the kernel (or the backend's memory) holds them."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Remove everything sknock added.  Safe to call more than once.  This opens the protected ports
        to whatever the admin's own ruleset allows: it is for an explicit uninstall, not for a stop."""

    def intact(self) -> bool:
        """Whether sknock's table or chain is still in place as this process last installed it (by
        :meth:`setup` or :meth:`restore`): False once someone removed, replaced or edited it -- ``nft
        flush ruleset``, a firewall service reload, a deleted rule -- and before the first setup.  Cheap
        enough to be called twice a second with thousands of grants; raises :class:`FirewallError` only
        when the kernel cannot be asked at all.

        This default, True, is for backends that own no kernel state (nothing of theirs can vanish);
        every backend with a table or chain overrides it."""
        return True

    def held(self) -> list[Held]:
        """Every entry in sknock's grant set or chain now, as :class:`Held` (the monitor compares them
        with its grant table and removes what no knock granted: :func:`sknock.server.grants.foreign`).
        Raises :class:`FirewallError` when the kernel cannot be asked or sknock's table is not there.

        This default, nothing, is for backends that own no kernel state: what they open lives in the
        admin's tool, which sknock cannot read."""
        return []

    def remove(self, entries: Sequence[Held]) -> list[tuple[Held, FirewallError]]:
        """Take ``entries`` (from :meth:`held`) out of sknock's set or chain, and nothing else; one that
        is gone already is not an error.  Returns what could not be removed, with why."""
        return []

    def restore(self, grants: Sequence[Grant]) -> list[Grant]:
        """Reinstall the policy and exactly ``grants`` (``(opening, remaining_seconds)``) after
        :meth:`intact` said False, whatever is left of sknock's table.  Afterwards :meth:`intact` is True.
        Returns the grants actually installed (a grant with no time left is skipped).

        This default runs :meth:`setup` and then :meth:`apply`; backends that can do it in one kernel
        transaction override it."""
        self.setup()
        live = [(o, float(t)) for o, t in grants if t > 0]
        failed = {o for o, _ in self.apply(live, [], known=set())}
        return [(o, t) for o, t in live if o not in failed]

    def boot_ruleset(self) -> str | None:
        """The text of a file the host's firewall loads at boot so that sknock's policy is in force from
        boot to shutdown, whether or not the server runs (nftables: an include for /etc/nftables.conf);
        None when the backend has no such file (see docs/firewall.md)."""
        return None
