"""Tests for sknock.server.config: real files in tmp_path, every option, every kind of error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sknock.errors import ConfigError
from sknock.ports import Protocol
from sknock.server.config import (
    CaptureMode,
    FirewallBackend,
    PolicyMode,
    ServerConfig,
    load_config,
)

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Pa55"  # a value to hunt for in repr/describe


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """A folder with the files a minimal config names."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "server.pfx").write_bytes(b"pfx bytes")
    (tmp_path / "certs" / "crl.der").write_bytes(b"crl bytes")
    return tmp_path


def write(site: Path, body: str, name: str = "sknock.ini") -> Path:
    path = site / name
    path.write_text(body, encoding="utf-8")
    return path


MINIMAL = f"""[DEFAULT]
serverPFXFile = certs/server.pfx
crlFile = certs/crl.der
PFXPasswd = {SECRET}
user = nobody
"""


def load(site: Path, extra: str = "", *, base: str = MINIMAL, **kwargs: object) -> ServerConfig:
    return load_config(write(site, base + extra), **kwargs)  # type: ignore[arg-type]


def error_of(site: Path, extra: str = "", *, base: str = MINIMAL, **kwargs: object) -> str:
    path = write(site, base + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert str(path) in message, "every config error names the file"
    return message


# -- defaults and every option ------------------------------------------------------------------


def test_minimal_config_gets_the_original_defaults(site: Path) -> None:
    cfg = load(site)
    assert cfg.knockpacket_min_length == 800
    assert cfg.port_open_duration == 15
    assert cfg.timestamp_threshold == 7
    assert cfg.crl_update_interval_minutes == 30
    assert cfg.recv_buffer == 1600
    assert cfg.firewall_policy is PolicyMode.NONE
    assert cfg.crl_url is None
    assert cfg.pfx_password == SECRET.encode()
    # sknock's defaults
    assert cfg.firewall_backend is FirewallBackend.AUTO
    assert cfg.open_command is None and cfg.close_command is None
    assert cfg.interfaces is None
    assert cfg.knock_ports is None
    assert cfg.capture_mode is CaptureMode.PACKET
    assert cfg.protected_ports is None
    assert cfg.emergency_ssh is True
    assert cfg.ca_file is None and cfg.log_file is None
    assert cfg.log_level == "INFO"
    assert cfg.require_source_address is False
    assert cfg.max_open_duration == 300
    assert cfg.work_bits == 12
    assert cfg.user == "nobody"  # as MINIMAL says: the test machine may have no sknock user
    default = load_config(write(site, MINIMAL.replace("user = nobody\n", ""), "no-user.ini"), check_files=False)
    assert default.user == "sknock"
    assert cfg.control_socket == Path("/run/sknock/control.sock")


def test_every_option_set(site: Path) -> None:
    (site / "certs" / "ca.pem").write_bytes(b"ca")
    (site / "logs").mkdir()
    cfg = load(
        site,
        """KNOCKPACKET_MIN_LENGTH = 900
PORT_OPEN_DURATION_IN_SECONDS = 30
TIMESTAMP_THRESHOLD_IN_SECONDS = 10
CRL_UPDATE_INTERVAL_IN_MINUTES = 5
RECV_BUFFER = 2048
SIGNATURE_SIZE = 72
crlUrl = https://ca.example.org/crl.der
firewallPolicy = DROP
firewallBackend = nftables
knockPorts = 10000-10100, 53
captureMode = udp
protectedPorts = tcp/22,tcp/3389,udp/1194
emergencySSH = off
caFile = certs/ca.pem
logFile = logs/sknock.log
logLevel = debug
requireSourceAddress = true
maxOpenDuration = 600
workBits = 20
user = daemon
controlSocket = run/ctl.sock
""",
        base=MINIMAL.replace("user = nobody\n", ""),
    )
    assert cfg.knockpacket_min_length == 900
    assert cfg.port_open_duration == 30
    assert cfg.timestamp_threshold == 10
    assert cfg.crl_update_interval_minutes == 5
    assert cfg.recv_buffer == 2048
    assert cfg.notices[0] == "SIGNATURE_SIZE is ignored: sknock's protocol carries the signature length"
    assert cfg.crl_url == "https://ca.example.org/crl.der"
    assert cfg.firewall_policy is PolicyMode.DROP
    assert cfg.firewall_backend is FirewallBackend.NFTABLES
    assert cfg.knock_ports == ((53, 53), (10000, 10100))
    assert cfg.capture_mode is CaptureMode.UDP
    assert cfg.protected_ports is not None
    assert (Protocol.TCP, 3389) in cfg.protected_ports and (Protocol.UDP, 1194) in cfg.protected_ports
    assert (Protocol.TCP, 80) not in cfg.protected_ports
    assert cfg.emergency_ssh is False
    assert cfg.ca_file == site / "certs" / "ca.pem"
    assert cfg.log_file == site / "logs" / "sknock.log"
    assert cfg.log_level == "DEBUG"
    assert cfg.require_source_address is True
    assert cfg.max_open_duration == 600
    assert cfg.work_bits == 20
    assert cfg.user == "daemon"
    assert cfg.control_socket == site / "run" / "ctl.sock"


def test_every_option_of_the_command_backend_and_packet_capture_set(site: Path) -> None:
    """The options test_every_option_set cannot hold beside its own: the command backend applies no
    policy (so firewallPolicy = none and protectedPorts = all), and interfaces need packet capture."""
    cfg = load(
        site,
        """firewallPolicy = none
firewallBackend = command
openCommand = /sbin/open %IP% %PROTO% %PORT% %DURATION%
closeCommand = /sbin/close '%IP%' %PROTO% %PORT%
interfaces = eth0, wg0
captureMode = packet
protectedPorts = all
""",
    )
    assert cfg.firewall_policy is PolicyMode.NONE
    assert cfg.firewall_backend is FirewallBackend.COMMAND
    assert cfg.open_command == "/sbin/open %IP% %PROTO% %PORT% %DURATION%"
    assert cfg.close_command == "/sbin/close '%IP%' %PROTO% %PORT%"
    assert cfg.interfaces == ("eth0", "wg0")
    assert cfg.capture_mode is CaptureMode.PACKET
    assert cfg.protected_ports is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("yes", True),
        ("no", False),
        ("true", True),
        ("False", False),
        ("on", True),
        ("OFF", False),
        ("1", True),
        ("0", False),
    ],
)
def test_booleans(site: Path, text: str, value: bool) -> None:
    assert load(site, f"requireSourceAddress = {text}\n").require_source_address is value


