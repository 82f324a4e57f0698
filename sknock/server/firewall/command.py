"""Command backend: grants made by running the admin's own commands (ufw, firewalld, a script).

For hosts whose firewall is managed by a tool sknock should not bypass.  The admin gives an open and a
close template, for instance ``ufw allow from %IP% to any port %PORT% proto %PROTO%``.

Safety, because %IP% comes from the network and the templates run as root:

* a template is split into arguments with :func:`shlex.split` once, when the backend is built;
* placeholders are replaced *inside* each argument; the result is never split again and never given
  to a shell, so a value with spaces, ``;`` or ``$()`` stays one literal argument;
* the values themselves are already validated (an :class:`Opening` holds a parsed address, a protocol
  enum and a port number), so in practice they are plain text anyway.

Placeholders: ``%IP%`` (address), ``%PROTO%`` (tcp/udp), ``%PORT%``, ``%DURATION%`` (whole seconds,
rounded up; 0 for close).  The open command is run again to extend a grant, so it must accept being
run for a grant that exists (ufw and ``nft add element`` do).  The backend applies no policy of its
own: rejecting or dropping unknocked traffic is the admin's firewall's job.  It cannot see the kernel,
so :meth:`openings` reports what it has opened and not yet closed in this process.

It holds no kernel state of its own, so nothing of its can be flushed away or added to by hand:
:meth:`intact` is always True, :meth:`held` is always empty (the monitor's check for entries no knock
granted has nothing to read here: what the commands opened lives in the admin's tool), and the monitor
never needs :meth:`restore` (which, if called, runs the open command again for each
grant with its remaining time).  Grants live in the admin's tool: if the server is killed (-9) they stay
there until that tool expires them itself -- pass ``%DURATION%`` to one that can (an nft set element
with a timeout, ``firewall-cmd --timeout``) -- or the admin removes them.  ``kernel_expiry`` is False
because sknock cannot know whether the tool does.  :meth:`setup` therefore carries nothing over: it
cannot see what an earlier run opened.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from collections.abc import Sequence

from .base import Firewall, FirewallError, FirewallPolicy, Grant, Opening, check_duration

__all__ = ["CommandFirewall", "PLACEHOLDERS", "TemplateError", "split_template"]

NAME = "command"
PLACEHOLDERS = ("%IP%", "%PROTO%", "%PORT%", "%DURATION%")
_STDERR_TAIL = 500
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
_ANY_PLACEHOLDER_RE = re.compile(r"%[A-Za-z_]+%")


class TemplateError(ValueError):
    """A command template breaks the rule of :func:`split_template`; the message says how, as a phrase
    that reads after the option's name (``template must contain %IP%``)."""


def split_template(template: str) -> tuple[str, ...]:
    """The one rule for an open or close command template, for the config loader (openCommand,
    closeCommand) and this backend alike: not empty, no placeholder but :data:`PLACEHOLDERS`, ``%IP%``
    among them (a grant names its client), split into words as a shell would (no shell runs it), and
    the program itself not a placeholder.  Returns the words.

    Raises :class:`TemplateError`, or ``ValueError`` from :func:`shlex.split` when the template cannot be
    split into words (unbalanced quotes, a trailing backslash)."""
    if not template.strip():
        raise TemplateError("template is empty")
    unknown = sorted(set(_ANY_PLACEHOLDER_RE.findall(template)) - set(PLACEHOLDERS))
    if unknown:
        raise TemplateError(f"unknown placeholder {unknown[0]}; known: {' '.join(PLACEHOLDERS)}")
    if "%IP%" not in template:
        raise TemplateError("template must contain %IP%")
    argv = tuple(shlex.split(template))
    if any(p in argv[0] for p in PLACEHOLDERS):
        raise TemplateError("the program itself cannot be a placeholder")
    return argv


def _split(template: str, which: str) -> tuple[str, ...]:
    if not isinstance(template, str):
        raise FirewallError(NAME, f"{which} command template must be a string, not {template!r}")
    try:
        return split_template(template)
    except TemplateError as exc:
        raise FirewallError(NAME, f"{which} command template {template!r}: {exc}") from None
    except ValueError as exc:
        raise FirewallError(NAME, f"{which} command template {template!r} cannot be split: {exc}") from None


