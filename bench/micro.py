"""In-process figures: the crypto bound, the verifier's own rate, and the client's costs."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.lab import ENV, PASSWORD, PROTECTED_TCP, PY, Pki
from sknock.credentials import load_server_pfx
from sknock.trust import ClientVerifier, load_crl
from sknock.verifier import KnockVerifier, VerifierPolicy
from tests.netns import TestNet


def _crypto_loop(seconds: float) -> tuple[int, float]:
    """ECDH (point decoding + exchange) and one ECDSA P-256 verification per iteration: the
    public-key work one knock needs on the server (HKDF, AES-GCM and hashes are not counted)."""
    curve = ec.SECP256R1()
    server = ec.generate_private_key(curve)
    client = ec.generate_private_key(curve)
    client_pub = client.public_key()
    points, sigs = [], []
    for i in range(64):
        eph = ec.generate_private_key(curve).public_key()
        points.append(eph.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint))
        msg = os.urandom(400) + bytes([i])
        sigs.append((client.sign(msg, ec.ECDSA(hashes.SHA256())), msg))
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end and n < 10_000_000:
        for j in range(64):
            peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, points[j])
            server.exchange(ec.ECDH(), peer)
            sig, msg = sigs[j]
            client_pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        n += 64
    return n, time.perf_counter() - start


def crypto_bound(seconds: float = 3.0) -> dict[str, float]:
    """Knocks' worth of public-key work a second, on one core and on all cores at once."""
    n, t = _crypto_loop(seconds)
    one = n / t
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as ex:
        results = list(ex.map(_crypto_loop, [seconds] * cores))
    all_cores = sum(k / s for k, s in results)
    return {"per_second_one_core": one, "per_second_all_cores": all_cores, "cores": cores}


def _verifier(pki: Pki) -> KnockVerifier:
    """The server's verifier for the bench PKI, as the server builds it."""
    creds = load_server_pfx(pki.server_pfx, PASSWORD)
    cas = list(creds.ca_certificates)
    crl = load_crl(pki.crl.read_bytes(), cas, source=str(pki.crl))
    return KnockVerifier(
        server_key=creds.key, server_certificate=creds.certificate,
        trust=ClientVerifier(cas, [], [crl], require_crl=True, accept_stale_crl=True),
        policy=VerifierPolicy(timestamp_threshold=300, default_duration=600),
    )


def verifier_rate(pki: Pki, knocks: list[bytes]) -> dict[str, float]:
    """KnockVerifier.precheck and complete on prebuilt knocks, no I/O: what the worker's Python pipeline
    can do."""
    verifier = _verifier(pki)
    src = ipaddress.ip_address("198.19.0.1")
    now = time.time()
    stages = {"precheck": 0.0, "complete": 0.0}
    ok = 0
    for d in knocks:
        t0 = time.perf_counter()
        pre = verifier.precheck(d, now)
        t1 = time.perf_counter()
        verifier.complete(pre, src, now)
        t2 = time.perf_counter()
        stages["precheck"] += t1 - t0
        stages["complete"] += t2 - t1
        ok += 1
    total = stages["precheck"] + stages["complete"]
    return {"knocks": ok, "per_second": ok / total, "precheck_us": 1e6 * stages["precheck"] / ok,
            "complete_us": 1e6 * stages["complete"] / ok}


def _worker_cpu(verifier: KnockVerifier, knocks: list[bytes], sandboxed: bool) -> float:
    """In a forked child (filtered or not): each knock through a datagram socket, the verifier, and a
    message on a SEQPACKET channel -- a worker's syscalls and work for one grant.  Returns the child's CPU
    seconds (user + system) for the loop."""
    from sknock.server.sandbox import sandbox_worker

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            if sandboxed:
                sandbox_worker()
            src = ipaddress.ip_address("198.19.0.1")
            now = time.time()
            start = time.process_time()  # CLOCK_PROCESS_CPUTIME_ID: ns, where os.times() counts 10 ms ticks
            for knock in knocks:
                wire[0].send(knock)
                grant = verifier.complete(verifier.precheck(wire[1].recv(65535), now), src, now)
                channel[0].send(bytes(64) + grant.nonce)
                channel[1].recv(4096)
            os.write(write_end, repr(time.process_time() - start).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the {'sandboxed ' if sandboxed else ''}child failed ({status})")
    return float(out)


def sandbox_cost(pki: Pki, knocks: list[bytes], rounds: int = 7) -> dict[str, float]:
    """CPU per knock of a worker's loop with and without its seccomp filter (sknock.server.sandbox),
    alternating, each in a fresh child; CPU time, not wall clock (the machine is shared).  Medians."""
    verifier = _verifier(pki)
    plain: list[float] = []
    filtered: list[float] = []
    for _ in range(rounds):
        plain.append(_worker_cpu(verifier, knocks, False) / len(knocks))
        filtered.append(_worker_cpu(verifier, knocks, True) / len(knocks))
    without, with_filter = statistics.median(plain), statistics.median(filtered)
    return {"knocks": len(knocks), "rounds": rounds, "us_without": 1e6 * without, "us_with": 1e6 * with_filter,
            "overhead_percent": 100 * (with_filter - without) / without,
            "us_without_each": [1e6 * x for x in plain], "us_with_each": [1e6 * x for x in filtered]}


def client_figures(net: TestNet, pki: Pki) -> dict[str, float]:
    """Import time of sknock.client (fresh interpreter each time, median of 5), and in the client
    namespace (the knocks go to the server namespace) KnockClient.knock(verify=False) and the
    module-level knock() (loads the PKCS#12 each call): :mod:`bench.clientcost`."""
    imports = []
    for _ in range(5):
        r = subprocess.run([PY, "-m", "bench.clientcost", "import"], capture_output=True, text=True, env=ENV,
                           check=True, timeout=60)
        imports.append(float(r.stdout.strip()))
    r = net.client.run(PY, "-m", "bench.clientcost", "knock", str(pki.client_pfx), PASSWORD, str(pki.server_cer),
                       net.server.ipv4, str(PROTECTED_TCP), timeout=120)
    data = json.loads(r.stdout.strip().splitlines()[-1])
    calls = data["knock_calls"]
    return {
        "import_ms": 1000 * statistics.median(imports),
        "knockclient_knock_ms_p50": 1000 * statistics.median(calls),
        "knockclient_knock_ms_max": 1000 * max(calls),
        "knock_function_ms_p50": 1000 * statistics.median(data["knock_function"]),
        "client_load_ms": 1000 * data["client_load_s"],
    }
