"""The real server refuses every class of bad knock: the protected port stays closed, and the log
names the reason and the source address.

Knocks are built with the client library in the client namespace and sent with a plain UDP socket,
so a test can replay the exact bytes, send from a second address, or send what the library itself
would refuse to send.  In-memory refusal tests are in test_verifier.py; these go through capture,
worker, monitor and kernel firewall.
"""

from __future__ import annotations

import collections
import math
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sknock.ports import Protocol, parse_ports
from tests import forged
from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import PY, RunningServer, client_script, run_in_client

pytestmark = pytest.mark.root

SERVED = (22, 2001, 2003, 2004, 2005, 2006, 2007, 2008, 2009, 2011)


@dataclass
class Site:
    net: TestNet
    server: RunningServer
    pki: TestPKI
    second: str  # another address on the client's interface

    @property
    def first(self) -> str:
        return self.net.client.ipv4

    def mark(self) -> int:
        return self.server.mark()

    def wait_new(self, mark: int, needle: str, timeout: float = 10) -> str:
        """Wait until ``needle`` appears in the log after ``mark``; return that part of the log."""
        return self.server.wait_log(needle, timeout=timeout, since=mark)

    def client(self, who: str, body: str, timeout: float = 30) -> str:
        """Run ``body`` in the client namespace with ``c``, a KnockClient for pki.<who>, and
        ``send(datagram, source=None)``; returns its stdout."""
        helpers = (
            f"SERVER = {self.net.server.ipv4!r}\n"
            "def send(datagram, source=None, port=40000):\n"
            "    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
            "        if source: s.bind((source, 0))\n"
            "        s.sendto(datagram, (SERVER, port))\n"
        )
        result = run_in_client(
            self.net, client_script(getattr(self.pki, who), self.pki.server.cer, helpers + body), timeout=timeout
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def reachable(self, port: int, source: str | None = None) -> bool:
        """Can the client namespace, from ``source`` (default: its first address), connect to ``port``?"""
        code = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(1.0)\n"
            f"s.bind(({source or self.first!r}, 0))\n"
            f"try:\n    s.connect(({self.net.server.ipv4!r}, {port})); s.close()\n"
            "except OSError:\n    sys.exit(1)\n"
        )
        return self.net.client.run(PY, "-c", code, check=False, timeout=15).returncode == 0

    def refused(self, who: str, body: str, reason: str, *, source: str | None = None) -> str:
        """Send what ``body`` sends; wait for 'refused knock from SOURCE: REASON'; return that line."""
        mark = self.mark()
        self.client(who, body)
        needle = f"refused knock from {source or self.first}: {reason}"
        text = self.wait_new(mark, needle)
        return next(line for line in text.splitlines() if needle in line)


def _start(pki: TestPKI, prefix: str, **options: str) -> Iterator[Site]:
    require_netns()
    with TestNet.create(prefix) as net:
        second = net.client.ipv4.rsplit(".", 1)[0] + ".3"
        net.client.run("ip", "addr", "add", f"{second}/24", "dev", net.client.ifname)
        with RunningServer.start(
            net, pki, protectedPorts="tcp/22,tcp/2000-2011", firewallPolicy="reject",
            PORT_OPEN_DURATION_IN_SECONDS="60", emergencySSH="no", **options,  # type: ignore[arg-type]
        ) as server:
            for port in SERVED:
                server.serve_tcp(port)
            yield Site(net, server, pki, second)


@pytest.fixture(scope="module")
def site(pki: TestPKI) -> Iterator[Site]:
    # One worker, so every replay meets the worker that saw the original (the cheap check); the
    # test below shows what happens when a replay reaches another worker.
    yield from _start(pki, "skr", workers="1")


@pytest.fixture(scope="module")
def strict(pki: TestPKI) -> Iterator[Site]:
    yield from _start(pki, "skq", requireSourceAddress="yes")


