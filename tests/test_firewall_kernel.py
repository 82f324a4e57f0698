"""The firewall backends against the real kernel, inside throwaway network namespaces.

Each test builds a server and a client namespace (tests/netns.py), runs the backend in a driver
process inside the server namespace (tests/firewall_driver.py) next to a TCP echo server, and probes
from the client namespace with real connections.  "Blocked" is checked as the policy says it should
look from outside: reject answers at once (connection refused), drop stays silent (a ~1 s timeout).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Host, TestNet, require_netns

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
DRIVER = str(REPO / "tests" / "firewall_driver.py")
PORT = 2000  # the protected service
OTHER_PORT = 3000  # a second service, for always_open / unprotected checks
REPLY_TIMEOUT = 20.0  # generous: only bounds a hung helper, never measures speed


class Helper:
    """One driver-process role inside a namespace, spoken to in JSON lines."""

    def __init__(self, host: Host, *args: str, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        self.proc = subprocess.Popen(host.cmd(sys.executable, DRIVER, *args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not self._selector.select(timeout=REPLY_TIMEOUT):
            raise AssertionError(f"helper {self.proc.args!r} did not answer within {REPLY_TIMEOUT} s")
        line = self.proc.stdout.readline()
        if not line:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"helper {self.proc.args!r} exited: {stderr[-2000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by pid: ip netns exec execs the helper itself
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


class Rig:
    """Namespaces plus the helpers a test starts; everything is stopped and removed in close()."""

    def __init__(self) -> None:
        self.net = TestNet.create("skf")
        self.helpers: list[Helper] = []

    def start(self, host: Host, *args: str, env: dict[str, str] | None = None) -> Helper:
        helper = Helper(host, *args, env=env)
        self.helpers.append(helper)
        return helper

    def echo(self, *ports: int) -> Helper:
        helper = self.start(self.net.server, "echo", *map(str, ports))
        assert helper.read() == {"ready": True}
        return helper

    def firewall(self, backend: str, mode: str, env: dict[str, str] | None = None, **policy: Any) -> Helper:
        return self.start(self.net.server, "firewall", backend, json.dumps({"mode": mode, **policy}), env=env)

    def client(self) -> Helper:
        return self.start(self.net.client, "client")

    def close(self) -> None:
        for helper in self.helpers:
            helper.kill()
        self.net.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    require_netns()
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def ok(reply: dict[str, Any]) -> list[tuple[str, str, int]]:
    assert reply["ok"], reply
    return sorted((o["address"], o["protocol"], o["port"]) for o in reply["openings"])


def addresses(net: TestNet, family: int) -> tuple[str, str, str]:
    """(server address, client address, an address on the link that is not the client)."""
    if family == 4:
        return net.server.ipv4, net.client.ipv4, net.client.ipv4.rsplit(".", 1)[0] + ".99"
    return net.server.ipv6, net.client.ipv6, net.client.ipv6.rsplit(":", 1)[0] + ":99"


BLOCKED = {"reject": "refused", "drop": "timeout"}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["reject", "drop"])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_grant_lifecycle(rig: Rig, backend: str, mode: str, family: int) -> None:
    """Blocked before open, reachable after, blocked for new connections after close while an
    established one survives; a grant for another address opens nothing; teardown removes all."""
    server, client_addr, stranger = addresses(rig.net, family)
    rig.echo(PORT)
    fw = rig.firewall(backend, mode)  # protected: all ports, as the original
    probe = rig.client()
    grant = {"address": client_addr, "protocol": "tcp", "port": PORT}

    assert ok(fw.ask(op="setup")) == []
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == BLOCKED[mode]

    assert ok(fw.ask(op="open", address=stranger, protocol="tcp", port=PORT, duration=60)) == [
        (stranger, "tcp", PORT)]
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == BLOCKED[mode]
    assert probe.ask(op="connect", host=server, port=PORT + 1)["result"] == BLOCKED[mode]

    assert (client_addr, "tcp", PORT) in ok(fw.ask(op="open", duration=60, **grant))
    held = probe.ask(op="hold", host=server, port=PORT)
    assert held["result"] == "connected"
    assert probe.ask(op="echo", id=held["id"])["result"] == "ok"

    assert ok(fw.ask(op="close", **grant)) == [(stranger, "tcp", PORT)]
    assert ok(fw.ask(op="close", **grant)) == [(stranger, "tcp", PORT)]  # idempotent
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == BLOCKED[mode]
    assert probe.ask(op="echo", id=held["id"])["result"] == "ok"  # established session survives

    assert fw.ask(op="teardown")["ok"]
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert fw.ask(op="teardown")["ok"]  # teardown twice is fine
    if backend == "nftables":
        assert rig.net.server.run("nft", "list", "ruleset").stdout.strip() == ""
    else:
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            assert "SKNOCK" not in rig.net.server.run(f"{tool}-save", "-t", "filter").stdout


@pytest.mark.parametrize("emergency_ssh", [True, False])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_emergency_ssh_and_always_open(rig: Rig, backend: str, emergency_ssh: bool) -> None:
    server = rig.net.server.ipv4
    rig.echo(22, OTHER_PORT, PORT)
    fw = rig.firewall(backend, "reject", emergency_ssh=emergency_ssh, always_open=f"tcp/{OTHER_PORT}")
    probe = rig.client()
    assert fw.ask(op="setup")["ok"]
    assert probe.ask(op="connect", host=server, port=22)["result"] == ("connected" if emergency_ssh else "refused")
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "connected"
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "refused"


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_protected_subset_and_policy_none(rig: Rig, backend: str) -> None:
    """Only the protected ports are shut; with policy none nothing is."""
    server = rig.net.server.ipv6
    rig.echo(OTHER_PORT, PORT)
    probe = rig.client()
    fw = rig.firewall(backend, "reject", protected=f"tcp/{PORT}", emergency_ssh=False)
    assert fw.ask(op="setup")["ok"]
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "refused"
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "connected"
    assert fw.ask(op="teardown")["ok"]
    fw.kill()

    none = rig.firewall(backend, "none", emergency_ssh=False)
    assert none.ask(op="setup")["ok"]
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "connected"


def nft_set(host: Host, name: str) -> list[dict[str, Any]]:
    out = json.loads(host.run("nft", "-j", "list", "set", "inet", "sknock", name).stdout)
    sets = [e["set"] for e in out["nftables"] if "set" in e]
    return sets[0].get("elem", []) if sets else []


def test_nftables_kernel_expiry_survives_a_dead_server(rig: Rig) -> None:
    """The kernel closes the grant on time even though the process that made it was killed (-9)."""
    server, client_addr, _ = addresses(rig.net, 4)
    rig.echo(PORT)
    fw = rig.firewall("nftables", "reject")
    probe = rig.client()
    assert fw.ask(op="setup")["ok"]
    opened = fw.ask(op="open", address=client_addr, protocol="tcp", port=PORT, duration=1)
    assert ok(opened) == [(client_addr, "tcp", PORT)]
    assert opened["openings"][0]["expires"] <= 1  # the kernel holds a timeout, not a permanent grant
    fw.kill()

    deadline = time.monotonic() + 10  # bounds the wait; the expiry itself is the kernel's ~1 s
    while nft_set(rig.net.server, "grants4") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert nft_set(rig.net.server, "grants4") == []
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "refused"


def test_nftables_setup_keeps_live_grants_and_spares_other_tables(rig: Rig) -> None:
    """A new server's setup() over a killed one's table: the table is replaced (a stray rule and a grant
    without a timeout are gone), a live grant stays reachable with the time it had left (to the second),
    one with less than a second left is dropped, and the admin's table is not touched."""
    server, client_addr, stranger = addresses(rig.net, 6)
    host = rig.net.server
    host.run("nft", "add table inet admin")
    host.run("nft", "add chain inet admin input { type filter hook input priority 10 ; policy accept ; }")
    host.run("nft", "add rule inet admin input tcp dport 9999 counter accept")
    admin_before = host.run("nft", "list", "table", "inet", "admin").stdout
    rig.echo(PORT, OTHER_PORT)
    probe = rig.client()

    crashed = rig.firewall("nftables", "reject")
    assert ok(crashed.ask(op="setup")) == []
    fresh_rules = len(nft_rules(host))
    opened_from = time.monotonic()
    assert ok(crashed.ask(op="open", address=client_addr, protocol="tcp", port=PORT, duration=600))
    opened_by = time.monotonic()
    assert ok(crashed.ask(op="open", address=client_addr, protocol="udp", port=PORT, duration=1))
    crashed.kill()
    host.run("nft", "add rule inet sknock input tcp dport 2001 accept")  # not sknock's policy
    host.run("nft", "add element inet sknock grants6 { " + stranger + " . tcp . 2000 }")  # no timeout
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"  # leftover grant

    fresh = rig.firewall("nftables", "reject")
    set_up_from = time.monotonic()
    reply = fresh.ask(op="setup")
    set_up_by = time.monotonic()
    # only the 600 s grant: the 1 s one has less than a second left, the stranger's has no timeout
    assert ok(reply) == [(client_addr, "tcp", PORT)]
    (carried,) = reply["carried"]
    assert (carried["address"], carried["protocol"], carried["port"]) == (client_addr, "tcp", PORT)
    # what it had left, rounded down to the second: never more, at most 1 s less
    assert 600 - (set_up_by - opened_from) - 1 <= carried["remaining"] <= 600 - (set_up_from - opened_by)
    assert reply["openings"][0]["expires"] <= carried["remaining"]
    assert len(nft_rules(host)) == fresh_rules  # the stray rule went with the old table
    tables = host.run("nft", "list", "tables").stdout.split("\n")
    assert sorted(t.strip() for t in tables if t.strip()) == ["table inet admin", "table inet sknock"]
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"  # the grant, carried
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "refused"  # the policy
    assert fresh.ask(op="intact")["intact"] is True
    assert fresh.ask(op="teardown")["ok"]
    assert host.run("nft", "list", "table", "inet", "admin").stdout == admin_before


