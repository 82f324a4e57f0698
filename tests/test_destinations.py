"""Only this host's knocks (issue 9 §5): the host's addresses read over rtnetlink, the destination
filter, ``knockDestinations``, and on the real server a knock routed through the host to another
address refused, unless the operator listed that address."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path

import pytest

from sknock.errors import ConfigError
from sknock.server.config import KnockDestinations, load_config
from sknock.server.localaddr import DestinationFilter, host_addresses
from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import PY, RunningServer, client_script, run_in_client

ip = ipaddress.ip_address


def test_host_addresses_match_what_ip_addr_lists() -> None:
    require_netns()
    with TestNet.create("skd") as net:
        net.server.run("ip", "addr", "add", "198.18.251.9/32", "dev", net.server.ifname)
        code = "from sknock.server.localaddr import host_addresses; print(sorted(map(str, host_addresses())))"
        ours = json.loads(net.server.run(PY, "-c", code).stdout.replace("'", '"'))
        listed = json.loads(net.server.run("ip", "-j", "addr").stdout)
        theirs = sorted(str(ip(a["local"])) for link in listed for a in link.get("addr_info", []))
        assert ours == theirs
        assert "198.18.251.9" in ours and net.server.ipv4 in ours and net.server.ipv6 in ours


def test_the_filter_takes_local_addresses_listed_ones_and_new_ones_after_a_second() -> None:
    known = host_addresses()
    lo = next(index for address, index in known.items() if address == ip("127.0.0.1"))
    other = next((index for index in known.values() if index != lo), lo + 1)
    local = DestinationFilter()
    assert local.allows(ip("127.0.0.1"), lo, 0.0)
    assert not local.allows(ip("127.0.0.1"), other, 0.0)  # from the wire, a loopback address is a martian
    assert not local.allows(ip("198.18.250.7"), other, 0.5)
    listed = DestinationFilter(local=False, extra=(ip("198.18.250.7"),))
    assert listed.allows(ip("198.18.250.7"), other, 0.0) and not listed.allows(ip("127.0.0.1"), lo, 0.0)
    # a miss reads the kernel again, but at most once a second
    local._known = {}
    assert not local.allows(ip("127.0.0.1"), lo, 0.9)
    assert local.allows(ip("127.0.0.1"), lo, 1.6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("local", KnockDestinations(True)), ("any", None),
     ("local, 203.0.113.5, fd00::7", KnockDestinations(True, (ip("203.0.113.5"), ip("fd00::7")))),
     ("203.0.113.5", KnockDestinations(False, (ip("203.0.113.5"),)))],
)
def test_knock_destinations_option(tmp_path: Path, value: str, expected: KnockDestinations | None) -> None:
    assert _config(tmp_path, value).knock_destinations == expected


@pytest.mark.parametrize("value", ["any, local", "local,,", "eth0", "224.0.0.1", "0.0.0.0"])
def test_bad_knock_destinations_are_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="knockDestinations"):
        _config(tmp_path, value)


def _config(tmp_path: Path, value: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.ini"
    path.write_text(textwrap.dedent(f"""\
        [DEFAULT]
        serverPFXFile = server.pfx
        PFXPasswd = x
        crlFile = crl.der
        knockDestinations = {value}
        """))
    return load_config(path, check_files=False)


@pytest.mark.root
@pytest.mark.parametrize("listed", [False, True])
def test_a_knock_routed_through_the_host_to_another_address(pki: TestPKI, listed: bool) -> None:
    require_netns()
    elsewhere = "198.19.250.7"
    options = {"knockDestinations": f"local, {elsewhere}"} if listed else {}
    with TestNet.create("skdr") as net, RunningServer.start(
        net, pki, firewallPolicy="reject", protectedPorts="tcp/2005", **options  # type: ignore[arg-type]
    ) as server:
        server.serve_tcp(2005)
        net.client.run("ip", "route", "add", "198.19.250.0/24", "via", net.server.ipv4)
        body = (
            "d = c.build_knock([(Protocol.TCP, 2005)], now=time.time())\n"
            "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
            f"    s.sendto(d, ({elsewhere!r}, 40000))\n"
        )
        mark = server.mark()
        result = run_in_client(net, client_script(pki.alice, pki.server.cer, body))
        assert result.returncode == 0, result.stderr
        if listed:
            server.wait_log(f"granted tcp/2005 to {net.client.ipv4} (", since=mark)
            assert server.reachable(2005)
        else:
            line = server.wait_log(f"refused knock from {net.client.ipv4}: wrong-destination", since=mark)
            assert f"addressed to {elsewhere}" in line
            assert not server.reachable(2005)
            # the same knock sent to the server's own address is granted
            mark = server.mark()
            body = body.replace(repr(elsewhere), repr(net.server.ipv4))
            assert run_in_client(net, client_script(pki.alice, pki.server.cer, body)).returncode == 0
            server.wait_log(f"granted tcp/2005 to {net.client.ipv4} (", since=mark)
