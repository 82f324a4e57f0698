"""The fleet's shared replay store (docs/fleet.md) against a real redis-server the tests start on loopback:
SET NX PX semantics and expiry, keys that hold no client data, one round trip per batch, the password,
a store that is down or does not answer (bounded by the timeout, and not asked again on every knock),
the fallback choice, and two monitors sharing one store.  Also the options that configure it."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sknock.errors import ConfigError
from sknock.ports import Protocol
from sknock.server.config import load_config
from sknock.server.firewall.base import Opening
from sknock.server.monitor import Monitor
from sknock.server.privsep import GrantRequest
from sknock.server.replaystore import (
    FIRST_RETRY,
    KEY_PREFIX,
    SINCE_KEY,
    Fallback,
    LocalReplayStore,
    RedisReplayStore,
    ReplayGate,
    ReplayStoreError,
    StoreAddress,
    parse_store_address,
    store_key,
)
from tests.redis_harness import RedisServer, free_port, require_redis
from tests.test_monitor import RecordingFirewall

WALL = 1_900_000_000.0
A = ipaddress.ip_address("198.18.0.2")
B = ipaddress.ip_address("198.18.0.3")


WINDOW = 7.0


def remember_since(server: RedisServer, wall: float = WALL - 100) -> None:
    """As if the store's memory had begun long before the tests' knocks (see test_a_store_that_starts_empty...)."""
    server.command("SET", SINCE_KEY.decode(), repr(wall))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    require_redis()
    with RedisServer.start() as server:
        remember_since(server)
        yield server


def store_for(server: RedisServer, timeout: float = 0.15) -> RedisReplayStore:
    return RedisReplayStore(parse_store_address(server.url), password=server.password, timeout=timeout, window=WINDOW)


def key(n: int) -> bytes:
    return os.urandom(16) + n.to_bytes(2, "big") + bytes((6,))


# -- the store ---------------------------------------------------------------------------------------------


def test_a_key_is_claimed_once_and_again_after_its_window(redis_server: RedisServer) -> None:
    store = store_for(redis_server)
    first, second = key(22), key(22)
    assert store.claim([(first, WALL + 0.3), (second, WALL + 7)], WALL) == [True, True]
    assert store.claim([(first, WALL + 0.3), (second, WALL + 7)], WALL) == [False, False]
    ttl = int(redis_server.command("PTTL", store_key(first).decode()))
    assert 0 < ttl <= 300  # PX: the time until the knock leaves its window, not longer
    assert 6000 < int(redis_server.command("PTTL", store_key(second).decode())) <= 7000
    time.sleep(0.4)  # redis expires it: the key may be claimed again (a knock past its window is refused anyway)
    assert store.claim([(first, WALL + 7)], WALL) == [True]
    assert store.claim([(second, WALL + 7)], WALL) == [False]


def test_the_same_key_twice_in_one_batch_is_claimed_once(redis_server: RedisServer) -> None:
    same = key(443)
    assert store_for(redis_server).claim([(same, WALL + 5), (same, WALL + 5)], WALL) == [True, False]


def test_two_stores_on_one_redis_see_each_others_claims(redis_server: RedisServer) -> None:
    one, other = store_for(redis_server), store_for(redis_server)
    keys = [key(i) for i in range(100)]
    assert one.claim([(k, WALL + 7) for k in keys[:60]], WALL) == [True] * 60
    assert other.claim([(k, WALL + 7) for k in keys], WALL) == [False] * 60 + [True] * 40


def test_the_keys_hold_no_client_data(redis_server: RedisServer) -> None:
    nonce = bytes(range(16))
    replay_key = nonce + (22).to_bytes(2, "big") + bytes((6,))
    store_for(redis_server).claim([(replay_key, WALL + 7)], WALL)
    keys = redis_server.command("KEYS", "*").splitlines()
    keys.remove(SINCE_KEY.decode())
    assert keys == [store_key(replay_key).decode()]
    (stored,) = keys
    assert stored.startswith(KEY_PREFIX.decode()) and len(stored) == len(KEY_PREFIX) + 32
    assert nonce.hex() not in stored and replay_key.hex() not in stored
    assert redis_server.command("GET", stored) == "1"
    assert store_key(replay_key) != store_key(replay_key[:-1] + bytes((17,)))  # the port and protocol count


def test_a_batch_is_one_round_trip(redis_server: RedisServer) -> None:
    before = int(redis_server.command("INFO", "stats").split("total_commands_processed:")[1].split()[0])
    store = store_for(redis_server)
    assert store.claim([(key(i), WALL + 7) for i in range(500)], WALL) == [True] * 500
    info = redis_server.command("INFO", "stats")
    after = int(info.split("total_commands_processed:")[1].split()[0])
    # 500 SETs, the connection's handshake and the two INFO commands: no command per knock beyond its SET
    assert 500 <= after - before <= 510
    clients = redis_server.command("CLIENT", "LIST")
    assert clients.count("cmd=set") <= 1  # one connection did it


def test_a_password_from_the_file_is_used(tmp_path: Path) -> None:
    require_redis()
    with RedisServer.start(password="fleet secret") as server:
        remember_since(server)
        assert store_for(server).claim([(key(1), WALL + 7)], WALL) == [True]
        anonymous = RedisReplayStore(parse_store_address(server.url), timeout=0.5, window=WINDOW)
        with pytest.raises(ReplayStoreError, match="replay store redis://127.0.0.1"):
            anonymous.claim([(key(2), WALL + 7)], WALL)


def test_a_store_that_is_down_fails_at_once_and_one_that_hangs_within_the_timeout(redis_server: RedisServer) -> None:
    store = store_for(redis_server, timeout=0.15)
    assert store.claim([(key(1), WALL + 7)], WALL) == [True]
    redis_server.pause()  # accepts connections (the kernel does), answers nothing
    try:
        start = time.monotonic()
        with pytest.raises(ReplayStoreError, match="(?i)timeout|timed out"):
            store.claim([(key(2), WALL + 7)], WALL)
        assert time.monotonic() - start < 1.0
    finally:
        redis_server.resume()
    redis_server.stop()
    start = time.monotonic()
    with pytest.raises(ReplayStoreError):
        store.claim([(key(3), WALL + 7)], WALL)
    assert time.monotonic() - start < 1.0
    redis_server.start_again()
    remember_since(redis_server)
    assert store.claim([(key(4), WALL + 7)], WALL) == [True]  # a new connection, no restart of anything


def test_a_store_that_starts_empty_vouches_only_for_knocks_it_could_have_seen_claimed(
    redis_server: RedisServer,
) -> None:
    """Redis restarted without persistence has forgotten the claims before: a knock that could have been
    claimed then is not confirmed (about one window of refusals), one that could not is."""
    store = store_for(redis_server)
    old = key(22)
    assert store.claim([(old, WALL + 7)], WALL) == [True]
    redis_server.stop()
    redis_server.start_again()  # empty: its memory begins at the next claim
    assert store.claim([(old, WALL + 8.0 + 7)], WALL + 8.0) == [None]  # the replay could have been claimed before
    assert store.claim([(old, WALL + 8.0 + 7)], WALL + 8.0) == [False]  # and is a replay from now on either way
    assert redis_server.command("GET", SINCE_KEY.decode()) == repr(WALL + 8.0)
    later = WALL + 8.0 + WINDOW + 0.5  # a knock made a window after the memory began cannot predate it
    assert store.claim([(key(22), later + WINDOW)], later) == [True]


def tls_files(folder: Path, name: str, address: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A CA and a certificate it signs for ``address`` (PEM files in ``folder``): for a TLS redis-server."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(start + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}-ca.crt")
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def test_rediss_verifies_the_store_s_certificate_against_the_ca_file(tmp_path: Path) -> None:
    require_redis()
    files = tls_files(tmp_path, "store")
    _, _, other_ca = tls_files(tmp_path, "other")
    with RedisServer.start(tls=files) as server:
        remember_since(server)
        address = parse_store_address(server.url)
        assert address.tls
        good = RedisReplayStore(address, ca_file=files[2], timeout=1.0, window=WINDOW)
        assert good.claim([(key(1), WALL + 7)], WALL) == [True]
        wrong = RedisReplayStore(address, ca_file=other_ca, timeout=1.0, window=WINDOW)
        with pytest.raises(ReplayStoreError, match="(?i)certificate"):
            wrong.claim([(key(2), WALL + 7)], WALL)
        plain = RedisReplayStore(parse_store_address(server.url.replace("rediss:", "redis:")), timeout=0.5,
                                 window=WINDOW)
        with pytest.raises(ReplayStoreError):  # no clear-text port: a redis:// URL gets nothing
            plain.claim([(key(3), WALL + 7)], WALL)


# -- the gate: what the monitor does while the store is down ----------------------------------------------


def test_while_down_knocks_are_refused_and_the_store_is_not_asked_on_every_knock(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sknock.replaystore")
    gate = ReplayGate(store_for(redis_server))
    now = 100.0
    assert gate.admit([(key(1), WALL + 7)], WALL, now) == [True]
    redis_server.stop()
    assert gate.admit([(key(2), WALL + 7)], WALL, now) == [None]
    assert gate.status(now)["state"] == "down"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "every knock is refused until it answers" in errors[0].getMessage()
    redis_server.start_again()
    remember_since(redis_server)
    # back already, but within the retry interval the gate does not ask: still refused, at once
    start = time.monotonic()
    assert gate.admit([(key(3), WALL + 7)], WALL, now + FIRST_RETRY / 2) == [None]
    assert time.monotonic() - start < 0.05
    assert gate.admit([(key(4), WALL + 7)], WALL, now + FIRST_RETRY) == [True]
    status = gate.status(now + 1)
    assert status["state"] == "ok" and status["refused_unconfirmed"] == 2 and status["outages"] == 1
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_the_retry_interval_grows_while_the_store_stays_down(redis_server: RedisServer) -> None:
    gate = ReplayGate(store_for(redis_server))
    redis_server.stop()
    tried_at = []
    now = 0.0
    while now < 10:
        due = gate.down_since is None or now >= gate._retry_at
        gate.admit([(key(1), WALL + 7)], WALL, now)
        if due:
            tried_at.append(now)
        now = round(now + 0.05, 2)
    gaps = [round(b - a, 2) for a, b in zip(tried_at, tried_at[1:], strict=False)]
    assert gaps[:3] == [0.25, 0.5, 1.0] and set(gaps[3:]) == {2.0}  # doubling, then at most one try every 2 s
    assert gate.status(now)["state"] == "down"


def test_the_local_fallback_grants_on_this_server_s_memory_with_an_error(redis_server: RedisServer,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sknock.replaystore")
    gate = ReplayGate(store_for(redis_server), fallback=Fallback.LOCAL)
    redis_server.stop()
    assert gate.admit([(key(1), WALL + 7), (key(2), WALL + 7)], WALL, 0.0) == [True, True]
    assert gate.status(0.0)["granted_unconfirmed"] == 2
    assert any(r.levelname == "ERROR" and "replayStoreFallback = local" in r.getMessage() for r in caplog.records)


def test_the_local_store_shares_nothing_and_confirms_everything() -> None:
    gate = ReplayGate(LocalReplayStore())
    entries = [(key(1), WALL + 7), (key(1), WALL + 7)]
    assert gate.admit(entries, WALL, 0.0) == [True, True]
    assert gate.status(0.0)["store"] == "local" and gate.status(0.0)["shared"] is False


# -- two monitors, one store ------------------------------------------------------------------------------


def grant(address: object, nonce: bytes, port: int = 22) -> GrantRequest:
    return GrantRequest("open", Opening(address, Protocol.TCP, port), 15.0, "CN=alice", nonce, WALL + 7)  # type: ignore[arg-type]


def monitor_with(store: RedisReplayStore, fallback: Fallback = Fallback.REFUSE) -> tuple[Monitor, RecordingFirewall]:
    firewall = RecordingFirewall()
    monitor = Monitor(firewall=firewall, max_duration=3600, wall_clock=lambda: WALL,
                      replay=ReplayGate(store, fallback=fallback))
    return monitor, firewall


def test_a_knock_one_monitor_applied_is_refused_by_the_other(redis_server: RedisServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sknock.monitor")
    first, first_fw = monitor_with(store_for(redis_server))
    second, second_fw = monitor_with(store_for(redis_server))
    nonce = os.urandom(16)
    first.apply([grant(A, nonce, 22), grant(A, nonce, 443)])
    second.apply([grant(B, nonce, 22), grant(B, os.urandom(16), 22)])  # the replay, and a knock of its own
    assert set(first_fw.open_now) == {Opening(A, Protocol.TCP, 22), Opening(A, Protocol.TCP, 443)}  # type: ignore[arg-type]
    assert set(second_fw.open_now) == {Opening(B, Protocol.TCP, 22)}  # type: ignore[arg-type]
    assert len(second.grants) == 1
    assert any("granted by another server of the fleet" in r.getMessage() for r in caplog.records)
    assert second.status()["replay_store"] == second.replay.status(second.clock())


def test_a_monitor_whose_store_is_down_refuses_and_still_journals_nothing_it_did_not_apply(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sknock.monitor")
    monitor, firewall = monitor_with(store_for(redis_server))
    redis_server.stop()
    nonce = os.urandom(16)
    monitor.apply([grant(A, nonce)])
    assert firewall.open_now == {} and len(monitor.grants) == 0
    assert not monitor.journal.seen(grant(A, nonce).replay_key, WALL + 7, WALL)
    lines = [r for r in caplog.records if "replay-unconfirmed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].getMessage().startswith(f"refused knock from {A}: replay-unconfirmed")
    assert lines[0].reason == "replay-unconfirmed"  # type: ignore[attr-defined] -- the structured field
    assert monitor.metrics.refused["replay-unconfirmed"] == 1  # counted, by its reason
    assert sum(monitor.metrics.refused.values()) == 1
    local, local_fw = monitor_with(store_for(redis_server), Fallback.LOCAL)
    local.apply([grant(A, nonce)])
    assert list(local_fw.open_now) == [Opening(A, Protocol.TCP, 22)]  # type: ignore[arg-type]
    local.apply([grant(B, nonce)])  # the local memory still refuses a replay to this server
    assert list(local_fw.open_now) == [Opening(A, Protocol.TCP, 22)]  # type: ignore[arg-type]
    assert local.metrics.refused["replay-unconfirmed"] == 0  # granted unconfirmed: not a refusal


# -- the options ------------------------------------------------------------------------------------------


@given(st.text(max_size=80))
def test_parsing_a_store_url_gives_an_address_or_a_value_error(text: str) -> None:
    try:
        address = parse_store_address(text)
    except ValueError:
        return
    assert isinstance(address, StoreAddress)
    assert parse_store_address(str(address).replace(":***@", "@")).host == address.host


@given(st.sampled_from(["redis", "rediss"]), st.sampled_from(["127.0.0.1", "redis.example", "fd00::5"]),
       st.integers(1, 65535), st.integers(0, 99), st.none() | st.text(min_size=1, max_size=12))
def test_a_store_url_round_trips_and_never_shows_its_password(scheme: str, host: str, port: int, db: int,
                                                              password: str | None) -> None:
    from urllib.parse import quote

    bracketed = f"[{host}]" if ":" in host else host
    secret = f":{quote(password, safe='')}@" if password is not None else ""
    address = parse_store_address(f"{scheme}://{secret}{bracketed}:{port}/{db}")
    assert (address.tls, address.host, address.port, address.db, address.password) == (
        scheme == "rediss", host, port, db, password)
    if password is not None:
        assert str(address) == f"{scheme}://:***@{bracketed}:{port}/{db}" and "password" not in repr(address)


def write_config(folder: Path, **values: str) -> Path:
    from tests.pki import PASSWORD

    (folder / "server.pfx").write_bytes(b"")
    config = folder / "config.ini"
    values = {"serverPFXFile": "server.pfx", "PFXPasswd": PASSWORD, "revocation": "none", "user": "nobody", **values}
    config.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return config


@pytest.mark.parametrize(("values", "needle"), [
    ({"replayStore": "http://127.0.0.1:6379/0"}, "replayStore: 'http://127.0.0.1:6379/0': write local, redis://"),
    ({"replayStore": "redis://:6379/0"}, "has no host"),
    ({"replayStore": "redis://h:99999/0"}, "port is not a number"),
    ({"replayStore": "redis://h:6379/x"}, "the database is 'x'"),
    ({"replayStore": "redis://h/0?password=x"}, "no ?query"),
    ({"replayStorePasswordFile": "pass"}, "replayStorePasswordFile: is set, but replayStore = local"),
    ({"replayStore": "redis://h/0", "replayStoreCaFile": "ca.pem"}, "only used with rediss://"),
    ({"replayStore": "redis://:pw@h/0", "replayStorePasswordFile": "pass"}, "give the password one way"),
    ({"replayStore": "redis://h/0", "replayStoreTimeout": "5"}, "replayStoreTimeout: 5 is out of range"),
    ({"replayStore": "redis://h/0", "replayStoreFallback": "open"}, "is not one of refuse|local"),
])
def test_bad_store_options_name_the_key(tmp_path: Path, values: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, **values), check_files=False)
    assert needle in str(info.value) and str(tmp_path) in str(info.value)


def test_the_password_file_must_be_private_and_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    config = write_config(tmp_path, replayStore="redis://cache.example:6380/2", replayStorePasswordFile="redis.pass")
    with pytest.raises(ConfigError, match=r"replayStorePasswordFile: .* readable by others .*chmod 600"):
        load_config(config, check_files=True)
    secret.chmod(0o600)
    loaded = load_config(config, check_files=True)
    assert loaded.replay_store_password == "s3cret"  # noqa: S105
    assert loaded.replay_store == StoreAddress(False, "cache.example", 6380, 2)
    assert "s3cret" not in repr(loaded) and "s3cret" not in loaded.describe()
    assert "replayStore = redis://cache.example:6380/2" in loaded.describe()


def test_a_password_in_the_url_works_with_a_notice_and_is_never_shown(tmp_path: Path) -> None:
    loaded = load_config(write_config(tmp_path, replayStore="rediss://sknock:hunter2@cache.example/0"),
                         check_files=True)
    assert loaded.replay_store_password == "hunter2"  # noqa: S105
    assert any("replayStorePasswordFile" in n for n in loaded.notices)
    assert any("resolved at every (re)connect" in n for n in loaded.notices)  # a host name, not an address
    by_address = load_config(write_config(tmp_path, replayStore="redis://198.18.0.5:6379/0"), check_files=True)
    assert not any("replayStore" in n for n in by_address.notices)
    assert "hunter2" not in loaded.describe() and "rediss://sknock:***@cache.example:6379/0" in loaded.describe()


def test_check_config_says_whether_the_store_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_redis()
    from sknock.server.daemon import replay_store_summary

    with RedisServer.start() as server:
        config = load_config(write_config(tmp_path, replayStore=server.url), check_files=False)
        assert "PING answered in" in replay_store_summary(config)
    down = load_config(write_config(tmp_path, replayStore=f"redis://127.0.0.1:{free_port()}/0"), check_files=False)
    start = time.monotonic()
    summary = replay_store_summary(down)
    assert "NOT reachable now" in summary and "knocks are refused" in summary
    assert time.monotonic() - start < 2
