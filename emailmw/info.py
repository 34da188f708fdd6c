"""Metadata that travels with every message, request and response.

Values travel in email headers (no ``X-`` prefix, RFC 6648), with the names and
formats of the reference design so that implementations can share a mailbox:

=========================== ============================================
header                      value
=========================== ============================================
``Source-Timestamp``        integer nanoseconds since the Unix epoch
``Publisher-GID``           unsigned 32-bit integer, decimal (messages)
``Client-GID``              unsigned 32-bit integer, decimal (services)
``Request-Sequence-Number`` signed 64-bit integer, decimal (services)
``Publication-Number``      1, 2, 3, ... per publisher (messages; emailmw only)
``Previous-Timestamp``      the ``Source-Timestamp`` of the publisher's previous
                            accepted message (absent before the first one is
                            accepted; emailmw only)
``Previous-Number``         the ``Publication-Number`` of that message, only when
                            it is not this number less one, that is when a
                            ``publish()`` in between raised (0: none was
                            accepted yet; emailmw only)
``Message-Type``            what the body holds when it is not plain text:
                            ``bytes`` (base64) or ``json; type=<name>``
                            (emailmw only; see :mod:`emailmw.serialization`)
=========================== ============================================

Every other header a sender set (``additional_headers``) reaches the receiver
in :attr:`MessageInfo.headers` / :attr:`ServiceInfo.headers`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, TypeVar

__all__ = [
    "HEADER_CLIENT_GID",
    "HEADER_MESSAGE_TYPE",
    "HEADER_SIGNATURE",
    "HEADER_PREVIOUS_NUMBER",
    "HEADER_PREVIOUS_TIMESTAMP",
    "HEADER_PUBLICATION_NUMBER",
    "HEADER_PUBLISHER_GID",
    "HEADER_SEQUENCE_NUMBER",
    "HEADER_SOURCE_TIMESTAMP",
    "METADATA_HEADERS",
    "NO_HEADERS",
    "OWN_HEADERS",
    "Gid",
    "MessageInfo",
    "ServiceInfo",
    "ServiceRequest",
    "ServiceRequestId",
    "Timestamp",
    "additional_headers",
]

T = TypeVar("T")

HEADER_SOURCE_TIMESTAMP = "Source-Timestamp"
HEADER_PUBLISHER_GID = "Publisher-GID"
HEADER_CLIENT_GID = "Client-GID"
HEADER_SEQUENCE_NUMBER = "Request-Sequence-Number"
HEADER_PUBLICATION_NUMBER = "Publication-Number"
HEADER_PREVIOUS_TIMESTAMP = "Previous-Timestamp"
HEADER_PREVIOUS_NUMBER = "Previous-Number"
#: Header names that emailmw owns; user code may not set them.
METADATA_HEADERS = frozenset(
    h.lower()
    for h in (
        HEADER_SOURCE_TIMESTAMP,
        HEADER_PUBLISHER_GID,
        HEADER_CLIENT_GID,
        HEADER_SEQUENCE_NUMBER,
        HEADER_PUBLICATION_NUMBER,
        HEADER_PREVIOUS_TIMESTAMP,
        HEADER_PREVIOUS_NUMBER,
    )
)

HEADER_MESSAGE_TYPE = "Message-Type"
HEADER_SIGNATURE = "Emailmw-Signature"
#: Every header name emailmw writes itself (lower case): the metadata, the body's
#: type and the signature. The rest of a received email's headers are "additional".
OWN_HEADERS = METADATA_HEADERS | {HEADER_MESSAGE_TYPE.lower(), HEADER_SIGNATURE.lower()}
#: An empty read-only mapping (the headers of a message that has no additional ones).
NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_NO_HEADERS = NO_HEADERS


def additional_headers(headers: Iterable[tuple[str, str]] | Mapping[str, str]) -> Mapping[str, str]:
    """The headers of a received email that its sender added (a read-only mapping):
    all but :data:`OWN_HEADERS`."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    extra = {name: value for name, value in items if name.lower() not in OWN_HEADERS}
    return MappingProxyType(extra) if extra else _NO_HEADERS


