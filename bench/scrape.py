"""Run in the server namespace: scrape sknock's metrics endpoint once and print, as one JSON object, the
figures the benchmark compares with what the kernel showed (counts, latency sum and count, drops, and
each refusal reason that counted something).

    python -m bench.scrape 127.0.0.1:9465
"""

from __future__ import annotations

import json
import sys
import urllib.request

WANTED = ("sknock_knocks_received_total", "sknock_knocks_granted_total", "sknock_knock_to_grant_seconds_sum",
          "sknock_knock_to_grant_seconds_count", "sknock_capture_drops_total")


def figures(text: str) -> dict[str, float]:
    """The wanted samples of an exposition in the text format."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in WANTED or (name.startswith("sknock_knocks_refused_total{") and float(value)):
            out[name] = float(value)
    return out


def main() -> int:
    with urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10) as response:  # noqa: S310 -- ours
        print(json.dumps(figures(response.read().decode())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
