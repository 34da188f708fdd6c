"""The wire codec: :class:`EmailData` to RFC 5322/MIME bytes and back.

Only the standard library is used. :func:`encode_email` writes one
``text/plain; charset=utf-8`` message; :func:`decode_email` reads what it wrote
(and what other mail clients write) back, exactly.

Subject and header values
    ``Subject`` carries the topic or service name, exactly. A value made of
    printable ASCII words separated by single spaces, without ``=?``, goes out
    as it is, folded before spaces into lines of at most 78 characters
    (unfolding removes only the CRLF, so this is exact). Anything else
    (non-ASCII, leading, trailing or repeated spaces, ``=?``, a word too long
    for one line) goes out as RFC 2047 encoded words (``=?utf-8?b?...?=``),
    each holding whole characters, one per folded line; decoding drops the
    folding whitespace between encoded words and gives back the same string.
    Additional headers (metadata and user headers) use the same rule, so their
    values round-trip exactly too; their values must not contain CR, LF or NUL
    (:class:`ValueError`).

Body: the transfer-encoding rule
    Mail servers rewrite line endings (SMTP sends CRLF; Postfix and Dovecot
    may store LF or CRLF), strip trailing white space, wrap or refuse lines over
    998 octets, dot-stuff and may quote ``From`` at the start of a line. The body
    is therefore always sent as 7-bit ASCII with short lines:

    1. The body is encoded as UTF-8. A ``str`` that cannot be (it holds a lone
       surrogate) is refused with :class:`~emailmw.InvalidMessageError` (also a
       :class:`ValueError`) at encode time; the entities refuse it before that.
    2. If the body holds no CR at all, it is sent as **quoted-printable** (so
       that it stays readable in a mail client), unless that would be bigger
       than base64 (mostly non-ASCII text). Each LF is a hard line break (CRLF
       on the wire); everything a server could touch is escaped (``=XX``:
       trailing white space, controls, NUL, non-ASCII, a line's leading
       ``From``); lines longer than 76 characters get soft breaks. The payload
       always ends with a soft line break (``=`` CRLF), which marks where the
       body ends. The decoder turns every CRLF into LF before decoding, so each
       line break comes back as ``"\\n"``, whatever the server stored.
    3. Otherwise (the body holds a CR: CRLF or a lone CR), it is sent as
       **base64**, which no line-ending rewrite can change.

    Decoding also accepts what other clients send: 7bit/8bit/binary text (line
    endings become LF, one final line break is dropped), quoted-printable and
    base64 in any charset Python knows, and ``multipart/*`` messages (the first
    ``text/plain`` part that is not an attachment).

The ``rmw-email`` wire format
    ``encode_email(..., wire_format="rmw-email")`` writes what the reference
    implementation (rmw_email) parses: ``From``, ``To``, ``Cc``, ``Bcc``,
    ``In-Reply-To``, ``Message-ID`` and ``Subject`` always, spelled so, each on
    one line (empty where there is no value; ``Bcc`` is always empty, Bcc
    recipients travel in the SMTP envelope only); the subject raw (non-ASCII only
    with ``utf8_headers``, else :class:`~emailmw.InvalidNameError`); the body
    without transfer encoding (``7bit``, or ``8bit`` with ``eight_bit``), each
    LF sent as CRLF and one CRLF added at the end, as SMTP ends every message.
    A body that cannot travel so raises :class:`~emailmw.InvalidMessageError`
    naming the reason (a CR, a NUL, a line over 998 octets, non-ASCII text
    without ``eight_bit``). Other header values go on one line too. The
    decoder reads these emails like any other 7bit/8bit text: exactly.

Decoding contract
    :func:`decode_email` never raises anything but :class:`MalformedEmailError`:
    an email without any emailmw metadata header is not ours and gives ``None``
    (quietly, without decoding its body); one with metadata headers that cannot
    be decoded (a repeated metadata or ``Subject`` header, an invalid metadata
    value, an undecodable body, ...) raises :class:`MalformedEmailError`.
"""

from __future__ import annotations

import binascii
import copy
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import format_datetime, formataddr, parseaddr
from typing import Literal

from emailmw.errors import InvalidMessageError
from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_PREVIOUS_NUMBER,
    HEADER_PREVIOUS_TIMESTAMP,
    HEADER_PUBLICATION_NUMBER,
    HEADER_PUBLISHER_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SOURCE_TIMESTAMP,
    METADATA_HEADERS,
    Gid,
    Timestamp,
    parse_sequence_number,
)
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.validation import (
    MAX_LINE_OCTETS,
    TRANSPORT_HEADERS,
    is_transport_header,
    unencodable_character,
    validate_rmw_email_name,
)

