"""The real OpenSSH in test namespaces: an sshd started by the test on a protected port of the server
namespace, with its own host key and an authorized_keys for a throwaway key, and an ssh config whose
hosts reach it through ``sknock-knock ssh-proxy`` (with and without fdpass), through a ControlMaster, or
directly (which the drop policy must stop).  ``nosuch`` is a host the client configuration does not name.

Used by tests/test_ssh_e2e.py and by the benchmark's ssh phase (bench/sshlogin.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.netns import TestNet
from tests.server_harness import KNOCK_SCRIPT

SSHD = Path("/usr/sbin/sshd")
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it; Debian's ssh service makes it
REPO = Path(__file__).resolve().parents[1]


def ssh_available() -> str | None:
    """None when the real OpenSSH client and server are installed, else why not (for pytest.skip)."""
    if not SSHD.exists() or SSH is None or SSH_KEYGEN is None:
        return "needs Debian's openssh-server and openssh-client (sshd, ssh, ssh-keygen)"
    return None


@dataclass
class SshSetup:
    """A running sshd in ``net.server`` on ``port`` and the files an ssh client needs for it."""

    net: TestNet
    folder: Path
    port: int
    config: Path  # the ssh client config (ssh -F)
    process: subprocess.Popen[bytes]

    def ssh(
        self, host: str, *command: str, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ssh -F CONFIG HOST COMMAND`` in the client namespace (with ``env`` added to the
        environment, which the ProxyCommand inherits)."""
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "HOME": str(self.folder)}
        return subprocess.run(
            self.net.client.cmd(str(SSH), "-F", str(self.config), host, *command),
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=timeout,
        )


def _keygen(path: Path) -> None:
    subprocess.run([str(SSH_KEYGEN), "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@contextlib.contextmanager
def running_sshd(
    net: TestNet, folder: Path, port: int, client_ini: Path, *, open_port: int | None = None
) -> Iterator[SshSetup]:
    """Start sshd on ``port`` in ``net.server`` and write an ssh config for the client namespace.

    Hosts of the config (all for root on the server namespace's IPv4 address unless said):
    ``gw`` (ssh-proxy, ProxyUseFdpass yes), ``gwrelay`` (ssh-proxy relaying stdin/stdout), ``gw6``
    (fdpass over IPv6: the named server ``gw`` given as such, ssh's HostName its IPv6 address),
    ``gwmux`` (fdpass behind a ControlMaster with ControlPersist), ``nosuch`` (a server the client
    configuration does not name) and ``plain`` (no proxy).
    ``client_ini`` is the sknock client configuration, with a server section ``gw``.  With ``open_port``
    (a port the knock server does not protect), sshd listens there too, and ``direct`` reaches it without
    a proxy: the same sshd, with its port already open.
    """
    folder.mkdir(parents=True, exist_ok=True)
    made_privsep = not PRIVSEP_DIR.exists()
    if made_privsep:
        PRIVSEP_DIR.mkdir(mode=0o755)
    _keygen(folder / "host_key")
    _keygen(folder / "id")
    shutil.copy(folder / "id.pub", folder / "authorized_keys")
    sshd_config = folder / "sshd_config"
    ports_too = f"Port {open_port}\n" if open_port else ""
    sshd_config.write_text(
        f"Port {port}\n{ports_too}ListenAddress 0.0.0.0\nListenAddress ::\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\nStrictModes no\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "LogLevel VERBOSE\n"
    )
    log = (folder / "sshd.log").open("wb")
    process = net.server.popen(str(SSHD), "-D", "-e", "-f", str(sshd_config), stdout=log, stderr=subprocess.STDOUT)
    proxy = f"{KNOCK_SCRIPT} ssh-proxy --config {client_ini} %n %h %p"
    common = (
        f"  Port {port}\n  User root\n  IdentityFile {folder / 'id'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n  BatchMode yes\n"
        "  ConnectTimeout 2\n  LogLevel ERROR\n"
    )
    v4, v6 = net.server.ipv4, net.server.ipv6
    config = folder / "ssh_config"
    config.write_text(
        f"Host gw\n  HostName {v4}\n  ProxyCommand {proxy}\n  ProxyUseFdpass yes\n{common}"
        f"Host gwrelay\n  HostName {v4}\n  ProxyCommand {proxy}\n  ProxyUseFdpass no\n{common}"
        f"Host gw6\n  HostName {v6}\n  ProxyCommand {proxy.replace('%n', 'gw')}\n  ProxyUseFdpass yes\n{common}"
        f"Host gwmux\n  HostName {v4}\n  ProxyCommand {proxy}\n  ProxyUseFdpass yes\n"
        f"  ControlMaster auto\n  ControlPath {folder / 'cm-%C'}\n  ControlPersist 60\n{common}"
        f"Host nosuch\n  HostName nosuch.invalid\n  ProxyCommand {proxy}\n  ProxyUseFdpass yes\n{common}"
        f"Host plain\n  HostName {v4}\n{common}"
    )
    if open_port:
        direct = common.replace(f"Port {port}", f"Port {open_port}")
        config.write_text(config.read_text() + f"Host direct\n  HostName {v4}\n{direct}")
    setup = SshSetup(net, folder, port, config, process)
    try:
        _wait_listening(net, port, process, folder / "sshd.log")
        yield setup
    finally:
        with contextlib.suppress(Exception):
            setup.ssh("gwmux", "-O", "exit", timeout=10)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()
        if made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()


def _wait_listening(net: TestNet, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sshd exited ({process.returncode}):\n{log.read_text(errors='replace')}")
        listening = net.server.run("ss", "-Hltn", f"sport = :{port}", check=False).stdout
        if listening.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"sshd not listening on {port} within 10 s:\n{log.read_text(errors='replace')}")


def client_ini(path: Path, *, pfx: Path, password_file: Path, server_cer: Path, host: str) -> Path:
    """A sknock client configuration with the server ``gw`` (credentials in files, nothing in clear)."""
    path.write_text(
        f"[gw]\nhost = {host}\nserverCert = {server_cer}\ncredentials = {pfx}\npasswordFile = {password_file}\n"
        "timeout = 10\n"
    )
    return path
