"""The sknock demo on an embedded default: a dev PKI, a knock, and the server's decisions.

Run by scripts/demo.sh (which installs what it needs).  Everything stays on this machine: the knock goes
to 127.0.0.1.  Steps:
  1. sknock-ca makes a dev PKI in certificates/devpki (CA, server "server", clients "client" and "mallory").
  2. A knock server core (sknock.verifier) listens on a UDP socket on 127.0.0.1 with the server's key.
  3. The client library knocks for tcp/22: the server grants it.
  4. The same packet replayed: refused.  A port the certificate does not name: refused by the client
     before sending.  Mallory, revoked by the CA: refused.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from sknock.client import KnockClient
from sknock.credentials import load_certificate, load_server_pfx
from sknock.errors import KnockRefused, NotAuthorizedError
from sknock.trust import ClientVerifier, load_crl
from sknock.verifier import KnockVerifier, VerifierPolicy

ROOT = Path(__file__).resolve().parents[1]
PKI = ROOT / "certificates" / "devpki"
PASSWORD = "sknock-demo"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def ca(*args: str) -> None:
    cmd = [sys.executable, "-m", "sknock.cli.ca", "--dir", str(PKI), *args]
    print("$ sknock-ca --dir certificates/devpki " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "SKNOCK_PFX_PASSWORD": PASSWORD, "SKNOCK_NEW_PFX_PASSWORD": PASSWORD})


def make_pki() -> None:
    say("1. A dev PKI, made with sknock-ca (password 'sknock-demo', for this demo only)")
    if PKI.exists():
        shutil.rmtree(PKI)
    ca("init", "--name", "sknock demo CA")
    ca("server", "server", "--ip", "127.0.0.1")
    ca("client", "client", "--allow", "tcp/22,tcp/8080,udp/8000")
    ca("client", "mallory", "--allow", "tcp/22")
    ca("revoke", "mallory")
    ca("list")


def main() -> int:
    make_pki()
    say("2. A knock server core on 127.0.0.1 (sknock.verifier: the server's decision, sans-I/O)")
    server = load_server_pfx(PKI / "server" / "server.pfx", PASSWORD)
    ca_cert = load_certificate(PKI / "ca.cer")
    crl = load_crl((PKI / "crl.der").read_bytes(), [ca_cert], source=str(PKI / "crl.der"))
    verifier = KnockVerifier(
        server_key=server.key,
        server_certificate=server.certificate,
        trust=ClientVerifier([ca_cert], (), [crl], require_crl=True),
        policy=VerifierPolicy(),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    knock_port = sock.getsockname()[1]
    print(f"listening for knocks on 127.0.0.1:{knock_port}")

    def serve_one() -> bytes:
        datagram, (address, _) = sock.recvfrom(2048)
        try:
            grant = verifier.check(datagram, __import__("ipaddress").ip_address(address), time.time())
        except KnockRefused as refusal:
            print(f"server: REFUSED knock from {address}: {refusal}")
        else:
            ports = ",".join(f"{p.label}/{n}" for p, n in grant.ports)
            print(f"server: GRANTED {ports} to {grant.address} for {grant.duration:g} s ({grant.client})")
        return datagram

    say("3. The client library knocks for tcp/22")
    client = KnockClient(
        client_pfx=PKI / "client" / "client.pfx", pfx_password=PASSWORD, server_cert=PKI / "server" / "server.cer"
    )
    t0 = time.perf_counter()
    client.knock("127.0.0.1", 22, verify=False, knock_port=knock_port)
    print(f"client: knock sent ({(time.perf_counter() - t0) * 1000:.1f} ms, proof of work included)")
    datagram = serve_one()
    print(f"(one UDP datagram of {len(datagram)} bytes, encrypted to the server certificate)")

    say("4a. The same packet, replayed by an eavesdropper")
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(datagram, ("127.0.0.1", knock_port))
    serve_one()

    say("4b. A port the client's certificate does not name (tcp/3389)")
    try:
        client.knock("127.0.0.1", 3389, verify=False, knock_port=knock_port)
    except NotAuthorizedError as exc:
        print(f"client: not sent: {exc}")

    say("4c. Mallory, whose certificate the CA revoked")
    mallory = KnockClient(
        client_pfx=PKI / "client" / "mallory.pfx", pfx_password=PASSWORD, server_cert=PKI / "server" / "server.cer"
    )
    mallory.knock("127.0.0.1", 22, verify=False, knock_port=knock_port)
    serve_one()

    say(f"Refusals counted by reason: {dict(verifier.counters)}")
    print(f"done at {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC; the dev PKI stays in certificates/devpki")
    return 0


if __name__ == "__main__":
    sys.exit(main())
