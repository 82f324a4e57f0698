"""Least privilege, in forked children of the test process (which stays as it is): the drop to ``user``, the
monitor's capability drop, and the seccomp filters, each shown by what the kernel then refuses.

Every body runs in a child made by :func:`in_child`: it reports a JSON dict on a pipe, and the parent sees
how it ended (a seccomp kill is SIGSYS).  A forbidden call is made by the child itself, after the filter
is loaded: no hook in the server is needed for it."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import mmap
import os
import pwd
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from sknock.client import KnockClient
from sknock.errors import KnockRefused
from sknock.ports import Protocol
from sknock.server.metrics import Snapshot, open_listener, serve
from sknock.server.privileges import (
    CAP_KILL,
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    CAP_SETGID,
    CAP_SETUID,
    PrivilegeError,
    capabilities,
    drop_privileges,
    monitor_capabilities,
    restrict_monitor,
)
from sknock.server.sandbox import sandbox_fetcher, sandbox_metrics, sandbox_worker
from sknock.verifier import KnockVerifier, VerifierPolicy
from tests.pki import NOW, TestPKI, at

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges and load seccomp filters")


@dataclass
class Ended:
    """How a child ended: its report (None when it wrote none), exit code, or the signal that killed it."""

    report: dict[str, Any] | None
    code: int | None
    signal: int | None


def in_child(body: Callable[[], dict[str, Any]], timeout: float = 30) -> Ended:
    """Run ``body()`` in a forked child and report how it ended.  An exception in ``body`` is reported as
    {"error": ...}."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        code = 0
        try:
            os.close(read_end)
            try:
                result = body()
            except BaseException as exc:  # noqa: BLE001 -- report anything to the parent
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        for _ in range(400):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child did not finish")
    report = json.loads(b"".join(chunks)) if chunks else None
    if os.WIFSIGNALED(status):
        return Ended(report, None, os.WTERMSIG(status))
    return Ended(report, os.WEXITSTATUS(status), None)


def ok(ended: Ended) -> dict[str, Any]:
    assert ended.code == 0 and ended.report is not None, ended
    assert "error" not in ended.report, ended.report
    return ended.report


# -- drop_privileges ----------------------------------------------------------------------------------------


def _drop_and_look() -> dict[str, Any]:
    uid, gid = drop_privileges("nobody")
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    try:
        os.setgroups([0])
        groups_regained = True
    except PermissionError:
        groups_regained = False
    return {
        "returned": [uid, gid],
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
        "resuid": list(os.getresuid()),
        "groups": os.getgroups(),
        "status": {key: status[key].strip() for key in ("NoNewPrivs", "CapEff", "CapPrm", "CapInh", "CapAmb")},
        "regained": regained,
        "groups_regained": groups_regained,
    }


def test_drop_privileges_really_drops_for_good() -> None:
    nobody = pwd.getpwnam("nobody")
    result = ok(in_child(_drop_and_look))
    assert result["returned"] == [nobody.pw_uid, nobody.pw_gid]
    assert result["ids"] == [nobody.pw_uid, nobody.pw_uid, nobody.pw_gid, nobody.pw_gid]
    assert result["resuid"] == [nobody.pw_uid] * 3  # no saved uid 0 to go back to
    assert result["groups"] == []
    status = result["status"]
    assert status["NoNewPrivs"] == "1"
    for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(status[key], 16) == 0, (key, status)
    assert result["regained"] is False and result["groups_regained"] is False
    assert os.geteuid() == 0  # the test process itself is untouched


def test_drop_privileges_takes_a_numeric_uid() -> None:
    nobody = pwd.getpwnam("nobody")
    result = ok(in_child(lambda: {"returned": list(drop_privileges(str(nobody.pw_uid)))}))
    assert result["returned"] == [nobody.pw_uid, nobody.pw_gid]


@pytest.mark.parametrize("user", ["root", "0", "no-such-user-sknock-test"])
def test_drop_privileges_refuses_root_and_unknown_users(user: str) -> None:
    def attempt() -> dict[str, Any]:
        try:
            drop_privileges(user)
        except PrivilegeError as exc:
            return {"type": type(exc).__name__, "message": str(exc), "uid": os.getuid()}
        return {"type": None, "uid": os.getuid()}

    result = ok(in_child(attempt))
    assert result["type"] == "PrivilegeError"
    assert ("is root" if user in ("root", "0") else "does not exist") in result["message"]
    assert result["uid"] == 0  # nothing was changed before refusing


# -- the monitor's capabilities ------------------------------------------------------------------------------