__all__ = [
    "MAX_ERROR_LENGTH",
    "TRANSPORT_HEADERS",
    "WIRE_FORMATS",
    "MalformedEmailError",
    "WireFormat",
    "decode_email",
    "decode_value",
    "encode_email",
    "is_emailmw",
    "is_transport_header",
    "new_message_id",
    "parse_address",
    "parse_fields",
    "rmw_email_body_problem",
]

#: The wire formats :func:`encode_email` writes: emailmw's own, and the one the
#: reference implementation (rmw_email) can parse.
WireFormat = Literal["emailmw", "rmw-email"]
WIRE_FORMATS: tuple[WireFormat, ...] = ("emailmw", "rmw-email")


class MalformedEmailError(ValueError):
    """An email that carries emailmw metadata headers but cannot be decoded.

    The message says what is wrong, in at most :data:`MAX_ERROR_LENGTH`
    characters: it quotes what the sender wrote (a charset or transfer-encoding
    name, ...), and a hostile sender must not be able to flood the log with it.
    """

    def __init__(self, message: str) -> None:
        if len(message) > MAX_ERROR_LENGTH:
            cut = len(message) - MAX_ERROR_LENGTH
            message = f"{message[:MAX_ERROR_LENGTH]}... ({cut} more characters)"
        super().__init__(message)


#: Longest message of a :class:`MalformedEmailError`, in characters (before the
#: "... (N more characters)" that says it was cut).
MAX_ERROR_LENGTH = 300


# RFC 5322 field name: printable ASCII except ":".
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_FIELD_NAME_BYTES = re.compile(rb"([!-9;-~]+)[ \t]*:")
# A value that may go out as it is: printable ASCII words separated by single spaces.
_PLAIN_VALUE = re.compile(r"[!-~]+(?: [!-~]+)*")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_MSG_ID = re.compile(r"<[!-;=?-~]+>")  # printable ASCII, no "<" or ">"
_DOMAIN = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.:\[\]-]+")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
# An address-list token: a quoted string, a quoted pair, a special, or a run of the rest.
_ADDRESS_TOKEN = re.compile(r'"(?:[^"\\]|\\[\s\S])*"?|\\[\s\S]?|[(),:;<>]|[^"\\(),:;<>]+')
# White space in an addr-spec: none around "@" and ".", one space elsewhere.
_ADDRESS_SPACE = re.compile(r"\s*([@.])\s*|\s+")
_ADDRESS_SPACE_OR_QUOTE = re.compile(r'[\s"]')
# What is left for the tokenizer once quoted strings and simple comments are blanked
# out: quoted pairs and nested comments.
_ADDRESS_SPECIALS = re.compile(r"[()\\]")
# A quoted string (group 1), or a comment without quotes, backslashes or nesting.
_QUOTED_OR_COMMENT = re.compile(r'("(?:[^"\\]|\\[\s\S])*")|\([^()"\\]*\)')
# White space inside an element of a comma-separated list.
_INNER_SPACE = re.compile(r"[^\s,]\s+[^\s,]")
_SPACE = re.compile(r"\s")
_BAD_ADDRESS_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_LIMIT = 78  # RFC 5322 "SHOULD" line length
_WORD_LINE_LIMIT = 76  # RFC 2047 limit for lines holding encoded words
_WORD_MAX_BYTES = 39  # 52 base64 characters: a 64-character encoded word
_EW_OVERHEAD = len("=?utf-8?b??=")
_BASE64_LINE = 76

# Decoded headers that must appear at most once in an emailmw email.
_SINGLE_HEADERS = frozenset({"subject", "message-id", "from"})
# Other transport headers the decoder looks at (the first one counts).
_KEPT_HEADERS = frozenset({"in-reply-to", "content-type", "content-transfer-encoding"})

_METADATA_VALIDATORS = {
    HEADER_SOURCE_TIMESTAMP.lower(): Timestamp.from_string,
    HEADER_PUBLISHER_GID.lower(): Gid.from_string,
    HEADER_CLIENT_GID.lower(): Gid.from_string,
    HEADER_SEQUENCE_NUMBER.lower(): parse_sequence_number,
    HEADER_PUBLICATION_NUMBER.lower(): parse_sequence_number,
    HEADER_PREVIOUS_TIMESTAMP.lower(): Timestamp.from_string,
    HEADER_PREVIOUS_NUMBER.lower(): parse_sequence_number,
}


