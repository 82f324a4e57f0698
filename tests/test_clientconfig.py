"""The client configuration file (sknock.clientconfig): named servers, one line per mistake naming the file,
the section and the key; the files and their order; the password sources; KnockClient.from_profile
knocking for real (the datagram is checked by the server's verifier)."""

from __future__ import annotations

import importlib.util
import string
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sknock import clientconfig
from sknock.client import KnockClient
from sknock.clientconfig import (
    PROFILE_KEYS,
    Profile,
    default_files,
    doc_table,
    find_profile,
    get_profile,
    load_profiles,
    parse_profiles,
    profile_secret,
    read_profiles,
)
from sknock.errors import CredentialError, ProfileError
from sknock.ports import Protocol
from tests.pki import PASSWORD, TestPKI
from tests.test_client import pki_verifier, port_of, receive, udp_listener

FILE = Path("/home/u/.config/sknock/client.ini")
REPO = Path(__file__).resolve().parents[1]


def one_line(exc: pytest.ExceptionInfo[ProfileError], *needles: str) -> str:
    text = str(exc.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


# -- parsing ---------------------------------------------------------------------------------------------------


def test_a_full_section() -> None:
    text = (
        "[gateway]\nhost = gw.example.org\nserverCert = gw.cer\ncredentials = ~/keys/alice.pfx\n"
        "passwordFile = /run/secrets/alice\nports = tcp/22, udp/8000, 443\nprotocol = tcp\nsource = auto\n"
        "family = 6\nknockPort = 4444\ntimeout = 2.5\nretries = 5\nworkBits = 14\n"
        "[lab]\nserverCert = /etc/lab.cer\ncredentials = pkcs11:token=alice;object=knock\npasswordEnv = LAB_PIN\n"
    )
    profiles = parse_profiles(text, FILE)
    gw = profiles["gateway"]
    assert gw.host == "gw.example.org"
    assert gw.server_cert == FILE.parent / "gw.cer"  # relative to the file's folder
    assert gw.credentials == str(Path("~/keys/alice.pfx").expanduser())
    assert gw.password_file == Path("/run/secrets/alice")
    assert gw.default_ports() == ((Protocol.TCP, 22), (Protocol.UDP, 8000), (Protocol.TCP, 443))
    assert (gw.source, gw.family, gw.knock_port, gw.timeout, gw.retries, gw.work_bits) == ("auto", 6, 4444, 2.5, 5, 14)
    lab = profiles["lab"]
    assert lab.host == "lab"  # the section's name when host is not set
    assert lab.credentials == "pkcs11:token=alice;object=knock"  # a URI is kept as written
    assert lab.knock_arguments() == {
        "knock_port": None, "timeout": 10.0, "retries": 3, "source_address": "any", "family": None, "via": "udp"
    }


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[gw]\nserverCrt = a.cer\n", [f"{FILE}: [gw]: serverCrt: unknown key; did you mean serverCert?"]),
        ("[gw]\nports = tcp/70000\n", [f"{FILE}: [gw]: ports: port must be 1..65535, not '70000'"]),
        ("[gw]\nports = tcp/22,,udp/1\n", ["[gw]: ports: an empty entry"]),
        ("[gw]\nports = sctp/22\n", ["[gw]: ports: must be tcp or udp, not 'sctp'"]),
        ("[gw]\nfamily = 5\n", ["[gw]: family: must be any, 4 or 6, not '5'"]),
        ("[gw]\nsource = my-laptop\n", ["[gw]: source: must be any, auto or an IP address"]),
        ("[gw]\ntimeout = 0\n", ["[gw]: timeout: must be more than 0"]),
        ("[gw]\ntimeout = nan\n", ["[gw]: timeout: must be more than 0"]),
        ("[gw]\nretries = 0\n", ["[gw]: retries: must be a whole number 1..100"]),
        ("[gw]\nworkBits = 33\n", ["[gw]: workBits: must be a whole number 0..32"]),
        ("[gw]\nknockPort = any\n", ["[gw]: knockPort: port must be 1..65535, not 'any'"]),
        ("[gw]\npasswordKeyring = maybe\n", ["[gw]: passwordKeyring: must be yes or no"]),
        ("[gw]\npasswordEnv = 1BAD\n", ["[gw]: passwordEnv: must be an environment variable's name"]),
        ("[gw]\nhost = a b\n", ["[gw]: host: must be one word"]),
        ("[gw]\nhost =\n", ["[gw]: host: empty; give a value or remove the line"]),
        ("[gw]\npassword = x\npasswordFile = f\n", ["[gw]: passwordFile: password is set too"]),
        ("[gw]\nports = 22\nports = 23\n", ["[gw]: ports: set twice (line 3)"]),
        ("[gw]\n[gw]\n", ["[gw]: appears twice (line 2)"]),
        ("host = x\n[gw]\n", [f"{FILE}: line 1: a key before any [SERVER] section"]),
        ("[gw]\n  indented\n", [f"{FILE}: "]),
    ],
)
def test_a_mistake_is_one_line_naming_file_section_and_key(text: str, needles: list[str]) -> None:
    with pytest.raises(ProfileError) as exc:
        parse_profiles(text, FILE)
    one_line(exc, *needles)


