"""Test hosts: a server and a client network namespace joined by a veth pair.

Addresses come from 198.18.0.0/15 and fd00::/8 only.  Namespaces are named with a prefix and the
test process's pid (plus a counter) so parallel runs do not collide, and :meth:`TestNet.close`
removes them even when a test fails (use it as a context manager or a pytest fixture).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

_counter = itertools.count()


def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    return None


def require_netns() -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Host:
    ns: str
    ifname: str
    ipv4: str
    ipv6: str

    def cmd(self, *args: str) -> list[str]:
        """The argv that runs ``args`` inside this host."""
        return ["ip", "netns", "exec", self.ns, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run(*self.cmd(*args), check=check, timeout=timeout)

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.cmd(*args), **kwargs)  # type: ignore[call-overload, no-any-return]


@dataclass
class TestNet:
    """Two hosts, ``server`` and ``client``, on one veth link: 198.18.N.1/24 and 198.18.N.2/24,
    fd00:5e:N::1/64 and fd00:5e:N::2/64."""

    __test__ = False  # not a pytest test class

    server: Host
    client: Host
    _made: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, prefix: str = "skt") -> TestNet:
        n = next(_counter)
        tag = f"{prefix}{os.getpid()}x{n}"
        subnet = (os.getpid() + n) % 250 + 1
        server = Host(f"{tag}s", "eth0", f"198.18.{subnet}.1", f"fd00:5e:{subnet:x}::1")
        client = Host(f"{tag}c", "eth0", f"198.18.{subnet}.2", f"fd00:5e:{subnet:x}::2")
        net = cls(server, client)
        try:
            for host in (server, client):
                run("ip", "netns", "add", host.ns)
                net._made.append(host.ns)
            run("ip", "link", "add", "skv" + tag[-9:], "netns", server.ns, "type", "veth",
                "peer", "name", "skp" + tag[-9:], "netns", client.ns)
            server.run("ip", "link", "set", "skv" + tag[-9:], "name", server.ifname)
            client.run("ip", "link", "set", "skp" + tag[-9:], "name", client.ifname)
            for host in (server, client):
                host.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
                host.run("sysctl", "-qw", f"net.ipv6.conf.{host.ifname}.accept_dad=0")
                host.run("ip", "link", "set", "lo", "up")
                host.run("ip", "addr", "add", f"{host.ipv4}/24", "dev", host.ifname)
                host.run("ip", "-6", "addr", "add", f"{host.ipv6}/64", "dev", host.ifname, "nodad")
                host.run("ip", "link", "set", host.ifname, "up")
        except BaseException:
            net.close()
            raise
        return net

    def close(self) -> None:
        while self._made:
            ns = self._made.pop()
            run("ip", "netns", "del", ns, check=False)

    def __enter__(self) -> TestNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
