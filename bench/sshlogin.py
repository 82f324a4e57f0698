"""The ssh phase: how long ``ssh NAME true`` takes through a knock (``sknock-knock ssh-proxy`` as the
ProxyCommand, ProxyUseFdpass yes) against ssh to the same sshd on a port that is already open, in the
same run, alternating one of each.

sshd (tests/ssh_harness.py) runs in the server namespace on the protected port and on one the server
does not protect.  Before each knocked login the protected port is closed for the client again (a close
knock, then a probe that must not connect), so that every knocked login waits for its own grant; the
close and the probe are not timed.  A first login of each kind warms the caches and is not counted.
The figure includes everything the user waits for: the proxy's start (the ``sknock-knock`` console
script pip installed: a Python interpreter importing sknock and loading the PKCS#12), the knock, the
grant, the connection and ssh's own login.  sknock is the checkout's editable install: its import hook
costs each start about 4 ms that a ``pip install .`` does not (measured 2026-12-03).

The proxy runs as from an installed sknock, with compiled bytecode: pip writes the .pyc files when it
installs, but a checkout run with ``PYTHONDONTWRITEBYTECODE`` set (as CI and dev shells often do) would
compile every module from source at every start (~20 ms of CPU).  So the logins get their own bytecode
cache (``PYTHONPYCACHEPREFIX`` in the run's folder, written by the warm-up login), never the checkout's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench import lab
from bench.phases import Phases, latency_summary, pct
from tests.server_harness import KNOCK_SCRIPT
from tests.ssh_harness import client_ini, running_sshd, ssh_available

OPEN_PORT = 2222  # not protected: the "port already open" login
PY = lab.PY


def _closed(ph: Phases, port: int) -> bool:
    """The protected port refuses a new connection from the client (a dropped SYN: a short timeout)."""
    code = (
        "import socket, sys\n"
        f"try:\n    socket.create_connection(({ph.net.server.ipv4!r}, {port}), timeout=0.3).close()\n"
        "except OSError:\n    sys.exit(0)\nsys.exit(1)\n"
    )
    return ph.net.client.run(PY, "-c", code, check=False, timeout=30).returncode == 0


def run(ph: Phases, logins: int) -> dict[str, Any]:
    """``logins`` timed logins of each kind (plus one warm-up each); medians and p90s in ms."""
    reason = ssh_available()
    if reason:
        return {"skipped": reason}
    assert ph.pki is not None
    port = lab.PROTECTED_TCP
    folder = Path(tempfile.mkdtemp(prefix="sknock-bench-ssh-"))
    folder.chmod(0o755)
    (folder / "pfx.pass").write_text(lab.PASSWORD + "\n")
    ini = client_ini(folder / "client.ini", pfx=ph.pki.client_pfx, password_file=folder / "pfx.pass",
                     server_cer=ph.pki.server_cer, host=ph.net.server.ipv4)
    close = [str(KNOCK_SCRIPT), "--config", str(ini), "gw", "--close", "-p", str(port), "--quiet"]
    # bytecode as an installed sknock has it (see the module docstring); "" turns the variable off
    env = {"PYTHONPYCACHEPREFIX": str(folder / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}
    knocked: list[float] = []
    direct: list[float] = []
    failures: list[str] = []
    with ph.server(), running_sshd(ph.net, folder / "sshd", port, ini, open_port=OPEN_PORT) as ssh:
        if not _closed(ph, port):
            return {"error": f"tcp/{port} is open before any knock"}
        for i in range(logins + 1):
            for host, times in (("gw", knocked), ("direct", direct)):
                started = time.monotonic()
                result = ssh.ssh(host, "true", timeout=60, env=env)
                elapsed = time.monotonic() - started
                if result.returncode != 0:
                    failures.append(f"{host}: {result.stderr.strip()[-300:]}")
                elif i > 0:
                    times.append(elapsed)
            ph.net.client.run(*close, timeout=60)
            deadline = time.monotonic() + 5
            while not _closed(ph, port) and time.monotonic() < deadline:
                time.sleep(0.05)
    added = [k - d for k, d in zip(knocked, direct, strict=False)]
    ms = [1000 * a for a in added]
    return {
        "logins": logins,
        "knocked": latency_summary(knocked),
        "direct": latency_summary(direct),
        "added_p50_ms": pct(ms, 50) if ms else None,
        "added_p90_ms": pct(ms, 90) if ms else None,
        "median_difference_ms": (latency_summary(knocked)["p50_ms"] - latency_summary(direct)["p50_ms"]),
        "failures": failures[:5],
        "failed": len(failures),
    }

