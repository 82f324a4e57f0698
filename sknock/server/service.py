"""``sknock-server install-service``: the configuration folder, the workers' user and the systemd unit.

What it does, each step only when needed, so running it again changes nothing:

1. ``/etc/sknock/`` (0700, root) with ``crl/`` inside, and ``/etc/sknock/config.ini`` (0600): a commented
   configuration written from :data:`~sknock.server.config.OPTIONS` (:func:`config_template`), so it says
   every option with its default and cannot drift from what the loader reads.  An existing config is
   never touched.
2. The unprivileged system user the configuration's ``user`` names, when missing: no shell, no home
   (``useradd --system``).
3. The unit, ``sknock-server.service`` (package data), with ``ExecStart`` the absolute path of this
   ``sknock-server``, into ``/etc/systemd/system``; then ``systemctl enable`` when systemd runs the host.
   Elsewhere it says in one line that the unit is installed but not enabled, and why.

``root`` puts all of it under another tree (tests, packagers, an image being built): files go below it,
``useradd --prefix`` edits its ``/etc/passwd``, and ``systemctl --root`` enables the unit there.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import SknockError
from .config import OPTIONS, SECTIONS, load_config

__all__ = [
    "InstallError",
    "Installed",
    "UNIT_NAME",
    "CONFIG_DIR",
    "SERVICE_USER",
    "config_template",
    "unit_text",
    "install_service",
    "installed_executable",
]

UNIT_NAME = "sknock-server.service"
CONFIG_DIR = Path("/etc/sknock")
UNIT_DIR = Path("/etc/systemd/system")
#: The dedicated user the installed configuration names (not ``nobody``, which other daemons share).
SERVICE_USER = "sknock"
#: What the installed configuration sets where the table's default suits a checkout, not a host.
SERVICE_VALUES = {
    "serverPFXFile": str(CONFIG_DIR / "server.pfx"),
    "PFXPasswdFile": str(CONFIG_DIR / "pfx.pass"),
    "crlFile": str(CONFIG_DIR / "crl" / "crl.der"),
    "user": SERVICE_USER,
}
# Folders the unit hides from the service: ProtectHome=yes the first three, PrivateTmp=yes the last two.
_HIDDEN_FOLDERS = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/run/user": "ProtectHome=yes",
                   "/tmp": "PrivateTmp=yes", "/var/tmp": "PrivateTmp=yes"}  # noqa: S108 -- names, not used


class InstallError(SknockError):
    """``install-service`` cannot do a step; nothing after it was done."""


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text.replace("`", ""), 100, initial_indent="# ", subsequent_indent="# ")


def config_template() -> str:
    """The commented configuration ``install-service`` writes: every option of :data:`OPTIONS` in its
    section, its documentation as a comment, then ``key = default`` (or ``# key =`` when it has none);
    :data:`SERVICE_VALUES` are set for an installed host."""
    lines = [
        "# sknock knock server: written by `sknock-server install-service`, which never overwrites it.",
        "# Every option is listed with its default; docs/configuration.md explains them at length.",
        "# Check it with `sknock-server --check-config`; `systemctl reload sknock-server` refreshes the CRL.",
        "[DEFAULT]",
    ]
    for section in SECTIONS:
        lines += ["", f"# --- {section} " + "-" * max(3, 94 - len(section))]
        for option in (o for o in OPTIONS if o.section == section):
            lines += ["", *_comment(option.doc)]
            value = SERVICE_VALUES.get(option.key, option.default)
            lines.append(f"{option.key} = {value}" if value is not None else f"# {option.key} =")
    return "\n".join(lines) + "\n"


def installed_executable() -> Path | None:
    """The absolute path of this ``sknock-server`` console script: beside the running interpreter (a
    venv, pipx), else on PATH; None when there is none."""
    beside = Path(sys.executable).parent / "sknock-server"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("sknock-server")
    return Path(found).absolute() if found else None


def unit_text(executable: Path, config: Path = CONFIG_DIR / "config.ini") -> str:
    """The unit file with ``ExecStart`` running ``executable -c config run``."""
    template = resources.files("sknock.server").joinpath(UNIT_NAME).read_text(encoding="utf-8")
    crl_dir = Path(SERVICE_VALUES["crlFile"]).parent
    return (template.replace("@SKNOCK_SERVER@", str(executable)).replace("@CONFIG@", str(config))
            .replace("@CRL_DIR@", str(crl_dir)))


@dataclass
class Installed:
    """What :func:`install_service` did, one line per step, and whether the unit is enabled."""

    steps: list[str] = field(default_factory=list)
    enabled: bool = False


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=120)


def _below(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def _private_folder(path: Path, steps: list[str]) -> None:
    """``path`` exists as a root-only folder (made 0700; an existing one is narrowed to 0700)."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        path.chmod(0o700)
        steps.append(f"made {path} (0700)")
        return
    if not path.is_dir():
        raise InstallError(f"{path} exists and is not a folder")
    mode = path.stat().st_mode & 0o777
    if mode != 0o700:
        path.chmod(0o700)
        steps.append(f"{path}: mode {mode:o} narrowed to 700")


def _user_exists(root: Path, name: str) -> bool:
    if name.isdigit():
        return True  # a uid needs no entry
    if root == Path("/"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True
    with contextlib.suppress(FileNotFoundError):
        for line in (root / "etc" / "passwd").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.split(":", 1)[0] == name:
                return True
    return False


def _systemd_runs_host() -> bool:
    """sd_booted(): systemd is PID 1 when /run/systemd/system exists."""
    return Path("/run/systemd/system").is_dir()


def install_service(
    root: Path = Path("/"),
    *,
    executable: Path | None = None,
    unit_dir: Path = UNIT_DIR,
    run: Runner = _run,
    systemd_running: Callable[[], bool] = _systemd_runs_host,
) -> Installed:
    """Install as the module's docstring says, under ``root``.  Raises :class:`InstallError` (or
    :class:`~sknock.errors.ConfigError` for an existing config that does not load) at the first step
    that cannot be done."""
    done = Installed()
    steps = done.steps
    root = root.absolute()
    executable = executable or installed_executable()
    if executable is None or not executable.is_absolute():
        raise InstallError("cannot find the sknock-server executable to name in ExecStart; give --exec PATH")
    for folder, setting in _HIDDEN_FOLDERS.items():
        if str(executable).startswith(folder + "/"):
            raise InstallError(f"{executable} is under {folder}, which the unit hides ({setting}): install "
                               "sknock system-wide (a venv in /opt, or pipx install --global) and run that one")
    # 1. the configuration
    config_dir = _below(root, CONFIG_DIR)
    _private_folder(config_dir, steps)
    _private_folder(_below(root, Path(SERVICE_VALUES["crlFile"]).parent), steps)
    config = config_dir / "config.ini"
    try:
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        steps.append(f"kept the existing {config}")
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(config_template())
        steps.append(f"wrote {config} (0600): edit it, then sknock-server --check-config")
    # 2. the workers' user, as the configuration names it
    user = load_config(config, check_files=False).user
    if _user_exists(root, user):
        steps.append(f"user {user} exists")
    else:
        command = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                   "--shell", "/usr/sbin/nologin", "--comment", "sknock knock server workers"]
        if root != Path("/"):
            command += ["--prefix", str(root)]
        result = run([*command, user])
        if result.returncode != 0:
            raise InstallError(f"useradd {user} failed: {(result.stderr or result.stdout).strip()}")
        steps.append(f"made the system user {user} (no shell, no home)")
    # 3. the unit
    target = _below(root, unit_dir) / UNIT_NAME
    text = unit_text(executable, CONFIG_DIR / "config.ini")
    old = target.read_text(encoding="utf-8") if target.exists() else None
    if old == text:
        steps.append(f"{target} is up to date")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{UNIT_NAME}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        tmp.replace(target)
        steps.append(f"{'updated' if old is not None else 'installed'} {target} (ExecStart {executable})")
    done.enabled = _enable(root, old != text, run, systemd_running, steps)
    return done


def _enable(root: Path, changed: bool, run: Runner, systemd_running: Callable[[], bool], steps: list[str]) -> bool:
    if shutil.which("systemctl") is None:
        steps.append("installed but not enabled: there is no systemctl on this machine")
        return False
    if root != Path("/"):
        command = ["systemctl", f"--root={root}", "enable", UNIT_NAME]
    elif systemd_running():
        if changed:
            run(["systemctl", "daemon-reload"])
        command = ["systemctl", "enable", UNIT_NAME]
    else:
        steps.append(f"installed but not enabled: systemd is not running this machine (PID 1 is "
                     f"{_pid1()}); on a systemd host: systemctl enable --now {UNIT_NAME}")
        return False
    result = run(command)
    if result.returncode != 0:
        raise InstallError(f"{' '.join(command)} failed: {(result.stderr or result.stdout).strip()}")
    steps.append(f"enabled {UNIT_NAME}" + (f" in {root}" if root != Path("/") else
                                           f"; start it with systemctl start {UNIT_NAME}"))
    return True


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"