def test_a_replay_that_reaches_another_worker_is_refused_by_the_firewall_process(pki: TestPKI) -> None:
    """With two workers the kernel spreads packets by flow; a replay from other source ports may meet the
    worker that did not see the original. Its nonce is then refused centrally: still exactly one grant."""
    for site in _start(pki, "skx", workers="2"):
        mark = site.mark()
        site.client("alice", (
            "d = c.build_knock([(Protocol.TCP, 2001)], now=time.time())\n"
            "for i in range(12):\n"
            "    send(d, source=(SECOND if i % 2 else None))\n"
            "    time.sleep(0.02)\n"
        ).replace("SECOND", repr(site.second)))
        text = site.wait_new(mark, "granted tcp/2001")
        deadline = time.monotonic() + 10
        while text.count("refused knock from") < 11 and time.monotonic() < deadline:
            time.sleep(0.1)
            text = site.server.log_text()[mark:]
        assert text.count("granted tcp/2001") == 1
        refusals = [line for line in text.splitlines() if "refused knock from" in line]
        assert len(refusals) == 11 and all(": replay" in line for line in refusals)
        assert len([g for g in site.server.status()["grants"] if g["port"] == 2001]) == 1


def test_nothing_is_reachable_before_a_knock(site: Site) -> None:
    for port in (22, 2001, 2011):
        assert not site.reachable(port)
        assert not site.reachable(port, site.second)


def test_an_exact_replay_is_refused_before_any_crypto(site: Site) -> None:
    mark = site.mark()
    out = site.client("alice", "d = c.build_knock([(Protocol.TCP, 2001)], now=time.time()); send(d)\n"
                               "print(d.hex())\n")
    datagram = out.strip().splitlines()[-1]
    site.wait_new(mark, f"granted tcp/2001 to {site.first}")
    assert site.reachable(2001)
    # The same bytes again from the same address, then from another address on the client's link:
    # an attacker who captured the knock gains nothing, not even for a new address.
    line = site.refused("alice", f"send(bytes.fromhex({datagram!r}))\n", "replay-seen")
    assert line.endswith(f"refused knock from {site.first}: replay-seen")
    site.refused("alice", f"send(bytes.fromhex({datagram!r}), source={site.second!r})\n", "replay-seen",
                 source=site.second)
    assert not site.reachable(2001, site.second)
    assert site.server.log_text().count("granted tcp/2001") == 1
    assert [(g["address"], g["port"]) for g in site.server.status()["grants"] if g["port"] == 2001] == [
        (site.first, 2001)
    ]


@pytest.mark.parametrize(
    ("who", "reason", "detail"),
    [
        ("old", "cert-expired", "CN=old"),
        ("mallory", "cert-revoked", "CN=mallory"),
        ("stranger", "cert-untrusted", ""),
    ],
)
def test_certificate_refusals(site: Site, who: str, reason: str, detail: str) -> None:
    line = site.refused(who, "send(c.build_knock([(Protocol.TCP, 22)], now=time.time()))\n", reason)
    assert detail in line
    assert not site.reachable(22)


def test_a_port_the_certificate_does_not_name(site: Site) -> None:
    # Bypass the client library's own check to reach the server's.
    body = (
        "from sknock.ports import parse_ports\n"
        "c.ports = parse_ports('tcp/1-65535,udp/1-65535')\n"
        "send(c.build_knock([(Protocol.TCP, 2003), (Protocol.TCP, 2011)], now=time.time()))\n"
    )
    line = site.refused("alice", body, "not-authorized")
    assert "may not open tcp/2011" in line and "CN=alice" in line
    assert not site.reachable(2011)
    assert not site.reachable(2003)  # all or nothing: the named port is not opened either
    line = site.refused("noports", body.replace("(Protocol.TCP, 2003), ", ""), "not-authorized")
    assert "CN=noports may not open tcp/2011" in line


