"""The signer interface of seal_knock: a key in memory or anything else that signs (a token) makes the same
kind of datagram, and the server's checks accept it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sknock.errors import KnockBuildError
from sknock.ports import Protocol
from sknock.protocol import KnockSigner, SoftwareSigner, as_signer, max_certificate_size, seal_knock, verify_signature
from sknock.protocol.seal import ecdsa_signature_size
from tests.test_protocol import CLIENT, SERVER, SERVER_FP, full_open, vector_request

CERT = b"\x30" * 300  # the protocol carries the certificate as bytes; the signature is what is tested here


@dataclass
class ExternalSigner:
    """Signs as a token does: randomised ECDSA-SHA256 made outside sknock, returned as DER."""

    key: ec.EllipticCurvePrivateKey
    calls: int = 0
    pad: int = 0

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def sign(self, message: bytes) -> bytes:
        self.calls += 1
        return self.key.sign(message, ec.ECDSA(hashes.SHA256())) + b"\x00" * self.pad

    @property
    def signature_size(self) -> int:
        return ecdsa_signature_size(self.key.curve)


def _seal(signer: object) -> bytes:
    return seal_knock(vector_request(), client_key=signer, client_certificate=CERT,  # type: ignore[arg-type]
                      server_public_key=SERVER.public_key(), server_fingerprint=SERVER_FP, work_bits=0)


def test_an_external_signer_makes_a_knock_the_server_verifies() -> None:
    signer = ExternalSigner(CLIENT)
    assert isinstance(signer, KnockSigner)
    opened = full_open(_seal(signer))
    assert signer.calls == 1
    verify_signature(CLIENT.public_key(), opened.signature, opened.signed_message)
    assert opened.request.ports == ((Protocol.TCP, 22), (Protocol.UDP, 8000))
    # The same size class as a key in memory: where the key lives changes nothing on the wire.
    assert len(_seal(signer)) == len(_seal(CLIENT))


def test_a_signer_that_overruns_its_size_is_refused_before_sending() -> None:
    with pytest.raises(KnockBuildError, match="more than its"):
        _seal(ExternalSigner(CLIENT, pad=80))


@pytest.mark.parametrize("make", [
    lambda: ec.generate_private_key(ec.SECP384R1()),
    ed25519.Ed25519PrivateKey.generate,
    lambda: rsa.generate_private_key(65537, 2048),
])
def test_keys_in_memory_are_wrapped_and_signers_pass_through(make) -> None:  # type: ignore[no-untyped-def]
    key = make()
    wrapped = as_signer(key)
    assert isinstance(wrapped, SoftwareSigner) and wrapped.key is key
    assert wrapped.public_key() == key.public_key()
    verify_signature(key.public_key(), wrapped.sign(b"m"), b"m")
    assert max_certificate_size(key) == max_certificate_size(wrapped)
    external = ExternalSigner(CLIENT)
    assert as_signer(external) is external
