#!/usr/bin/env python3
"""Opt-in: run sknock-server.service under a real systemd, in a container booted with systemd-nspawn.

    sudo .venv/bin/python scripts/service_in_container.py [--keep]

The container is this host's Debian /usr (read-only), a throwaway /etc and /var in a temp folder, and no
network of the host's (--private-network: nothing leaves it); a client network namespace inside it, behind a
veth pair (198.18.0.1 and .2), knocks. In it, as an operator would: ``sknock-server install-service`` (with a
venv on Debian's /usr/bin/python3 and this checkout installed in it, made once per source in
/var/cache/sknock-nspawn/venv: the unit's ProtectHome=yes and PrivateTmp=yes, and the container's own /tmp,
would hide one under /root, /home or /tmp, where a checkout may well be), the test PKI's server credentials in
/etc/sknock, ``systemctl start`` (which returns only after READY=1), then checks: the unit is active and
enabled, its STATUS, sknock's nft table, tcp/2005 closed to the client until its knock opens it, the journal's
priorities; then what systemd does when the server fails: a ``kill -9`` of the monitor
(``Restart=on-failure``: restarted, the earlier grant kept, a new knock granted), workers that keep dying (the
monitor stops sending WATCHDOG=1 and systemd's watchdog, 3 s by a drop-in, kills and restarts it), a second
client that never knocked probing tcp/2005 all along (it must never connect); the grant's end after both
restarts, ``systemctl reload``, a stop that leaves the table, and a bad config: exit 2 and no restart
(``RestartPreventExitStatus=2``). It prints each step's time, one line per check.

The container runs in a private mount namespace with a tmpfs on /run/systemd (nspawn keeps its propagation
folder there and refuses to clean one on a disk), with --register=no --keep-unit (no systemd on the host to
register with).  Needs root, systemd-nspawn and nsenter.  Exit 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.pki import PASSWORD, build_pki  # noqa: E402

VENV = Path("/var/cache/sknock-nspawn/venv")
ETC_FILES = ("passwd", "group", "shadow", "gshadow", "login.defs", "nsswitch.conf", "protocols", "services",
             "ld.so.cache", "ld.so.conf")  # a Debian /etc has the loader cache: ctypes finds libseccomp by it


def step(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)


def make_venv() -> None:
    """A venv with this checkout installed (not editable: the checkout may sit where the service cannot see
    it), remade when the package's sources or pyproject.toml change."""
    import hashlib

    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    for path in sorted((REPO / "sknock").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    stamp, want = VENV / ".sources", digest.hexdigest()
    if (VENV / "bin" / "sknock-server").exists() and stamp.exists() and stamp.read_text() == want:
        return
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"{REPO}[server]"], check=True)
    stamp.write_text(want)


