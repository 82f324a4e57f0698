"""The server's CRLs with a root CA and an issuing intermediate, short of the network: what ``prepare`` and
``--check-config`` accept and say, and how the monitor keeps the set and hands it to workers.

A real two-level PKI made with ``sknock.ca``; the server's PKCS#12 is issued by the intermediate and
carries it and the root, as ``sknock-ca --dir ISSUING server`` writes it.  The end-to-end version, on the
real server with a real firewall, is in test_server_crl.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sknock import ca as ca_lib
from sknock.cli.server import check_config
from sknock.credentials import load_client_pfx
from sknock.errors import CertificateError, ConfigError
from sknock.ports import parse_ports
from sknock.server.config import load_config
from sknock.server.crl_refresh import FETCHED_HEADER, CrlRefresher, CrlSet, split_crl_set
from sknock.server.daemon import Server, prepare
from sknock.server.monitor import CRL_PREFIX, Child, Monitor
from sknock.trust import load_crl
from tests.pki import PASSWORD, PASSWORD_BYTES
from tests.test_monitor import RecordingFirewall

DER = serialization.Encoding.DER


@dataclass
class TwoLevel:
    folder: Path
    root: ca_lib.CertificateAuthority
    issuing: ca_lib.CertificateAuthority

    @property
    def root_crl(self) -> Path:
        return self.root.directory / "crl.der"

    @property
    def issuing_crl(self) -> Path:
        return self.issuing.directory / "crl.der"

    def client(self, name: str):  # type: ignore[no-untyped-def]
        return load_client_pfx(self.issuing.directory / "client" / f"{name}.pfx", PASSWORD).certificate

    def config(self, body: str, name: str = "sknock.ini") -> Path:
        path = self.folder / name
        path.write_text(
            "[DEFAULT]\n"
            f"serverPFXFile = {self.issuing.directory / 'server' / 'gw.pfx'}\n"
            f"PFXPasswd = {PASSWORD}\nuser = nobody\n"
            "firewallBackend = command\nopenCommand = true %IP%\ncloseCommand = true %IP%\n" + body
        )
        return path

    def server(self, body: str) -> Server:
        return prepare(load_config(self.config(body)))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TwoLevel:
    folder = tmp_path_factory.mktemp("twolevel")
    root = ca_lib.init_ca(folder / "root", PASSWORD_BYTES, name="Two Level Root")
    issuing = root.issue_intermediate("issuing", b"issuing password", out=folder / "issuing")
    issuing.issue_server("gw", PASSWORD_BYTES)
    for name in ("alice", "mallory"):
        issuing.issue_client(name, parse_ports("tcp/22"), PASSWORD_BYTES)
    issuing.revoke("mallory")
    return TwoLevel(folder, root, issuing)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_the_server_takes_a_crl_per_ca_and_checks_each_client_against_them(pki: TwoLevel) -> None:
    server = pki.server(f"crlFile = {pki.root_crl}, {pki.issuing_crl}\n")
    assert server.roots == [pki.root.certificate] and server.intermediates == [pki.issuing.certificate]
    trust = server.trust(server.crls_in_hand())
    assert trust.verify(pki.client("alice"), _now()).subject == "CN=alice"
    with pytest.raises(CertificateError, match="CN=mallory .* is revoked"):
        trust.verify(pki.client("mallory"), _now())


@pytest.mark.parametrize(("given", "missing"), [("root", "CN=issuing"), ("issuing", "CN=Two Level Root")])
def test_a_ca_without_a_crl_stops_the_start(pki: TwoLevel, given: str, missing: str) -> None:
    crl = pki.root_crl if given == "root" else pki.issuing_crl
    with pytest.raises(ConfigError, match=f"crlFile: no CRL of {missing}: every client whose chain passes through"):
        pki.server(f"crlFile = {crl}\n")


def test_two_crls_of_one_ca_stop_the_start(pki: TwoLevel) -> None:
    copy = pki.folder / "copy.crl"
    shutil.copy(pki.issuing_crl, copy)
    with pytest.raises(ConfigError, match="are both CRLs of CN=issuing: give each CA's CRL once"):
        pki.server(f"crlFile = {pki.root_crl}, {pki.issuing_crl}, {copy}\n")


def test_a_source_still_to_be_fetched_is_waited_for(pki: TwoLevel) -> None:
    later = pki.folder / "later.crl"
    server = pki.server(f"crlFile = {pki.root_crl}, {later}\ncrlUrl = , http://127.0.0.1:9/issuing.crl\n")
    assert server.crls[1] is None and server.crls[0] is not None
    # until the intermediate's CRL comes, its clients are refused (fail closed)
    with pytest.raises(CertificateError, match="issuer CN=issuing of CN=alice: no CRL loaded") as info:
        server.trust(server.crls_in_hand()).verify(pki.client("alice"), _now())
    assert info.value.reason == "crl-unavailable"


def test_revocation_none_checks_no_crl(pki: TwoLevel) -> None:
    server = pki.server("revocation = none\n")
    assert server.crls == []
    assert server.trust([]).verify(pki.client("mallory"), _now()).subject == "CN=mallory"


@pytest.fixture
def sknock_logger() -> Iterator[None]:
    """run() points the sknock logger at stderr and stops its propagation: put it back afterwards."""
    logger = logging.getLogger("sknock")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[2]
    logger.setLevel(saved[1])


@pytest.mark.usefixtures("sknock_logger")
def test_check_config_shows_the_choice(pki: TwoLevel, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config(pki.config(f"crlFile = {pki.root_crl}, {pki.issuing_crl}\n")) == 0
    out = capsys.readouterr()
    assert (f"revocation crl: 2 CRL(s): CN=Two Level Root from {pki.root_crl}; CN=issuing from {pki.issuing_crl}; "
            "replay store local)" in out.out)
    assert "revocation = none" not in out.err
    assert check_config(pki.config("revocation = none\n")) == 0
    out = capsys.readouterr()
    assert ("configuration OK (firewall backend command; revocation none: no CRL is checked; replay store local)"
            in out.out)
    assert "WARNING" in out.err and "revocation = none: no CRL is checked" in out.err
    assert check_config(pki.config(f"crlFile = {pki.issuing_crl}\n")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CRL of CN=Two Level Root" in err[0] and "Traceback" not in err[0]


# -- the monitor --------------------------------------------------------------------------------------


def test_the_monitor_hands_the_whole_set_and_keeps_each_source_to_itself(
    pki: TwoLevel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    cas = [pki.root.certificate, pki.issuing.certificate]
    root_file, issuing_file = tmp_path / "root.crl", tmp_path / "issuing.crl"
    shutil.copy(pki.root_crl, root_file)
    shutil.copy(pki.issuing_crl, issuing_file)
    url = "http://pki.invalid/issuing.crl"
    keepers = [
        CrlRefresher(str(root_file), root_file, partial(load_crl, issuers=cas, source="root"), store=lambda d: None),
        CrlRefresher(url, issuing_file, partial(load_crl, issuers=cas, source=url)),
    ]
    for keeper, path in zip(keepers, (root_file, issuing_file), strict=True):
        keeper.seed(load_crl(path.read_bytes(), cas, source="seed"), path.read_bytes())
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    monitor = Monitor(firewall=RecordingFirewall(), channels=[p[0] for p in pairs], max_duration=300,
                      crl=CrlSet(keepers))
    assert [c.issuer.rfc4514_string() for c in monitor.crls()] == ["CN=Two Level Root", "CN=issuing"]

    def handed() -> list[bytes]:
        out = []
        for _, worker in pairs:
            worker.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                out.append(worker.recv(1 << 20))
        return out

    # The fetcher brings the intermediate's new CRL (a client revoked): every worker gets both CRLs.
    pki.issuing.issue_client("carol", parse_ports("tcp/22"), PASSWORD_BYTES)
    newer = pki.issuing.revoke("carol", now=_now() + dt.timedelta(seconds=1)).public_bytes(DER)
    fetcher = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = Child("crl fetcher", 0, 0, fetcher[0])
    fetcher[1].send(CRL_PREFIX + FETCHED_HEADER.pack(1) + newer)
    monitor._read_fetcher(child)
    messages = handed()
    assert len(messages) == 2 and messages[0] == messages[1]
    assert split_crl_set(messages[0][len(CRL_PREFIX):]) == [root_file.read_bytes(), newer]
    assert issuing_file.read_bytes() == newer
    assert sum("using the new CRL of CN=issuing" in r.getMessage() for r in caplog.records) == 1

    # The fetcher may not speak for a file source, nor send a message without its source
    fetcher[1].send(CRL_PREFIX + FETCHED_HEADER.pack(0) + pki.root_crl.read_bytes())
    monitor._read_fetcher(child)
    fetcher[1].send(CRL_PREFIX + b"\x00")
    monitor._read_fetcher(child)
    assert handed() == []
    assert any("not a URL it fetches" in r.getMessage() for r in caplog.records)
    assert any("malformed message from the CRL fetcher" in r.getMessage() for r in caplog.records)
    # The root's CRL from the intermediate's URL: another CA's CRL, refused
    monitor.offer_crl(pki.root.write_crl(now=_now() + dt.timedelta(seconds=2)).public_bytes(DER), 1)
    assert handed() == [] and issuing_file.read_bytes() == newer
    assert any("this source serves the CRL of CN=issuing" in r.getMessage() for r in caplog.records)

    status = monitor.status()
    assert status["revocation"] == "crl"
    crls = status["crls"]
    assert isinstance(crls, list) and [c["issuer"] for c in crls] == ["CN=Two Level Root", "CN=issuing"]
    assert crls[1]["source"] == url and crls[1]["revoked"] == 2
    for sock in (*[s for p in pairs for s in p], *fetcher):
        sock.close()


def test_with_revocation_none_a_worker_still_gets_its_first_message(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monitor = Monitor(firewall=RecordingFirewall(), max_duration=300, crl=CrlSet([]))
    monitor._send_crl([Child("worker", 0, 0, a)])
    assert b.recv(100) == CRL_PREFIX  # an empty set: the worker starts, checking no CRL
    assert monitor.crls() == [] and monitor.status()["revocation"] == "none"
    a.close()
    b.close()
