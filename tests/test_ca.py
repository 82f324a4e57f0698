"""The CA library (sknock.ca) reads the time only through its clock: a PKI issued at any fixed time."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sknock import ca as ca_lib
from sknock.ports import parse_ports
from sknock.trust import load_crl
from tests.pki import PASSWORD_BYTES

WHEN = dt.datetime(2031, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
BACKDATE = dt.timedelta(minutes=5)


def test_everything_the_ca_signs_is_dated_by_its_clock(tmp_path: Path) -> None:
    root = ca_lib.init_ca(tmp_path / "root", PASSWORD_BYTES, name="clock CA", days=10, clock=WHEN.timestamp)
    assert root.now() == WHEN
    assert root.certificate.not_valid_before_utc == WHEN - BACKDATE
    assert root.certificate.not_valid_after_utc == WHEN + dt.timedelta(days=10)
    crl = load_crl((tmp_path / "root" / "crl.der").read_bytes(), [root.certificate], source="crl")
    assert crl.last_update_utc == WHEN - BACKDATE
    client = root.issue_client("carol", parse_ports("tcp/22"), PASSWORD_BYTES, days=3)
    assert client.not_valid_before_utc == WHEN - BACKDATE
    assert client.not_valid_after_utc == WHEN + dt.timedelta(days=3)
    server = root.issue_server("gw", PASSWORD_BYTES, days=3)
    assert server.not_valid_before_utc == WHEN - BACKDATE
    sub = root.issue_intermediate("sub", PASSWORD_BYTES)  # cut to the root's end, and given the root's clock
    assert sub.certificate.not_valid_after_utc == root.certificate.not_valid_after_utc
    assert sub.clock is root.clock
    assert root.revoke("carol").last_update_utc == WHEN - BACKDATE
    assert [e.revoked_at for e in root.entries() if e.name == "carol"] == [WHEN]


def test_an_opened_ca_takes_a_clock_too(tmp_path: Path) -> None:
    ca_lib.init_ca(tmp_path / "ca", PASSWORD_BYTES, name="clock CA", clock=WHEN.timestamp)
    later = WHEN + dt.timedelta(days=2)
    opened = ca_lib.open_ca(tmp_path / "ca", PASSWORD_BYTES, clock=later.timestamp)
    assert opened.write_crl(days=1).next_update_utc == later + dt.timedelta(days=1)