def test_a_stale_knock(site: Site) -> None:
    line = site.refused("alice", "send(c.build_knock([(Protocol.TCP, 2004)], now=time.time() - 60))\n", "stale")
    assert re.search(r"stale: clock differs by -6\d s", line), line
    line = site.refused("alice", "send(c.build_knock([(Protocol.TCP, 2004)], now=time.time() + 3600))\n", "stale")
    assert re.search(r"stale: clock differs by \+3[56]\d\d s", line), line
    assert not site.reachable(2004)


def test_a_signed_timestamp_just_outside_the_window(site: Site) -> None:
    """7.6 s old: the clear whole-second time passes the cheap check (1 s of slack), the signed
    millisecond timestamp does not.  The knock is sent when the fraction of the second makes the
    coarse time's rounding work for it (as in test_verifier.py, but against the server's clock)."""
    for offset in (-7.6, 7.6):
        body = (
            "deadline = time.monotonic() + 3\n"
            "while not 0.60 <= time.time() % 1 < 0.64 and time.monotonic() < deadline:\n"
            "    time.sleep(0.002)\n"
            f"send(c.build_knock([(Protocol.TCP, 2004)], now=time.time() + {offset}))\n"
        )
        line = site.refused("alice", body, "timestamp")
        assert re.search(r"timestamp: knock is [+-]7\.\d{3} s old, window 7 s", line), line
    assert not site.reachable(2004)


def test_a_knock_bound_to_another_address(site: Site) -> None:
    # Bound to the first address, sent from the second.
    body = f"send(c.build_knock([(Protocol.TCP, 2005)], now=time.time(), source_address=ipaddress.ip_address({site.first!r})), source={site.second!r})\n"  # noqa: E501
    line = site.refused("alice", body, "source-mismatch", source=site.second)
    assert f"signed for {site.first}, came from {site.second}" in line
    # Bound to an address nobody has, sent from the first.
    body = "send(c.build_knock([(Protocol.TCP, 2005)], now=time.time(), source_address=ipaddress.ip_address('198.18.250.250')))\n"  # noqa: E501
    line = site.refused("alice", body, "source-mismatch")
    assert f"signed for 198.18.250.250, came from {site.first}" in line
    assert not site.reachable(2005, site.second)
    assert not site.reachable(2005)


def test_a_copy_sent_first_from_another_address_does_not_burn_a_bound_knock(site: Site) -> None:
    """An attacker on the path copies a knock bound to the first address and sends it from the second,
    before the genuine packet arrives (and again after): refused source-mismatch, and the genuine one is
    granted once, to the first address only."""
    mark = site.mark()
    site.client("alice", (
        "d = c.build_knock([(Protocol.TCP, 2006)], now=time.time(),\n"
        f"                 source_address=ipaddress.ip_address({site.first!r}))\n"
        "for _ in range(3):\n"
        f"    send(d, source={site.second!r})\n"  # the copies first, in the same burst
        "send(d)\n"  # then the genuine sender
        f"send(d, source={site.second!r}); send(d)\n"  # and copies of both after
    ))
    text = site.wait_new(mark, f"granted tcp/2006 to {site.first}")
    deadline = time.monotonic() + 10
    while text.count("refused knock from") < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        text = site.server.log_text()[mark:]
    assert text.count("granted tcp/2006") == 1
    refusals = sorted(line.split("refused knock from ", 1)[1] for line in text.splitlines()
                      if "refused knock from" in line)
    # The first copy from the second address is refused source-mismatch; the other copies stop at the
    # capture or at the verifier's copy memory (replay-seen), in whatever order they were read.
    assert refusals == sorted([
        f"{site.second}: source-mismatch: signed for {site.first}, came from {site.second}",
        *[f"{site.second}: replay-seen"] * 3,
        f"{site.first}: replay-seen",
    ]), text
    assert site.reachable(2006)
    assert not site.reachable(2006, site.second)
    assert [(g["address"], g["port"]) for g in site.server.status()["grants"] if g["port"] == 2006] == [
        (site.first, 2006)
    ]


# Junk behind a knock-shaped header (version 1, suite 1, flags 0, coarse time 1970): it passes the
# capture filter and the pre-check refuses it as stale, before any public-key operation.
SHAPED_JUNK = "b'sK\\x01\\x01\\x00\\x00' + bytes(4) + os.urandom(1014)"


