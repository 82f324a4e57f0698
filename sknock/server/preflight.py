"""Will the server do what its configuration says?  The checks beyond the config file itself.

The config loader (:mod:`sknock.server.config`) reads the file; :func:`~sknock.server.daemon.prepare`
loads the server's PKCS#12 (whose certificate must have the server profile), the CA certificates and the
CRL.  Two more kinds of problem are found here, each reported as one :class:`~sknock.errors.ConfigError`
naming the config file, the option, the file it names and what to do:

* :func:`check_credentials`, called by ``prepare`` (so by a start and by ``--check-config``): the
  server's certificate out of date.  Clients refuse to knock to it, so the server would refuse nothing
  and grant nothing: it does not start.
* :func:`check_deployment`, called by ``--check-config`` only: what a running server meets, logs, and
  lives with, because refusing to start over it would lock out every client at once -- a CA certificate
  out of date (every client it issued is refused), a CRL past its nextUpdate (revocations since then are
  missed), a local ``crlUrl`` whose CRL does not load or verify (the server keeps refusing it), and a
  ``stateDir`` or control-socket folder that cannot be made (the start would fail), and a file the
  monitor reads or writes after its start (``crlFile``, ``stateDir``, ``logFile``) that root could
  reach only through CAP_DAC_OVERRIDE, which the monitor drops once it is set up
  (:func:`check_root_access`, docs/privileges.md).  ``--check-config`` is where the operator asks
  whether all is well, so there these are errors (exit 2).

Nothing here needs a file to be readable by anyone but the user running the check: root, for a server,
reads its 0600 files in 0700 folders (the monitor reads the CRL itself; no worker opens a file).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from ..certificate import tolerate_zero_serial
from ..credentials import ServerCredentials
from ..errors import CertificateError, ConfigError
from ..logsafe import log_safe
from ..trust import crl_rollback, load_crl
from .config import CrlSource, ServerConfig

if TYPE_CHECKING:
    from .daemon import Server

__all__ = ["check_credentials", "check_deployment", "check_root_access", "MAX_CRL_BYTES"]

#: A CRL larger than this is not read (the same bound as the monitor's).
MAX_CRL_BYTES = 4 << 20
_CRL_FIX = "sknock-ca --dir CA_DIR crl signs a fresh one"


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def _subject(cert: x509.Certificate) -> str:
    try:
        with tolerate_zero_serial():
            return log_safe(cert.subject.rfc4514_string())
    except Exception:  # noqa: BLE001 -- a name that does not decode is described, not raised
        return "<undecodable subject>"


def _out_of_date(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """'expired at T' or 'is not valid before T', or None when ``cert`` is valid at ``now``."""
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc.isoformat()} (check this host's clock)"
    if now > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def check_credentials(config: ServerConfig, credentials: ServerCredentials, *, now: dt.datetime | None = None) -> None:
    """The server's own certificate is in date (its profile is checked when the PKCS#12 is loaded)."""
    state = _out_of_date(credentials.certificate, _now(now))
    if state is not None:
        raise ConfigError(
            f"{config.source}: serverPFXFile: the server certificate {_subject(credentials.certificate)} in "
            f"{config.server_pfx_file} {state}: clients refuse to knock to it; issue a new one "
            "(sknock-ca --dir CA_DIR server NAME) and give its .cer to the clients"
        )


def check_deployment(server: Server, *, now: dt.datetime | None = None) -> None:
    """``--check-config``: the problems a running server would only report (see the module docstring)."""
    moment = _now(now)
    _check_cas(server, moment)
    _check_crls(server, moment)
    config = server.config
    _check_folder(config, "stateDir", config.state_dir)
    _check_folder(config, "controlSocket", config.control_socket.parent)
    if os.geteuid() == 0:
        check_root_access(config)


def check_root_access(config: ServerConfig) -> None:
    """What the monitor reads or writes after it has dropped CAP_DAC_OVERRIDE (it stays uid 0): the CRL
    files (re-read on SIGHUP; a fetched one is written beside), the state folder (journal, ledger), the
    replay store's CA file and the log file's folder.  Each must be reachable by root through the mode
    bits -- as the owner, its group, or anyone -- as it is when root owns it."""
    for source in config.crl_sources:
        if source.file.exists():
            _root_may(config, "crlFile", source.file, 4)
        if source.url is not None:
            _root_may(config, "crlFile", source.file.parent, 3)
    _root_may(config, "stateDir", config.state_dir, 3)
    if config.replay_store_ca_file is not None:  # read again at each TLS connection to the store
        _root_may(config, "replayStoreCaFile", config.replay_store_ca_file, 4)
    if config.log_file is not None:
        _root_may(config, "logFile", config.log_file.parent, 3)
        if config.log_file.exists():
            _root_may(config, "logFile", config.log_file, 2)


