"""The atheris (libFuzzer) entry point: ``python -m tests.fuzz.harness [libFuzzer flags] CORPUS_DIR...``

Run from the repository root, for instance::

    .venv/bin/python -m tests.fuzz.harness -max_total_time=600 -max_len=2048 /tmp/corpus tests/fuzz/corpus

libFuzzer writes new inputs into the first corpus directory (so pass a copy, not tests/fuzz/corpus, to
keep the checkout clean) and a ``crash-*`` file for an input that breaks what tests/fuzz/world.py
asserts; ``python -m tests.fuzz.harness crash-FILE`` replays it.  See docs/fuzzing.md.
"""

from __future__ import annotations

import sys

import atheris

# Coverage feedback comes from sknock's Python code (cryptography's Rust is not instrumented): import it
# under instrumentation before anything else does.
with atheris.instrument_imports(include=["sknock"]):
    import sknock.certificate  # noqa: F401
    import sknock.protocol  # noqa: F401
    import sknock.trust  # noqa: F401
    import sknock.verifier  # noqa: F401

from tests.fuzz.world import run_one, world  # noqa: E402


def test_one_input(data: bytes) -> None:
    run_one(data)


def main() -> None:
    world()  # build the PKI before fuzzing starts
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