def nft_rules(host: Host) -> list[dict[str, Any]]:
    out = json.loads(host.run("nft", "-j", "list", "chain", "inet", "sknock", "input").stdout)
    return [e["rule"] for e in out["nftables"] if "rule" in e]


def test_nftables_open_twice_extends(rig: Rig) -> None:
    _, client_addr, _ = addresses(rig.net, 4)
    fw = rig.firewall("nftables", "drop")
    grant = {"address": client_addr, "protocol": "tcp", "port": PORT}
    assert fw.ask(op="setup")["ok"]
    first = fw.ask(op="open", duration=3, **grant)
    assert first["openings"][0]["expires"] <= 3
    second = fw.ask(op="open", duration=300, **grant)
    assert ok(second) == [(client_addr, "tcp", PORT)]  # still one element
    assert second["openings"][0]["expires"] > 3  # expiry moved; nothing here depends on speed
    third = fw.ask(op="open", duration=3, **grant)
    assert third["openings"][0]["expires"] <= 3  # and it can be shortened again


def test_nftables_rejects_bad_requests_with_typed_errors(rig: Rig) -> None:
    _, client_addr, _ = addresses(rig.net, 4)
    fw = rig.firewall("nftables", "drop")
    grant = {"address": client_addr, "protocol": "tcp", "port": PORT}
    missing = fw.ask(op="open", duration=5, **grant)  # before setup: no table
    assert not missing["ok"] and missing["type"] == "FirewallError" and "nftables" in missing["error"]
    assert fw.ask(op="setup")["ok"]
    for bad in (0, -1, float("inf"), 10**9):
        reply = fw.ask(op="open", duration=bad, **grant)
        assert not reply["ok"] and "duration" in reply["error"]
    bad_port = fw.ask(op="open", duration=5, address=client_addr, protocol="tcp", port=70000)
    assert not bad_port["ok"] and "port" in bad_port["error"]
    assert ok(fw.ask(op="list")) == []


