"""The classic BPF program attached to the knock capture socket (``SO_ATTACH_FILTER``).

The capture socket is an ``AF_PACKET``/``SOCK_DGRAM`` socket listening to every protocol, so without a
filter a worker would wake for every packet the host sees.  This program runs in the kernel for each
packet and keeps only what may be a knock, so that userspace never copies the rest:

1. packet type ``PACKET_HOST`` only (ancillary ``SKF_AD_PKTTYPE``): our own outgoing packets, other
   hosts' traffic seen in promiscuous mode, broadcasts and multicasts are dropped;
2. at most ``max_packet`` bytes from the network header (larger packets are dropped, not truncated:
   a truncated knock is useless);
3. ethertype IPv4 or IPv6, read with the ancillary load ``SKF_AD_PROTOCOL`` because a ``SOCK_DGRAM``
   packet socket's offsets start at the network header and the link header is out of reach;
4. IPv4: version 4, protocol UDP, not a fragment (MF clear and offset 0), any IHL >= 5 (the UDP header
   offset is taken from IHL with the ``ldxb 4*([0]&0xf)`` idiom);
   IPv6: version 6, then up to :data:`~sknock.server.packet.MAX_EXTENSION_HEADERS` hop-by-hop, routing
   or destination-options headers are walked (the loop is unrolled, classic BPF has no backward
   jumps), and the header after them must be UDP; fragments and every other header are dropped;
5. the UDP destination port lies in one of ``ports`` (``None``: any port);
6. with ``knock_shape`` (the default), the payload has a knock's shape (:mod:`sknock.protocol.wire`):
   it starts with :data:`~sknock.protocol.wire.MAGIC` and :data:`~sknock.protocol.wire.VERSION`, its
   suite byte is one of :data:`~sknock.protocol.wire.SUITES` and its flags byte is 0;
7. the UDP length field is at least ``8 + min_payload``, with ``knock_shape`` exactly ``8 +`` one of
   :data:`~sknock.protocol.wire.BUCKETS`, and no larger than the bytes present.

With ``icmp`` (the ICMP carrier, :mod:`sknock.carrier`), echo requests pass too: IPv4 protocol 1 (not a
fragment, any IHL >= 5) or, after the same walk of IPv6 extension headers, ICMPv6 (58); type 8 (IPv4) or
128 (IPv6), code 0; the knock after the 8-byte echo header is held to the same shape as in step 6; and
as ICMP has no length field, the IP length fields stand in for step 7: the IP datagram's end (IPv4 total
length, or 40 + IPv6 payload length) less the echo header's offset is ``8 +`` a bucket (at least
``8 + min_payload``), and that end lies within the bytes present.  ``ports`` do not apply (ICMP has
none).  Without ``icmp`` the program is exactly the UDP-only one, instruction for instruction.

Everything the filter passes is parsed again, strictly, by :mod:`sknock.server.packet`, and the knock
header by :func:`sknock.protocol.wire.precheck`; the filter is a cheap first cut, not the validation.
The shape check exists for floods: random bytes of a knock's size would otherwise each cost a receive
and a pre-check in Python, and at a high enough rate overflow the socket and lose valid knocks with
the junk; now about one random datagram of the right size in 2**39 gets through (24 bits of magic
and version, 7 of suite, 8 of flags).
Out-of-bounds loads make classic BPF return 0, so a packet shorter than any offset read here is
dropped.

The program is built from plain data (:class:`Instruction`) so it can be inspected and packed;
:func:`pack` gives the ``struct sock_filter`` array the socket side puts behind a ``sock_fprog``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..carrier import ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST
from ..errors import ConfigError
from ..protocol import wire
from .packet import MAX_EXTENSION_HEADERS

__all__ = ["Instruction", "build_filter", "pack", "DEFAULT_MAX_PACKET", "MAX_PORT_RANGES"]

#: Largest packet (from the IP header) passed to userspace; a knock fits one unfragmented datagram.
DEFAULT_MAX_PACKET = 2048
#: Most distinct port ranges one program checks (three instructions each; BPF_MAXINSNS is 4096).
MAX_PORT_RANGES = 1000
_BPF_MAXINSNS = 4096

# Opcode fields, from linux/filter.h and linux/bpf_common.h.
_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_IMM, _ABS, _IND, _MEM, _LEN, _MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
_ADD, _SUB, _AND, _LSH = 0x00, 0x10, 0x50, 0x60
_JA, _JEQ, _JGT, _JGE, _JSET = 0x00, 0x10, 0x20, 0x30, 0x40
_K, _X = 0x00, 0x08
_TAX, _TXA = 0x00, 0x80

_SKF_AD_OFF = 0xFFFFF000  # -0x1000 as an unsigned 32-bit offset
_SKF_AD_PROTOCOL = 0
_SKF_AD_PKTTYPE = 4
_PACKET_HOST = 0
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_UDP = 17
_ICMP = 1
_ICMPV6 = 58
_IPV6_WALKED = (0, 43, 60)  # hop-by-hop, routing, destination options
_UDP_HEADER = 8
# The knock header the filter checks (docs/protocol.md): magic, version, suite, work_bits, flags.
_KNOCK_PREFIX = wire.MAGIC + bytes([wire.VERSION])  # one 32-bit load covers it and the suite byte
_KNOCK_SUITE_OFFSET = len(_KNOCK_PREFIX)  # 3
_KNOCK_FLAGS_OFFSET = _KNOCK_SUITE_OFFSET + 2  # 5, after work_bits
assert len(_KNOCK_PREFIX) == 3, "the magic check loads magic + version + suite as one word"


@dataclass(frozen=True, slots=True)
class Instruction:
    """One ``struct sock_filter``: opcode, jump-if-true and jump-if-false offsets, constant."""

    code: int
    jt: int
    jf: int
    k: int


_SOCK_FILTER = struct.Struct("=HBBI")


def pack(program: Sequence[Instruction]) -> bytes:
    """The program as the array of ``struct sock_filter`` the kernel reads (native byte order)."""
    return b"".join(_SOCK_FILTER.pack(i.code, i.jt, i.jf, i.k) for i in program)


class _Assembler:
    """Emits instructions whose jump targets are label names, then resolves them.

    Conditional jumps carry 8-bit offsets; the layout keeps them short and :meth:`resolve` checks
    it.  Far jumps go through ``ja`` (32-bit offset)."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | None, str | None, int | str]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        assert name not in self._labels, name
        self._labels[name] = len(self._code)

    def op(self, code: int, k: int = 0) -> None:
        self._code.append((code, None, None, k))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None) -> None:
        """A conditional jump; ``None`` as a target means the next instruction."""
        self._code.append((code, jt, jf, k))

    def goto(self, target: str) -> None:
        self._code.append((_JMP | _JA, None, None, target))

    def resolve(self) -> tuple[Instruction, ...]:
        program = []
        for index, (code, jt, jf, k) in enumerate(self._code):
            if isinstance(k, str):
                program.append(Instruction(code, 0, 0, self._offset(index, k)))
                continue
            true = self._offset(index, jt) if jt else 0
            false = self._offset(index, jf) if jf else 0
            assert true <= 255 and false <= 255, "conditional jump too far: fix the layout"
            program.append(Instruction(code, true, false, k))
        return tuple(program)

    def _offset(self, index: int, label: str) -> int:
        offset = self._labels[label] - index - 1
        assert offset >= 0, "classic BPF jumps only forward"
        return offset


