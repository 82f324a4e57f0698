"""End to end, the ICMP carrier (issue 13 §1): the real server with ``knockCarriers = udp, icmp`` in one
namespace, a client namespace whose own nftables drops every UDP packet it would send (a network that
lets only ping out), the real kernel firewall.

* over IPv4 and IPv6: the knock over UDP cannot leave, the port stays closed; the same knock in an echo
  request opens it, for the client's address; sent through a raw socket (root), through a ping socket
  by an unprivileged user that ``net.ipv4.ping_group_range`` admits, and with ``sknock-knock --via icmp``,
  which confirms by connecting;
* without a ping socket or a raw socket the library says so in one typed line, and sends nothing;
* sknock sends no echo reply: with the server host ignoring echo requests none comes back, and when
  the host answers them its one reply is the only one;
* refusals behave as over UDP: a replayed echo request is refused as a replay (exactly one grant), a
  knock-shaped junk echo request is refused with a reason, an ordinary ping never reaches the server's
  workers;
* with ``knockCarriers = udp`` (the default) an ICMP knock opens nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.netns import TestNet, require_netns
from tests.pki import PASSWORD, TestPKI
from tests.server_harness import ENV, PY, RunningServer, client_script, read_json, run_in_client
from tests.test_server_e2e import assert_closed, options, probe, wait_for, wait_open

pytestmark = pytest.mark.root

PORT = 2005
NOBODY = 65534


def drop_udp_in_client(net: TestNet) -> None:
    """The client's network lets only ping out: its own output hook drops all UDP (inside its namespace)."""
    net.client.run("nft", "add", "table", "inet", "onlyping")
    net.client.run(
        "nft", "add", "chain", "inet", "onlyping", "out", "{ type filter hook output priority 0 ; policy accept ; }"
    )
    net.client.run("nft", "add", "rule", "inet", "onlyping", "out", "meta", "l4proto", "udp", "counter", "drop")
    # and counts the echo replies that come back (it lets everything in)
    net.client.run(
        "nft", "add", "chain", "inet", "onlyping", "in", "{ type filter hook input priority 0 ; policy accept ; }"
    )
    net.client.run("nft", "add", "rule", "inet", "onlyping", "in", "icmp", "type", "echo-reply", "counter")
    net.client.run("nft", "add", "rule", "inet", "onlyping", "in", "icmpv6", "type", "echo-reply", "counter")


def counted(net: TestNet, chain: str) -> int:
    """Packets the counters of the client's chain ``chain`` have counted so far (out: UDP dropped; in:
    echo replies received)."""
    out = net.client.run("nft", "-j", "list", "chain", "inet", "onlyping", chain).stdout
    counters = [
        int(expr["counter"]["packets"])
        for item in json.loads(out)["nftables"]
        for expr in item.get("rule", {}).get("expr", [])
        if "counter" in expr
    ]
    assert counters, f"no counter in {out}"
    return sum(counters)


def udp_dropped(net: TestNet) -> int:
    return counted(net, "out")


def echo_replies(net: TestNet) -> int:
    return counted(net, "in")


def ignore_echo(net: TestNet, ignore: bool) -> None:
    """The server host's own choice: answer echo requests or not (sknock has no say in it)."""
    for key in ("net.ipv4.icmp_echo_ignore_all", "net.ipv6.icmp.echo_ignore_all"):
        net.server.run("sysctl", "-qw", f"{key}={int(ignore)}")


@contextmanager
def icmp_site(pki: TestPKI, prefix: str, **more: str) -> Iterator[tuple[TestNet, RunningServer]]:
    require_netns()
    with TestNet.create(prefix) as net:
        drop_udp_in_client(net)
        values = {**options("nftables", "drop", duration=30), "knockCarriers": "udp, icmp", **more}
        with RunningServer.start(net, pki, wait=True, **values) as server:
            server.serve_tcp(PORT)
            yield net, server


