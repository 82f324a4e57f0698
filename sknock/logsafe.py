"""Text from the wire or from a certificate, made safe to put in a log line or an error message.

A knock's certificate subject, issuer names, the port text of its authorization extension, and the
messages of exceptions that quote them are chosen by whoever sent the datagram.  Written as they are,
a newline in a subject forges a whole log line (``... granted tcp/22 to ...``), a terminal escape
rewrites what an operator sees, and a long name floods the log.  :func:`log_safe` is the one function
that turns such a value into one bounded line of printable text; every message that carries such a
field passes it through here (``KnockRefused`` and ``CertificateError`` do it for their texts).

Escapes: ``\\xNN`` for a non-printable character below U+0100 (newline, carriage return, tab, ESC,
DEL, C1 controls), ``\\uNNNN`` and ``\\UNNNNNNNN`` above (line and paragraph separators, bidi
overrides, unassigned code points).  A backslash stays as it is, so RFC 4514 escapes read as usual
and escaping twice changes nothing (the output is printable): the escapes keep lines whole, they are
not meant to be reversed.  Longer output is cut and ends with ``...``.
"""

from __future__ import annotations

__all__ = ["log_safe", "DEFAULT_LIMIT"]

#: Characters of output at most, by default: a subject of a real client fits with room to spare.
DEFAULT_LIMIT = 200
_ELLIPSIS = "..."


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def log_safe(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as one line of printable text of at most ``limit`` characters (at least 8).

    ``value`` is usually a ``str``; ``bytes`` are shown with printable ASCII as is and every other
    byte as ``\\xNN``; anything else goes through ``str()`` first.  Cheap when there is nothing to
    do: a printable string within the limit is returned as it is.
    """
    limit = max(limit, 8)
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("ascii", "backslashreplace")
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    if len(text) <= limit and text.isprintable():
        return text
    out: list[str] = []
    size = 0
    for char in text:
        piece = char if char.isprintable() else _escape(char)
        out.append(piece)
        size += len(piece)
        if size > limit:  # too long: cut whole pieces (never half an escape) to make room for "..."
            while size > limit - len(_ELLIPSIS):
                size -= len(out.pop())
            out.append(_ELLIPSIS)
            break
    return "".join(out)
