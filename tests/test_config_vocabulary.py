"""One name for each concept the configuration shares with the firewall (issue 10 §1): the policy mode
and the backend are the firewall's enums, and they reach :func:`make_firewall` as enums."""

from __future__ import annotations

from pathlib import Path

import pytest

from sknock.server import config as module
from sknock.server.firewall import FirewallPolicy
from sknock.server.firewall.base import PolicyMode
from sknock.server.firewall.detect import FirewallBackend
from tests.test_config import load, site

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
