"""Turn a run's results into the markdown table and the plot; summarize a py-spy profile.

    python -m bench.report bench/results/RUN.json   # the .md and .png of a run again (after a change here)
"""

from __future__ import annotations

import collections
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SERVERS = ["sknock-nftables", "sknock-nftables-redis", "sknock-iptables", "fwknopd-iptables"]


def _f(value: Any, fmt: str = "{:.0f}") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _phase(results: dict[str, Any], server: str, name: str) -> dict[str, Any]:
    phase: dict[str, Any] = results.get("servers", {}).get(server, {}).get("phases", {}).get(name, {})
    return phase


def _cell(results: dict[str, Any], server: str, name: str, getter: Callable[[dict[str, Any]], str]) -> str:
    srv = results.get("servers", {}).get(server)
    if srv is None:
        return "not run"
    if "error" in srv and "phases" not in srv:
        return "error"
    ph = _phase(results, server, name)
    if not ph:
        return "not run"
    if "skipped" in ph:
        return "skipped"
    if "error" in ph:
        return "error"
    try:
        return str(getter(ph))
    except (KeyError, TypeError, IndexError, ZeroDivisionError):
        return "–"


def _mb(kib: float) -> str:
    return _f(kib / 1024, "{:.0f}")


def _grants(ph: dict[str, Any]) -> str:
    cut = " †" if ph.get("wait_end") == "limit" else ""
    text = f"{_f(ph['grants_per_s'])}/s ({ph['granted']}/{ph['sent']}{cut})"
    if ph.get("repeats"):
        text += f", median of {len(ph['repeats'])} bursts: {', '.join(_f(r) for r in sorted(ph['repeats']))}"
    return text


def _lat(ph: dict[str, Any]) -> str:
    lat = ph["latency"]
    return f"{_f(lat['p50_ms'], '{:.1f}')} / {_f(lat['p90_ms'], '{:.1f}')} / {_f(lat['p99_ms'], '{:.1f}')} / " \
           f"{_f(lat['max_ms'], '{:.1f}')}"


def _flood(ph: dict[str, Any]) -> str:
    """A flood phase: the share of valid knocks granted, their latency, the flood's rate."""
    return (f"{_f(100 * ph['share_granted'], '{:.0f}')} % ({ph['valid_granted']}/{ph['valid_sent']}), "
            f"{_f(ph['latency']['p50_ms'], '{:.1f}')}/{_f(ph['latency']['p99_ms'], '{:.1f}')} ms; "
            f"flood {_f(ph['flood_pps'])} pps")


def _cpu(cpu: dict[str, Any]) -> str:
    """CPU µs a grant, and how the server's CPU time divides (its main process: sknock's monitor)."""
    total = cpu["total_s"]
    main = sum(p["user_s"] + p["system_s"] + p["reaped_children_s"] for p in cpu["processes"] if p["role"] == "main")
    reaped = (f" + reaped children {_f(cpu['reaped_children_s'], '{:.2f}')}"
              if cpu.get("reaped_children_s", 0) > 0 else "")
    share = _f(100 * main / total if total else None)
    return (f"{_f(cpu['us_per_grant'])} µs ({_f(total, '{:.2f}')} s: user {_f(cpu['user_s'], '{:.2f}')} + "
            f"system {_f(cpu['system_s'], '{:.2f}')}{reaped}; main process {share} %, "
            f"{len(cpu['processes'])} processes)")


def _ratio(ph: dict[str, Any], crypto_us: float | None) -> str:
    us = ph["server_cpu"]["us_per_grant"]
    if not us or not crypto_us:
        return "–"
    text = f"{us / crypto_us:.2f}×"
    repeats = [r for r in ph.get("repeats_cpu_us_per_grant") or [] if r]
    if len(repeats) > 1:
        text += f" (bursts: {', '.join(f'{r / crypto_us:.2f}' for r in sorted(repeats))})"
    return text


