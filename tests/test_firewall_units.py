"""Firewall parts that need no root: the values, the nft ruleset builder, backend choice, and the
command backend (which runs real processes, just not firewall ones)."""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sknock.errors import SknockError
from sknock.ports import PortSet, Protocol, parse_ports
from sknock.server.firewall import (
    Firewall,
    FirewallError,
    FirewallPolicy,
    HostProbe,
    Opening,
    decide_backend,
    make_firewall,
)
from sknock.server.firewall.command import CommandFirewall, substitute
from sknock.server.firewall.iptables import datestop_for
from sknock.server.firewall.nftables import boot_ruleset, build_ruleset

V4 = ipaddress.ip_address("198.18.0.2")
V6 = ipaddress.ip_address("fd00::2")


# --- values -----------------------------------------------------------------------------------

@given(st.integers())
def test_opening_port_range_is_enforced(port: int) -> None:
    if 1 <= port <= 65535:
        assert Opening(V4, Protocol.TCP, port).port == port
    else:
        with pytest.raises(FirewallError, match="port"):
            Opening(V4, Protocol.TCP, port)


@pytest.mark.parametrize("address, protocol, port", [
    ("198.18.0.2", Protocol.TCP, 22), (V4, "tcp", 22), (V4, Protocol.TCP, True), (V4, Protocol.TCP, "22"),
])
def test_opening_rejects_wrong_types(address: object, protocol: object, port: object) -> None:
    with pytest.raises(FirewallError) as caught:
        Opening(address, protocol, port)  # type: ignore[arg-type]
    assert isinstance(caught.value, SknockError)


def test_policy_rejects_unknown_mode() -> None:
    with pytest.raises(FirewallError, match="firewallPolicy"):
        FirewallPolicy("deny")  # type: ignore[arg-type]


# --- nft ruleset ------------------------------------------------------------------------------

def _verdicts(policy: FirewallPolicy) -> list[str]:
    rules = [c["add"]["rule"]["expr"] for c in build_ruleset(policy) if "rule" in c.get("add", {})]
    return [next(iter(r[-1])) for r in rules]


def test_ruleset_order_follows_the_original_policy() -> None:
    policy = FirewallPolicy("reject", None, emergency_ssh=True, always_open=parse_ports("udp/62201"))
    commands = build_ruleset(policy)
    # a leftover table is replaced in the same batch, and only table inet sknock is ever named
    assert commands[:3] == [{"add": {"table": {"family": "inet", "name": "sknock"}}},
                            {"delete": {"table": {"family": "inet", "name": "sknock"}}},
                            {"add": {"table": {"family": "inet", "name": "sknock"}}}]
    text = json.dumps(commands)
    assert '"table": "sknock"' in text and "admin" not in text
    # lo, ct, icmp, icmpv6, ssh, always_open, grants4, grants6: all accept; then tcp reset, then the rest
    assert _verdicts(policy) == ["accept"] * 8 + ["reject", "reject"]
    assert _verdicts(FirewallPolicy("drop", None, emergency_ssh=False)) == ["accept"] * 6 + ["drop"]
    assert _verdicts(FirewallPolicy("none", None, emergency_ssh=False)) == ["accept"] * 6


@given(st.lists(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535), st.integers(0, 50)),
                min_size=1, max_size=20),
       st.sampled_from(["reject", "drop"]))
def test_ruleset_covers_every_protected_port(entries: list[tuple[str, int, int]], mode: str) -> None:
    spec = ",".join(f"{p}/{a}-{min(a + n, 65535)}" for p, a, n in entries)
    protected = parse_ports(spec)
    rules = [c["add"]["rule"]["expr"] for c in build_ruleset(FirewallPolicy(mode, protected))  # type: ignore[arg-type]
             if "rule" in c.get("add", {})]
    covered: set[tuple[str, int, int]] = set()
    for expr in rules:
        if next(iter(expr[-1])) != "accept":
            left = expr[0]["match"]["left"]["payload"]
            right = expr[0]["match"]["right"]
            items = right["set"] if isinstance(right, dict) else [right]
            for item in items:
                lo, hi = item["range"] if isinstance(item, dict) else (item, item)
                covered.add((left["protocol"], lo, hi))
    assert covered == {(r.protocol.label, r.first, r.last) for r in protected.ranges}


# --- backend choice ---------------------------------------------------------------------------

def probe(iptables: str = "nf_tables", legacy: bool = True, nft: bool = True, iptc: bool = True) -> HostProbe:
    return HostProbe(iptables, legacy, nft, iptc)  # type: ignore[arg-type]


