"""Client keys on a PKCS#11 token, with SoftHSM2 as the real module (sknock.token, issue 12 §3).

Each test gets its own SoftHSM2 token directory (``SOFTHSM2_CONF`` naming a config in the test's tmp
dir), initialises a token with ``softhsm2-util`` and GENERATES the EC P-256 key pair ON THE TOKEN with
OpenSC's ``pkcs11-tool``.  The certificate request is signed on the token (``python -m sknock.cli.token
csr``), the certificate issued by ``sknock-ca client NAME --csr`` from a copy of the test PKI's CA (the
same key and certificate, so the real server trusts it; the session's CA index stays untouched).

Everything that touches the token runs in a child process: a PKCS#11 module reads its configuration
once per process, so the one process per test keeps each test's token its own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sknock.ports import Protocol
from sknock.verifier import KnockVerifier
from tests.netns import TestNet, require_netns
from tests.pki import PASSWORD, TestPKI
from tests.server_harness import ENV, REPO, RunningServer

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PY = sys.executable
PIN = "246810"
SO_PIN = "13579135"
LABEL = "knocker"
PORT = 2005


def _missing() -> str | None:
    if not MODULE.is_file():
        return f"needs SoftHSM2 ({MODULE}: Debian's softhsm2)"
    for tool in ("softhsm2-util", "pkcs11-tool"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian's softhsm2 and opensc)"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "needs python-pkcs11 (pip install -e '.[token]')"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@dataclass
class SoftToken:
    """One SoftHSM2 token dir with token LABEL holding an EC P-256 key pair made on it (id 01)."""

    root: Path
    env: dict[str, str]
    pin_file: Path

    def uri(self, *, key_id: str = "%01", token: str = LABEL, module: Path = MODULE, extra: str = "") -> str:
        return f"pkcs11:token={token};id={key_id};type=private?module-path={module}{extra}"

    def tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["pkcs11-tool", "--module", str(MODULE), "--token-label", LABEL, *args],
                              env=self.env, capture_output=True, text=True, timeout=60, check=True)

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, *args], env=self.env, capture_output=True, text=True, timeout=60, cwd=REPO)

    def csr(self, name: str) -> Path:
        out = self.root / f"{name}.csr"
        result = self.python("-m", "sknock.cli.token", "csr", self.uri(), "--name", name, "--out", str(out),
                             "--pin-file", str(self.pin_file))
        assert result.returncode == 0, result.stderr
        return out

    def lock_user_pin(self) -> None:
        """Set CKF_USER_PIN_LOCKED in the token's flags, as a token does after too many wrong PINs
        (SoftHSM2 counts none itself).  Its file store keeps them as its vendor attribute 0x8000534B
        (CKA_OS_TOKENFLAGS): the attribute's 8-byte type, a value kind 2 (an unsigned long), the value."""
        [token_file] = self.root.glob("tokens/*/token.object")
        data = bytearray(token_file.read_bytes())
        marker = bytes.fromhex("000000008000534b" "0000000000000002")
        at = data.index(marker) + len(marker)
        flags = int.from_bytes(data[at : at + 8], "big") | 0x00040000  # CKF_USER_PIN_LOCKED
        data[at : at + 8] = flags.to_bytes(8, "big")
        token_file.write_bytes(bytes(data))


