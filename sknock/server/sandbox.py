"""The seccomp filters of the server's unprivileged children, loaded once a child has dropped to ``user``
(:func:`sknock.server.privileges.drop_privileges`) and set itself up.

A worker may, from then on, only: read datagrams from the sockets it already holds, run the parser and
the crypto (memory, the random source, the clock, futexes), talk to the monitor over its channel, write
its log to the descriptors it already holds, wait, handle signals and exit.  Anything else kills the
process (SECCOMP_RET_KILL_PROCESS: the monitor sees SIGSYS and starts a new worker, at a bounded rate):
``execve``, ``socket``, ``connect``, ``bind``, ``ptrace``, a signal to another process, a new mapping of
executable memory, and every call not named here.  Opening or looking up a file (``open``, ``openat``,
``stat``...) fails with EPERM instead: the one thing Python does there by itself is a late import, a bug
of ours that a remote sender might reach; failing it costs that one knock (refused as internal-error,
logged), while killing would let that sender keep the workers restarting.  Code run by an attacker gains
nothing from an EPERM.  So everything a worker needs is imported before the filter is loaded: this
module imports what the code would import late (and the seccomp binding itself) when the monitor
imports it, as root, before any child is forked -- after the drop to ``user`` a child may not even be
able to read the interpreter's own library folder.

The CRL fetcher speaks HTTP(S) through requests, urllib3, ssl and the C library's resolver (which may
load NSS modules and read /etc files on each lookup, and reads the CA bundle on each TLS connection): its
filter is the worker's, plus new sockets (IPv4, IPv6 for HTTP; Unix and netlink for the resolver),
``connect``, files opened read-only and the stat family, and executable mappings (NSS modules are loaded
on first use).  Its default action is EPERM, so an unforeseen call in that larger code fails one fetch
(logged, retried next interval); the calls that would let it out of its box still kill it: ``execve``,
``execveat``, ``fork``, ``ptrace``, ``process_vm_writev``, a signal to another process, removing,
renaming or changing a file, ``setuid`` and the like, ``mount``, ``bpf``, ``unshare``, ...  Opening a
file for writing fails (EPERM): it writes nothing itself, the monitor writes what it fetched.

The metrics server parses the HTTP of whoever reaches its port.  Its filter (default: kill) lets it
accept on its own listening socket only, receive and send on what it accepted and on its channel from the
monitor, write its log, wait, start threads (``clone`` with ``CLONE_THREAD`` only; ``clone3``, whose flags
seccomp cannot see, answers ENOSYS and the C library falls back to ``clone``), use memory (never
executable), futexes and the clock, and exit.  A file lookup fails with EPERM as in a worker.  It is loaded
in the child's only thread, before the first scrape thread starts (threads inherit it; the filter is not
synchronised into threads that already exist).  Killed, the child is replaced by the monitor like any.

libseccomp through pyseccomp (ctypes): a pure-Python wheel installs into any virtualenv with pip, and
needs only the C library libseccomp2 that every systemd host has; Debian's python3-seccomp is compiled
for Debian's own interpreter only.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 -- a name in a message may be decoded as IDNA, late
import encodings.latin_1  # noqa: F401
import encodings.utf_8  # noqa: F401
import errno
import os
import socket
import traceback  # noqa: F401 -- logging.exception formats a traceback
from collections.abc import Iterable
from typing import Any

from .privileges import PrivilegeError

try:
    import pyseccomp as _pyseccomp
except (ImportError, RuntimeError, OSError) as _exc:  # no pyseccomp, or no libseccomp2 under it
    _pyseccomp = None
    _MISSING = str(_exc)

__all__ = ["WORKER_SYSCALLS", "FETCHER_SYSCALLS", "FETCHER_KILLS", "METRICS_SYSCALLS", "sandbox_worker",
           "sandbox_fetcher", "sandbox_metrics", "require_seccomp"]

#: Calls a worker makes after its set-up (x86-64 and aarch64 names; a name this architecture lacks is skipped).
WORKER_SYSCALLS = (
    # its sockets and channel: read, write, wait
    "read", "readv", "write", "writev", "recvfrom", "recvmsg", "recvmmsg", "sendto", "sendmsg", "sendmmsg",
    "getsockopt", "getsockname", "getpeername", "shutdown", "close", "fcntl", "lseek", "fstat",
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "epoll_pwait2",
    # memory (mmap and mprotect: never executable, see _no_exec), the random source, time, locks
    "brk", "munmap", "mremap", "madvise", "getrandom", "futex", "sched_yield", "clock_gettime",
    "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep", "rseq", "set_robust_list",
    "getrusage", "times",
    # signals, its own identity, the end
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall", "getpid", "gettid",
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "capget", "exit",
    "exit_group",
)
#: Calls that fail with EPERM in a worker rather than kill it (see the module docstring).
_LOOKUPS = ("open", "openat", "openat2", "stat", "lstat", "newfstatat", "statx", "access", "faccessat",
            "faccessat2", "readlink", "readlinkat", "getcwd", "getdents64")
#: What the CRL fetcher may do besides a worker's.
FETCHER_SYSCALLS = (
    "connect", "bind", "setsockopt", "uname", "sysinfo", "sched_getaffinity",
    "dup", "dup2", "dup3", "pipe2", "eventfd2", "getdents64", "stat", "lstat", "newfstatat", "statx", "access",
    "faccessat", "faccessat2", "readlink", "readlinkat", "getcwd", "pread64", "getpgrp",
    "getppid", "set_tid_address", "prlimit64", "getpriority",
)
#: Calls the metrics server makes once it serves (found with ``strace -f`` on a real server, scraped in
#: every way the tests know: plain, OpenMetrics, gzip, a name filter, HEAD, POST, garbage, oversized
#: lines and headers, a reset, a silent client, more clients than MAX_SCRAPES); with the rules of
#: :func:`sandbox_metrics` for accept, mmap/mprotect, ioctl, clone and signals.  Besides those seen, the
#: variants the C library or another architecture may use for the same job (ppoll for poll, epoll_pwait
#: for epoll_wait, mremap for a realloc, clock_gettime when the vDSO is not used).
METRICS_SYSCALLS = (
    # scrapes on the connections it accepted, the monitor's channel, the log's descriptor, waits
    # (getpeername: not in a scrape, but the repr of a connection, in a warning, asks for it)
    "recvfrom", "sendto", "write", "shutdown", "close", "getsockname", "getpeername", "poll", "ppoll",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    # memory, locks, time
    "brk", "munmap", "mremap", "madvise", "futex", "clock_gettime", "clock_getres", "gettimeofday",
    # the C library's malloc counts the CPUs when scrapes at once make it add an arena: /sys and /proc
    # are refused (EPERM, as every file), and it falls back to this
    "sched_getaffinity",
    # threads (clone: see sandbox_metrics), signals, its own identity, the end
    "set_robust_list", "rseq", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "restart_syscall", "getpid",
    "gettid", "exit", "exit_group",
)
#: What kills the CRL fetcher although its default is EPERM: the ways out of its box.
FETCHER_KILLS = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "tkill", "clone", "setuid",
    "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid", "setfsgid", "capset",
    "prctl", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "clone3", "fork", "vfork",
    "bpf", "perf_event_open", "init_module", "finit_module", "delete_module", "kexec_load", "keyctl",
    "add_key", "request_key", "userfaultfd", "io_uring_setup", "mknod", "mknodat", "unlink", "unlinkat",
    "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod",
    "fchmodat", "chown", "fchown", "fchownat", "lchown", "truncate", "ftruncate", "mkdir", "mkdirat",
    "rmdir", "listen", "accept", "accept4", "memfd_create", "name_to_handle_at", "open_by_handle_at",
)

_PROT_EXEC = 0x4
_CLONE_THREAD = 0x10000
_FIONBIO = 0x5421
_TCGETS = 0x5401
_FIOCLEX = 0x5451
_SIOCGIFNAME = 0x8910  # Python names the interface of each packet a packet socket receives
_SIOCGIFINDEX = 0x8933  # and the capture turns that name back into its index
_FIONREAD = 0x541B
_O_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_NETLINK)


def _seccomp() -> Any:
    if _pyseccomp is None:
        raise PrivilegeError(f"the seccomp filter cannot be loaded: pyseccomp or libseccomp2 is missing ({_MISSING})")
    return _pyseccomp


def require_seccomp() -> None:
    """Raise :class:`PrivilegeError` now if the filters could not be loaded later (pyseccomp or libseccomp2
    missing): a start and ``--check-config`` say so in one line, instead of every worker failing."""
    _seccomp()


def _resolve(sc: Any, name: str) -> int | None:
    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    return number if isinstance(number, int) and number >= 0 else None


def _add(sc: Any, flt: Any, action: int, names: Iterable[str], *args: object) -> None:
    for name in names:
        number = _resolve(sc, name)
        if number is not None:
            flt.add_rule(action, number, *args)


def _worker_rules(sc: Any, flt: Any, pid: int) -> None:
    """The worker's allowlist on ``flt``; ``pid`` is the process itself (the one signal target allowed)."""
    _add(sc, flt, sc.ALLOW, WORKER_SYSCALLS)
    no_exec = sc.Arg(2, sc.MASKED_EQ, _PROT_EXEC, 0)
    _add(sc, flt, sc.ALLOW, ("mmap", "mprotect"), no_exec)
    # setblocking/settimeout, whether a descriptor is a terminal (the log's stream handler), and the
    # read-only interface name and index look-ups of a packet capture
    for request in (_FIONBIO, _TCGETS, _FIOCLEX, _SIOCGIFNAME, _SIOCGIFINDEX):
        _add(sc, flt, sc.ALLOW, ("ioctl",), sc.Arg(1, sc.EQ, request))
    # abort() and raise() signal the process itself; nothing else may be signalled
    _add(sc, flt, sc.ALLOW, ("tgkill",), sc.Arg(0, sc.EQ, pid))
    _add(sc, flt, sc.ALLOW, ("kill",), sc.Arg(0, sc.EQ, pid))