# ----------------------------------------------------------------------------- helpers


def new_message_id(domain: str) -> str:
    """A new, globally unique ``Message-ID`` (``<random@domain>``, with brackets).

    A random UUID makes it unique across processes and machines. An empty
    ``domain`` gives ``localhost``; one with characters a message id cannot hold
    raises :class:`ValueError`.
    """
    domain = domain.strip() or "localhost"
    if not _DOMAIN.fullmatch(domain):
        raise ValueError(f"cannot build a Message-ID for domain {domain!r}")
    return f"<{uuid.uuid4().hex}@{domain}>"


def parse_address(value: str) -> str:
    """The bare ``addr-spec`` of a ``From``-like header value (``"A <a@x>"`` gives ``a@x``).

    Falls back to the stripped value when it does not parse as an address.
    """
    _, address = parseaddr(value)
    return address or value.strip()


def is_emailmw(names: Iterable[str]) -> bool:
    """True if any of the header ``names`` is an emailmw metadata header."""
    return any(name.lower() in METADATA_HEADERS for name in names)


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; :class:`InvalidMessageError` if it holds a lone surrogate."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessageError(f"{what} cannot be sent: {unencodable_character(text)}") from None


# ----------------------------------------------------------------------------- encoding


def _encoded_words(value: str, first_limit: int) -> list[str]:
    """Split ``value`` into UTF-8 base64 encoded words of whole characters.

    The first word holds at most ``first_limit`` bytes (0: it starts on the
    next line), the others at most :data:`_WORD_MAX_BYTES`.
    """
    chunks: list[bytes] = []
    limit = first_limit if first_limit > 0 else _WORD_MAX_BYTES
    current = bytearray()
    for char in value:
        data = _utf8(char, "header value")
        if current and len(current) + len(data) > limit:
            chunks.append(bytes(current))
            current.clear()
            limit = _WORD_MAX_BYTES
        current += data
    chunks.append(bytes(current))
    return [f"=?utf-8?b?{binascii.b2a_base64(c, newline=False).decode('ascii')}?=" for c in chunks]


