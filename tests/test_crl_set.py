"""Several CRL sources: one refresher per source, each kept to its own CA, and the set handed on whole.

Real CRLs from two real CAs (a root and the intermediate under it, as ``sknock-ca`` makes them),
verified by ``sknock.trust.load_crl`` exactly as the daemon binds it.
"""

from __future__ import annotations

import datetime as dt
from functools import partial
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sknock import ca as ca_lib
from sknock.server.crl_refresh import CrlRefresher, CrlSet, encode_crl_set, split_crl_set
from sknock.trust import load_crl
from tests.pki import PASSWORD_BYTES, TestPKI, at, unnumbered_crl

NOW = TestPKI.now()
DER = serialization.Encoding.DER


class Hierarchy:
    def __init__(self, folder: Path) -> None:
        self.root = ca_lib.init_ca(folder / "root", PASSWORD_BYTES, name="Set Root", clock=at(NOW.timestamp()))
        self.sub = self.root.issue_intermediate("issuing", b"another password", out=folder / "issuing")
        self.cas = [self.root.certificate, self.sub.certificate]

    def crl(self, authority: ca_lib.CertificateAuthority, hours_ago: float) -> bytes:
        return authority.write_crl(now=NOW - dt.timedelta(hours=hours_ago)).public_bytes(DER)

    def load(self, data: bytes) -> x509.CertificateRevocationList:
        return load_crl(data, self.cas, source="test")

    def refresher(self, source: str, crl_file: Path, **kw: object) -> CrlRefresher:
        return CrlRefresher(source, crl_file, partial(load_crl, issuers=self.cas, source=source), **kw)  # type: ignore[arg-type]


@pytest.fixture
def h(tmp_path: Path) -> Hierarchy:
    return Hierarchy(tmp_path)


def test_the_set_encodes_as_der_after_der_and_splits_back(h: Hierarchy) -> None:
    root_crl, sub_crl = h.load(h.crl(h.root, 1)), h.load(h.crl(h.sub, 1))
    assert encode_crl_set([]) == b"" and split_crl_set(b"") == []
    # one CRL is exactly its DER: the message the workers got before there were several
    assert encode_crl_set([root_crl]) == root_crl.public_bytes(DER)
    both = encode_crl_set([root_crl, sub_crl])
    assert split_crl_set(both) == [root_crl.public_bytes(DER), sub_crl.public_bytes(DER)]
    assert [h.load(part) for part in split_crl_set(both)] == [root_crl, sub_crl]


@pytest.mark.parametrize("cut", ["garbage", "truncated", "trailing", "pem", "long-length"])
def test_a_set_that_is_not_whole_ders_does_not_split(h: Hierarchy, cut: str) -> None:
    one = h.crl(h.root, 1)
    data = {
        "garbage": b"not a CRL",
        "truncated": one + one[:-1],
        "trailing": one + b"\x30",
        "pem": h.load(one).public_bytes(serialization.Encoding.PEM),
        "long-length": b"\x30\x85\x01\x00\x00\x00\x00",
    }[cut]
    with pytest.raises(ValueError, match="byte"):
        split_crl_set(data)


def test_a_source_keeps_to_the_ca_whose_crl_it_first_brought(h: Hierarchy, tmp_path: Path) -> None:
    keeper = h.refresher("http://pki.example/issuing.crl", tmp_path / "issuing.crl")
    first = keeper.accept(h.crl(h.sub, 2), NOW)
    assert first.status == "updated"
    # a newer CRL, well signed by a configured CA, but the root's: refused, the intermediate's kept
    root_crl = h.crl(h.root, 1)
    result = keeper.accept(root_crl, NOW)
    assert result.status == "failed"
    assert "it is the CRL of CN=Set Root, but this source serves the CRL of CN=issuing" in result.message
    assert keeper.current is first.crl
    assert (tmp_path / "issuing.crl").read_bytes() != root_crl
    assert keeper.accept(h.crl(h.sub, 1), NOW).status == "updated"


