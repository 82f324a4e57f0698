"""The table of options (issue 10 §2): loading, ``describe()``, the docs tables and the shipped config.ini
all say what sknock.server.config.OPTIONS says."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sknock.server import config as module
from sknock.server.config import OPTIONS, SECTIONS, ServerConfig, doc_table, update_doc
from tests.test_config import REPO, load, site

__all__ = ["site"]  # the fixture, shared with test_config.py
DOC = REPO / "docs" / "configuration.md"
REGENERATE = "run: python -m sknock.server.config --update-doc docs/configuration.md"


# -- the docs ----------------------------------------------------------------------------------------------


def test_the_docs_tables_are_the_code_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert update_doc(text) == text, f"docs/configuration.md's options tables differ from OPTIONS; {REGENERATE}"


def test_every_option_is_in_one_docs_table_once() -> None:
    text = DOC.read_text(encoding="utf-8")
    for option in OPTIONS:
        assert text.count(f"\n| `{option.key}` |") == 1, option.key
    assert {option.section for option in OPTIONS} == set(SECTIONS)


def test_the_docs_say_each_range_and_each_choice_the_parser_takes() -> None:
    for option in OPTIONS:
        if isinstance(option.parse, module._Integer):
            assert f"{option.parse.low}..{option.parse.high}" in option.doc, option.key
        if isinstance(option.parse, module._Choice):
            for member in option.parse.kind:
                assert f"`{member.value}`" in option.doc, (option.key, member)


def test_the_doc_table_command_prints_and_rewrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert module._main(["--doc-table"]) == 0
    printed = capsys.readouterr().out
    for section in SECTIONS:
        assert f"### {section}\n\n{doc_table(section)}" in printed
    stale = tmp_path / "configuration.md"
    text = DOC.read_text(encoding="utf-8")
    stale.write_text(text.replace("| `workBits` | `12` |", "| `workBits` | `11` |"), encoding="utf-8")
    assert module._main(["--update-doc", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == text


def test_updating_the_docs_never_overwrites_prose() -> None:
    with pytest.raises(ValueError, match="### Firewall"):
        update_doc("## Options\n\n### Knock reception\n\n" + doc_table(SECTIONS[0]) + "\n### Firewall\n\nProse.\n")


# -- config.ini -----------------------------------------------------------------------------------------


def test_config_ini_lists_every_option_with_its_default() -> None:
    lines = (REPO / "config.ini").read_text(encoding="utf-8").splitlines()
    for option in OPTIONS:
        if option.default is not None:
            assert f"{option.key} = {option.default}" in lines, f"config.ini does not set {option.key} to its default"
        else:
            assert any(re.match(rf"^(# )?{option.key} = ", line) for line in lines), f"config.ini lacks {option.key}"


# -- the table and ServerConfig -----------------------------------------------------------------------------


def test_the_table_fills_every_attribute_once() -> None:
    attrs = [option.attr for option in OPTIONS if option.attr is not None]
    assert len(attrs) == len(set(attrs))
    read_together = {"source", "crl_file", "crl_url", "crl_sources", "pfx_password", "pfx_password_source", "notices",
                     "replay_store_password"}
    assert set(attrs) | read_together == {f.name for f in dataclasses.fields(ServerConfig)}
    assert not set(attrs) & read_together
    assert len({option.key for option in OPTIONS}) == len(OPTIONS)


def test_every_default_parses(tmp_path: Path) -> None:
    for option in OPTIONS:
        if option.default is not None:
            option.parse(module._Field(tmp_path / "x.ini", option.key), option.default)


def test_describe_has_a_line_for_every_option_it_can_show(site: Path) -> None:
    lines = load(site).describe().splitlines()
    keys = [line.partition(" = ")[0] for line in lines if not line.startswith("notice: ")]
    # SIGNATURE_SIZE is ignored (a notice says so); the three ways to give the password share one line
    expected = {"SIGNATURE_SIZE": [], "PFXPasswd": ["password"], "PFXPasswdFile": [], "PFXPasswdEnv": []}
    assert keys == ["config"] + [key for o in OPTIONS for key in expected.get(o.key, [o.key])]


def test_the_default_work_bits_are_the_clients_and_the_verifiers() -> None:
    """Until the protocol owns the one constant, the three places that say 12 must agree."""
    from sknock.client import DEFAULT_WORK_BITS
    from sknock.verifier import VerifierPolicy

    (work_bits,) = (option for option in OPTIONS if option.key == "workBits")
    assert work_bits.default == str(DEFAULT_WORK_BITS) == str(VerifierPolicy().min_work_bits)