def cpu_per_grant(results: dict[str, Any]) -> dict[str, Any]:
    """Each server's CPU time per grant over the 20,000 burst (all its processes, user + system), beside
    the public-key work of one knock measured in the same run (ECDH + ECDSA P-256 verification), as a
    ratio: how many knocks' worth of public-key work the server spends per grant.  It is above 1 by
    whatever the server does besides that work, so the machine's cores grant at most their crypto bound
    divided by it.  Two denominators: the work on one core with the other idle (``crypto_us_per_knock``),
    and per core with every core busy (``..._all_cores_busy``: cores / the all-cores bound), as the
    server's processes run in a burst; on a quiet machine they differ by a few per cent, on a host that
    does not give the machine all its cores, by much more."""
    bound = results.get("crypto_bound", {})
    one, every, cores = bound.get("per_second_one_core"), bound.get("per_second_all_cores"), bound.get("cores")
    crypto_us = 1e6 / one if one else None
    busy_us = 1e6 * cores / every if every and cores else None
    out: dict[str, Any] = {"crypto_us_per_knock": crypto_us, "crypto_us_per_knock_all_cores_busy": busy_us,
                           "crypto_from_run": bound.get("from_run")}
    for key, server in results.get("servers", {}).items():
        ph = server.get("phases", {}).get("burst-20000", {})
        cpu = ph.get("server_cpu")
        if not cpu:
            continue
        us = cpu.get("us_per_grant")
        main = sum(p["user_s"] + p["system_s"] + p["reaped_children_s"] for p in cpu["processes"]
                   if p["role"] == "main")
        repeats = [r for r in ph.get("repeats_cpu_us_per_grant") or [] if r]
        out[key] = {
            "us_per_grant": us,
            "user_s": cpu["user_s"], "system_s": cpu["system_s"], "reaped_children_s": cpu["reaped_children_s"],
            "main_process_share": main / cpu["total_s"] if cpu["total_s"] else None,
            "grants": ph.get("granted"),
            "ratio_to_crypto": us / crypto_us if us and crypto_us else None,
            "ratio_to_crypto_all_cores_busy": us / busy_us if us and busy_us else None,
            "repeats_us_per_grant": repeats or None,
            "repeats_ratio_to_crypto": [r / crypto_us for r in repeats] if repeats and crypto_us else None,
            **({"from_run": server["from_run"]} if server.get("from_run") else {}),
        }
    return out


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def _resident(ph: dict[str, Any]) -> int:
    """The server's resident memory: every physical page of all its processes counted once (older runs
    have only the per-process RSS sum)."""
    return int(ph.get("resident_kib", ph.get("rss_kib_total", 0)))


def _memory(ph: dict[str, Any]) -> str:
    if "resident_kib" not in ph:
        return (f"RSS {_mb(ph['rss_kib_total'])} MB, PSS {_mb(ph['pss_kib_total'])} MB "
                f"(idle: RSS {_mb(ph['rss_kib_0_grants'])}, PSS {_mb(ph['pss_kib_0_grants'])})")
    return (f"resident {_mb(ph['resident_kib'])} MB ({ph.get('processes', '?')} processes, shared pages once; "
            f"RSS summed {_mb(ph['rss_kib_total'])}, PSS {_mb(ph['pss_kib_total'])}); idle: resident "
            f"{_mb(ph['resident_kib_0_grants'])}, RSS summed {_mb(ph['rss_kib_0_grants'])}")


def _counted(ph: dict[str, Any]) -> str:
    """The server's own figures (scraped after a +metrics phase)."""
    m = ph["metrics"]
    refused = {k.split('"')[1]: v for k, v in m.items() if k.startswith("sknock_knocks_refused_total{")}
    reasons = ", ".join(f"{reason} {_f(count)}" for reason, count in sorted(refused.items()))
    return (f"{_f(m.get('sknock_knocks_received_total'))} / {_f(m.get('sknock_knocks_granted_total'))} / "
            f"{_f(sum(refused.values()))}{f' ({reasons})' if reasons else ''}; "
            f"{_f(m.get('sknock_capture_drops_total'))}")


