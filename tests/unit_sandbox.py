"""Run a command under what sknock-server.service asks systemd for, as far as one process can impose it on
itself without systemd: only the unit's CapabilityBoundingSet, NoNewPrivileges, MemoryDenyWriteExecute
(the kernel's PR_SET_MDWE) and its SystemCallFilter (the syscall groups of the unit, expanded by
``systemd-analyze syscall-filter``, as a libseccomp allow list answering EPERM like
SystemCallErrorNumber=EPERM).  Run with a Python that has the ``seccomp`` module (Debian's
python3-seccomp, for /usr/bin/python3):

    /usr/bin/python3 tests/unit_sandbox.py UNIT_FILE COMMAND ARGS...

Exit 97 when something cannot be imposed (the caller skips), else it becomes COMMAND.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import sys

CAPS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SETUID": 7, "CAP_SETGID": 6, "CAP_KILL": 5, "CAP_SETPCAP": 8}
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_MDWE = 24, 38, 65


def unit_values(path: str, key: str) -> list[str]:
    values: list[str] = []
    with open(path, encoding="utf-8") as lines:
        text = lines.read().splitlines()
    for line in text:
        if line.startswith(key + "="):
            value = line.split("=", 1)[1].strip()
            values = [] if not value else values + [value]
    return values


def expand(group: str, seen: set[str]) -> tuple[set[str], set[str]]:
    """The syscalls of ``group`` (nested groups expanded)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True,
                         check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                calls |= expand(name, seen)[0]
        else:
            calls.add(name)
    return calls, seen


def allowed(unit: str) -> set[str]:
    calls: set[str] = set()
    for value in unit_values(unit, "SystemCallFilter"):
        deny = value.startswith("~")
        names = value.lstrip("~").split()
        chosen: set[str] = set()
        for name in names:
            chosen |= expand(name, {name})[0] if name.startswith("@") else {name}
        calls = calls - chosen if deny else calls | chosen
    return calls


def main() -> int:
    unit, command = sys.argv[1], sys.argv[2:]
    import seccomp

    libc = ctypes.CDLL(None, use_errno=True)
    keep = {CAPS[c] for value in unit_values(unit, "CapabilityBoundingSet") for c in value.split()}
    with open("/proc/sys/kernel/cap_last_cap") as cap_last:
        last = int(cap_last.read())
    for cap in range(last + 1):
        if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            return 97
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return 97
    if unit_values(unit, "MemoryDenyWriteExecute") == ["yes"] and libc.prctl(PR_SET_MDWE, 1, 0, 0, 0) != 0:
        return 97
    rules = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    for name in sorted(allowed(unit)):
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # a name libseccomp does not know here
            rules.add_rule(seccomp.ALLOW, name)
    rules.load()
    os.execvp(command[0], command)
    return 97


if __name__ == "__main__":
    sys.exit(main())
