"""``sknock-knock`` (``python -m sknock.cli.knock``) and ``client/knock-client.py`` in real subprocesses.

Exit 0 when the port opened (or the knock was sent, for -u/--no-verify/--close), 1 when it did not
open, 2 on bad input with exactly one line on stderr and no traceback; the password never shows.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sknock.cli import knock as knock_cli
from sknock.ports import Protocol
from sknock.protocol import Action
from tests.pki import PASSWORD, TestPKI
from tests.server_harness import KNOCK_SCRIPT
from tests.servercerts import write_cer
from tests.test_client import (
    HAS_IPV6,
    OwnPKI,
    assert_nothing_arrives,
    build_own_pki,
    needs_ipv6,
    pki_verifier,
    port_of,
    receive,
    tcp_port,
    udp_listener,
)

REPO = Path(__file__).resolve().parents[1]
WRONG = "wrong-secret-4711"


@pytest.fixture(scope="module")
def reserved() -> Iterator[dict[str, int]]:
    with contextlib.ExitStack() as stack:
        ports = {
            "open4": stack.enter_context(tcp_port("127.0.0.1", listening=True)),
            "closed4": stack.enter_context(tcp_port("127.0.0.1", listening=False)),
        }
        if HAS_IPV6:
            ports["open6"] = stack.enter_context(tcp_port("::1", listening=True))
        yield ports


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, reserved: dict[str, int]) -> OwnPKI:
    ports = ",".join(f"tcp/{p}" for p in sorted(set(reserved.values())))
    return build_own_pki(tmp_path_factory.mktemp("cli-pki"), ports)


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "pfx-password"
    path.write_text(PASSWORD + "\n")
    return path


def run(
    args: list[str], *, cwd: Path, env_password: str | None = None, script: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SKNOCK_PFX_PASSWORD"}
    env["PYTHONPATH"] = str(REPO)
    env["XDG_CONFIG_HOME"] = str(cwd / "no-config")  # no user's client.ini: only what the test says
    if env_password is not None:
        env["SKNOCK_PFX_PASSWORD"] = env_password
    command = [sys.executable, str(script)] if script else [str(KNOCK_SCRIPT)]
    result = subprocess.run(
        [*command, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    for stream in (result.stdout, result.stderr):
        assert PASSWORD not in stream and WRONG not in stream, "a password was printed"
        assert "Traceback" not in stream
    return result


def one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sknock-knock: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def status(result: subprocess.CompletedProcess[str]) -> str:
    """The status line: on stderr, since stdout is not a terminal here (a pipe stays clean)."""
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def alice_args(pki: TestPKI, *more: str) -> list[str]:
    return ["--pfx", str(pki.alice.pfx), "--server-cert", str(pki.server.cer), *more]


def own_args(own: OwnPKI, password_file: Path, *more: str) -> list[str]:
    files = ["--pfx", str(own.client_pfx), "--server-cert", str(own.server_cer)]
    return [*files, "--password-file", str(password_file), *more]


# -- exit 0 ----------------------------------------------------------------------------------------


def test_udp_knock_sent_with_password_file_is_granted(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    with udp_listener() as sock:
        args = alice_args(pki, "--password-file", str(password_file), "-u", "-p", "8000")
        result = run([*args, "--knock-port", str(port_of(sock)), "--duration", "30", "127.0.0.1"], cwd=tmp_path)
        data, source = receive(sock)
        assert_nothing_arrives(sock)
    assert result.returncode == 0, result
    assert status(result) == "knock for udp/8000 sent to 127.0.0.1 (UDP cannot be confirmed)"
    grant = pki_verifier(pki).check(data, source, time.time())
    assert grant.ports == ((Protocol.UDP, 8000),)
    assert grant.duration == 30.0


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
def test_no_verify_with_password_from_the_environment(pki: TestPKI, tmp_path: Path, host: str) -> None:
    flag = "-6" if ":" in host else "-4"
    with udp_listener(host) as sock:
        args = alice_args(pki, flag, "--no-verify", "-p", "2003", "--knock-port", str(port_of(sock)), host)
        result = run(args, cwd=tmp_path, env_password=PASSWORD)
        data, source = receive(sock)
    assert result.returncode == 0, result
    assert status(result) == f"knock for tcp/2003 sent to {host} (not verified)"
    assert pki_verifier(pki).check(data, source, time.time()).ports == ((Protocol.TCP, 2003),)


def test_password_file_comes_before_the_environment(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    with udp_listener() as sock:
        args = alice_args(pki, "--password-file", str(password_file), "--no-verify", "-p", "22")
        result = run([*args, "--knock-port", str(port_of(sock)), "127.0.0.1"], cwd=tmp_path, env_password=WRONG)
        receive(sock)
    assert result.returncode == 0, result


@pytest.mark.parametrize(("host", "key"), [("127.0.0.1", "open4"), pytest.param("::1", "open6", marks=needs_ipv6)])
def test_verified_open(
    own: OwnPKI, password_file: Path, reserved: dict[str, int], tmp_path: Path, host: str, key: str
) -> None:
    port = reserved[key]
    with udp_listener(host) as sock:
        args = own_args(own, password_file, "-p", str(port), "--knock-port", str(port_of(sock)), "--source", "auto")
        result = run([*args, "--timeout", "10", host], cwd=tmp_path)
        data, source = receive(sock)
    assert result.returncode == 0, result
    assert status(result) == f"tcp/{port} is open on {host}"
    grant = own.verifier().check(data, source, time.time())
    assert grant.ports == ((Protocol.TCP, port),)


def test_close(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    with udp_listener() as sock:
        args = alice_args(pki, "--password-file", str(password_file), "--close", "-p", "2004")
        result = run([*args, "--knock-port", str(port_of(sock)), "localhost", "-4"], cwd=tmp_path)
        data, source = receive(sock)
    assert result.returncode == 0, result
    assert status(result) == "asked localhost (127.0.0.1) to close tcp/2004 for this host"
    assert pki_verifier(pki).check(data, source, time.time()).action is Action.CLOSE


def test_poc_script_from_another_directory(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    with udp_listener() as sock:
        args = alice_args(pki, "--password-file", str(password_file), "-u", "-p", "8000", "--knock-port")
        result = run([*args, str(port_of(sock)), "127.0.0.1"], cwd=tmp_path, script=REPO / "client" / "knock-client.py")
        data, source = receive(sock)
    assert result.returncode == 0, result
    assert pki_verifier(pki).check(data, source, time.time()).ports == ((Protocol.UDP, 8000),)


# -- exit 1 ----------------------------------------------------------------------------------------


def test_not_opened(own: OwnPKI, password_file: Path, reserved: dict[str, int], tmp_path: Path) -> None:
    port = reserved["closed4"]
    with udp_listener() as sock:
        args = own_args(own, password_file, "-p", str(port), "--knock-port", str(port_of(sock)))
        result = run([*args, "--timeout", "0.6", "--retries", "2", "127.0.0.1"], cwd=tmp_path)
        receive(sock)
        receive(sock)  # two knocks, as many as --retries
        assert_nothing_arrives(sock)
    assert result.returncode == 1, result
    assert status(result) == f"tcp/{port} on 127.0.0.1 did not open within 0.6 s (2 knock(s) sent)"


# -- exit 2: one line, no traceback ----------------------------------------------------------------


def test_missing_pfx(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    args = ["--pfx", str(tmp_path / "nobody.pfx"), "--server-cert", str(pki.server.cer)]
    result = run([*args, "--password-file", str(password_file), "-p", "22", "127.0.0.1"], cwd=tmp_path)
    one_error_line(result, "nobody.pfx: no such file")


def test_missing_pfx_is_reported_before_asking_for_a_password(pki: TestPKI, tmp_path: Path) -> None:
    result = run(["--pfx", str(tmp_path / "nobody.pfx"), "-p", "22", "127.0.0.1"], cwd=tmp_path)
    one_error_line(result, "nobody.pfx: no such file", "--pfx")


def test_wrong_password_from_file_and_from_environment(pki: TestPKI, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text(WRONG + "\n")
    result = run(alice_args(pki, "--password-file", str(wrong), "-p", "22", "127.0.0.1"), cwd=tmp_path)
    one_error_line(result, str(pki.alice.pfx), "wrong password")
    result = run(alice_args(pki, "-p", "22", "127.0.0.1"), cwd=tmp_path, env_password=WRONG)
    one_error_line(result, "wrong password")


def test_no_password_without_a_terminal(pki: TestPKI, tmp_path: Path) -> None:
    result = run(alice_args(pki, "-p", "22", "127.0.0.1"), cwd=tmp_path)
    one_error_line(result, f"no password for {pki.alice.pfx}: give --password-file FILE", "SKNOCK_PFX_PASSWORD")


def test_missing_password_file(pki: TestPKI, tmp_path: Path) -> None:
    result = run(alice_args(pki, "--password-file", str(tmp_path / "nope"), "-p", "22", "127.0.0.1"), cwd=tmp_path)
    one_error_line(result, "password file", "nope: no such file")


@pytest.mark.parametrize(("which", "words"), [("ca", "it is a CA certificate"), ("client", "a client's certificate")])
def test_a_ca_or_client_certificate_as_the_servers_is_one_line_before_the_password(
    pki: TestPKI, tmp_path: Path, which: str, words: str
) -> None:
    cert = pki.ca_cert if which == "ca" else pki.alice.certificate
    path = write_cer(tmp_path / f"{which}.cer", cert)
    with udp_listener() as sock:
        # no password is given: the certificate is judged before one is asked for, and nothing is sent
        args = ["--pfx", str(pki.alice.pfx), "--server-cert", str(path), "-u", "-p", "8000"]
        result = run([*args, "--knock-port", str(port_of(sock)), "127.0.0.1"], cwd=tmp_path)
        assert_nothing_arrives(sock)
    one_error_line(result, f"server certificate {path}: ", "is not a server certificate", words)


def test_port_not_in_certificate_sends_nothing(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    with udp_listener() as sock:
        args = alice_args(pki, "--password-file", str(password_file), "-p", "23", "--knock-port", str(port_of(sock)))
        result = run([*args, "127.0.0.1"], cwd=tmp_path)
        assert_nothing_arrives(sock)
    one_error_line(result, "does not authorize tcp/23")


def test_server_certificate_of_another_ca(pki: TestPKI, own: OwnPKI, password_file: Path, tmp_path: Path) -> None:
    args = ["--pfx", str(pki.alice.pfx), "--server-cert", str(own.server_cer), "--password-file", str(password_file)]
    result = run([*args, "-p", "22", "127.0.0.1"], cwd=tmp_path)
    one_error_line(result, str(own.server_cer), "not one this client's CA issued")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-6", "127.0.0.1"], ["cannot resolve '127.0.0.1' to an IPv6 address"]),
        (["-4", "::1"], ["cannot resolve '::1' to an IPv4 address"]),
        (["a..b"], ["cannot resolve 'a..b'"]),
    ],
)
def test_unresolvable_host(
    pki: TestPKI, password_file: Path, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    result = run(alice_args(pki, "--password-file", str(password_file), "-p", "22", *args), cwd=tmp_path)
    one_error_line(result, *needles)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["127.0.0.1"], "the following arguments are required: -p/--port"),
        (["-p", "22"], "the following arguments are required: TARGET"),
        (["-p", "0", "127.0.0.1"], "port must be 1..65535, not 0"),
        (["-p", "ssh", "127.0.0.1"], "port must be a whole number, not 'ssh'"),
        (["-p", "22", "--knock-port", "70000", "127.0.0.1"], "knock port must be 1..65535"),
        (["-p", "22", "--timeout=-1", "127.0.0.1"], "timeout must be more than 0"),
        (["-p", "22", "--timeout", "nan", "127.0.0.1"], "timeout must be more than 0"),
        (["-p", "22", "--retries", "0", "127.0.0.1"], "retries must be 1..100"),
        (["-p", "22", "--duration", "0", "127.0.0.1"], "duration must be 1..4294967295"),
        (["-p", "22", "--work-bits", "33", "127.0.0.1"], "work bits must be 0..32"),
        (["-p", "22", "--source", "my-laptop", "127.0.0.1"], "source must be auto, any or an IP address"),
        (["-p", "22", "-4", "-6", "127.0.0.1"], "not allowed with argument"),
        (["-p", "22", "--source", "::1", "127.0.0.1"], "is IPv6 but the server address 127.0.0.1 is IPv4"),
        (["-p", "22", "--bogus", "127.0.0.1"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments(pki: TestPKI, password_file: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    result = run(alice_args(pki, "--password-file", str(password_file), *args), cwd=tmp_path)
    one_error_line(result, needle)


def test_help_exits_zero(tmp_path: Path) -> None:
    result = run(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: sknock-knock" in result.stdout
    assert "--password-file FILE" in result.stdout


# -- in-process ------------------------------------------------------------------------------------


def test_main_returns_the_exit_status(pki: TestPKI, password_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with udp_listener() as sock:
        args = alice_args(pki, "--password-file", str(password_file), "-u", "-p", "8000", "--knock-port")
        assert knock_cli.main([*args, str(port_of(sock)), "127.0.0.1"]) == 0
        receive(sock)
    assert knock_cli.main(alice_args(pki, "--password-file", str(password_file), "-p", "23", "127.0.0.1")) == 2
    out, err = capsys.readouterr()
    assert out == ""  # not a terminal: the status line went to stderr
    first, second = err.splitlines()
    assert first.startswith("knock for udp/8000 sent")
    assert second.startswith("sknock-knock: error: ") and "does not authorize tcp/23" in second


# -- named servers (the client configuration file) ----------------------------------------------------------


def write_ini(path: Path, pki: TestPKI, password_file: Path, **keys: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    path.write_text(
        f"[lab]\nhost = 127.0.0.1\nserverCert = {pki.server.cer}\ncredentials = {pki.alice.pfx}\n"
        f"passwordFile = {password_file}\n{extra}"
    )
    return path


def test_a_named_server_from_the_users_file_knocks_its_ports(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    with udp_listener() as sock:
        # run() points XDG_CONFIG_HOME at CWD/no-config: the user's file is there
        write_ini(tmp_path / "no-config" / "sknock" / "client.ini", pki, password_file,
                  ports="udp/8000, udp/8000", knockPort=port_of(sock))
        result = run(["lab"], cwd=tmp_path)
        data, source = receive(sock)
        assert_nothing_arrives(sock)
    assert result.returncode == 0, result
    assert status(result) == "knock for udp/8000 sent to 127.0.0.1 (UDP cannot be confirmed)"
    assert pki_verifier(pki).check(data, source, time.time()).ports == ((Protocol.UDP, 8000),)


def test_a_named_server_with_another_port_and_options_that_override(
    pki: TestPKI, password_file: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text(WRONG + "\n")
    ini = write_ini(tmp_path / "elsewhere.ini", pki, wrong, ports="tcp/22", knockPort=9, family=6)
    with udp_listener() as sock:
        # -p, --no-verify, -4, --knock-port and --password-file all override the file
        args = ["--config", str(ini), "lab", "-p", "2003", "--no-verify", "-4", "--knock-port", str(port_of(sock))]
        result = run([*args, "--password-file", str(password_file), "--quiet"], cwd=tmp_path)
        data, source = receive(sock)
    assert result.returncode == 0, result
    assert result.stdout == "" and result.stderr == ""  # --quiet
    assert pki_verifier(pki).check(data, source, time.time()).ports == ((Protocol.TCP, 2003),)


def test_a_named_server_without_ports_needs_p(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "c.ini", pki, password_file)
    result = run(["--config", str(ini), "lab"], cwd=tmp_path)
    one_error_line(result, "-p/--port", f"the named server lab in {ini} has no ports")


def test_a_bad_configuration_file_is_one_line(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "c.ini", pki, password_file, knockPort="seventy")
    result = run(["--config", str(ini), "lab", "-p", "22"], cwd=tmp_path)
    one_error_line(result, f"{ini}: [lab]: knockPort: port must be 1..65535, not 'seventy'")
    result = run(["--config", str(tmp_path / "none.ini"), "lab", "-p", "22"], cwd=tmp_path)
    one_error_line(result, "client configuration file ", "none.ini: no such file")


def test_without_credentials_the_error_says_how_to_give_them(tmp_path: Path) -> None:
    result = run(["-p", "22", "127.0.0.1"], cwd=tmp_path)
    one_error_line(result, "no client credentials for 127.0.0.1: give --pfx FILE, or name a server")


def test_a_target_that_is_neither_a_named_server_nor_a_host(tmp_path: Path) -> None:
    ini = tmp_path / "c.ini"
    ini.write_text("[gateway]\nhost = 127.0.0.1\n")
    result = run(["--config", str(ini), "gatewya", "-p", "22"], cwd=tmp_path)
    one_error_line(result, "cannot resolve 'gatewya'", f"; nor is it a named server of {ini}")


def test_the_status_line_goes_to_stdout_on_a_terminal(pki: TestPKI, password_file: Path, tmp_path: Path) -> None:
    import pty

    env = {k: v for k, v in os.environ.items() if k != "SKNOCK_PFX_PASSWORD"}
    env.update(PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(tmp_path / "none"))
    with udp_listener() as sock:
        args = alice_args(pki, "--password-file", str(password_file), "-u", "-p", "8000")
        main_fd, terminal = pty.openpty()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "sknock.cli.knock", *args, "--knock-port", str(port_of(sock)), "127.0.0.1"],
                env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE, text=True, timeout=120,
            )
            os.close(terminal)
            seen = b""
            while chunk := _read_pty(main_fd):
                seen += chunk
        finally:
            os.close(main_fd)
        receive(sock)
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert seen.decode().strip() == "knock for udp/8000 sent to 127.0.0.1 (UDP cannot be confirmed)"


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 1024)
    except OSError:  # EIO: the terminal's other end is closed and everything was read
        return b""
