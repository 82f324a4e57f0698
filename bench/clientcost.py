"""The client's costs, each in a fresh interpreter, for :func:`bench.micro.client_figures`:

    python -m bench.clientcost import
    python -m bench.clientcost knock CLIENT_PFX PASSWORD SERVER_CER HOST PORT   (in the client namespace)

``import`` prints the seconds ``import sknock.client`` took; ``knock`` prints one line of JSON: the
import time, the time to load the client's credentials, 40 ``KnockClient.knock(verify=False)`` calls and
5 calls of the module-level ``knock()`` (which loads the PKCS#12 each time).  Nothing but ``sys`` and
``time`` is imported before sknock.client is timed.
"""

from __future__ import annotations

import sys
import time

KNOCK_CALLS = 40
FUNCTION_CALLS = 5


def import_seconds() -> float:
    t = time.perf_counter()
    import sknock.client  # noqa: F401

    return time.perf_counter() - t


def knock_times(pfx: str, password: str, cer: str, host: str, port: int) -> dict[str, object]:
    imported = import_seconds()
    from sknock.client import KnockClient, knock

    t = time.perf_counter()
    client = KnockClient(client_pfx=pfx, pfx_password=password, server_cert=cer, check_server_cert=False)
    load = time.perf_counter() - t
    calls = []
    for _ in range(KNOCK_CALLS):
        t = time.perf_counter()
        client.knock(host, port, verify=False)
        calls.append(time.perf_counter() - t)
    whole = []
    for _ in range(FUNCTION_CALLS):
        t = time.perf_counter()
        knock(host, port, "tcp", client_pfx=pfx, pfx_password=password, server_cert=cer, verify=False)
        whole.append(time.perf_counter() - t)
    return {"import_s": imported, "client_load_s": load, "knock_calls": calls, "knock_function": whole}


def main() -> int:
    if sys.argv[1:2] == ["import"]:
        print(import_seconds())
        return 0
    if sys.argv[1:2] == ["knock"] and len(sys.argv) == 7:
        import json

        pfx, password, cer, host, port = sys.argv[2:7]
        print(json.dumps(knock_times(pfx, password, cer, host, int(port))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