@pytest.mark.parametrize("policy", ["none", "reject", "drop"])
def test_policies(site: Path, policy: str) -> None:
    assert load(site, f"firewallPolicy = {policy}\n").firewall_policy.value == policy


@pytest.mark.parametrize("backend", ["auto", "nftables", "iptables"])
def test_backends_without_commands(site: Path, backend: str) -> None:
    assert load(site, f"firewallBackend = {backend}\n").firewall_backend.value == backend


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    site: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("cwd")
    before = Path.cwd()
    os.chdir(elsewhere)
    try:
        cfg = load(site)
    finally:
        os.chdir(before)
    assert cfg.server_pfx_file == site / "certs" / "server.pfx"
    assert cfg.crl_file == site / "certs" / "crl.der"
    assert cfg.source == site / "sknock.ini"


def test_absolute_paths_stay(site: Path) -> None:
    pfx = site / "certs" / "server.pfx"
    base = f"[DEFAULT]\nserverPFXFile = {pfx}\ncrlFile = certs/crl.der\nPFXPasswd = x\nuser = nobody\n"
    assert load(site, base=base).server_pfx_file == pfx


def test_local_crl_url_is_a_path_relative_to_the_config(site: Path) -> None:
    (site / "mirror").mkdir()
    (site / "mirror" / "crl.der").write_bytes(b"crl")
    assert load(site, "crlUrl = mirror/crl.der\n").crl_url == str(site / "mirror" / "crl.der")