def _unstructured_field(name: str, value: str) -> str:
    """One header field (with its CRLF) whose value decodes back to exactly ``value``."""
    prefix = f"{name}: "
    if not value:
        return f"{prefix}\r\n"
    if _PLAIN_VALUE.fullmatch(value) and "=?" not in value:
        # Fold before single spaces: unfolding only removes the CRLF, so this is exact.
        lines: list[str] = []
        line = prefix
        for word in value.split(" "):
            if line == prefix:
                line += word
            elif len(line) + 1 + len(word) <= _LINE_LIMIT:
                line += " " + word
            else:
                lines.append(line)
                line = " " + word
        lines.append(line)
        if all(len(line) <= _LINE_LIMIT for line in lines):
            return "\r\n".join(lines) + "\r\n"
    _utf8(value, f"value of header {name}")  # names the first character it cannot encode
    room = _WORD_LINE_LIMIT - len(prefix) - _EW_OVERHEAD
    first_limit = (room // 4) * 3 if room >= 8 else 0  # 8 base64 characters: any one character
    words = _encoded_words(value, first_limit)
    if first_limit > 0:
        return f"{prefix}{words[0]}\r\n" + "".join(f" {w}\r\n" for w in words[1:])
    return f"{name}:\r\n" + "".join(f" {w}\r\n" for w in words)


def _address_field(name: str, addresses: list[str]) -> str:
    """An address header; a non-ASCII display name goes out as an encoded word."""
    encoded = _encoded_addresses(name, addresses)
    line = f"{name}: " + ", ".join(encoded)
    if len(line) <= _LINE_LIMIT:
        return line + "\r\n"
    return f"{name}: " + ",\r\n ".join(encoded) + "\r\n"


def _encoded_addresses(name: str, addresses: list[str]) -> list[str]:
    """Each address of header ``name`` as it goes out (ASCII; encoded-word display names)."""
    encoded: list[str] = []
    for address in addresses:
        if _BAD_ADDRESS_CHARS.search(address) or not address.strip():
            raise ValueError(f"{name} address {address!r} is empty or holds control characters")
        if not address.isascii():
            _utf8(address, f"{name} address")
            display, addr_spec = parseaddr(address)
            if not addr_spec or not addr_spec.isascii():
                raise ValueError(f"{name} address {address!r} is not ASCII")
            encoded.append(formataddr((display, addr_spec), charset="utf-8"))
        else:
            encoded.append(address)
    return encoded


def _check_msg_id(value: str, what: str) -> str:
    if not _MSG_ID.fullmatch(value):
        raise ValueError(f"{what} must look like <id@domain>, got {value!r}")
    return value


def _encode_body(body: str) -> tuple[str, bytes]:
    """``(Content-Transfer-Encoding, payload with CRLF line ends)`` for ``body``."""
    data = _utf8(body, "message body")
    base64_size = (len(data) + 2) // 3 * 4 * (_BASE64_LINE + 2) // _BASE64_LINE
    # Every byte of a multi-byte character costs 3 in quoted-printable: skip the
    # attempt when that alone makes it bigger than base64.
    if "\r" not in body and len(data) + 2 * (len(data) - len(body)) <= base64_size:
        qp = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
        if len(qp) <= base64_size:
            if qp.startswith(b"From "):
                qp = b"=46" + qp[1:]
            if b"\nFrom " in qp:
                qp = qp.replace(b"\nFrom ", b"\n=46rom ")
            # b2a_qp keeps LF line breaks (the body has no CR); the wire wants CRLF.
            return "quoted-printable", qp.replace(b"\n", b"\r\n") + b"=\r\n"
    encoded = binascii.b2a_base64(data, newline=False)
    if not encoded:
        return "base64", b""
    lines = [encoded[i : i + _BASE64_LINE] for i in range(0, len(encoded), _BASE64_LINE)]
    return "base64", b"\r\n".join(lines) + b"\r\n"


def encode_email(
    email: EmailData,
    *,
    wire_format: WireFormat = "emailmw",
    eight_bit: bool = True,
    utf8_headers: bool = True,
) -> bytes:
    """The RFC 5322/MIME bytes (CRLF line endings, 7-bit ASCII) of ``email``.

    With ``wire_format="rmw-email"``, the bytes the reference implementation
    parses (see the module docstring); ``eight_bit`` (the server offers
    8BITMIME) allows a non-ASCII body, ``utf8_headers`` (it offers SMTPUTF8) a
    non-ASCII subject. Both are ignored in the default ``emailmw`` format,
    which is always 7-bit.

    Uses ``from_``, ``recipients.to``/``cc`` (never ``bcc``: Bcc travels in the
    SMTP envelope only), ``message_id`` (required, with angle brackets),
    ``in_reply_to`` (sets ``In-Reply-To`` and ``References``), the content and
    ``headers``; adds ``Date``, ``MIME-Version`` and the ``Content-*`` headers.

    Raises :class:`~emailmw.InvalidMessageError` (a :class:`ValueError`) for a
    lone surrogate in the subject, the body, a header value or an address, and
    :class:`ValueError` for what else cannot go into an email: CR, LF or NUL in
    a header value; an invalid or reserved header name
    (:data:`TRANSPORT_HEADERS`); a missing or malformed From address or
    Message-ID.
    """
    if wire_format == "rmw-email":
        return _encode_rmw_email(email, eight_bit=eight_bit, utf8_headers=utf8_headers)
    if wire_format != "emailmw":
        raise ValueError(f"unknown wire format {wire_format!r} (want one of {WIRE_FORMATS})")
    if not email.from_:
        raise ValueError("the email has no From address")
    fields = [_address_field("From", [email.from_])]
    if email.recipients.to:
        fields.append(_address_field("To", email.recipients.to))
    if email.recipients.cc:
        fields.append(_address_field("Cc", email.recipients.cc))
    fields.append(_unstructured_field("Subject", email.content.subject))
    fields.append(f"Message-ID: {_check_msg_id(email.message_id, 'message_id')}\r\n")
    if email.in_reply_to:
        in_reply_to = _check_msg_id(email.in_reply_to, "in_reply_to")
        fields.append(f"In-Reply-To: {in_reply_to}\r\nReferences: {in_reply_to}\r\n")
    fields.append(f"Date: {format_datetime(datetime.now(UTC))}\r\n")
    encoding, payload = _encode_body(email.content.body)
    fields.append(
        "MIME-Version: 1.0\r\n"
        f'Content-Type: {_media_type(email.content.media_type)}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n"
    )
    fields += _user_fields(email.headers, _unstructured_field)
    return "".join(fields).encode("ascii") + b"\r\n" + payload


def rmw_email_body_problem(body: str, *, eight_bit: bool) -> str | None:
    """Why ``body`` cannot be sent raw (no transfer encoding) so that it arrives
    exactly, or ``None`` if it can.

    SMTP turns every line break into CRLF and allows neither NUL nor lines over
    998 octets; 8-bit text needs a server that offers 8BITMIME (``eight_bit``).
    """
    reason = unencodable_character(body)
    if reason is not None:
        return reason
    index = body.find("\r")
    if index >= 0:
        return (
            f"it holds a CR (U+000D) at index {index}: SMTP makes every line break CRLF, "
            "so a CR cannot arrive as it was sent"
        )
    index = body.find("\0")
    if index >= 0:
        return f"it holds a NUL (U+0000) at index {index}, which SMTP does not carry"
    if not eight_bit and not body.isascii():
        index = next(i for i, char in enumerate(body) if not char.isascii())
        return (
            f"U+{ord(body[index]):04X} at index {index} is not ASCII, and the SMTP server "
            "does not offer 8BITMIME"
        )
    if 4 * len(body) > MAX_LINE_OCTETS:  # a line can be that long only then (UTF-8)
        for number, line in enumerate(body.split("\n"), start=1):
            size = len(line.encode("utf-8"))
            if size > MAX_LINE_OCTETS:
                return f"line {number} is {size} octets long; SMTP allows {MAX_LINE_OCTETS}"
    return None


def _user_fields(headers: EmailHeaders, field: Callable[[str, str], str]) -> list[str]:
    """The user's header fields written by ``field``, each name and value checked first
    (:class:`ValueError` naming the header)."""
    fields: list[str] = []
    for name, value in headers.items():
        if not _FIELD_NAME.fullmatch(name) or len(name) > 900:
            raise ValueError(f"invalid header name {name!r}")
        if is_transport_header(name):
            raise ValueError(f"header {name!r} is set by the transport and cannot be given")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"value of header {name!r} contains CR, LF or NUL")
        fields.append(field(name, value))
    return fields


