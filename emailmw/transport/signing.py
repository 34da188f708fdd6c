"""Signing emails: the ``Emailmw-Signature`` header, and a sender that adds it.

With a signing key the context wraps its sender in a :class:`SigningSender`:
every message, request and response then carries::

    Emailmw-Signature: v1 hmac-sha256 <base64 of the MAC>

The MAC is HMAC-SHA256 over an unambiguous encoding (each field as its UTF-8
length, a colon, the bytes, a comma) of: the subject (topic or service name),
the body, the metadata headers (``Source-Timestamp``, ``Publisher-GID``,
``Client-GID``, ``Request-Sequence-Number``, ``Publication-Number``,
``Previous-Timestamp``, ``Previous-Number``; empty when absent),
``Message-ID`` and ``In-Reply-To``. Changing any of them, or moving a field's
bytes into another, breaks the signature. A typed body's ``Message-Type`` is
signed too (appended last, only when present, so that plain-text signatures
are the same as ever). The receiving side checks it in
:class:`emailmw.security.AdmissionPolicy`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_MESSAGE_TYPE,
    HEADER_PREVIOUS_NUMBER,
    HEADER_PREVIOUS_TIMESTAMP,
    HEADER_PUBLICATION_NUMBER,
    HEADER_PUBLISHER_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SIGNATURE,
    HEADER_SOURCE_TIMESTAMP,
)
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.sender import EmailSender

__all__ = [
    "SIGNATURE_HEADER",
    "SigningSender",
    "compute_signature",
    "sign_email",
    "verify_signature",
]

SIGNATURE_HEADER = HEADER_SIGNATURE
_SCHEME = "v1 hmac-sha256 "
_SIGNED_HEADERS = (
    HEADER_SOURCE_TIMESTAMP,
    HEADER_PUBLISHER_GID,
    HEADER_CLIENT_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_PUBLICATION_NUMBER,
    HEADER_PREVIOUS_TIMESTAMP,
    HEADER_PREVIOUS_NUMBER,
)


def _canonical(email: EmailData) -> bytes:
    fields = [
        email.content.subject,
        email.content.body,
        *(email.headers.get(name) or "" for name in _SIGNED_HEADERS),
        email.message_id,
        email.in_reply_to or "",
    ]
    message_type = email.headers.get(HEADER_MESSAGE_TYPE)
    if message_type is not None:  # typed bodies only: plain-text signatures stay as they were
        fields.append(message_type)
    parts = []
    for field in fields:
        data = field.encode("utf-8", "surrogatepass")
        parts.append(b"%d:%s," % (len(data), data))
    return b"".join(parts)


def compute_signature(email: EmailData, key: bytes) -> str:
    """The ``Emailmw-Signature`` value of ``email`` under ``key``."""
    mac = hmac.new(key, _canonical(email), hashlib.sha256).digest()
    return _SCHEME + base64.b64encode(mac).decode("ascii")


def sign_email(email: EmailData, key: bytes) -> None:
    """Add (or replace) the signature header. ``email.message_id`` must be final."""
    email.headers[SIGNATURE_HEADER] = compute_signature(email, key)


def verify_signature(email: EmailData, key: bytes) -> bool | None:
    """``None`` if unsigned, else whether the signature is valid."""
    value = email.headers.get(SIGNATURE_HEADER)
    if value is None:
        return None
    return hmac.compare_digest(value.strip().encode(), compute_signature(email, key).encode())


class SigningSender(EmailSender):
    """Wraps any sender: signs every email with ``key`` before handing it on.

    The Message-ID is part of what is signed, so the wrapper takes a new one
    from the wrapped sender (:meth:`EmailSender.new_message_id`) and passes it
    down with the email.
    """

    def __init__(self, inner: EmailSender, key: bytes) -> None:
        self._inner = inner
        self._key = key

    @property
    def inner(self) -> EmailSender:
        """The wrapped sender."""
        return self._inner

    def connect(self) -> None:
        """Connect the wrapped sender."""
        self._inner.connect()

    def close(self) -> None:
        """Close the wrapped sender."""
        self._inner.close()

    def new_message_id(self) -> str:
        """A new Message-ID from the wrapped sender."""
        return self._inner.new_message_id()

    def offers(self, extension: str) -> bool:
        """What the wrapped sender offers."""
        return self._inner.offers(extension)

    def send(
        self,
        content: EmailContent,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Sign, then send a new email through the wrapped sender."""
        email = self._signed(content, headers, message_id, None)
        return self._inner.send(content, email.headers, message_id=email.message_id)

    def reply(
        self,
        content: EmailContent,
        original: EmailData,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Sign, then send a reply to ``original`` through the wrapped sender."""
        email = self._signed(content, headers, message_id, original.message_id or None)
        return self._inner.reply(content, original, email.headers, message_id=email.message_id)

    def _signed(
        self,
        content: EmailContent,
        headers: EmailHeaders | None,
        message_id: str | None,
        in_reply_to: str | None,
    ) -> EmailData:
        email = EmailData(
            content,
            headers.copy() if headers is not None else EmailHeaders(),
            message_id=message_id or self._inner.new_message_id(),
            in_reply_to=in_reply_to,
        )
        sign_email(email, self._key)
        return email

    def __repr__(self) -> str:
        return f"<SigningSender {self._inner!r}>"
