"""Names and additional headers: everything bad is refused before it reaches an email."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emailmw import InvalidHeaderError, InvalidMessageError, InvalidNameError
from emailmw.validation import (
    MAX_NAME_LENGTH,
    RESERVED_HEADERS,
    is_transport_header,
    unencodable_character,
    validate_headers,
    validate_name,
    validate_payload,
)

pytestmark = pytest.mark.timeout(30)

GOOD_NAMES = [
    "/chatter",
    "a",
    "topic with spaces",
    "/robot/arm/joint_1",
    "héllo/wörld",
    "日本語",
    "emoji 🚀",
    "x" * MAX_NAME_LENGTH,
    "=?utf-8?b?looks-encoded?=",
]

BAD_NAMES = [
    "",
    "a\rb",
    "a\nb",
    "a\r\nb",
    "\r\n",
    "nul\x00",
    "del\x7f",
    "tab\there",
    "bell\x07",
    "nel\x85",
    "line\u2028sep",
    "para\u2029sep",
    "surrogate\ud800",
    "unassigned\U000e0080",
    "x" * (MAX_NAME_LENGTH + 1),
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    assert validate_name(name) == name
    assert validate_name(name, "service") == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)


@pytest.mark.parametrize("name", [None, 1, b"/chatter", ["/x"], 1.5])
def test_non_str_names(name: object) -> None:
    with pytest.raises(InvalidNameError, match="must be a str"):
        validate_name(name)


def test_name_error_says_what_is_wrong() -> None:
    with pytest.raises(InvalidNameError, match="service name must not be empty"):
        validate_name("", "service")
    with pytest.raises(InvalidNameError, match=r"U\+000A at index 1"):
        validate_name("a\nb")
    with pytest.raises(InvalidNameError, match="limit is 255"):
        validate_name("x" * 256)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=300))
def test_validate_name_is_total(name: str) -> None:
    """Any str is either returned unchanged or refused with InvalidNameError."""
    try:
        assert validate_name(name) == name
    except InvalidNameError:
        return
    assert name
    assert len(name) <= MAX_NAME_LENGTH
    assert not any(c in name for c in "\r\n\x00\x7f")


# -- headers -------------------------------------------------------------------------


def test_no_headers() -> None:
    assert validate_headers(None) == {}
    assert validate_headers({}) == {}


def test_good_headers_are_returned_as_a_dict() -> None:
    headers = {"Priority": "high", "Trace-Id": "abc-123", "Language": "fr", "E": ""}
    result = validate_headers(headers)
    assert result == headers
    assert type(result) is dict


@pytest.mark.parametrize(
    "name",
    [
        "Delivered-To",
        "DKIM-Signature",
        "Subject",
        "subject",
        "From",
        "To",
        "Cc",
        "BCC",
        "Message-ID",
        "message-id",
        "In-Reply-To",
        "References",
        "Date",
        "Content-Type",
        "Content-Transfer-Encoding",
        "MIME-Version",
        "Publisher-GID",
        "publisher-gid",
        "Client-GID",
        "Request-Sequence-Number",
        "Source-Timestamp",
        "Emailmw-Signature",
    ],
)
def test_reserved_header_names(name: str) -> None:
    assert name.lower() in RESERVED_HEADERS or is_transport_header(name)
    with pytest.raises(InvalidHeaderError, match="reserved"):
        validate_headers({name: "x"})


@pytest.mark.parametrize("name", ["Content-Language", "Content-ID", "Resent-From", "ARC-Seal"])
def test_transport_header_families_are_reserved(name: str) -> None:
    """Whole families of headers belong to MIME and the mail servers, not to users."""
    assert is_transport_header(name)
    with pytest.raises(InvalidHeaderError, match="reserved"):
        validate_headers({name: "x"})


@pytest.mark.parametrize(
    "name", ["", "Bad Name", "Bad:Name", "Bad\nName", "Bäd", "\x00", "A" * 77, 5, None]
)
def test_bad_header_names(name: object) -> None:
    with pytest.raises(InvalidHeaderError, match="invalid header name"):
        validate_headers({name: "x"})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "value", ["a\rb", "a\nb", "a\r\nInjected: yes", "nul\x00", "x" * 8001, "lone\udc80"]
)
def test_bad_header_values(value: str) -> None:
    with pytest.raises(InvalidHeaderError, match="Trace"):
        validate_headers({"Trace": value})


def test_non_str_header_value() -> None:
    with pytest.raises(InvalidHeaderError, match="must be a str"):
        validate_headers({"Trace": 5})  # type: ignore[dict-item]


def test_header_given_twice_in_different_case() -> None:
    with pytest.raises(InvalidHeaderError, match="twice"):
        validate_headers({"Trace": "1", "TRACE": "2"})


def test_headers_must_be_a_mapping() -> None:
    with pytest.raises(InvalidHeaderError, match="mapping"):
        validate_headers([("Trace", "1")])  # type: ignore[arg-type]


def test_longest_header_value_is_accepted() -> None:
    assert validate_headers({"Trace": "x" * 8000}) == {"Trace": "x" * 8000}


# ----------------------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    "text",
    ["", "plain", "\0\r\n\x85\u2028", "日本語 🎉", "\U0010ffff"],
    ids=["empty", "plain", "controls", "non_ascii", "max_code_point"],
)
def test_encodable_payloads_are_accepted(text: str) -> None:
    """Any str UTF-8 can encode is carried exactly, even odd ones (CR, NUL, ...)."""
    assert validate_payload(text) is text
    assert unencodable_character(text) is None


@pytest.mark.parametrize(
    ("text", "index", "code"),
    [
        ("a\ud800b", 1, "U+D800"),
        ("\udfff", 0, "U+DFFF"),
        ("x" * 100 + "\udc80", 100, "U+DC80"),
        ("\ud83c\udf89", 0, "U+D83C"),  # a surrogate pair written as two str characters
    ],
)
def test_lone_surrogates_are_refused_naming_the_character(text: str, index: int, code: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        validate_payload(text, "response")
    message = str(info.value)
    assert message.startswith("response cannot be sent: ")
    assert f"{code} at index {index}" in message
    assert isinstance(info.value, ValueError)


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_validate_payload_accepts_exactly_what_utf8_encodes(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(InvalidMessageError, match="lone surrogate"):
            validate_payload(text)
    else:
        assert validate_payload(text) is text