def test_crl_file_may_be_missing_when_a_url_will_fetch_it(site: Path) -> None:
    (site / "certs" / "crl.der").unlink()
    cfg = load(site, "crlUrl = http://127.0.0.1:8080/crl.der\n")
    assert cfg.crl_file == site / "certs" / "crl.der"


def test_empty_value_means_not_set(site: Path) -> None:
    cfg = load(site, "crlUrl =\ncaFile =\n")
    assert cfg.crl_url is None and cfg.ca_file is None


def test_comments_and_case_sensitive_keys(site: Path) -> None:
    cfg = load(site, "# a comment\n; another\nworkBits = 3\n")
    assert cfg.work_bits == 3


# -- passwords ----------------------------------------------------------------------------------

NO_PASSWORD = "[DEFAULT]\nserverPFXFile = certs/server.pfx\ncrlFile = certs/crl.der\nuser = nobody\n"


def test_password_from_file_is_its_first_line(site: Path) -> None:
    (site / "pass").write_bytes(SECRET.encode() + b"\r\nsecond line is not the password\n")
    cfg = load(site, "PFXPasswdFile = pass\n", base=NO_PASSWORD)
    assert cfg.pfx_password == SECRET.encode()
    assert cfg.pfx_password_source == f"PFXPasswdFile {site / 'pass'}"
    assert cfg.notices == ()


def test_password_from_environment(site: Path) -> None:
    cfg = load(site, "PFXPasswdEnv = SKNOCK_TEST_PW\n", base=NO_PASSWORD, environ={"SKNOCK_TEST_PW": SECRET})
    assert cfg.pfx_password == SECRET.encode()


def test_inline_password_gets_a_notice(site: Path) -> None:
    assert any("PFXPasswdFile" in n for n in load(site).notices)


def test_password_never_in_repr_or_describe(site: Path) -> None:
    cfg = load(site)
    assert SECRET not in repr(cfg)
    assert SECRET not in str(cfg)
    text = cfg.describe()
    assert SECRET not in text
    assert "PFXPasswd" in text and "KNOCKPACKET_MIN_LENGTH = 800" in text


def test_two_password_sources(site: Path) -> None:
    (site / "pass").write_text("x")
    message = error_of(site, "PFXPasswdFile = pass\n")
    assert "PFXPasswd" in message and "PFXPasswdFile" in message and "exactly one" in message


def test_no_password_source(site: Path) -> None:
    assert "no PFX password" in error_of(site, base=NO_PASSWORD)


def test_password_env_variable_missing(site: Path) -> None:
    message = error_of(site, "PFXPasswdEnv = NOPE_NOT_SET\n", base=NO_PASSWORD, environ={})
    assert "PFXPasswdEnv" in message and "NOPE_NOT_SET" in message


def test_password_file_empty_or_missing(site: Path) -> None:
    (site / "pass").write_bytes(b"\n")
    assert "is empty" in error_of(site, "PFXPasswdFile = pass\n", base=NO_PASSWORD)
    message = error_of(site, "PFXPasswdFile = gone\n", base=NO_PASSWORD)
    assert "PFXPasswdFile" in message and "does not exist" in message


def test_password_file_not_read_without_check_files(site: Path) -> None:
    cfg = load(site, "PFXPasswdFile = gone\n", base=NO_PASSWORD, check_files=False)
    assert cfg.pfx_password is None


# -- errors -------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.ini"
    with pytest.raises(ConfigError, match=r"config file .*absent\.ini: no such file") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_path_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="folder"):
        load_config(tmp_path)


def test_unknown_key_suggests_the_right_one(site: Path) -> None:
    message = error_of(site, "firewalPolicy = drop\n")
    assert "firewalPolicy" in message and "unknown option" in message and "did you mean firewallPolicy" in message


def test_wrong_case_key_is_unknown(site: Path) -> None:
    assert "did you mean workBits" in error_of(site, "workbits = 3\n")


