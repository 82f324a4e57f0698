"""A real ``redis-server`` for the tests of the shared replay store, started and stopped by the test.

    with RedisServer.start() as store:                     # loopback, a free port, no persistence
        client = store.client()
        store.stop(); store.start_again()                  # the same port, empty, as after a crash
        store.pause(); store.resume()                      # SIGSTOP / SIGCONT: a store that does not answer

``host`` may be given a network namespace (``netns``) and an address in it, for the servers of a fleet
in namespaces.  The process is killed by its pid and its folder removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Host

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def require_redis() -> None:
    """Skip unless redis-server and the redis client library (the ``fleet`` extra) are installed."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("needs redis-server (Debian package redis-server; scripts/bootstrap.sh installs it)")
    pytest.importorskip("redis", reason="needs the redis client library: pip install -e '.[fleet]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    host: str
    port: int
    folder: Path
    netns: Host | None = None
    password: str | None = None
    tls: tuple[Path, Path, Path] | None = None  # certificate, key, CA (PEM): TLS only, no plain port
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls, host: str = "127.0.0.1", port: int | None = None, *, netns: Host | None = None,
        password: str | None = None, tls: tuple[Path, Path, Path] | None = None,
    ) -> RedisServer:
        server = cls(host, port or free_port(), Path(tempfile.mkdtemp(prefix="sknock-redis-")), netns, password, tls)
        try:
            server.start_again()
        except BaseException:
            server.close()
            raise
        return server

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/0"

    def start_again(self, timeout: float = 10) -> None:
        """Start redis-server (again, empty) on the same address and port; wait until it answers."""
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        argv = [REDIS_SERVER, *ports, "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.folder / "redis.log")]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        if self.netns is not None:
            argv = self.netns.cmd(*argv)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, subprocess.SubprocessError, RuntimeError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                logfile = self.folder / "redis.log"
                log = logfile.read_text(errors="replace") if logfile.exists() else ""
                raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}: {log}")
            time.sleep(0.05)

    def command(self, *words: str) -> str:
        """One command through redis-cli (run where the server runs); its answer, stripped."""
        argv = ["redis-cli", "-h", self.host, "-p", str(self.port), "--no-auth-warning"]
        if self.tls is not None:
            argv += ["--tls", "--cacert", str(self.tls[2])]
        if self.password is not None:
            argv += ["-a", self.password]
        argv += list(words)
        if self.netns is not None:
            argv = self.netns.cmd(*argv)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        return result.stdout.strip()

    def client(self) -> Any:
        """A redis-py client on loopback (only for a server there)."""
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=5)

    def stop(self) -> None:
        """Kill redis-server (SIGKILL, by its pid): everything it held is gone, as after a crash."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