@pytest.mark.parametrize("host, expected", [
    (probe("nf_tables"), "nftables"),  # Debian 12
    (probe("missing", legacy=False), "nftables"),
    (probe("unknown", legacy=False), "nftables"),
    (probe("legacy"), "iptables"),
    (probe("legacy", legacy=False), "iptables"),
])
def test_auto_choice(host: HostProbe, expected: str) -> None:
    assert decide_backend("auto", host) == expected


@pytest.mark.parametrize("name, host, needle", [
    ("auto", probe("nf_tables", nft=False), "libnftables1"),
    ("auto", probe("legacy", iptc=False), "python-iptables"),
    ("auto", probe("unknown", legacy=True), "explicitly"),
    ("nftables", probe(nft=False), "pip-nftables"),
    ("iptables", probe(iptc=False), "python-iptables"),
    ("ipfw", probe(), "unknown firewall backend"),
])
def test_choice_errors_name_the_fix(name: str, host: HostProbe, needle: str) -> None:
    with pytest.raises(FirewallError, match=needle):
        decide_backend(name, host)


def test_explicit_choice_is_honoured() -> None:
    assert decide_backend("command", probe(nft=False, iptc=False)) == "command"
    assert decide_backend("iptables", probe("nf_tables")) == "iptables"


def test_factory_rejects_unknown_and_missing_options() -> None:
    with pytest.raises(FirewallError, match="unknown option"):
        make_firewall("command", FirewallPolicy("none"), open_command="true %IP%", close_command="true %IP%", x=1)
    with pytest.raises(FirewallError, match="close_command"):
        make_firewall("command", FirewallPolicy("none"), open_command="true %IP%")


# --- command backend --------------------------------------------------------------------------

RECORDER = """import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\\n")
"""


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    return f"{sys.executable} {script}", tmp_path / "calls.jsonl"


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_command_backend_runs_templates(recorder: tuple[str, Path]) -> None:
    prog, log = recorder
    fw = CommandFirewall(FirewallPolicy("none"),
                         open_command=f"{prog} {log} open --from %IP% %PROTO%/%PORT% for=%DURATION%s",
                         close_command=f"{prog} {log} close %IP% %PROTO% %PORT%")
    assert fw.kernel_expiry is False
    fw.setup()
    a, b = Opening(V4, Protocol.TCP, 22), Opening(V6, Protocol.UDP, 8000)
    fw.open(a, 1.2)
    fw.open(b, 30)
    fw.open(a, 60)  # extend: the open command runs again with the new duration
    assert fw.openings() == [a, b]
    fw.close(a)
    fw.close(a)  # idempotent: nothing run the second time
    fw.teardown()
    assert fw.openings() == []
    assert calls(log) == [
        ["open", "--from", "198.18.0.2", "tcp/22", "for=2s"],
        ["open", "--from", "fd00::2", "udp/8000", "for=30s"],
        ["open", "--from", "198.18.0.2", "tcp/22", "for=60s"],
        ["close", "198.18.0.2", "tcp", "22"],
        ["close", "fd00::2", "udp", "8000"],
    ]


def test_command_backend_never_uses_a_shell(recorder: tuple[str, Path], tmp_path: Path) -> None:
    prog, log = recorder
    canary = tmp_path / "pwned"
    hostile = f"'a b; touch {canary}' '$(touch {canary})' '`touch {canary}`' \"x|y&&z\""
    fw = CommandFirewall(FirewallPolicy("none"), open_command=f"{prog} {log} {hostile} %IP%",
                         close_command=f"{prog} {log} %IP%")
    fw.open(Opening(V4, Protocol.TCP, 22), 5)
    assert calls(log) == [[f"a b; touch {canary}", f"$(touch {canary})", f"`touch {canary}`", "x|y&&z", "198.18.0.2"]]
    assert not canary.exists()


PLACEHOLDER_VALUES = st.fixed_dictionaries({p: st.text() for p in ("%IP%", "%PROTO%", "%PORT%", "%DURATION%")})


@given(st.lists(st.text(), max_size=5), PLACEHOLDER_VALUES)
def test_substitute_never_splits_or_merges_arguments(template: list[str], values: dict[str, str]) -> None:
    assert len(substitute(template, values)) == len(template)


PIECES = st.lists(st.one_of(st.sampled_from(["%IP%", "%PROTO%", "%PORT%", "%DURATION%"]),
                             st.text().filter(lambda t: "%" not in t)), max_size=6)