def _load(flt: Any) -> None:
    try:
        flt.load()
    except OSError as exc:
        raise PrivilegeError(f"the seccomp filter was not loaded: {exc.strerror or exc}") from None


def sandbox_worker() -> None:
    """Load the worker's filter (see the module docstring), with everything the worker uses already open;
    it cannot be undone."""
    sc = _seccomp()
    flt = sc.SyscallFilter(sc.KILL_PROCESS)
    _worker_rules(sc, flt, os.getpid())
    _add(sc, flt, sc.ERRNO(errno.EPERM), _LOOKUPS)
    _load(flt)


def sandbox_fetcher() -> None:
    """Load the CRL fetcher's looser filter (see the module docstring); it cannot be undone."""
    sc = _seccomp()
    flt = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    _worker_rules(sc, flt, os.getpid())
    _add(sc, flt, sc.ALLOW, FETCHER_SYSCALLS)
    _add(sc, flt, sc.ALLOW, ("mmap", "mprotect"), sc.Arg(2, sc.MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
    for family in _FAMILIES:
        _add(sc, flt, sc.ALLOW, ("socket",), sc.Arg(0, sc.EQ, family))
    _add(sc, flt, sc.ALLOW, ("ioctl",), sc.Arg(1, sc.EQ, _FIONREAD))
    _add(sc, flt, sc.ALLOW, ("openat",), sc.Arg(2, sc.MASKED_EQ, _O_WRITES, 0))
    _add(sc, flt, sc.ALLOW, ("open",), sc.Arg(1, sc.MASKED_EQ, _O_WRITES, 0))
    _add(sc, flt, sc.KILL_PROCESS, FETCHER_KILLS)
    pid = os.getpid()
    _add(sc, flt, sc.KILL_PROCESS, ("kill", "tgkill"), sc.Arg(0, sc.NE, pid))  # a signal to another process
    _load(flt)



def sandbox_metrics(listener: int) -> None:
    """Load the metrics server's filter (see the module docstring); ``listener`` is the descriptor of its
    listening socket, the only one it may accept on.  It cannot be undone."""
    sc = _seccomp()
    flt = sc.SyscallFilter(sc.KILL_PROCESS)
    _add(sc, flt, sc.ALLOW, METRICS_SYSCALLS)
    _add(sc, flt, sc.ALLOW, ("accept4", "accept"), sc.Arg(0, sc.EQ, listener))
    no_exec = sc.Arg(2, sc.MASKED_EQ, _PROT_EXEC, 0)
    _add(sc, flt, sc.ALLOW, ("mmap", "mprotect"), no_exec)
    for request in (_FIONBIO, _TCGETS, _FIOCLEX):
        _add(sc, flt, sc.ALLOW, ("ioctl",), sc.Arg(1, sc.EQ, request))
    # a thread per scrape: clone only with CLONE_THREAD (a thread shares this filter); clone3 hides its
    # flags from seccomp, so it answers ENOSYS and the C library falls back to clone
    _add(sc, flt, sc.ALLOW, ("clone",), sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    _add(sc, flt, sc.ERRNO(errno.ENOSYS), ("clone3",))
    pid = os.getpid()
    _add(sc, flt, sc.ALLOW, ("tgkill",), sc.Arg(0, sc.EQ, pid))
    _add(sc, flt, sc.ALLOW, ("kill",), sc.Arg(0, sc.EQ, pid))
    _add(sc, flt, sc.ERRNO(errno.EPERM), _LOOKUPS)
    _load(flt)