def test_the_monitor_keeps_what_its_backend_needs() -> None:
    base = {CAP_NET_ADMIN, CAP_SETUID, CAP_SETGID, CAP_KILL}
    assert monitor_capabilities("nftables") == base
    assert monitor_capabilities("iptables") == base | {CAP_NET_RAW}
    assert monitor_capabilities("command") == base | {CAP_NET_RAW}


def _restricted_monitor(folder: str) -> dict[str, Any]:
    """As the monitor after set-up: what it can still do, and what not."""
    kept = restrict_monitor(monitor_capabilities("nftables"))
    own = Path(folder, "root-only")
    report: dict[str, Any] = {
        "uid": os.getuid(),
        "kept": [kept.permitted, kept.effective, kept.bounding, kept.inheritable, kept.ambient],
        "reads_its_own_file": own.read_text(),
    }
    own.write_text("rewritten")  # root's 0600 file, as the journal, the ledger and the CRL are
    report["writes_its_own_file"] = own.read_text()
    try:
        Path(folder, "nobody-only").read_text()
        report["reads_another_user_s_file"] = True
    except PermissionError:
        report["reads_another_user_s_file"] = False
    try:
        os.chown(own, 1, 1)
        report["chown"] = True
    except PermissionError:
        report["chown"] = False
    # a program it starts (the command backend's) has no more than the bounding set
    status = subprocess.run(["/bin/cat", "/proc/self/status"], capture_output=True, text=True, check=True).stdout
    report["program_caps"] = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    # and it can still start a worker as nobody and signal it
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the grandchild
        try:
            drop_privileges("nobody")
            time.sleep(30)
        finally:
            os._exit(0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    _, status_code = os.waitpid(pid, 0)
    report["worker_signalled"] = os.WIFSIGNALED(status_code) and os.WTERMSIG(status_code) == signal.SIGTERM
    return report


def test_the_monitor_drops_every_other_capability_and_still_does_its_job() -> None:
    with tempfile.TemporaryDirectory() as folder:
        own = Path(folder, "root-only")
        own.write_text("journal")
        own.chmod(0o600)
        other = Path(folder, "nobody-only")
        other.write_text("not the monitor's")
        nobody = pwd.getpwnam("nobody")
        os.chown(other, nobody.pw_uid, nobody.pw_gid)
        other.chmod(0o600)
        result = ok(in_child(lambda: _restricted_monitor(folder)))
    want = (1 << CAP_NET_ADMIN) | (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_KILL)
    assert result["uid"] == 0
    assert result["kept"] == [want, want, want, 0, 0]
    assert result["reads_its_own_file"] == "journal" and result["writes_its_own_file"] == "rewritten"
    assert result["reads_another_user_s_file"] is False  # no CAP_DAC_OVERRIDE
    assert result["chown"] is False  # no CAP_CHOWN
    assert int(result["program_caps"], 16) == want  # the bounding set holds, even for root's programs
    assert result["worker_signalled"] is True
    assert capabilities().bounding != want  # the test process itself is untouched


def test_without_cap_setpcap_the_bounding_set_stays_and_the_rest_is_dropped() -> None:
    """As under a service manager whose bounding set lacks CAP_SETPCAP: permitted and effective are still
    cut to the kept set; the bounding set cannot be, and the daemon says so (``beyond``)."""

    def body() -> dict[str, Any]:
        everything_but_setpcap = set(range(capabilities().bounding.bit_length())) - {8}
        restrict_monitor(everything_but_setpcap)
        keep = monitor_capabilities("nftables")
        kept = restrict_monitor(keep)
        return {"permitted": kept.permitted, "effective": kept.effective, "beyond": kept.beyond(keep)}

    result = ok(in_child(body))
    want = (1 << CAP_NET_ADMIN) | (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_KILL)
    assert result["permitted"] == result["effective"] == want
    assert result["beyond"] and "CAP_NET_RAW" in result["beyond"]


# -- the worker's seccomp filter -----------------------------------------------------------------------------


def _sandboxed(
    attempt: Callable[[], object], sandbox: Callable[[], None] = sandbox_worker
) -> Callable[[], dict[str, Any]]:
    """A child body: become a worker (nobody, ``sandbox`` loaded), then make ``attempt``; reports what it
    returned, or the errno of the OSError it raised."""

    def body() -> dict[str, Any]:
        drop_privileges("nobody")
        sandbox()
        try:
            value = attempt()
        except OSError as exc:
            return {"errno": exc.errno}
        return {"returned": repr(value)}

    return body


def _exec() -> object:
    os.execv("/bin/true", ["true"])


def _spawn() -> object:
    return subprocess.run(["/bin/true"], check=False)


def _new_socket() -> object:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _signal_parent() -> object:
    os.kill(os.getppid(), 0)
    return None


def _executable_memory() -> object:
    return mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)