def test_iptables_setup_keeps_live_grants_and_drops_the_rest(rig: Rig) -> None:
    """A new server's setup() over a killed one's chain: one jump, a live grant kept with its datestop
    (so its remaining time), a grant past its datestop and an untimed grant (older sknock) dropped."""
    server, client_addr, stranger = addresses(rig.net, 4)
    host = rig.net.server
    rig.echo(PORT)
    probe = rig.client()
    crashed = rig.firewall("iptables", "reject")
    assert crashed.ask(op="setup")["ok"]
    opened_from = time.time()
    assert ok(crashed.ask(op="open", address=client_addr, protocol="tcp", port=PORT, duration=600))
    opened_by = time.time()
    crashed.kill()
    host.run("iptables-legacy", "-I", "INPUT", "1", "-j", "SKNOCK")  # a second jump
    for extra in (["-m", "time", "--datestop", "2020-01-01T00:00:00"], []):  # expired; untimed
        host.run("iptables-legacy", "-I", "SKNOCK", "1", "-s", stranger, "-p", "tcp", "-m", "tcp", "--dport",
                 str(OTHER_PORT), *extra, "-m", "comment", "--comment", "sknock-grant", "-j", "ACCEPT")
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"

    fresh = rig.firewall("iptables", "reject")
    set_up_from = time.time()
    reply = fresh.ask(op="setup")
    set_up_by = time.time()
    assert ok(reply) == [(client_addr, "tcp", PORT)]
    (carried,) = reply["carried"]
    # the datestop is ceil(open time + 600) - 1: the grant holds until the whole second after it
    assert opened_from + 600 - set_up_by <= carried["remaining"] <= opened_by + 601 - set_up_from
    saved = host.run("iptables-legacy-save", "-t", "filter").stdout
    assert saved.count("-A INPUT -j SKNOCK") == 1
    assert saved.count("sknock-grant") == 1 and stranger not in saved
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert fresh.ask(op="intact")["intact"] is True


