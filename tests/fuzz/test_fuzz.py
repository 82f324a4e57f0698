"""The fuzz harness in CI: the seed corpus, hypothesis over the three generators, and a bounded atheris run.

What every input must satisfy is in tests/fuzz/world.py (``run_one``); docs/fuzzing.md says how to run
a longer campaign.  ``SKNOCK_FUZZ_SECONDS`` sets the atheris run's length (default 60; 0 skips it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sknock.verifier import Grant
from tests.fuzz.make_corpus import seeds
from tests.fuzz.world import MODES, run_one

CORPUS = Path(__file__).resolve().parent / "corpus"
REPO = Path(__file__).resolve().parents[2]

try:
    import atheris  # noqa: F401

    HAVE_ATHERIS = True
except ImportError:  # no wheel for this Python or platform: hypothesis carries the load alone
    HAVE_ATHERIS = False

FUZZ_SECONDS = int(os.environ.get("SKNOCK_FUZZ_SECONDS", "60"))


def _answer(outcome: object) -> str:
    return "granted" if isinstance(outcome, Grant) else str(outcome)


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_every_seed_gets_its_answer(name: str) -> None:
    """Each seed is named EXPECTED--what: the generators still turn it into the knock it was made as."""
    outcomes = run_one((CORPUS / name).read_bytes())
    assert _answer(outcomes[0]) == name.split("--", 1)[0], [_answer(o) for o in outcomes]


def test_the_corpus_is_what_make_corpus_writes() -> None:
    assert {p.name: p.read_bytes() for p in CORPUS.iterdir()} == seeds(), "run python -m tests.fuzz.make_corpus"


@settings(max_examples=400 if HAVE_ATHERIS else 20_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(min_value=0, max_value=MODES - 1), st.binary(max_size=1500))
def test_hypothesis_over_the_three_generators(mode: int, data: bytes) -> None:
    run_one(bytes([mode]) + data)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(p.name for p in CORPUS.iterdir())), st.integers(min_value=1, max_value=2000),
       st.binary(min_size=1, max_size=8))
def test_hypothesis_near_the_seeds(name: str, position: int, patch: bytes) -> None:
    """Seeds with a few bytes changed: random bytes alone rarely reach a certificate."""
    data = bytearray((CORPUS / name).read_bytes())
    at = position % len(data)
    data[at : at + len(patch)] = patch
    run_one(bytes(data))


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (no wheel here): hypothesis runs instead")
@pytest.mark.skipif(FUZZ_SECONDS <= 0, reason="SKNOCK_FUZZ_SECONDS=0")
def test_atheris_finds_nothing_in_a_bounded_run(tmp_path: Path) -> None:
    """libFuzzer with coverage of sknock's code, from a copy of the corpus (the checkout is not
    modified); any input that breaks an assertion of world.run_one leaves a crash file and fails."""
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    command = [
        sys.executable, "-m", "tests.fuzz.harness", f"-max_total_time={FUZZ_SECONDS}", "-max_len=2048",
        "-timeout=30", "-rss_limit_mb=3072", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(corpus),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert result.returncode == 0 and not crashes, f"{crashes}\n{result.stderr[-6000:]}"
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", result.stderr)
    assert runs is not None and int(runs.group(1)) > 1000, result.stderr[-3000:]
