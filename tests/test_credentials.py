"""Loading PKCS#12, certificates and passwords: what works, and every refusal names the file."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from sknock.credentials import (
    load_certificate,
    load_certificates,
    load_client_pfx,
    load_server_pfx,
    resolve_password,
)
from sknock.errors import CredentialError
from tests.pki import PASSWORD, TestPKI


def _pfx(path: Path, key: object, cert: object, cas: list[object] | None = None, password: bytes = b"pw") -> Path:
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"t",
            key,  # type: ignore[arg-type]
            cert,  # type: ignore[arg-type]
            cas,  # type: ignore[arg-type]
            serialization.BestAvailableEncryption(password),
        )
    )
    return path


def test_client_pfx_loads_with_str_or_bytes_password(pki: TestPKI) -> None:
    for pw in (PASSWORD, PASSWORD.encode()):
        creds = load_client_pfx(pki.alice.pfx, pw)
        assert creds.certificate == pki.alice.certificate
        assert creds.ca_certificates == (pki.ca_cert,)
        assert isinstance(creds.key, ec.EllipticCurvePrivateKey)


def test_the_ca_protects_a_pfx_at_least_like_openssl_3_defaults(pki: TestPKI) -> None:
    """sknock-ca's PKCS#12: PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) for the key and the certificates and
    a SHA-256 MAC, none with fewer rounds than ``openssl pkcs12 -export`` uses by default (2048)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to read the PKCS#12 structure with")
    info = subprocess.run(
        ["openssl", "pkcs12", "-info", "-noout", "-in", str(pki.alice.pfx), "-passin", f"pass:{PASSWORD}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stderr
    assert re.search(r"^MAC: sha256, Iteration (\d+)", info, re.M), info
    bags = re.findall(r"PBES2, PBKDF2, AES-256-CBC, Iteration (\d+), PRF hmacWithSHA256", info)
    assert len(bags) == 2, info  # the shrouded key bag and the certificates' encrypted data
    rounds = [int(n) for n in bags + re.findall(r"^MAC: sha256, Iteration (\d+)", info, re.M)]
    assert min(rounds) >= 2048, info


def test_a_pfx_with_more_kdf_rounds_still_loads(pki: TestPKI, tmp_path: Path) -> None:
    """Files written before sknock-ca used OpenSSL's default rounds (100 000) keep loading."""
    creds = load_client_pfx(pki.alice.pfx, PASSWORD)
    path = tmp_path / "old.pfx"
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(100_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(b"pw")
    )
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"alice", creds.key, creds.certificate, list(creds.ca_certificates), encryption  # type: ignore[arg-type]
    ))
    old = load_client_pfx(path, "pw")
    assert old.certificate == creds.certificate and old.ca_certificates == creds.ca_certificates
    with pytest.raises(CredentialError, match=r"old\.pfx: wrong password"):
        load_client_pfx(path, "not-pw")


def test_other_client_key_types_load(pki: TestPKI) -> None:
    assert isinstance(load_client_pfx(pki.ed25519.pfx, PASSWORD).key, ed25519.Ed25519PrivateKey)
    assert isinstance(load_client_pfx(pki.rsa.pfx, PASSWORD).key, rsa.RSAPrivateKey)


def test_intermediate_client_pfx_carries_the_whole_chain(pki: TestPKI) -> None:
    assert load_client_pfx(pki.bob.pfx, PASSWORD).ca_certificates == (pki.intermediate.certificate, pki.ca_cert)


def test_server_pfx_loads(pki: TestPKI) -> None:
    creds = load_server_pfx(pki.server.pfx, PASSWORD)
    assert creds.certificate == pki.server.certificate
    assert creds.key.curve.name == "secp256r1"


def test_server_refuses_non_ec_key(pki: TestPKI) -> None:
    with pytest.raises(CredentialError, match=r"ed25519\.pfx.*unsupported key type"):
        load_server_pfx(pki.ed25519.pfx, PASSWORD)
    with pytest.raises(CredentialError, match="unsupported key type RSA 2048"):
        load_server_pfx(pki.rsa.pfx, PASSWORD)


def _self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = TestPKI.now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(9)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_client_refuses_small_rsa_and_small_curves(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CredentialError, match=r"rsa1024\.pfx: unsupported key type RSA 1024"):
        load_client_pfx(_pfx(tmp_path / "rsa1024.pfx", small, _self_signed(small)), "pw")
    k224 = ec.generate_private_key(ec.SECP224R1())
    with pytest.raises(CredentialError, match="unsupported key type EC secp224r1"):
        load_client_pfx(_pfx(tmp_path / "p224.pfx", k224, _self_signed(k224)), "pw")


