"""Where the log goes and how it looks (sknock.server.logs): the journal's priority prefixes when stderr is
the stream $JOURNAL_STREAM names, the JSON format with structured fields (escaped like the plain format),
the plain format unchanged by those fields, logFile reopened after a rename, and a forked child's lines
relayed through the pipe into the file."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sknock.logsafe import log_safe
from sknock.server.config import LogFormat, load_config
from sknock.server.logs import JsonFormatter, setup_logging, under_journal

log = logging.getLogger("sknock.test")


@pytest.fixture(autouse=True)
def _restore_sknock_logging() -> Iterator[None]:
    root = logging.getLogger("sknock")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _config(tmp_path: Path, **options: str) -> Any:
    path = tmp_path / "config.ini"
    values = {"serverPFXFile": "server.pfx", "PFXPasswd": "x", "revocation": "none", **options}
    path.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return load_config(path, check_files=False)


def _journal_env(stream: Any) -> dict[str, str]:
    info = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        assert under_journal(a, _journal_env(a))
        assert not under_journal(a, _journal_env(b))  # stderr redirected elsewhere under systemd
        assert not under_journal(a, {})
        assert not under_journal(a, {"JOURNAL_STREAM": "garbage"})


def test_under_the_journal_lines_carry_their_priority_and_no_timestamp(tmp_path: Path) -> None:
    out = tmp_path / "journal"
    with out.open("w") as stream:
        output = setup_logging(_config(tmp_path, logLevel="DEBUG"), stream=stream, environ=_journal_env(stream))
        assert output.destination == "journal"
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert lines[1] == f"<6>sknock[{os.getpid()}] INFO sknock.test: i"  # no date: journald keeps the time


def test_json_lines_under_the_journal_carry_the_priority_too(tmp_path: Path) -> None:
    out = tmp_path / "journal"
    with out.open("w") as stream:
        setup_logging(_config(tmp_path, logFormat="json"), stream=stream, environ=_journal_env(stream))
        log.warning("w", extra={"event": "refusal", "reason": "replay"})
    line = out.read_text().strip()
    assert line.startswith("<4>{")
    record = json.loads(line[3:])
    assert "time" not in record and record["event"] == "refusal" and record["reason"] == "replay"


def test_plain_format_is_unchanged_by_structured_fields(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    with out.open("w") as stream:
        setup_logging(_config(tmp_path), stream=stream, environ={})
        log.info("granted %s to %s", "tcp/22", "198.18.0.2 (CN=alice)",
                 extra={"event": "grant", "source": "198.18.0.2", "subject": "CN=alice", "serial": 7})
    line = out.read_text().strip()
    assert line.endswith(f" sknock[{os.getpid()}] INFO sknock.test: granted tcp/22 to 198.18.0.2 (CN=alice)")
    assert line[:4].isdigit()  # the plain format keeps its timestamp


def test_json_has_the_fields_a_siem_needs(tmp_path: Path) -> None:
    out = tmp_path / "json.log"
    setup_logging(_config(tmp_path, logFile=str(out), logFormat="json"))
    log.info("granted", extra={"event": "grant", "source": "198.18.0.2", "subject": "CN=alice", "serial": 7,
                               "ports": ["tcp/22"], "duration": 15.0})
    log.info("refused", extra={"event": "refusal", "source": "198.18.0.3", "reason": "cert-revoked"})
    log.info("a plain message")
    first, second, third = (json.loads(line) for line in out.read_text().splitlines())
    assert first["level"] == "INFO" and first["time"].endswith("+00:00") and first["pid"] == os.getpid()
    assert {k: first[k] for k in ("event", "source", "subject", "serial", "ports", "duration")} == {
        "event": "grant", "source": "198.18.0.2", "subject": "CN=alice", "serial": 7, "ports": ["tcp/22"],
        "duration": 15.0}
    assert second["reason"] == "cert-revoked" and "subject" not in second
    assert third["event"] == "message" and third["message"] == "a plain message"


@given(st.text(max_size=300))
def test_json_fields_from_the_wire_stay_escaped_one_line(subject: str) -> None:
    record = logging.LogRecord("sknock.monitor", logging.INFO, __file__, 1, "granted %s", (subject,), None)
    record.subject = subject
    record.grants = [{"subject": subject, "serial": 1}]
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii()
    decoded = json.loads(line)
    assert decoded["subject"] == log_safe(subject)
    assert decoded["grants"][0]["subject"] == log_safe(subject)
    assert decoded["message"].isprintable()


def test_log_format_option_parses(tmp_path: Path) -> None:
    assert _config(tmp_path).log_format is LogFormat.PLAIN
    assert _config(tmp_path, logFormat="JSON").log_format is LogFormat.JSON


def test_log_file_is_reopened_after_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "sknock.log"
    output = setup_logging(_config(tmp_path, logFile=str(path)))
    log.info("before")
    path.rename(tmp_path / "sknock.log.1")
    log.info("still the old file")
    output.reopen()
    log.info("after")
    assert "before" in (tmp_path / "sknock.log.1").read_text()
    assert "still the old file" in (tmp_path / "sknock.log.1").read_text()
    assert path.read_text().count("\n") == 1 and "after" in path.read_text()


def test_a_childs_lines_go_through_the_monitor_into_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "sknock.log"
    output = setup_logging(_config(tmp_path, logFile=str(path)))
    assert output.start_relay()
    pid = os.fork()
    if pid == 0:  # the child: what daemon._spawner does first
        code = 0
        try:
            output.in_child()
            logging.getLogger("sknock.worker").info("refused knock from 198.18.0.9: replay")
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    path.rename(tmp_path / "sknock.log.1")
    output.reopen()  # SIGHUP after logrotate: the child's line, still in the pipe, lands in the new file
    assert output.pump() > 0
    assert f"sknock[{pid}] INFO sknock.worker: refused knock from 198.18.0.9: replay" in path.read_text()


def test_under_the_journal_unprefixed_stderr_lines_become_errors(tmp_path: Path) -> None:
    import sys

    from sknock.server.logs import PriorityStream, journal_stderr

    out = tmp_path / "journal"
    saved = sys.stderr
    with out.open("w") as stream:
        sys.stderr = stream
        try:
            assert not journal_stderr({})  # not the journal: left alone
            assert journal_stderr(_journal_env(stream))
            assert isinstance(sys.stderr, PriorityStream)
            assert not journal_stderr(_journal_env(stream))  # once
            setup_logging(_config(tmp_path), environ=_journal_env(stream))
            print("sknock-server: must run as root", file=sys.stderr)
            log.info("granted")
            sys.stderr.write("Traceback (most recent call last):\n  File ")
            sys.stderr.write("x\n")
            sys.stderr.flush()
        finally:
            sys.stderr = saved
    assert out.read_text().splitlines() == [
        "<3>sknock-server: must run as root", f"<6>sknock[{os.getpid()}] INFO sknock.test: granted",
        "<3>Traceback (most recent call last):", "<3>  File x"]