def test_iptables_grant_ends_at_its_datestop_with_no_server(rig: Rig) -> None:
    """The kernel (xt_time) stops honouring a grant at its datestop although the process that made it
    was killed and the rule is still in the chain.  The helper runs in a time zone far from UTC: the
    datestop must be UTC whatever the process's zone."""
    server, client_addr, _ = addresses(rig.net, 4)
    rig.echo(PORT)
    probe = rig.client()
    fw = rig.firewall("iptables", "reject", env={"TZ": "America/Los_Angeles"})
    assert fw.ask(op="setup")["ok"]
    opened = fw.ask(op="open", address=client_addr, protocol="tcp", port=PORT, duration=2)
    assert ok(opened) == [(client_addr, "tcp", PORT)]
    ends = time.time() + opened["openings"][0]["expires"]
    # ceil(open time + 2) less the time until the listing: above 2 but for that delay, at most 3
    assert 1.5 <= opened["openings"][0]["expires"] <= 3
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    fw.kill()

    time.sleep(max(0.0, ends - time.time()) + 0.2)
    assert "sknock-grant" in rig.net.server.run("iptables-legacy-save", "-t", "filter").stdout  # still there
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "refused"  # and ignored


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_udp_grant(rig: Rig, backend: str, family: int) -> None:
    """UDP: rejected with ICMP port unreachable before the grant, echoed after, refused after close."""
    server, client_addr, _ = addresses(rig.net, family)
    rig.echo(PORT)
    fw = rig.firewall(backend, "reject", protected=f"udp/{PORT}")
    probe = rig.client()
    grant = {"address": client_addr, "protocol": "udp", "port": PORT}
    assert fw.ask(op="setup")["ok"]
    assert probe.ask(op="udp", host=server, port=PORT)["result"] == "refused"
    assert ok(fw.ask(op="open", duration=60, **grant)) == [(client_addr, "udp", PORT)]
    assert probe.ask(op="udp", host=server, port=PORT)["result"] == "ok"
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"  # tcp/2000 unprotected
    assert ok(fw.ask(op="close", **grant)) == []
    # a new source port: not part of the flow conntrack already knows
    assert probe.ask(op="udp", host=server, port=PORT)["result"] == "refused"


# --- the policy outlives the server: intact(), restore(), the boot-time include -----------------

