"""The CRL options: one crlFile/crlUrl as in the original, comma lists paired by position for a CRL per
CA, and ``revocation = none`` only when asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from sknock.errors import ConfigError
from sknock.server.config import MAX_CRL_SOURCES, CrlSource, Revocation, ServerConfig, load_config


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    (tmp_path / "certs").mkdir()
    for name in ("server.pfx", "root.crl", "issuing.crl"):
        (tmp_path / "certs" / name).write_bytes(b"bytes")
    return tmp_path


BASE = "[DEFAULT]\nserverPFXFile = certs/server.pfx\nPFXPasswd = x\nuser = nobody\n"


def load(site: Path, body: str, **kw: object) -> ServerConfig:
    path = site / "sknock.ini"
    path.write_text(BASE + body)
    return load_config(path, **kw)  # type: ignore[arg-type]


def error_of(site: Path, body: str, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(site, body, **kw)
    message = str(info.value)
    assert message.startswith(f"{site / 'sknock.ini'}: ") and "\n" not in message
    return message


def test_one_crl_file_means_what_it_meant(site: Path) -> None:
    cfg = load(site, "crlFile = certs/root.crl\n")
    assert cfg.revocation is Revocation.CRL
    assert cfg.crl_sources == (CrlSource(site / "certs" / "root.crl", None),)
    assert cfg.crl_file == site / "certs" / "root.crl" and cfg.crl_url is None
    cfg = load(site, "crlFile = certs/root.crl\ncrlUrl = https://pki.example/root.crl\n")
    assert cfg.crl_sources == (CrlSource(site / "certs" / "root.crl", "https://pki.example/root.crl"),)
    assert cfg.crl_url == "https://pki.example/root.crl"
    assert "revocation = crl" in cfg.describe()
    assert not any("revocation" in n for n in cfg.notices)


def test_a_crl_per_ca_paired_by_position(site: Path) -> None:
    cfg = load(site, "crlFile = certs/root.crl, certs/issuing.crl\ncrlUrl = , https://pki.example/issuing.crl\n")
    assert cfg.crl_sources == (
        CrlSource(site / "certs" / "root.crl", None),
        CrlSource(site / "certs" / "issuing.crl", "https://pki.example/issuing.crl"),
    )
    text = cfg.describe()
    assert f"crlFile = {site / 'certs' / 'root.crl'}, {site / 'certs' / 'issuing.crl'}" in text
    assert "crlUrl = , https://pki.example/issuing.crl" in text
    # a file fetched from a URL need not exist yet; its folder must
    (site / "certs" / "issuing.crl").unlink()
    assert load(site, "crlFile = certs/root.crl,certs/issuing.crl\ncrlUrl = ,http://127.0.0.1/i.crl\n").crl_sources
    # a local crlUrl that is its own crlFile: the file is read as it is, never rewritten
    cfg = load(site, "crlFile = certs/root.crl\ncrlUrl = ./certs/../certs/root.crl\n")
    assert cfg.crl_sources == (CrlSource(site / "certs" / "root.crl", None),)


def test_revocation_none_needs_no_crl_and_says_so_at_every_start(site: Path) -> None:
    cfg = load(site, "revocation = none\n")
    assert cfg.revocation is Revocation.NONE and cfg.crl_sources == () and cfg.crl_file is None
    assert any("revocation = none: no CRL is checked" in n for n in cfg.notices)
    assert "revocation = none" in cfg.describe()
    assert "crlFile = (not set)" in cfg.describe()


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ("", "crlFile", "is required: the CRL of each CA (or revocation = none"),
        ("revocation = none\ncrlFile = certs/root.crl\n", "crlFile", "revocation = none says no CRL is checked"),
        ("revocation = none\ncrlUrl = https://pki.example/root.crl\n", "crlUrl", "revocation = none"),
        ("revocation = off\ncrlFile = certs/root.crl\n", "revocation", "'off' is not one of crl|none"),
        ("crlFile = certs/root.crl,\n", "crlFile", "has an empty entry"),
        ("crlFile = certs/root.crl, certs/root.crl\n", "crlFile", "is named twice"),
        ("crlFile = certs/root.crl, certs/issuing.crl\ncrlUrl = https://pki.example/i.crl\n", "crlUrl",
         "1 entry but crlFile has 2: give one per crlFile, in the same order"),
        ("crlFile = certs/root.crl, certs/issuing.crl\ncrlUrl = ,\n", "crlUrl", "has only empty entries"),
        ("crlFile = certs/root.crl, certs/issuing.crl\ncrlUrl = , ftp://pki.example/i.crl\n", "crlUrl",
         "only http://, https:// or a local path"),
        ("crlFile = certs/root.crl, certs/missing.crl\n", "crlFile", "does not exist"),
        ("crlFile = certs/root.crl, nowhere/i.crl\ncrlUrl = , https://pki.example/i.crl\n", "crlFile",
         "folder"),
        ("crlFile = " + ", ".join(f"c{i}.crl" for i in range(MAX_CRL_SOURCES + 1)) + "\n", "crlFile",
         f"at most {MAX_CRL_SOURCES}"),
    ],
    ids=["none-given", "none-and-file", "none-and-url", "bad-choice", "empty-entry", "twice", "count",
         "all-empty", "scheme", "missing-file", "missing-folder", "too-many"],
)
def test_mistakes_are_one_line_naming_the_option(site: Path, body: str, key: str, problem: str) -> None:
    message = error_of(site, body)
    assert f": {key}: " in message and problem in message, message
