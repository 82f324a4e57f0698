"""The knock server: wires the configuration, the verifier and the edges together.  Nothing else.

Start-up, as root: load and check the configuration, the server's PKCS#12, the CA certificates and the
CRL (any problem: one message, exit 2, nothing changed in the firewall); set up the firewall (which first
removes what a crashed run left); open the capture sockets and the control socket; then fork.

* The worker (child) drops to the unprivileged ``user`` and runs :class:`~sknock.server.worker.Worker`:
  it reads packets, runs the parser and the crypto, refreshes the CRL, and asks for grants.
* The monitor (parent) keeps root and runs :class:`~sknock.server.monitor.Monitor`: it
  re-checks and applies those requests, closes grants on time, answers the control socket, and removes
  everything it added on SIGTERM/SIGINT or when the worker dies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import schedule
from cryptography import x509

from ..credentials import ServerCredentials, load_certificates, load_server_pfx
from ..errors import CertificateError, ConfigError, SknockError
from ..ports import PortRange, PortSet, Protocol
from ..trust import ClientVerifier, load_crl
from ..verifier import KnockVerifier, VerifierPolicy
from .config import CaptureMode, ServerConfig, load_config
from .control import ControlServer
from .crl_refresh import CrlRefresher, RefreshResult, schedule_refresh
from .firewall import Firewall, FirewallPolicy, make_firewall
from .monitor import CRL_PREFIX, MAX_CRL_MESSAGE, Monitor
from .privsep import drop_privileges
from .worker import Capture, Worker

__all__ = ["Server", "prepare", "run", "setup_logging"]

log = logging.getLogger("sknock.server")


@dataclass
class Server:
    """Everything loaded and checked before anything is changed on the host."""

    config: ServerConfig
    credentials: ServerCredentials
    roots: list[x509.Certificate]
    intermediates: list[x509.Certificate]
    crl: x509.CertificateRevocationList | None
    firewall: Firewall

    def trust(self, crl: x509.CertificateRevocationList | None) -> ClientVerifier:
        # The CRL is required (fail closed: no CRL, no knock); one past nextUpdate is still used,
        # and reported loudly, so an unreachable CRL URL does not lock every client out at once.
        return ClientVerifier(
            self.roots, self.intermediates, [crl] if crl is not None else [], require_crl=True, accept_stale_crl=True
        )

    def verifier(self) -> KnockVerifier:
        c = self.config
        return KnockVerifier(
            server_key=self.credentials.key,
            server_certificate=self.credentials.certificate,
            trust=self.trust(self.crl),
            policy=VerifierPolicy(
                timestamp_threshold=float(c.timestamp_threshold),
                min_work_bits=c.work_bits,
                default_duration=float(c.port_open_duration),
                max_duration=float(c.max_open_duration),
                require_source_address=c.require_source_address,
            ),
        )


def setup_logging(config: ServerConfig | None, level: str = "INFO") -> None:
    handler: logging.Handler
    if config is not None and config.log_file is not None:
        handler = logging.FileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s sknock[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sknock")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level if config is not None else level)
    root.propagate = False


def _split_cas(cas: Sequence[x509.Certificate]) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    roots: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for cert in cas:
        self_signed = cert.subject == cert.issuer
        if self_signed:
            try:
                cert.verify_directly_issued_by(cert)
            except Exception:  # noqa: BLE001 -- any failure means "not self-signed"
                self_signed = False
        (roots if self_signed else intermediates).append(cert)
    return roots, intermediates


def _knock_port_set(config: ServerConfig) -> PortSet:
    if config.capture_mode is not CaptureMode.UDP or config.knock_ports is None:
        return PortSet(())
    return PortSet.of(PortRange(Protocol.UDP, first, last) for first, last in config.knock_ports)


def prepare(config: ServerConfig) -> Server:
    """Load and check everything; change nothing.  Raises SknockError subclasses with clear messages."""
    credentials = load_server_pfx(config.server_pfx_file, config.pfx_password)
    cas = list(credentials.ca_certificates)
    if config.ca_file is not None:
        cas += load_certificates(config.ca_file)
    roots, intermediates = _split_cas(cas)
    if not roots:
        raise ConfigError(
            f"{config.source}: no CA certificate: {config.server_pfx_file} carries none and caFile is not set"
        )
    crl = None
    if config.crl_file.exists():
        try:
            crl = load_crl(config.crl_file.read_bytes(), cas, source=str(config.crl_file))
        except (OSError, CertificateError) as exc:
            if config.crl_url is None:
                raise ConfigError(f"{config.source}: crlFile: {exc}") from None
            log.warning("crlFile %s not usable (%s); waiting for %s", config.crl_file, exc, config.crl_url)
    elif config.crl_url is None:
        raise ConfigError(f"{config.source}: crlFile: {config.crl_file} does not exist and crlUrl is not set")
    options: dict[str, object] = {}
    if config.firewall_backend.value == "command":
        options = {"open_command": config.open_command, "close_command": config.close_command}
    policy = FirewallPolicy(
        mode=config.firewall_policy.value,
        protected=config.protected_ports,
        emergency_ssh=config.emergency_ssh,
        always_open=_knock_port_set(config),
    )
    firewall = make_firewall(config.firewall_backend.value, policy, **options)
    return Server(config, credentials, roots, intermediates, crl, firewall)


def _open_captures(config: ServerConfig) -> list[Capture]:
    """One capture per worker.  Packet capture: a fanout group shares the packets among them; UDP
    sockets: one set, shared (the kernel hands each datagram to one reader)."""
    from .capture import open_packet_capture, open_udp_capture

    if config.capture_mode is CaptureMode.UDP:
        assert config.knock_ports is not None  # the config loader enforces it
        ports = [p for first, last in config.knock_ports for p in range(first, last + 1)]
        shared = open_udp_capture(bind=[(host, port) for port in ports for host in ("0.0.0.0", "::")])  # noqa: S104
        return [shared] * config.workers
    group = None if config.workers == 1 else (os.getpid() * 16) % 0xF000
    captures: list[Capture] = []
    try:
        for _ in range(config.workers):
            captures.append(
                open_packet_capture(
                    interfaces=config.interfaces,
                    ports=config.knock_ports,
                    min_payload=config.knockpacket_min_length,
                    max_packet=config.recv_buffer,
                    fanout_group=group,
                )
            )
    except SknockError:
        _close_captures(captures)
        raise
    return captures


def _close_captures(captures: Sequence[Capture]) -> None:
    for fd in {fd for capture in captures for fd in capture.filenos()}:
        with contextlib.suppress(OSError):
            os.close(fd)


def _run_worker(server: Server, capture: Capture, channel: socket.socket, index: int, count: int) -> None:
    config = server.config
    uid, gid = drop_privileges(config.user)
    log.info("worker %d/%d running as %s (uid %d, gid %d)", index + 1, count, config.user, uid, gid)
    verifier = server.verifier()
    scheduler = schedule.Scheduler()
    # The CRL comes from crlUrl, or, without one, from crlFile itself (re-read on schedule and on SIGHUP,
    # so an admin who publishes a new CRL file needs no restart).
    source = config.crl_url or str(config.crl_file)

    def store(data: bytes) -> None:
        if config.crl_url is None or index != 0:
            return  # the source is crlFile itself, or another worker writes it
        if len(data) > MAX_CRL_MESSAGE:
            raise OSError(f"CRL of {len(data)} bytes is too large to hand over for writing")
        channel.send(CRL_PREFIX + data)

    refresher = CrlRefresher(
        source,
        config.crl_file,
        partial(load_crl, issuers=[*server.roots, *server.intermediates], source=source),
        store=store,
    )
    current: list[object] = [server.crl]

    def adopt(result: RefreshResult) -> None:
        level = logging.WARNING if result.status == "failed" or result.stale else logging.INFO
        log.log(level, "CRL refresh: %s", result.message)
        if result.stale:
            log.warning("THE CRL IS PAST ITS nextUpdate: revocations since then are unknown to this server")
        if result.crl is None:
            if current[0] is None:
                log.error("no CRL: every knock is refused until a valid CRL is available from %s", source)
        elif result.crl is not current[0]:
            current[0] = result.crl
            verifier.set_trust(server.trust(result.crl))  # type: ignore[arg-type]
            log.info("using the new CRL; certificate cache dropped")

    job = schedule_refresh(
        refresher, config.crl_update_interval_minutes, scheduler, lambda: dt.datetime.now(dt.UTC), adopt
    )
    job.run()  # at start, and again on SIGHUP (which also restarts the interval)
    Worker(
        verifier=verifier, capture=capture, channel=channel, run_pending=scheduler.run_pending, on_hangup=job.run
    ).run()


def run(config_path: str | Path, *, check_only: bool = False) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    for notice in config.notices:
        log.warning("%s", notice)
    try:
        server = prepare(config)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    if check_only:
        print(f"sknock-server: {config.source}: configuration OK (firewall backend {server.firewall.name})")
        return 0
    if os.geteuid() != 0:
        print("sknock-server: must run as root (it captures packets and changes the firewall); "
              "--check-config works as any user", file=sys.stderr)
        return 2
    log.info("starting: %s", config.describe())
    try:
        captures = _open_captures(config)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    try:
        server.firewall.setup()
        control = ControlServer(config.control_socket)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        server.firewall.teardown()
        return 2
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(config.workers)]
    for pair in pairs:
        for end in pair:
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_CRL_MESSAGE + 4096)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_CRL_MESSAGE + 4096)
    # Everything made so far (modules, keys, the verifier's trust) lives as long as the server: keep
    # the garbage collector from walking it, which would write to every page of it in each forked
    # process and turn shared pages into private copies.  Measured, distinct resident pages of all
    # three processes: idle 57 MB, at 10,000 grants 83 MB without this, 75 MB with it.
    gc.freeze()
    pids: list[int] = []
    for index in range(config.workers):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # a worker
            code = 0
            try:
                control.socket.close()
                for other, (parent_end, worker_end) in enumerate(pairs):
                    parent_end.close()
                    if other != index:
                        worker_end.close()
                _close_captures([c for i, c in enumerate(captures) if i != index and c is not captures[index]])
                _run_worker(server, captures[index], pairs[index][1], index, config.workers)
            except BaseException:  # noqa: BLE001 -- a worker must never fall back into the parent's code
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
    for _, worker_end in pairs:
        worker_end.close()
    _close_captures(captures)
    log.info("monitor running; %d worker(s): pid %s", len(pids), ", ".join(map(str, pids)))
    monitor = Monitor(
        firewall=server.firewall,
        channels=[parent_end for parent_end, _ in pairs],
        max_duration=float(config.max_open_duration),
        control=control,
        crl_file=config.crl_file if config.crl_url is not None else None,
        worker_pids=pids,
    )
    code = monitor.run()
    log.info("stopped (exit %d)", code)
    return code
