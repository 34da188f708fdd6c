"""Property tests of the wire codec, beyond those in tests/test_codec.py.

tests/test_codec.py already checks, with hypothesis, that any body, any subject
without control characters and any header value round-trip, and that random
bytes or emailmw-looking garbage never make :func:`decode_email` raise anything
but :class:`MalformedEmailError`. This file adds:

* every topic name that :func:`validate_name` accepts (up to its 255-character
  limit), together with any body, through every rewrite a mail store may do;
* every header set that :func:`validate_headers` accepts goes out and comes back
  exactly, and :func:`validate_headers` itself never raises anything else;
* a signature survives the trip (so signing covers exactly what arrives), and
  any change to a signed field breaks it;
* real emailmw emails with random byte-level damage still decode or fail cleanly;
* any charset a header may name, with any bytes: the text that comes out is valid
  Unicode (no lone surrogates: emailmw could not send such a string back);
* every email of the hostile corpus (tests/hostile_corpus.py), fed to the parser
  as it is, fails cleanly and quickly;
* To and Cc address lists decode to what :func:`email.utils.getaddresses` gives
  for well-formed lists, and the fast path for plain lists agrees with the
  general tokenizer on any input.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable
from email.utils import getaddresses

import pytest
from hostile_corpus import CorpusEmail, corpus
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from emailmw.errors import InvalidHeaderError, InvalidNameError
from emailmw.security import sign_email, verify_signature
from emailmw.transport import codec
from emailmw.transport.codec import MalformedEmailError, decode_email, encode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.validation import MAX_NAME_LENGTH, validate_headers, validate_name

pytestmark = pytest.mark.timeout(300)

METADATA = {"Source-Timestamp": "1700000000123456789", "Publisher-GID": "4294967295"}


# ----------------------------------------------------------------------------- wire rewrites


def _lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def _dovecot(raw: bytes) -> bytes:
    """Dovecot's APPEND: bare CR and bare LF become CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", raw)


def _dots(raw: bytes) -> bytes:
    return re.sub(rb"(?m)^\.\.", b".", re.sub(rb"(?m)^\.", b"..", raw))


WIRE: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda raw: raw,
    "lf": _lf,
    "dovecot": _dovecot,
    "dots": _dots,
    "extra_crlf": lambda raw: raw + b"\r\n",
    "no_final_crlf": lambda raw: raw[:-2] if raw.endswith(b"\r\n") else raw,
    "lf_no_final": lambda raw: _lf(raw)[:-1] if raw.endswith(b"\r\n") else _lf(raw),
}

# ----------------------------------------------------------------------------- strategies

#: Characters validate_name accepts: no controls, separators, surrogates or unassigned.
NAME_CHARS = st.characters(exclude_categories=["Cc", "Zl", "Zp", "Cs", "Cn"])
TRICKY_ASCII = st.sampled_from(list(" =?_\"'():;<>@,.\\/*-+%$#!~`[]{}|^&"))
NAMES = st.text(
    alphabet=st.one_of(NAME_CHARS, TRICKY_ASCII), min_size=1, max_size=MAX_NAME_LENGTH
) | st.sampled_from(
    [" ", "   ", "=?", "?=", "=?utf-8?b?QQ==?=", "a" * MAX_NAME_LENGTH, "é" * MAX_NAME_LENGTH]
)
BODIES = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=3000) | st.text(
    alphabet="\r\n .From=\0\t é-", max_size=300
)
FIELD_NAMES = st.text(
    alphabet=[chr(c) for c in range(33, 127) if chr(c) != ":"], min_size=1, max_size=76
)
HEADER_VALUES = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"),
    max_size=400,
)
MSG_ID_TEXT = st.text(
    alphabet=[chr(c) for c in range(33, 127) if chr(c) not in "<>"], min_size=1, max_size=200
)
KEYS = st.binary(min_size=1, max_size=64)


def make_email(
    subject: str = "/t",
    body: str = "hello",
    headers: dict[str, str] | None = None,
    message_id: str = "<1@example.test>",
    in_reply_to: str | None = None,
) -> EmailData:
    return EmailData(
        content=EmailContent(subject=subject, body=body),
        headers=EmailHeaders({**METADATA, **(headers or {})}),
        message_id=message_id,
        in_reply_to=in_reply_to,
        from_="alice@example.test",
        recipients=EmailRecipients(to=["bob@example.test"]),
    )