def _one_line_field(name: str, value: str) -> str:
    """A header field on one line (rmw-email): the value as it is when it is plain
    printable ASCII, else as encoded words on that one line."""
    if value and not (_PLAIN_VALUE.fullmatch(value) and "=?" not in value):
        _utf8(value, f"value of header {name}")
        value = " ".join(_encoded_words(value, _WORD_MAX_BYTES))
    return _checked_line(f"{name}: {value}")


def _checked_line(line: str) -> str:
    size = len(line.encode("utf-8"))
    if size > MAX_LINE_OCTETS:
        name = line.partition(":")[0]
        raise ValueError(
            f"header {name} would be a line of {size} octets; the rmw-email wire format "
            f"writes each header on one line of at most {MAX_LINE_OCTETS}"
        )
    return line + "\r\n"


def _encode_rmw_email(email: EmailData, *, eight_bit: bool, utf8_headers: bool) -> bytes:
    """``email`` in the rmw-email wire format (see the module docstring)."""
    if not email.from_:
        raise ValueError("the email has no From address")
    subject = validate_rmw_email_name(email.content.subject, "subject", utf8=utf8_headers)
    body = email.content.body
    problem = rmw_email_body_problem(body, eight_bit=eight_bit)
    if problem is not None:
        raise InvalidMessageError(
            f"message body cannot be sent in the rmw-email wire format (no transfer "
            f"encoding): {problem}"
        )
    in_reply_to = "" if not email.in_reply_to else _check_msg_id(email.in_reply_to, "in_reply_to")
    fields = [
        _checked_line("From: " + ", ".join(_encoded_addresses("From", [email.from_]))),
        _checked_line("To: " + ", ".join(_encoded_addresses("To", email.recipients.to))),
        _checked_line("Cc: " + ", ".join(_encoded_addresses("Cc", email.recipients.cc))),
        "Bcc: \r\n",  # Bcc recipients travel in the SMTP envelope only
        _checked_line(f"Subject: {subject}"),
        f"Message-ID: {_check_msg_id(email.message_id, 'message_id')}\r\n",
        f"In-Reply-To: {in_reply_to}\r\n",
    ]
    if in_reply_to:
        fields.append(f"References: {in_reply_to}\r\n")
    fields.append(
        f"Date: {format_datetime(datetime.now(UTC))}\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: {_media_type(email.content.media_type)}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}\r\n"
    )
    fields += _user_fields(email.headers, _one_line_field)
    payload = body.replace("\n", "\r\n") + "\r\n"
    return ("".join(fields) + "\r\n" + payload).encode("utf-8")


# ----------------------------------------------------------------------------- decoding


