"""Port lists in both spellings: round trips and refusals (property-based)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sknock.errors import PortSpecError
from sknock.ports import PortRange, PortSet, Protocol, parse_certificate_ports, parse_ports


@st.composite
def port_ranges(draw: st.DrawFn) -> PortRange:
    first = draw(st.integers(1, 65535))
    last = draw(st.integers(first, min(65535, first + draw(st.sampled_from([0, 0, 1, 10, 70000])))))
    return PortRange(draw(st.sampled_from(list(Protocol))), first, last)


port_sets = st.lists(port_ranges(), min_size=1, max_size=12).map(PortSet.of)


@given(port_sets)
def test_admin_form_round_trips(ports: PortSet) -> None:
    assert parse_ports(str(ports)) == ports


@given(port_sets)
def test_certificate_form_round_trips(ports: PortSet) -> None:
    assert parse_certificate_ports(ports.certificate_form()) == ports


@given(port_sets)
def test_both_forms_agree(ports: PortSet) -> None:
    assert parse_ports(str(ports)) == parse_certificate_ports(ports.certificate_form())


@given(st.text(max_size=40))
def test_admin_parser_only_raises_port_spec_error(text: str) -> None:
    try:
        result = parse_ports(text)
    except PortSpecError:
        return
    assert result  # anything accepted is a non-empty set


@given(st.text(alphabet="01.,-/tcpu 9", max_size=30))
def test_certificate_parser_only_raises_port_spec_error(text: str) -> None:
    try:
        result = parse_certificate_ports(text)
    except PortSpecError:
        return
    assert result


@given(st.lists(port_ranges(), min_size=1, max_size=6), st.data())
def test_membership_matches_ranges(ranges: list[PortRange], data: st.DataObject) -> None:
    ports = PortSet.of(ranges)
    r = data.draw(st.sampled_from(ranges))
    port = data.draw(st.integers(r.first, r.last))
    assert (r.protocol, port) in ports


def test_original_sknock_entries_mean_the_same() -> None:
    assert parse_certificate_ports("1.2000,1.3000,0.8000") == parse_ports("tcp/2000,tcp/3000,udp/8000")


@pytest.mark.parametrize(
    "text",
    ["", ",", "tcp/22,", "tcp/0", "tcp/65536", "sctp/22", "tcp22", "tcp/10-5", "tcp/-5", "tcp/1-2-3", "tcp/ 2 2"],
)
def test_bad_admin_lists_refused(text: str) -> None:
    with pytest.raises(PortSpecError):
        parse_ports(text)


@pytest.mark.parametrize("text", ["", "2.22", "1:22", "tcp.22", "1.0", "1.65536", "1.22,", "1.5-4", "01.22"])
def test_bad_certificate_lists_refused(text: str) -> None:
    with pytest.raises(PortSpecError):
        parse_certificate_ports(text)


@given(st.integers(-70000, 140000), st.integers(-70000, 140000))
def test_a_range_is_checked_whenever_it_is_made(first: int, last: int) -> None:
    if 1 <= first <= last <= 65535:
        assert PortRange(Protocol.TCP, first, last).ports() == range(first, last + 1)
    else:
        with pytest.raises(PortSpecError):
            PortRange(Protocol.TCP, first, last)


def test_a_port_set_is_a_set_not_a_tuple() -> None:
    ports = parse_ports("tcp/22,udp/8000-8001")
    assert (Protocol.TCP, 22) in ports and (Protocol.UDP, 8001) in ports
    assert (Protocol.UDP, 22) not in ports and ports.ranges not in ports
    assert ports == parse_certificate_ports("0.8000-8001,1.22")
    assert hash(ports) == hash(parse_ports("udp/8000-8001,tcp/22"))
    assert ports != ports.ranges and PortSet(()) != PortSet.of([PortRange(Protocol.TCP, 1, 1)])
    with pytest.raises(AttributeError):
        ports.ranges = ()  # type: ignore[misc]
