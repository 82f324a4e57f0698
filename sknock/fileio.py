"""Files, read and written in one place: reading a file a user names (a config, a PKCS#12, a certificate,
a password file) within a size bound, with one line naming what and where for whatever goes wrong; and
writing so that a crash never leaves half of one (the CA's keys and index, the server's CRL)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import SknockError

__all__ = ["read_bounded", "read_text", "write_atomic"]


def read_bounded(
    path: str | os.PathLike[str], *, limit: int, what: str, error: type[SknockError] = SknockError
) -> bytes:
    """The bytes of ``path``, read whole if it holds at most ``limit`` of them.

    :param what: what the file is, for the message: ``"config file"``, ``"password file"``...
    :param error: the exception to raise, with the message ``"WHAT PATH: REASON"`` (no such file, is a
        folder, permission denied, larger than LIMIT bytes, cannot read: ...).
    """
    p = Path(path)
    try:
        with p.open("rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{what} {p}: no such file") from None
    except IsADirectoryError:
        raise error(f"{what} {p}: is a folder, not a file") from None
    except PermissionError:
        raise error(f"{what} {p}: permission denied") from None
    except OSError as exc:
        raise error(f"{what} {p}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{what} {p}: larger than {limit} bytes: not a {what}")
    return data


def read_text(
    path: str | os.PathLike[str], *, limit: int, what: str, error: type[SknockError] = SknockError
) -> str:
    """:func:`read_bounded`, decoded as UTF-8 (a byte-order mark is allowed); ``error`` also when it is not
    UTF-8 (``"WHAT PATH: not UTF-8 (byte N)"``)."""
    data = read_bounded(path, limit=limit, what=what, error=error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {Path(path)}: not UTF-8 (byte {exc.start})") from None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` atomically: a temp file in the same folder with ``mode`` set before any byte is
    written (so a private key is never readable by others, even briefly), fsync, rename, fsync the folder."""
    import tempfile  # here: a client reads files but never writes one, and need not import it

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # Make the rename itself durable; a filesystem that cannot fsync folders is not an error.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
