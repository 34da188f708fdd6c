"""Data containers for one email: recipients, content, headers, and the whole.

These are plain objects with no I/O; every transport produces and consumes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field

__all__ = ["EmailContent", "EmailData", "EmailHeaders", "EmailRecipients"]


class EmailHeaders(MutableMapping[str, str]):
    """Email header fields: a mapping whose keys compare case-insensitively.

    The spelling of a name as first set is kept for iteration and encoding
    (``Message-Id`` and ``Message-ID`` are the same key).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] | None = None) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            for name, value in pairs:
                self[name] = value

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __setitem__(self, name: str, value: str) -> None:
        key = name.lower()
        old = self._items.get(key)
        self._items[key] = (old[0] if old else name, value)

    def __delitem__(self, name: str) -> None:
        del self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return (original for original, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        """The value of ``name`` (any case), or ``default``."""
        item = self._items.get(name.lower())
        return default if item is None else item[1]

    def copy(self) -> EmailHeaders:
        """A shallow copy."""
        new = EmailHeaders()
        new._items = dict(self._items)
        return new

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EmailHeaders):
            return {k: v for k, (_, v) in self._items.items()} == {
                k: v for k, (_, v) in other._items.items()
            }
        if isinstance(other, Mapping):
            if not all(isinstance(name, str) for name in other):
                return False
            return self == EmailHeaders(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EmailHeaders({dict(self.items())!r})"


@dataclass(slots=True)
class EmailRecipients:
    """Who an email goes to. ``bcc`` travels in the SMTP envelope only."""

    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        """Every address, in order, without duplicates (the SMTP envelope)."""
        return list(dict.fromkeys([*self.to, *self.cc, *self.bcc]))


@dataclass(slots=True)
class EmailContent:
    """What an email says: the subject (topic or service name) and the body (message),
    and the body's media type (``text/plain``, or ``application/json`` for a typed
    message)."""

    subject: str
    body: str
    media_type: str = "text/plain"


@dataclass(slots=True)
class EmailData:
    """One email as emailmw sees it.

    ``message_id`` and ``in_reply_to`` keep their angle brackets
    (``<abc@host>``); ``in_reply_to`` is ``None`` unless the email is a reply.
    ``headers`` holds every other header that matters (metadata and user
    headers); ``from_`` is the ``From`` address.
    """

    content: EmailContent
    headers: EmailHeaders = field(default_factory=EmailHeaders)
    message_id: str = ""
    in_reply_to: str | None = None
    from_: str = ""
    recipients: EmailRecipients = field(default_factory=EmailRecipients)
    #: the IMAP UID the email had in its folder (0: not read from IMAP)
    uid: int = 0
