"""``pkcs11:`` URIs (RFC 7512) as sknock.token reads them: strictly, with an error naming the attribute."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sknock.errors import CredentialError, TokenError
from sknock.token import Pkcs11Uri, is_pkcs11_uri, parse_pkcs11_uri

YKCS11 = "/usr/lib/x86_64-linux-gnu/libykcs11.so"


def test_the_rfc_examples_and_ours_parse() -> None:
    uri = parse_pkcs11_uri(f"pkcs11:token=YubiKey%20PIV%20%2312345;id=%01;type=private?module-path={YKCS11}")
    assert uri.token == "YubiKey PIV #12345"
    assert uri.id == b"\x01"
    assert uri.get("type") == "private"
    assert uri.module_path == YKCS11
    assert uri.describe() == "token 'YubiKey PIV #12345', id 01"
    # RFC 7512 section 3's examples (those with attributes it defines).
    assert parse_pkcs11_uri("pkcs11:").path == ()
    ex = parse_pkcs11_uri("pkcs11:object=my-pubkey;type=public")
    assert ex.object == "my-pubkey" and ex.get("type") == "public"
    ex = parse_pkcs11_uri("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?"
                          "pin-value=the-pin")
    assert ex.token == "Software PKCS#11 softtoken" and ex.get("manufacturer") == "Snake Oil, Inc."
    assert ex.get("pin-value") == "the-pin"
    ex = parse_pkcs11_uri("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert")
    assert ex.token == "A name with a substring %;"
    ex = parse_pkcs11_uri("pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;"
                          "type=cert")
    assert ex.token == "Name with a small A with acute: \u00e1"
    ex = parse_pkcs11_uri("pkcs11:slot-id=2;id=%01%02?pin-source=file:/etc/token_pin&module-path=/usr/lib/p11.so")
    assert ex.id == b"\x01\x02" and ex.get("slot-id") == "2" and ex.get("pin-source") == "file:/etc/token_pin"


def test_describe_never_shows_the_pin() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t;object=k?pin-value=secret123&module-path=/m.so")
    assert "secret123" not in uri.describe()
    assert uri.describe() == "token 't', object 'k'"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs11:token=a;slot=1", "unknown path attribute slot"),
        ("pkcs11:x-vendor=1", "unknown path attribute x-vendor"),
        ("pkcs11:token=a?module=/x.so", "unknown query attribute module"),
        ("pkcs11:module-path=/x.so", "unknown path attribute module-path (it belongs in the query)"),
        ("pkcs11:token=a?token=b", "unknown query attribute token (it belongs in the path)"),
        ("pkcs11:token=a;token=b", "attribute token is given twice"),
        ("pkcs11:token=a?module-path=/a.so&module-path=/b.so", "attribute module-path is given twice"),
        ("pkcs11:token=", "attribute token is empty"),
        ("pkcs11:token", "path attribute token has no '=value'"),
        ("pkcs11:id=%0", "attribute id has a character that must be percent-encoded, or a bad %XX"),
        ("pkcs11:id=%zz", "attribute id has a character that must be percent-encoded, or a bad %XX"),
        ("pkcs11:object=a/b", "attribute object has a character that must be percent-encoded"),
        ("pkcs11:object=a b", "attribute object has a character that must be percent-encoded"),
        ("pkcs11:token=%ff", "attribute token is not UTF-8 text"),
        ("pkcs11:type=secret", "attribute type must be one of public, private, cert, secret-key, data, not 'secret'"),
        ("pkcs11:slot-id=0x1", "attribute slot-id must be a decimal number, not '0x1'"),
        ("pkcs11:library-version=1.2.3", "attribute library-version must be M or M.N, not '1.2.3'"),
        ("pkcs11:token=a#frag", "a '#' fragment is not allowed"),
        ("pkcs11:token=a?pin-value=x&", "query attribute '' has no '=value'"),
    ],
)
def test_malformed_uris_name_the_attribute(text: str, message: str) -> None:
    with pytest.raises(TokenError) as caught:
        parse_pkcs11_uri(text)
    assert str(caught.value).startswith("pkcs11 URI: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, CredentialError)  # the CLIs and callers of a .pfx catch it as before


def test_only_the_pkcs11_scheme_is_a_token() -> None:
    assert is_pkcs11_uri("pkcs11:token=a")
    assert is_pkcs11_uri("PKCS11:token=a")  # a scheme is case-insensitive
    assert not is_pkcs11_uri("alice.pfx")
    assert not is_pkcs11_uri("./pkcs11:token=a")
    with pytest.raises(TokenError, match="not a pkcs11: URI"):
        parse_pkcs11_uri("file:alice.pfx")


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
_PATH_TEXT = st.sampled_from(["token", "manufacturer", "serial", "model", "object"])


@given(
    text_attrs=st.dictionaries(_PATH_TEXT, _TEXT, max_size=5),
    key_id=st.one_of(st.none(), st.binary(min_size=1, max_size=20)),
    slot=st.one_of(st.none(), st.integers(0, 2**63)),
    module=st.one_of(st.none(), _TEXT.map(lambda t: "/" + t)),
    pin_source=st.one_of(st.none(), _TEXT.map(lambda t: "file:/" + t)),
)
def test_any_uri_we_write_reads_back_the_same(
    text_attrs: dict[str, str], key_id: bytes | None, slot: int | None, module: str | None, pin_source: str | None
) -> None:
    path: list[tuple[str, str | bytes]] = list(text_attrs.items())
    if key_id is not None:
        path.append(("id", key_id))
    if slot is not None:
        path.append(("slot-id", str(slot)))
    query = [(k, v) for k, v in (("module-path", module), ("pin-source", pin_source)) if v is not None]
    written = Pkcs11Uri(tuple(path), tuple(query))
    assert parse_pkcs11_uri(str(written)) == written


@given(st.text(max_size=200))
def test_any_text_after_the_scheme_parses_or_is_a_token_error(rest: str) -> None:
    try:
        uri = parse_pkcs11_uri("pkcs11:" + rest)
    except TokenError as exc:
        assert str(exc).startswith(("pkcs11 URI: ", "not a pkcs11: URI")), exc
        assert "\n" not in str(exc)
    else:
        assert parse_pkcs11_uri(str(uri)) == uri  # what parsed, written back, parses the same


@given(st.binary(max_size=100))
def test_any_bytes_percent_encoded_parse_to_a_token_error_or_the_same_text(raw: bytes) -> None:
    encoded = "".join(f"%{b:02x}" for b in raw)
    text = f"pkcs11:object={encoded}" if raw else "pkcs11:"
    try:
        uri = parse_pkcs11_uri(text)
    except TokenError as exc:
        assert "attribute object is not UTF-8 text" in str(exc)
    else:
        assert uri.object == (raw.decode("utf-8") if raw else None)
