"""Which backend to use on this host, and the factory that builds it.

The decision is a pure function of a :class:`HostProbe` (what the host has), so every combination
can be tested without owning such a host; :func:`probe_host` is the only part that looks at the
system.

Why auto prefers nftables: on current distributions (Debian 12 and later) ``iptables`` is the
iptables-nft shim and the real firewall is nftables.  python-iptables writes *legacy* x_tables, whose
ACCEPT cannot override a drop in the nft ruleset, so it would silently do nothing useful there.  The
iptables backend is chosen only where the host's iptables is the legacy one.
"""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Literal

from .base import Firewall, FirewallError, FirewallPolicy

__all__ = [
    "BACKENDS", "FirewallBackend", "HostProbe", "probe_host", "decide_backend", "choose_backend", "make_firewall",
]


class FirewallBackend(enum.StrEnum):
    """Which mechanism inserts and removes the per-client rules (config ``firewallBackend``)."""

    AUTO = "auto"  # the one this host's firewall needs: decide_backend
    NFTABLES = "nftables"
    IPTABLES = "iptables"
    COMMAND = "command"  # run openCommand / closeCommand templates


BACKENDS = (FirewallBackend.NFTABLES, FirewallBackend.IPTABLES, FirewallBackend.COMMAND)

IptablesFlavour = Literal["nf_tables", "legacy", "missing", "unknown"]


@dataclass(frozen=True, slots=True)
class HostProbe:
    """What the host offers, as far as choosing a backend goes."""

    iptables: IptablesFlavour  # what ``iptables --version`` says it is
    legacy_tables: bool  # the kernel has legacy x_tables loaded (/proc/net/ip_tables_names)
    libnftables: bool  # pip-nftables imports and libnftables.so.1 loads
    iptc: bool  # python-iptables imports


def _iptables_flavour(timeout: float = 5.0) -> IptablesFlavour:
    binary = shutil.which("iptables")
    if binary is None:
        return "missing"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = out.stdout + out.stderr
    if "nf_tables" in text:
        return "nf_tables"
    if "legacy" in text:
        return "legacy"
    return "unknown"  # iptables before 1.8 prints no flavour; it is legacy, but let the admin say so


def _loads(name: str) -> bool:
    try:
        if name == "nftables":
            from .nftables import load_libnftables

            load_libnftables()
        else:
            from .iptables import load_iptc

            load_iptc()
    except FirewallError:
        return False
    return True


def probe_host() -> HostProbe:
    """Look at this host (runs ``iptables --version`` and tries to load the two libraries)."""
    return HostProbe(
        iptables=_iptables_flavour(),
        legacy_tables=os.path.exists("/proc/net/ip_tables_names"),
        libnftables=_loads("nftables"),
        iptc=_loads("iptables"),
    )


def _backend(name: str) -> FirewallBackend:
    """``name`` as a :class:`FirewallBackend`; its value as a string is accepted too (the test driver passes
    one from its command line)."""
    try:
        return FirewallBackend(name)
    except ValueError:
        raise FirewallError(str(name), f"unknown firewall backend {name!r}: expected one of "
                                       f"{', '.join(FirewallBackend)}") from None


def decide_backend(name: FirewallBackend, probe: HostProbe) -> FirewallBackend:
    """The backend to use for config value ``name`` on a host described by ``probe``: never AUTO."""
    backend = _backend(name)
    if backend is FirewallBackend.NFTABLES and not probe.libnftables:
        raise FirewallError("nftables", "libnftables cannot be loaded: install Debian package libnftables1 "
                                        "and PyPI package pip-nftables")
    if backend is FirewallBackend.IPTABLES and not probe.iptc:
        raise FirewallError("iptables", "python-iptables cannot be loaded: install PyPI package python-iptables "
                                        "and Debian package iptables")
    if backend is not FirewallBackend.AUTO:
        return backend
    if probe.iptables == "legacy" and probe.iptc:
        return FirewallBackend.IPTABLES
    nft_host = probe.iptables == "nf_tables" or not probe.legacy_tables
    if nft_host and probe.libnftables:
        return FirewallBackend.NFTABLES
    if probe.iptables == "legacy":
        raise FirewallError("auto", "this host uses legacy iptables but python-iptables cannot be loaded: "
                                    "install PyPI package python-iptables")
    if nft_host:
        raise FirewallError("auto", "this host uses nftables but libnftables cannot be loaded: install Debian "
                                    "package libnftables1 and PyPI package pip-nftables")
    raise FirewallError("auto", f"cannot tell which firewall this host uses (iptables: {probe.iptables}, legacy "
                                "tables loaded): set the backend to nftables, iptables or command explicitly")


def choose_backend(name: FirewallBackend, probe: HostProbe | None = None) -> FirewallBackend:
    """:func:`decide_backend` on this host (probed unless ``probe`` is given)."""
    return decide_backend(name, probe if probe is not None else probe_host())


_OPTIONS: dict[FirewallBackend, set[str]] = {
    FirewallBackend.NFTABLES: {"priority"},
    FirewallBackend.IPTABLES: set(),
    FirewallBackend.COMMAND: {"open_command", "close_command", "timeout"},
}


def make_firewall(backend: FirewallBackend, policy: FirewallPolicy, **options: Any) -> Firewall:
    """Build ``backend`` (AUTO is resolved first; an unknown value is a :class:`FirewallError`).
    ``options`` go to the backend: nftables takes ``priority``; command takes ``open_command``,
    ``close_command`` and ``timeout``; iptables takes none.  An unknown option is a
    :class:`FirewallError`, not a TypeError."""
    backend = _backend(backend)
    if backend is FirewallBackend.AUTO:
        backend = choose_backend(backend)
    unknown = sorted(set(options) - _OPTIONS[backend])
    if unknown:
        raise FirewallError(backend, f"unknown option(s) {', '.join(unknown)}; accepted: "
                                     f"{', '.join(sorted(_OPTIONS[backend])) or 'none'}")
    if backend is FirewallBackend.NFTABLES:
        from .nftables import NftablesFirewall

        return NftablesFirewall(policy, **options)
    if backend is FirewallBackend.IPTABLES:
        from .iptables import IptablesFirewall

        return IptablesFirewall(policy)
    from .command import CommandFirewall

    for required in ("open_command", "close_command"):
        if required not in options:
            raise FirewallError(backend, f"option {required} is required: the command this backend runs for "
                                         "each grant (see sknock.server.firewall.command)")
    return CommandFirewall(policy, **options)
