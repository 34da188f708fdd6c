"""A test-side model of what the reference implementation (rmw_email) accepts.

Written from the measured facts of issue 11 (none of the reference's code):

* an email is parsed only if each of ``From``, ``To``, ``Cc``, ``Bcc``,
  ``In-Reply-To``, ``Message-ID`` and ``Subject`` is there, spelled exactly so,
  on a single line (no folding); an empty value is fine (``Cc: ``);
* header values are taken raw: no RFC 2047 decoding, no unfolding;
* the body is taken raw, with no MIME decoding, final CRLF included;
* a message needs ``Source-Timestamp`` and ``Publisher-GID``; a service email
  ``Source-Timestamp``, ``Client-GID`` and ``Request-Sequence-Number``;
* a reference client takes an email as the response to its request
  ``(client GID, sequence number)`` when it has a non-empty ``In-Reply-To`` and
  those ``Client-GID`` and ``Request-Sequence-Number``; its sequence numbers
  start at 0 and its requests also carry ``Publisher-GID`` = client GID + 1.

:func:`parse` raises :class:`RejectedEmail` (with the reason) for an email the
reference would not parse.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUIRED_HEADERS = ("From", "To", "Cc", "Bcc", "In-Reply-To", "Message-ID", "Subject")


class RejectedEmail(ValueError):
    """The reference parser would not accept this email."""


@dataclass(frozen=True)
class RmwEmail:
    """An email as the reference sees it: raw header values, raw body."""

    headers: dict[str, str]  #: every unfolded one-line header, exact name, first one kept
    body: str

    @property
    def subject(self) -> str:
        return self.headers["Subject"]

    @property
    def in_reply_to(self) -> str:
        return self.headers["In-Reply-To"]

    @property
    def message_id(self) -> str:
        return self.headers["Message-ID"]

    def number(self, name: str) -> int:
        """The integer value of header ``name`` (exact spelling); RejectedEmail if absent."""
        value = self.headers.get(name)
        if value is None or not value.lstrip("-").isdigit():
            raise RejectedEmail(f"no valid {name} header: {value!r}")
        return int(value)


def parse(raw: bytes) -> RmwEmail:
    """``raw`` (as fetched or as sent) as the reference parser reads it."""
    text = raw.decode("utf-8")
    head, separator, body = text.partition("\r\n\r\n")
    if not separator:
        raise RejectedEmail("no blank line (CRLF CRLF) after the headers")
    lines = head.split("\r\n")
    headers: dict[str, str] = {}
    for index, line in enumerate(lines):
        if line[:1] in (" ", "\t") or ":" not in line:
            continue
        name, _, value = line.partition(":")
        folded = index + 1 < len(lines) and lines[index + 1][:1] in (" ", "\t")
        if name in REQUIRED_HEADERS:
            if name in headers:
                raise RejectedEmail(f"{name} appears more than once")
            if folded:
                raise RejectedEmail(f"{name} is folded over several lines")
        if folded:
            continue  # the reference does not unfold: not a value it can read
        headers.setdefault(name, value.removeprefix(" "))
    for name in REQUIRED_HEADERS:
        if name not in headers:
            spelled = [
                line.partition(":")[0]
                for line in lines
                if line.lower().startswith(name.lower() + ":")
            ]
            raise RejectedEmail(f"no {name} header (found spelled: {spelled})")
    return RmwEmail(headers, body)


def reference_body(message: str) -> str:
    """The body the reference gets for ``message`` (from any sender: SMTP writes line
    breaks as CRLF and ends the message with one)."""
    return message.replace("\n", "\r\n") + "\r\n"


def message_info(email: RmwEmail) -> tuple[int, int]:
    """``(Source-Timestamp, Publisher-GID)``: what a reference subscription needs."""
    return email.number("Source-Timestamp"), email.number("Publisher-GID")


def matches_response(email: RmwEmail, client_gid: int, sequence_number: int) -> bool:
    """Whether a reference client takes ``email`` as its response to request
    ``(client_gid, sequence_number)``."""
    return (
        email.in_reply_to != ""
        and email.number("Client-GID") == client_gid
        and email.number("Request-Sequence-Number") == sequence_number
    )


def reference_request(
    service: str, body: str, *, client_gid: int, sequence_number: int, timestamp: int, to: str
) -> bytes:
    """A service request shaped as a reference client writes it: the seven headers
    (no Message-ID value of its own: the mail server adds one), the metadata, the
    body raw."""
    return (
        f"From: {to}\r\nTo: {to}\r\nCc: \r\nBcc: \r\nIn-Reply-To: \r\nSubject: {service}\r\n"
        f"Source-Timestamp: {timestamp}\r\nClient-GID: {client_gid}\r\n"
        f"Request-Sequence-Number: {sequence_number}\r\nPublisher-GID: {client_gid + 1}\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def reference_response(
    service: str,
    body: str,
    *,
    in_reply_to: str,
    client_gid: int,
    sequence_number: int,
    timestamp: int,
    to: str,
) -> bytes:
    """A service response shaped as a reference server writes it (a reply)."""
    return (
        f"From: {to}\r\nTo: {to}\r\nCc: \r\nBcc: \r\nIn-Reply-To: {in_reply_to}\r\n"
        f"References: {in_reply_to}\r\nSubject: {service}\r\n"
        f"Source-Timestamp: {timestamp}\r\nClient-GID: {client_gid}\r\n"
        f"Request-Sequence-Number: {sequence_number}\r\n"
        f"\r\n{body}\r\n"
    ).encode()