def test_pfx_without_key_or_cert(tmp_path: Path, pki: TestPKI) -> None:
    nokey = tmp_path / "nokey.pfx"
    nokey.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"t", None, pki.alice.certificate, None, serialization.BestAvailableEncryption(b"pw")
        )
    )
    with pytest.raises(CredentialError, match="nokey.pfx: holds no private key"):
        load_client_pfx(nokey, "pw")
    nocert = tmp_path / "nocert.pfx"
    key = ec.generate_private_key(ec.SECP256R1())
    nocert.write_bytes(
        pkcs12.serialize_key_and_certificates(b"t", key, None, None, serialization.BestAvailableEncryption(b"pw"))
    )
    with pytest.raises(CredentialError, match="nocert.pfx: holds no certificate"):
        load_server_pfx(nocert, "pw")


@pytest.mark.parametrize("password", ["wrong", b"", None])
def test_wrong_password(pki: TestPKI, password: str | bytes | None) -> None:
    with pytest.raises(CredentialError, match=r"alice\.pfx.*(wrong password|cannot open)"):
        load_client_pfx(pki.alice.pfx, password)


def test_missing_unreadable_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match=r"absent\.pfx: no such file"):
        load_client_pfx(tmp_path / "absent.pfx", "pw")
    with pytest.raises(CredentialError, match="is a folder, not a file"):
        load_server_pfx(tmp_path, "pw")
    garbage = tmp_path / "garbage.pfx"
    garbage.write_bytes(os.urandom(512))
    with pytest.raises(CredentialError, match="garbage.pfx: wrong password, or not a PKCS#12"):
        load_client_pfx(garbage, "pw")
    huge = tmp_path / "huge.pfx"
    huge.write_bytes(b"\0" * (2 << 20))
    with pytest.raises(CredentialError, match=r"huge\.pfx: larger than 1048576 bytes"):
        load_client_pfx(huge, "pw")


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    p = tmp_path / "secret.pfx"
    p.write_bytes(b"x")
    p.chmod(0)
    with pytest.raises(CredentialError, match="permission denied"):
        load_client_pfx(p, "pw")


def test_certificates_der_pem_bundle(tmp_path: Path, pki: TestPKI) -> None:
    assert load_certificate(pki.ca_dir / "ca.cer") == pki.ca_cert
    assert load_certificate(pki.ca_dir / "ca.pem") == pki.ca_cert
    assert load_certificate(pki.server.cer) == pki.server.certificate
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (pki.intermediate.certificate, pki.ca_cert))
    )
    assert load_certificates(bundle) == [pki.intermediate.certificate, pki.ca_cert]
    assert load_certificates(pki.ca_dir / "ca.cer") == [pki.ca_cert]


def test_bad_certificate_files(tmp_path: Path, pki: TestPKI) -> None:
    bad = tmp_path / "bad.cer"
    bad.write_bytes(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CredentialError, match=r"bad\.cer: not a PEM or DER"):
        load_certificate(bad)
    pem = tmp_path / "bad.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CredentialError, match=r"bad\.pem"):
        load_certificates(pem)
    with pytest.raises(CredentialError, match="no such file"):
        load_certificate(tmp_path / "nope.cer")


def test_resolve_password_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"from-file\nsecond line\n")
    monkeypatch.setenv("SKNOCK_PFX_PASSWORD", "from-env")
    assert resolve_password(f) == b"from-file"
    assert resolve_password(None) == b"from-env"
    monkeypatch.setenv("OTHER_VAR", "other")
    assert resolve_password(None, env_var="OTHER_VAR") == b"other"
    monkeypatch.delenv("SKNOCK_PFX_PASSWORD")
    with pytest.raises(CredentialError, match="SKNOCK_PFX_PASSWORD"):
        resolve_password(None, interactive=False)
    # stand in for the terminal only; resolve_password itself runs for real
    monkeypatch.setattr("getpass.getpass", lambda prompt: "typed" if prompt == "PFX? " else "")
    assert resolve_password(None, prompt="PFX? ", interactive=True) == b"typed"
    crlf = tmp_path / "crlf"
    crlf.write_bytes(b"dos\r\n")
    assert resolve_password(crlf) == b"dos"


def test_resolve_password_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"\nsecret-on-line-2\n")
    with pytest.raises(CredentialError, match="empty: first line is empty"):
        resolve_password(empty)
    with pytest.raises(CredentialError, match="password file .*missing: no such file"):
        resolve_password(tmp_path / "missing")
