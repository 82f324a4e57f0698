"""The knock server: wires the configuration, the verifier and the edges together.  Nothing else.

Start-up, as root: load and check the configuration, the server's PKCS#12, the CA certificates and the
CRL (any problem: one message, exit 2, nothing changed in the firewall); claim the network namespace (a
second server refuses to start and leaves the first alone); read the journal of applied knocks; set up
the firewall (replacing the policy a previous run or the boot ruleset left, keeping its live grants);
open the capture sockets and the control socket; then hand over to the monitor, which forks:

* the workers, which drop to the unprivileged ``user`` (:mod:`~sknock.server.privileges`), load their
  seccomp filter (:mod:`~sknock.server.sandbox`) and run :class:`~sknock.server.worker.Worker`: they read
  packets, run the parser and the crypto, and ask for grants;
* with http(s) ``crlUrl`` entries, the CRL fetcher, unprivileged and filtered too: it downloads the CRLs
  and hands the bytes to the monitor, so that no worker ever waits on the network;
* with ``metricsListen``, the metrics server, unprivileged and filtered too: it answers Prometheus scrapes
  on the socket the root process bound at start, from the figures the monitor sends it each second;
* the monitor itself (:class:`~sknock.server.monitor.Monitor`) stays uid 0 with only the capabilities it
  uses (:func:`~sknock.server.privileges.monitor_capabilities`): it re-checks and applies
  the workers' requests, closes grants on time, keeps the CRLs, answers the control socket, replaces a
  child that dies, and on a stop leaves the firewall policy in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import schedule
from cryptography import x509

from ..carrier import Carrier
from ..credentials import ServerCredentials, load_certificates, load_server_pfx
from ..errors import CertificateError, ConfigError, Reason, SknockError
from ..logsafe import log_safe
from ..ports import PortRange, PortSet, Protocol
from ..protocol import fingerprint
from ..trust import ClientVerifier, cas_without_crl, crl_signer, load_crl
from ..verifier import KnockVerifier, VerifierPolicy
from .config import CaptureMode, CrlSource, Revocation, ServerConfig, load_config
from .control import ControlServer
from .crl_refresh import FETCHED_HEADER, CrlRefresher, CrlSet, RefreshResult, schedule_refresh, split_crl_set
from .firewall import Firewall, FirewallPolicy, make_firewall
from .firewall.base import Opening
from .firewall.detect import FirewallBackend
from .instance import AlreadyRunning, claim, running_pid
from .journal import KnockJournal
from .ledger import GrantLedger
from .localaddr import DestinationFilter, host_addresses
from .logs import LogOutput, setup_logging
from .metrics import StatsReporter, open_listener
from .monitor import NONCE_CAPACITY, Monitor, Role, Spawner
from .notify import forget_environment, notifier_from_environment, watchdog_interval
from .preflight import check_credentials
from .privileges import PrivilegeError, drop_privileges, monitor_capabilities, restrict_monitor
from .privsep import CRL_PREFIX, MAX_CRL_MESSAGE, channel_pair, encode_fetch_result
from .replaystore import LocalReplayStore, RedisReplayStore, ReplayGate, ReplayStore, ReplayStoreError
from .sandbox import require_seccomp, sandbox_fetcher, sandbox_metrics, sandbox_worker
from .worker import Capture, Worker

__all__ = ["Server", "load", "prepare", "run", "teardown", "make_server_firewall", "make_replay_store",
           "replay_store_summary"]

log = logging.getLogger("sknock.server")
JOURNAL_NAME = "replay.journal"
LEDGER_NAME = "grants.json"
FIRST_CRL_TIMEOUT = 30.0  # seconds a new worker waits for the monitor's CRLs


@dataclass(frozen=True)
class HeldCrl:
    """A CRL in hand: verified, and the bytes it came as."""

    crl: x509.CertificateRevocationList
    data: bytes


@dataclass
class Server:
    """Everything loaded and checked before anything is changed on the host."""

    config: ServerConfig
    credentials: ServerCredentials
    roots: list[x509.Certificate]
    intermediates: list[x509.Certificate]
    crls: list[HeldCrl | None]  # the CRL in hand at the start for each of config.crl_sources
    firewall: Firewall
    logs: LogOutput | None = None  # where the log goes (set by load())

    def trust(self, crls: Sequence[x509.CertificateRevocationList]) -> ClientVerifier:
        """The client verifier for ``crls``.  With ``revocation = crl`` a CRL is required of every CA in a
        chain (fail closed: no CRL, no knock); one past nextUpdate is still used, and reported loudly, so
        an unreachable CRL URL does not lock every client out at once.  ``revocation = none`` checks none."""
        if self.config.revocation is Revocation.NONE:
            return ClientVerifier(self.roots, self.intermediates, require_crl=False)
        return ClientVerifier(self.roots, self.intermediates, crls, require_crl=True, accept_stale_crl=True)

    def crls_in_hand(self) -> list[x509.CertificateRevocationList]:
        """The verified CRLs loaded at the start, one per source that had a good one."""
        return [held.crl for held in self.crls if held is not None]

    def verifier(self) -> KnockVerifier:
        """A new knock verifier from the configuration, trusting the CRLs in hand at the start (a worker
        swaps in the set the monitor sends it before it verifies anything)."""
        c = self.config
        return KnockVerifier(
            server_key=self.credentials.key,
            server_certificate=self.credentials.certificate,
            trust=self.trust(self.crls_in_hand()),
            policy=VerifierPolicy(
                timestamp_threshold=float(c.timestamp_threshold),
                min_work_bits=c.work_bits,
                default_duration=float(c.port_open_duration),
                max_duration=float(c.max_open_duration),
                require_source_address=c.require_source_address,
            ),
        )


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
    require_seccomp()
    credentials = load_server_pfx(config.server_pfx_file, config.pfx_password)
    check_credentials(config, credentials)
    cas = list(credentials.ca_certificates)
    if config.ca_file is not None:
        cas += load_certificates(config.ca_file)
    roots, intermediates = _split_cas(cas)
    if not roots:
        raise ConfigError(
            f"{config.source}: no CA certificate: {config.server_pfx_file} carries none and caFile is not set"
        )
    held = [_load_crl_source(config, source, cas) for source in config.crl_sources]
    if config.revocation is Revocation.CRL:
        _check_crl_issuers(config, held, [*roots, *intermediates])
    return Server(config, credentials, roots, intermediates, held, make_server_firewall(config))


def _load_crl_source(config: ServerConfig, source: CrlSource, cas: Sequence[x509.Certificate]) -> HeldCrl | None:
    """The CRL in ``source.file`` now, verified against the CAs.  Without a crlUrl the file must be good;
    with one, a missing or bad file waits for the first fetch."""
    path = source.file
    if not path.exists():
        if source.url is None:
            raise ConfigError(f"{config.source}: crlFile: {path} does not exist and crlUrl is not set")
        return None
    try:
        with path.open("rb") as handle:
            data = handle.read(_crl_cap(config) + 1)
        if len(data) > _crl_cap(config):
            raise CertificateError(Reason.CRL_UNAVAILABLE, f"CRL {path} is more than {_crl_cap(config)} bytes")
        return HeldCrl(load_crl(data, cas, source=str(path)), data)
    except (OSError, CertificateError) as exc:
        if source.url is None:
            raise ConfigError(f"{config.source}: crlFile: {exc}") from None
        log.warning("crlFile %s not usable (%s); waiting for %s", path, exc, source.url)
        return None


def _check_crl_issuers(config: ServerConfig, held: Sequence[HeldCrl | None], cas: Sequence[x509.Certificate]) -> None:
    """Each CRL source serves its own CA's CRL, and every CA has one: a CA without a CRL would have every
    client under it refused (crl-unavailable), which is what the admin should hear before the start."""
    by_signer: dict[bytes, CrlSource] = {}
    for source, crl in zip(config.crl_sources, held, strict=True):
        signer = crl_signer(crl.crl, cas) if crl is not None else None
        if signer is None:
            continue
        other = by_signer.setdefault(fingerprint(signer), source)
        if other is not source:
            raise ConfigError(
                f"{config.source}: crlFile: {other.file} and {source.file} are both CRLs of "
                f"{log_safe(signer.subject.rfc4514_string())}: give each CA's CRL once"
            )
    if any(crl is None for crl in held):
        return  # a source still to be fetched may bring the missing CRL; run() says which CAs wait for one
    missing = cas_without_crl(cas, [crl.crl for crl in held if crl is not None])
    if missing:
        names = "; ".join(log_safe(ca.subject.rfc4514_string()) for ca in missing)
        raise ConfigError(
            f"{config.source}: crlFile: no CRL of {names}: every client whose chain passes through it would be "
            "refused (crl-unavailable); add its CRL to crlFile (a comma list, one CRL per CA)"
        )


def _crl_cap(config: ServerConfig) -> int:
    """The largest CRL one source may bring: all of them together (with the fetcher's header) fit in one
    channel message, so a worker gets the whole set at once or not at all."""
    return (MAX_CRL_MESSAGE - FETCHED_HEADER.size) // max(1, len(config.crl_sources))


def make_server_firewall(config: ServerConfig) -> Firewall:
    """The firewall backend and policy the configuration asks for (nothing is changed yet)."""
    options: dict[str, object] = {}
    if config.firewall_backend is FirewallBackend.COMMAND:
        options = {"open_command": config.open_command, "close_command": config.close_command}
    policy = FirewallPolicy(
        mode=config.firewall_policy,
        protected=config.protected_ports,
        emergency_ssh=config.emergency_ssh,
        always_open=_knock_port_set(config),
    )
    return make_firewall(config.firewall_backend, policy, **options)


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
                    icmp=Carrier.ICMP in config.knock_carriers,
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


def _spawner(server: Server, captures: list[Capture], listener: socket.socket | None = None) -> Spawner:
    """Forks the monitor's children.  A child closes the monitor's sockets and the captures (and the
    metrics socket) that are not its own, drops its privileges, and never returns into the monitor's code."""

    def spawn(role: Role, index: int, fds: Sequence[int]) -> tuple[int, socket.socket]:
        monitor_end, child_end = channel_pair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if server.logs is not None:
                    server.logs.in_child()  # before anything is logged: a logFile's lines go through the monitor
                monitor_end.close()
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if listener is not None and role != "metrics server":
                    listener.close()
                if role == "worker":
                    own = captures[index]
                    _close_captures([c for c in captures if c is not own])
                    _run_worker(server, own, child_end, index)
                elif role == "metrics server":
                    assert listener is not None
                    _close_captures(captures)
                    _run_metrics_server(server, listener, child_end)
                else:
                    _close_captures(captures)
                    _run_crl_fetcher(server, child_end)
            except BaseException:  # noqa: BLE001 -- a child must never fall back into the monitor's code
                log.exception("%s failed", role)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        child_end.close()
        return pid, monitor_end

    return spawn


def _run_worker(server: Server, capture: Capture, channel: socket.socket, index: int) -> None:
    config = server.config
    uid, gid = drop_privileges(config.user)
    verifier = server.verifier()
    issuers = [*server.roots, *server.intermediates]

    def adopt(data: bytes) -> None:
        """The CRLs in use, from the monitor, which has verified them (they are checked again here all the
        same): the whole set, DER after DER, in one message.  All of it is taken, or none: a set that does
        not load leaves no CRL, and every knock is refused until a good set comes."""
        try:
            trust = server.trust([load_crl(der, issuers, source="the monitor") for der in split_crl_set(data)])
        except (ValueError, CertificateError) as exc:
            log.error("worker %d: the monitor's CRLs do not load (%s); knocks are refused until they do",
                      index + 1, exc)
            trust = server.trust([])
        verifier.set_trust(trust)

    # The first message is the CRLs in use: no knock is verified before the worker has them.
    channel.settimeout(FIRST_CRL_TIMEOUT)
    first = channel.recv(MAX_CRL_MESSAGE + len(CRL_PREFIX))
    if not first.startswith(CRL_PREFIX):
        raise SknockError(f"worker {index + 1}: the monitor sent no CRL first")
    adopt(first[len(CRL_PREFIX) :])
    # Blocking again: a send waits while the monitor catches up (back-pressure); the loop reads it with
    # MSG_DONTWAIT.  A non-blocking send would fail on a full channel under a burst and end the worker.
    channel.settimeout(None)
    destinations = None
    if config.capture_mode is CaptureMode.PACKET and config.knock_destinations is not None:
        destinations = DestinationFilter(config.knock_destinations.local, config.knock_destinations.extra)
    reporter = StatsReporter() if config.metrics_listen is not None else None
    worker = Worker(verifier=verifier, capture=capture, channel=channel, on_crl=adopt, destinations=destinations,
                    reporter=reporter)
    sandbox_worker()  # from here on: no new file, socket or program (sknock.server.sandbox)
    log.info("worker %d/%d running as %s (uid %d, gid %d) under its seccomp filter", index + 1, config.workers,
             config.user, uid, gid)
    worker.run()


def _run_metrics_server(server: Server, listener: socket.socket, channel: socket.socket) -> None:
    """Serve the metrics as the unprivileged user (see :mod:`sknock.server.metrics`)."""
    from .metrics import serve

    drop_privileges(server.config.user)
    serve(listener, channel, confine=partial(sandbox_metrics, listener.fileno()))


def _metrics_listener(config: ServerConfig) -> socket.socket | None:
    """The metrics server's socket, bound now as root (None: metrics off).  Warns when its address is on
    an interface knocks are captured on: the metrics are then as reachable as the knocks are, unless the
    firewall (a protected port) says otherwise."""
    listen = config.metrics_listen
    if listen is None:
        return None
    if not listen.address.is_loopback:
        ifindex = host_addresses().get(listen.address)
        capturing = (
            config.capture_mode is CaptureMode.UDP
            or config.interfaces is None
            or ifindex in {socket.if_nametoindex(name) for name in config.interfaces}
        )
        if capturing:
            log.warning("metricsListen %s: that address is on an interface knocks are captured on; whoever can "
                        "reach it can read the metrics unless the firewall closes tcp/%d to them (protectedPorts)",
                        listen, listen.port)
    return open_listener(listen.address, listen.port)


def _run_crl_fetcher(server: Server, channel: socket.socket) -> None:
    """Download every http(s) crlUrl every CRL_UPDATE_INTERVAL_IN_MINUTES (and at once on SIGHUP, which the
    monitor forwards) and hand what verifies to the monitor, each with the index of its source; the monitor
    checks it again before it is used or written.  A slow or dead CRL server delays only this process."""
    config = server.config
    drop_privileges(config.user)
    issuers = [*server.roots, *server.intermediates]
    clock = partial(dt.datetime.now, dt.UTC)
    scheduler = schedule.Scheduler()
    jobs = []
    urls = []
    for index, source in enumerate(config.crl_sources):
        if source.url is None or not _is_url(source.url):
            continue  # the monitor reads local sources itself, as root

        def send(data: bytes, header: bytes = FETCHED_HEADER.pack(index)) -> None:
            channel.send(CRL_PREFIX + header + data)

        refresher = CrlRefresher(
            source.url, source.file, partial(load_crl, issuers=issuers, source=source.url),
            store=send, announce=False, max_bytes=_crl_cap(config), read_existing=False,
        )
        held = server.crls[index]
        if held is not None:
            refresher.seed(held.crl, held.data)
        def report(result: RefreshResult, index: int = index) -> None:
            channel.send(encode_fetch_result(index, result.status))  # for the metrics

        jobs.append(schedule_refresh(refresher, config.crl_update_interval_minutes, scheduler, clock, report))
        urls.append(source.url)
    state = {"running": True, "now": False}
    signal.signal(signal.SIGTERM, lambda *_: state.update(running=False))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, lambda *_: state.update(now=True))
    sandbox_fetcher()
    log.info("CRL fetcher running as %s under its seccomp filter: %s every %d min", config.user, ", ".join(urls),
             config.crl_update_interval_minutes)
    for job in jobs:
        job.run()  # at start, and again on SIGHUP (which also restarts the interval)
    with selectors.DefaultSelector() as selector:
        selector.register(channel, selectors.EVENT_READ)
        while state["running"]:
            if state["now"]:
                state["now"] = False
                for job in jobs:
                    job.run()
            scheduler.run_pending()
            idle = scheduler.idle_seconds
            if selector.select(max(0.0, min(1.0, idle if idle is not None else 1.0))) and not channel.recv(16):
                return  # the monitor has gone