def substitute(argv: Sequence[str], values: dict[str, str]) -> list[str]:
    """Replace placeholders within each argument.  One regex pass per argument: substituted text is
    never scanned again (a value holding ``%PORT%`` stays literal) and never split."""
    return [_PLACEHOLDER_RE.sub(lambda m: values[m.group(0)], arg) for arg in argv]


class CommandFirewall(Firewall):
    """Grants made by admin-supplied command templates; see the module docstring."""

    name = NAME
    kernel_expiry = False

    def __init__(self, policy: FirewallPolicy, *, open_command: str, close_command: str, timeout: float = 10.0) -> None:
        self.policy = policy
        self._open_argv = _split(open_command, "open")
        self._close_argv = _split(close_command, "close")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
            raise FirewallError(NAME, f"command timeout must be more than 0 and at most 300 seconds, not {timeout!r}")
        self.timeout = float(timeout)
        self._open: set[Opening] = set()

    def _run(self, argv: Sequence[str], opening: Opening, seconds: int, what: str) -> None:
        values = {"%IP%": str(opening.address), "%PROTO%": opening.protocol.label,
                  "%PORT%": str(opening.port), "%DURATION%": str(seconds)}
        args = substitute(argv, values)
        try:
            done = subprocess.run(args, capture_output=True, timeout=self.timeout, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise FirewallError(NAME, f"{what} {opening}: {args[0]} did not finish within {self.timeout:g} s") from None
        except OSError as exc:
            raise FirewallError(NAME, f"{what} {opening}: cannot run {args[0]}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            raise FirewallError(NAME, f"{what} {opening}: {args[0]} exited with status {done.returncode}"
                                      + (f": {tail}" if tail else ""))

    def setup(self) -> list[Grant]:
        """Nothing to install: the admin's firewall holds the policy.  Forget grants of a previous setup;
        an earlier process's grants cannot be seen, so none are carried over."""
        self._open.clear()
        return []

    def intact(self) -> bool:
        """Always True: this backend owns no kernel state that someone else could remove."""
        return True

    def restore(self, grants: Sequence[Grant]) -> list[Grant]:
        """Run the open command again for each grant with a positive remaining time (rounded up to whole
        seconds for ``%DURATION%``), after forgetting what this process had opened.  Tries them all;
        returns those that succeeded, and raises the first failure after trying the rest."""
        self._open.clear()
        restored: list[Grant] = []
        errors: list[FirewallError] = []
        for opening, remaining in grants:
            if remaining <= 0:
                continue
            try:
                self.open(opening, remaining)
            except FirewallError as exc:
                errors.append(exc)
            else:
                restored.append((opening, float(remaining)))
        if errors:
            raise FirewallError(NAME, f"restore left {len(errors)} grant(s) closed; first: {errors[0]}")
        return restored

    def take_over(self, openings: Sequence[Opening]) -> None:
        """A previous process opened these (its ledger says so): close() runs the close command for them."""
        self._open.update(openings)

    def open(self, opening: Opening, duration: float) -> None:
        """Run the open command for ``opening`` (``duration`` rounded up to whole seconds, at least 1);
        raises :class:`FirewallError` when it fails."""
        seconds = max(1, math.ceil(check_duration(NAME, duration)))
        self._run(self._open_argv, opening, seconds, "opening")
        self._open.add(opening)

    def close(self, opening: Opening) -> None:
        """Run the close command for ``opening`` if this process opened it (or took it over); otherwise do
        nothing.  Raises :class:`FirewallError` when the command fails."""
        if opening not in self._open:
            return  # idempotent: never opened by this process, or already closed
        self._run(self._close_argv, opening, 0, "closing")
        self._open.discard(opening)

    def openings(self) -> list[Opening]:
        """The grants this process opened or took over and has not closed: the kernel is not asked."""
        return sorted(self._open, key=lambda o: (o.address.version, int(o.address), o.protocol, o.port))

    def teardown(self) -> None:
        """Close every grant still open; report the first failure after trying them all."""
        errors: list[FirewallError] = []
        for opening in self.openings():
            try:
                self.close(opening)
            except FirewallError as exc:
                errors.append(exc)
        if errors:
            raise FirewallError(NAME, f"teardown left {len(errors)} grant(s) open; first: {errors[0]}")
