"""A corpus of hostile emails, as raw RFC 5322 bytes, for robustness tests and benchmarks.

:func:`corpus` returns emails in mailbox order: a valid emailmw message, a hostile
one, a valid one, a hostile one, ... Each :class:`CorpusEmail` says what a
context with default options (no signing key, ``max-message-size`` 25 MB) that
subscribes to ``topic`` must do with it once the email was IMAP-APPENDed into
its mailbox: deliver it (``expect is None``; ``body`` is what the subscription
gets) or drop it and count it under ``expect`` (a :class:`DropReason`).

Some emails are valid despite looking hostile (a 1 MB header, a 12 000-character
header line, bare LF line endings, NUL written as ``=00``): those must arrive.
Expectations are for what Dovecot stores: it turns a raw NUL byte into 0x80 and
bare CR or LF line endings into CRLF on APPEND (``decode_email`` fed the bytes
directly may therefore see something else; it must still never raise anything
but ``MalformedEmailError``).

:func:`oversized_email` builds the 50 MB one separately (it is big), and
:func:`valid_message` the plain valid emails in between.

Usage (tests, benchmarks)::

    from hostile_corpus import corpus, expected_drops
    for item in corpus("/hostile/x", client_gid=client.gid.value):
        dev_server.append("alice", item.raw, folder)
"""

from __future__ import annotations

import base64
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from emailmw.stats import DropReason
from emailmw.transport.codec import encode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients

__all__ = [
    "EVIL",
    "CorpusEmail",
    "corpus",
    "expected_drops",
    "hostile_emails",
    "oversized_email",
    "valid_message",
]

#: The From address of every hostile email.
EVIL = "mallory@evil.test"
#: The From address of the valid messages.
GOOD = "alice@example.test"
CRLF = b"\r\n"

Fields = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class CorpusEmail:
    """One email of the corpus.

    ``expect``: ``None`` if it must be delivered (with ``body``), else how its
    drop is counted. ``message_id``: its Message-ID (``""`` when it has none or
    several). ``valid``: one of the plain valid messages between hostile ones.
    """

    name: str
    raw: bytes
    expect: DropReason | None
    message_id: str = ""
    body: str | None = None
    valid: bool = False
    note: str = ""


def _now() -> bytes:
    return str(time.time_ns()).encode()


def valid_message(
    topic: str,
    body: str,
    message_id: str,
    *,
    gid: int = 7,
    from_: str = GOOD,
    extra: dict[str, str] | None = None,
) -> bytes:
    """A valid emailmw message on ``topic``, encoded by emailmw's own codec."""
    headers = EmailHeaders(extra or {})
    headers["Source-Timestamp"] = _now().decode()
    headers["Publisher-GID"] = str(gid)
    return encode_email(
        EmailData(
            content=EmailContent(topic, body),
            headers=headers,
            message_id=message_id,
            from_=from_,
            recipients=EmailRecipients(to=["alice@example.test"]),
        )
    )


def _raw(fields: Fields, body: bytes, eol: bytes = CRLF) -> bytes:
    head = b"".join(name.encode("ascii") + b": " + value + eol for name, value in fields)
    return head + eol + body


def _message(topic: str, message_id: str, **metadata: bytes) -> Fields:
    """Header fields of a message on ``topic``; ``metadata`` (``Source_Timestamp=...``,
    ``Publisher_GID=...``) overrides a metadata value, or removes it when ``b""``."""
    fields: Fields = [
        ("From", EVIL.encode()),
        ("To", b"alice@example.test"),
        ("Subject", topic.encode("utf-8")),
        ("Message-ID", message_id.encode()),
        ("Date", b"Thu, 01 Jan 2026 00:00:00 +0000"),
        ("MIME-Version", b"1.0"),
        ("Content-Type", b'text/plain; charset="utf-8"'),
        ("Content-Transfer-Encoding", b"7bit"),
    ]
    values = {"Source-Timestamp": _now(), "Publisher-GID": b"7"}
    values.update({k.replace("_", "-"): v for k, v in metadata.items()})
    fields += [(name, value) for name, value in values.items() if value]
    return fields


def _replace(fields: Fields, name: str, value: bytes) -> Fields:
    return [(n, value if n.lower() == name.lower() else v) for n, v in fields]


def _request(
    topic: str, message_id: str, *, gid: bytes | None, seq: bytes | None, reply_to: str = ""
) -> Fields:
    fields = _message(topic, message_id)
    fields = [(n, v) for n, v in fields if n != "Publisher-GID"]
    if gid is not None:
        fields.append(("Client-GID", gid))
    if seq is not None:
        fields.append(("Request-Sequence-Number", seq))
    if reply_to:
        fields.append(("In-Reply-To", reply_to.encode()))
        fields.append(("References", reply_to.encode()))
    return fields


