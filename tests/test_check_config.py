"""``sknock-server --check-config`` says OK only when the server would do what its configuration says
(issue 9 §1, §3): anything that would make it refuse every knock, miss a revocation, or not start is one
line naming the file and the reason, and exit 2.  Real certificates, CRLs and PKCS#12 files, in a folder
only its owner may read (0700, files 0600), as operators keep /etc/sknock.

Most cases run the checks in this process (load_config, prepare, check_deployment: what --check-config
runs); the command itself runs in a subprocess for the lines the operator sees."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from sknock.credentials import load_server_pfx
from sknock.errors import ConfigError, SknockError
from sknock.server.config import load_config
from sknock.server.daemon import prepare
from sknock.server.preflight import check_credentials, check_deployment
from tests.pki import PASSWORD, TestPKI
from tests.servercerts import DAY, odd_server, self_signed_ca, signed_crl, write_pfx

REPO = Path(__file__).resolve().parents[1]
DEVPKI = Path(__file__).resolve().parents[2] / "shared/compat/sknock-v1-devpki"
NOW = dt.datetime.now(dt.UTC)


class Site:
    """An /etc/sknock of the operator's: a 0700 folder whose files are 0600, and a config naming them."""

    def __init__(self, folder: Path, pki: TestPKI) -> None:
        self.folder = folder
        self.pki = pki
        folder.chmod(0o700)
        self.put("server.pfx", pki.server.pfx.read_bytes())
        self.put("crl.der", (pki.ca_dir / "crl.der").read_bytes())
        self.put("pfx.pass", (PASSWORD + "\n").encode())
        self.count = 0

    def put(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def config(self, **values: str) -> Path:
        base = {
            "serverPFXFile": "server.pfx",
            "PFXPasswdFile": "pfx.pass",
            "crlFile": "crl.der",
            "firewallBackend": "nftables",
            "firewallPolicy": "drop",
            "protectedPorts": "tcp/8080",
            "controlSocket": str(self.folder / "run" / "control.sock"),
            "stateDir": str(self.folder / "state"),
            "user": "nobody",
        }
        merged = {k: v for k, v in {**base, **values}.items() if v != ""}
        self.count += 1
        text = "[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in merged.items())
        return self.put(f"config{self.count}.ini", text.encode())

    def check(self, **values: str) -> None:
        """What --check-config checks, in this process; raises the SknockError it would print."""
        check_deployment(prepare(load_config(self.config(**values))))

    def problem(self, **values: str) -> str:
        with pytest.raises(SknockError) as info:
            self.check(**values)
        message = str(info.value)
        assert "\n" not in message, message
        return message


@pytest.fixture
def site(tmp_path: Path, pki: TestPKI) -> Site:
    folder = tmp_path / "etc-sknock"
    folder.mkdir()
    return Site(folder, pki)


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    """``sknock-server -c CONFIG --check-config`` in a subprocess."""
    code = "import sys\nfrom sknock.cli.server import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, "-c", str(config), "--check-config"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- good -----------------------------------------------------------------------------------------------


def test_root_only_files_check_ok(site: Site) -> None:
    """Nothing in the check demands a world-readable file: every file 0600 in a 0700 folder."""
    config = site.config(caFile="ca.pem")
    site.put("ca.pem", site.pki.ca_cert.public_bytes(Encoding.PEM))
    assert {p.stat().st_mode & 0o777 for p in site.folder.iterdir()} == {0o600}
    assert site.folder.stat().st_mode & 0o777 == 0o700
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(
        f"sknock-server: {config}: configuration OK (firewall backend nftables; revocation crl: 1 CRL(s): ")


@pytest.mark.skipif(not DEVPKI.is_dir(), reason=f"no sKnock v1 dev PKI at {DEVPKI} (../shared absent)")
def test_the_original_sknock_dev_server_pfx_checks_ok(site: Site) -> None:
    """The original sKnock's dev server certificate has the server profile and is in date (until 2027-06-25);
    its PKI never published a CRL, so this one waits for a crlUrl (not fetched by --check-config)."""
    site.put("devserver.pfx", (DEVPKI / "devserver.pfx").read_bytes())
    site.put("dev.pass", b"portknocking\n")
    config = site.config(serverPFXFile="devserver.pfx", PFXPasswdFile="dev.pass", crlFile="dev-crl.der",
                         crlUrl="http://127.0.0.1:9/crl.der")
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


# -- §3: the server certificate must be a server's ----------------------------------------------------------


def test_a_clients_pfx_as_the_server_certificate(site: Site) -> None:
    site.put("alice.pfx", site.pki.alice.pfx.read_bytes())
    line = one_line(check_config(site.config(serverPFXFile="alice.pfx")), str(site.folder / "alice.pfx"))
    assert line == (f"sknock-server: server PKCS#12 {site.folder / 'alice.pfx'}: CN=alice is not a server "
                    "certificate: its EKU has clientAuth but not serverAuth: it is a client's certificate")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ca": True}, "is not a server certificate: it is a CA certificate (basicConstraints CA:TRUE)"),
        ({"curve": ec.SECP521R1()}, "unsupported key type EC secp521r1; the server needs EC P-256 or P-384"),
        ({"not_before": NOW - 30 * DAY, "not_after": NOW - DAY}, "expired at"),
        ({"not_before": NOW + 2 * DAY, "not_after": NOW + 30 * DAY}, "is not valid before"),
    ],
    ids=["ca", "p521", "expired", "not-yet-valid"],
)
def test_server_certificates_that_would_get_no_knock(site: Site, change: dict[str, object], words: str) -> None:
    key, cert = odd_server(site.pki, **change)  # type: ignore[arg-type]
    write_pfx(site.folder / "odd.pfx", key, cert, [site.pki.ca_cert])
    message = site.problem(serverPFXFile="odd.pfx")
    assert str(site.folder / "odd.pfx") in message and words in message, message


