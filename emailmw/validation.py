"""Validation of user input that ends up in an email: names, headers and payloads.

Everything here raises before anything is sent.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from emailmw.errors import InvalidHeaderError, InvalidMessageError, InvalidNameError
from emailmw.info import OWN_HEADERS

__all__ = [
    "MAX_NAME_LENGTH",
    "RESERVED_HEADERS",
    "TRANSPORT_HEADERS",
    "is_transport_header",
    "rmw_email_name_problem",
    "unencodable_character",
    "validate_headers",
    "validate_name",
    "validate_payload",
    "validate_rmw_email_name",
]

#: Longest accepted topic or service name, in characters.
MAX_NAME_LENGTH = 255

#: Headers that the codec writes itself or that mail servers add on the way.
#: The codec refuses them in ``EmailData.headers`` and leaves them out of decoded
#: headers (as it does every ``Content-*``, ``Resent-*`` and ``ARC-*`` header).
TRANSPORT_HEADERS = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "received",
        "return-path",
        "delivered-to",
        "x-original-to",
        "dkim-signature",
        "domainkey-signature",
        "authentication-results",
        "received-spf",
    }
)
_TRANSPORT_PREFIXES = ("content-", "resent-", "arc-")


#: Header names user code may not set: emailmw's metadata and signature headers,
#: and every transport header (see :func:`is_transport_header`).
RESERVED_HEADERS = OWN_HEADERS | TRANSPORT_HEADERS


def is_transport_header(name: str) -> bool:
    """True for headers the codec or the mail servers own (see :data:`TRANSPORT_HEADERS`)."""
    lower = name.lower()
    return lower in TRANSPORT_HEADERS or lower.startswith(_TRANSPORT_PREFIXES)


# RFC 5322 field-name: printable US-ASCII except ":" (and we refuse space).
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")
_MAX_HEADER_VALUE = 8000
# Unicode categories refused in names: controls, line/paragraph separators, surrogates,
# unassigned code points.
_BAD_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs", "Cn"})


def unencodable_character(text: str) -> str | None:
    """Why ``text`` cannot go into an email, or ``None`` if it can.

    The wire format carries any ``str`` exactly, except one that UTF-8 cannot
    encode: one holding a lone surrogate (U+D800 to U+DFFF). The reason names
    the first such character and its index.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"U+{ord(text[exc.start]):04X} at index {exc.start} is a lone surrogate, "
            "which UTF-8 cannot encode"
        )
    return None


def validate_payload(text: str, what: str = "message") -> str:
    """Return ``text`` if it can be sent as the body of an email, else raise.

    ``what`` names the payload in the error (``"message"``, ``"request"``,
    ``"response"``). Raises :class:`~emailmw.InvalidMessageError` for a text
    that holds a lone surrogate (see :func:`unencodable_character`); any other
    ``str`` is carried exactly.
    """
    reason = unencodable_character(text)
    if reason is not None:
        raise InvalidMessageError(f"{what} cannot be sent: {reason}")
    return text