def _merge(ports: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping and adjacent ranges joined: fewer instructions, same decision."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ports):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def build_filter(
    *,
    min_payload: int,
    ports: Sequence[tuple[int, int]] | None,
    max_packet: int = DEFAULT_MAX_PACKET,
    knock_shape: bool = True,
    icmp: bool = False,
) -> tuple[Instruction, ...]:
    """The filter program for an ``AF_PACKET``/``SOCK_DGRAM`` socket (see the module docstring).

    ``ports`` holds inclusive ``(first, last)`` UDP destination port ranges, or ``None`` for any.
    ``min_payload`` is the smallest UDP payload passed; ``knock_shape`` also requires a payload of
    exactly a bucket size with a version-1 knock header (magic, version, known suite, flags 0), which
    makes ``min_payload`` moot unless it exceeds a bucket size.  ``icmp`` also passes ICMP and ICMPv6
    echo requests carrying a knock (the module docstring says how they are checked).
    Raises :class:`~sknock.errors.ConfigError` for values no packet could satisfy sensibly.
    """
    if not 0 <= min_payload <= 65535 - 8:
        raise ConfigError(f"min_payload {min_payload} must lie between 0 and 65527")
    if not 28 <= max_packet <= 65535:
        raise ConfigError(f"max_packet {max_packet} must lie between 28 and 65535")
    ranges: list[tuple[int, int]] | None = None
    if ports is not None:
        for first, last in ports:
            if not 0 <= first <= last <= 65535:
                raise ConfigError(f"bad port range {first}-{last}: need 0 <= first <= last <= 65535")
        ranges = _merge(ports)
        if not ranges:
            raise ConfigError("an empty port list would drop every knock; pass None for any port")
        if len(ranges) > MAX_PORT_RANGES:
            raise ConfigError(f"{len(ranges)} port ranges, at most {MAX_PORT_RANGES} fit one filter")
        if ranges == [(0, 65535)]:
            ranges = None

    a = _Assembler()
    a.op(_LD | _W | _ABS, _SKF_AD_OFF + _SKF_AD_PKTTYPE)
    a.jump(_JMP | _JEQ | _K, _PACKET_HOST, None, "drop")
    a.op(_LD | _W | _LEN)
    a.jump(_JMP | _JGT | _K, max_packet, "drop", None)
    a.op(_LD | _W | _ABS, _SKF_AD_OFF + _SKF_AD_PROTOCOL)
    a.jump(_JMP | _JEQ | _K, _ETH_P_IP, None, "not4")
    # IPv4
    a.op(_LD | _B | _ABS, 0)
    a.op(_ALU | _AND | _K, 0xF0)
    a.jump(_JMP | _JEQ | _K, 0x40, None, "drop")
    a.op(_LD | _B | _ABS, 9)
    a.jump(_JMP | _JEQ | _K, _UDP, None, "icmp4_proto" if icmp else "drop")
    _ipv4_whole(a, "udp")
    if icmp:  # the same checks with ICMP in place of UDP; A holds the protocol
        a.label("icmp4_proto")
        a.jump(_JMP | _JEQ | _K, _ICMP, None, "drop")
        _ipv4_whole(a, None)
        a.goto("icmp4")
    # IPv6
    a.label("not4")
    a.jump(_JMP | _JEQ | _K, _ETH_P_IPV6, None, "drop")
    a.op(_LD | _B | _ABS, 0)
    a.op(_ALU | _AND | _K, 0xF0)
    a.jump(_JMP | _JEQ | _K, 0x60, None, "drop")
    a.op(_LDX | _W | _IMM, 40)  # X: offset of the header A names
    a.op(_LD | _B | _ABS, 6)  # A: next header
    for step in range(MAX_EXTENSION_HEADERS):
        a.jump(_JMP | _JEQ | _K, _UDP, "udp", None)
        if icmp:
            a.jump(_JMP | _JEQ | _K, _ICMPV6, "icmp6", None)
        for header in _IPV6_WALKED:
            a.jump(_JMP | _JEQ | _K, header, f"ext{step}", None)
        a.goto("drop")
        a.label(f"ext{step}")
        a.op(_LD | _B | _IND, 1)  # A = header extension length, in 8-byte units past the first 8
        a.op(_ALU | _ADD | _K, 1)
        a.op(_ALU | _LSH | _K, 3)
        a.op(_ALU | _ADD | _X)
        a.op(_ST, 0)  # M[0] = offset of the following header
        a.op(_LD | _B | _IND, 0)  # A = its type
        a.op(_LDX | _W | _MEM, 0)
    if icmp:
        a.jump(_JMP | _JEQ | _K, _UDP, "udp", None)
        a.jump(_JMP | _JEQ | _K, _ICMPV6, "icmp6", "drop")
    else:
        a.jump(_JMP | _JEQ | _K, _UDP, "udp", "drop")
    a.label("drop")
    a.op(_RET | _K, 0)
    if icmp:  # a far jump past the UDP checks, whose port ranges may be many
        a.label("icmp6")
        a.goto("icmp6_tail")
    # UDP header at X.
    a.label("udp")
    if ranges is not None:
        a.op(_LD | _H | _IND, 2)  # destination port
        for n, (first, last) in enumerate(ranges):
            nxt = f"range{n + 1}"
            if first == last:
                a.jump(_JMP | _JEQ | _K, first, None, nxt)
            else:
                a.jump(_JMP | _JGE | _K, first, None, nxt)
                a.jump(_JMP | _JGT | _K, last, nxt, None)
            a.goto("port_ok")
            a.label(nxt)
        a.op(_RET | _K, 0)
    a.label("port_ok")
    if knock_shape:
        # Payload bytes 0..3 (at X + 8): magic and version, then the suite; byte 5: flags.  Random
        # junk fails the first test, so it costs the kernel a handful of instructions and Python
        # nothing.  The loads stay inside the UDP datagram: its length is checked below to be a
        # bucket size (>= 6) and within the packet.
        _knock_shape(a, "suite_ok", "reject")
    a.op(_LD | _H | _IND, 4)  # UDP length
    _knock_length(a, min_payload, knock_shape, "length_ok", "reject")
    a.op(_ST, 1)
    a.op(_LD | _W | _LEN)
    a.op(_ALU | _SUB | _X)  # bytes from the UDP header to the end of the packet
    a.op(_LDX | _W | _MEM, 1)
    a.jump(_JMP | _JGE | _X, 0, None, "reject")
    a.op(_RET | _K, max_packet)
    a.label("reject")
    a.op(_RET | _K, 0)
    if icmp:
        _icmp_tail(a, min_payload=min_payload, max_packet=max_packet, knock_shape=knock_shape)
    program = a.resolve()
    assert len(program) <= _BPF_MAXINSNS
    return program


