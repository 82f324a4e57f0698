"""INI text as sknock reads it: the server's ``config.ini`` and the client's ``client.ini``.

Both are read the same way: no interpolation (a ``%`` in a password or a path is itself), keys are
case-sensitive, a key or section set twice is a mistake rather than the last one winning, and every
syntax error is one line naming the file, the section and the key or line.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from .errors import SknockError

__all__ = ["parse_ini"]


def parse_ini(
    text: str, file: Path, *, error: type[SknockError], first_header: str, default_section: str | None = None
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The keys of ``default_section`` and those of every other section of ``text``.

    :param file: names the file in messages.
    :param error: the exception raised, with one line.
    :param first_header: the section header the file must start with, for the message about a key
        before any (``"[DEFAULT]"``, ``"[SERVER]"``).
    :param default_section: the section whose keys come first in the result; None: every section is an
        ordinary one (and the defaults are empty).
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        strict=True,
        empty_lines_in_values=False,
        default_section="\x00no default section" if default_section is None else default_section,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        parser.read_string(text, source=str(file))
    except configparser.MissingSectionHeaderError as exc:
        raise error(f"{file}: line {exc.lineno}: a key before any {first_header} section") from None
    except configparser.DuplicateOptionError as exc:
        raise error(f"{file}: [{exc.section}]: {exc.option}: set twice (line {exc.lineno}); keep one") from None
    except configparser.DuplicateSectionError as exc:
        raise error(f"{file}: [{exc.section}]: appears twice (line {exc.lineno})") from None
    except configparser.Error as exc:
        raise error(f"{file}: not a valid INI file: {exc.message.splitlines()[0]}") from None
    sections = {name: {key: parser.get(name, key) for key in parser.options(name) if key not in parser.defaults()}
                for name in parser.sections()}
    return dict(parser.defaults()), sections