def _address_line(index: int) -> bytes:
    """One address-list field value of about 350 bytes: plain addresses, display
    names, quoted display names holding commas."""
    return (
        f"user{index}@example.test, Some Body <some.body{index}@example.test>, "
        f'"Doe, Jane" <jane.doe+{index}@mail.example.test>, other{index}@example.test, '
        f"Another Long Display Name <another.long.name{index}@example.test>, "
        f'"Smith, John (Sales)" <john.smith{index}@sales.example.test>, last{index}@x.test, '
        f"O'Brien <obrien{index}@example.test>, very.last.one{index}@long-domain.example.test"
    ).encode()


def _deep_multipart(depth: int) -> tuple[bytes, bytes]:
    """(Content-Type value, body) of ``multipart/mixed`` nested ``depth`` levels deep,
    with one text/plain part at the bottom saying ``deep``."""
    body = bytearray()
    for level in range(1, depth):
        body += b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (
            level - 1,
            level,
        )
    body += b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n--b%d--\r\n" % (
        depth - 1,
        depth - 1,
    )
    for level in range(depth - 2, -1, -1):
        body += b"--b%d--\r\n" % level
    return b'multipart/mixed; boundary="b0"', bytes(body)


def hostile_emails(
    topic: str, *, client_gid: int | None = None, token: str | None = None
) -> list[CorpusEmail]:
    """The hostile emails alone (see the module docstring), in a fixed order.

    ``client_gid``: the GID of a live service client of the receiving context (a
    response to it for a sequence number it never used must be dropped).
    """
    tag = token or secrets.token_hex(4)
    items: list[CorpusEmail] = []

    def add(
        name: str,
        raw: bytes | None,
        expect: DropReason | None,
        *,
        mid: str = "",
        body: str | None = None,
        note: str = "",
        fields: Fields | None = None,
        payload: bytes = b"hostile\r\n",
        eol: bytes = CRLF,
    ) -> None:
        if raw is None:
            assert fields is not None
            raw = _raw(fields, payload, eol)
        items.append(CorpusEmail(name, raw, expect, mid, body, note=note))

    def mid(name: str) -> str:
        return f"<h.{name}.{tag}@evil.test>"

    malformed = DropReason.MALFORMED

    # -- not ours -----------------------------------------------------------------------
    add(
        "not_emailmw",
        b"From: spam@evil.test\r\nSubject: cheap pills\r\n\r\nbuy now\r\n",
        DropReason.NOT_EMAILMW,
    )
    add(
        "no_metadata_on_our_topic",
        None,
        DropReason.NOT_EMAILMW,
        fields=_message(topic, mid("nometa"), Source_Timestamp=b"", Publisher_GID=b""),
    )
    add("empty_email", b"\r\n", DropReason.NOT_EMAILMW)
    rng = random.Random(1234)
    garbage = bytes(rng.randrange(256) for _ in range(4096)).replace(b":", b";")
    add("binary_garbage", garbage, DropReason.NOT_EMAILMW, note="no ':' so no header field")

    # -- missing or repeated metadata ------------------------------------------------------
    m = mid("no_ts")
    add(
        "missing_source_timestamp",
        None,
        malformed,
        mid=m,
        fields=_message(topic, m, Source_Timestamp=b""),
    )
    m = mid("ts_only")
    add(
        "only_source_timestamp",
        None,
        DropReason.UNMATCHED,
        mid=m,
        fields=_message(topic, m, Publisher_GID=b""),
        note="neither a message nor a request: nobody takes it",
    )
    m = mid("cgid_no_seq")
    add(
        "client_gid_without_sequence_number",
        None,
        malformed,
        mid=m,
        fields=_request(topic, m, gid=b"5", seq=None),
    )
    m = mid("seq_no_cgid")
    add(
        "sequence_number_without_client_gid",
        None,
        malformed,
        mid=m,
        fields=_request(topic, m, gid=None, seq=b"1"),
    )
    m = mid("both_no_ts")
    add(
        "message_and_request_headers_without_timestamp",
        None,
        malformed,
        mid=m,
        fields=[
            *_message(topic, m, Source_Timestamp=b""),
            ("Client-GID", b"5"),
            ("Request-Sequence-Number", b"1"),
        ],
        note="one email, one drop: counted and logged once, not once per handler",
    )
    for name, extra in [
        ("repeated_publisher_gid", ("Publisher-GID", b"8")),
        ("repeated_metadata_other_case", ("source-timestamp", _now())),
        ("repeated_subject", ("Subject", b"/elsewhere")),
        ("repeated_from", ("From", b"other@evil.test")),
    ]:
        m = mid(name)
        add(name, None, malformed, mid=m, fields=[*_message(topic, m), extra])
    m = mid("two_ids")
    add(
        "repeated_message_id",
        None,
        malformed,
        fields=[*_message(topic, m), ("Message-ID", mid("two_ids_b").encode())],
    )

    # -- metadata values that do not parse -----------------------------------------------
    bad_values = [
        ("gid_not_a_number", "Publisher-GID", b"seven"),
        ("gid_overflow", "Publisher-GID", b"4294967296"),
        ("gid_negative", "Publisher-GID", b"-1"),
        ("gid_with_plus_sign", "Publisher-GID", b"+1"),
        ("gid_float", "Publisher-GID", b"1.0"),
        ("gid_hex", "Publisher-GID", b"0x10"),
        ("gid_empty", "Publisher-GID", b" "),
        ("gid_non_ascii_digits", "Publisher-GID", "١٢".encode()),
        ("gid_one_megabyte", "Publisher-GID", b"1" * (1 << 20)),
        ("timestamp_not_a_number", "Source-Timestamp", b"yesterday"),
        ("timestamp_overflow", "Source-Timestamp", str(2**63).encode()),
        ("timestamp_underflow", "Source-Timestamp", str(-(2**63) - 1).encode()),
        ("timestamp_huge", "Source-Timestamp", b"9" * 400),
    ]
    for name, header, value in bad_values:
        m = mid(name)
        add(name, None, malformed, mid=m, fields=_replace(_message(topic, m), header, value))
    for name, seq in [
        ("sequence_overflow", str(2**63).encode()),
        ("sequence_not_a_number", b"1e3"),
    ]:
        m = mid(name)
        add(name, None, malformed, mid=m, fields=_request(topic, m, gid=b"5", seq=seq))

    # -- huge headers and long lines: valid, they must arrive ----------------------------
    m = mid("hdr1mb")
    add(
        "header_of_one_megabyte",
        None,
        None,
        mid=m,
        body="after a 1 MB header",
        fields=[*_message(topic, m), ("X-Junk", b"j" * (1 << 20))],
        payload=b"after a 1 MB header",
    )
    m = mid("folded1mb")
    add(
        "header_folded_over_one_megabyte",
        None,
        None,
        mid=m,
        body="after a folded header",
        fields=[*_message(topic, m), ("X-Folded", b"f" + b"\r\n f" * 300_000)],
        payload=b"after a folded header",
    )
    m = mid("many_fields")
    add(
        "ten_thousand_header_fields",
        None,
        None,
        mid=m,
        body="after many fields",
        fields=[*_message(topic, m), *((f"X-F{i}", b"v" * 90) for i in range(10_000))],
        payload=b"after many fields",
    )
    m = mid("line12k")
    add(
        "header_line_over_10000_characters",
        None,
        None,
        mid=m,
        body="after a long line",
        fields=[*_message(topic, m), ("X-Long", b"L" * 12_000)],
        payload=b"after a long line",
    )
    m = mid("subject12k")
    add(
        "subject_line_over_10000_characters",
        None,
        DropReason.UNMATCHED,
        mid=m,
        fields=_replace(_message(topic, m), "Subject", b"/" + b"s" * 12_000),
        note="decodes, but no subscription has that topic",
    )
    m = mid("body_line12k")
    add(
        "body_line_over_10000_characters",
        None,
        None,
        mid=m,
        body="b" * 12_000,
        fields=_message(topic, m),
        payload=b"b" * 12_000 + CRLF,
    )

    # -- header-heavy emails: valid, and decoded in time linear in their size ----------
    # (every To/Cc field used to be joined to all the ones before it: 10 000 To lines
    # took 10-16 s to decode, 7 MB of them a minute)
    m = mid("to10k")
    add(
        "ten_thousand_to_lines",
        None,
        None,
        mid=m,
        body="after 10 000 To lines",
        fields=[*_message(topic, m), *(("To", _address_line(i)) for i in range(10_000))],
        payload=b"after 10 000 To lines",
        note="3.5 MB of To fields",
    )
    m = mid("tocc7mb")
    add(
        "seven_megabytes_of_to_and_cc_lines",
        None,
        None,
        mid=m,
        body="after 7 MB of To and Cc lines",
        fields=[
            *_message(topic, m),
            *((("To", "Cc")[i % 2], _address_line(i)) for i in range(20_000)),
        ],
        payload=b"after 7 MB of To and Cc lines",
    )

    # -- MIME structure ------------------------------------------------------------------
    m = mid("deep")
    content_type, payload = _deep_multipart(2_000)
    add(
        "multipart_nested_2000_deep",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Content-Type", content_type),
        payload=payload,
    )
    m = mid("nested20")
    content_type, payload = _deep_multipart(20)
    add(
        "multipart_nested_20_deep",
        None,
        None,
        mid=m,
        body="deep",
        fields=_replace(_message(topic, m), "Content-Type", content_type),
        payload=payload,
    )
    m = mid("mp8bit")
    add(
        "multipart_with_an_8bit_utf8_text_part",
        None,
        None,
        mid=m,
        body="café crème\nfrom a mail client",
        fields=_replace(
            _message(topic, m), "Content-Type", b'multipart/alternative; boundary="b8"'
        ),
        payload=(
            b"--b8\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            + "café crème\r\nfrom a mail client".encode()
            + b"\r\n--b8\r\nContent-Type: text/html\r\n\r\n<p>caf\xc3\xa9</p>\r\n--b8--\r\n"
        ),
        note="valid: it was refused as malformed before",
    )
    m = mid("mp_no_text")
    add(
        "multipart_without_text_plain",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Content-Type", b'multipart/mixed; boundary="b"'),
        payload=b"--b\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b--\r\n",
    )
    m = mid("image")
    add(
        "content_type_image",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Content-Type", b"image/png"),
        payload=b"\x89PNG\r\n",
    )
    m = mid("bad_b64")
    add(
        "broken_base64",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Content-Transfer-Encoding", b"base64"),
        payload=b"abcde\r\n",
    )
    m = mid("cte100k")
    add(
        "transfer_encoding_name_of_100_kb",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Content-Transfer-Encoding", b"x" * 100_000),
        note="the error quotes the name: it must be cut short before it reaches the log",
    )
    m = mid("charset100k")
    add(
        "charset_name_of_100_kb",
        None,
        malformed,
        mid=m,
        fields=_replace(
            _message(topic, m), "Content-Type", b"text/plain; charset=" + b"c" * 100_000
        ),
    )
    m = mid("uuencode")
    add(
        "unknown_transfer_encoding",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Content-Transfer-Encoding", b"x-uuencode"),
    )

    # -- charsets and UTF-8 -----------------------------------------------------------------
    def with_charset(message_id: str, charset: bytes) -> Fields:
        content_type = b"text/plain; charset=" + charset
        return _replace(_message(topic, message_id), "Content-Type", content_type)

    m = mid("charset_unknown")
    add("unknown_charset", None, malformed, mid=m, fields=with_charset(m, b"x-no-such-charset"))
    m = mid("charset_wrong")
    add(
        "latin1_bytes_labelled_utf8",
        None,
        malformed,
        mid=m,
        fields=with_charset(m, b"utf-8"),
        payload="caf\xe9 cr\xe8me".encode("latin-1"),
    )
    m = mid("utf7")
    add(
        "utf7_decoding_to_a_lone_surrogate",
        None,
        malformed,
        mid=m,
        fields=with_charset(m, b"utf-7"),
        payload=b"+2AA-",
        note="no str with a lone surrogate may reach user code (emailmw cannot send one)",
    )
    m = mid("utf8_subject")
    add(
        "invalid_utf8_in_subject",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Subject", topic.encode() + b"\xff\xfe"),
    )
    m = mid("utf8_body")
    add(
        "invalid_utf8_in_body",
        None,
        malformed,
        mid=m,
        fields=_message(topic, m),
        payload=b"\xc3\x28 \xa0\xa1 \xed\xa0\x80\r\n",
    )
    m = mid("ew_charset")
    add(
        "encoded_word_with_unknown_charset_in_subject",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Subject", b"=?x-no-such?q?abc?="),
    )
    m = mid("utf8_user_header")
    add(
        "invalid_utf8_in_a_user_header",
        None,
        None,
        mid=m,
        body="user headers are decoded leniently",
        fields=[*_message(topic, m), ("X-Junk", b"\xff\xfe\x80")],
        payload=b"user headers are decoded leniently",
    )

    # -- NUL bytes and bare CR / LF -----------------------------------------------------
    m = mid("nul_body")
    add(
        "nul_byte_in_body",
        None,
        malformed,
        mid=m,
        fields=_message(topic, m),
        payload=b"a\0b\r\n",
        note="Dovecot stores the NUL as 0x80: invalid UTF-8",
    )
    m = mid("nul_meta")
    add(
        "nul_byte_in_metadata",
        None,
        malformed,
        mid=m,
        fields=_replace(_message(topic, m), "Publisher-GID", b"7\x00"),
    )
    m = mid("nul_qp")
    add(
        "nul_written_as_quoted_printable",
        None,
        None,
        mid=m,
        body="a\0b",
        fields=_replace(_message(topic, m), "Content-Transfer-Encoding", b"quoted-printable"),
        payload=b"a=00b=\r\n",
    )
    m = mid("bare_lf")
    add(
        "bare_lf_line_endings",
        None,
        None,
        mid=m,
        body="line 1\nline 2",
        fields=_message(topic, m),
        payload=b"line 1\nline 2\n",
        eol=b"\n",
    )
    m = mid("bare_cr")
    add(
        "bare_cr_line_endings",
        None,
        None,
        mid=m,
        body="line 1\nline 2",
        fields=_message(topic, m),
        payload=b"line 1\rline 2\r",
        eol=b"\r",
        note="Dovecot turns bare CR into CRLF",
    )
    m = mid("no_blank")
    add(
        "no_blank_line_after_the_header",
        _raw(_message(topic, m), b"")[:-2],
        None,
        mid=m,
        body="",
    )

    # -- replies that match nothing, duplicates ---------------------------------------
    m = mid("reply_nothing")
    add(
        "reply_whose_in_reply_to_matches_nothing",
        None,
        DropReason.UNMATCHED,
        mid=m,
        fields=_request(topic, m, gid=b"1", seq=b"1", reply_to=f"<nothing.{tag}@nowhere.test>"),
    )
    if client_gid is not None:
        m = mid("reply_unasked")
        add(
            "reply_to_a_live_client_for_a_request_it_never_sent",
            None,
            DropReason.UNMATCHED,
            mid=m,
            fields=_request(
                "/some/service",
                m,
                gid=str(client_gid).encode(),
                seq=b"999999",
                reply_to=f"<nothing2.{tag}@nowhere.test>",
            ),
        )
    return items


