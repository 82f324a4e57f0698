"""Test-only helper processes for the firewall tests, each run inside a network namespace with
``ip netns exec NS python tests/firewall_driver.py ROLE ...``.

Roles (each reads one JSON object per line on stdin and answers one per line on stdout, so a test
drives it step by step; each ends at EOF, after a bounded number of commands, or -- the echo
server -- after a bounded lifetime):

* ``firewall BACKEND POLICY_JSON [OPTIONS_JSON]`` -- holds a real backend, as the daemon's privileged
  helper would.  Commands: setup (answers the grants it carried over, too), open, close, list, intact,
  restore (``grants``: address, protocol, port, remaining), boot (the boot-time ruleset), teardown,
  held (what sknock's set or chain holds, as the log names it), sweep (``granted``: the openings a
  grant table would hold; removes every other entry as the monitor does, and answers what it removed).
* ``client`` -- makes TCP connections: connect (answers connected / refused / timeout), hold (keeps an
  established connection), echo (sends a line over a held connection and reads it back); udp sends one
  datagram and waits for its echo (ok / refused / timeout).
* ``echo PORT...`` -- TCP and UDP echo server on every address (dual-stack) of the given ports; prints
  ``{"ready": true}`` once listening.

Kept out of the test process because a process's network namespace is where the firewall acts.
"""

from __future__ import annotations

import ipaddress
import json
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

MAX_COMMANDS = 1000
MAX_LIFETIME = 120.0  # seconds; the echo server exits after this even if nobody stops it


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _commands() -> Iterator[dict[str, Any]]:
    for _, line in zip(range(MAX_COMMANDS), sys.stdin, strict=False):
        if line.strip():
            yield json.loads(line)


def run_firewall(backend: str, policy_json: str, options_json: str) -> None:
    from sknock.errors import SknockError
    from sknock.ports import PortSet, Protocol, parse_ports
    from sknock.server.firewall import FirewallPolicy, Opening, make_firewall

    spec = json.loads(policy_json)
    policy = FirewallPolicy(
        mode=spec["mode"],
        protected=parse_ports(spec["protected"]) if spec.get("protected") else None,
        emergency_ssh=spec.get("emergency_ssh", True),
        always_open=parse_ports(spec["always_open"]) if spec.get("always_open") else PortSet(()),
    )
    firewall = make_firewall(backend, policy, **json.loads(options_json))

    def opening(cmd: dict[str, Any]) -> Opening:
        return Opening(ipaddress.ip_address(cmd["address"]), Protocol.from_label(cmd["protocol"]), cmd["port"])

    def listing() -> list[dict[str, Any]]:
        expiries = getattr(firewall, "expiries", None)
        found = expiries() if expiries else dict.fromkeys(firewall.openings())
        return [{"address": str(o.address), "protocol": o.protocol.label, "port": o.port, "expires": e}
                for o, e in found.items()]

    def grants(found: list[tuple[Opening, float]]) -> list[dict[str, Any]]:
        return [{"address": str(o.address), "protocol": o.protocol.label, "port": o.port, "remaining": t}
                for o, t in found]

    for cmd in _commands():
        try:
            op = cmd["op"]
            extra: dict[str, Any] = {}
            if op == "setup":
                extra["carried"] = grants(firewall.setup())
            elif op == "open":
                firewall.open(opening(cmd), cmd["duration"])
            elif op == "close":
                firewall.close(opening(cmd))
            elif op == "intact":
                extra["intact"] = firewall.intact()
            elif op == "restore":
                extra["restored"] = grants(firewall.restore([(opening(g), g["remaining"]) for g in cmd["grants"]]))
            elif op == "boot":
                extra["text"] = firewall.boot_ruleset()
            elif op == "teardown":
                firewall.teardown()
            elif op == "held":
                extra["held"] = sorted(str(h) for h in firewall.held())
            elif op == "sweep":
                from sknock.server.grants import foreign

                found = foreign(firewall.held(), {opening(g) for g in cmd["granted"]})
                extra["failed"] = [str(h) for h, _ in firewall.remove(found)]
                extra["removed"] = sorted(str(h) for h in found)
            elif op != "list":
                raise ValueError(f"unknown op {op!r}")
            # intact and boot run where sknock's table may be missing: nothing to list there
            _answer({"ok": True, "openings": listing() if op not in ("teardown", "intact", "boot") else [], **extra})
        except SknockError as exc:
            _answer({"ok": False, "error": str(exc), "type": type(exc).__name__})


def _connect(cmd: dict[str, Any]) -> tuple[str, socket.socket | None]:
    family = socket.AF_INET6 if ":" in cmd["host"] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(cmd.get("timeout", 1.0))
    try:
        sock.connect((cmd["host"], cmd["port"]))
    except ConnectionRefusedError:
        sock.close()
        return "refused", None
    except TimeoutError:
        sock.close()
        return "timeout", None
    except OSError as exc:
        sock.close()
        return f"error: {exc}", None
    return "connected", sock


def _udp_exchange(cmd: dict[str, Any]) -> str:
    """Send one datagram and wait for the echo: ok, refused (ICMP port unreachable) or timeout."""
    family = socket.AF_INET6 if ":" in cmd["host"] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(cmd.get("timeout", 1.0))
        try:
            sock.connect((cmd["host"], cmd["port"]))
            sock.send(b"ping")
            return "ok" if sock.recv(64) == b"ping" else "garbled"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return f"error: {exc}"


def run_client() -> None:
    held: list[socket.socket] = []
    for cmd in _commands():
        op = cmd["op"]
        if op in ("connect", "hold"):
            result, sock = _connect(cmd)
            if sock and op == "hold":
                held.append(sock)
            elif sock:
                sock.close()
            _answer({"result": result, "id": len(held) - 1 if sock and op == "hold" else None})
        elif op == "udp":
            _answer({"result": _udp_exchange(cmd)})
        elif op == "echo":
            sock = held[cmd["id"]]
            try:
                sock.sendall(b"ping\n")
                data = sock.recv(64)
                _answer({"result": "ok" if data == b"ping\n" else f"got {data!r}"})
            except OSError as exc:
                _answer({"result": f"error: {exc}"})
        else:
            _answer({"result": f"unknown op {op!r}"})


def _serve(conn: socket.socket) -> None:
    conn.settimeout(MAX_LIFETIME)
    with conn:
        for _ in range(MAX_COMMANDS):
            try:
                data = conn.recv(64)
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)


def run_echo(ports: list[int]) -> None:
    selector = selectors.DefaultSelector()
    for port in ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(16)
        selector.register(sock, selectors.EVENT_READ)
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.bind(("::", port))
        selector.register(udp, selectors.EVENT_READ)
    _answer({"ready": True})
    deadline = time.monotonic() + MAX_LIFETIME
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            if listener.type == socket.SOCK_DGRAM:
                data, peer = listener.recvfrom(64)
                listener.sendto(data, peer)
                continue
            conn, _ = listener.accept()
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()


def main() -> None:
    role, args = sys.argv[1], sys.argv[2:]
    if role == "firewall":
        run_firewall(args[0], args[1], args[2] if len(args) > 2 else "{}")
    elif role == "client":
        run_client()
    elif role == "echo":
        run_echo([int(p) for p in args])
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
