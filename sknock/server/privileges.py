"""Least privilege for the server's processes: the monitor's capability drop and the children's drop to
the unprivileged ``user``.  The seccomp filters that follow the drop are :mod:`sknock.server.sandbox`.

The monitor stays uid 0 (its files are root's, 0600 in 0700 folders, so it reads and writes them as their
owner, without CAP_DAC_OVERRIDE) but, once the firewall table, the captures, the control socket and the
knock journal are set up, keeps only the capabilities it still uses (:func:`monitor_capabilities`, each
one justified in docs/privileges.md), in its permitted and effective sets and its bounding set; the
inheritable and ambient sets are emptied.  A capability out of the bounding set cannot come back, not even
by executing a program as root.

A child (worker, CRL fetcher) becomes ``user`` with no supplementary groups, no capability in any set it
can change (the kernel empties the permitted and effective sets at the uid change; the inheritable and
ambient sets are emptied here), and ``no_new_privs``, so that no setuid program or file capability can
raise it again.  Its bounding set is the monitor's: dropping from it needs CAP_SETPCAP, which the monitor
does not keep, and with ``no_new_privs`` and no ``execve`` (the sandbox) it could not be used anyway.

ctypes on the C library (``prctl``, ``capget``, ``capset``: glibc exports all three) rather than a
binding: the few calls are fixed by the kernel's ABI, and python-prctl, the binding that would fit, is no
longer maintained.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SknockError
from .firewall.detect import FirewallBackend

__all__ = [
    "PrivilegeError", "Capabilities", "CAPABILITY_NAMES", "drop_privileges", "capabilities", "restrict_monitor",
    "monitor_capabilities", "set_no_new_privs",
]

#: The capabilities the server names (linux/capability.h), by number.
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAPABILITY_NAMES = {
    CAP_KILL: "CAP_KILL", CAP_SETGID: "CAP_SETGID", CAP_SETUID: "CAP_SETUID", CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_NET_RAW: "CAP_NET_RAW",
}

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_IS_SET = 1
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"


class PrivilegeError(SknockError):
    """Privileges cannot be dropped, or were not: the process must not go on."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.capget.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]
_libc.capset.restype = ctypes.c_int


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> int:
    result: int = _libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        raise PrivilegeError(f"{what} failed: {os.strerror(ctypes.get_errno())}")
    return result


def _last_cap() -> int:
    """The highest capability number this kernel knows (read once, before any sandbox)."""
    try:
        with open(_LAST_CAP_FILE) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one of Linux 5.9 to 6.x


_LAST_CAP = _last_cap()


def _mask(caps: Iterable[int]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def _names(mask: int) -> str:
    names = [CAPABILITY_NAMES.get(cap, f"cap {cap}") for cap in range(64) if mask >> cap & 1]
    return ", ".join(names) or "none"


@dataclass(frozen=True)
class Capabilities:
    """A process's capability sets, as bit masks (bit n: capability n)."""

    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int
    no_new_privs: bool

    def describe(self) -> str:
        """One line for the log: what is kept."""
        return f"capabilities {_names(self.permitted)} (bounding set: {_names(self.bounding)})"

    def beyond(self, keep: Iterable[int]) -> str | None:
        """The names of the capabilities in the bounding set beyond ``keep``, or None."""
        extra = self.bounding & ~_mask(keep)
        return _names(extra) if extra else None


def capabilities() -> Capabilities:
    """This process's capabilities now (system calls only: it works inside the sandbox too)."""
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capget failed: {os.strerror(ctypes.get_errno())}")

    def join(field: str) -> int:
        return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

    bounding = _mask(cap for cap in range(_LAST_CAP + 1) if _libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) == 1)
    ambient = _mask(
        cap for cap in range(_LAST_CAP + 1) if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_IS_SET, cap, 0, 0) == 1
    )
    no_new_privs = _libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1
    return Capabilities(join("effective"), join("permitted"), join("inheritable"), bounding, ambient, no_new_privs)


def _capset(keep: int) -> None:
    """Permitted and effective: ``keep``; inheritable: none."""
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for word in (0, 1):
        part = keep >> (32 * word) & 0xFFFFFFFF
        data[word].effective = data[word].permitted = part
        data[word].inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: from now on no execve (setuid program, file capabilities) can add a privilege."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def monitor_capabilities(backend: str) -> frozenset[int]:
    """What the monitor keeps after setup with the firewall backend named ``backend`` (docs/privileges.md
    says why each):

    * CAP_NET_ADMIN: every change to the firewall;
    * CAP_SETUID, CAP_SETGID: starting a replacement worker (or CRL fetcher) as ``user``;
    * CAP_KILL: signalling those children, which run as another uid (stop, SIGHUP, SIGKILL);
    * CAP_NET_RAW with the iptables backend only: libiptc opens a raw socket for every table it reads or
      writes; and with the command backend, whose commands (iptables, mostly) inherit the bounding set.
      The captures are opened once, before the drop, and never again.
    """
    keep = {CAP_NET_ADMIN, CAP_SETUID, CAP_SETGID, CAP_KILL}
    if backend in (FirewallBackend.IPTABLES, FirewallBackend.COMMAND):
        keep.add(CAP_NET_RAW)
    return frozenset(keep)


def restrict_monitor(keep: Iterable[int]) -> Capabilities:
    """Keep only ``keep`` (capability numbers): drop every other one from the bounding set first (which
    needs CAP_SETPCAP, still held), then set permitted and effective to ``keep`` and empty the inheritable
    and ambient sets.  Checks the result; returns it.

    Started without CAP_SETPCAP (a service manager's bounding set without it), the bounding set is left as
    it is -- what a service manager gave, the caller logs -- and the rest is done all the same."""
    wanted = _mask(keep)
    held = capabilities()
    can_bound = bool(held.effective >> CAP_SETPCAP & 1)
    for cap in range(_LAST_CAP + 1):
        if can_bound and not wanted >> cap & 1 and held.bounding >> cap & 1:
            _prctl(_PR_CAPBSET_DROP, cap, f"dropping capability {cap} from the bounding set")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clearing the ambient capabilities")
    _capset(wanted & held.permitted)
    now = capabilities()
    extra_bounding = now.bounding & ~wanted if can_bound else 0
    if now.permitted & ~wanted or now.effective & ~wanted or extra_bounding or now.inheritable or now.ambient:
        raise PrivilegeError(f"capabilities were not dropped: {now}")
    return now


def drop_privileges(user: str) -> tuple[int, int]:
    """Become ``user`` for good: no supplementary groups, its gid and uid, no capability, and no way back
    through setuid programs (PR_SET_NO_NEW_PRIVS).  Sockets opened before keep working.  Returns (uid, gid)."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise PrivilegeError(f"user {user!r} does not exist") from None
    uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0:
        raise PrivilegeError(f"user {user!r} is root: the worker must run unprivileged")
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot drop privileges to {user} ({uid}:{gid}): {exc}") from None
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clearing the ambient capabilities")
    _capset(0)
    set_no_new_privs()
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise PrivilegeError("privileges were not dropped")
    held = capabilities()
    if held.effective or held.permitted or held.inheritable or held.ambient or not held.no_new_privs:
        raise PrivilegeError(f"capabilities left after dropping privileges: {held}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("could regain root after dropping privileges")
    return uid, gid
