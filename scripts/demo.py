"""The sknock demo, on an embedded default: a server and a client host on one machine.

Run by scripts/demo.sh (which installs what it needs), as root.  Nothing leaves this machine: the two
hosts are network namespaces joined by a veth pair, with addresses from 198.18.0.0/15.
  1. sknock-ca makes a dev PKI in certificates/devpki (CA, server, clients "client" and "mallory").
  2. Two namespaces: the server host (198.18.x.1) and the client host (198.18.x.2).
  3. The knock server starts on the server host (nftables, firewallPolicy drop) protecting tcp/8080,
     where a small web service runs.
  4. The client cannot connect.  It knocks with the client library; now it can.
  5. After the window (5 s) new connections fail again.
  6. A replayed knock and a revoked client are refused (see the server's log).
  7. The server stops; its firewall policy stays (the port stays closed) until an explicit
     `sknock-server teardown` removes it; the namespaces are removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns import TestNet, netns_available  # noqa: E402  (the same test hosts the tests use)

PKI = ROOT / "certificates" / "devpki"
PASSWORD = "sknock-demo"  # noqa: S105 -- the dev PKI's .pfx files', for this demo only
CA_PASSWORD = "sknock-demo-ca"  # noqa: S105 -- its CA key's: a .pfx never shares the CA's password
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "SKNOCK_PFX_PASSWORD": CA_PASSWORD, "SKNOCK_NEW_PFX_PASSWORD": PASSWORD}
PORT = 8080
WINDOW = 5


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def ca(*args: str) -> None:
    print("$ sknock-ca --dir certificates/devpki " + " ".join(args), flush=True)
    subprocess.run([PY, "-m", "sknock.cli.ca", "--dir", str(PKI), *args], check=True, env=ENV)


def make_pki(server_ip: str) -> None:
    say("1. A dev PKI, made with sknock-ca (.pfx password 'sknock-demo', CA password 'sknock-demo-ca'; demo only)")
    if PKI.exists():
        shutil.rmtree(PKI)
    ca("init", "--name", "sknock demo CA")
    ca("server", "server", "--ip", server_ip)
    ca("client", "client", "--allow", f"tcp/22,tcp/{PORT},udp/8000")
    ca("client", "mallory", "--allow", f"tcp/{PORT}")
    ca("revoke", "mallory")
    ca("list")


def probe(net: TestNet) -> str:
    code = (
        "import socket, sys\n"
        f"try:\n    s = socket.create_connection(({net.server.ipv4!r}, {PORT}), timeout=1.5)\n"
        "except OSError as e:\n    print(f'connection failed: {e}'); sys.exit(1)\n"
        "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print('connected: ' + s.recv(200).split(b'\\r\\n')[0].decode())\n"
    )
    result = net.client.run(PY, "-c", code, check=False)
    return (result.stdout or result.stderr).strip()


def client(net: TestNet, name: str, body: str) -> str:
    code = (
        "from sknock.client import KnockClient\n"
        f"c = KnockClient(client_pfx={str(PKI / 'client' / (name + '.pfx'))!r}, pfx_password={PASSWORD!r},"
        f" server_cert={str(PKI / 'server' / 'server.cer')!r})\n" + body
    )
    result = subprocess.run(net.client.cmd(PY, "-c", code), capture_output=True, text=True, env=ENV, timeout=60)
    return (result.stdout + result.stderr).strip()


def show_log(log: Path, start: int) -> int:
    text = log.read_text(errors="replace")
    for line in text[start:].splitlines():
        if " sknock.worker: " in line or " sknock.monitor: " in line:
            print("   server log: " + line.split(": ", 1)[1].split(" sknock.", 1)[-1])
    return len(text)


def main() -> int:
    reason = netns_available()
    if reason:
        print(f"demo: {reason}: run it as root (sudo ./scripts/demo.sh)", file=sys.stderr)
        return 2
    with TestNet.create("skdemo") as net:
        make_pki(net.server.ipv4)
        say(f"2. Two hosts: server {net.server.ipv4} ({net.server.ns}), client {net.client.ipv4} ({net.client.ns})")
        folder = Path(tempfile.mkdtemp(prefix="sknock-demo-"))
        folder.chmod(0o755)
        for path in (PKI, PKI / "server", PKI / "crl.der", PKI / "ca.cer"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        config = folder / "config.ini"
        config.write_text(
            "[DEFAULT]\n"
            f"serverPFXFile = {PKI / 'server' / 'server.pfx'}\nPFXPasswd = {PASSWORD}\ncrlFile = {PKI / 'crl.der'}\n"
            f"firewallPolicy = drop\nprotectedPorts = tcp/{PORT}\nPORT_OPEN_DURATION_IN_SECONDS = {WINDOW}\n"
            f"controlSocket = {folder / 'control.sock'}\n"
            f"stateDir = {folder / 'state'}\n"
            "user = nobody\n"  # a demo machine may have no sknock user (sknock-server install-service makes it)
        )
        log = folder / "server.log"
        service = net.server.popen(PY, "-m", "http.server", str(PORT), "--bind", "::",
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        say(f"3. The knock server on the server host, protecting tcp/{PORT} (a web service runs there)")
        print(f"$ python server/knock-server.py -c {config}   (firewallPolicy drop, window {WINDOW} s)")
        with log.open("wb") as out:
            server = net.server.popen(PY, str(ROOT / "server" / "knock-server.py"), "-c", str(config),
                                      stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + 20
            while "worker ready" not in log.read_text(errors="replace"):
                if server.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(errors="replace"))
                    return 1
                time.sleep(0.1)
            seen = show_log(log, 0)
            print(net.server.run("nft", "list", "table", "inet", "sknock").stdout.strip())

            say("4. The client connects to tcp/8080: the port is closed")
            print("   " + probe(net))
            say("   The client knocks with the library: knock(host, 8080) -> True when the port opened")
            print("   " + client(net, "client", f"print('knock() ->', c.knock({net.server.ipv4!r}, {PORT}))"))
            seen = show_log(log, seen)
            print("   " + probe(net))
            status = subprocess.run([PY, "-m", "sknock.cli.server", "-c", str(config), "status"],
                                    capture_output=True, text=True, env=ENV)
            print("$ sknock-server status\n" + status.stdout.rstrip())

            say(f"5. After the {WINDOW} s window, new connections fail again")
            time.sleep(WINDOW + 1)
            seen = show_log(log, seen)
            print("   " + probe(net))

            say("6. A revoked client is refused; so is a replayed knock")
            knock_mallory = f"print('mallory: knock() ->', c.knock({net.server.ipv4!r}, {PORT}, timeout=2, retries=1))"
            print("   " + client(net, "mallory", knock_mallory))
            print("   " + client(net, "client", (
                "import socket, time\n"
                "from sknock.ports import Protocol\n"
                f"d = c.build_knock([(Protocol.TCP, {PORT})], now=time.time())\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"s.sendto(d, ({net.server.ipv4!r}, 40000)); time.sleep(0.3)\n"
                f"s.sendto(d, ({net.server.ipv4!r}, 40001))\n"
                "print('client: sent one knock twice (to two different UDP ports), as an eavesdropper would')\n"
            )))
            time.sleep(0.5)
            seen = show_log(log, seen)
        finally:
            say("7. Stop: the firewall policy stays, so the port stays closed while no server runs")
            server.send_signal(signal.SIGTERM)
            server.wait(15)
            service.kill()
            service.wait(5)
            show_log(log, seen)
            print(f"   exit {server.returncode}; nft tables left on the server host: "
                  f"{net.server.run('nft', 'list', 'tables').stdout.strip() or 'none'}")
            print(f"$ sknock-server -c {config} teardown")
            teardown = subprocess.run(net.server.cmd(PY, "-m", "sknock.cli.server", "-c", str(config), "teardown"),
                                      capture_output=True, text=True, env=ENV)
            print("   " + (teardown.stdout + teardown.stderr).strip())
            tables = net.server.run("nft", "list", "tables").stdout.strip()
            print(f"   nft tables left on the server host: {tables or 'none'}")
            failed = teardown.returncode != 0 or "sknock" in tables
            shutil.rmtree(folder, ignore_errors=True)
    print("   namespaces removed; the dev PKI stays in certificates/devpki")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
