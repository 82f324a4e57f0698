"""Tests for sknock.server.crl_refresh against a real HTTP server on 127.0.0.1 and real CRLs.

The CRLs are made and signed here with cryptography (a throwaway CA key); ``verify`` parses the
DER and checks the signature against that CA's public key, as sknock.trust.load_crl does.
"""

from __future__ import annotations

import http.server
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import schedule
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sknock.server.crl_refresh import MAX_CRL_BYTES, CrlRefresher, RefreshResult, schedule_refresh

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
ISSUER = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sknock test CA")])


# -- a CA and its CRLs ----------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_crl(
    key: ec.EllipticCurvePrivateKey,
    *,
    issued: datetime = T0,
    valid_for: timedelta = timedelta(days=7),
    revoked: tuple[int, ...] = (),
    number: int | None = None,
) -> bytes:
    builder = x509.CertificateRevocationListBuilder().issuer_name(ISSUER).last_update(issued)
    builder = builder.next_update(issued + valid_for)
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def verifier(ca_key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], object]:
    public = ca_key.public_key()

    def verify(data: bytes) -> x509.CertificateRevocationList:
        crl = x509.load_der_x509_crl(data)  # ValueError on garbage
        if not crl.is_signature_valid(public):
            raise ValueError("CRL signature does not verify against the CA key")
        return crl

    return verify


def revoked_serials(result: RefreshResult) -> set[int]:
    assert isinstance(result.crl, x509.CertificateRevocationList)
    return {entry.serial_number for entry in result.crl}


# -- a real HTTP server on loopback ---------------------------------------------------------------