def nft_table(host: Host) -> list[dict[str, Any]]:
    """sknock's table as ``nft -j`` lists it, without handles (they differ between two installs)."""
    out = json.loads(host.run("nft", "-j", "list", "table", "inet", "sknock").stdout)

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "handle"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return [strip(e) for e in out["nftables"] if "metainfo" not in e]


def write_boot(fw: Helper, tmp_path: Path) -> Path:
    reply = fw.ask(op="boot")
    assert reply["ok"] and reply["text"].startswith("#")
    path = tmp_path / "sknock.nft"
    path.write_text(reply["text"])
    return path


def nft_delete_first_rule(host: Host) -> None:
    host.run("nft", "delete", "rule", "inet", "sknock", "input", "handle", str(nft_rules(host)[0]["handle"]))


NFT_TAMPERING = {
    "flush ruleset": lambda host, boot: host.run("nft", "flush", "ruleset"),
    # what an nftables.service reload does when /etc/nftables.conf starts with flush ruleset
    "flush ruleset and include": lambda host, boot: host.run("nft", "-f", str(boot.with_name("nftables.conf"))),
    # ... and without flush ruleset: the include alone, over the live table
    "include over the live table": lambda host, boot: host.run("nft", "-f", str(boot)),
    "delete a rule": lambda host, boot: nft_delete_first_rule(host),
    "flush chain": lambda host, boot: host.run("nft", "flush", "chain", "inet", "sknock", "input"),
}


@pytest.mark.parametrize("tampering", sorted(NFT_TAMPERING))
def test_nftables_intact_notices_tampering_and_restore_repairs_it(rig: Rig, tmp_path: Path, tampering: str) -> None:
    server, client_addr, _ = addresses(rig.net, 4)
    host = rig.net.server
    rig.echo(PORT, OTHER_PORT)
    probe = rig.client()
    fw = rig.firewall("nftables", "reject", always_open="udp/62201")
    boot = write_boot(fw, tmp_path)
    boot.with_name("nftables.conf").write_text(f'flush ruleset\ninclude "{boot}"\n')
    assert fw.ask(op="intact")["intact"] is False  # nothing installed yet
    assert fw.ask(op="setup")["ok"]
    assert fw.ask(op="intact")["intact"] is True
    assert ok(fw.ask(op="open", address=client_addr, protocol="tcp", port=PORT, duration=60))
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "refused"
    assert fw.ask(op="intact")["intact"] is True  # grants and traffic change nothing it compares

    NFT_TAMPERING[tampering](host, boot)
    assert fw.ask(op="intact")["intact"] is False

    grant = {"address": client_addr, "protocol": "tcp", "port": PORT}
    restored = fw.ask(op="restore", grants=[{**grant, "remaining": 29.2}])
    assert ok(restored) == [(client_addr, "tcp", PORT)]
    assert restored["restored"] == [{**grant, "remaining": 30.0}]  # rounded up, as open() does
    assert 28 <= restored["openings"][0]["expires"] <= 30
    assert fw.ask(op="intact")["intact"] is True
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "refused"
    assert fw.ask(op="intact")["intact"] is True
    tables = host.run("nft", "list", "tables").stdout.split()
    assert tables == ["table", "inet", "sknock"]  # one table, not one more per restore


@pytest.mark.parametrize("policy", [
    {"mode": "reject", "always_open": "udp/62201"},
    {"mode": "drop", "protected": "tcp/2000-2010,udp/53", "emergency_ssh": False},
    {"mode": "none", "emergency_ssh": False},
])
def test_nftables_boot_ruleset_installs_what_setup_installs(rig: Rig, tmp_path: Path, policy: dict[str, Any]) -> None:
    """The include, loaded by nft, gives the very table setup() gives (same sets, chain and rules), and
    setup() replaces it in one step (no duplicated rules, nothing carried: its sets are empty)."""
    host = rig.net.server
    fw = rig.firewall("nftables", **policy)
    host.run("nft", "-f", str(write_boot(fw, tmp_path)))
    from_boot = nft_table(host)
    assert ok(fw.ask(op="setup")) == []
    assert nft_table(host) == from_boot
    assert len([e for e in from_boot if "rule" in e]) >= 6


