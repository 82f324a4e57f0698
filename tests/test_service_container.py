"""Opt-in (SKNOCK_SYSTEMD_CONTAINER=1): scripts/service_in_container.py, the unit under a real systemd in a
container booted with systemd-nspawn (about 45 s, plus a venv on Debian's Python made once)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "service_in_container.py"


@pytest.mark.skipif(os.environ.get("SKNOCK_SYSTEMD_CONTAINER") != "1", reason="opt-in: SKNOCK_SYSTEMD_CONTAINER=1")
def test_the_unit_runs_under_a_real_systemd() -> None:
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("needs root and systemd-nspawn")
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "done: 0 failure(s)" in result.stdout