def _fork() -> object:
    return os.fork()


@pytest.mark.parametrize(
    "attempt", [_exec, _spawn, _new_socket, _signal_parent, _executable_memory, _fork],
    ids=["execve", "subprocess", "socket", "kill-other", "mmap-exec", "fork"],
)
def test_a_forbidden_call_kills_the_worker(attempt: Callable[[], object]) -> None:
    ended = in_child(_sandboxed(attempt))
    assert ended.signal == signal.SIGSYS, ended
    assert ended.report is None  # it never got to report anything


@pytest.mark.parametrize("path", ["/etc/hostname", "/tmp/sknock-sandbox-new-file"])
def test_opening_a_file_fails_with_eperm(path: str) -> None:
    ended = in_child(_sandboxed(lambda: open(path, "a" if path.startswith("/tmp") else "r")))  # noqa: SIM115
    assert ok(ended) == {"errno": errno.EPERM}
    assert not Path("/tmp/sknock-sandbox-new-file").exists()


def test_a_late_import_fails_without_killing_the_worker() -> None:
    ended = in_child(_sandboxed(lambda: __import__("xml.dom.minidom")))
    assert ended.code == 0 and ended.report is not None, ended  # an exception, which the worker survives
    assert ended.report["error"].startswith("ModuleNotFoundError")


def _verify_knocks(pki: TestPKI) -> Callable[[], dict[str, Any]]:
    """A worker's real job under the filter: a valid knock, a forged one, and a message to the monitor on
    a channel made before."""
    verifier = KnockVerifier(
        server_key=pki.server.credentials.key, server_certificate=pki.server.certificate, trust=pki.verifier(),
        policy=VerifierPolicy(min_work_bits=4),
    )
    client = KnockClient(credentials=pki.alice.credentials, server_cert=pki.server.certificate, work_bits=4,
                         clock=at(NOW))
    good = client.build_knock([(Protocol.TCP, 22)], now=NOW)
    forged = bytearray(client.build_knock([(Protocol.TCP, 2005)], now=NOW))
    forged[-10] ^= 1
    source = ipaddress.ip_address("198.18.0.2")
    worker_end, monitor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def body() -> dict[str, Any]:
        drop_privileges("nobody")
        sandbox_worker()
        grant = verifier.complete(verifier.precheck(good, NOW, source), source, NOW)
        try:
            verifier.complete(verifier.precheck(bytes(forged), NOW, source), source, NOW)
            refused = None
        except KnockRefused as exc:
            refused = exc.reason.value
        worker_end.send(b"granted " + str(grant.ports).encode())
        return {"ports": [[int(p), n] for p, n in grant.ports], "refused": refused,
                "random": len(os.urandom(16))}

    try:
        result = ok(in_child(body))
        assert monitor_end.recv(4096).startswith(b"granted")
    finally:
        worker_end.close()
        monitor_end.close()
    return lambda: result


def test_a_knock_is_verified_under_the_filter(pki: TestPKI) -> None:
    result = _verify_knocks(pki)()
    assert result["ports"] == [[int(Protocol.TCP), 22]]
    assert result["refused"] is not None
    assert result["random"] == 16


def test_without_the_seccomp_binding_a_start_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from sknock.server import sandbox

    monkeypatch.setattr(sandbox, "_pyseccomp", None)
    monkeypatch.setattr(sandbox, "_MISSING", "No module named 'pyseccomp'", raising=False)
    with pytest.raises(PrivilegeError, match="pyseccomp or libseccomp2 is missing"):
        sandbox.require_seccomp()


# -- the CRL fetcher's looser filter ----------------------------------------------------------------------


def _fetcher(attempt: Callable[[], object]) -> Callable[[], dict[str, Any]]:
    return _sandboxed(attempt, sandbox_fetcher)


def test_the_fetcher_may_open_sockets_and_read_files() -> None:
    def network_and_files() -> object:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            with contextlib.suppress(ConnectionRefusedError):  # nothing listens: connect itself was allowed
                s.connect(("127.0.0.1", 9))
        return Path("/etc/hostname").exists() and len(Path("/etc/passwd").read_text()) > 0

    assert ok(in_child(_fetcher(network_and_files))) == {"returned": "True"}


