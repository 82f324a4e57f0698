"""Options that contradict each other are refused (issue 9 §3): each may be fine alone, and together the
server would run, say "configuration OK", and not do what the file says -- leave open what it names as
protected, or refuse every knock.  Each refusal is one ConfigError naming the file and both options."""

from __future__ import annotations

from pathlib import Path

import pytest

from sknock.server.config import CaptureMode, PolicyMode, load_config
from tests.test_config import MINIMAL, error_of, load, site, write

__all__ = ["site"]  # the fixture, shared with test_config.py
COMMAND = "firewallBackend = command\nopenCommand = /bin/true %IP%\ncloseCommand = /bin/true %IP%\n"


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        # emergency ssh keeps tcp/22 open while the list says it is protected
        ("firewallPolicy = drop\nprotectedPorts = tcp/22,tcp/8080\n", "emergencySSH",
         ["protectedPorts (tcp/22,tcp/8080) names tcp/22", "firewallPolicy = drop", "emergencySSH = no"]),
        ("firewallPolicy = reject\nprotectedPorts = tcp/1-1024\nemergencySSH = yes\n", "emergencySSH",
         ["protectedPorts (tcp/1-1024) names tcp/22", "firewallPolicy = reject"]),
        # a list of protected ports with a policy that closes nothing
        ("protectedPorts = tcp/8080\n", "protectedPorts",
         ["tcp/8080 would not be protected", "firewallPolicy = none closes nothing"]),
        ("firewallPolicy = none\nprotectedPorts = tcp/22\n", "protectedPorts", ["firewallPolicy = none"]),
        # the command backend applies no policy
        (f"firewallPolicy = drop\n{COMMAND}", "firewallPolicy",
         ["drop is not applied with firewallBackend = command", "firewallPolicy = none"]),
        # udp capture must keep its knock ports open, and binds every interface
        ("firewallPolicy = drop\ncaptureMode = udp\nknockPorts = 62200-62210\nprotectedPorts = udp/62205,tcp/8080\n",
         "knockPorts", ["udp/62205 is in protectedPorts (udp/62205,tcp/8080)", "captureMode = udp keeps the knock"]),
        ("captureMode = udp\nknockPorts = 62201\ninterfaces = wg0\n", "interfaces",
         ["wg0 would not limit where knocks are taken", "captureMode = udp binds its sockets on every interface"]),
        # no knock is ever that long
        ("KNOCKPACKET_MIN_LENGTH = 1233\nRECV_BUFFER = 2048\n", "KNOCKPACKET_MIN_LENGTH",
         ["larger than the largest knock (1232 bytes): every knock would be dropped"]),
    ],
    ids=["ssh-in-list", "ssh-in-range", "list-without-policy", "ssh-list-without-policy", "command-with-drop",
         "udp-knock-port-protected", "udp-with-interfaces", "min-length-above-any-knock"],
)
def test_contradictions_are_refused_naming_both_options(site: Path, extra: str, key: str, words: list[str]) -> None:
    message = error_of(site, extra)
    assert message.startswith(f"{site / 'sknock.ini'}: {key}: "), message
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "extra",
    [
        "firewallPolicy = drop\nprotectedPorts = all\nemergencySSH = yes\n",  # the documented escape hatch
        "firewallPolicy = drop\nprotectedPorts = tcp/8080\nemergencySSH = yes\n",  # tcp/22 is not in the list
        "firewallPolicy = reject\nprotectedPorts = tcp/22\nemergencySSH = no\n",
        "firewallPolicy = none\nprotectedPorts = all\n",  # the shipped config.ini
        f"firewallPolicy = none\n{COMMAND}",
        "firewallPolicy = drop\ncaptureMode = udp\nknockPorts = 62201\nprotectedPorts = all\n",  # knock port excepted
        "firewallPolicy = drop\ncaptureMode = udp\nknockPorts = 62201\nprotectedPorts = udp/53,tcp/8080\n",
        "firewallPolicy = drop\nknockPorts = 62201\nprotectedPorts = udp/62201\n",  # packet capture needs no port
        "interfaces = wg0\ncaptureMode = packet\n",
        "KNOCKPACKET_MIN_LENGTH = 1232\nRECV_BUFFER = 2048\n",
    ],
)
def test_what_is_not_a_contradiction_still_loads(site: Path, extra: str) -> None:
    load(site, extra)


def test_the_documented_escape_hatch(site: Path) -> None:
    cfg = load(site, "firewallPolicy = drop\nemergencySSH = yes\ncaptureMode = udp\nknockPorts = 62201\n")
    assert cfg.protected_ports is None and cfg.emergency_ssh is True
    assert cfg.firewall_policy is PolicyMode.DROP and cfg.capture_mode is CaptureMode.UDP


def test_contradictions_are_found_without_the_files(tmp_path: Path) -> None:
    """check_files=False (a config checked away from the keys) still refuses a contradiction."""
    path = write(tmp_path, MINIMAL + "firewallPolicy = drop\nprotectedPorts = tcp/22\n")
    with pytest.raises(Exception, match="emergencySSH"):
        load_config(path, check_files=False)
