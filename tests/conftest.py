"""Shared fixtures.  ``pki``: one real test PKI per session (see tests/pki.py for its attributes)."""

from __future__ import annotations

import pytest

from tests.pki import TestPKI, build_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return build_pki(tmp_path_factory.mktemp("pki"))