def _split_message(raw: bytes) -> tuple[bytes, bytes]:
    """``(header block, body)``; the blank line between them belongs to neither."""
    if raw.startswith(b"\n"):
        return b"", raw[1:]
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    match = _HEADER_END.search(raw)
    if match is None:
        return raw, b""
    return raw[: match.start()], raw[match.end() :]


def parse_fields(block: bytes) -> list[tuple[str, bytes]]:
    """Header fields as ``(name, unfolded raw value)``, in order; junk lines are skipped."""
    fields: list[tuple[str, list[bytes]]] = []
    for raw_line in block.split(b"\n"):
        line = raw_line[:-1] if raw_line.endswith(b"\r") else raw_line
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)  # unfolding removes the line break, keeps the WSP
            continue
        match = _FIELD_NAME_BYTES.match(line)
        if match is None:
            continue  # an mbox "From " line or junk: skip it
        fields.append((match.group(1).decode("ascii"), [line[match.end() :]]))
    return [(name, b"".join(parts)) for name, parts in fields]


def _charset_decode(data: bytes, charset: str | None) -> str:
    name = (charset or "utf-8").strip().lower()
    if name in ("us-ascii", "ascii", "utf8"):
        name = "utf-8"  # tolerate 8-bit UTF-8 labelled as ASCII
    text = data.decode(name)
    match = _SURROGATE.search(text)
    if match is not None:  # utf-7, unicode-escape, ... can make them; no str we send can
        raise ValueError(f"{name} text decodes to a lone surrogate at index {match.start()}")
    return text


def _decode_words(raw: str) -> str:
    """Decode RFC 2047 encoded words; whitespace between two encoded words is dropped."""
    pieces: list[tuple[str | None, bytes | str]] = []
    position = 0
    for match in _ENCODED_WORD.finditer(raw):
        between = raw[position : match.start()]
        if between and not (pieces and pieces[-1][0] is not None and between.isspace()):
            pieces.append((None, between))
        charset = match.group(1).split("*", 1)[0].lower()
        text = match.group(3)
        if match.group(2) in "bB":
            data = binascii.a2b_base64(text + "=" * (-len(text) % 4))
        else:
            data = binascii.a2b_qp(text.encode("ascii"), header=True)
        last = pieces[-1] if pieces else None
        if last is not None and last[0] == charset and isinstance(last[1], bytes):
            pieces[-1] = (charset, last[1] + data)  # a character split across two words
        else:
            pieces.append((charset, data))
        position = match.end()
    if raw[position:]:
        pieces.append((None, raw[position:]))
    return "".join(
        _charset_decode(part, charset) if isinstance(part, bytes) else part
        for charset, part in pieces
    )


def decode_value(raw: bytes, *, strict: bool, words: bool = True) -> str:
    """A header value as text: UTF-8 (RFC 6532) and, with ``words``, RFC 2047 encoded words.

    With ``strict``, anything undecodable raises; otherwise it is replaced or kept raw.
    """
    text = raw.decode("utf-8", "strict" if strict else "replace").strip(" \t\r\n")
    if not words or "=?" not in text:
        return text
    try:
        return _decode_words(text)
    except (ValueError, LookupError):
        if strict:
            raise
        return text


def _first_msg_id(value: str) -> str:
    match = _MSG_ID.search(value)
    if match is not None:
        return match.group(0)
    value = value.strip()
    return f"<{value}>" if value and not any(c.isspace() or c in "<>" for c in value) else ""


def _addresses(values: Iterable[str]) -> list[str]:
    """The ``addr-spec`` of every address in address-list header ``values``, in order.

    What :func:`email.utils.getaddresses` gives for well-formed lists (plain
    addresses, display names, quoted strings, comments, groups), in time linear
    in the size of the values however many fields or addresses there are.
    Malformed input gives a best effort, never an error.
    """
    found: list[str] = []
    for value in values:
        simple = _simple_address_list(value)
        if simple is None:
            _parse_address_list(value, found)
        else:
            found += simple
    return found