@dataclass
class CrlServer:
    """Serves ``body`` at any path; honours If-None-Match against ``etag``; counts what it sees."""

    body: bytes = b""
    etag: str | None = None
    last_modified: str | None = None
    date: str | None = None  # the Date header; None: the real time, as http.server sends it
    status: int = 200
    send_length: bool = True
    claimed_length: int | None = None
    requests: int = 0
    not_modified: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    httpd: http.server.ThreadingHTTPServer | None = None

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                state.requests += 1
                state.seen.append(dict(self.headers.items()))
                if (state.etag is not None and self.headers.get("If-None-Match") == state.etag) or (
                    state.last_modified is not None and self.headers.get("If-Modified-Since") == state.last_modified
                ):
                    state.not_modified += 1
                    self.send_response(304)
                    self.end_headers()
                    return
                if state.date is None:
                    self.send_response(state.status)
                else:
                    self.send_response_only(state.status)
                    self.send_header("Date", state.date)
                if state.etag is not None:
                    self.send_header("ETag", state.etag)
                if state.last_modified is not None:
                    self.send_header("Last-Modified", state.last_modified)
                if state.claimed_length is not None:
                    self.send_header("Content-Length", str(state.claimed_length))
                elif state.send_length:
                    self.send_header("Content-Length", str(len(state.body)))
                self.end_headers()
                self.wfile.write(state.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@pytest.fixture()
def server() -> Iterator[CrlServer]:
    state = CrlServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.httpd = httpd
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/ca/crl.der"
    try:
        yield state
    finally:
        state.stop()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def ca_key() -> ec.EllipticCurvePrivateKey:
    return new_key()


def refresher_for(source: str, folder: Path, ca_key: ec.EllipticCurvePrivateKey, **kwargs: object) -> CrlRefresher:
    return CrlRefresher(source, folder / "crl.der", verifier(ca_key), timeout=5.0, **kwargs)  # type: ignore[arg-type]


# -- HTTP -----------------------------------------------------------------------------------------


def test_200_then_304(server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    crl = make_crl(ca_key, revoked=(7,))
    server.body, server.etag = crl, '"v1"'
    refresher = refresher_for(server.url, tmp_path, ca_key)

    first = refresher.refresh(NOW)
    assert first.status == "updated" and not first.stale
    assert revoked_serials(first) == {7}
    assert (tmp_path / "crl.der").read_bytes() == crl
    assert stat.S_IMODE((tmp_path / "crl.der").stat().st_mode) == 0o644
    assert "If-None-Match" not in server.seen[0]

    second = refresher.refresh(NOW)
    assert second.status == "unchanged"
    assert server.requests == 2 and server.not_modified == 1
    assert server.seen[1]["If-None-Match"] == '"v1"'
    assert second.crl is first.crl


def test_new_crl_replaces_the_old(server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    server.body, server.etag = make_crl(ca_key), '"v1"'
    refresher = refresher_for(server.url, tmp_path, ca_key)
    assert refresher.refresh(NOW).status == "updated"

    newer = make_crl(ca_key, issued=T0 + timedelta(minutes=30), revoked=(42,))
    server.body, server.etag = newer, '"v2"'
    result = refresher.refresh(NOW)
    assert result.status == "updated"
    assert revoked_serials(result) == {42}
    assert (tmp_path / "crl.der").read_bytes() == newer
    assert refresher.current is result.crl


def test_if_modified_since_when_there_is_no_etag(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    server.body, server.last_modified = make_crl(ca_key), "Sun, 01 Mar 2026 12:00:00 GMT"
    refresher = refresher_for(server.url, tmp_path, ca_key)
    refresher.refresh(NOW)
    result = refresher.refresh(NOW)
    assert server.seen[1]["If-Modified-Since"] == "Sun, 01 Mar 2026 12:00:00 GMT"
    assert result.status == "unchanged"  # same bytes again: nothing rewritten


def test_a_last_modified_of_the_second_it_was_served_is_not_sent_back(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    """Last-Modified has whole seconds: the CA's web server hands out its CRL in the second the CRL was written,
    then the CA revokes someone and writes the new CRL within that second.  Had the fetcher sent that
    Last-Modified back, the server would answer 304 until the next CRL and hide the revocation."""
    second = "Thu, 03 Dec 2026 12:00:00 GMT"
    server.body, server.last_modified, server.date = make_crl(ca_key, number=1), second, second
    refresher = refresher_for(server.url, tmp_path, ca_key)
    assert refresher.refresh(NOW).status == "updated"

    server.body = make_crl(ca_key, issued=T0 + timedelta(minutes=1), number=2, revoked=(9,))  # same Last-Modified
    result = refresher.refresh(NOW)
    assert "If-Modified-Since" not in server.seen[1] and server.not_modified == 0
    assert result.status == "updated" and revoked_serials(result) == {9}

    # served a minute after it was written: settled, so the next poll is conditional again (and costs a 304)
    server.date = "Thu, 03 Dec 2026 12:01:00 GMT"
    server.body = make_crl(ca_key, issued=T0 + timedelta(minutes=2), number=3, revoked=(9,))
    assert refresher.refresh(NOW).status == "updated"
    assert refresher.refresh(NOW).status == "unchanged"
    assert server.seen[3]["If-Modified-Since"] == second and server.not_modified == 1


@pytest.mark.parametrize("date", [None, "not a date", "Thu, 03 Dec 2026 12:00:00"], ids=["empty", "garbage", "no-zone"])
def test_a_last_modified_without_a_usable_date_is_not_sent_back(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, date: str | None
) -> None:
    server.body, server.last_modified = make_crl(ca_key), "Sun, 01 Mar 2026 12:00:00 GMT"
    server.date = date if date is not None else ""
    refresher = refresher_for(server.url, tmp_path, ca_key)
    refresher.refresh(NOW)
    assert refresher.refresh(NOW).status == "unchanged"  # the same bytes, fetched in full
    assert "If-Modified-Since" not in server.seen[1] and server.not_modified == 0


@pytest.mark.parametrize("kind", ["garbage", "other-ca", "truncated"])
def test_bad_crl_is_refused_and_the_old_file_kept(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, kind: str
) -> None:
    good = make_crl(ca_key, revoked=(1,))
    server.body, server.etag = good, '"v1"'
    refresher = refresher_for(server.url, tmp_path, ca_key)
    assert refresher.refresh(NOW).status == "updated"

    bad = {
        "garbage": b"this is not a CRL at all",
        "other-ca": make_crl(new_key(), issued=T0 + timedelta(hours=1)),
        "truncated": make_crl(ca_key, issued=T0 + timedelta(hours=1))[:-20],
    }[kind]
    server.body, server.etag = bad, '"v2"'
    result = refresher.refresh(NOW)
    assert result.status == "failed"
    assert "refused CRL" in result.message and "keeping the last good CRL" in result.message
    assert revoked_serials(result) == {1}
    assert (tmp_path / "crl.der").read_bytes() == good
    assert os.listdir(tmp_path) == ["crl.der"]


def test_older_crl_is_refused(server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    """A properly signed but older CRL (a stale mirror) must not un-revoke a key."""
    current = make_crl(ca_key, issued=T0, revoked=(9,))
    server.body, server.etag = current, '"v2"'
    refresher = refresher_for(server.url, tmp_path, ca_key)
    assert refresher.refresh(NOW).status == "updated"

    server.body, server.etag = make_crl(ca_key, issued=T0 - timedelta(days=1)), '"v1"'
    result = refresher.refresh(NOW)
    assert result.status == "failed" and "older CRL" in result.message
    assert revoked_serials(result) == {9}
    assert (tmp_path / "crl.der").read_bytes() == current


# -- which CRL is newer: thisUpdate has whole seconds, so two CRLs of one second need the CRL number --------


def accepted(ca_key: ec.EllipticCurvePrivateKey, tmp_path: Path, held: bytes, offered: bytes) -> RefreshResult:
    """``offered`` after ``held`` from one source, decided without the network (accept is the decision)."""
    refresher = refresher_for("http://pki.example/crl.der", tmp_path, ca_key)
    assert refresher.accept(held, NOW).status == "updated"
    return refresher.accept(offered, NOW)


@pytest.mark.parametrize(
    "issued, number", [(T0, 1), (T0 - timedelta(hours=1), 3)], ids=["same-second-lower-number", "number-says-newer"]
)
def test_an_older_crl_of_the_same_second_is_refused_by_its_number(
    tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, issued: datetime, number: int
) -> None:
    """What made the end-to-end test flaky: the CA signed its first CRL and, within the same second, the one
    that revokes carol; the first, published again, had the same thisUpdate and was taken, un-revoking her.
    Older by either its number or its thisUpdate is older (a higher number issued earlier is refused too)."""
    before = make_crl(ca_key, issued=issued, number=number)
    after = make_crl(ca_key, issued=T0, number=2, revoked=(9,))
    result = accepted(ca_key, tmp_path, after, before)
    assert result.status == "failed"
    assert f"CRL number {number} issued {issued.isoformat()}" in result.message
    assert f"(CRL number 2 issued {T0.isoformat()})" in result.message
    assert "an older CRL could un-revoke keys; keeping the last good CRL" in result.message
    assert revoked_serials(result) == {9}
    assert (tmp_path / "crl.der").read_bytes() == after


def test_a_newer_number_of_the_same_second_is_taken_even_if_it_lists_less(
    tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    """The CA's signed CRL number says it is newer (an expired certificate may leave the CRL)."""
    result = accepted(ca_key, tmp_path, make_crl(ca_key, number=1, revoked=(9,)), make_crl(ca_key, number=2))
    assert result.status == "updated" and revoked_serials(result) == set()


@pytest.mark.parametrize(
    "held, offered",
    [
        ({"issued": T0}, {"issued": T0}),  # no CRL numbers, one second
        ({"issued": T0, "number": 3}, {"issued": T0, "number": 3}),  # one number signed twice
        ({"issued": T0}, {"issued": T0, "number": 4}),  # only one of them numbered
    ],
    ids=["unnumbered", "same-number", "half-numbered"],
)
def test_when_newer_cannot_be_told_no_revocation_is_dropped(
    tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, held: dict[str, object], offered: dict[str, object]
) -> None:
    """Fail closed: a CRL that cannot be told newer replaces the one in hand only if it revokes all it does."""
    current = make_crl(ca_key, revoked=(9, 10), **held)  # type: ignore[arg-type]
    result = accepted(ca_key, tmp_path, current, make_crl(ca_key, revoked=(10, 11), **offered))  # type: ignore[arg-type]
    assert result.status == "failed", result.message
    assert "cannot be told" in result.message and "leaves out 1 certificate" in result.message
    assert "an older CRL could un-revoke keys" in result.message
    assert revoked_serials(result) == {9, 10}
    assert (tmp_path / "crl.der").read_bytes() == current

    more = make_crl(ca_key, revoked=(9, 10, 11), **offered)  # type: ignore[arg-type]
    (tmp_path / "more").mkdir()
    result = accepted(ca_key, tmp_path / "more", current, more)
    assert result.status == "updated" and revoked_serials(result) == {9, 10, 11}


def test_server_down_keeps_the_last_good(server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    good = make_crl(ca_key, revoked=(3,))
    server.body, server.etag = good, '"v1"'
    refresher = refresher_for(server.url, tmp_path, ca_key)
    assert refresher.refresh(NOW).status == "updated"

    server.stop()
    result = refresher.refresh(NOW)
    assert result.status == "failed"
    assert "cannot fetch CRL" in result.message and "keeping the last good CRL" in result.message
    assert revoked_serials(result) == {3}
    assert (tmp_path / "crl.der").read_bytes() == good


def test_server_down_at_startup_uses_the_file_on_disk(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    (tmp_path / "crl.der").write_bytes(make_crl(ca_key, revoked=(5,)))
    server.stop()
    result = refresher_for(server.url, tmp_path, ca_key).refresh(NOW)
    assert result.status == "failed" and "keeping the last good CRL" in result.message
    assert revoked_serials(result) == {5}


def test_garbage_file_on_disk_is_not_adopted(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "crl.der").write_bytes(b"junk")
    server.stop()
    with caplog.at_level(logging.WARNING, logger="sknock.crl"):
        result = refresher_for(server.url, tmp_path, ca_key).refresh(NOW)
    assert result.status == "failed" and result.crl is None
    assert "there is no good CRL yet" in result.message
    assert any("refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_fail_softly(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, status: int
) -> None:
    server.body, server.status = b"nope", status
    result = refresher_for(server.url, tmp_path, ca_key).refresh(NOW)
    assert result.status == "failed" and f"HTTP {status}" in result.message
    assert not (tmp_path / "crl.der").exists()


def test_unsolicited_304_is_a_failure(server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    server.status = 304
    result = refresher_for(server.url, tmp_path, ca_key).refresh(NOW)
    assert result.status == "failed" and "no conditional request" in result.message


def test_oversize_refused_by_content_length(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    server.body, server.claimed_length = b"x" * 10, 1 << 30
    result = refresher_for(server.url, tmp_path, ca_key).refresh(NOW)
    assert result.status == "failed" and "limit" in result.message


def test_oversize_refused_while_reading(server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    crl = make_crl(ca_key, revoked=tuple(range(1, 200)))
    server.body, server.send_length = crl, False  # close-delimited body: no length to check up front
    result = refresher_for(server.url, tmp_path, ca_key, max_bytes=len(crl) - 1).refresh(NOW)
    assert result.status == "failed" and "limit" in result.message
    assert not (tmp_path / "crl.der").exists()
    # the same CRL within the cap is fine, close-delimited or not
    assert refresher_for(server.url, tmp_path, ca_key, max_bytes=len(crl)).refresh(NOW).status == "updated"


def test_default_cap_is_16_mib() -> None:
    assert MAX_CRL_BYTES == 16 * 1024 * 1024


def test_caller_session_is_used_and_left_open(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    server.body = make_crl(ca_key)
    with requests.Session() as session:
        session.headers["User-Agent"] = "sknock-test-agent"
        refresher = refresher_for(server.url, tmp_path, ca_key, session=session)
        assert refresher.refresh(NOW).status == "updated"
        refresher.close()
        assert server.seen[0]["User-Agent"] == "sknock-test-agent"
        assert session.get(server.url, timeout=5).status_code == 200


# -- local path -----------------------------------------------------------------------------------


def test_local_path_source(tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    crl = make_crl(ca_key, revoked=(11,))
    (mirror / "crl.der").write_bytes(crl)
    refresher = refresher_for(str(mirror / "crl.der"), store, ca_key)

    assert refresher.refresh(NOW).status == "updated"
    assert (store / "crl.der").read_bytes() == crl
    assert refresher.refresh(NOW).status == "unchanged"

    (mirror / "crl.der").write_bytes(b"garbage")
    result = refresher.refresh(NOW)
    assert result.status == "failed" and revoked_serials(result) == {11}
    assert (store / "crl.der").read_bytes() == crl

    (mirror / "crl.der").unlink()
    result = refresher.refresh(NOW)
    assert result.status == "failed" and "cannot fetch" in result.message
    assert (store / "crl.der").read_bytes() == crl


def test_local_path_oversize(tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    (tmp_path / "big.der").write_bytes(b"\x30" * 1000)
    result = refresher_for(str(tmp_path / "big.der"), tmp_path, ca_key, max_bytes=999).refresh(NOW)
    assert result.status == "failed" and "limit" in result.message


# -- atomic write ---------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_files(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    refresher = refresher_for(server.url, tmp_path, ca_key)
    for minute, body in enumerate([make_crl(ca_key, issued=T0 + timedelta(minutes=m)) for m in range(3)] + [b"bad"]):
        server.body, server.etag = body, f'"v{minute}"'
        refresher.refresh(NOW)
    assert os.listdir(tmp_path) == ["crl.der"]


def test_write_failure_cleans_up_and_keeps_the_verified_crl(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    (tmp_path / "crl.der").mkdir()  # os.replace onto a folder fails after the temp file is written
    server.body, server.etag = make_crl(ca_key, revoked=(4,)), '"v1"'
    refresher = refresher_for(server.url, tmp_path, ca_key)
    result = refresher.refresh(NOW)
    assert result.status == "failed" and "cannot write" in result.message
    assert revoked_serials(result) == {4}, "a verified newer CRL is used even when it cannot be stored"
    assert os.listdir(tmp_path) == ["crl.der"] and (tmp_path / "crl.der").is_dir()
    # the validators were not kept, so the next refresh fetches the body again (not a 304)
    refresher.refresh(NOW)
    assert "If-None-Match" not in server.seen[1] and server.not_modified == 0


# -- staleness ------------------------------------------------------------------------------------


def test_stale_crl_is_flagged_loudly(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    server.body, server.etag = make_crl(ca_key, valid_for=timedelta(days=1)), '"v1"'
    refresher = refresher_for(server.url, tmp_path, ca_key)
    assert refresher.refresh(T0 + timedelta(hours=23)).stale is False

    with caplog.at_level(logging.WARNING, logger="sknock.crl"):
        result = refresher.refresh(T0 + timedelta(days=2))
    assert result.status == "unchanged" and result.stale is True
    assert "STALE" in result.message
    assert any(r.levelno == logging.WARNING and "nextUpdate" in r.getMessage() for r in caplog.records)


def test_stale_when_the_server_is_down_too(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    server.body = make_crl(ca_key, valid_for=timedelta(days=1))
    refresher = refresher_for(server.url, tmp_path, ca_key)
    refresher.refresh(NOW)
    server.stop()
    result = refresher.refresh(T0 + timedelta(days=3))
    assert result.status == "failed" and result.stale is True and result.crl is not None


def test_naive_now_is_a_programming_error(tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        refresher_for(str(tmp_path / "x"), tmp_path, ca_key).refresh(datetime(2026, 1, 1))


@pytest.mark.parametrize("source", ["", "ftp://example.org/crl"])
def test_bad_source_rejected_at_construction(tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, source: str) -> None:
    with pytest.raises(ValueError):
        refresher_for(source, tmp_path, ca_key)


# -- scheduling -----------------------------------------------------------------------------------


def test_schedule_refresh_runs_on_a_private_scheduler(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    server.body, server.etag = make_crl(ca_key), '"v1"'
    scheduler = schedule.Scheduler()
    job = schedule_refresh(refresher_for(server.url, tmp_path, ca_key), 30, scheduler, lambda: NOW)
    assert job.interval == 30 and job.unit == "minutes"
    assert scheduler.jobs == [job] and job not in schedule.jobs
    scheduler.run_all()
    assert server.requests == 1 and (tmp_path / "crl.der").exists()
    scheduler.run_all()
    assert server.requests == 2 and server.not_modified == 1


def test_scheduled_job_survives_a_crash(tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
    scheduler = schedule.Scheduler()

    def broken_clock() -> datetime:
        raise RuntimeError("clock exploded")

    schedule_refresh(refresher_for(str(tmp_path / "x"), tmp_path, ca_key), 1, scheduler, broken_clock)
    scheduler.run_all()  # logged, not raised
    assert len(scheduler.jobs) == 1


def test_each_result_reaches_on_result_and_its_crash_is_logged(
    server: CrlServer, tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    server.body, server.etag = make_crl(ca_key), '"v1"'
    scheduler = schedule.Scheduler()
    results: list[RefreshResult] = []
    job = schedule_refresh(refresher_for(server.url, tmp_path, ca_key), 30, scheduler, lambda: NOW, results.append)
    job.run()  # what the daemon does at start and on SIGHUP
    assert [r.status for r in results] == ["updated"] and results[0].crl is not None

    def broken(result: RefreshResult) -> None:
        raise RuntimeError("adopting the CRL exploded")

    crashing = schedule_refresh(refresher_for(server.url, tmp_path, ca_key), 30, schedule.Scheduler(), lambda: NOW,
                                broken)
    crashing.run()  # logged, not raised: the worker keeps serving with its last good CRL


@pytest.mark.parametrize("minutes", [0, -5, True, 1.5])
def test_schedule_refresh_rejects_bad_intervals(
    tmp_path: Path, ca_key: ec.EllipticCurvePrivateKey, minutes: object
) -> None:
    with pytest.raises(ValueError):
        schedule_refresh(
            refresher_for(str(tmp_path / "x"), tmp_path, ca_key),
            minutes,  # type: ignore[arg-type]
            schedule.Scheduler(),
            lambda: NOW,
        )