def _ipv4_whole(a: _Assembler, then: str | None) -> None:
    """Not a fragment, and X = the IPv4 header's length (IHL >= 5); then on to ``then`` (None: the next
    instruction), else to "drop"."""
    a.op(_LD | _H | _ABS, 6)
    a.jump(_JMP | _JSET | _K, 0x3FFF, "drop", None)
    a.op(_LDX | _B | _MSH, 0)  # X = 4 * IHL
    a.op(_MISC | _TXA)
    a.jump(_JMP | _JGE | _K, 20, then, "drop")


def _knock_shape(a: _Assembler, suite_ok: str, reject: str) -> None:
    """The knock header's shape (magic, version, suite, flags), read at X + 8: after the UDP or echo header."""
    a.op(_LD | _W | _IND, _UDP_HEADER)
    a.op(_ALU | _AND | _K, 0xFFFFFF00)
    a.jump(_JMP | _JEQ | _K, int.from_bytes(_KNOCK_PREFIX + b"\0", "big"), None, reject)
    a.op(_LD | _B | _IND, _UDP_HEADER + _KNOCK_SUITE_OFFSET)
    suites = sorted(wire.SUITES)
    for suite in suites[:-1]:
        a.jump(_JMP | _JEQ | _K, suite, suite_ok, None)
    a.jump(_JMP | _JEQ | _K, suites[-1], None, reject)
    a.label(suite_ok)
    a.op(_LD | _B | _IND, _UDP_HEADER + _KNOCK_FLAGS_OFFSET)
    a.jump(_JMP | _JEQ | _K, 0, None, reject)