def test_the_fetcher_may_not_write_files() -> None:
    target = Path(tempfile.gettempdir(), f"sknock-fetcher-{os.getpid()}")
    assert ok(in_child(_fetcher(lambda: open(target, "w")))) == {"errno": errno.EPERM}  # noqa: SIM115
    assert not target.exists()


@pytest.mark.parametrize("attempt", [_exec, _spawn, _fork, _signal_parent],
                         ids=["execve", "subprocess", "fork", "kill-other"])
def test_the_fetcher_is_killed_for_running_a_program_or_signalling_another(attempt: Callable[[], object]) -> None:
    ended = in_child(_fetcher(attempt))
    assert ended.signal == signal.SIGSYS, ended


# -- the metrics server's filter ------------------------------------------------------------------------------


def _metrics(attempt: Callable[[], object], listener: socket.socket | None = None) -> Callable[[], dict[str, Any]]:
    own = listener or socket.socket()  # its listening socket: the one it may accept on
    return _sandboxed(attempt, partial(sandbox_metrics, own.fileno()))


def _accept_elsewhere() -> object:
    with socket.socket() as other:
        return other.accept()  # the socket call itself is the end of it; accept on another fd too


@pytest.mark.parametrize(
    "attempt", [_exec, _spawn, _new_socket, _signal_parent, _executable_memory, _fork, _accept_elsewhere],
    ids=["execve", "subprocess", "socket", "kill-other", "mmap-exec", "fork", "accept-other"],
)
def test_a_forbidden_call_kills_the_metrics_server(attempt: Callable[[], object]) -> None:
    ended = in_child(_metrics(attempt))
    assert ended.signal == signal.SIGSYS, ended
    assert ended.report is None


def test_the_metrics_server_may_accept_only_on_its_listener() -> None:
    listener = open_listener(ipaddress.ip_address("127.0.0.1"), 0)
    spare = socket.socket()  # bound before the filter: accepting on it is still refused
    spare.bind(("127.0.0.1", 0))
    spare.listen(1)
    try:
        ok(in_child(_metrics(lambda: listener.setblocking(False), listener)))  # made before; allowed after
        ended = in_child(_metrics(lambda: spare.accept(), listener))
        assert ended.signal == signal.SIGSYS, ended
        waiting = socket.create_connection(listener.getsockname()[:2])  # in the backlog, for the child
        try:
            report = ok(in_child(_metrics(lambda: listener.accept()[1][0], listener)))
            assert report == {"returned": "'127.0.0.1'"}
        finally:
            waiting.close()
    finally:
        spare.close()
        listener.close()


def test_the_metrics_server_opens_no_file_and_runs_threads() -> None:
    def thread() -> object:
        out: list[int] = []
        worker = threading.Thread(target=lambda: out.append(threading.get_ident()))
        worker.start()
        worker.join()
        return len(out)

    assert ok(in_child(_metrics(lambda: open("/etc/hostname")))) == {"errno": errno.EPERM}  # noqa: SIM115
    assert ok(in_child(_metrics(thread))) == {"returned": "1"}


def test_a_scrape_is_answered_under_the_filter() -> None:
    """The real :func:`serve` in a child that dropped to nobody, its filter loaded by ``confine``: a scrape
    sent before it started is answered, then the monitor's end closes and it returns."""
    listener = open_listener(ipaddress.ip_address("127.0.0.1"), 0)
    monitor_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monitor_end.send(Snapshot(received=5).encode())
    scraper = socket.create_connection(listener.getsockname()[:2])
    scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    answer: list[bytes] = []

    def read_then_hang_up() -> None:  # in this process, started before the fork; it only waits on sockets
        chunks = []
        while chunk := scraper.recv(65536):
            chunks.append(chunk)
        answer.append(b"".join(chunks))
        monitor_end.close()  # the monitor has gone: serve() returns

    reader = threading.Thread(target=read_then_hang_up, daemon=True)
    reader.start()

    def body() -> dict[str, Any]:
        monitor_end.close()  # the monitor's, and the scraper's, ends stay in the parent only
        scraper.close()
        drop_privileges("nobody")
        serve(listener, child_end, confine=partial(sandbox_metrics, listener.fileno()))
        status = Path("/proc/self/status").read_text()  # fails (EPERM) under the filter
        return {"status": status}

    try:
        ended = in_child(body)
        reader.join(10)
    finally:
        scraper.close()
        child_end.close()
        listener.close()
    assert ended.code == 0 and ended.report is not None, ended
    assert ended.report["error"].startswith("PermissionError"), ended.report  # it served under the filter
    assert answer and answer[0].startswith(b"HTTP/1.0 200 OK"), answer
    assert b"sknock_knocks_received_total" in answer[0]
