"""Fuzzing the worker's entry, ``KnockVerifier.check``: see docs/fuzzing.md."""