def test_other_section(site: Path) -> None:
    assert "[server]" in error_of(site, "[server]\nworkBits = 3\n")


def test_no_section_header(site: Path) -> None:
    assert "[DEFAULT]" in error_of(site, base="workBits = 3\n")


def test_duplicate_key(site: Path) -> None:
    message = error_of(site, "workBits = 3\nworkBits = 4\n")
    assert "workBits" in message and "twice" in message


def test_not_utf8(site: Path) -> None:
    path = site / "bad.ini"
    path.write_bytes(b"[DEFAULT]\nuser = \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ("workBits = twelve", "workBits", "not a whole number"),
        ("workBits = -1", "workBits", "not a whole number"),
        ("workBits = 1_2", "workBits", "not a whole number"),
        ("workBits = 25", "workBits", "out of range"),
        ("TIMESTAMP_THRESHOLD_IN_SECONDS = 0", "TIMESTAMP_THRESHOLD_IN_SECONDS", "out of range"),
        ("TIMESTAMP_THRESHOLD_IN_SECONDS = 301", "TIMESTAMP_THRESHOLD_IN_SECONDS", "out of range"),
        ("PORT_OPEN_DURATION_IN_SECONDS = 0", "PORT_OPEN_DURATION_IN_SECONDS", "out of range"),
        ("CRL_UPDATE_INTERVAL_IN_MINUTES = 0", "CRL_UPDATE_INTERVAL_IN_MINUTES", "out of range"),
        ("RECV_BUFFER = 1399", "RECV_BUFFER", "out of range"),
        ("KNOCKPACKET_MIN_LENGTH = 1700", "KNOCKPACKET_MIN_LENGTH", "larger than RECV_BUFFER"),
        ("maxOpenDuration = 10", "PORT_OPEN_DURATION_IN_SECONDS", "longer than maxOpenDuration"),
        ("firewallPolicy = accept", "firewallPolicy", "none|reject|drop"),
        ("firewallBackend = pf", "firewallBackend", "auto|nftables|iptables|command"),
        ("captureMode = pcap", "captureMode", "packet|udp"),
        ("emergencySSH = maybe", "emergencySSH", "not yes/no"),
        ("logLevel = LOUD", "logLevel", "DEBUG|INFO|WARNING|ERROR"),
        ("interfaces = eth0,any", "interfaces", "'any' cannot be combined"),
        ("interfaces = eth/0", "interfaces", "not a valid interface name"),
        ("interfaces = averyveryverylongname", "interfaces", "not a valid interface name"),
        ("interfaces = eth0,,eth1", "interfaces", "empty entry"),
        ("knockPorts = 0", "knockPorts", "1 to 65535"),
        ("knockPorts = 200-100", "knockPorts", "first <= last"),
        ("knockPorts = udp/53", "knockPorts", "knock ports are UDP"),
        ("knockPorts = 53,,54", "knockPorts", "empty entry"),
        ("knockPorts = 5x", "knockPorts", "bad port entry"),
        ("protectedPorts = ssh", "protectedPorts", "tcp/22"),
        ("protectedPorts = tcp/70000", "protectedPorts", "65535"),
        ("crlUrl = ftp://ca.example.org/crl", "crlUrl", "http://, https://"),
        ("crlUrl = https:///crl", "crlUrl", "no host name"),
        ("crlUrl = mirror/none.der", "crlUrl", "does not exist"),
        ("caFile = certs/none.pem", "caFile", "does not exist"),
        ("caFile = certs", "caFile", "not a regular file"),
        ("logFile = nowhere/x.log", "logFile", "does not exist"),
        ("user = no body", "user", "not a valid user name"),
        ("user = sknock-no-such-user", "user", "does not exist"),
        ("user = sknock-no-such-user", "user", "create it with `sknock-server install-service`"),
        ("user = sknock-no-such-user", "user", "useradd --system"),
        ("user = root", "user", "is root (uid 0)"),
        ("user = 0", "user", "is root (uid 0)"),
        ("openCommand = /bin/true %IP% %PORT%", "openCommand", "only used with firewallBackend = command"),
        ("workBits = 1\n  2", "workBits", "several lines"),
        # an indented line after the ignored SIGNATURE_SIZE would be its value, and firewallPolicy silently unset
        ("SIGNATURE_SIZE = 72\n  firewallPolicy = drop", "SIGNATURE_SIZE", "several lines"),
        # and so would one under an empty value: logFile was the file "firewallPolicy = drop"
        ("logFile =\n  firewallPolicy = drop", "logFile", "several lines"),
    ],
)
def test_bad_values(site: Path, line: str, key: str, words: str) -> None:
    base = MINIMAL.replace("user = nobody\n", "") if line.startswith("user") else MINIMAL  # user set once
    message = error_of(site, line + "\n", base=base)
    assert f": {key}: " in message
    assert words in message


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("firewallBackend = command\n", "openCommand", "required when firewallBackend = command"),
        ("firewallBackend = command\nopenCommand = /o %IP% %PORT%\n", "closeCommand", "required"),
        ("firewallBackend = command\nopenCommand = /o %PORT%\ncloseCommand = /c %IP% %PORT%\n", "openCommand", "%IP%"),
        (
            "firewallBackend = command\nopenCommand = /o %IP% %PORT% %HOST%\ncloseCommand = /c %IP% %PORT%\n",
            "openCommand",
            "unknown placeholder %HOST%",
        ),
        (
            "firewallBackend = command\nopenCommand = /o '%IP% %PORT%\ncloseCommand = /c %IP% %PORT%\n",
            "openCommand",
            "cannot split",
        ),
    ],
)
def test_command_backend_templates(site: Path, extra: str, key: str, words: str) -> None:
    message = error_of(site, extra)
    assert f": {key}: " in message and words in message


