"""The fuzz target: bytes in, datagrams to the real verifier, and what must hold of its answers.

One input becomes one datagram through one of three generators (the input's first byte picks it), and
the datagram is checked as four copies (from the address A, then B, A again and C) by a fresh
:class:`~sknock.verifier.KnockVerifier` at the fixed time :data:`NOW`:

RAW          the bytes as they are; or behind a valid header (so they reach the ECDH and the AEAD); or a
             valid knock with some bytes overwritten.
PLAINTEXT    a plaintext sealed correctly to the server key, so the fuzzer reaches the decrypted
             parser: either the bytes as they are, or a request encoded field by field from the input
             (any action, family, address, duration, ports), carrying one of the world's certificates
             or any bytes as the certificate, with a real signature or any bytes as the signature.
CERTIFICATE  a certificate an attacker builds (tests/forged.py: DER by hand) from parts the input
             chooses -- version, serial, names with any string type and bytes, validity, key,
             extensions (real ones, the ports extension with any text, or any OID and bytes) -- signed
             by the attacker's key or by the CA's (so a chain can pass and the ports extension is
             read), optionally with bytes overwritten, sealed in a knock signed with the leaf's key.

What must hold (:func:`run_one` raises AssertionError, or lets the verifier's exception through, when
not): nothing but :class:`~sknock.errors.KnockRefused` comes out of ``check``, never with reason
``internal-error``; every refusal's text is one printable line; a datagram is granted at most once over
its four copies, and the client name in a grant is printable.

Everything is deterministic (keys derived from fixed labels, RFC 6979 signatures, fixed time), so an
input always does the same thing: a crash file replays.  Nothing here needs atheris; the atheris
entry point is tests/fuzz/harness.py and the hypothesis fallback is in tests/fuzz/test_fuzz.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from sknock.certificate import PORTS_OID, encode_utf8string, ports_general_name
from sknock.errors import KnockRefused, Reason
from sknock.ports import parse_ports
from sknock.protocol import (
    BUCKETS,
    HEADER_SIZE,
    VERSION,
    Header,
    fingerprint,
    seal_plaintext,
    signed_message,
)
from sknock.trust import ClientVerifier
from sknock.verifier import Grant, KnockVerifier, VerifierPolicy
from tests import forged

__all__ = ["NOW", "World", "world", "generate", "run_one", "Outcome", "RAW", "PLAINTEXT", "CERTIFICATE"]

NOW = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC).timestamp()
A = ipaddress.IPv4Address("198.18.0.2")
B = ipaddress.IPv4Address("198.18.0.66")
C = ipaddress.IPv6Address("fd00:5e::66")
COPIES = (A, B, A, C)
RAW, PLAINTEXT, CERTIFICATE = 0, 1, 2
MODES = 3
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_OVERHEAD = HEADER_SIZE + 65 + 16
ALICE_PORTS = "tcp/22,tcp/2000-2010,udp/8000"


def derived_key(label: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key that is the same on every run (a fixed label hashed to a scalar)."""
    scalar = int.from_bytes(hashlib.sha256(b"sknock fuzz " + label.encode()).digest(), "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: flags.get(n, False) for n in names})


@dataclass(frozen=True)
class Client:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    der: bytes


class World:
    """A small PKI made with cryptography (real keys, real signatures), the same on every run."""

    def __init__(self) -> None:
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        end = dt.datetime(2036, 1, 1, tzinfo=dt.UTC)
        self.ca_key = derived_key("ca")
        self.ca = self._ca(self.ca_key, start, end)
        self.stranger_ca_key = derived_key("stranger-ca")
        stranger_ca = self._ca(self.stranger_ca_key, start, end)  # the same name as ours, another key
        self.server_key = derived_key("server")
        self.server = self._issue(
            self.ca_key, self.ca, "fuzz-server", self.server_key, 2, start, end,
            [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
        )
        self.clients: dict[str, Client] = {}
        for serial, (name, issuer_key, issuer, ports, until) in enumerate([
            ("alice", self.ca_key, self.ca, ALICE_PORTS, end),
            ("mallory", self.ca_key, self.ca, "tcp/22", end),  # revoked
            ("old", self.ca_key, self.ca, "tcp/22", dt.datetime(2026, 6, 1, tzinfo=dt.UTC)),  # expired
            ("noports", self.ca_key, self.ca, None, end),
            ("stranger", self.stranger_ca_key, stranger_ca, "tcp/22", end),
        ], start=10):
            key = derived_key(name)
            extensions: list[tuple[x509.ExtensionType, bool]] = [
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            ]
            if ports:
                extensions.append((x509.SubjectAlternativeName([ports_general_name(parse_ports(ports))]), False))
            cert = self._issue(issuer_key, issuer, name, key, serial, start, until, extensions)
            self.clients[name] = Client(key, cert, cert.public_bytes(serialization.Encoding.DER))
        self.crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.subject)
            .last_update(dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
            .next_update(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
            .add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(self.clients["mallory"].certificate.serial_number)
                .revocation_date(dt.datetime(2026, 10, 1, tzinfo=dt.UTC))
                .build()
            )
            .sign(self.ca_key, hashes.SHA256(), ecdsa_deterministic=True)
        )
        self.trust = ClientVerifier([self.ca], [], [self.crl], require_crl=True)
        self.server_public = self.server_key.public_key()
        self.server_fingerprint = fingerprint(self.server.public_bytes(serialization.Encoding.DER))
        self.ephemeral = derived_key("ephemeral")
        self.attacker = derived_key("attacker")
        self.leaf_key = derived_key("leaf")  # the key in certificates the CERTIFICATE generator builds
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()).public_bytes()

    @staticmethod
    def _ca(key: ec.EllipticCurvePrivateKey, start: dt.datetime, end: dt.datetime) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(_name("sknock Fuzz Root CA"))
            .issuer_name(_name("sknock Fuzz Root CA"))
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
        )

    @staticmethod
    def _issue(
        issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, name: str, key: ec.EllipticCurvePrivateKey,
        serial: int, start: dt.datetime, end: dt.datetime, extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)

    def verifier(self) -> KnockVerifier:
        return KnockVerifier(
            server_key=self.server_key, server_certificate=self.server, trust=self.trust,
            policy=VerifierPolicy(min_work_bits=0, replay_capacity=64, certificate_cache_size=16),
        )

    # -- sealing ---------------------------------------------------------------------------------------

    def header(self, coarse_time: int, suite: int = 1) -> Header:
        return Header(VERSION, suite, 0, 0, coarse_time & 0xFFFFFFFF, self.server_fingerprint[:4], 0)

    def seal(self, plaintext: bytes, header: Header) -> bytes:
        return seal_plaintext(
            plaintext, header, ephemeral_key=self.ephemeral, server_public_key=self.server_public,
            server_fingerprint=self.server_fingerprint,
        )

    def ephemeral_point(self) -> bytes:
        return self.ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def signed_knock(
        self, request: bytes, certificate: bytes, signer: ec.EllipticCurvePrivateKey | bytes, *,
        coarse_time: int, bucket: int = 0,
    ) -> bytes:
        """A knock whose plaintext is ``request`` (already encoded, possibly invalid), the certificate
        and a signature by ``signer`` (or ``signer`` itself as the signature when it is bytes)."""
        header = self.header(coarse_time)
        signed = request + struct.pack("!H", len(certificate) & 0xFFFF) + certificate
        if isinstance(signer, bytes):
            signature = signer
        else:
            message = signed_message(header, self.ephemeral_point(), self.server_fingerprint, signed)
            signature = signer.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        body = signed + struct.pack("!H", len(signature) & 0xFFFF) + signature
        size = next((b for b in BUCKETS[bucket % len(BUCKETS):] if b - _P256_OVERHEAD >= len(body)), BUCKETS[-1])
        return self.seal(body[: size - _P256_OVERHEAD].ljust(size - _P256_OVERHEAD, b"\0"), header)


