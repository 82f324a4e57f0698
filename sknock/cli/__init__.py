"""Command-line entry points.  Each module holds one tool with ``main(argv=None) -> int``; they
print one clear line per error on stderr and exit 2, never a traceback, for any SknockError."""