def _simple_address_list(value: str) -> list[str] | None:
    """The addresses of a list of ``a@b`` and ``name <a@b>`` (the usual case), fast.

    Quoted display names, comments that hold no quote, backslash or nested
    comment, and groups are read here too. ``None`` if ``value`` is anything
    else (:func:`_parse_address_list` reads those); otherwise the same list as
    that function gives.
    """
    if '"' in value or "(" in value:
        # quoted strings (display names: dropped anyway) and comments may hold commas
        value = _QUOTED_OR_COMMENT.sub(_blank_quoted_or_comment, value)
        if '"' in value.replace('""', ""):  # an unterminated quoted string
            return None
    if _ADDRESS_SPECIALS.search(value):  # nested comments, quoted pairs
        return None
    groups = ":" in value or ";" in value
    if groups:
        value = value.replace(";", ",")  # ";" ends a group, and the address before it
    elif "<" not in value and ">" not in value:
        if '"' in value or _INNER_SPACE.search(value):
            return None
        return [address for address in (part.strip() for part in value.split(",")) if address]
    found: list[str] = []
    for part in value.split(","):
        element = part
        if groups and ":" in part:  # "group name: first member"
            head, _, element = part.rpartition(":")
            if "<" in head or ">" in head:  # a route (<@a,@b:c@d>): the tokenizer's
                return None
        if "<" in element:
            name, _, rest = element.partition("<")
            address, closed, tail = rest.partition(">")
            address = address.strip()
            if not closed or tail.strip() or ">" in name or "<" in address or '"' in address:
                return None
        else:
            address = element.strip()
            if ">" in address or '"' in address:  # a quoted local part: the tokenizer's
                return None
        if _SPACE.search(address):
            return None
        if address:
            found.append(address)
    return found


def _blank_quoted_or_comment(match: re.Match[str]) -> str:
    return '""' if match.group(1) else ""


def _parse_address_list(value: str, found: list[str]) -> None:
    """Append the addresses of one address-list ``value`` to ``found`` (any syntax)."""
    depth = 0  # comment nesting
    in_angle = False
    angle: list[str] | None = None  # the tokens of the last <...>
    plain: list[str] = []  # the tokens outside comments and angle brackets
    for token in _ADDRESS_TOKEN.findall(value):
        if depth:
            if token == "(":
                depth += 1
            elif token == ")":
                depth -= 1
        elif token == "(":
            depth = 1
        elif in_angle:
            if token == ">":
                in_angle = False
            elif angle is not None:
                angle.append(token)
        elif token == "<":
            in_angle, angle = True, []
        elif token in (",", ";"):  # end of an address (";" also ends a group)
            _add_address(found, angle, plain)
            angle, plain = None, []
        elif token == ":":  # "group name:" starts a group; the name is no address
            plain = []
        elif token not in (")", ">"):
            plain.append(token)
    _add_address(found, angle, plain)


def _add_address(found: list[str], angle: list[str] | None, plain: list[str]) -> None:
    tokens = plain if angle is None else angle
    if len(tokens) == 1 and not _ADDRESS_SPACE_OR_QUOTE.search(text := tokens[0].strip()):
        pass  # the usual case, made fast: one token, nothing to normalize
    else:
        text = "".join(
            token if token.startswith('"') else _ADDRESS_SPACE.sub(_address_space, token)
            for token in tokens
        ).strip()
    if angle is not None:
        text = text.rpartition(":")[2]  # drop an obsolete route (<@a,@b:x@y>)
    if text:
        found.append(text)


def _address_space(match: re.Match[str]) -> str:
    return match.group(1) or " "


def _content_type(value: str | None) -> Message:
    holder = Message(policy=compat32)
    if value is not None:
        holder["Content-Type"] = value
    return holder


def _decode_payload(payload: bytes, encoding: str, charset: str | None) -> str:
    """The text of one MIME leaf from its raw payload (see the module docstring)."""
    if encoding == "base64":
        return _charset_decode(binascii.a2b_base64(payload), charset)
    payload = payload.replace(b"\r\n", b"\n")
    soft_break = encoding == "quoted-printable" and payload.endswith(b"=\n")
    if payload.endswith(b"\n") and not soft_break:
        payload = payload[:-1]  # the line break that ends the last line is not content
    if encoding == "quoted-printable":
        return _charset_decode(binascii.a2b_qp(payload), charset)
    if encoding in ("", "7bit", "8bit", "binary"):
        return _charset_decode(payload, charset)
    raise MalformedEmailError(f"unsupported Content-Transfer-Encoding {encoding!r}")


