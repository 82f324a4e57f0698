"""Regenerate tests/vectors/knock-v1.json (only when the protocol version changes on purpose).

Every input is derived from a fixed label, so the datagram is fully deterministic: ECDSA signatures are
RFC 6979 deterministic and the proof of work is searched from nonce 0.
Run from the repo root: PYTHONPATH=. python tests/vectors/generate.py
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sknock.ports import Protocol
from sknock.protocol import Action, KnockRequest, seal_knock

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def scalar(label: str) -> int:
    return int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % P256_ORDER


def main() -> None:
    server = ec.derive_private_key(scalar("sknock vector server"), ec.SECP256R1())
    client = ec.derive_private_key(scalar("sknock vector client"), ec.SECP256R1())
    ephemeral = ec.derive_private_key(scalar("sknock vector ephemeral"), ec.SECP256R1())
    certificate = hashlib.sha256(b"cert").digest() * 16  # 512 opaque bytes: the codec does not parse it
    server_fp = hashlib.sha256(b"sknock vector server certificate").digest()
    request = KnockRequest(
        ports=((Protocol.TCP, 22), (Protocol.UDP, 8000)),
        timestamp_ms=1767225600123,  # 2026-01-01T00:00:00.123Z
        nonce=bytes(range(16)),
        action=Action.OPEN,
        source_address=ipaddress.IPv4Address("198.18.0.2"),
        duration=30,
    )
    datagram = seal_knock(
        request,
        client_key=client,
        client_certificate=certificate,
        server_public_key=server.public_key(),
        server_fingerprint=server_fp,
        work_bits=8,
        ephemeral_key=ephemeral,
    )
    shared = ephemeral.exchange(ec.ECDH(), server.public_key())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    vector = {
        "server_private_scalar": f"{server.private_numbers().private_value:064x}",
        "client_private_scalar": f"{client.private_numbers().private_value:064x}",
        "ephemeral_private_scalar": f"{ephemeral.private_numbers().private_value:064x}",
        "client_certificate": certificate.hex(),
        "server_fingerprint": server_fp.hex(),
        "timestamp_ms": request.timestamp_ms,
        "nonce": request.nonce.hex(),
        "ports": ["tcp/22", "udp/8000"],
        "source_address": "198.18.0.2",
        "duration": 30,
        "work_bits": 8,
        "ephemeral_public": point.hex(),
        "shared_secret": shared.hex(),
        "datagram": datagram.hex(),
    }
    out = Path(__file__).with_name("knock-v1.json")
    out.write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {out} ({len(datagram)} byte datagram)")


if __name__ == "__main__":
    main()