_GID_MAX = 2**32 - 1
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _parse_decimal(text: str, lo: int, hi: int) -> int | None:
    """Strict decimal parse: an optional ``-``, ASCII digits only, within ``[lo, hi]``.

    Surrounding white space (left by header folding) is ignored.
    """
    text = text.strip(" \t")
    body = text[1:] if text[:1] == "-" else text
    if not body or not body.isascii() or not body.isdigit() or len(body) > 20:
        return None
    value = int(text)
    return value if lo <= value <= hi else None


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """A point in time, in integer nanoseconds since the Unix epoch."""

    nanoseconds: int

    @classmethod
    def now(cls) -> Timestamp:
        """The current wall-clock time."""
        return cls(time.time_ns())

    def to_string(self) -> str:
        """Decimal nanoseconds, the header format."""
        return str(self.nanoseconds)

    @classmethod
    def from_string(cls, text: str) -> Timestamp | None:
        """Parse the header format; ``None`` if it is not a signed 64-bit decimal."""
        value = _parse_decimal(text, _INT64_MIN, _INT64_MAX)
        return None if value is None else cls(value)


@dataclass(frozen=True, slots=True, order=True)
class Gid:
    """A globally unique identifier of a publisher, subscription, client or server.

    ``value`` is an unsigned 32-bit integer, as in the reference design.
    """

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= _GID_MAX:
            raise ValueError(f"GID must be an unsigned 32-bit integer, got {self.value!r}")

    @classmethod
    def new(cls) -> Gid:
        """A new random GID."""
        return cls(secrets.randbits(32))

    def to_string(self) -> str:
        """Decimal, the header format."""
        return str(self.value)

    @classmethod
    def from_string(cls, text: str) -> Gid | None:
        """Parse the header format; ``None`` if it is not an unsigned 32-bit decimal."""
        value = _parse_decimal(text, 0, _GID_MAX)
        return None if value is None else cls(value)


def parse_sequence_number(text: str) -> int | None:
    """Parse a ``Request-Sequence-Number`` value (signed 64-bit decimal)."""
    return _parse_decimal(text, _INT64_MIN, _INT64_MAX)


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """Metadata of a received pub/sub message.

    ``received_timestamp`` is when emailmw received and dispatched the email,
    not when your code took the message from the subscription.
    """

    source_timestamp: Timestamp
    received_timestamp: Timestamp
    publisher_gid: Gid
    #: every header the email had (read on demand by :attr:`headers`)
    _email_headers: Mapping[str, str] = field(
        default_factory=lambda: _NO_HEADERS, repr=False, compare=False
    )
    #: the email's Message-ID and IMAP UID (0: none), for durable subscriptions
    _message_id: str = field(default="", repr=False, compare=False)
    _uid: int = field(default=0, repr=False, compare=False)

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers the publisher added (``additional_headers``), read-only."""
        return additional_headers(self._email_headers)


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """Metadata of a received service request or response.

    ``received_timestamp`` is when emailmw received and dispatched the email.
    """

    source_timestamp: Timestamp
    received_timestamp: Timestamp
    client_gid: Gid
    sequence_number: int
    #: every header the email had (read on demand by :attr:`headers`)
    _email_headers: Mapping[str, str] = field(
        default_factory=lambda: _NO_HEADERS, repr=False, compare=False
    )

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers the client or server added (``additional_headers``), read-only."""
        return additional_headers(self._email_headers)


@dataclass(frozen=True, slots=True)
class ServiceRequestId:
    """Identifies one request: the client that sent it and its sequence number."""

    sequence_number: int
    client_gid: Gid


@dataclass(frozen=True, slots=True)
class ServiceRequest(Generic[T]):
    """A request as a service server sees it: its id and its content (a ``str``
    unless the server has another request type)."""

    id: ServiceRequestId
    content: T