def _raw_payload(part: Message) -> bytes:
    """A MIME leaf's payload: the bytes the email held, before any transfer decoding.

    ``get_payload(decode=False)`` would decode 8-bit text with the part's
    charset (replacing what does not decode); ``get_payload(decode=True)``
    returns the bytes unchanged when there is no transfer encoding to undo, so
    it is asked on a copy without the Content-Transfer-Encoding header.
    """
    bare = copy.copy(part)
    del bare["Content-Transfer-Encoding"]
    payload = bare.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _decode_body(raw: bytes, body: bytes, fields: dict[str, str]) -> str:
    holder = _content_type(fields.get("content-type"))
    content_type = holder.get_content_type()
    encoding = fields.get("content-transfer-encoding", "").strip().lower()
    if content_type.startswith("multipart/"):
        message = BytesParser(policy=compat32).parsebytes(raw)
        for part in message.walk():
            if (
                not part.is_multipart()
                and part.get_content_type() == "text/plain"
                and part.get_content_disposition() != "attachment"
            ):
                return _decode_payload(
                    _raw_payload(part),
                    str(part.get("Content-Transfer-Encoding", "")).strip().lower(),
                    part.get_content_charset(),
                )
        raise MalformedEmailError(f"{content_type} message without a text/plain part")
    if not content_type.startswith("text/") and content_type not in TEXT_MEDIA_TYPES:
        raise MalformedEmailError(f"unsupported Content-Type {content_type!r}")
    return _decode_payload(body, encoding, holder.get_content_charset())


#: Media types besides ``text/*`` whose body is text (typed messages: JSON).
TEXT_MEDIA_TYPES = frozenset({"application/json"})


def _media_type(value: str) -> str:
    """``value`` if it is a media type the body may be sent as, else a ValueError."""
    if value == "text/plain" or value in TEXT_MEDIA_TYPES:
        return value
    raise ValueError(f"unsupported media type {value!r} for an emailmw body")


def decode_email(raw: bytes) -> EmailData | None:
    """Decode one stored email (as fetched with IMAP ``BODY[]``).

    Returns ``None`` for an email with no emailmw metadata header (not ours;
    its body is not even looked at). Raises :class:`MalformedEmailError` for
    one that has metadata headers but cannot be decoded. Never raises anything
    else, whatever the bytes.
    """
    try:
        header_block, body = _split_message(bytes(raw))
        fields = parse_fields(header_block)
        if not is_emailmw(name for name, _ in fields):
            return None
    except Exception:  # not ours, whatever went wrong
        return None
    try:
        return _decode_emailmw(bytes(raw), body, fields)
    except MalformedEmailError:
        raise
    except Exception as exc:  # any failure on an emailmw email makes it "malformed"
        raise MalformedEmailError(f"cannot decode emailmw email: {exc}") from exc


def _decode_emailmw(raw: bytes, body: bytes, fields: list[tuple[str, bytes]]) -> EmailData:
    standard: dict[str, str] = {}
    address_fields: dict[str, list[str]] = {"to": [], "cc": []}
    headers = EmailHeaders()
    for name, value in fields:
        lower = name.lower()
        if lower in METADATA_HEADERS:
            if name in headers:
                raise MalformedEmailError(f"metadata header {name} appears more than once")
            text = decode_value(value, strict=True)
            if _METADATA_VALIDATORS[lower](text) is None:
                raise MalformedEmailError(f"invalid {name} value {text[:40]!r}")
            headers[name] = text
        elif lower in _SINGLE_HEADERS:
            if lower in standard:
                raise MalformedEmailError(f"header {name} appears more than once")
            try:
                standard[lower] = decode_value(value, strict=True, words=lower == "subject")
            except (ValueError, LookupError) as exc:
                raise MalformedEmailError(f"cannot decode the {name} header: {exc}") from None
        elif lower in address_fields:  # every To and Cc field counts, parsed once at the end
            address_fields[lower].append(decode_value(value, strict=False, words=False))
        elif is_transport_header(name):
            if lower in _KEPT_HEADERS and lower not in standard:
                standard[lower] = decode_value(value, strict=False, words=False)
        elif name not in headers:
            headers[name] = decode_value(value, strict=False)
    if "subject" not in standard:
        raise MalformedEmailError("emailmw email without a Subject header")
    try:
        text = _decode_body(raw, body, standard)
    except (ValueError, LookupError) as exc:
        if isinstance(exc, MalformedEmailError):
            raise
        raise MalformedEmailError(f"cannot decode the body: {exc}") from None
    in_reply_to = _first_msg_id(standard.get("in-reply-to", "")) or None
    return EmailData(
        content=EmailContent(subject=standard["subject"], body=text),
        headers=headers,
        message_id=_first_msg_id(standard.get("message-id", "")),
        in_reply_to=in_reply_to,
        from_=parse_address(standard.get("from", "")),
        recipients=EmailRecipients(
            to=_addresses(address_fields["to"]),
            cc=_addresses(address_fields["cc"]),
        ),
    )