def host_of(net: TestNet, family: int) -> str:
    return net.server.ipv4 if family == 4 else net.server.ipv6


def client_of(net: TestNet, family: int) -> str:
    return net.client.ipv4 if family == 4 else net.client.ipv6


def knock(net: TestNet, pki: TestPKI, family: int, via: str, *, as_user: int | None = None) -> tuple[str, str]:
    """Knock for tcp/PORT with the library from the client namespace (``as_user``: after loading the
    credentials, drop to that uid/gid); returns ('sent', '') or ('error', 'TypeName: message')."""
    # What Python loads lazily is loaded before the drop: the interpreter's files may be root's only.
    drop = (
        f"import encodings.idna, threading; os.setgroups([]); os.setgid({as_user}); os.setuid({as_user})\n"
        if as_user is not None else ""
    )
    body = (
        "import os\n" + drop + "try:\n"
        f"    c.knock({host_of(net, family)!r}, {PORT}, verify=False, via={via!r}); print(json.dumps(['sent', '']))\n"
        "except Exception as e:\n"
        "    print(json.dumps(['error', f'{type(e).__name__}: {e}']))\n"
    )
    result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
    assert result.returncode == 0, result.stderr
    kind, message = read_json(result)
    return kind, message


@pytest.mark.parametrize("family", [4, 6])
def test_only_ping_gets_out_and_the_icmp_knock_opens_the_port(pki: TestPKI, family: int) -> None:
    with icmp_site(pki, "ski") as (net, server):
        address = client_of(net, family)
        assert_closed(net, "drop", family=family)

        # Over UDP the knock cannot leave the client's network: the port stays closed.
        dropped = udp_dropped(net)
        kind, message = knock(net, pki, family, "udp")
        assert kind == "error" and message.startswith("ClientError: cannot send the knock to"), message
        assert udp_dropped(net) > dropped
        time.sleep(1)
        assert "granted" not in server.log_text()
        assert_closed(net, "drop", family=family)

        # In an echo request, through a raw socket (root; the namespace's ping_group_range admits nobody).
        # The server host answers no echo request here, and sknock adds no answer of its own.
        assert net.client.run("sysctl", "-n", "net.ipv4.ping_group_range").stdout.split() == ["1", "0"]
        ignore_echo(net, True)
        mark = server.mark()
        assert knock(net, pki, family, "icmp") == ("sent", "")
        server.wait_log(f"granted tcp/{PORT} to {address}", since=mark)
        wait_open(net, family=family)
        assert echo_replies(net) == 0
        other = 6 if family == 4 else 4
        assert probe(net, family=other)[0] == "timeout"  # the grant is for the knocking address only

        # Through a ping socket, by a user that ping_group_range admits and that may not open a raw socket;
        # now the host answers echo requests, as its admin decides, and the knock works the same.
        net.client.run("sysctl", "-qw", f"net.ipv4.ping_group_range={NOBODY} {NOBODY}")
        ignore_echo(net, False)
        mark = server.mark()
        assert knock(net, pki, family, "icmp", as_user=NOBODY) == ("sent", "")
        server.wait_log(f"granted tcp/{PORT} to {address}", since=mark)
        wait_for(lambda: echo_replies(net) == 1, 5, "the host's own echo reply")

        # Neither socket allowed: one typed line, nothing sent.
        net.client.run("sysctl", "-qw", "net.ipv4.ping_group_range=1 0")
        mark = server.mark()
        kind, message = knock(net, pki, family, "icmp", as_user=NOBODY)
        assert kind == "error" and message.startswith("CarrierUnavailableError: cannot send a knock over ICMP"), message
        assert "ping_group_range" in message and "CAP_NET_RAW" in message and "\n" not in message
        time.sleep(0.5)
        assert "knock from" not in server.log_text()[mark:]
        assert udp_dropped(net) >= 1