def test_a_keyring_set_to_no_is_not_a_second_password_source() -> None:
    profile = parse_profiles("[gw]\npasswordKeyring = no\npasswordFile = f\n", FILE)["gw"]
    assert profile.password_keyring is False and profile.password_file == FILE.parent / "f"


_KEY_VALUES: dict[str, st.SearchStrategy[str]] = {
    "host": st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    "serverCert": st.from_regex(r"/[a-z]{1,8}\.cer", fullmatch=True),
    "credentials": st.from_regex(r"/[a-z]{1,8}\.pfx", fullmatch=True),
    "ports": st.lists(
        st.tuples(st.sampled_from(["", "tcp/", "udp/"]), st.integers(1, 65535)), min_size=1, max_size=4
    ).map(lambda ps: ", ".join(f"{p}{n}" for p, n in ps)),
    "family": st.sampled_from(["any", "4", "6", "ipv4", "IPv6"]),
    "source": st.sampled_from(["any", "auto", "198.18.0.2", "fd00::2"]),
    "knockPort": st.one_of(st.just("random"), st.integers(1, 65535).map(str)),
    "timeout": st.floats(0.001, 3600).map(repr),
    "retries": st.integers(1, 100).map(str),
    "workBits": st.integers(0, 32).map(str),
    "protocol": st.sampled_from(["tcp", "udp", "TCP"]),
}
_NAMES = st.text(string.ascii_letters + string.digits + "-_.@", min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_NAMES, st.fixed_dictionaries({}, optional=_KEY_VALUES), max_size=4))
def test_every_valid_file_parses_to_what_it_says(servers: dict[str, dict[str, str]]) -> None:
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for name, keys in servers.items())
    profiles = parse_profiles(text, FILE)
    assert set(profiles) == set(servers)
    for name, keys in servers.items():
        profile = profiles[name]
        assert profile.host == keys.get("host", name)
        if "timeout" in keys:
            assert profile.timeout == float(keys["timeout"])
        if "ports" in keys:
            written = {int(entry.rsplit("/", 1)[-1]) for entry in keys["ports"].split(", ")}
            assert {n for _, n in profile.default_ports()} == written
        if "family" in keys:
            assert profile.family == (None if keys["family"] == "any" else int(keys["family"][-1]))


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_any_text_parses_or_is_one_profile_error(text: str) -> None:
    try:
        profiles = parse_profiles(text, FILE)
    except ProfileError as exc:
        message = str(exc)
        assert message.startswith(str(FILE)) or message.startswith(f"{FILE}: ["), message
        assert "\n" not in message
    else:
        assert all(isinstance(p, Profile) for p in profiles.values())


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([k.key for k in PROFILE_KEYS]), st.text(max_size=40))
def test_any_value_of_any_key_parses_or_names_that_key(key: str, value: str) -> None:
    text = f"[gw]\n{key} = {value}\n"
    try:
        parse_profiles(text, FILE)
    except ProfileError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith(f"{FILE}: "), message


# -- files -----------------------------------------------------------------------------------------------------


def test_default_files_follow_xdg(tmp_path: Path) -> None:
    assert default_files({"XDG_CONFIG_HOME": str(tmp_path)}) == (
        Path("/etc/sknock/client.ini"), tmp_path / "sknock" / "client.ini"
    )
    assert default_files({})[1] == Path.home() / ".config" / "sknock" / "client.ini"
    assert default_files({"XDG_CONFIG_HOME": "relative"})[1] == Path.home() / ".config" / "sknock" / "client.ini"