def test_the_set_hands_on_the_newest_crl_of_each_ca(h: Hierarchy, tmp_path: Path) -> None:
    root_file, sub_file, mirror_file = tmp_path / "root.crl", tmp_path / "sub.crl", tmp_path / "mirror.crl"
    root_file.write_bytes(h.crl(h.root, 3))
    crls = CrlSet([
        h.refresher(str(root_file), root_file, store=lambda data: None),
        h.refresher("https://pki.example/issuing.crl", sub_file),
        h.refresher("https://mirror.example/issuing.crl", mirror_file),
    ])
    assert crls.local() == [0] and crls.fetched() == [1, 2]
    assert crls.crls() == [] and crls.encoded() == b""
    assert len(crls.missing()) == 3

    [result] = crls.refresh(NOW, crls.local())  # the file it starts from is the file it reads
    assert result.status == "unchanged" and result.crl == h.load(root_file.read_bytes())
    assert crls.missing() == ["https://pki.example/issuing.crl", "https://mirror.example/issuing.crl"]
    older, newer = h.crl(h.sub, 2), h.crl(h.sub, 1)
    assert crls.accept(1, newer, NOW).status == "updated"
    assert crls.accept(2, older, NOW).status == "updated"  # the mirror lags behind
    # one CRL per CA, the newest: the mirror's older CRL must not hide what the newer one revokes
    assert [c.issuer.rfc4514_string() for c in crls.crls()] == ["CN=Set Root", "CN=issuing"]
    assert crls.crls()[1] == h.load(newer)
    assert split_crl_set(crls.encoded()) == [root_file.read_bytes(), newer]
    assert crls.missing() == []


def test_of_two_crls_of_one_second_the_set_hands_on_the_later_number(h: Hierarchy, tmp_path: Path) -> None:
    """A mirror lagging one CRL behind, both CRLs signed within one second (thisUpdate has whole seconds):
    the CRL number says which is newer, and the set hands on the one that revokes, whatever the sources' order."""
    h.sub.issue_client("zed", None, PASSWORD_BYTES)
    before = h.sub.write_crl().public_bytes(DER)
    after = h.sub.revoke("zed").public_bytes(DER)
    assert h.load(before).last_update_utc == h.load(after).last_update_utc
    crls = CrlSet([
        h.refresher("https://mirror.example/issuing.crl", tmp_path / "mirror.crl"),
        h.refresher("https://pki.example/issuing.crl", tmp_path / "issuing.crl"),
    ])
    assert crls.accept(0, before, NOW).status == "updated" and crls.accept(1, after, NOW).status == "updated"
    assert crls.crls() == [h.load(after)]
    # and the source that has the newer one does not go back to the older
    result = crls.accept(1, before, NOW)
    assert result.status == "failed" and "an older CRL could un-revoke keys" in result.message
    assert crls.crls() == [h.load(after)]


def test_the_fetcher_never_reads_the_operators_file(h: Hierarchy, tmp_path: Path) -> None:
    """read_existing=False: the unprivileged fetcher starts from nothing (or what the monitor seeds),
    not from crlFile, which may be readable by root alone."""
    crl_file = tmp_path / "issuing.crl"
    crl_file.write_bytes(h.crl(h.sub, 1))
    missing_source = str(tmp_path / "nowhere.crl")
    assert h.refresher(missing_source, crl_file).refresh(NOW).crl is not None  # the monitor's: reads it
    result = h.refresher(missing_source, crl_file, read_existing=False).refresh(NOW)
    assert result.status == "failed" and result.crl is None


def test_two_crls_of_which_neither_is_newer_are_both_handed_on(h: Hierarchy, tmp_path: Path) -> None:
    """Two mirrors of the intermediate, one second, no CRL number, each revoking what the other does not:
    the set hands on both (the verifier then checks both), in the sources' order."""
    issued = NOW - dt.timedelta(hours=1)
    one, two = (unnumbered_crl(h.sub, serial, issued=issued).public_bytes(DER) for serial in (0x51, 0x52))
    crls = CrlSet([h.refresher("https://a.example/issuing.crl", tmp_path / "a.crl"),
                   h.refresher("https://b.example/issuing.crl", tmp_path / "b.crl")])
    assert crls.accept(0, one, NOW).status == "updated" and crls.accept(1, two, NOW).status == "updated"
    assert crls.crls() == [h.load(one), h.load(two)]
    assert split_crl_set(crls.encoded()) == [one, two]