def test_the_command_line_knocks_over_icmp_and_confirms(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("icmp-cli")
    password = folder / "pass"
    password.write_text(PASSWORD + "\n")
    with icmp_site(pki, "skj") as (net, server):
        command = [
            PY, "-m", "sknock.cli.knock", "--via", "icmp", "-p", str(PORT), "--pfx", str(pki.alice.pfx),
            "--server-cert", str(pki.server.cer), "--password-file", str(password), "--timeout", "8",
            net.server.ipv6,
        ]
        result = subprocess.run(net.client.cmd(*command), capture_output=True, text=True, env=ENV, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"tcp/{PORT} is open on {net.server.ipv6}" in result.stderr  # the status line (stdout: a pipe)
        server.wait_log(f"granted tcp/{PORT} to {net.client.ipv6}")
        # --knock-port names a UDP port: refused with --via icmp, before anything is asked or sent.
        bad = subprocess.run(
            net.client.cmd(*command[:3], "--knock-port", "40000", *command[3:]),
            capture_output=True, text=True, env=ENV, timeout=60,
        )
        assert bad.returncode == 2 and "--knock-port" in bad.stderr and bad.stderr.count("\n") == 1


def _send_icmp(net: TestNet, pki: TestPKI, family: int, body: str) -> str:
    """Run ``body`` in the client namespace with ``c`` (alice's KnockClient), ``SERVER`` (the server's
    address of ``family``) and ``icmp(data)``, which sends ``data`` as an echo request's data by sknock's
    carrier."""
    helpers = (
        "from sknock.carrier import Carrier, send as carry\n"
        f"SERVER = ipaddress.ip_address({host_of(net, family)!r})\n"
        "def icmp(data):\n"
        "    carry(data, SERVER, Carrier.ICMP)\n"
    )
    result = run_in_client(net, client_script(pki.alice, pki.server.cer, helpers + body))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("family", [4, 6])
def test_refusals_over_icmp_are_those_over_udp(pki: TestPKI, family: int) -> None:
    with icmp_site(pki, "skk") as (net, server):
        address = client_of(net, family)
        # A replayed echo request: one grant; each copy refused as a replay (seen by the worker that had the
        # original, or by the monitor when another worker read it).
        mark = server.mark()
        _send_icmp(net, pki, family, (
            f"d = c.build_knock([(Protocol.TCP, {PORT})], now=time.time())\n"
            "for _ in range(4):\n"
            "    icmp(d); time.sleep(0.05)\n"
        ))
        text = server.wait_log(f"refused knock from {address}: replay", since=mark, count=3)
        assert text.count(f"granted tcp/{PORT} to {address}") == 1
        assert [g["port"] for g in server.status()["grants"]] == [PORT]
        wait_open(net, family=family)

        # Junk with a knock's shape gets through the kernel filter and is refused by the pre-check; an
        # ordinary ping and junk of a knock's size do not get through at all.
        mark = server.mark()
        _send_icmp(net, pki, family, (
            "import os\n"
            "from sknock.protocol import wire\n"
            "icmp(b'\\0' * 56)\n"
            "icmp(os.urandom(1024))\n"
            "icmp(wire.MAGIC + bytes([wire.VERSION, 1, 12, 0]) + os.urandom(1018))\n"
        ))
        line = server.wait_log(f"refused knock from {address}:", since=mark)
        refusals = [x for x in line.splitlines() if "refused knock from" in x]
        assert len(refusals) == 1, refusals
        time.sleep(0.5)
        counters = server.log_text()[mark:]
        assert counters.count("refused knock from") == 1
        assert server.process.poll() is None


def test_without_the_icmp_carrier_an_icmp_knock_opens_nothing(pki: TestPKI) -> None:
    with icmp_site(pki, "skl", knockCarriers="udp") as (net, server):
        assert knock(net, pki, 4, "icmp") == ("sent", "")
        time.sleep(1.5)
        assert "knock from" not in server.log_text()
        assert_closed(net, "drop")