def test_the_users_file_overrides_the_systems_server_by_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "etc" / "client.ini"
    system.parent.mkdir()
    system.write_text("[gw]\nhost = old.example\nretries = 7\n[lab]\nhost = lab.example\n")
    user = tmp_path / "xdg" / "sknock" / "client.ini"
    user.parent.mkdir(parents=True)
    user.write_text("[gw]\nhost = new.example\n")
    monkeypatch.setattr(clientconfig, "SYSTEM_FILE", system)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    profiles = load_profiles()
    assert profiles["gw"].host == "new.example" and profiles["gw"].retries == 3  # the whole section replaced
    assert profiles["gw"].file == user
    assert profiles["lab"].host == "lab.example"
    # --config FILE: that file alone.
    assert set(load_profiles(system)) == {"gw", "lab"} and load_profiles(system)["gw"].host == "old.example"


def test_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clientconfig, "SYSTEM_FILE", tmp_path / "none.ini")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_profiles() == {}  # no file: no named servers, not an error
    with pytest.raises(ProfileError) as exc:
        get_profile("gw")
    one_line(exc, "no server named 'gw' in", str(tmp_path / "none.ini"), str(tmp_path / "sknock" / "client.ini"))
    with pytest.raises(ProfileError) as exc:
        read_profiles(tmp_path / "given.ini")  # --config FILE must exist
    one_line(exc, "client configuration file ", "given.ini: no such file")
    with pytest.raises(ProfileError) as exc:
        read_profiles(tmp_path)
    one_line(exc, "is a folder")
    binary = tmp_path / "binary.ini"
    binary.write_bytes(b"[gw]\nhost = \xff\n")
    with pytest.raises(ProfileError) as exc:
        read_profiles(binary)
    one_line(exc, "binary.ini: not UTF-8 (byte 12)")


def test_find_by_name_then_by_host(tmp_path: Path) -> None:
    ini = tmp_path / "c.ini"
    ini.write_text("[gw]\nhost = 198.18.0.1\n[a]\nhost = 198.18.0.9\n[b]\nhost = 198.18.0.9\n")
    assert find_profile("gw", ini) is not None
    assert find_profile("alias", ini, host="198.18.0.1").name == "gw"  # type: ignore[union-attr]
    assert find_profile("alias", ini, host="gw").name == "gw"  # type: ignore[union-attr]
    assert find_profile("alias", ini, host="198.18.0.2") is None
    with pytest.raises(ProfileError) as exc:
        find_profile("alias", ini, host="198.18.0.9")
    one_line(exc, "several servers have this host ([a], [b])")


# -- passwords -------------------------------------------------------------------------------------------------


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKNOCK_PFX_PASSWORD", raising=False)
    (tmp_path / "pw").write_text("from-file\nignored\n")
    text = (
        "[file]\ncredentials = a.pfx\npasswordFile = pw\n[env]\ncredentials = a.pfx\npasswordEnv = MY_PW\n"
        "[clear]\ncredentials = a.pfx\npassword = in clear\n[none]\ncredentials = a.pfx\n"
        "[ring]\ncredentials = a.pfx\npasswordKeyring = yes\n[nofile]\ncredentials = a.pfx\npasswordFile = absent\n"
    )
    profiles = parse_profiles(text, tmp_path / "c.ini")
    assert profile_secret(profiles["file"]) == b"from-file"
    assert profile_secret(profiles["clear"]) == b"in clear"
    with pytest.raises(ProfileError) as exc:
        profile_secret(profiles["env"])
    one_line(exc, f"{tmp_path / 'c.ini'}: [env]: passwordEnv: $MY_PW is not set")
    monkeypatch.setenv("MY_PW", "from-env")
    assert profile_secret(profiles["env"]) == b"from-env"
    with pytest.raises(ProfileError) as exc:
        profile_secret(profiles["none"])
    one_line(exc, "[none]: no password for", "passwordFile, passwordEnv or passwordKeyring", "--password-file")
    monkeypatch.setenv("SKNOCK_PFX_PASSWORD", "from-sknock-env")
    assert profile_secret(profiles["none"]) == b"from-sknock-env"
    with pytest.raises(CredentialError, match="absent: no such file"):
        profile_secret(profiles["nofile"])
    if importlib.util.find_spec("keyring") is None:
        with pytest.raises(ProfileError) as exc:
            profile_secret(profiles["ring"])
        one_line(exc, "[ring]: passwordKeyring: the keyring library is not installed", "sknock[keyring]")


def test_a_server_known_only_by_its_host_names_the_command_line_option() -> None:
    with pytest.raises(ProfileError) as exc:
        profile_secret(Profile(name="h", file=None, host="h", credentials="a.pfx"))
    one_line(exc, "no password for a.pfx: give --password-file FILE")


# -- the library -----------------------------------------------------------------------------------------------


