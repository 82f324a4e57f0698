"""``sknock-ca`` end to end, as an admin runs it: ``python -m sknock.cli.ca`` in a subprocess."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from sknock.credentials import load_certificate, load_client_pfx, load_server_pfx, resolve_password
from sknock.ports import parse_ports
from sknock.trust import ClientVerifier, load_crl

REPO = Path(__file__).resolve().parents[1]
CA_PASSWORD = "ca-secret-Zq81"
PFX_PASSWORD = "pfx-secret-Hk27"


class CLI:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "ca"
        self.ca_pw = tmp / "ca.pw"
        self.ca_pw.write_text(CA_PASSWORD + "\n")
        self.pfx_pw = tmp / "pfx.pw"
        self.pfx_pw.write_text(PFX_PASSWORD + "\n")
        self.outputs: list[str] = []

    def __call__(
        self, *args: str, pw: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sknock.cli.ca", "--dir", str(self.dir), *args]
        if pw:
            argv += ["--password-file", str(self.ca_pw), "--pfx-password-file", str(self.pfx_pw)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SKNOCK_")}
        full_env.update(env or {})
        proc = subprocess.run(
            argv, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def ok(self, *args: str) -> str:
        proc = self(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        return proc.stdout

    def fails(self, *args: str, match: str, **kw: object) -> str:
        proc = self(*args, **kw)  # type: ignore[arg-type]
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert match in lines[0]
        return lines[0]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> CLI:
    c = CLI(tmp_path_factory.mktemp("cli"))
    c.ok("init", "--name", "CLI Test CA")
    c.ok("server", "knockd", "--ip", "198.18.0.1", "--ip", "fd00:5e::1", "--dns", "knock.test")
    c.ok("client", "alice", "--allow", "tcp/22,udp/8000-8010")
    c.ok("client", "eve", "--allow", "tcp/22", "--key-type", "ed25519", "--days", "10")
    c.ok("client", "mallory", "--allow", "tcp/22")
    c.ok("revoke", "mallory")
    c.ok("intermediate", "branch", "--new-ca-password-file", str(c.pfx_pw))
    return c


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_layout_and_secret_file_modes(cli: CLI) -> None:
    d = cli.dir
    for p in ("ca.cer", "ca.pem", "crl.der", "crl.pem", "index.json", "server/knockd.cer"):
        assert (d / p).is_file(), p
    for p in (
        "private/ca.key",
        "server/knockd.pfx",
        "client/alice.pfx",
        "client/eve.pfx",
        "intermediate/branch/private/ca.key",
    ):
        assert _mode(d / p) == 0o600, p
    assert _mode(d / "private") == 0o700


def test_issued_files_load_and_verify(cli: CLI) -> None:
    ca = load_certificate(cli.dir / "ca.cer")
    assert ca.subject.rfc4514_string() == "CN=CLI Test CA"
    alice = load_client_pfx(cli.dir / "client/alice.pfx", PFX_PASSWORD)
    assert alice.ca_certificates == (ca,)
    verified = ClientVerifier([ca]).verify(alice.certificate, _now())
    assert verified.ports == parse_ports("tcp/22,udp/8000-8010")
    eve = load_client_pfx(cli.dir / "client/eve.pfx", PFX_PASSWORD)
    assert (eve.certificate.not_valid_after_utc - eve.certificate.not_valid_before_utc).days == 10
    server = load_server_pfx(cli.dir / "server/knockd.pfx", PFX_PASSWORD)
    assert load_certificate(cli.dir / "server/knockd.cer") == server.certificate
    san = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.1", "fd00:5e::1"]
    assert san.get_values_for_type(x509.DNSName) == ["knock.test"]


def test_pfx_not_openable_with_ca_password(cli: CLI) -> None:
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12((cli.dir / "client/alice.pfx").read_bytes(), CA_PASSWORD.encode())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_pfx_uses_modern_encryption(cli: CLI) -> None:
    proc = subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-info",
            "-noout",
            "-in",
            str(cli.dir / "client/alice.pfx"),
            "-passin",
            f"file:{cli.pfx_pw}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    info = proc.stdout + proc.stderr
    assert "AES-256-CBC" in info and "PBKDF2" in info and "sha256" in info
    assert "RC2" not in info and "3DES" not in info


def test_crl_lists_revoked_serial_and_verifies(cli: CLI) -> None:
    ca = load_certificate(cli.dir / "ca.cer")
    crl = load_crl((cli.dir / "crl.der").read_bytes(), [ca], source="crl.der")
    index = json.loads((cli.dir / "index.json").read_text())
    serials = {e["name"]: int(e["serial"], 16) for e in index["entries"]}
    assert crl.get_revoked_certificate_by_serial_number(serials["mallory"]) is not None
    assert crl.get_revoked_certificate_by_serial_number(serials["alice"]) is None
    assert load_crl((cli.dir / "crl.pem").read_bytes(), [ca], source="crl.pem") == crl
    assert crl.next_update_utc is not None and 29 <= (crl.next_update_utc - _now()).days <= 30
    mallory = load_client_pfx(cli.dir / "client/mallory.pfx", PFX_PASSWORD)
    with pytest.raises(Exception, match="revoked"):
        ClientVerifier([ca], crls=[crl]).verify(mallory.certificate, _now())


def test_crl_command_sets_next_update(cli: CLI) -> None:
    out = cli.ok("crl", "--days", "7")
    assert "1 revoked" in out
    ca = load_certificate(cli.dir / "ca.cer")
    crl = load_crl((cli.dir / "crl.der").read_bytes(), [ca], source="crl.der")
    assert crl.next_update_utc is not None and 6 <= (crl.next_update_utc - _now()).days <= 7


def test_list(cli: CLI) -> None:
    out = cli.ok("list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SERIAL", "EXPIRES", "STATUS", "PORTS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) >= {"knockd", "alice", "eve", "mallory", "branch"}
    assert "revoked" in rows["mallory"] and "valid" in rows["alice"]
    assert "udp/8000-8010" in rows["alice"] and "tcp/22" in rows["alice"]
    assert "intermediate" in rows["branch"]
    # list needs no password
    proc = cli("list", pw=False)
    assert proc.returncode == 0 and proc.stdout == out


def test_global_options_after_subcommand(cli: CLI) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sknock.cli.ca", "list", "--dir", str(cli.dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0 and "alice" in proc.stdout


def test_password_from_environment(cli: CLI) -> None:
    proc = cli(
        "client",
        "envuser",
        "--allow",
        "tcp/22",
        pw=False,
        env={"SKNOCK_PFX_PASSWORD": CA_PASSWORD, "SKNOCK_NEW_PFX_PASSWORD": "env-pfx-pw"},
    )
    assert proc.returncode == 0, proc.stderr
    load_client_pfx(cli.dir / "client/envuser.pfx", "env-pfx-pw")


def test_without_a_pfx_password_a_random_one_is_written_beside_the_pfx(cli: CLI) -> None:
    """SKNOCK_PFX_PASSWORD (the CA's) only, no terminal: the new .pfx used to share the CA password, so
    handing a client its file and password handed it the CA's secret.  Now it gets a random password of its
    own, in NAME.pfx.pass (0600), and the tool says where (on stderr, one line, without the password)."""
    proc = cli("client", "sameuser", "--allow", "tcp/22", pw=False, env={"SKNOCK_PFX_PASSWORD": CA_PASSWORD})
    assert proc.returncode == 0, proc.stderr
    pfx = cli.dir / "client/sameuser.pfx"
    pass_file = cli.dir / "client/sameuser.pfx.pass"
    [line] = proc.stderr.strip().splitlines()
    assert f"written to {pass_file} (mode 0600)" in line
    assert _mode(pass_file) == 0o600
    password = pass_file.read_text()
    assert password.endswith("\n") and len(password.strip()) >= 32
    assert password.strip() not in proc.stdout + proc.stderr
    assert CA_PASSWORD not in proc.stdout + proc.stderr
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(pfx.read_bytes(), CA_PASSWORD.encode())
    # the password file follows the first-line rule of every sknock password file
    assert load_client_pfx(pfx, resolve_password(pass_file)).certificate.subject.rfc4514_string() == "CN=sameuser"


def test_each_new_pfx_gets_its_own_random_password(cli: CLI) -> None:
    env = {"SKNOCK_PFX_PASSWORD": CA_PASSWORD}
    for name in ("rand1", "rand2"):
        assert cli("client", name, "--allow", "tcp/22", pw=False, env=env).returncode == 0
    one, two = ((cli.dir / f"client/{n}.pfx.pass").read_text() for n in ("rand1", "rand2"))
    assert one != two


@pytest.mark.parametrize("how", ["env", "file"])
def test_a_pfx_password_equal_to_the_cas_is_refused(cli: CLI, tmp_path: Path, how: str) -> None:
    name = f"same-{how}"
    if how == "env":
        env = {"SKNOCK_PFX_PASSWORD": CA_PASSWORD, "SKNOCK_NEW_PFX_PASSWORD": CA_PASSWORD}
        line = cli.fails("client", name, "--allow", "tcp/22", pw=False, env=env, match="is the CA's")
    else:
        same = tmp_path / "same.pw"
        same.write_text(CA_PASSWORD + "\n")
        line = cli.fails("client", name, "--allow", "tcp/22", "--password-file", str(cli.ca_pw),
                         "--pfx-password-file", str(same), pw=False, match="is the CA's")
    assert f"{name}.pfx" in line and "never shares the CA's secret" in line
    assert not (cli.dir / f"client/{name}.pfx").exists()
    assert not (cli.dir / f"client/{name}.pfx.pass").exists()
    assert name not in (cli.dir / "index.json").read_text()


def test_server_gets_a_random_password_and_the_next_step(cli: CLI) -> None:
    proc = cli("server", "gw2", "--ip", "198.18.0.2", pw=False, env={"SKNOCK_PFX_PASSWORD": CA_PASSWORD})
    assert proc.returncode == 0, proc.stderr
    pfx, cer, pass_file = (cli.dir / f"server/gw2{ext}" for ext in (".pfx", ".cer", ".pfx.pass"))
    assert f"written to {pass_file}" in proc.stderr and _mode(pass_file) == 0o600
    server = load_server_pfx(pfx, resolve_password(pass_file))
    assert load_certificate(cer) == server.certificate
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout
    assert lines[2].startswith("next: copy gw2.pfx to the server gw2 alone")
    assert "serverPFXFile" in lines[2] and "gw2.cer to its clients" in lines[2]
    assert f"sknock-ca --dir {cli.dir} server OTHER-NAME" in lines[2]


def test_a_server_name_is_never_issued_twice(cli: CLI) -> None:
    """One certificate per server (docs/pki.md): a name issued before is refused, whether the index or only
    its files remember it, and nothing of the first is touched."""
    before = {p.name: p.read_bytes() for p in (cli.dir / "server").iterdir()}
    cli.fails("server", "knockd", match="a certificate named 'knockd' already exists")
    cli.fails("server", "knockd", pw=False, env={"SKNOCK_PFX_PASSWORD": CA_PASSWORD}, match="already exists")
    (cli.dir / "server/orphan.pfx").write_bytes(b"an earlier server's file")
    line = cli.fails("server", "orphan", match="orphan.pfx already exists")
    assert "name of its own" in line
    (cli.dir / "server/orphan.pfx").unlink()
    after = {p.name: p.read_bytes() for p in (cli.dir / "server").iterdir()}
    assert after == before
    assert "orphan" not in (cli.dir / "index.json").read_text()


def test_a_failed_issue_leaves_no_password_file(cli: CLI) -> None:
    cli.fails("server", "badip", "--ip", "not-an-ip", pw=False, env={"SKNOCK_PFX_PASSWORD": CA_PASSWORD},
              match="bad --ip")
    assert not (cli.dir / "server/badip.pfx.pass").exists()
    assert not (cli.dir / "server/badip.pfx").exists()


def test_server_keys_are_on_the_protocols_curves(cli: CLI) -> None:
    """Knocks are encrypted to the server's key on P-256 or P-384 only: a P-521 server could be knocked by
    no client, so sknock-ca does not make one."""
    cli.fails("server", "big", "--key-type", "ec-p521", match="invalid choice")
    cli.ok("server", "p384", "--key-type", "ec-p384")
    server = load_server_pfx(cli.dir / "server/p384.pfx", PFX_PASSWORD)
    assert server.key.curve.name == "secp384r1"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("revoke", "nobody"), "no certificate named 'nobody'"),
        (("revoke", "mallory"), "already revoked"),
        (("client", "bob", "--allow", "tcp/99999"), "bad port entry 'tcp/99999'"),
        (("client", "bob", "--allow", "ssh"), "bad port entry 'ssh'"),
        (("client", "bob"), "--allow"),
        (("client", "alice", "--allow", "tcp/22"), "already exists"),
        (("client", "../evil", "--allow", "tcp/22"), "bad name '../evil'"),
        (("client", "bob", "--allow", "tcp/22", "--key-type", "dsa"), "invalid choice"),
        (("server", "s2", "--ip", "not-an-ip"), "bad --ip"),
        (("init",), "already holds a CA"),
        (("crl", "--days", "0"), "must be at least 1"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_error_exits(cli: CLI, args: tuple[str, ...], match: str) -> None:
    cli.fails(*args, match=match)


def test_missing_dir_and_missing_ca(cli: CLI, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sknock.cli.ca", "list"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--dir" in proc.stderr and "Traceback" not in proc.stderr
    other = CLI(tmp_path)
    other.fails("list", match="no CA here")
    other.fails("client", "x", "--allow", "tcp/22", match="no CA here")


def test_wrong_or_missing_password(cli: CLI, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-it\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sknock.cli.ca", "--dir", str(cli.dir), "--password-file", str(wrong), "crl"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2 and "wrong password" in proc.stderr and "Traceback" not in proc.stderr
    cli.fails("crl", pw=False, match="no password")


def test_passwords_never_printed(cli: CLI) -> None:
    # runs last in this module (pytest keeps file order): every output so far is recorded
    assert len(cli.outputs) > 20
    for text in cli.outputs:
        assert CA_PASSWORD not in text and PFX_PASSWORD not in text and "env-pfx-pw" not in text


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- client NAME --csr FILE: a certificate for a key made elsewhere ---------------------------------


def _csr(tmp: Path, name: str, key: object, subject: str = "CN=whatever", der: bool = False) -> Path:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string(subject))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)  # asked, never granted
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())  # type: ignore[arg-type]
    )
    path = tmp / f"{name}.csr"
    path.write_bytes(request.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "ed25519", "rsa-2048"])
def test_client_from_a_request_gets_the_clients_profile_and_no_pfx(cli: CLI, tmp_path: Path, kind: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key: object = {
        "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    }[kind]()
    name = f"req-{kind}"
    out = cli.ok("client", name, "--allow", "tcp/22,udp/9000", "--csr", str(_csr(tmp_path, name, key, der=True)))
    cer = cli.dir / "client" / f"{name}.cer"
    assert str(cer) in out
    assert not (cli.dir / "client" / f"{name}.pfx").exists()
    assert not (cli.dir / "client" / f"{name}.pfx.pass").exists()
    cert = load_certificate(cer)
    assert load_certificate(cli.dir / "client" / f"{name}.pem") == cert
    assert cert.public_key() == key.public_key()  # type: ignore[attr-defined]
    assert cert.subject.rfc4514_string() == f"CN={name}"  # the CA names it, not the request
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The same trust and the same ports as a client the CA made a key for.
    verified = ClientVerifier([load_certificate(cli.dir / "ca.cer")], [], []).verify(cert, _now())
    assert verified.ports == parse_ports("tcp/22,udp/9000")
    entries = {e["name"]: e for e in json.loads((cli.dir / "index.json").read_text())["entries"]}
    assert entries[name]["kind"] == "client"
    assert parse_ports(entries[name]["ports"]) == parse_ports("tcp/22,udp/9000")


def test_requests_the_ca_refuses(cli: CLI, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import Encoding

    weak = _csr(tmp_path, "weak", rsa.generate_private_key(65537, 1024))
    cli.fails("client", "weak", "--allow", "tcp/22", "--csr", str(weak), match="unsupported key type RSA 1024")
    small = _csr(tmp_path, "small", ec.generate_private_key(ec.SECP224R1()))
    cli.fails("client", "small", "--allow", "tcp/22", "--csr", str(small), match="unsupported key type EC secp224r1")
    # A request whose signature does not verify: someone else's key in it.
    good = x509.load_pem_x509_csr(_csr(tmp_path, "good", ec.generate_private_key(ec.SECP256R1())).read_bytes())
    raw = bytearray(good.public_bytes(Encoding.DER))
    raw[-5] ^= 0x01  # inside the signature's integers
    forged = tmp_path / "forged.csr"
    forged.write_bytes(bytes(raw))
    cli.fails("client", "forged", "--allow", "tcp/22", "--csr", str(forged), match="does not verify")
    junk = tmp_path / "junk.csr"
    junk.write_text("-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n")
    cli.fails("client", "junk", "--allow", "tcp/22", "--csr", str(junk),
              match=f"certificate request {junk}: not a PEM or DER PKCS#10 request")
    cli.fails("client", "nofile", "--allow", "tcp/22", "--csr", str(tmp_path / "nope.csr"),
              match=f"certificate request {tmp_path / 'nope.csr'}: no such file")
    ok = _csr(tmp_path, "kt", ec.generate_private_key(ec.SECP256R1()))
    cli.fails("client", "kt", "--allow", "tcp/22", "--csr", str(ok), "--key-type", "ed25519",
              match="--key-type makes a new key; with --csr the key is the request's")
    cli.fails("client", "alice", "--allow", "tcp/22", "--csr", str(ok), match="a certificate named 'alice' already")
    names = [e["name"] for e in json.loads((cli.dir / "index.json").read_text())["entries"]]
    assert not {"weak", "small", "forged", "junk", "nofile", "kt"} & set(names)