def test_an_out_of_date_server_certificate_also_stops_a_start(site: Site) -> None:
    """check_credentials runs in prepare(), which a start runs too: the server does not start."""
    key, cert = odd_server(site.pki, not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    write_pfx(site.folder / "old.pfx", key, cert, [site.pki.ca_cert])
    with pytest.raises(ConfigError) as info:
        prepare(load_config(site.config(serverPFXFile="old.pfx")))
    assert str(info.value).startswith(f"{site.folder / 'config1.ini'}: serverPFXFile: the server certificate "
                                      "CN=odd-server in ")
    assert "clients refuse to knock to it; issue a new one (sknock-ca --dir CA_DIR server NAME)" in str(info.value)


@pytest.mark.skipif(not DEVPKI.is_dir(), reason=f"no sKnock v1 dev PKI at {DEVPKI} (../shared absent)")
def test_the_dev_server_certificate_is_in_date_until_2027(tmp_path: Path) -> None:
    config = load_config(_minimal(tmp_path), check_files=False)
    server = load_server_pfx(DEVPKI / "devserver.pfx", "portknocking")
    check_credentials(config, server, now=dt.datetime(2027, 6, 1, tzinfo=dt.UTC))
    with pytest.raises(ConfigError, match="expired at 2027-06-25"):
        check_credentials(config, server, now=dt.datetime(2027, 7, 1, tzinfo=dt.UTC))


def _minimal(folder: Path) -> Path:
    path = folder / "minimal.ini"
    path.write_text("[DEFAULT]\nserverPFXFile = s.pfx\ncrlFile = c.der\nPFXPasswd = x\n")
    return path


# -- §1: CAs and CRLs that would refuse every knock or miss a revocation ---------------------------------


def test_an_expired_ca_in_ca_file(site: Site) -> None:
    old_key, old = self_signed_ca("Old knock CA", not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    site.put("old-ca.pem", old.public_bytes(Encoding.PEM))
    # with its CRL beside the root's, so that the CA itself is the only problem
    site.put("old-crl.der", signed_crl(old_key, old, last_update=NOW - DAY, next_update=NOW + 30 * DAY))
    message = site.problem(caFile="old-ca.pem", crlFile="crl.der, old-crl.der")
    assert message.startswith(f"{site.folder / 'config1.ini'}: caFile: the CA certificate CN=Old knock CA in "
                               f"{site.folder / 'old-ca.pem'} expired at ")
    assert "every client it issued would be refused" in message


def test_a_crl_past_its_next_update(site: Site) -> None:
    """Item §3: --check-config said OK.  Now one line with the CRL file, its nextUpdate, and the fix.
    A start still runs on it (the runtime warns on every refresh), so as not to lock every client out."""
    stale = signed_crl(site.pki.ca.key, site.pki.ca_cert, last_update=NOW - 40 * DAY, next_update=NOW - 10 * DAY)
    site.put("stale.der", stale)
    config = site.config(crlFile="stale.der")
    line = one_line(check_config(config), f"{config}: crlFile: the CRL in {site.folder / 'stale.der'} is past its "
                    "nextUpdate (", "revocations since then may be missing",
                    f"sknock-ca --dir CA_DIR crl signs a fresh one; publish it to {site.folder / 'stale.der'} and "
                    "send the server SIGHUP")
    next_update = (NOW - 10 * DAY).replace(microsecond=0).isoformat()
    assert next_update in line
    assert prepare(load_config(config)).crls[0] is not None  # a start goes on


def test_a_stale_crl_with_a_crl_url_names_the_url(site: Site) -> None:
    stale = signed_crl(site.pki.ca.key, site.pki.ca_cert, last_update=NOW - 40 * DAY, next_update=NOW - 10 * DAY)
    site.put("stale.der", stale)
    message = site.problem(crlFile="stale.der", crlUrl="https://ca.example.org/knock.crl")
    assert "crlFile: the CRL in" in message
    assert "the server fetches it from crlUrl https://ca.example.org/knock.crl: fix that source" in message


def test_a_local_crl_url_is_checked_as_the_source(site: Site) -> None:
    """A stale crlFile is fine when the local crlUrl holds a fresher CRL (the server takes it at start); a
    stale crlUrl is not, even beside a fresh crlFile: it is where revocations are meant to come from."""
    stale = signed_crl(site.pki.ca.key, site.pki.ca_cert, last_update=NOW - 40 * DAY, next_update=NOW - 10 * DAY)
    site.put("stale.der", stale)
    site.put("fresh.der", (site.pki.ca_dir / "crl.der").read_bytes())
    site.check(crlFile="stale.der", crlUrl="fresh.der")
    message = site.problem(crlFile="crl.der", crlUrl="stale.der")
    assert f"crlUrl: the CRL in {site.folder / 'stale.der'} is past its nextUpdate" in message
    assert f"sknock-ca --dir CA_DIR crl signs a fresh one; publish it to {site.folder / 'stale.der'}" in message


@pytest.mark.parametrize("where", ["crlFile", "crlUrl"])
def test_a_crl_of_another_ca(site: Site, where: str) -> None:
    """A CRL whose issuer is not a configured CA, or one that does not verify against it: the server would
    refuse it, and with no other CRL refuse every knock (crl-unavailable)."""
    other_key, other = self_signed_ca("Some other CA", not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    site.put("other.der", signed_crl(other_key, other, last_update=NOW - DAY, next_update=NOW + DAY))
    # the session pki's stranger CA has the same name as ours: its CRL fails only on the signature
    site.put("forged.der", (site.pki.stranger_ca.directory / "crl.der").read_bytes())
    message = site.problem(**{where: "other.der"})
    assert f"{where}: CRL {site.folder / 'other.der'}: issued by CN=Some other CA, which is not a known CA" in message
    message = site.problem(**{where: "forged.der"})
    assert f"{where}: CRL {site.folder / 'forged.der'}: signature does not verify" in message


def test_a_crl_url_that_holds_no_crl(site: Site) -> None:
    site.put("junk.der", b"not a CRL")
    message = site.problem(crlUrl="junk.der")
    assert f"crlUrl: CRL {site.folder / 'junk.der'}: not a DER or PEM CRL" in message
    message = site.problem(crlUrl="missing.der")
    assert f"crlUrl: file {site.folder / 'missing.der'} does not exist" in message


# -- §1: what would stop a start -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["stateDir", "controlSocket"])
def test_a_folder_that_cannot_be_made(site: Site, key: str) -> None:
    site.put("a-file", b"")
    target = str(site.folder / "a-file" / "sub") + ("/control.sock" if key == "controlSocket" else "")
    message = site.problem(**{key: target})
    assert message == (f"{site.folder / 'config1.ini'}: {key}: cannot make {site.folder / 'a-file' / 'sub'}: "
                       f"{site.folder / 'a-file'} is not a folder")


def test_a_user_that_does_not_exist(site: Site) -> None:
    line = one_line(check_config(site.config(user="sknock-no-such-user")), "user: user 'sknock-no-such-user' does "
                    "not exist on this system")
    assert line.startswith("sknock-server: ")


def test_a_contradiction_is_one_line_too(site: Site) -> None:
    one_line(check_config(site.config(protectedPorts="tcp/22,tcp/8080")), "emergencySSH: yes keeps tcp/22 open",
             "protectedPorts (tcp/22,tcp/8080)")


# -- §3: installed without the server extra ---------------------------------------------------------------

HIDE_SERVER_EXTRAS = textwrap.dedent("""\
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition('.')[0] in ('schedule', 'requests', 'urllib3', 'nftables', 'iptc'):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Hide())
    """)


@pytest.mark.parametrize("args", [["--check-config"], []], ids=["check-config", "run"])
def test_without_the_server_extra_one_line_says_what_to_install(site: Site, args: list[str]) -> None:
    config = site.config()
    code = HIDE_SERVER_EXTRAS + "import sys\nfrom sknock.cli.server import main\nsys.exit(main(sys.argv[1:]))\n"
    result = subprocess.run(
        [sys.executable, "-c", code, "-c", str(config), *args], capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    one_line(result, "sknock-server: the server's Python dependencies are not installed (no module named ",
             "pip install 'sknock[server]'")
    assert "'schedule'" in result.stderr or "'urllib3'" in result.stderr or "'requests'" in result.stderr


def test_the_server_script_too(site: Site) -> None:
    """server/knock-server.py, the checkout's entry point, is the same main()."""
    code = HIDE_SERVER_EXTRAS + (
        "import runpy, sys\n"
        f"sys.argv = [{str(REPO / 'server' / 'knock-server.py')!r}, '-c', sys.argv[1], '--check-config']\n"
        f"runpy.run_path({str(REPO / 'server' / 'knock-server.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(site.config())], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": ""})
    one_line(result, "pip install 'sknock[server]'")


# -- what the monitor reaches after it drops CAP_DAC_OVERRIDE --------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the check runs as root, as the server does")
@pytest.mark.parametrize("key", ["crlFile", "stateDir"])
def test_a_file_root_reaches_only_through_dac_override_is_refused(site: Site, key: str) -> None:
    nobody = pwd.getpwnam("nobody")
    folder = site.folder / "elsewhere"
    folder.mkdir(mode=0o700)
    if key == "crlFile":
        shutil.copy(site.folder / "crl.der", folder / "crl.der")
        os.chown(folder / "crl.der", nobody.pw_uid, nobody.pw_gid)
        (folder / "crl.der").chmod(0o600)
        values = {"crlFile": str(folder / "crl.der")}
    else:
        values = {"stateDir": str(folder)}
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    message = site.problem(**values)
    assert f"{key}: the server (root, without CAP_DAC_OVERRIDE" in message
    assert str(folder) in message and f"owner uid {nobody.pw_uid}" in message
    os.chown(folder, 0, 0)  # root's again: fine
    if key == "crlFile":
        os.chown(folder / "crl.der", 0, 0)
    site.check(**values)
