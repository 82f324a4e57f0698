"""Firewall backends: the server's edge that turns a verified knock into kernel state.

One interface (:class:`Firewall`: setup, open, close, openings, teardown) and three backends --
nftables (preferred: the kernel expires grants itself), legacy iptables, and admin-supplied
commands.  :func:`make_firewall` builds the one the config names (or the one "auto" picks).
Backends are imported lazily by the factory so a host without libnftables or python-iptables can
still use the others.
"""

from .base import Firewall, FirewallError, FirewallPolicy, Opening
from .detect import BACKENDS, HostProbe, choose_backend, decide_backend, make_firewall, probe_host

__all__ = [
    "Firewall",
    "FirewallError",
    "FirewallPolicy",
    "Opening",
    "BACKENDS",
    "HostProbe",
    "choose_backend",
    "decide_backend",
    "make_firewall",
    "probe_host",
]