def markdown(results: dict[str, Any]) -> str:
    servers = [s for s in SERVERS if s in results.get("servers", {})]
    merged = sorted({f"{s} ({results['servers'][s]['from_run']})" for s in servers
                     if results["servers"][s].get("from_run")})
    lines = [f"# sknock benchmark, {results.get('date', '')}", "",
             f"**{results['caveat']}**" if results.get("caveat") else "Quiet machine at the start of the run",
             f"(load average {results['machine'].get('loadavg_start')} at start, "
             f"{results['machine'].get('loadavg_end')} at end).", "",
             f"Machine: {results['machine'].get('cpus')} CPUs, Linux {results['machine'].get('kernel')}, "
             f"Python {results['machine'].get('python')}, cryptography {results['machine'].get('cryptography')}. "
             f"Run took {_f(results.get('run_seconds'))} s.", ""]
    if merged:
        lines += ["Not measured in this run, copied from an earlier one (same harness and machine, other load): "
                  + ", ".join(merged) + (("; in-process bounds and client figures too" if any(
                      results.get(k, {}).get("from_run") for k in ("crypto_bound", "client")) else "") + "."), ""]
    cb = results.get("crypto_bound", {})
    ver = results.get("verifier", {})
    if cb:
        lines += ["## Bounds (in-process, this machine)", "",
                  "| what | figure |", "| --- | --- |",
                  f"| crypto bound: ECDH + ECDSA P-256 verify per s, one core | {_f(cb.get('per_second_one_core'))} |",
                  f"| crypto bound, all {cb.get('cores')} cores at once | {_f(cb.get('per_second_all_cores'))} |",
                  f"| public-key work of one knock (1 / the one-core bound) | "
                  f"{_f(1e6 / cb['per_second_one_core'] if cb.get('per_second_one_core') else None, '{:.0f}')} µs |",
                  f"| sknock verifier (KnockVerifier.precheck+complete, no I/O), one core | "
                  f"{_f(ver.get('per_second'))}/s (precheck {_f(ver.get('precheck_us'), '{:.1f}')} µs, "
                  f"complete {_f(ver.get('complete_us'), '{:.0f}')} µs) |"]
        sb = results.get("sandbox", {})
        if sb:
            lines += [f"| worker loop CPU per knock (socket, verifier, channel) without / with its seccomp filter, "
                      f"median of {sb.get('rounds')} | {_f(sb.get('us_without'), '{:.0f}')} / "
                      f"{_f(sb.get('us_with'), '{:.0f}')} µs ({_f(sb.get('overhead_percent'), '{:+.1f}')} %) |"]
        lines += [""]
    head = "| figure | target | " + " | ".join(servers) + " |"
    lines += ["## Servers (grants seen in the kernel)", "", head, "|" + " --- |" * (2 + len(servers))]

    def row(title: str, target: str, name: str, getter: Any) -> None:
        lines.append(f"| {title} | {target} | " + " | ".join(_cell(results, s, name, getter) for s in servers) + " |")

    crypto = cb.get("per_second_all_cores")
    row("1. burst 2,000 knocks", "", "burst-2000", _grants)
    row("1. burst 20,000 knocks", ">= 8,000/s, >= 10x fwknopd", "burst-20000", _grants)
    row("1. 2,000 at 100/s", "", "rate-100", _grants)
    row("1. 2,000 at 1,000/s", "", "rate-1000", _grants)
    row("1. 2,000 at 5,000/s", "", "rate-5000", _grants)
    row("1. best grants/s as % of crypto bound (all cores)", "~70 %", "burst-20000",
        lambda ph: _f(100 * ph["grants_per_s"] / crypto, "{:.0f} %") if crypto else "–")
    per_grant = cpu_per_grant(results)
    crypto_us, busy_us = per_grant["crypto_us_per_knock"], per_grant["crypto_us_per_knock_all_cores_busy"]
    row("1. server CPU per grant, burst 20,000: user + system of all its processes / grants", "", "burst-20000",
        lambda ph: _cpu(ph["server_cpu"]))
    row(f"1. ... as a multiple of one knock's public-key work on one core ({_f(crypto_us)} µs)", "",
        "burst-20000", lambda ph: _ratio(ph, crypto_us))
    row(f"1. ... as a multiple of one knock's public-key work with every core busy ({_f(busy_us)} µs a core)", "",
        "burst-20000", lambda ph: _ratio(ph, busy_us))
    if any("rate-10" in results["servers"][s].get("phases", {}) for s in servers):
        row("2. latency ms p50/p90/p99/max at 10/s (100 knocks)", "", "rate-10", _lat)
    row("2. latency ms p50/p90/p99/max at 100/s", "", "rate-100", _lat)
    row("2. latency ms p50/p90/p99/max at 1,000/s", "p99 <= 5 ms", "rate-1000", _lat)
    row("2. ... over ICMP (echo requests, knockCarriers = udp, icmp)", "", "rate-1000-icmp", _lat)
    if any("burst-20000+metrics" in results["servers"][s].get("phases", {}) or "rate-1000+metrics" in
           results["servers"][s].get("phases", {}) for s in servers):
        row("6. burst 20,000 with metrics on (off: row 1 above)", "a few % at most", "burst-20000+metrics", _grants)
        row("6. server CPU per grant, burst 20,000, metrics on", "", "burst-20000+metrics",
            lambda ph: _cpu(ph["server_cpu"]))
        row("6. 2,000 at 5,000/s with metrics on", "", "rate-5000+metrics", _grants)
        row("6. latency ms p50/p90/p99/max at 1,000/s, metrics on", "", "rate-1000+metrics", _lat)
        row("6. server memory at 10,000 grants, metrics on (the metrics server included)", "", "scale-10000+metrics",
            _memory)
        row("6. what the server's own metrics counted, burst 20,000: received / granted / refused; kernel drops",
            "", "burst-20000+metrics", _counted)
    row("3. junk flood: valid granted (10/s), latency p50/p99 ms", ">= 99 %", "flood-junk",
        _flood)
    row("3. replay flood: valid granted (10/s), latency p50/p99 ms", ">= 99 %", "flood-replay",
        _flood)
    row("3. junk flood over ICMP (echo requests; valid knocks too)", ">= 99 %", "flood-junk-icmp", _flood)
    row("3. replay flood over ICMP (echo requests; valid knocks too)", ">= 99 %", "flood-replay-icmp", _flood)
    row("4. time to 10,000 grants (10,000 knocks sent at 2,500/s)", "", "scale-10000",
        lambda ph: f"{_f(ph['time_to_10000_s'], '{:.2f}')} s ({ph['granted']} granted)" if ph.get("time_to_10000_s")
        else f"not reached: {ph['granted']} granted in {_f(ph.get('phase_seconds'))} s"
             f"{' †' if ph.get('wait_end') == 'limit' else ''}{' (sent at once)' if ph.get('rate') == 'max' else ''}")
    row("4. server memory at 10,000 grants, all its processes", "<= 100 MB", "scale-10000", _memory)
    row("4. ns per non-granted packet, 0 -> 10,000 grants (sender wall)", "no measurable change (nft)",
        "scale-10000",
        lambda ph: f"{_f(ph['probe_0_grants']['wall_ns'])} -> {_f(ph['probe_with_grants']['wall_ns'])}"
        + ("" if ph.get("granted", 0) >= 10000 else f" (at {ph['granted']} grants)"))
    row("5. close lateness ms p50/p99/max (1,000 grants)", "p99 <= 1,000 ms", "expiry",
        lambda ph: f"{_f(ph['late_p50_ms'], '{:.0f}')} / {_f(ph['late_p99_ms'], '{:.0f}')} / "
                   f"{_f(ph['late_max_ms'], '{:.0f}')} ({ph['closes_seen']} seen"
                   f"{', sent at ' + _f(ph['rate']) + '/s' if ph.get('rate') else ''})")
    cl = results.get("client", {})
    if cl:
        lines += ["", "## Client (figure 6)", "", "| what | ms |", "| --- | --- |",
                  f"| import sknock.client (fresh interpreter, median of 5) | {_f(cl.get('import_ms'), '{:.0f}')} |",
                  f"| KnockClient.knock(verify=False), median of 40 (max) | "
                  f"{_f(cl.get('knockclient_knock_ms_p50'), '{:.1f}')} "
                  f"({_f(cl.get('knockclient_knock_ms_max'), '{:.1f}')}) |",
                  f"| knock(..., verify=False), loads the PKCS#12 each call, median of 5 | "
                  f"{_f(cl.get('knock_function_ms_p50'), '{:.1f}')} |"]
    ssh = results.get("servers", {}).get("sknock-nftables", {}).get("phases", {}).get("ssh-login", {})
    if ssh.get("knocked"):
        lines += ["", "## ssh through the knock (sknock-knock ssh-proxy, nftables; issue 12)", "",
                  f"| `ssh NAME true`, {ssh['logins']} logins each, alternating | median ms | p90 ms |",
                  "| --- | --- | --- |",
                  f"| through the knock (ProxyCommand, fdpass) | {_f(ssh['knocked']['p50_ms'], '{:.0f}')} | "
                  f"{_f(ssh['knocked']['p90_ms'], '{:.0f}')} |",
                  f"| port already open, same sshd | {_f(ssh['direct']['p50_ms'], '{:.0f}')} | "
                  f"{_f(ssh['direct']['p90_ms'], '{:.0f}')} |",
                  f"| added by the knock (pairwise) | {_f(ssh['added_p50_ms'], '{:.0f}')} | "
                  f"{_f(ssh['added_p90_ms'], '{:.0f}')} |"]
    lines += ["", "## Targets", ""]
    nft = results.get("servers", {}).get("sknock-nftables", {}).get("phases", {})
    best = nft.get("burst-20000", {}).get("grants_per_s")
    fw_phases = results.get("servers", {}).get("fwknopd-iptables", {}).get("phases", {})
    # fwknopd's best grants/s over its load phases (the most favourable to it)
    fw: dict[str, Any] = max((ph for name, ph in fw_phases.items() if name.startswith(("burst", "rate-1", "rate-5"))
              and isinstance(ph.get("grants_per_s"), float | int)), key=lambda ph: ph["grants_per_s"], default={})
    checks = [
        (">= 8,000 grants/s (sknock nftables, burst 20,000)", None if best is None else best >= 8000, _f(best)),
        (">= 10x fwknopd (its best grants/s, any load phase)",
         None if best is None or not fw.get("grants_per_s") else best >= 10 * fw["grants_per_s"],
         f"{_f(best)} vs {_f(fw.get('grants_per_s'))}: {_f(best / fw['grants_per_s'], '{:.0f}')}x"
         if best and fw.get("grants_per_s") else "–"),
        ("p99 <= 5 ms at 1,000/s", _ok(nft.get("rate-1000", {}), lambda p: p["latency"]["p99_ms"] <= 5),
         _f(nft.get("rate-1000", {}).get("latency", {}).get("p99_ms"), "{:.1f} ms")),
        (">= 99 % granted under junk flood", _ok(nft.get("flood-junk", {}), lambda p: p["share_granted"] >= 0.99),
         _f(nft.get("flood-junk", {}).get("share_granted"), "{:.2f}")),
        (">= 99 % granted under replay flood", _ok(nft.get("flood-replay", {}), lambda p: p["share_granted"] >= 0.99),
         _f(nft.get("flood-replay", {}).get("share_granted"), "{:.2f}")),
        ("closes <= 1 s late at p99", _ok(nft.get("expiry", {}), lambda p: p["late_p99_ms"] <= 1000),
         _f(nft.get("expiry", {}).get("late_p99_ms"), "{:.0f} ms")),
        ("<= 100 MB RSS at 10,000 grants (resident, shared pages once)",
         _ok(nft.get("scale-10000", {}), lambda p: _resident(p) <= 100 * 1024),
         _f(_resident(nft.get("scale-10000", {})) / 1024, "{:.0f} MB")),
        ("the knock adds <= 100 ms to ssh NAME true (median, pairwise)",
         _ok(nft.get("ssh-login", {}), lambda p: p["added_p50_ms"] <= 100),
         _f(nft.get("ssh-login", {}).get("added_p50_ms"), "{:.0f} ms")),
    ]
    lines += ["| target (sknock, nftables) | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {t} | {m} | {_verdict(ok)} |" for t, ok, m in checks]
    for proc_name, prof in (nft.get("profile", {}).get("profile") or nft.get("burst-20000", {}).get("profile")
                            or {}).items():
        if not prof:
            continue
        lines += ["", f"## Where the {proc_name} process spends its time (py-spy; a separate, profiled burst of "
                  f"20,000, nftables; {prof['samples']} samples)", "",
                  "Stages: " + ", ".join(f"{k} {v:.0f} %" for k, v in prof.get("stages", {}).items()), "",
                  "| share | function (self time) |", "| --- | --- |"]
        lines += [f"| {share:.1f} % | `{name}` |" for name, share in prof.get("top_self", [])[:12]]
    notes = []
    for s in servers:
        for name, ph in results["servers"][s].get("phases", {}).items():
            if "error" in ph:
                notes.append(f"* {s} {name}: {ph['error'].splitlines()[0][:300]}")
        if "error" in results["servers"][s]:
            notes.append(f"* {s}: {str(results['servers'][s]['error']).splitlines()[0][:300]}")
    if notes:
        lines += ["", "## Errors", "", *notes]
    if "fwknopd-iptables" in servers:
        lines += ["", "## fwknopd: how and caveats", "", *FWKNOPD_NOTES]
    lines += ["", "Method: each phase starts a fresh server (knocks are reused across fresh servers; each is "
              "built with the default 12-bit proof of work before the timed part, the server's clock window "
              "set to 300 s so they stay fresh). Grants/s = grants seen in the kernel / (last grant - first "
              "send). Latency = kernel event time - send time, both CLOCK_MONOTONIC. Burst = one Python "
              "sender as fast as it can (about 50,000/s); knocks the server's socket buffer could not hold "
              "are lost, which is why a burst can grant fewer than were sent. Server CPU per grant = the user + "
              "system time (/proc/PID/stat) of all the server's processes (sknock: the monitor and its workers; "
              "fwknopd: with the iptables processes it ran) from just before the first knock is sent until the "
              "grants stop (the wait ends 3 s after the last grant when not every knock was granted), divided by "
              "the grants; the public-key work of one knock is 1 / the one-core crypto bound of the same run.", ""]
    return "\n".join(lines)