def decoded(raw: bytes) -> EmailData:
    result = decode_email(raw)
    assert result is not None
    return result


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=NAMES, body=BODIES, wire=st.sampled_from(sorted(WIRE)))
def test_any_valid_topic_and_any_body_round_trip_exactly(topic: str, body: str, wire: str) -> None:
    assert validate_name(topic) == topic
    raw = encode_email(make_email(subject=topic, body=body))
    email = decoded(WIRE[wire](raw))
    assert email.content.subject == topic
    assert email.content.body == body


@settings(max_examples=200, deadline=None)
@given(topic=st.text(max_size=MAX_NAME_LENGTH + 5))
def test_names_validation_refuses_cannot_be_sent_as_topics_anyway(topic: str) -> None:
    """validate_name is total, and what it accepts the codec can carry."""
    try:
        validate_name(topic)
    except InvalidNameError:
        return
    raw = encode_email(make_email(subject=topic))
    assert decoded(_dovecot(raw)).content.subject == topic


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(FIELD_NAMES, HEADER_VALUES, max_size=6),
    wire=st.sampled_from(sorted(WIRE)),
)
def test_headers_that_validation_accepts_round_trip_exactly(
    headers: dict[str, str], wire: str
) -> None:
    try:
        accepted = validate_headers(headers)
    except InvalidHeaderError:
        assume(False)
        return
    raw = encode_email(make_email(headers=accepted))
    email = decoded(WIRE[wire](raw))
    for name, value in accepted.items():
        assert email.headers.get(name) == value, name


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(
        st.text(max_size=80) | FIELD_NAMES,
        st.text(max_size=80) | st.integers() | st.none(),
        max_size=4,
    )
)
def test_validate_headers_raises_nothing_but_invalid_header_error(
    headers: dict[str, object],
) -> None:
    try:
        result = validate_headers(headers)  # type: ignore[arg-type]
    except InvalidHeaderError:
        return
    assert result == headers


# ----------------------------------------------------------------------------- signatures


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=KEYS,
    topic=NAMES,
    body=BODIES,
    message_id=MSG_ID_TEXT,
    in_reply_to=st.none() | MSG_ID_TEXT,
    extra=st.dictionaries(st.sampled_from(["Client-GID", "Request-Sequence-Number"]), st.just("7")),
    wire=st.sampled_from(sorted(WIRE)),
)
def test_a_signature_survives_the_trip(
    key: bytes,
    topic: str,
    body: str,
    message_id: str,
    in_reply_to: str | None,
    extra: dict[str, str],
    wire: str,
) -> None:
    email = make_email(
        subject=topic,
        body=body,
        headers=extra,
        message_id=f"<{message_id}>",
        in_reply_to=None if in_reply_to is None else f"<{in_reply_to}>",
    )
    sign_email(email, key)
    received = decoded(WIRE[wire](encode_email(email)))
    assert verify_signature(received, key) is True


FIELDS = ["subject", "body", "Source-Timestamp", "Publisher-GID", "message_id", "in_reply_to"]


@settings(max_examples=300, deadline=None)
@given(
    key=KEYS,
    other_key=KEYS,
    topic=NAMES,
    body=BODIES,
    field=st.sampled_from(FIELDS),
    replacement=st.text(min_size=0, max_size=30),
)
def test_any_change_to_a_signed_field_breaks_the_signature(
    key: bytes, other_key: bytes, topic: str, body: str, field: str, replacement: str
) -> None:
    email = make_email(subject=topic, body=body)
    sign_email(email, key)
    if field == "subject":
        assume(replacement != email.content.subject)
        email.content.subject = replacement
    elif field == "body":
        assume(replacement != email.content.body)
        email.content.body = replacement
    elif field == "message_id":
        assume(replacement != email.message_id)
        email.message_id = replacement
    elif field == "in_reply_to":
        assume(replacement != "")
        email.in_reply_to = replacement
    else:
        assume(replacement != email.headers[field])
        email.headers[field] = replacement
    assert verify_signature(email, key) is False
    assume(other_key != key)
    sign_email(email, other_key)
    assert verify_signature(email, key) is False