def corpus(
    topic: str,
    *,
    client_gid: int | None = None,
    token: str | None = None,
    valid_from: str = GOOD,
) -> list[CorpusEmail]:
    """Valid and hostile emails interleaved (valid first and last), in mailbox order.

    After the hostile emails comes a copy of the first valid message's
    Message-ID with another body (dropped as ``duplicate``).
    """
    tag = token or secrets.token_hex(4)
    hostile = hostile_emails(topic, client_gid=client_gid, token=tag)
    items: list[CorpusEmail] = []

    def valid(index: int) -> CorpusEmail:
        message_id = f"<v.{index}.{tag}@example.test>"
        body = f"valid #{index}\nstill fine"
        raw = valid_message(topic, body, message_id, from_=valid_from)
        return CorpusEmail(f"valid_{index}", raw, None, message_id, body, valid=True)

    first = valid(0)
    items.append(first)
    for index, item in enumerate(hostile, start=1):
        items.append(item)
        items.append(valid(index))
    copy = valid_message(topic, "a second copy", first.message_id, from_=EVIL)
    items.append(CorpusEmail("reused_message_id", copy, DropReason.DUPLICATE, first.message_id))
    items.append(valid(len(hostile) + 1))
    return items


def expected_drops(items: Iterable[CorpusEmail]) -> Counter[DropReason]:
    """How many drops of each reason ``items`` must cause."""
    return Counter(item.expect for item in items if item.expect is not None)


def oversized_email(topic: str, size: int = 50 * 1024 * 1024, *, token: str = "") -> CorpusEmail:
    """A valid-looking emailmw message of at least ``size`` bytes (a base64 body).

    Bigger than the default ``max-message-size`` (25 MB): it must be skipped on
    its ``RFC822.SIZE`` alone and counted as ``too_large``.
    """
    tag = token or secrets.token_hex(4)
    message_id = f"<h.oversized.{tag}@evil.test>"
    fields = _replace(_message(topic, message_id), "Content-Transfer-Encoding", b"base64")
    line = base64.b64encode(b"\xff" * 57) + CRLF  # 78 bytes
    head = _raw(fields, b"")
    raw = head + line * max(1, -(-(size - len(head)) // len(line)))  # at least size
    return CorpusEmail("body_of_50_megabytes", raw, DropReason.TOO_LARGE, message_id)