def test_udp_capture_needs_specific_ports(site: Path) -> None:
    message = error_of(site, "captureMode = udp\n")
    assert "knockPorts" in message and "not any" in message
    assert "too many" in error_of(site, "captureMode = udp\nknockPorts = 1000-2000\n")
    assert load(site, "captureMode = udp\nknockPorts = 62201\n").knock_ports == ((62201, 62201),)


def test_missing_required_files(site: Path) -> None:
    (site / "certs" / "server.pfx").unlink()
    message = error_of(site)
    assert "serverPFXFile" in message and "does not exist" in message
    (site / "certs" / "server.pfx").write_bytes(b"x")
    (site / "certs" / "crl.der").unlink()
    message = error_of(site)
    assert "crlFile" in message and "does not exist" in message


def test_required_key_missing(site: Path) -> None:
    message = error_of(site, base="[DEFAULT]\ncrlFile = certs/crl.der\nPFXPasswd = x\n")
    assert "serverPFXFile" in message and "required" in message


def test_check_files_false_skips_file_checks(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), check_files=False)
    assert cfg.server_pfx_file == tmp_path / "certs" / "server.pfx"


def test_config_is_frozen(site: Path) -> None:
    cfg = load(site)
    with pytest.raises(AttributeError):
        cfg.work_bits = 0  # type: ignore[misc]


# -- the shipped file ---------------------------------------------------------------------------


def test_shipped_config_ini_loads() -> None:
    cfg = load_config(REPO / "config.ini", check_files=False, environ={})
    assert cfg.firewall_policy is PolicyMode.NONE, "a first run must lock nobody out"
    assert cfg.server_pfx_file == REPO / "certificates" / "devpki" / "server" / "server.pfx"
    assert cfg.crl_file == REPO / "certificates" / "devpki" / "crl.der"
    assert cfg.pfx_password == b"sknock-demo"
    assert cfg.knockpacket_min_length == 800 and cfg.port_open_duration == 15
    assert cfg.work_bits == 12 and cfg.emergency_ssh is True


def test_shipped_config_ini_mentions_every_option() -> None:
    from sknock.server import config as module

    text = (REPO / "config.ini").read_text()
    for key in (option.key for option in module.OPTIONS):
        assert key in text, f"config.ini does not mention {key}"