@settings(max_examples=200, deadline=None)
@given(key=KEYS, a=st.text(max_size=20), b=st.text(max_size=20), c=st.text(max_size=20))
def test_bytes_cannot_move_between_signed_fields(key: bytes, a: str, b: str, c: str) -> None:
    """Subject "ab" + body "c" and subject "a" + body "bc" sign differently."""
    assume(b)
    one = make_email(subject=a + b, body=c)
    two = make_email(subject=a, body=b + c)
    sign_email(one, key)
    two.headers["Emailmw-Signature"] = one.headers["Emailmw-Signature"]
    assert verify_signature(two, key) is False


# ----------------------------------------------------------------------------- damaged emails

_SEEDS = [b"\r", b"\n", b"\r\n", b"\0", b"=", b"=\r\n", b":", b"=?", b"?=", b"--", b" ", b"\xff"]


@st.composite
def damaged_emails(draw: st.DrawFn) -> bytes:
    """A real emailmw email (QP, base64 or multipart) with a few random byte edits."""
    body = draw(BODIES)
    raw = encode_email(make_email(subject=draw(NAMES), body=body, headers={"X-U": "v"}))
    if draw(st.booleans()):  # wrap the body into a multipart/mixed
        head = raw.partition(b"\r\n\r\n")[0]
        head = re.sub(
            rb"Content-Type: [^\r]*\r\nContent-Transfer-Encoding: [^\r]*\r\n",
            b'Content-Type: multipart/mixed; boundary="XX"\r\n',
            head,
        )
        part = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
        encoded = base64.encodebytes(body.encode("utf-8"))
        raw = head + b"\r\n\r\n--XX\r\n" + part + b"\r\n" + encoded + b"\r\n--XX--\r\n"
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "repeat"]))
        chunk = draw(st.sampled_from(_SEEDS) | st.binary(min_size=1, max_size=8))
        if kind == "insert":
            data[where:where] = chunk
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 40))]
        elif kind == "replace":
            data[where : where + len(chunk)] = chunk
        elif kind == "truncate":
            del data[where:]
        else:
            end = data.find(b"\n", where)
            if end != -1:
                data[where:where] = data[where : end + 1]
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=damaged_emails())
def test_damaged_emails_decode_or_fail_cleanly(raw: bytes) -> None:
    try:
        result = decode_email(raw)
    except MalformedEmailError:
        return
    assert result is None or isinstance(result, EmailData)


# ----------------------------------------------------------------------------- charsets

CHARSETS = [
    "utf-8",
    "us-ascii",
    "iso-8859-1",
    "windows-1252",
    "koi8-r",
    "shift_jis",
    "euc-jp",
    "iso-2022-jp",
    "big5",
    "gb2312",
    "utf-16",
    "utf-16-le",
    "utf-32",
    "utf-7",
    "unicode-escape",
    "raw-unicode-escape",
    "punycode",
    "idna",
    "hex",
    "rot13",
    "x-no-such",
]
_HEAD = (
    b"From: a@example.test\r\nSubject: /t\r\nMessage-ID: <1@example.test>\r\n"
    b"Publisher-GID: 1\r\nSource-Timestamp: 1\r\n"
)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=600, deadline=None)
@given(
    charset=st.sampled_from(CHARSETS),
    payload=st.binary(max_size=60)
    | st.sampled_from([b"+2AA-", b"+2AD/-", b"\\ud800", b"\\udfff x", b"\x00\xd8", b"\xff\xfe"]),
    encoding=st.sampled_from(["8bit", "base64", "quoted-printable", "in-subject"]),
)
def test_decoded_text_is_always_valid_unicode(charset: str, payload: bytes, encoding: str) -> None:
    """Whatever charset an email names, no lone surrogate comes out: a subscriber could
    not print such a string, and a service could not send it back (encode refuses it)."""
    if encoding == "in-subject":
        word = binascii.b2a_base64(payload, newline=False).decode("ascii")
        raw = _HEAD.replace(b"Subject: /t", f"Subject: =?{charset}?b?{word}?=".encode())
        raw += b"\r\nbody\r\n"
    else:
        if encoding == "base64":
            wire = base64.encodebytes(payload)
        elif encoding == "quoted-printable":
            wire = binascii.b2a_qp(payload)
        else:
            wire = payload.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
        raw = (
            _HEAD
            + f"Content-Type: text/plain; charset={charset}\r\n".encode()
            + f"Content-Transfer-Encoding: {encoding}\r\n\r\n".encode()
            + wire
        )
    try:
        email = decode_email(raw)
    except MalformedEmailError:
        return
    assert email is not None
    assert _utf8_ok(email.content.subject), repr(email.content.subject)
    assert _utf8_ok(email.content.body), repr(email.content.body)