@cache
def world() -> World:
    return World()


# -- reading the fuzzer's bytes ------------------------------------------------------------------------


class Reader:
    """Structured values from the fuzzer's bytes; past the end everything reads as zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def sint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big", signed=True)

    def chunk(self, limit: int = 1200) -> bytes:
        """A length (two bytes, at most ``limit``) and that many bytes (fewer at the end)."""
        n = min(self.uint(2), limit)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


# -- the generators ----------------------------------------------------------------------------------


def _raw(r: Reader, w: World) -> bytes:
    kind = r.byte() % 3
    if kind == 0:
        return r.rest()
    if kind == 1:  # behind a valid header: reaches the point decoding, the ECDH and the AEAD
        suite = r.byte()
        suite = suite % 2 + 1 if suite < 250 else r.byte()  # mostly a real suite
        flags = r.byte() if r.byte() == 255 else 0
        header = Header(VERSION, suite, 0, flags, int(NOW) + r.sint(1) // 16, w.server_fingerprint[:4], 0)
        size = BUCKETS[r.byte() % len(BUCKETS)]
        body = r.rest()[: size - HEADER_SIZE].ljust(size - HEADER_SIZE, b"\0")
        return header.pack() + body
    # a valid knock with some bytes overwritten
    knock = bytearray(_valid_knock(w))
    for _ in range(r.byte() % 9):
        position = r.uint(2) % len(knock)
        knock[position] = r.byte()
    return bytes(knock)


@cache
def _valid_knock(w: World) -> bytes:
    alice = w.clients["alice"]
    return w.signed_knock(request_bytes(int(NOW * 1000), bytes(16), 1, 0, b"", 0, [(1, 22)]), alice.der, alice.key,
                          coarse_time=int(NOW))


def request_bytes(
    timestamp_ms: int, nonce: bytes, action: int, family: int, address: bytes, duration: int,
    ports: list[tuple[int, int]], count: int | None = None,
) -> bytes:
    """A request encoded field by field, whatever the values (see sknock/protocol/request.py)."""
    out = struct.pack("!Q16sBB", timestamp_ms & (2**64 - 1), nonce, action & 0xFF, family & 0xFF) + address
    out += struct.pack("!IB", duration & 0xFFFFFFFF, (len(ports) if count is None else count) & 0xFF)
    for protocol, port in ports:
        out += struct.pack("!BH", protocol & 0xFF, port & 0xFFFF)
    return out


_FAMILIES: tuple[tuple[int, Callable[[Reader], bytes]], ...] = (
    (0, lambda r: b""),
    (4, lambda r: A.packed),
    (4, lambda r: B.packed),
    (6, lambda r: C.packed),
    (4, lambda r: r.take(4)),
    (6, lambda r: r.take(16)),
)


def _request(r: Reader) -> tuple[bytes, int]:
    """A request from the input: valid values mostly (so that the checks behind the parser are
    reached), any value where the input says so."""
    timestamp_ms = int(NOW * 1000) + r.sint(1) * 64  # within about 8 s, across the 7 s window
    nonce = r.take(16)
    action = r.byte()
    action = action % 2 + 1 if action < 250 else r.byte()
    choice = r.byte()
    if choice < len(_FAMILIES) * 40:
        family, address_of = _FAMILIES[choice % len(_FAMILIES)]
        address = address_of(r)
    else:
        family, address = r.byte(), r.take(r.byte() % 20)
    duration = r.uint(4) if r.byte() > 200 else r.byte()  # (the condition's byte is read first)
    count = r.byte()
    if count < 200:
        ports = [(r.byte() % 2, 22 if r.byte() < 128 else r.uint(2)) for _ in range(count % 4 + 1)]
    else:
        ports = [(r.byte(), r.uint(2)) for _ in range(count % 40)]
    wrong_count = r.byte() == 255
    encoded = request_bytes(timestamp_ms, nonce, action, family, address, duration, ports,
                            count=r.byte() if wrong_count else None)
    return encoded, timestamp_ms // 1000 + (r.sint(1) if r.byte() == 255 else 0)  # and the clear coarse time


def _plaintext(r: Reader, w: World) -> bytes:
    if r.byte() % 2 == 0:  # the bytes themselves as the plaintext
        coarse_time = int(NOW) + r.sint(1) // 16
        size = BUCKETS[r.byte() % len(BUCKETS)] - _P256_OVERHEAD
        return w.seal(r.rest()[:size].ljust(size, b"\0"), w.header(coarse_time))
    request, coarse_time = _request(r)
    names = sorted(w.clients)
    pick = r.byte()
    if pick < len(names) * 30:
        client = w.clients[names[pick % len(names)]]
        certificate, key = client.der, client.key
    else:
        certificate, key = r.chunk(), w.attacker
    how = r.byte() % 4
    signer: ec.EllipticCurvePrivateKey | bytes = key if how < 2 else w.attacker if how == 2 else r.chunk(200)
    return w.signed_knock(request, certificate, signer, coarse_time=coarse_time, bucket=r.byte())


# names and string types an attacker may put in a certificate
_NAME_OIDS = [o.dotted_string for o in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.SERIAL_NUMBER,
                                        NameOID.EMAIL_ADDRESS, NameOID.USER_ID, NameOID.DOMAIN_COMPONENT,
                                        NameOID.X500_UNIQUE_IDENTIFIER, NameOID.COUNTRY_NAME)]
_STRING_TAGS = [0x0C, 0x13, 0x16, 0x1E, 0x14, 0x1C, 0x03, 0x04, 0x02, 0x30]


def _oid(r: Reader) -> str:
    arcs = [str(r.byte() % 3), str(r.byte() % 40)] + [str(r.uint(2)) for _ in range(r.byte() % 6)]
    return ".".join(arcs)


def _name_der(r: Reader, w: World, default: bytes) -> bytes:
    kind = r.byte() % 4
    if kind == 0:
        return default
    if kind == 1:
        return r.chunk(200)  # any bytes at all where the Name goes
    attributes = []
    for _ in range(r.byte() % 4 + 1):
        oid = _NAME_OIDS[r.byte() % len(_NAME_OIDS)] if r.byte() < 240 else _oid(r)
        attributes.append((oid, _STRING_TAGS[r.byte() % len(_STRING_TAGS)], r.chunk(64)))
    return forged.der_name(*attributes)


def _time_der(r: Reader, good: dt.datetime) -> bytes:
    kind = r.byte() % 4
    if kind == 0:
        return forged.der_time(good)
    if kind == 1:
        return forged.der_time(good + dt.timedelta(days=r.sint(2)))
    return forged.tlv((0x17, 0x18)[kind % 2], r.chunk(20))


def _extension_der(r: Reader, w: World) -> bytes:
    critical = r.byte() % 4 == 0
    kind = r.byte() % 9
    if kind == 0:
        return forged.der_extension(ExtensionOID.BASIC_CONSTRAINTS.dotted_string,
                                    x509.BasicConstraints(ca=bool(r.byte() % 2), path_length=None).public_bytes(),
                                    critical)
    if kind == 1:
        flags = r.byte()
        usage = _key_usage(digital_signature=bool(flags & 1), key_agreement=bool(flags & 2),
                           key_cert_sign=bool(flags & 4))
        return forged.der_extension(ExtensionOID.KEY_USAGE.dotted_string, usage.public_bytes(), critical)
    if kind == 2:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH][: r.byte() % 2 + 1]
        return forged.der_extension(ExtensionOID.EXTENDED_KEY_USAGE.dotted_string,
                                    x509.ExtendedKeyUsage(usages).public_bytes(), critical)
    if kind == 3:  # the ports extension with any text
        text = r.chunk(80).decode("utf-8", "replace")
        other = x509.OtherName(PORTS_OID, encode_utf8string(text))
        return forged.der_extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string,
                                    x509.SubjectAlternativeName([other]).public_bytes(), critical)
    if kind == 4:  # the ports otherName with any bytes as its value
        value = forged.tlv(0xA0, r.chunk(80))
        other_name = forged.tlv(0xA0, forged.der_oid(PORTS_OID.dotted_string) + value)
        return forged.der_extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string, forged.seq(other_name),
                                    critical)
    if kind == 5:
        return forged.der_extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string, w.aki, critical)
    if kind == 6:
        return forged.der_extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string,
                                    forged.tlv(0x04, r.take(20)), critical)
    oid = _oid(r) if kind == 7 else (ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string,
                                     ExtensionOID.KEY_USAGE.dotted_string, ExtensionOID.NAME_CONSTRAINTS.dotted_string,
                                     ExtensionOID.CRL_DISTRIBUTION_POINTS.dotted_string)[r.byte() % 4]
    return forged.der_extension(oid, r.chunk(120), critical)


def _certificate(r: Reader, w: World) -> bytes:
    """A certificate from parts the input chooses, signed by the CA's key or the attacker's."""
    version_kind = r.byte() % 8
    if version_kind < 3:
        version = forged.der_int(2)  # v3, mostly
    elif version_kind == 3:
        version = b""  # v1: no version field
    elif version_kind == 4:
        version = forged.der_int(r.sint(1))
    else:
        version = forged.tlv(0x02, r.chunk(10)) if version_kind < 7 else r.chunk(10)
    serial = forged.der_int(r.uint(2) + 100) if r.byte() < 200 else forged.tlv(0x02, r.chunk(30))
    algorithm_oid = forged.ECDSA_SHA256 if r.byte() < 230 else _oid(r)
    algorithm = forged.seq(forged.der_oid(algorithm_oid))
    issuer = _name_der(r, w, w.ca.subject.public_bytes())
    subject = _name_der(r, w, forged.der_name((NameOID.COMMON_NAME.dotted_string, forged.UTF8STRING, b"fuzzed")))
    not_before = _time_der(r, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    not_after = _time_der(r, dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    key_kind = r.byte() % 8
    if key_kind < 6:
        public_key = b""  # the leaf key's: the knock's signature can verify
    elif key_kind == 6:
        public_key = r.chunk(120)
    else:
        public_key = derived_key("other").public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if r.byte() < 128:  # a real client's extensions, plus the authority key id, then what the input adds
        extensions = [*forged.client_extensions(parse_ports(ALICE_PORTS)),
                      forged.der_extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string, w.aki)]
    else:
        extensions = []
    extensions += [_extension_der(r, w) for _ in range(r.byte() % 5)]
    parts = forged.CertificateParts(version, serial, algorithm, issuer, not_before, not_after, subject, public_key,
                                    tuple(extensions))
    signer = w.ca_key if r.byte() < 160 else w.attacker
    tbs = parts.tbs(w.leaf_key)
    signature = signer.sign(tbs, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    der = bytearray(forged.seq(tbs, algorithm, forged.tlv(0x03, b"\x00" + signature)))
    mutations = r.byte() % 4 if r.byte() > 200 else 0  # (the condition's byte is read first)
    for _ in range(mutations):  # some bytes overwritten, after signing
        position = r.uint(2) % len(der)
        der[position] = r.byte()
    return bytes(der)


def _attacker_certificate(r: Reader, w: World) -> bytes:
    certificate = _certificate(r, w)
    request, coarse_time = _request(r)
    return w.signed_knock(request, certificate, w.leaf_key, coarse_time=coarse_time, bucket=1)


_GENERATORS: tuple[Callable[[Reader, World], bytes], ...] = (_raw, _plaintext, _attacker_certificate)


def generate(data: bytes) -> bytes:
    """The datagram the input ``data`` stands for."""
    r = Reader(data)
    return _GENERATORS[r.byte() % MODES](r, world())


# -- the target ----------------------------------------------------------------------------------------

Outcome = Grant | Reason


def run_one(data: bytes) -> list[Outcome]:
    """Check the datagram ``data`` stands for, as four copies; assert what must hold (module doc)."""
    w = world()
    datagram = generate(data)
    verifier = w.verifier()
    outcomes: list[Outcome] = []
    for source in COPIES:
        try:
            outcomes.append(verifier.check(datagram, source, NOW))
        except KnockRefused as refusal:
            text = str(refusal)
            assert refusal.reason is not Reason.INTERNAL_ERROR, text
            assert text.isprintable() and len(text) <= 500, text
            outcomes.append(refusal.reason)
    grants = [o for o in outcomes if isinstance(o, Grant)]
    assert len(grants) <= 1, f"one datagram granted {len(grants)} times: {grants}"
    for grant in grants:
        assert grant.client.isprintable(), grant.client
    return outcomes