def _root_may(config: ServerConfig, key: str, path: Path, want: int) -> None:
    """Root without CAP_DAC_OVERRIDE may ``want`` (4 read, 2 write, 1 search, as mode bits) on ``path``
    (or, when it does not exist yet, make it in its nearest existing folder), and search every folder on
    the way."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing, want = existing.parent, 3
    groups = {os.getegid(), *os.getgroups()}
    folders = [existing, *existing.parents] if existing.is_dir() else list(existing.parents)
    checks = [(existing, want), *((folder, 1) for folder in folders if folder != existing)]
    for item, bits in checks:
        st = item.stat()
        shift = 6 if st.st_uid == 0 else 3 if st.st_gid in groups else 0
        if (st.st_mode >> shift) & bits != bits:
            need = "/".join(name for bit, name in ((4, "read"), (2, "write"), (1, "search")) if bits & bit)
            raise ConfigError(
                f"{config.source}: {key}: the server (root, without CAP_DAC_OVERRIDE after its start) could not "
                f"{need} {item}: owner uid {st.st_uid}, group {st.st_gid}, mode {stat.S_IMODE(st.st_mode):o}; "
                "make it root's (chown root) or let its mode allow it (docs/privileges.md)"
            )


def _check_cas(server: Server, now: dt.datetime) -> None:
    config = server.config
    from_pfx = set(server.credentials.ca_certificates)
    for cert in [*server.roots, *server.intermediates]:
        state = _out_of_date(cert, now)
        if state is None:
            continue
        key, where = ("serverPFXFile", config.server_pfx_file) if cert in from_pfx else ("caFile", config.ca_file)
        raise ConfigError(
            f"{config.source}: {key}: the CA certificate {_subject(cert)} in {where} {state}: every client it "
            "issued would be refused; renew it, or remove it"
        )


def _local_crl_url(source: CrlSource) -> Path | None:
    if source.url is None or source.url.split(":", 1)[0].lower() in ("http", "https"):
        return None
    return Path(source.url)


def _check_crl_url_file(server: Server, source: CrlSource) -> x509.CertificateRevocationList | None:
    """A local ``crlUrl`` must hold a CRL signed by a configured CA: the server reads it at once and on every
    refresh, and refuses it (keeping what it has, or nothing) otherwise.  Returns it."""
    config = server.config
    path = _local_crl_url(source)
    if path is None:
        return None
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CRL_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{config.source}: crlUrl: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CRL_BYTES:
        raise ConfigError(f"{config.source}: crlUrl: {path} is larger than {MAX_CRL_BYTES} bytes: not a CRL")
    try:
        return load_crl(data, [*server.roots, *server.intermediates], source=str(path))
    except CertificateError as exc:
        raise ConfigError(f"{config.source}: crlUrl: {exc}") from None


def _check_crls(server: Server, now: dt.datetime) -> None:
    """Each CRL source: a local crlUrl loads, and the CRL the server starts with is not past its nextUpdate
    (revocations published since then would be missed).  With a local crlUrl the newer of it and crlFile is
    the one used, and the crlUrl file itself must be fresh too (it is where revocations come from)."""
    for source, held in zip(server.config.crl_sources, server.crls, strict=False):
        from_url = _check_crl_url_file(server, source)
        from_file = held.crl if held is not None else None
        candidates = [(crl, key) for crl, key in ((from_file, "crlFile"), (from_url, "crlUrl")) if crl is not None]
        if not candidates:
            continue  # no CRL yet: the server waits for crlUrl's first fetch (and refuses that CA's clients)
        if from_url is not None:
            _check_next_update(server.config, source, from_url, "crlUrl", now)
        crl, key = candidates[0]  # the server starts from crlFile and takes crlUrl's CRL only if it may replace it
        if len(candidates) == 2 and crl_rollback(candidates[1][0], crl) is None:
            crl, key = candidates[1]
        _check_next_update(server.config, source, crl, key, now)


def _check_next_update(
    config: ServerConfig, source: CrlSource, crl: x509.CertificateRevocationList, key: str, now: dt.datetime
) -> None:
    next_update = crl.next_update_utc
    if next_update is None or next_update >= now:
        return
    where = source.file if key == "crlFile" else source.url
    if source.url is None:
        fix = f"{_CRL_FIX}; publish it to {source.file} and send the server SIGHUP"
    elif key == "crlFile":
        fix = (f"the server fetches it from crlUrl {source.url}: fix that source, or publish a fresh one "
               f"there ({_CRL_FIX})")
    else:
        fix = f"{_CRL_FIX}; publish it to {source.url}"
    raise ConfigError(
        f"{config.source}: {key}: the CRL in {where} is past its nextUpdate ({next_update.isoformat()}): "
        f"revocations since then may be missing; {fix}"
    )


def _check_folder(config: ServerConfig, key: str, folder: Path) -> None:
    """``folder`` exists as a folder, or can be made (it or its nearest existing parent is a folder, and, when
    the check runs as root as the server does, one it may write in).  As another user only the shape is
    checked: a root-only parent is no fault of the configuration."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{config.source}: {key}: cannot make {folder}: {existing} is not a folder")
    if os.geteuid() == 0 and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{config.source}: {key}: cannot make {folder}: {existing} is not writable (read-only?)")