def test_nftables_boot_ruleset_shuts_ports_without_a_server_and_reloads_cleanly(rig: Rig, tmp_path: Path) -> None:
    """Loaded at boot (no server), the include shuts the protected port.  Loaded again -- twice, or
    over a running server's table with a grant -- it replaces the table: no duplicated rule, nothing
    opened, the grant dropped (the server notices and restores it)."""
    server, client_addr, _ = addresses(rig.net, 4)
    host = rig.net.server
    rig.echo(PORT, OTHER_PORT)
    probe = rig.client()
    fw = rig.firewall("nftables", "reject", protected=f"tcp/{PORT}")
    boot = write_boot(fw, tmp_path)

    host.run("nft", "-f", str(boot))
    expected = nft_table(host)
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "refused"  # before any server
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "connected"  # not protected
    host.run("nft", "-f", str(boot))  # loaded twice
    assert nft_table(host) == expected

    assert ok(fw.ask(op="setup")) == []
    assert ok(fw.ask(op="open", address=client_addr, protocol="tcp", port=PORT, duration=60))
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    host.run("nft", "-f", str(boot))  # a reload without flush ruleset, under a running server
    assert nft_table(host) == expected  # the policy once, and empty sets
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "refused"
    assert fw.ask(op="intact")["intact"] is False
    restored = fw.ask(op="restore", grants=[{"address": client_addr, "protocol": "tcp", "port": PORT,
                                             "remaining": 50}])
    assert ok(restored) == [(client_addr, "tcp", PORT)]
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"


def test_nftables_intact_is_cheap_with_many_grants(rig: Rig) -> None:
    """intact() reads no set elements: with 10,000 grants it stays well under a millisecond a call
    (bounded here at 5 ms to leave room for a loaded machine; libnftables' listing took 40 ms)."""
    script = """
import ipaddress, json, time
from sknock.ports import Protocol
from sknock.server.firewall import FirewallPolicy, Opening, make_firewall
fw = make_firewall("nftables", FirewallPolicy("reject"))
fw.setup()
grants = [(Opening(ipaddress.ip_address(f"198.18.{i // 250}.{i % 250 + 1}"), Protocol.TCP, 2000), 600.0)
          for i in range(10000)]
assert fw.apply(grants, [], known=set()) == []
start = time.perf_counter()
results = {fw.intact() for _ in range(200)}
print(json.dumps({"seconds": (time.perf_counter() - start) / 200, "results": sorted(results),
                  "grants": len(fw.openings())}))
"""
    out = rig.net.server.run(sys.executable, "-c", script, timeout=120)
    result = json.loads(out.stdout)
    assert result["grants"] == 10000 and result["results"] == [True]
    assert result["seconds"] < 0.005


@pytest.mark.parametrize("tampering", ["flush chain", "restore without grants", "jump moved", "flush INPUT"])
def test_iptables_intact_notices_tampering_and_restore_repairs_it(rig: Rig, tampering: str) -> None:
    server, client_addr, _ = addresses(rig.net, 6)
    host = rig.net.server
    rig.echo(PORT, OTHER_PORT)
    probe = rig.client()
    fw = rig.firewall("iptables", "reject")
    assert fw.ask(op="intact")["intact"] is False
    assert fw.ask(op="setup")["ok"]
    assert ok(fw.ask(op="open", address=client_addr, protocol="tcp", port=PORT, duration=60))
    assert fw.ask(op="intact")["intact"] is True
    saved = host.run("ip6tables-legacy-save", "-t", "filter").stdout
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert fw.ask(op="intact")["intact"] is True  # counters moved; nothing it compares did

    if tampering == "flush chain":
        host.run("ip6tables-legacy", "-F", "SKNOCK")
    elif tampering == "restore without grants":  # e.g. netfilter-persistent reload of a file saved earlier
        policy_only = "\n".join(line for line in saved.splitlines() if "sknock-grant" not in line) + "\n"
        subprocess.run(host.cmd("ip6tables-legacy-restore"), input=policy_only, text=True, check=True)
        assert ok(fw.ask(op="list")) == []
    elif tampering == "jump moved":  # an ACCEPT ahead of the jump would be final
        host.run("ip6tables-legacy", "-I", "INPUT", "1", "-p", "tcp", "--dport", str(OTHER_PORT), "-j", "ACCEPT")
    else:
        host.run("ip6tables-legacy", "-F", "INPUT")
    assert fw.ask(op="intact")["intact"] is False
    # a grant change in between does not hide it
    assert ok(fw.ask(op="open", address=client_addr, protocol="udp", port=PORT, duration=60))
    assert fw.ask(op="intact")["intact"] is False

    restored = fw.ask(op="restore", grants=[{"address": client_addr, "protocol": "tcp", "port": PORT,
                                             "remaining": 30}])
    assert ok(restored) == [(client_addr, "tcp", PORT)]
    assert 29 <= restored["openings"][0]["expires"] <= 31
    assert fw.ask(op="intact")["intact"] is True
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert probe.ask(op="connect", host=server, port=OTHER_PORT)["result"] == "refused"
    saved = host.run("ip6tables-legacy-save", "-t", "filter").stdout
    assert saved.count("-A INPUT -j SKNOCK") == 1 and saved.count("sknock-grant") == 1


