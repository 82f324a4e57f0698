"""``sknock-knock ssh-proxy`` as ssh runs it, on loopback without root: a real subprocess whose stdout is
a socket (ProxyUseFdpass: the connection arrives as a descriptor with one byte) or a pipe (relayed both
ways); the knock is sent, and checked by the server's verifier, before the connection; nothing but the
connection on stdout; errors one line on stderr with exit 1 (not opened) or 2.  The real OpenSSH runs in
tests/test_ssh_e2e.py."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sknock.ports import Protocol
from tests.pki import PASSWORD
from tests.server_harness import KNOCK_SCRIPT
from tests.test_client import OwnPKI, build_own_pki, port_of, receive, tcp_port, udp_listener

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def echo_server() -> Iterator[int]:
    """A TCP service on 127.0.0.1 that sends back what it receives, then closes at the client's EOF."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port_of(listener)
    finally:
        listener.close()


@pytest.fixture(scope="module")
def service() -> Iterator[int]:
    with echo_server() as port:
        yield port


@pytest.fixture(scope="module")
def refused() -> Iterator[int]:
    with tcp_port(listening=False) as port:
        yield port


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, service: int, refused: int) -> OwnPKI:
    return build_own_pki(tmp_path_factory.mktemp("proxy-pki"), f"tcp/{service},tcp/{refused}")


def ini(tmp_path: Path, own: OwnPKI, knock_port: int, **keys: object) -> Path:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    path = tmp_path / "client.ini"
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    path.write_text(
        f"[lab]\nhost = 127.0.0.1\nserverCert = {own.server_cer}\ncredentials = {own.client_pfx}\npasswordFile = pw\n"
        f"knockPort = {knock_port}\n{extra}"
    )
    return path


def proxy(config: Path, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [str(KNOCK_SCRIPT), "ssh-proxy", "--config", str(config), *args]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_fdpass_hands_over_the_connected_socket(own: OwnPKI, service: int, tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    with udp_listener() as knocks, ours:
        process = proxy(ini(tmp_path, own, port_of(knocks)), "lab", "127.0.0.1", str(service),
                        stdin=subprocess.DEVNULL, stdout=theirs)
        theirs.close()
        ours.settimeout(20)
        data, fds, _, _ = socket.recv_fds(ours, 16, 1)
        _, err = process.communicate(timeout=20)
        assert process.returncode == 0, err
        assert err == b""
        assert data == b"\0" and len(fds) == 1  # as OpenSSH's mm_receive_fd wants it: one byte, one descriptor
        assert ours.recv(16) == b""  # and nothing else on stdout
        datagram, source = receive(knocks)
    with socket.socket(fileno=fds[0]) as connection:
        assert connection.getpeername() == ("127.0.0.1", service)
        connection.sendall(b"SSH-2.0-test\r\n")
        assert connection.recv(100) == b"SSH-2.0-test\r\n"
    assert own.verifier().check(datagram, source, time.time()).ports == ((Protocol.TCP, service),)


def test_relay_copies_both_ways_until_the_end(own: OwnPKI, service: int, tmp_path: Path) -> None:
    with udp_listener() as knocks:
        # the alias (%n) names no server: the server is found by its host (%h)
        process = proxy(ini(tmp_path, own, port_of(knocks)), "--relay", "alias", "lab", str(service),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        payload = os.urandom(300_000)
        out, err = process.communicate(payload, timeout=30)
        receive(knocks)
    assert process.returncode == 0, err
    assert err == b""
    assert out == payload  # echoed whole, and stdin's end reached the service (which then closed)


def test_a_port_that_does_not_open_is_exit_1_and_one_line(own: OwnPKI, refused: int, tmp_path: Path) -> None:
    with udp_listener() as knocks:
        config = ini(tmp_path, own, port_of(knocks), timeout=0.5, retries=2)
        started = time.monotonic()
        process = proxy(config, "lab", "127.0.0.1", str(refused), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        out, err = process.communicate(timeout=30)
        receive(knocks), receive(knocks)
    assert process.returncode == 1
    assert out == b""
    why = f"tcp/{refused} on 127.0.0.1 (127.0.0.1) did not open within 0.5 s"
    assert err.decode() == f"sknock-knock ssh-proxy: error: {why}\n"
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["lab", "127.0.0.1", "ssh"], "PORT must be 1..65535, not 'ssh'"),
        (["lab", "127.0.0.1"], "the following arguments are required: PORT"),
        (["nosuch", "nosuch.example", "22"], "no server named 'nosuch' or 'nosuch.example' in "),
        (["lab", "a..b", "22"], "cannot resolve 'a..b': not a valid host name"),
    ],
)
def test_bad_input_is_exit_2_and_one_line(own: OwnPKI, tmp_path: Path, args: list[str], needle: str) -> None:
    with udp_listener() as knocks:
        process = proxy(ini(tmp_path, own, port_of(knocks)), *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sknock-knock ssh-proxy: error: ") and needle in lines[0], lines