FWKNOPD_NOTES = [
    "* Debian's fwknop-server 2.6.10 in the foreground in the server namespace, its defaults except: "
    "PCAP_INTF the veth, no promiscuous mode, PCAP_FILTER `udp port 62201`, MAX_SPA_PACKET_AGE 3600 (packets "
    "are built beforehand), FW_ACCESS_TIMEOUT 600 s (2 s in the expiry phase); firewall: iptables, which on "
    "Debian 12 is iptables-nft, so its rules are watched with `nft -a monitor` like sknock's set elements. "
    "A fresh fwknopd (fresh digest cache) per phase; packets built with `fwknop -T -B` (Rijndael + "
    "HMAC-SHA256), one per source address, sent to udp/62201 from that address.",
    "* † = the phase's wait ended at its time cap (30 s after the last knock was due) while fwknopd was still "
    "granting: the figure covers the first, smaller-chain part of the phase, which flatters fwknopd. Each "
    "grant runs three `iptables` processes (`-L FWKNOP_INPUT` to see that the chain exists -- it lists the "
    "whole chain, and logs an error once the listing outgrows its buffer -- then `-C`, then `-A`), so the "
    "cost per grant grows with the chain.",
    "* fwknopd loops: pcap_dispatch (each captured packet handled, and granted, synchronously), expiry "
    "check, usleep(PCAP_LOOP_SLEEP = 100 ms). Above its capacity (about 45 grants/s here) knocks wait in "
    "libpcap's kernel ring and, once it is full, are dropped there: at 100/s and 1,000/s it stopped granting "
    "(no grant for 3 s) with about half the knocks never granted, and latency there is queueing, not "
    "per-knock cost (see 10/s). Under both floods its ring is full of flood packets: valid knocks are lost.",
    "* Scale: fwknopd's rules form a linear chain (sknock's nftables backend: a set), so the per-packet probe "
    "cost grows with the grants; 10,000 grants were not reached within the phase's cap, so RSS and the probe "
    "are taken at the grants reached.",
    "* Expiry: fwknopd stamps rules `_exp_<epoch seconds>` and removes them at a check with time(NULL) >= "
    "the stamp (one `iptables -D` each), so a close can also come up to 1 s early. Expiry knocks go to "
    "sknock at 1,000/s, to fwknopd at 25/s, below its capacity (the first fwknopd run, 2026-11-22-0445, sent "
    "them at 100/s, above it: a third were never granted; that run is in git history).",
]


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to 5 decimals (the JSON's precision)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def to_json(results: dict[str, Any]) -> str:
    """A run's results as they are written to bench/results/<run>.json."""
    return json.dumps(rounded(results), separators=(",", ":"), default=str)


def _ok(ph: dict[str, Any], test: Any) -> bool | None:
    try:
        return bool(test(ph)) if ph and "error" not in ph and "skipped" not in ph else None
    except (KeyError, TypeError):
        return None


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for server, data in results.get("servers", {}).items():
        ph = data.get("phases", {})
        curve = ph.get("burst-20000", {}).get("grant_curve") or ph.get("burst-2000", {}).get("grant_curve")
        if curve:
            step = max(1, ph.get("burst-20000", ph.get("burst-2000", {})).get("granted", 0) / max(1, len(curve)))
            axes[0].plot(curve, [i * step for i in range(len(curve))], label=server)
        lat = ph.get("rate-1000", {}).get("latencies_ms")
        if lat:
            axes[1].plot(lat, [100 * (i + 1) / len(lat) for i in range(len(lat))], label=server)
    axes[0].set(title="Grants in the kernel after a burst (knocks sent at t=0)", xlabel="s", ylabel="grants")
    axes[1].set(title="Knock-to-open latency at 1,000 knocks/s", xlabel="ms", ylabel="% of knocks", xscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"sknock benchmark {results.get('date', '')} -- {results.get('caveat', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def summarize_profile(path: Path) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> share of samples by leaf function and by stage."""
    leaf: collections.Counter[str] = collections.Counter()
    stage: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1].split(" (")[0]] += n
        joined = stack
        for key, needle in (("ecdh+decrypt (open_knock)", "open_knock"), ("signature", "verify_signature"),
                            ("certificate cache", "_verify_certificate"), ("precheck", "precheck"),
                            ("capture/receive", "receive"), ("logging", "logging"), ("channel send", "encode_request"),
                            ("journal", "journal.py"), ("table watch", "intact"),
                            ("nft (libnftables)", "json_cmd"), ("grant table", "grants.py"),
                            ("idle (select)", "select")):
            if needle in joined:
                stage[key] += n
                break
        else:
            stage["other"] += n
    if not total:
        return {}
    return {"samples": total,
            "top_self": [(k, 100 * v / total) for k, v in leaf.most_common(15)],
            "stages": {k: 100 * v / total for k, v in stage.most_common()}}


def main() -> int:
    """The .md and .png of a run again from its .json, whose derived ``cpu_per_grant`` is refreshed too
    (the figures it derives from are left as measured)."""
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".json"):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    results["cpu_per_grant"] = cpu_per_grant(results)
    path.write_text(to_json(results))
    path.with_suffix(".md").write_text(markdown(results))
    plot(results, path.with_suffix(".png"))
    print(f"bench: wrote {path}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