def _knock_length(a: _Assembler, min_payload: int, knock_shape: bool, length_ok: str, reject: str) -> None:
    """A holds a UDP or echo message's length, header included: at least ``8 + min_payload``, and with
    ``knock_shape`` exactly 8 + a bucket size; falls through when it is."""
    a.jump(_JMP | _JGE | _K, _UDP_HEADER + min_payload, None, reject)
    if knock_shape:
        buckets = sorted(set(wire.BUCKETS))
        for size in buckets[:-1]:
            a.jump(_JMP | _JEQ | _K, _UDP_HEADER + size, length_ok, None)
        a.jump(_JMP | _JEQ | _K, _UDP_HEADER + buckets[-1], None, reject)
        a.label(length_ok)


def _icmp_tail(a: _Assembler, *, min_payload: int, max_packet: int, knock_shape: bool) -> None:
    """The ICMP carrier's checks, after the UDP ones: the echo request's type and code and the IP
    datagram's end, for IPv4 ("icmp4") and IPv6 ("icmp6_tail"), X at the ICMP header; then what both
    share ("icmp_end", A = the datagram's end)."""
    a.label("icmp4")
    a.op(_LD | _B | _IND, 0)
    a.jump(_JMP | _JEQ | _K, ICMP_ECHO_REQUEST, None, "icmp_reject")
    a.op(_LD | _B | _IND, 1)
    a.jump(_JMP | _JEQ | _K, 0, None, "icmp_reject")
    a.op(_LD | _H | _ABS, 2)  # IPv4 total length: the datagram's end
    a.goto("icmp_end")
    a.label("icmp6_tail")
    a.op(_LD | _B | _IND, 0)
    a.jump(_JMP | _JEQ | _K, ICMPV6_ECHO_REQUEST, None, "icmp_reject")
    a.op(_LD | _B | _IND, 1)
    a.jump(_JMP | _JEQ | _K, 0, None, "icmp_reject")
    a.op(_LD | _H | _ABS, 4)
    a.op(_ALU | _ADD | _K, 40)  # IPv6 payload length + its fixed header: the datagram's end
    a.label("icmp_end")
    a.op(_ST, 2)  # M[2] = end of the IP datagram
    if knock_shape:
        _knock_shape(a, "icmp_suite_ok", "icmp_reject")
    a.op(_LD | _MEM, 2)
    a.op(_ALU | _SUB | _X)  # the echo message's length: from its header to the datagram's end
    if not knock_shape:  # an end before the header wraps around; the bucket sizes rule that out otherwise
        a.jump(_JMP | _JGT | _K, 0xFFFF, "icmp_reject", None)
    _knock_length(a, min_payload, knock_shape, "icmp_length_ok", "icmp_reject")
    a.op(_LD | _W | _LEN)
    a.op(_LDX | _W | _MEM, 2)
    a.jump(_JMP | _JGE | _X, 0, None, "icmp_reject")  # the datagram's end is within the packet
    a.op(_RET | _K, max_packet)
    a.label("icmp_reject")
    a.op(_RET | _K, 0)
