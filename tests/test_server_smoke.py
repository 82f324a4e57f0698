"""The real server in a namespace, knocked open by the client library: the harness's own smoke test."""

from __future__ import annotations

from tests.netns import TestNet, require_netns
from tests.pki import TestPKI
from tests.server_harness import RunningServer, knock_from_client


def test_knock_opens_and_the_window_closes(pki: TestPKI) -> None:
    require_netns()
    with TestNet.create("sks") as net, RunningServer.start(
        net, pki, protectedPorts="tcp/2005", PORT_OPEN_DURATION_IN_SECONDS="2"
    ) as server:
        server.serve_tcp(2005)
        assert not server.reachable(2005)
        knock_from_client(net, pki.alice, pki, 2005)
        server.wait_log("granted tcp/2005")
        assert server.reachable(2005)
        assert [g["port"] for g in server.status()["grants"]] == [2005]
        assert "tcp/2005" in server.status_cli()
        server.wait_log("closed tcp/2005", timeout=6)
        assert not server.reachable(2005)
        assert server.stop() == 0
        # a stop is not a teardown: the policy stays and the port stays closed
        assert server.nft_ruleset().count("table inet sknock") == 1