def test_from_profile_knocks_the_named_servers_ports(pki: TestPKI, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    ini = tmp_path / "client.ini"
    with udp_listener() as sock:
        ini.write_text(
            f"[lab]\nhost = 127.0.0.1\nserverCert = {pki.server.cer}\ncredentials = {pki.alice.pfx}\n"
            f"passwordFile = pw\nports = udp/8000, 2003\nknockPort = {port_of(sock)}\n"
        )
        client = KnockClient.from_profile("lab", config=ini)
        assert client.profile is not None and client.profile.name == "lab"
        assert client.knock_profile(verify=False) is True
        first, second = receive(sock), receive(sock)
        assert client.knock_profile([(Protocol.TCP, 2004)], verify=False) is True
        third = receive(sock)
    verifier = pki_verifier(pki)
    now = time.time()  # the client's clock: the real one
    assert [verifier.check(d, s, now).ports for d, s in (first, second, third)] == [
        ((Protocol.UDP, 8000),), ((Protocol.TCP, 2003),), ((Protocol.TCP, 2004),)
    ]


def test_from_profile_without_a_server_certificate(pki: TestPKI, tmp_path: Path) -> None:
    ini = tmp_path / "client.ini"
    ini.touch(mode=0o600)
    ini.write_text(f"[lab]\ncredentials = {pki.alice.pfx}\npassword = x\n")
    with pytest.raises(ProfileError) as exc:
        KnockClient.from_profile("lab", config=ini)
    one_line(exc, f"{ini}: [lab]: serverCert: not set")
    ini.write_text(f"[lab]\nserverCert = {pki.server.cer}\ncredentials = {pki.alice.pfx}\npassword = wrong\n")
    with pytest.raises(CredentialError, match="wrong password"):
        KnockClient.from_profile("lab", config=ini)


def test_the_docs_table_is_the_code_table() -> None:
    doc = (REPO / "docs" / "client.md").read_text(encoding="utf-8")
    assert doc_table() in doc, "docs/client.md's table of keys differs: run python -m sknock.clientconfig --doc-table"


def test_a_password_in_clear_only_in_a_file_others_cannot_read(tmp_path: Path) -> None:
    ini = tmp_path / "client.ini"
    ini.write_text("[gw]\ncredentials = a.pfx\npassword = in clear\n")
    ini.chmod(0o644)
    with pytest.raises(ProfileError) as exc:
        read_profiles(ini)
    one_line(exc, f"{ini}: [gw]: password: a password in clear in a file others can read; chmod 600 {ini}")
    ini.chmod(0o600)
    assert profile_secret(read_profiles(ini)["gw"]) == b"in clear"
    ini.write_text("[gw]\ncredentials = a.pfx\npasswordEnv = X\n")
    ini.chmod(0o644)
    assert read_profiles(ini)["gw"].password_env == "X"  # no secret in the file: any mode will do


def test_a_password_from_the_keyring(tmp_path: Path) -> None:
    import keyring  # the test extra installs it
    import keyring.backend
    import keyring.errors

    class InMemory(keyring.backend.KeyringBackend):
        """A keyring backend of keyring's own plugin interface, holding its secrets in memory."""

        priority = 1  # type: ignore[assignment]

        def __init__(self) -> None:
            super().__init__()
            self.secrets: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.secrets.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.secrets[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            raise keyring.errors.PasswordDeleteError(username)

    class Locked(InMemory):
        def get_password(self, service: str, username: str) -> str | None:
            raise keyring.errors.KeyringLocked("the keyring is locked")

    profiles = parse_profiles("[ring]\ncredentials = a.pfx\npasswordKeyring = yes\n", tmp_path / "c.ini")
    previous = keyring.get_keyring()
    try:
        store = InMemory()
        keyring.set_keyring(store)
        with pytest.raises(ProfileError) as exc:
            profile_secret(profiles["ring"])
        one_line(exc, "[ring]: passwordKeyring: no password in the keyring for service 'sknock', user 'ring'",
                 "keyring set sknock ring")
        keyring.set_password("sknock", "ring", "from the keyring")
        assert profile_secret(profiles["ring"]) == b"from the keyring"
        keyring.set_keyring(Locked())
        with pytest.raises(ProfileError) as exc:
            profile_secret(profiles["ring"])
        one_line(exc, "[ring]: passwordKeyring: the keyring cannot be read: the keyring is locked")
    finally:
        keyring.set_keyring(previous)


def test_a_profile_never_shows_its_password() -> None:
    profile = Profile(name="gw", file=None, host="gw.example", password="s3cret-Qx7")
    assert "s3cret-Qx7" not in repr(profile) and "s3cret-Qx7" not in str(profile)
    assert "host='gw.example'" in repr(profile) and profile.password == "s3cret-Qx7"
