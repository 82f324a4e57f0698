"""One name for each concept the configuration shares with the firewall (issue 10 §1): the policy mode
and the backend are the firewall's enums, and they reach :func:`make_firewall` as enums; a command
template is checked by one rule, the command backend's."""

from __future__ import annotations

from pathlib import Path

import pytest

from sknock.errors import ConfigError
from sknock.server import config as module
from sknock.server.config import load_config
from sknock.server.firewall import FirewallError, FirewallPolicy
from sknock.server.firewall.base import PolicyMode
from sknock.server.firewall.command import CommandFirewall
from sknock.server.firewall.detect import FirewallBackend
from tests.test_config import MINIMAL, error_of, load, site, write

__all__ = ["site"]  # the fixture, shared with test_config.py


def test_the_config_speaks_the_firewalls_enums(site: Path) -> None:
    cfg = load(site, "firewallPolicy = drop\n")
    assert cfg.firewall_policy is PolicyMode.DROP and cfg.firewall_backend is FirewallBackend.AUTO
    assert module.PolicyMode is PolicyMode and module.FirewallBackend is FirewallBackend
    assert FirewallPolicy("reject").mode is PolicyMode.REJECT  # the value as a string is still accepted
    assert FirewallPolicy(PolicyMode.DROP).mode is PolicyMode.DROP


def test_the_daemon_hands_the_firewall_enums(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sknock.server import daemon

    seen: list[tuple[object, FirewallPolicy]] = []
    monkeypatch.setattr(daemon, "make_firewall", lambda backend, policy, **options: seen.append((backend, policy)))
    command = "firewallBackend = command\nopenCommand = /o %IP%\ncloseCommand = /c %IP%\n"
    daemon.make_server_firewall(load(site, "firewallPolicy = none\n" + command))
    daemon.make_server_firewall(load(site, "firewallPolicy = drop\nfirewallBackend = nftables\n"))
    assert [(type(b), b, p.mode) for b, p in seen] == [
        (FirewallBackend, FirewallBackend.COMMAND, PolicyMode.NONE),
        (FirewallBackend, FirewallBackend.NFTABLES, PolicyMode.DROP),
    ]
    assert all(type(p.mode) is PolicyMode for _, p in seen)


@pytest.mark.parametrize(
    "template",
    [
        "/o %IP%",
        "/o '%IP%' %PROTO% %PORT% %DURATION%",
        "ufw allow from %IP% to any port %PORT% proto %PROTO%",
        "/o --from=%IP%:%PORT%",
        "/o %PORT%",  # no %IP%
        "/o %IP% %HOST%",  # unknown placeholder
        "/o '%IP%",  # cannot be split
        "%IP% allow",  # the program is a placeholder: refused when the config is loaded, not only at the start
        "/o%PORT% %IP%",  # a placeholder within the program
        "/o %I''P%",  # no %IP% as written
        "date +%H%M %IP%",  # %H% is an unknown placeholder
    ],
)
def test_the_config_and_the_command_backend_take_the_same_templates(tmp_path: Path, template: str) -> None:
    """One rule for a command template (it was written in config.py and command.py, and they differed)."""
    path = write(tmp_path, MINIMAL + f"firewallBackend = command\nopenCommand = {template}\ncloseCommand = /c %IP%\n")
    try:
        load_config(path, check_files=False)
        config_takes = True
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: openCommand: ")
        config_takes = False
    try:
        CommandFirewall(FirewallPolicy("none"), open_command=template, close_command="/c %IP%")
        backend_takes = True
    except FirewallError:
        backend_takes = False
    assert config_takes == backend_takes


def test_a_template_whose_program_is_a_placeholder_is_a_config_error(site: Path) -> None:
    message = error_of(site, "firewallBackend = command\nopenCommand = %IP% allow\ncloseCommand = /c %IP%\n")
    assert message.endswith(": openCommand: the program itself cannot be a placeholder")