def test_iptables_restore_installs_the_policy_even_if_a_grant_cannot_be(rig: Rig) -> None:
    """A grant the library refuses (libxt_time takes no date after 2038: the clock here says 2039) must
    not keep the policy out: the chain is installed without it, and intact() holds."""
    script = """
import ipaddress, json
from sknock.ports import Protocol
from sknock.server.firewall import FirewallPolicy, Opening
from sknock.server.firewall.iptables import IptablesFirewall
fw = IptablesFirewall(FirewallPolicy("reject"), clock=lambda: 2_200_000_000.0)
fw.setup()
grant = Opening(ipaddress.ip_address("198.18.0.2"), Protocol.TCP, 2000)
restored = fw.restore([(grant, 30.0)])
print(json.dumps({"restored": len(restored), "intact": fw.intact(), "openings": len(fw.openings())}))
"""
    host = rig.net.server
    host.run("iptables-legacy", "-N", "SKNOCK")  # a leftover chain: gone afterwards, replaced by the policy
    host.run("iptables-legacy", "-A", "SKNOCK", "-j", "ACCEPT")
    out = host.run(sys.executable, "-c", script, timeout=120)
    assert json.loads(out.stdout) == {"restored": 0, "intact": True, "openings": 0}
    saved = host.run("iptables-legacy-save", "-t", "filter").stdout
    assert "-A INPUT -j SKNOCK" in saved and "-A SKNOCK -j REJECT --reject-with icmp-port-unreachable" in saved
    assert "-A SKNOCK -j ACCEPT" not in saved


# --- entries no knock granted: held() lists them, remove() takes exactly them out --------------------


def test_nftables_elements_added_by_hand_are_listed_and_removed_and_nothing_else(rig: Rig) -> None:
    """Elements of every shape someone can add to sknock's sets -- no timeout, a long one, a comment, a
    protocol no grant uses, IPv6 -- are listed and removed; the grants stay, reachable; the admin's own
    table, with a set of the same type and the same elements, is not touched."""
    server, client_addr, stranger = addresses(rig.net, 4)
    host = rig.net.server
    host.run("nft", "add table inet admin")
    host.run("nft", "add set inet admin mine { type ipv4_addr . inet_proto . inet_service ; }")
    host.run("nft", f"add element inet admin mine {{ {stranger} . tcp . {PORT} }}")
    admin_before = host.run("nft", "list", "table", "inet", "admin").stdout
    rig.echo(PORT)
    probe = rig.client()
    fw = rig.firewall("nftables", "reject")
    assert fw.ask(op="setup")["ok"]
    grant = {"address": client_addr, "protocol": "tcp", "port": PORT}
    assert ok(fw.ask(op="open", duration=60, **grant))
    assert fw.ask(op="held")["held"] == [f"{client_addr} -> tcp/{PORT}"]
    for element in (f"grants4 {{ {stranger} . tcp . {PORT} }}", f"grants4 {{ {stranger} . udp . 53 timeout 1d }}",
                    f'grants4 {{ {stranger} . 132 . 0 comment "by hand" }}', "grants6 { fd00:5e::99 . tcp . 22 }"):
        host.run("nft", "add element inet sknock " + element)
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    assert fw.ask(op="intact")["intact"] is True  # the table is as installed: only its elements changed
    expected = sorted([f"{stranger} -> tcp/{PORT}", f"{stranger} -> udp/53", f"{stranger} -> protocol 132/0",
                       "fd00:5e::99 -> tcp/22"])
    held = fw.ask(op="held")
    assert held.get("held") == sorted([*expected, f"{client_addr} -> tcp/{PORT}"]), held
    swept = fw.ask(op="sweep", granted=[grant])
    assert swept["removed"] == expected and swept["failed"] == []
    assert ok(swept) == [(client_addr, "tcp", PORT)]
    assert fw.ask(op="held")["held"] == [f"{client_addr} -> tcp/{PORT}"]
    assert fw.ask(op="sweep", granted=[grant])["removed"] == []
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"  # the grant, kept
    assert fw.ask(op="intact")["intact"] is True
    assert host.run("nft", "list", "table", "inet", "admin").stdout == admin_before


