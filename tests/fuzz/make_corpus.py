"""Write the seed corpus, tests/fuzz/corpus/: ``python -m tests.fuzz.make_corpus`` from the repository root.

Each seed is an input for tests/fuzz/world.py, written field by field in the order its generators read
them, and named ``EXPECTED--what`` where EXPECTED is what the verifier answers the first copy
(``granted`` or a refusal reason); tests/fuzz/test_fuzz.py checks every seed still gets its answer, so a
change to the generators that makes the seeds meaningless is noticed.  The seeds give the fuzzer a
valid knock of each kind to start from, and the malformed certificates that once ended a worker.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from tests import forged
from tests.fuzz.world import CERTIFICATE, PLAINTEXT, RAW, world

CORPUS = Path(__file__).resolve().parent / "corpus"


class Writer:
    """The inverse of world.Reader: bytes that read back as the given values."""

    def __init__(self) -> None:
        self.out = bytearray()

    def byte(self, value: int) -> Writer:
        self.out.append(value & 0xFF)
        return self

    def uint(self, n: int, value: int) -> Writer:
        self.out += value.to_bytes(n, "big")
        return self

    def sint(self, n: int, value: int) -> Writer:
        self.out += value.to_bytes(n, "big", signed=True)
        return self

    def take(self, data: bytes) -> Writer:
        self.out += data
        return self

    def chunk(self, data: bytes) -> Writer:
        self.out += struct.pack("!H", len(data)) + data
        return self


def request(w: Writer, *, family: int = 0, port_kind: int = 0, port: int = 22, seed: int = 1) -> Writer:
    """A valid request as world._request reads it: now, open, one TCP port, the default duration.
    ``family``: 0 none, 1 bound to A, 2 bound to B, 3 bound to C (world._FAMILIES)."""
    w.sint(1, 0).take(bytes([seed]) * 16).byte(0).byte(family)
    w.byte(0).byte(0)  # duration: not the long form; 0 = the server's default
    w.byte(0)  # one port
    w.byte(1)  # TCP
    if port_kind:
        w.byte(200).uint(2, port)
    else:
        w.byte(0)  # port 22
    return w.byte(0).byte(0)  # the count as written; the clear time as the request's


def plaintext(pick: int, *, how: int = 0, family: int = 0, seed: int = 1, certificate: bytes = b"") -> bytes:
    w = Writer().byte(PLAINTEXT).byte(1)
    request(w, family=family, seed=seed)
    w.byte(pick)
    if pick >= 150:
        w.chunk(certificate)
    return bytes(w.byte(how).byte(0).out)


def certificate(
    *, version: tuple[int, ...] = (0,), issuer: tuple[int, ...] = (0,), subject: tuple[int, ...] = (0,),
    defaults: int = 0, extras: tuple[bytes, ...] = (), signer: int = 0, seed: int = 1,
) -> bytes:
    """An input for the CERTIFICATE generator; each tuple is the raw bytes of one choice (see world)."""
    w = Writer().byte(CERTIFICATE)
    for b in version:
        w.byte(b)
    w.byte(0).uint(2, seed)  # serial 100 + seed
    w.byte(0)  # ECDSA-SHA256
    for part in (issuer, subject):
        for b in part:
            w.byte(b)
    w.byte(0).byte(0)  # validity as it should be
    w.byte(0)  # the leaf key
    w.byte(defaults).byte(len(extras))
    for extra in extras:
        w.take(extra)
    w.byte(signer).byte(0)  # signed by the CA (0) or the attacker (255); no bytes overwritten
    request(w, seed=seed)
    return bytes(w.out)


def name(*attributes: tuple[int, int, bytes]) -> tuple[int, ...]:
    """A Name as world._name_der reads it: (index into _NAME_OIDS, index into _STRING_TAGS, value)."""
    out = [2, len(attributes) - 1]
    for oid, tag, value in attributes:
        out += [0, oid, tag, *struct.pack("!H", len(value)), *value]
    return tuple(out)


def extension(kind: int, *rest: int, critical: bool = False, data: bytes = b"") -> bytes:
    head = bytes([0 if critical else 1, kind, *rest])
    return head + (struct.pack("!H", len(data)) + data if data or kind in (3, 4) else b"")


def seeds() -> dict[str, bytes]:
    attacker = ec.derive_private_key(7, ec.SECP256R1())
    out = {
        "bad-length--junk": bytes([RAW, 0]) + b"not a knock",
        "malformed-header--zero-point-behind-a-header": bytes([RAW, 1, 0, 0, 0, 0]) + bytes(64),
        "granted--a-valid-knock": bytes([RAW, 2, 0]),
        "decrypt-failed--a-byte-of-the-ciphertext-changed": bytes([RAW, 2, 1, 2, 0, 0x5A]),
        "malformed--zero-plaintext": bytes([PLAINTEXT, 0, 0, 0]),
        "granted--alice": plaintext(0),
        "granted--alice-bound-to-A": plaintext(0, family=1, seed=2),
        "source-mismatch--alice-bound-to-B": plaintext(0, family=2, seed=3),
        "cert-revoked--mallory": plaintext(1),
        "not-authorized--noports": plaintext(2),
        "cert-expired--old": plaintext(3),
        "cert-untrusted--stranger": plaintext(4),
        "bad-signature--alice-signed-by-another-key": plaintext(0, how=2),
        "granted--a-ca-signed-certificate": certificate(),
        "cert-untrusted--an-attacker-signed-certificate": certificate(signer=255),
        "cert-invalid--version-3": certificate(version=(4, 3)),
        "cert-invalid--v1": certificate(version=(3,)),
        "cert-invalid--subject-utf8-0xff": certificate(subject=name((0, 0, b"\xffattacker"))),
        "cert-invalid--issuer-utf8-0xff": certificate(issuer=name((0, 0, b"sknock Fuzz Root CA\xff"))),
        "cert-invalid--subject-bit-string": certificate(subject=name((0, 6, b"\x00attacker"))),
        "not-authorized--ports-extension-with-odd-text": certificate(defaults=255, extras=(
            extension(1, 1, critical=True), extension(2, 0), extension(5), extension(3, data=b"1.23,0.8\n"),
        )),
        "cert-invalid--ports-extension-not-a-port-list": certificate(defaults=255, extras=(
            extension(1, 1, critical=True), extension(2, 0), extension(5), extension(3, data=b"1.22,x"),
        )),
    }
    for kind, build in sorted(forged.MALFORMED.items()):
        out[f"cert-invalid--sealed-{kind}"] = plaintext(255, certificate=build(attacker), seed=9)
    return out


def main() -> int:
    world()
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.iterdir():
        old.unlink()
    for name_, data in seeds().items():
        (CORPUS / name_).write_bytes(data)
    print(f"wrote {len(seeds())} seeds to {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