def test_junk_of_knock_size_is_refused_cheaply_and_the_server_keeps_running(site: Site) -> None:
    # Junk without a knock's header is dropped by the capture filter in the kernel, unlogged; the
    # shaped junk sent after it reaches the pre-check and is refused there.
    mark = site.mark()
    body = (
        "import os\n"
        "junk = os.urandom(1024)\n"
        "while junk.startswith(b'sK'): junk = os.urandom(1024)\n"
        "send(junk)\n"
        "send(bytes(1232))\n"
        "send(b'sK' + bytes(1022))\n"
        f"send({SHAPED_JUNK})\n"
    )
    site.refused("alice", body, "stale")
    text = site.server.log_text()[mark:]
    assert text.count("refused knock from") == 1, text
    assert site.server.process.poll() is None
    assert not site.reachable(2007)
    mark = site.mark()
    site.client("alice", "send(c.build_knock([(Protocol.TCP, 2007)], now=time.time()))\n")
    site.wait_new(mark, f"granted tcp/2007 to {site.first}")
    assert site.reachable(2007)


def _worker_pids(site: Site) -> list[int]:
    """The server's child processes (its workers), by the kernel's parent pid."""
    out = subprocess.run(["pgrep", "-P", str(site.server.process.pid)], capture_output=True, text=True, check=False)
    return sorted(int(pid) for pid in out.stdout.split())


def test_knocks_carrying_malformed_certificates_end_no_process(site: Site) -> None:
    """Issue 8: anyone holding the server certificate can seal a knock whose client certificate is
    malformed; each kind that once ended the worker (tests/forged.py) is refused cert-invalid, the worker
    is the same process afterwards, and it grants the next valid knock."""
    workers = _worker_pids(site)
    assert len(workers) == 1
    mark = site.mark()
    attacker = ec.generate_private_key(ec.SECP256R1())
    sends = "".join(
        f"send(bytes.fromhex({forged.seal(build(attacker), attacker, site.pki.server.certificate, [(Protocol.TCP, 2008)], now=time.time(), work_bits=12).hex()!r}))\n"  # noqa: E501
        for build in forged.MALFORMED.values()
    )
    site.client("alice", sends)
    text = site.server.wait_log(f"refused knock from {site.first}: cert-invalid", count=len(forged.MALFORMED),
                                since=mark)
    assert site.server.process.poll() is None
    assert _worker_pids(site) == workers
    assert "Traceback" not in text and "internal-error" not in text
    mark = site.mark()
    site.client("alice", "send(c.build_knock([(Protocol.TCP, 2008)], now=time.time()))\n")
    site.wait_new(mark, f"granted tcp/2008 to {site.first}")
    assert site.reachable(2008)
    assert _worker_pids(site) == workers


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ sknock\[\d+\] [A-Z]+ sknock[.\w]*: ")


def test_a_subject_with_line_breaks_forges_no_log_line(site: Site) -> None:
    """Issue 8, point 7: a client certificate (issued by the CA: every check passes) whose subject holds a
    newline, a carriage return, a terminal escape and a forged log line.  Refused (a port it may not
    open) and granted, the log keeps one line per record, with the subject escaped in it."""
    forged_line = "2026-11-30 12:00:00,000 sknock[1] INFO sknock.firewall: granted tcp/22 to 6.6.6.6 (CN=root)"
    name = f"mallet\n{forged_line}\r\x1b[2K\u2028"
    key, certificate = forged.issue(site.pki.ca.key, site.pki.ca_cert, name, parse_ports("tcp/2009"))  # type: ignore[arg-type]
    der = certificate.public_bytes(serialization.Encoding.DER)

    def knock(port: int) -> str:
        datagram = forged.seal(der, key, site.pki.server.certificate, [(Protocol.TCP, port)], now=time.time(),
                               work_bits=12)
        return f"send(bytes.fromhex({datagram.hex()!r}))\n"

    mark = site.mark()
    line = site.refused("alice", knock(2011), "not-authorized")
    assert "CN=mallet\\x0a2026-11-30 12:00:00\\,000 sknock[1] INFO" in line  # RFC 4514 escapes the comma
    assert "\\x1b[2K\\u2028 may not open tcp/2011" in line
    site.client("alice", knock(2009))
    site.wait_new(mark, f"granted tcp/2009 to {site.first}")
    assert site.reachable(2009)
    text = site.server.log_text()[mark:]
    assert "6.6.6.6" in text  # the forged text is there, escaped, inside genuine records ...
    for record in text.splitlines():  # ... and every line of the log is a record of its own
        assert _LOG_LINE.match(record), record
        assert "\r" not in record and "\x1b" not in record and "\u2028" not in record
    assert not any(r.startswith(forged_line[:24]) for r in text.splitlines())