@given(st.lists(PIECES, max_size=5), PLACEHOLDER_VALUES)
def test_substitute_replaces_every_placeholder_once(args: list[list[str]], values: dict[str, str]) -> None:
    """Arguments built from literal text and placeholders come out as the literal text with each
    placeholder replaced by its value -- whatever the value holds (%, spaces, quotes)."""
    template = ["".join(pieces) for pieces in args]
    expected = ["".join(values.get(piece, piece) for piece in pieces) for pieces in args]
    assert substitute(template, values) == expected


def test_substituted_placeholder_text_stays_literal() -> None:
    assert substitute(["%IP%:%PORT%"], {"%IP%": "%PORT%", "%PORT%": "22", "%PROTO%": "", "%DURATION%": ""}) == [
        "%PORT%:22"]


def test_command_failure_carries_stderr(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.stderr.write('ERROR: could not add rule\\n')\nsys.exit(3)\n")
    fw = CommandFirewall(FirewallPolicy("none"), open_command=f"{sys.executable} {script} %IP%",
                         close_command=f"{sys.executable} {script} %IP%")
    with pytest.raises(FirewallError, match=r"command: opening .* status 3: ERROR: could not add rule"):
        fw.open(Opening(V4, Protocol.TCP, 22), 5)
    assert fw.openings() == []


def test_command_timeout_and_missing_program(tmp_path: Path) -> None:
    slow = CommandFirewall(FirewallPolicy("none"),
                           open_command=f"{sys.executable} -c 'import time; time.sleep(60)' %IP%",
                           close_command="true %IP%", timeout=0.5)
    with pytest.raises(FirewallError, match="did not finish within 0.5 s"):
        slow.open(Opening(V4, Protocol.TCP, 22), 5)
    missing = CommandFirewall(FirewallPolicy("none"), open_command=f"{tmp_path}/no-such-tool %IP%",
                              close_command="true %IP%")
    with pytest.raises(FirewallError, match="cannot run"):
        missing.open(Opening(V4, Protocol.TCP, 22), 5)


@pytest.mark.parametrize("template, needle", [
    ("", "empty"), ("ufw allow 'unterminated %IP%", "cannot be split"), ("ufw allow from any", "%IP%"),
    ("%IP% allow", "program itself"),
])
def test_bad_templates_are_refused(template: str, needle: str) -> None:
    with pytest.raises(FirewallError, match=needle):
        CommandFirewall(FirewallPolicy("none"), open_command=template, close_command="true %IP%")


def test_protected_portset_type_checked() -> None:
    with pytest.raises(FirewallError, match="protected"):
        FirewallPolicy("drop", protected="tcp/22")  # type: ignore[arg-type]
    assert FirewallPolicy("drop", protected=PortSet(())).protected == PortSet(())


# --- the policy outlives the server -----------------------------------------------------------

def test_boot_ruleset_replaces_the_table_and_holds_the_policy() -> None:
    policy = FirewallPolicy("reject", parse_ports("tcp/2000-2010"), always_open=parse_ports("udp/62201"))
    text = boot_ruleset(policy, priority=-10)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    # declare, delete, create: loaded over an existing table it replaces it instead of appending rules
    assert lines[:3] == ["table inet sknock", "delete table inet sknock", "table inet sknock {"]
    assert "\t\ttype filter hook input priority -10; policy accept;" in lines
    assert text.count("flags timeout") == 2 and "elements" not in text
    rules = [line.strip() for line in lines if line.startswith("\t\t") and line.strip().endswith(
        ("accept", "drop", "reset", "port-unreachable"))]
    assert len(rules) == len([c for c in build_ruleset(policy) if "rule" in c.get("add", {})])
    assert rules[-1] == "tcp dport { 2000-2010 } reject with tcp reset"
    assert "udp dport 62201 accept" in rules


@pytest.mark.parametrize("bad", ['lo" accept', "lo\naccept", "", "{x}"])
def test_boot_ruleset_renders_only_plain_words(bad: str) -> None:
    from sknock.server.firewall.nftables import _text_statement

    with pytest.raises(FirewallError, match="cannot render"):
        _text_statement({"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": bad}})


@given(st.floats(1e9, 4e9), st.floats(0.001, 7 * 24 * 3600))
def test_iptables_datestop_holds_to_the_second(now: float, seconds: float) -> None:
    """xt_time matches while the whole second of arrival is <= datestop: the grant holds until
    datestop + 1, which is at least now + seconds and less than a second later."""
    stop = datestop_for(now, seconds)
    assert now + seconds <= stop + 1 < now + seconds + 1