# ----------------------------------------------------------------------------- the hostile corpus


@pytest.mark.parametrize("item", corpus("/t", client_gid=1), ids=lambda item: item.name)
def test_hostile_corpus_decodes_or_fails_cleanly_and_quickly(item: CorpusEmail) -> None:
    """The raw corpus bytes straight to the parser (no server normalizing them first)."""
    start = time.monotonic()
    try:
        result = decode_email(item.raw)
    except MalformedEmailError:
        result = None
    assert result is None or isinstance(result, EmailData)
    assert time.monotonic() - start < 2.0


# ----------------------------------------------------------------------------- address lists

_ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_+-", min_size=1, max_size=8)
_DOT_ATOM = st.lists(_ATOM, min_size=1, max_size=3).map(".".join)
_ADDR_SPEC = st.builds(lambda local, domain: f"{local}@{domain}", _DOT_ATOM, _DOT_ATOM)
_PHRASE = st.lists(_ATOM, min_size=1, max_size=3).map(" ".join)
_QUOTED = st.text(alphabet="abc XYZ,.;:()<>@[]'\\\"", max_size=12).map(
    lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
_COMMENT = st.text(alphabet="abc XYZ,.;:<>@'", max_size=10).map(lambda text: f"({text})")
_MAILBOX = st.one_of(
    _ADDR_SPEC,
    st.builds(lambda name, addr: f"{name} <{addr}>", _PHRASE, _ADDR_SPEC),
    st.builds(lambda name, addr: f"{name} <{addr}>", _QUOTED, _ADDR_SPEC),
    st.builds(lambda addr, comment: f"{addr} {comment}", _ADDR_SPEC, _COMMENT),
    st.builds(lambda comment, addr: f"{comment} {addr}", _COMMENT, _ADDR_SPEC),
)
_GROUP = st.builds(
    lambda name, members: f"{name}: {', '.join(members)};",
    _PHRASE,
    st.lists(_MAILBOX, max_size=3),
)
_ADDRESS_LIST = st.lists(st.one_of(_MAILBOX, _MAILBOX, _GROUP), min_size=1, max_size=6).map(
    ", ".join
)


@settings(max_examples=500, deadline=None)
@given(fields=st.lists(_ADDRESS_LIST, min_size=1, max_size=4), name=st.sampled_from(["To", "Cc"]))
def test_address_lists_decode_like_getaddresses(fields: list[str], name: str) -> None:
    """Well-formed To/Cc fields (plain addresses, display names, quoted strings with
    specials, comments, groups; several fields) give the addresses the standard
    library's parser finds, in order."""
    expected = [address for _, address in getaddresses(fields) if address]
    head = "".join(f"{name}: {value}\r\n" for value in fields).encode()
    email = decoded(head + b"Subject: /t\r\nPublisher-GID: 1\r\nSource-Timestamp: 1\r\n\r\nx")
    assert (email.recipients.to if name == "To" else email.recipients.cc) == expected


_ADDRESS_NOISE = st.lists(st.sampled_from([*'ab@. ,<>"\\():;\t', "x@y.z", "é"]), max_size=30).map(
    "".join
)


@settings(max_examples=1000, deadline=None)
@given(value=_ADDRESS_NOISE | _ADDRESS_LIST)
def test_the_fast_address_path_agrees_with_the_tokenizer(value: str) -> None:
    """The fast path takes only lists it reads exactly as the general tokenizer does."""
    fast = codec._simple_address_list(value)
    slow: list[str] = []
    codec._parse_address_list(value, slow)
    if fast is not None:
        assert fast == slow
