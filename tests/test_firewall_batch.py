"""Batches against the real kernel: many openings and closings applied at once (one transaction per
batch for nftables, one table replacement per family for iptables) leave exactly the expected grants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import TestNet, require_netns

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import ipaddress, json, sys
from sknock.ports import Protocol
from sknock.server.firewall import FirewallPolicy, make_firewall
from sknock.server.firewall.base import Opening

fw = make_firewall(sys.argv[1], FirewallPolicy(mode="drop"))
fw.setup()
try:
    def op(i, v6=False):
        base = "fd00:5e:77::" if v6 else "198.18.77."
        address = ipaddress.ip_address(f"{base}{i % 200 + 2:x}" if v6 else f"{base}{i % 200 + 2}")
        return Opening(address, Protocol.TCP if i % 3 else Protocol.UDP, 1000 + i)
    first = [(op(i, v6=i % 2 == 0), 30.0) for i in range(300)]
    failures = fw.apply(first, [], known=set())  # all new: a plain add each
    after_first = sorted(map(str, fw.openings()))
    closes = [o for o, _ in first[:100]]
    extend = first[100:150]
    fresh = [(op(1000 + i), 30.0) for i in range(50)]
    failures += fw.apply(extend + fresh, closes, known={o for o, _ in extend})
    after_second = sorted(map(str, fw.openings()))
    # An extension restarts the timeout: apply() with a short one, then extend and read what the kernel says.
    expiries = {}
    if hasattr(fw, "expiries"):
        fw.apply([(first[200][0], 5.0)], [], known={first[200][0]})
        expiries = {str(o): t for o, t in fw.expiries().items() if o == first[200][0]}
    print(json.dumps({"failures": len(failures), "first": after_first, "second": after_second, "expiries": expiries,
                      "expect_first": sorted(str(o) for o, _ in first),
                      "expect_second": sorted(str(o) for o, _ in first[100:] + fresh)}))
finally:
    fw.teardown()
"""


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_batches_leave_exactly_the_expected_grants(backend: str) -> None:
    require_netns()
    with TestNet.create("skbt") as net:
        result = subprocess.run(
            net.server.cmd(sys.executable, "-c", SCRIPT, backend),
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["failures"] == 0
        assert out["first"] == out["expect_first"] and len(out["first"]) == 300
        assert out["second"] == out["expect_second"] and len(out["second"]) == 250
        if backend == "nftables":
            (left,) = out["expiries"].values()
            assert left is not None and left <= 5  # the 30 s element was replaced by a 5 s one