def validate_name(name: object, kind: str = "topic") -> str:
    """Return ``name`` if it is a valid topic or service name, else raise.

    A valid name is a non-empty ``str`` of at most :data:`MAX_NAME_LENGTH`
    characters with no control characters (CR, LF, NUL, DEL, ...), no line or
    paragraph separators and no surrogates or unassigned code points.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{kind} name must be a str, got {type(name).__name__}")
    if not name:
        raise InvalidNameError(f"{kind} name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"{kind} name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if not name.isascii() or not name.isprintable():
        for index, char in enumerate(name):
            if unicodedata.category(char) in _BAD_CATEGORIES:
                raise InvalidNameError(
                    f"{kind} name {name!r} contains a forbidden character "
                    f"U+{ord(char):04X} at index {index}"
                )
    return name


#: Longest header line SMTP and RFC 5322 allow, in octets (without its CRLF).
MAX_LINE_OCTETS = 998
_SUBJECT_PREFIX = "Subject: "


def rmw_email_name_problem(name: str, *, utf8: bool) -> str | None:
    """Why ``name`` (valid by :func:`validate_name`) cannot be the ``Subject`` of an
    email in the ``rmw-email`` wire format, or ``None`` if it can.

    The reference implementation (rmw_email) reads ``Subject`` raw: it neither
    decodes RFC 2047 encoded words nor unfolds lines. So the name goes out as it
    is, on one line of at most 998 octets; it must not start or end with a space
    (receivers strip them), nor hold ``=?`` (emailmw receivers would decode it as
    an encoded word). Non-ASCII characters need raw UTF-8 headers, that is a
    server that offers SMTPUTF8 (``utf8``).
    """
    for index, char in enumerate(name):
        if unicodedata.category(char) in _BAD_CATEGORIES:
            return f"U+{ord(char):04X} at index {index} is a forbidden character"
    if name != name.strip(" "):
        return "it starts or ends with a space, which receivers strip"
    if "=?" in name:
        return "it holds '=?', which emailmw receivers decode as an RFC 2047 encoded word"
    if not name.isascii():
        if not utf8:
            index = next(i for i, char in enumerate(name) if not char.isascii())
            return (
                f"U+{ord(name[index]):04X} at index {index} is not ASCII, and the SMTP server "
                "does not offer SMTPUTF8 (rmw_email reads the Subject raw, without RFC 2047 "
                "decoding)"
            )
        size = len(_SUBJECT_PREFIX) + len(name.encode("utf-8"))
    else:
        size = len(_SUBJECT_PREFIX) + len(name)
    if size > MAX_LINE_OCTETS:
        return (
            f"its Subject line would be {size} octets; one line holds at most "
            f"{MAX_LINE_OCTETS} (rmw_email does not unfold headers)"
        )
    return None


def validate_rmw_email_name(name: str, kind: str = "topic", *, utf8: bool) -> str:
    """Return ``name`` if it can be sent in the ``rmw-email`` wire format, else raise
    :class:`~emailmw.InvalidNameError` with the reason (see :func:`rmw_email_name_problem`)."""
    problem = rmw_email_name_problem(name, utf8=utf8)
    if problem is not None:
        raise InvalidNameError(
            f"{kind} name {name!r} cannot be sent in the rmw-email wire format: {problem}"
        )
    return name


def validate_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Check user-supplied additional headers; return them as a plain dict.

    Names must be RFC 5322 field names (printable ASCII, no colon or space) and
    not reserved (:data:`RESERVED_HEADERS`); values must be ``str`` without CR,
    LF, NUL or a lone surrogate and at most 8000 characters.
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidHeaderError(
            f"additional_headers must be a mapping, got {type(headers).__name__}"
        )
    result: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in headers.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise InvalidHeaderError(f"invalid header name {name!r}")
        lower = name.lower()
        if lower in RESERVED_HEADERS or is_transport_header(lower):
            raise InvalidHeaderError(f"header {name!r} is reserved and set by emailmw")
        if lower in seen:
            raise InvalidHeaderError(f"header {name!r} given twice (names are case-insensitive)")
        seen.add(lower)
        if not isinstance(value, str):
            raise InvalidHeaderError(
                f"value of header {name!r} must be a str, got {type(value).__name__}"
            )
        if any(c in value for c in "\r\n\0"):
            raise InvalidHeaderError(f"value of header {name!r} contains CR, LF or NUL")
        if (reason := unencodable_character(value)) is not None:
            raise InvalidHeaderError(f"value of header {name!r} cannot be sent: {reason}")
        if len(value) > _MAX_HEADER_VALUE:
            raise InvalidHeaderError(
                f"value of header {name!r} is {len(value)} characters; the limit is "
                f"{_MAX_HEADER_VALUE}"
            )
        result[name] = value
    return result