# -- with requireSourceAddress = yes ---------------------------------------------------------------------------------


def test_an_unbound_knock_when_the_address_is_required(strict: Site) -> None:
    line = strict.refused("alice", "send(c.build_knock([(Protocol.TCP, 2003)], now=time.time()))\n",
                          "source-required")
    assert f"from {strict.first}: knock carries no source address" in line
    assert not strict.reachable(2003)
    mark = strict.mark()
    strict.client("alice", f"send(c.build_knock([(Protocol.TCP, 2003)], now=time.time(), "
                           f"source_address=ipaddress.ip_address({strict.first!r})))\n")
    strict.wait_new(mark, f"granted tcp/2003 to {strict.first}")
    assert strict.reachable(2003)
    assert not strict.reachable(2003, strict.second)


_LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")


def test_a_junk_flood_is_rate_limited_in_the_log_and_a_valid_knock_still_gets_through(strict: Site) -> None:
    flood = 2000
    mark = strict.mark()
    started = time.monotonic()
    body = (
        "import os\n"
        f"junk = [{SHAPED_JUNK} for _ in range(64)]\n"
        "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
        f"    for i in range({flood}):\n"
        "        s.sendto(junk[i % 64], (SERVER, 40000 + i % 1000))\n"
        "print('flooded', flush=True)\n"
        f"send(c.build_knock([(Protocol.TCP, 2011 - 10)], now=time.time(), "
        f"source_address=ipaddress.ip_address({strict.first!r})))\n"
    )
    out = strict.client("alice", body, timeout=60)
    assert "flooded" in out
    strict.wait_new(mark, f"granted tcp/2001 to {strict.first}", timeout=30)
    assert strict.reachable(2001)
    elapsed = time.monotonic() - started
    # One more refusal, a second later, makes the log summarize the last flooded second.
    time.sleep(1.1)
    strict.refused("alice", f"import os\nsend({SHAPED_JUNK})\n", "stale")
    text = strict.server.log_text()[mark:]
    refusal_lines = [line for line in text.splitlines() if "refused knock from" in line]
    summaries = [int(m.group(1)) for m in re.finditer(r"(\d+) more refusals not logged in the last second", text)]
    assert summaries, text[-3000:]
    # 20 a second per worker, not 2,000 (the flood may straddle a second boundary: + 2 seconds)
    workers = int(strict.server.status()["workers"])  # type: ignore[call-overload]
    assert len(refusal_lines) <= 20 * workers * (math.ceil(elapsed) + 2)
    # Every flooded datagram the kernel delivered is accounted for: logged or summarized.
    flooded_lines = len(refusal_lines) - 1
    assert 0.5 * flood <= flooded_lines + sum(summaries) <= flood
    per_second = collections.Counter(m.group(1) for line in refusal_lines if (m := _LINE_TIME.match(line)))
    assert max(per_second.values()) <= 2 * 20, per_second  # a batch may straddle a second boundary
    assert strict.server.process.poll() is None
    assert (strict.first, 2001) in [(g["address"], g["port"]) for g in strict.server.status()["grants"]]