def make_tree() -> Path:
    tree = Path(tempfile.mkdtemp(prefix="sknock-nspawn-"))
    tree.chmod(0o755)
    for name in ("usr", "etc", "var", "tmp", "root", "proc", "sys", "dev", "run", "opt"):
        (tree / name).mkdir()
    for name in ("bin", "sbin", "lib", "lib64"):
        (tree / name).symlink_to(f"usr/{name}")
    for name in ETC_FILES:
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), tree / "etc" / name)
    shutil.copytree("/etc/alternatives", tree / "etc" / "alternatives", symlinks=True)  # iptables, nft
    shutil.copy2("/usr/lib/os-release", tree / "etc" / "os-release")  # nspawn looks before /usr is bound
    (tree / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
    (tree / "etc" / "hostname").write_text("sknock-ct\n")
    # no host firewall to order after: keep the container's nftables.service from failing on a missing conf
    (tree / "etc" / "nftables.conf").write_text("flush ruleset\n")
    return tree


# Runs in the second client's namespace until /root/probe.stop exists (at most 120 s): connects to tcp/2005
# every 0.1 s and says how many of its probes got through (it never knocked: the answer must stay 0).
PROBER = """import os, socket, time
deadline, probes, opened = time.monotonic() + 120, 0, 0
while time.monotonic() < deadline and not os.path.exists('/root/probe.stop'):
    probes += 1
    try:
        socket.create_connection(('198.18.1.1', 2005), timeout=0.3).close()
        opened += 1
    except OSError:
        pass
    time.sleep(0.1)
print(probes, opened)
"""

# Runs inside the container: SIGKILLs the children of the monitor (pid argv[1]) as soon as they appear, until the
# monitor itself is gone (the watchdog) or 30 s have passed: workers that cannot stay alive.
WORKER_KILLER = """import os, sys, time
main, started, kills = int(sys.argv[1]), time.monotonic(), 0
while time.monotonic() < started + 30:
    try:
        with open(f'/proc/{main}/task/{main}/children') as file:
            children = file.read().split()
    except OSError:
        break
    for child in children:
        try:
            os.kill(int(child), 9)
            kills += 1
        except OSError:
            pass
    time.sleep(0.05)
print(kills, round(time.monotonic() - started, 1))
"""


def init_pid(nspawn: int, timeout: float = 30) -> int:
    """The container's PID 1 as the host sees it: the descendant of ``nspawn`` named systemd."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("Name") != "systemd" or not fields.get("NSpid", "").endswith("\t1"):
                continue
            pid = int(entry.name)
            parent = pid
            while parent > 1:
                try:
                    parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    break
                if parent == nspawn:
                    return pid
        time.sleep(0.2)
    raise SystemExit("the container's systemd did not appear")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the container's folder and log")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None or shutil.which("nsenter") is None:
        print("needs root, systemd-nspawn and nsenter", file=sys.stderr)
        return 2
    started = time.monotonic()
    make_venv()
    step(f"venv ready: {VENV}", started)
    tree = make_tree()
    pki = build_pki(tree / "root" / "pki")
    log_path = tree.with_suffix(".log")
    name = f"sknockct{os.getpid()}"
    launcher = (
        "mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && exec systemd-nspawn "
        f"-D {tree} --bind-ro=/usr --bind-ro={VENV.parent} --register=no --keep-unit --private-network -M {name} "
        "-b -- systemd.firstboot=off"
    )
    failures: list[str] = []
    helpers: list[subprocess.Popen[str]] = []  # processes started inside the container, killed in the end
    with log_path.open("wb") as log:
        nspawn = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", launcher],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        pid1 = init_pid(nspawn.pid)

        def inside(*command: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
            result = subprocess.run(["nsenter", "-t", str(pid1), "-a", *command], capture_output=True, text=True,
                                    timeout=timeout)
            if check and result.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{result.stdout}")
            return result

        def expect(ok: bool, what: str) -> None:
            step(("ok   " if ok else "FAIL ") + what, started)
            if not ok:
                failures.append(what)

        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            state = inside("systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        step(f"container booted: {state}", started)
        # a client host inside the container: a network namespace behind a veth pair (198.18.0.0/15)
        for command in (("ip", "link", "add", "skh", "type", "veth", "peer", "name", "skc"),
                        ("ip", "netns", "add", "client"), ("ip", "link", "set", "skc", "netns", "client"),
                        ("ip", "addr", "add", "198.18.0.1/24", "dev", "skh"), ("ip", "link", "set", "skh", "up"),
                        ("ip", "-n", "client", "addr", "add", "198.18.0.2/24", "dev", "skc"),
                        ("ip", "-n", "client", "link", "set", "skc", "up"),
                        ("ip", "-n", "client", "link", "set", "lo", "up"),
                        # a second client that never knocks, on its own veth pair (198.18.1.0/24)
                        ("ip", "link", "add", "skh2", "type", "veth", "peer", "name", "sko"),
                        ("ip", "netns", "add", "other"), ("ip", "link", "set", "sko", "netns", "other"),
                        ("ip", "addr", "add", "198.18.1.1/24", "dev", "skh2"), ("ip", "link", "set", "skh2", "up"),
                        ("ip", "-n", "other", "addr", "add", "198.18.1.2/24", "dev", "sko"),
                        ("ip", "-n", "other", "link", "set", "sko", "up")):
            inside(*command, check=True)
        server = str(VENV / "bin" / "sknock-server")
        result = inside(server, "install-service", check=True)
        print(result.stdout, end="")
        expect("enabled sknock-server.service" in result.stdout, "install-service enabled the unit")
        def show(*names: str) -> dict[str, str]:
            out = inside("systemctl", "show", *(f"--property={name}" for name in names), "sknock-server").stdout
            return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

        def not_restarted(what: str) -> None:
            """A start that failed with exit 2 (it cannot heal by itself): failed, no restart scheduled."""
            state = show("ActiveState", "SubState", "ExecMainStatus", "NRestarts")
            expect(state["SubState"] == "failed" and state["ExecMainStatus"] == "2",
                   f"{what}: exit 2, not restarted (RestartPreventExitStatus=2): {state}")

        broken = inside("systemctl", "start", "sknock-server")  # before the credentials are in place
        expect(broken.returncode != 0, "a start without the server's credentials fails")
        not_restarted("without credentials")
        early = inside("journalctl", "-u", "sknock-server", "-o", "json", "--no-pager",
                       "--output-fields=PRIORITY,MESSAGE").stdout
        failed = [line for line in early.splitlines() if "sknock-server: " in line]
        expect(bool(failed) and all('"PRIORITY":"3"' in line for line in failed),
               f"its one line is in the journal as an error: {failed[:1]}")
        inside("systemctl", "reset-failed", "sknock-server")
        etc = tree / "etc" / "sknock"
        shutil.copy(pki.server.pfx, etc / "server.pfx")
        (etc / "pfx.pass").write_text(PASSWORD + "\n")
        shutil.copy(pki.ca_dir / "crl.der", etc / "crl" / "crl.der")
        for file in (etc / "server.pfx", etc / "pfx.pass", etc / "crl" / "crl.der"):
            file.chmod(0o600)
        config = etc / "config.ini"
        text = config.read_text()
        for key, value in {"firewallPolicy": "drop", "protectedPorts": "tcp/2005", "workers": "2"}.items():
            text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
        config.write_text(text + "\n")
        # A drop-in: systemd's watchdog at 3 s (the monitor then sends WATCHDOG=1 every 1.5 s), and a stop timeout
        # of 3 s: on this host's cgroup v1 the container's systemd is never told that the service's cgroup
        # emptied once it has SIGKILLed the workers of a dead monitor, so it waits for TimeoutStopSec (the
        # processes are gone within a second) before it restarts the service.
        dropin = tree / "etc" / "systemd" / "system" / "sknock-server.service.d"
        dropin.mkdir(parents=True)
        (dropin / "test.conf").write_text("[Service]\nWatchdogSec=3s\nTimeoutStopSec=3s\n")
        inside("systemctl", "daemon-reload", check=True)
        check = inside(server, "--check-config")
        expect(check.returncode == 0, f"--check-config: {(check.stdout + check.stderr).strip()}")
        before = time.monotonic()
        start = inside("systemctl", "start", "sknock-server")
        expect(start.returncode == 0, f"systemctl start returned after READY=1 in {time.monotonic() - before:.1f} s "
                                      f"{start.stderr.strip()}")
        active = inside("systemctl", "is-active", "sknock-server").stdout.strip()
        enabled = inside("systemctl", "is-enabled", "sknock-server").stdout.strip()
        expect(active == "active" and enabled == "enabled", f"unit is {active}, {enabled}")
        status = inside("systemctl", "show", "-p", "StatusText", "-p", "NRestarts", "-p", "WatchdogUSec",
                        "sknock-server").stdout.strip().replace("\n", "; ")
        expect("open grant(s)" in status, f"systemctl show: {status}")
        table = inside("nft", "list", "table", "inet", "sknock")
        expect(table.returncode == 0, "sknock's nft table exists")
        service = subprocess.Popen(
            ["nsenter", "-t", str(pid1), "-a", "/usr/bin/python3", "-c",
             "import socket\ns = socket.create_server(('0.0.0.0', 2005))\n"
             "while True:\n    c, _ = s.accept(); c.sendall(b'hello'); c.close()\n"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        probe = ("import socket, sys\ntry:\n    socket.create_connection(('198.18.0.1', 2005), timeout=1).close()\n"
                 "except OSError:\n    sys.exit(1)\n")
        client = ("ip", "netns", "exec", "client")
        expect(inside(*client, "/usr/bin/python3", "-c", probe).returncode != 0,
               "tcp/2005 is closed to the client before a knock")
        helpers.append(service)
        other = ("ip", "netns", "exec", "other")
        expect(inside(*other, "/usr/bin/python3", "-c", probe.replace("198.18.0.1", "198.18.1.1")).returncode != 0,
               "tcp/2005 is closed to the second client")
        pfx = Path("/root") / pki.alice.pfx.relative_to(tree / "root")  # as the container sees them
        cer = Path("/root") / pki.server.cer.relative_to(tree / "root")

        def knock(what: str) -> float:
            """Knock from the client; the time of the grant."""
            result = inside(*client, str(VENV / "bin" / "python"), "-c",
                            "from sknock.client import knock\n"
                            f"print(knock('198.18.0.1', 2005, 'tcp', client_pfx={str(pfx)!r}, "
                            f"pfx_password={PASSWORD!r}, server_cert={str(cer)!r}, verify=True, timeout=5))\n",
                            timeout=30)
            expect(result.returncode == 0 and "True" in result.stdout,
                   f"{what}: {(result.stdout + result.stderr).strip()[-300:]}")
            return time.monotonic()

        knock("a knock from the client opened tcp/2005")
        # from here on the second client, which never knocks, probes tcp/2005 every 0.1 s through two restarts
        prober = subprocess.Popen(["nsenter", "-t", str(pid1), "-a", *other, "/usr/bin/python3", "-c", PROBER],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        helpers.append(prober)

        def wait_active(timeout: float = 15) -> str:
            until = time.monotonic() + timeout
            while True:
                active = inside("systemctl", "is-active", "sknock-server").stdout.strip()
                if active == "active" or time.monotonic() > until:
                    return active
                time.sleep(0.2)

        # Restart=on-failure: the monitor dies by SIGKILL (no chance to clean up)
        before = show("MainPID", "NRestarts")
        killed = time.monotonic()
        inside("kill", "-9", before["MainPID"], check=True)
        until = time.monotonic() + 2
        while (down := show("ActiveState", "SubState", "MainPID"))["MainPID"] != "0" and time.monotonic() < until:
            time.sleep(0.1)
        expect(down["MainPID"] == "0" and down["ActiveState"] != "active",
               f"kill -9 of the monitor: the unit is down ({down['ActiveState']}, {down['SubState']})")
        table = inside("nft", "list", "table", "inet", "sknock")
        held = inside(*client, "/usr/bin/python3", "-c", probe).returncode == 0
        expect(table.returncode == 0 and held and show("MainPID")["MainPID"] == "0",
               "while it is down: sknock's table stays and the client's grant still lets it in")
        active = wait_active()
        after = show("MainPID", "NRestarts")
        expect(active == "active" and int(after["NRestarts"]) == int(before["NRestarts"]) + 1
               and after["MainPID"] != before["MainPID"],
               f"systemd restarted it in {time.monotonic() - killed:.1f} s: NRestarts {before['NRestarts']} -> "
               f"{after['NRestarts']}, MainPID {before['MainPID']} -> {after['MainPID']}")
        journal = inside("journalctl", "-u", "sknock-server", "--no-pager").stdout
        expect("kept 1 live grant(s) from before this start" in journal
               and inside(*client, "/usr/bin/python3", "-c", probe).returncode == 0,
               "the new monitor kept the grant made before the kill; the client still gets in")
        granted_at = knock("after the restart a new knock is granted")

        # The watchdog: workers that cannot stay alive (killed as soon as they start) make the monitor go silent
        before = show("MainPID", "NRestarts")
        killer = inside("/usr/bin/python3", "-c", WORKER_KILLER, before["MainPID"], timeout=40)
        kills, _, took = killer.stdout.strip().partition(" ")
        active = wait_active()
        after = show("MainPID", "NRestarts")
        journal = inside("journalctl", "-u", "sknock-server", "--no-pager").stdout
        timeouts = [line for line in journal.splitlines() if "Watchdog timeout" in line]
        expect(bool(timeouts) and active == "active" and int(after["NRestarts"]) == int(before["NRestarts"]) + 1,
               f"workers killed as they start ({kills} kills in {took} s): systemd's watchdog restarted it: "
               f"NRestarts {before['NRestarts']} -> {after['NRestarts']}; {timeouts[-1:]}")
        (tree / "root" / "probe.stop").touch()
        probes, _, opened = prober.communicate(timeout=10)[0].strip().partition(" ")
        expect(prober.returncode == 0 and opened == "0",
               f"the client that never knocked: {opened or '?'} of {probes} probes got through, across both restarts")
        # the grant ends when it should: the monitor that made it is two restarts gone
        time.sleep(max(0.0, granted_at + 15 + 1.5 - time.monotonic()))
        expect(inside(*client, "/usr/bin/python3", "-c", probe).returncode != 0,
               "the client's grant ended on time after both restarts")
        journal = inside("journalctl", "-u", "sknock-server", "-o", "json", "--no-pager",
                         "--output-fields=PRIORITY,MESSAGE").stdout
        granted = [line for line in journal.splitlines() if "granted tcp/2005 to 198.18.0.2" in line]
        expect(bool(granted) and '"PRIORITY":"6"' in granted[0], f"the journal has the grant at priority 6: "
                                                                   f"{granted[:1]}")
        unprefixed = [line for line in journal.splitlines() if "sknock-server: " in line and "MESSAGE" in line]
        expect(all('"PRIORITY":"3"' in line for line in unprefixed), "lines without a prefix are errors")
        reload = inside("systemctl", "reload", "sknock-server")
        time.sleep(1)
        reloaded = "SIGHUP: reading the CRL" in inside("journalctl", "-u", "sknock-server", "--no-pager").stdout
        expect(reload.returncode == 0 and reloaded, "systemctl reload: SIGHUP refreshed the CRL")
        stop = inside("systemctl", "stop", "sknock-server")
        table = inside("nft", "list", "table", "inet", "sknock")
        expect(stop.returncode == 0 and table.returncode == 0, "a stop leaves sknock's table in place")
        good = config.read_text()
        config.write_text(good.replace("workers = 2", "workers = two"))
        bad = inside("systemctl", "start", "sknock-server")
        expect(bad.returncode != 0, "a start with a bad config fails")
        not_restarted("a bad config")
        table = inside("nft", "list", "table", "inet", "sknock")
        expect(table.returncode == 0, "sknock's table stays after the failed start")
        config.write_text(good)
        if failures:
            print(inside("journalctl", "-u", "sknock-server", "--no-pager", "-n", "60").stdout)
    finally:
        for helper in helpers:
            helper.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(5)
        nspawn.send_signal(signal.SIGTERM)
        try:
            nspawn.wait(30)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(10)
        if not args.keep:
            shutil.rmtree(tree, ignore_errors=True)
            log_path.unlink(missing_ok=True)
    step(f"done: {len(failures)} failure(s)" + (f": {failures}" if failures else ""), started)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
