"""log_safe: every field from the wire or a certificate becomes one bounded line of printable text,
and the errors that carry such fields (KnockRefused, CertificateError) escape them themselves."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sknock.errors import DETAIL_LIMIT, CertificateError, KnockRefused, Reason
from sknock.logsafe import DEFAULT_LIMIT, log_safe


def test_printable_text_is_returned_as_it_is() -> None:
    for text in ("CN=alice", "CN=a\\,b", "tcp/22,udp/8000", "CN=Zoë 日本", ""):
        assert log_safe(text) is text


def test_line_breaks_and_controls_are_escaped() -> None:
    assert log_safe("CN=x\n2026-11-30 12:00:00,000 INFO sknock: granted tcp/22") == (
        "CN=x\\x0a2026-11-30 12:00:00,000 INFO sknock: granted tcp/22"
    )
    assert log_safe("a\rb\tc\x00d\x1b[31me\x7ff\x85g") == "a\\x0db\\x09c\\x00d\\x1b[31me\\x7ff\\x85g"
    # Unicode line and paragraph separators, a bidi override, a tag character: not printable either.
    assert log_safe("\u2028\u2029\u202e\U000e0041") == "\\u2028\\u2029\\u202e\\U000e0041"


def test_bytes_and_other_values() -> None:
    assert log_safe(b"ab\xff\n") == "ab\\xff\\x0a"
    assert log_safe(ValueError("bad\nvalue")) == "bad\\x0avalue"
    assert log_safe(1234) == "1234"


def test_length_is_bounded_without_cutting_an_escape() -> None:
    assert log_safe("x" * 1000) == "x" * (DEFAULT_LIMIT - 3) + "..."
    cut = log_safe("\n" * 1000, 30)
    assert cut == "\\x0a" * 6 + "..." and len(cut) <= 30
    assert log_safe("\nabcdef", 10) == "\\x0aabcdef"  # exactly the limit: nothing cut


@given(st.text(max_size=600), st.integers(min_value=8, max_value=500))
def test_any_text_becomes_one_bounded_printable_line(text: str, limit: int) -> None:
    safe = log_safe(text, limit)
    assert len(safe) <= limit
    assert safe.isprintable()
    assert "\n" not in safe and "\r" not in safe
    assert log_safe(safe, limit) == safe  # escaping twice changes nothing


def test_refusals_and_certificate_errors_escape_what_they_quote() -> None:
    refusal = KnockRefused(Reason.NOT_AUTHORIZED, "CN=x\ngranted tcp/22 to 198.18.0.9 may not open tcp/23")
    assert refusal.detail == "CN=x\\x0agranted tcp/22 to 198.18.0.9 may not open tcp/23"
    assert "\n" not in str(refusal)
    error = CertificateError(Reason.CERT_UNTRUSTED, "client certificate CN=y\r\nforged: " + "z" * 2000)
    assert error.reason is Reason.CERT_UNTRUSTED
    assert str(error).startswith("client certificate CN=y\\x0d\\x0aforged: zzz")
    assert len(str(error)) <= DETAIL_LIMIT and str(error).isprintable()