@pytest.fixture
def token(tmp_path: Path) -> SoftToken:
    root = tmp_path / "softhsm"
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**ENV, "SOFTHSM2_CONF": str(conf)}
    env.pop("SKNOCK_TOKEN_PIN", None)
    env.pop("SKNOCK_PFX_PASSWORD", None)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--so-pin", SO_PIN, "--pin", PIN],
                   env=env, capture_output=True, text=True, timeout=60, check=True)
    pin_file = root / "pin"
    pin_file.write_text(PIN + "\n")
    made = SoftToken(root, env, pin_file)
    made.tool("--login", "--pin", PIN, "--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "knock")
    return made


def issue_from_csr(pki: TestPKI, tmp_path: Path, name: str, csr: Path, allow: str) -> Path:
    """``sknock-ca client NAME --allow ALLOW --csr CSR`` on a copy of the test CA; the certificate's path."""
    ca_copy = tmp_path / "ca"
    if not ca_copy.exists():
        shutil.copytree(pki.ca_dir, ca_copy)
    (tmp_path / "ca.pass").write_text(PASSWORD + "\n")
    result = subprocess.run(
        [PY, "-m", "sknock.cli.ca", "--dir", str(ca_copy), "--password-file", str(tmp_path / "ca.pass"),
         "client", name, "--allow", allow, "--csr", str(csr)],
        env=ENV, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    cer = ca_copy / "client" / f"{name}.cer"
    assert not (ca_copy / "client" / f"{name}.pfx").exists()  # no private key ever came to the CA
    return cer


def knock_cli(token: SoftToken, pki: TestPKI, uri: str, *args: str, ns: TestNet | None = None,
              host: str = "198.18.0.1") -> subprocess.CompletedProcess[str]:
    argv = [PY, "-m", "sknock.cli.knock", "--pfx", uri, "--server-cert", str(pki.server.cer),
            "--password-file", str(token.pin_file), *args, host]
    if ns is not None:
        argv = ns.client.cmd(*argv)
    return subprocess.run(argv, env=token.env, capture_output=True, text=True, timeout=60, cwd=REPO,
                          stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sknock-knock: error: ")
    return lines[0]


# -- the request and the certificate -------------------------------------------------------------------


def test_csr_is_signed_on_the_token_and_the_ca_issues_for_its_key(pki: TestPKI, token: SoftToken,
                                                                tmp_path: Path) -> None:
    csr_path = token.csr("tok1")
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    # OpenSSL agrees the request's signature (made through CKM_ECDSA) is good.
    check = subprocess.run(["openssl", "req", "-in", str(csr_path), "-noout", "-verify"],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "verify OK" in (check.stdout + check.stderr)
    # Its key is the token's public key object: read it with pkcs11-tool, independently of sknock.
    public_der = tmp_path / "pub.der"
    token.tool("--read-object", "--type", "pubkey", "--id", "01", "--output-file", str(public_der))
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    assert load_der_public_key(public_der.read_bytes()) == csr.public_key()
    cer = issue_from_csr(pki, tmp_path, "tok1", csr_path, "tcp/2005")
    cert = x509.load_der_x509_certificate(cer.read_bytes())
    assert cert.public_key() == csr.public_key()
    assert cert.issuer == pki.ca_cert.subject
    assert cert.subject.rfc4514_string() == "CN=tok1"


def test_a_knock_signed_on_the_token_is_granted_by_the_servers_verifier(pki: TestPKI, token: SoftToken,
                                                                        tmp_path: Path) -> None:
    cer = issue_from_csr(pki, tmp_path, "tok2", token.csr("tok2"), "tcp/2005")
    # The certificate goes onto the token beside the key; the client finds it there (same id).
    token.tool("--login", "--pin", PIN, "--write-object", str(cer), "--type", "cert", "--id", "01", "--label", "knock")
    script = (
        "import sys, time\n"
        "from sknock.client import KnockClient\n"
        "from sknock.ports import Protocol\n"
        "from sknock.token import TokenSigner\n"
        f"c = KnockClient(client_pfx={token.uri()!r}, pfx_password={PIN!r}, server_cert={str(pki.server.cer)!r})\n"
        "assert isinstance(c.credentials.key, TokenSigner)\n"
        f"print(c.build_knock([(Protocol.TCP, {PORT})], now=time.time()).hex())\n"
    )
    result = token.python("-c", script)
    assert result.returncode == 0, result.stderr
    datagram = bytes.fromhex(result.stdout.strip())
    verifier = KnockVerifier(server_key=pki.server.credentials.key, server_certificate=pki.server.certificate,
                             trust=pki.verifier())
    import ipaddress

    grant = verifier.check(datagram, ipaddress.ip_address("198.18.0.2"), time.time())
    assert grant.ports == ((Protocol.TCP, PORT),)
    assert "tok2" in grant.client


# -- end to end: the real server in a namespace -----------------------------------------------------


def test_knock_with_the_key_on_the_token_is_granted_end_to_end(pki: TestPKI, token: SoftToken,
                                                               tmp_path: Path) -> None:
    require_netns()
    cer = issue_from_csr(pki, tmp_path, "tok3", token.csr("tok3"), f"tcp/{PORT}")
    with TestNet.create() as net, RunningServer.start(
        net, pki, firewallPolicy="drop", protectedPorts=f"tcp/{PORT}", PORT_OPEN_DURATION_IN_SECONDS="30"
    ) as server:
        server.serve_tcp(PORT)
        assert not server.reachable(PORT)
        # The certificate from a file (the token holds only the key) ...
        result = knock_cli(token, pki, token.uri(), "--client-cert", str(cer), "-p", str(PORT), ns=net,
                           host=net.server.ipv4)
        assert result.returncode == 0, result.stderr
        assert f"tcp/{PORT} is open" in result.stderr  # the status line: stderr, as stdout is a pipe
        server.wait_log(f"granted tcp/{PORT}")
        assert "CN=tok3" in server.log_text()
        # ... and from the token, with the PIN from the URI's pin-source.
        token.tool("--login", "--pin", PIN, "--write-object", str(cer), "--type", "cert", "--id", "01")
        mark = server.mark()
        uri = token.uri(extra=f"&pin-source=file:{token.pin_file}")
        argv = net.client.cmd(PY, "-m", "sknock.cli.knock", "--pfx", uri, "--server-cert", str(pki.server.cer),
                              "-p", str(PORT), net.server.ipv4)
        again = subprocess.run(argv, env=token.env, capture_output=True, text=True, timeout=60, cwd=REPO,
                               stdin=subprocess.DEVNULL)
        assert again.returncode == 0, again.stderr
        server.wait_log(f"granted tcp/{PORT}", since=mark)


# -- what goes wrong: one line, no traceback, nothing sent ------------------------------------------


def test_wrong_pin_is_one_line(pki: TestPKI, token: SoftToken) -> None:
    token.pin_file.write_text("000000\n")
    line = one_line_error(knock_cli(token, pki, token.uri(), "-p", "22", "--no-verify"))
    assert line.endswith(f"token '{LABEL}', id 01: wrong PIN")


def test_missing_module_is_one_line(pki: TestPKI, token: SoftToken, tmp_path: Path) -> None:
    line = one_line_error(knock_cli(token, pki, token.uri(module=tmp_path / "nope.so"), "-p", "22"))
    assert line.endswith(f"PKCS#11 module {tmp_path / 'nope.so'}: no such file")
    not_a_module = tmp_path / "text.so"
    not_a_module.write_text("not a shared object\n")
    line = one_line_error(knock_cli(token, pki, token.uri(module=not_a_module), "-p", "22"))
    assert f"PKCS#11 module {not_a_module}: cannot load it" in line


def test_missing_key_and_missing_token_are_one_line(pki: TestPKI, token: SoftToken) -> None:
    line = one_line_error(knock_cli(token, pki, token.uri(key_id="%02"), "-p", "22"))
    assert line.endswith(f"token '{LABEL}', id 02: no such private key on the token")
    line = one_line_error(knock_cli(token, pki, token.uri(token="elsewhere"), "-p", "22"))
    assert re.search(r"token 'elsewhere', id 01: no such token in .*libsofthsm2\.so \(tokens there: 'knocker'\)$",
                     line), line


def test_no_certificate_anywhere_is_one_line(pki: TestPKI, token: SoftToken) -> None:
    line = one_line_error(knock_cli(token, pki, token.uri(), "-p", "22"))
    assert "no certificate on the token with the key's id; give the certificate file" in line


def test_a_certificate_for_another_key_is_refused_before_sending(pki: TestPKI, token: SoftToken) -> None:
    alice_cer = token.root / "alice.cer"
    from cryptography.hazmat.primitives.serialization import Encoding

    alice_cer.write_bytes(pki.alice.certificate.public_bytes(Encoding.DER))
    line = one_line_error(knock_cli(token, pki, token.uri(), "--client-cert", str(alice_cer), "-p", "22"))
    assert line.endswith(f"token '{LABEL}', id 01: the key on the token does not match the certificate")


def test_locked_token_is_one_line_and_no_pin_is_tried(pki: TestPKI, token: SoftToken) -> None:
    token.lock_user_pin()
    line = one_line_error(knock_cli(token, pki, token.uri(), "-p", "22"))
    assert line.endswith(f"token '{LABEL}', id 01: the PIN is locked (too many wrong PINs); "
                         "unlock it with the token's SO PIN or PUK")


def test_bad_uri_names_the_attribute(pki: TestPKI, token: SoftToken) -> None:
    line = one_line_error(knock_cli(token, pki, "pkcs11:token=x;slot=3?module-path=/x.so", "-p", "22"))
    assert line.endswith("pkcs11 URI: unknown path attribute slot")


def test_no_pin_without_a_terminal_says_where_to_give_one(pki: TestPKI, token: SoftToken) -> None:
    argv = [PY, "-m", "sknock.cli.knock", "--pfx", token.uri(), "--server-cert", str(pki.server.cer), "-p", "22",
            "198.18.0.1"]
    result = subprocess.run(argv, env=token.env, capture_output=True, text=True, timeout=60, cwd=REPO,
                            stdin=subprocess.DEVNULL)
    line = one_line_error(result)
    assert "SKNOCK_TOKEN_PIN" in line


def test_the_signer_checks_every_signature_against_the_certificate(token: SoftToken) -> None:
    """A token signer bound to another key's certificate refuses to hand out its signature."""
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    other_pem = other.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    script = (
        "from cryptography.hazmat.primitives.serialization import load_pem_public_key\n"
        "from sknock.errors import TokenError\n"
        "from sknock.token import open_token_key\n"
        f"found = open_token_key({token.uri()!r}, lambda prompt: {PIN.encode()!r})\n"
        "signer = found.signer\n"
        "signer._public = None  # as a token without a public key object\n"
        f"signer.bind(load_pem_public_key({other_pem.encode()!r}))\n"
        "try:\n"
        "    signer.sign(b'message')\n"
        "except TokenError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = token.python("-c", script)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "does not verify with the certificate's key" in result.stdout


def test_sknock_token_csr_errors_are_one_line(token: SoftToken) -> None:
    token.pin_file.write_text("000000\n")
    out = token.root / "never.csr"
    result = token.python("-m", "sknock.cli.token", "csr", token.uri(), "--name", "x", "--out", str(out),
                          "--pin-file", str(token.pin_file))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"sknock-token: error: token '{LABEL}', id 01: wrong PIN"]
    assert not out.exists()