def _firewall_checked(server: Server) -> list[tuple[Opening, float]]:
    """Install the policy, keeping the live grants a previous run (or the boot ruleset) left."""
    carried = server.firewall.setup()
    return list(carried) if carried else []


def load(config_path: str | Path) -> Server:
    """What a start and ``--check-config`` both do first: read the configuration, send the log where it
    says, and load and check everything it names (changing nothing).  Raises SknockError subclasses."""
    config = load_config(config_path)
    logs = setup_logging(config)
    server = prepare(config)
    server.logs = logs
    return server


def run(config_path: str | Path) -> int:
    """Run the server until it is stopped; the exit code (2: it could not start, one line on stderr).
    ``--check-config`` is :func:`sknock.cli.server.check_config`."""
    try:
        server = load(config_path)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    config = server.config
    if os.geteuid() != 0:
        print("sknock-server: must run as root (it captures packets and changes the firewall); "
              "--check-config works as any user", file=sys.stderr)
        return 2
    try:
        instance = claim()
    except AlreadyRunning as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    wall = time.time()
    try:
        journal = KnockJournal(config.state_dir / JOURNAL_NAME, capacity=NONCE_CAPACITY, now=wall,
                               window=float(config.timestamp_threshold))
    except OSError as exc:
        print(f"sknock-server: {config.source}: stateDir: cannot keep the knock journal in {config.state_dir}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    for notice in config.notices:
        log.warning("%s", notice)
    log.info("starting: %s", "; ".join(config.describe().splitlines()))
    if journal.problem:
        log.error("%s: knocks applied before this start are unknown, so every knock signed before %s is "
                  "refused (one timestamp window)", journal.problem,
                  dt.datetime.fromtimestamp(journal.floor - config.timestamp_threshold, dt.UTC).isoformat())
    try:
        captures = _open_captures(config)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    try:
        listener = _metrics_listener(config)
    except (SknockError, OSError) as exc:
        print(f"sknock-server: {config.source}: {exc}", file=sys.stderr)
        _close_captures(captures)
        return 2
    try:
        carried = _firewall_checked(server)
        control = ControlServer(config.control_socket)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        _close_captures(captures)
        if listener is not None:
            listener.close()
        return 2
    if carried:
        log.info("kept %d live grant(s) from before this start", len(carried))
    crl = _monitor_crl(server)
    _report_missing_crls(server, crl)
    try:
        replay = ReplayGate(make_replay_store(config), fallback=config.replay_store_fallback)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        _close_captures(captures)
        return 2
    _begin_replay_store(replay.store)
    # Everything made so far (modules, keys, the verifier's trust) lives as long as the server: keep
    # the garbage collector from walking it, which would write to every page of it in each forked
    # process and turn shared pages into private copies: without the freeze the server's processes
    # together keep noticeably more distinct resident memory under load.
    logs = server.logs
    relay = logs is not None and logs.start_relay()
    notifier, watchdog = notifier_from_environment(), watchdog_interval()
    forget_environment()
    gc.freeze()
    from .capture import kernel_drops

    monitor = Monitor(
        firewall=server.firewall,
        max_duration=float(config.max_open_duration),
        spawn=_spawner(server, captures, listener),
        workers=config.workers,
        fetcher=bool(crl.fetched()),
        window=float(config.timestamp_threshold),
        journal=journal,
        control=control,
        crl=crl,
        crl_interval=config.crl_update_interval_minutes * 60.0,
        instance=instance,
        carried=carried,
        ledger=GrantLedger(config.state_dir / LEDGER_NAME),
        replay=replay,
        notifier=notifier,
        watchdog=watchdog,
        reopen_log=logs.reopen if logs is not None else None,
        log_relay=logs if relay else None,
        metrics_server=listener is not None,
        capture_drops=partial(kernel_drops, sorted({fd for c in captures for fd in c.filenos()})),
    )
    keep = monitor_capabilities(server.firewall.name)
    try:
        kept = restrict_monitor(keep)
    except PrivilegeError as exc:  # the firewall policy stays in place: closed
        print(f"sknock-server: {exc}", file=sys.stderr)
        _close_captures(captures)
        return 2
    if kept.beyond(keep):
        log.warning("started without CAP_SETPCAP: the bounding set keeps %s (the unit's CapabilityBoundingSet= "
                    "should name only what the monitor keeps, see docs/privileges.md)", kept.beyond(keep))
    log.info("monitor running (pid %d) with %s; starting %d worker(s)", os.getpid(), kept.describe(),
             config.workers)
    code = monitor.run()
    _close_captures(captures)
    if listener is not None:
        listener.close()
    log.info("stopped (exit %d)", code)
    return code


def _is_url(source: str) -> bool:
    return source.split(":", 1)[0].lower() in ("http", "https")


def _monitor_crl(server: Server) -> CrlSet:
    """The monitor's keeper of the CRLs, one refresher per source: it reads file sources itself (as root)
    and verifies whatever the CRL fetcher brings, against the CAs and the CRL in hand from that source,
    before writing its crlFile.  Empty with ``revocation = none``."""
    config = server.config
    issuers = [*server.roots, *server.intermediates]
    keepers = []
    for source, held in zip(config.crl_sources, server.crls, strict=True):
        name = source.url or str(source.file)
        store = None if source.url is not None else (lambda data: None)  # crlFile itself is the source
        keeper = CrlRefresher(
            name, source.file, partial(load_crl, issuers=issuers, source=name), store=store, max_bytes=_crl_cap(config)
        )
        if held is not None:
            keeper.seed(held.crl, held.data)
        keepers.append(keeper)
    return CrlSet(keepers)


def revocation_summary(server: Server) -> str:
    """What --check-config says about revocation: the choice, and the CRL of each CA in hand."""
    config = server.config
    if config.revocation is Revocation.NONE:
        return "revocation none: no CRL is checked"
    cas = [*server.roots, *server.intermediates]
    parts = []
    for source, held in zip(config.crl_sources, server.crls, strict=True):
        if held is None:
            parts.append(f"{source.url}: no CRL yet")
            continue
        signer = crl_signer(held.crl, cas)
        name = log_safe(signer.subject.rfc4514_string()) if signer is not None else "?"
        parts.append(f"{name} from {source.url or source.file}")
    return f"revocation crl: {len(parts)} CRL(s): " + "; ".join(parts)


def make_replay_store(config: ServerConfig) -> ReplayStore:
    """The replay store ``replayStore`` names (no connection yet).  ConfigError when it needs the ``redis``
    package and that is not installed."""
    if config.replay_store is None:
        return LocalReplayStore()
    try:
        import redis  # noqa: F401 -- only to say now, not at the first knock, that it is missing
    except ImportError:
        raise ConfigError(f"{config.source}: replayStore: {config.replay_store} needs the redis package: "
                          "pip install 'sknock[fleet]'") from None
    return RedisReplayStore(config.replay_store, password=config.replay_store_password,
                            ca_file=config.replay_store_ca_file, timeout=config.replay_store_timeout_ms / 1000,
                            window=float(config.timestamp_threshold))


def _begin_replay_store(store: ReplayStore) -> None:
    """Say at the start which replay store is used; a shared one notes when its memory began (not fatal when
    it cannot: the monitor's gate handles a store that is down)."""
    if not isinstance(store, RedisReplayStore):
        return
    try:
        since = store.begin(time.time())
    except ReplayStoreError as exc:
        log.error("%s: not reachable at the start; knocks are decided by replayStoreFallback until it is", exc)
        return
    log.info("replay store %s: shared, its memory began at %s (knocks that could have been claimed before "
             "then are not confirmed)", store.name, dt.datetime.fromtimestamp(since, dt.UTC).isoformat())


def replay_store_summary(config: ServerConfig) -> str:
    """What --check-config says about the replay store; for a shared one, whether a PING is answered now (one
    try, ``replayStoreTimeout`` at most).  Unreachable is said, not an error: the store may be down for a while."""
    store = make_replay_store(config)
    if not isinstance(store, RedisReplayStore):
        return "replay store local"
    try:
        took = store.ping()
    except ReplayStoreError as exc:
        return (f"{exc}: NOT reachable now, and while it is not, knocks are "
                f"{'refused' if config.replay_store_fallback == 'refuse' else 'checked on this server alone'}")
    return f"replay store {store.name}: PING answered in {took * 1000:.1f} ms"


def _report_missing_crls(server: Server, crls: CrlSet) -> None:
    """At the start: which CAs have no CRL yet (their clients are refused until one comes)."""
    if server.config.revocation is Revocation.NONE:
        return
    missing = crls.missing()
    if not missing:
        return
    waiting = cas_without_crl([*server.roots, *server.intermediates], crls.crls())
    names = "; ".join(log_safe(ca.subject.rfc4514_string()) for ca in waiting) or "none"
    log.error("no CRL yet from %s: every client whose chain passes through a CA without a CRL (now: %s) is "
              "refused until a valid CRL arrives", ", ".join(missing), names)


def teardown(config_path: str | Path) -> int:
    """``sknock-server teardown``: remove sknock's firewall, the one explicit way to do it.  Refused
    while a server runs in this network namespace (it would only put it back)."""
    try:
        config = load_config(config_path, check_files=False)
        firewall = make_server_firewall(config)
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("sknock-server: teardown must run as root (it changes the firewall)", file=sys.stderr)
        return 2
    pid = running_pid()
    if pid is not None:
        print(f"sknock-server: a knock server is running in this network namespace (pid {pid}): stop it first; "
              "the firewall was left as it is", file=sys.stderr)
        return 2
    try:
        firewall.teardown()
    except SknockError as exc:
        print(f"sknock-server: {exc}", file=sys.stderr)
        return 2
    print(f"sknock-server: removed sknock's firewall ({firewall.name}): the protected ports are now whatever "
          "the host's own ruleset says")
    return 0