@given(st.integers(0, 2**31 - 1))
def test_iptables_datestop_text_is_utc(stop: int) -> None:
    from sknock.server.firewall.iptables import _datestop_text, _datestop_value

    assert _datestop_value(_datestop_text(stop)) == stop


def test_iptables_datestop_leaves_the_process_time_zone_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """libxt_time sets TZ=UTC in the process that parses a datestop; the backend puts it back."""
    try:
        from sknock.server.firewall.iptables import _Family, load_iptc

        iptc = load_iptc()
    except FirewallError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        offset = time.localtime(1_800_000_000).tm_gmtoff
        rule = _Family(iptc, 4).grant_rule(Opening(V4, Protocol.TCP, 22), 1_800_000_000)
        assert [m.get_all_parameters() for m in rule.matches if m.name == "time"] == [
            {"datestop": ["2027-01-15T08:00:00"]}]
        assert time.localtime(1_800_000_000).tm_gmtoff == offset == -8 * 3600
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_command_backend_holds_no_kernel_state(recorder: tuple[str, Path]) -> None:
    prog, log = recorder
    fw = CommandFirewall(FirewallPolicy("none"), open_command=f"{prog} {log} open %IP% %PORT% %DURATION%",
                         close_command=f"{prog} {log} close %IP% %PORT%")
    a, b = Opening(V4, Protocol.TCP, 22), Opening(V6, Protocol.UDP, 8000)
    assert fw.setup() == []
    assert fw.intact() is True
    fw.open(a, 60)
    assert fw.intact() is True
    assert fw.restore([(a, 12.5), (b, 0.0), (b, -3.0)]) == [(a, 12.5)]  # no time left: not reopened
    assert fw.openings() == [a]
    assert fw.boot_ruleset() is None
    assert calls(log) == [["open", "198.18.0.2", "22", "60"], ["open", "198.18.0.2", "22", "13"]]


class _MemoryFirewall(Firewall):
    """The smallest backend: what the base class's defaults do with it."""

    name = "memory"
    kernel_expiry = False

    def __init__(self) -> None:
        self.grants: dict[Opening, float] = {}
        self.setups = 0

    def setup(self) -> list[tuple[Opening, float]]:
        self.setups += 1
        self.grants.clear()
        return []

    def open(self, opening: Opening, duration: float) -> None:
        self.grants[opening] = duration

    def close(self, opening: Opening) -> None:
        self.grants.pop(opening, None)

    def openings(self) -> list[Opening]:
        return list(self.grants)

    def teardown(self) -> None:
        self.grants.clear()


def test_base_defaults_restore_by_setup_and_apply() -> None:
    fw = _MemoryFirewall()
    fw.open(Opening(V6, Protocol.TCP, 1), 5)
    a = Opening(V4, Protocol.TCP, 22)
    assert fw.intact() is True and fw.boot_ruleset() is None
    assert fw.restore([(a, 7.5), (Opening(V4, Protocol.UDP, 53), 0)]) == [(a, 7.5)]
    assert fw.setups == 1 and fw.grants == {a: 7.5}


# -- the raw netlink listing of a set's keys (nfnetlink._keys_in), on bytes built here -------------------

def _nla(kind: int, value: bytes) -> bytes:
    import struct

    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _element(key: bytes, shape: str) -> bytes:
    """One NFTA_LIST_ELEM as a kernel dump writes it: the key, then (``timed``) a timeout and an
    expiration, or (``comment``) a comment too, which only the attribute-by-attribute path reads."""
    body = _nla(1, _nla(1, key))  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
    if shape in ("timed", "comment"):
        body += _nla(4, (30000).to_bytes(8, "big")) + _nla(5, (29000).to_bytes(8, "big"))
    if shape == "comment":
        body += _nla(6, b"\x00\x00\x00\x00\x06\x00\x00\x00by hand")  # NFTA_SET_ELEM_USERDATA
    return _nla(1, body)


@given(st.sampled_from([12, 24]).flatmap(lambda size: st.tuples(
    st.just(size), st.lists(st.tuples(st.binary(min_size=size, max_size=size),
                                      st.sampled_from(["timed", "bare", "comment"])), max_size=40))))
def test_set_keys_are_read_whatever_the_shape_of_each_element(case: tuple[int, list[tuple[bytes, str]]]) -> None:
    """The usual shapes go through one regular expression, anything else attribute by attribute; either
    way every key comes out, in order, and none is made up from the bytes of another attribute."""
    from sknock.server.firewall.nfnetlink import _keys_in

    size, elements = case
    blob = b"".join(_element(key, shape) for key, shape in elements)
    assert _keys_in(blob, size) == [key for key, _ in elements]
