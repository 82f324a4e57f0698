"""``sknock-server install-service`` into a temporary root (useradd --prefix, systemctl --root), run
twice; the config template against the OPTIONS table; the installed unit through ``systemd-analyze
verify`` and ``security``; and ``--help``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sknock.cli.server import main
from sknock.server.config import OPTIONS, load_config
from sknock.server.service import (
    SERVICE_USER,
    SERVICE_VALUES,
    UNIT_NAME,
    InstallError,
    config_template,
    install_service,
    unit_text,
)

REPO = Path(__file__).resolve().parents[1]
# Where an operator's install puts it; install-service only names it in the unit.  Not this venv's: a
# checkout may sit under /tmp, which install-service refuses (the unit's PrivateTmp=yes would hide it).
EXECUTABLE = Path("/opt/sknock/bin/sknock-server")
RUNNABLE = Path(sys.executable).parent / "sknock-server"  # one that exists, for systemd-analyze verify


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if Path("/etc", name).exists():
            shutil.copy(Path("/etc", name), root / "etc" / name)
    # a root whose passwd has no sknock user, whatever the host has
    for name in ("passwd", "shadow", "group", "gshadow"):
        file = root / "etc" / name
        if file.exists():
            file.write_text("".join(line for line in file.read_text().splitlines(keepends=True)
                                    if not line.startswith(f"{SERVICE_USER}:")))
    return root


def test_the_template_lists_every_option_and_loads_to_the_defaults(tmp_path: Path) -> None:
    text = config_template()
    for option in OPTIONS:
        assert re.search(rf"^(# )?{option.key} =", text, re.MULTILINE), option.key
    path = tmp_path / "config.ini"
    path.write_text(text)
    config = load_config(path, check_files=False)
    for option in OPTIONS:
        if option.attr is None or option.default is None or option.key in SERVICE_VALUES:
            continue
        expected = load_config(_one(tmp_path, option.key, option.default), check_files=False)
        assert getattr(config, option.attr) == getattr(expected, option.attr), option.key
    assert config.user == SERVICE_USER
    assert str(config.server_pfx_file) == SERVICE_VALUES["serverPFXFile"]
    assert config.pfx_password_source.startswith("PFXPasswdFile")


def _one(tmp_path: Path, key: str, value: str) -> Path:
    path = tmp_path / f"{key}.ini"
    base = {"serverPFXFile": "/x.pfx", "PFXPasswd": "x", "crlFile": "/crl.der", key: value}
    path.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()))
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="useradd --prefix and systemctl --root need root")
@pytest.mark.skipif(shutil.which("useradd") is None, reason="no useradd")
def test_install_into_a_root_then_again_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_root(tmp_path)
    assert main(["install-service", "--root", str(root), "--exec", str(EXECUTABLE)]) == 0
    first = capsys.readouterr().out
    config = root / "etc/sknock/config.ini"
    assert config.read_text() == config_template()
    assert (root / "etc/sknock").stat().st_mode & 0o777 == 0o700
    assert config.stat().st_mode & 0o777 == 0o600
    entry = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("sknock:"))
    fields = entry.split(":")
    assert fields[5] == "/nonexistent" and fields[6] == "/usr/sbin/nologin" and int(fields[2]) < 1000
    assert not Path("/nonexistent").exists()
    unit = root / "etc/systemd/system" / UNIT_NAME
    assert f"ExecStart={EXECUTABLE} -c /etc/sknock/config.ini run" in unit.read_text()
    if shutil.which("systemctl"):
        wants = root / "etc/systemd/system/multi-user.target.wants" / UNIT_NAME
        assert wants.is_symlink() and "enabled sknock-server.service" in first
    # the operator edits the config; a second run keeps it, and the user, and the unit
    config.write_text(config.read_text().replace("logLevel = INFO", "logLevel = DEBUG"))
    passwd = (root / "etc/passwd").read_text()
    assert main(["install-service", "--root", str(root), "--exec", str(EXECUTABLE)]) == 0
    second = capsys.readouterr().out
    assert "logLevel = DEBUG" in config.read_text()
    assert (root / "etc/passwd").read_text() == passwd
    assert "kept the existing" in second and "user sknock exists" in second and "is up to date" in second


def test_an_existing_config_naming_another_user_is_kept_and_its_user_used(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    (root / "etc/sknock").mkdir(mode=0o755)
    (root / "etc/sknock/config.ini").write_text("[DEFAULT]\nserverPFXFile = /x.pfx\nPFXPasswd = x\n"
                                               "crlFile = /c.der\nuser = knocker\n")
    calls: list[list[str]] = []

    def run(args: object) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))  # type: ignore[call-overload]
        return subprocess.CompletedProcess(list(args), 0, "", "")  # type: ignore[call-overload]

    done = install_service(root, executable=EXECUTABLE, run=run)
    assert "user = knocker" in (root / "etc/sknock/config.ini").read_text()
    assert (root / "etc/sknock").stat().st_mode & 0o777 == 0o700  # narrowed
    assert calls[0][0] == "useradd" and calls[0][-1] == "knocker" and "--prefix" in calls[0]
    assert any("narrowed to 700" in s for s in done.steps)


def test_not_enabled_without_systemd_says_why(tmp_path: Path) -> None:
    from sknock.server import service

    steps: list[str] = []
    assert not service._enable(Path("/"), True, lambda a: subprocess.CompletedProcess(a, 0), lambda: False, steps)
    assert len(steps) == 1 and steps[0].startswith("installed but not enabled: ")
    if shutil.which("systemctl"):
        assert "systemd is not running this machine" in steps[0]


def test_an_executable_under_home_is_refused(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    with pytest.raises(InstallError, match="ProtectHome"):
        install_service(root, executable=Path("/root/.local/bin/sknock-server"))
    with pytest.raises(InstallError, match="PrivateTmp"):
        install_service(root, executable=Path("/tmp/checkout/.venv/bin/sknock-server"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_unit_passes_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    unit = tmp_path / UNIT_NAME
    unit.write_text(unit_text(RUNNABLE))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", security.stdout)
    assert score is not None, security.stdout
    assert float(score.group(1)) <= 3.0, score.group(0)  # "OK" or better
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout
    if version.startswith("systemd 252 "):  # Debian 12's, whose score docs/service.md records
        assert score.group(0) in (REPO / "docs/service.md").read_text()


def test_help_explains_every_command_and_shows_no_path_of_the_install(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("run", "status", "close", "teardown", "boot-ruleset", "install-service", "--check-config"):
        assert re.search(rf"^\s+{re.escape(command)}\s", text, re.MULTILINE), command
    assert "site-packages" not in text and str(REPO) not in text and "/etc/sknock/config.ini" in text