def test_nftables_held_is_not_fooled_by_a_set_of_another_type(rig: Rig) -> None:
    """A set called grants4 with another key (someone recreated it) is an error, not a misread."""
    fw = rig.firewall("nftables", "reject")
    assert fw.ask(op="setup")["ok"]
    host = rig.net.server
    host.run("nft", "flush", "chain", "inet", "sknock", "input")
    host.run("nft", "delete", "set", "inet", "sknock", "grants4")
    host.run("nft", "add set inet sknock grants4 { type ipv4_addr ; }")
    host.run("nft", "add element inet sknock grants4 { 198.18.9.9 }")
    reply = fw.ask(op="held")
    assert not reply["ok"] and "another size" in reply["error"]
    assert fw.ask(op="intact")["intact"] is False  # and the watch restores the table


def test_iptables_rules_added_or_replaced_by_hand_are_listed_and_removed(rig: Rig) -> None:
    """A rule inserted into SKNOCK, and a grant rule replaced in place (the chain's length unchanged, so
    intact() holds), are listed and removed; the grant and the policy stay."""
    server, client_addr, stranger = addresses(rig.net, 4)
    host = rig.net.server
    rig.echo(PORT)
    probe = rig.client()
    fw = rig.firewall("iptables", "reject")
    assert fw.ask(op="setup")["ok"]
    grant = {"address": client_addr, "protocol": "tcp", "port": PORT}
    decoy = {"address": "198.18.77.7", "protocol": "udp", "port": 53}
    assert ok(fw.ask(op="open", duration=60, **grant)) and ok(fw.ask(op="open", duration=60, **decoy))
    # the decoy's rule (first: inserted last) replaced in place by one for the stranger: same length
    host.run("iptables-legacy", "-R", "SKNOCK", "1", "-s", stranger, "-p", "tcp", "--dport", str(PORT), "-j", "ACCEPT")
    assert fw.ask(op="intact")["intact"] is True
    assert probe.ask(op="connect", host=server, port=PORT)["result"] == "connected"
    host.run("ip6tables-legacy", "-I", "SKNOCK", "1", "-s", "fd00:5e::/64", "-j", "ACCEPT")
    assert fw.ask(op="intact")["intact"] is False
    swept = fw.ask(op="sweep", granted=[grant, decoy])
    assert swept["removed"] == [f"{stranger}/32 -> tcp/{PORT} (rule in SKNOCK, IPv4, -j ACCEPT)",
                                "fd00:5e::/64 -> any protocol (rule in SKNOCK, IPv6, -j ACCEPT)"]
    assert swept["failed"] == [] and ok(swept) == [(client_addr, "tcp", PORT)]
    saved = host.run("iptables-legacy-save", "-t", "filter").stdout
    assert stranger not in saved and client_addr in saved
    assert "fd00:5e::/64" not in host.run("ip6tables-legacy-save", "-t", "filter").stdout
    # the IPv6 chain is as installed again; the IPv4 one lost the decoy's grant rule: a restore is due
    assert fw.ask(op="intact")["intact"] is False
