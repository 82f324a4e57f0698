"""Run the real knock server in a test namespace, and knock at it from the client namespace.

    with TestNet.create() as net, RunningServer.start(net, pki, tmp_path, firewallPolicy="drop",
                                                      protectedPorts="tcp/8080") as server:
        service = server.serve_tcp(8080)              # a small TCP service behind the protected port
        assert not server.reachable(8080)             # from the client namespace
        knock_from_client(net, pki.alice, server, 8080)
        server.wait_log("granted tcp/8080")
        assert server.reachable(8080)

Everything the server needs lives in a world-readable temp folder, or with ``private=True`` in a folder
only root may enter (0700, every file 0600, the PFX password in a 0600 ``PFXPasswdFile``), as operators
keep /etc/sknock: the workers (nobody) need none of it.  The server process is stopped (SIGTERM, then
SIGKILL) and the namespaces removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.netns import TestNet
from tests.pki import PASSWORD, TestPKI

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
#: The ``sknock-knock`` console script pip installed beside PY: what users run (sknock.cli.entry).
KNOCK_SCRIPT = Path(PY).with_name("sknock-knock")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
METRICS = "127.0.0.1:9465"  # metricsListen for the tests that turn the metrics on (the server namespace's loopback)


def _world_readable_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="sknock-e2e-"))
    path.chmod(0o755)
    return path


def _root_only_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="sknock-e2e-private-"))
    path.chmod(0o700)
    return path


@dataclass
class RunningServer:
    net: TestNet
    folder: Path
    config: Path
    log: Path
    process: subprocess.Popen[bytes]
    control_socket: Path
    options: dict[str, str]
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def start(
        cls, net: TestNet, pki: TestPKI, *, wait: bool = True, private: bool = False,
        script: tuple[str, ...] = (), env: dict[str, str] | None = None, **options: str,
    ) -> RunningServer:
        """Write a config (pki's server1 credentials and CRL, plus ``options``) and start the server
        in ``net.server``.  Waits for 'worker ready' unless ``wait`` is False.  ``private``: a root-only
        folder and files, and the password in a file (see the module docstring).  ``script``: another
        entry point and its first arguments, for a test-only variant of the server.  ``env``: more
        environment variables for the server (NOTIFY_SOCKET...)."""
        folder = _root_only_dir() if private else _world_readable_dir()
        shutil.copy(pki.server.pfx, folder / "server.pfx")
        shutil.copy(pki.ca_dir / "crl.der", folder / "crl.der")
        password: dict[str, str] = {"PFXPasswd": PASSWORD}
        if private:
            (folder / "pfx.pass").write_text(PASSWORD + "\n")
            password = {"PFXPasswdFile": "pfx.pass"}
        for name in ("server.pfx", "crl.der", *(("pfx.pass",) if private else ())):
            (folder / name).chmod(0o600 if private else 0o644)
        values = {
            "serverPFXFile": "server.pfx",
            **password,
            "crlFile": "crl.der",
            "controlSocket": str(folder / "control" / "control.sock"),
            "stateDir": str(folder / "state"),
            "firewallPolicy": "drop",
            "logLevel": "DEBUG",
            "user": "nobody",  # the test machine may have no sknock user
            **options,
        }
        config = folder / "config.ini"
        config.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
        if private:
            config.chmod(0o600)
        log = folder / "server.log"
        with log.open("wb") as out:
            process = net.server.popen(
                PY, *(script or (str(REPO / "server" / "knock-server.py"),)), "-c", str(config), stdout=out,
                stderr=subprocess.STDOUT,
                env={**ENV, **(env or {})},
            )
        server = cls(net, folder, config, log, process, Path(values["controlSocket"]), values)
        if wait:
            try:
                server.wait_log("worker ready", timeout=20)
            except BaseException:
                server.stop()
                raise
        return server

    # -- observing -----------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def mark(self) -> int:
        """A place in the log: pass it as ``since`` to wait only for what comes after."""
        return len(self.log_text())

    def wait_log(self, needle: str, *, timeout: float = 10, count: int = 1, since: int = 0) -> str:
        """Wait until ``needle`` appears ``count`` times in the server log after ``since``; return that
        part of the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[since:]
            if text.count(needle) >= count:
                return text
            if self.process.poll() is not None:
                raise AssertionError(f"server exited ({self.process.returncode}) before {needle!r}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the server log within {timeout} s:\n{text}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        """The control socket's answer (the test runs as root, like ``sknock-server status``)."""
        from sknock.server.control import query_status

        return query_status(self.control_socket)

    def status_cli(self) -> str:
        """What ``sknock-server -c CONFIG status`` prints."""
        return subprocess.run(
            [PY, "-m", "sknock.cli.server", "-c", str(self.config), "status"],
            capture_output=True, text=True, env=ENV, check=True, timeout=30,
        ).stdout

    def nft_ruleset(self) -> str:
        return self.net.server.run("nft", "list", "ruleset").stdout

    # -- services and probes -------------------------------------------------------------------------

    def serve_tcp(self, port: int) -> subprocess.Popen[bytes]:
        """A TCP service on ``port`` (IPv4 and IPv6) in the server namespace that answers 'hello'."""
        code = (
            "import socket, threading\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('::', {port})); s.listen(16); print('listening', flush=True)\n"
            "def serve(c):\n"
            "    with c:\n"
            "        c.sendall(b'hello\\n')\n"
            "        while c.recv(100): c.sendall(b'again\\n')\n"
            "while True:\n"
            "    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
        )
        proc = self.net.server.popen(PY, "-c", code, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening"
        self.helpers.append(proc)
        return proc

    def reachable(self, port: int, *, family: int = 4, timeout: float = 1.0) -> bool:
        """Can the client namespace open a new TCP connection to ``port``?"""
        host = self.net.server.ipv4 if family == 4 else self.net.server.ipv6
        code = (
            "import socket, sys\n"
            f"try:\n    socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
            "except OSError:\n    sys.exit(1)\n"
        )
        return self.net.client.run(PY, "-c", code, check=False, timeout=timeout + 10).returncode == 0

    # -- stopping ------------------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        for helper in self.helpers:
            with contextlib.suppress(ProcessLookupError):
                helper.kill()
            helper.wait(5)
        self.helpers.clear()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def client_script(pki_client: Any, server_cer: Path, body: str) -> str:
    """Python source run in the client namespace with a KnockClient ``c`` for ``pki_client``."""
    return (
        "import sys, ipaddress, time, socket, json\n"
        "from sknock.client import KnockClient\n"
        "from sknock.ports import Protocol\n"
        "from sknock.protocol import Action\n"
        f"c = KnockClient(client_pfx={str(pki_client.pfx)!r}, pfx_password={PASSWORD!r}, "
        f"server_cert={str(server_cer)!r}, check_server_cert=False)\n" + body
    )


def run_in_client(net: TestNet, source: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(net.client.cmd(PY, "-c", source), capture_output=True, text=True, env=ENV, timeout=timeout)


def knock_from_client(
    net: TestNet, pki_client: Any, pki: TestPKI, port: int, *, family: int = 4, verify: bool = False, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Knock with the client library from the client namespace; prints the knock() result as JSON."""
    host = net.server.ipv4 if family == 4 else net.server.ipv6
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    body = f"print(json.dumps(c.knock({host!r}, {port}, verify={verify!r}{', ' + args if args else ''})))\n"
    result = run_in_client(net, client_script(pki_client, pki.server.cer, body))
    assert result.returncode == 0, result.stderr
    return result


def read_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout.strip().splitlines()[-1])


_SCRAPE = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen('http://{listen}/metrics', timeout=5).read().decode())\n"
)


def scrape_metrics(net: TestNet, listen: str = METRICS) -> dict[str, float]:
    """Every sample of the endpoint, keyed ``name{label="value",...}`` (labels sorted)."""
    text = net.server.run(PY, "-c", _SCRAPE.format(listen=listen), timeout=20).stdout
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_for_metrics(
    net: TestNet, expected: dict[str, float], timeout: float = 15, listen: str = METRICS
) -> dict[str, float]:
    """Scrape until every figure in ``expected`` is there (workers report each second, the monitor
    snapshots each second); fail with the difference."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape_metrics(net, listen)
        wrong = {k: (samples.get(k), v) for k, v in expected.items() if samples.get(k) != v}
        if not wrong:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics (got, wanted): {wrong}")
        time.sleep(0.5)
