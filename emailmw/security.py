"""Message authentication and admission: signatures, replay protection, allowed senders.

Signing
    With a key configured (``email.signing-key``, ``email.signing-key-file`` or
    ``$EMAILMW_SIGNING_KEY``), every message, request and response carries an
    ``Emailmw-Signature`` header::

        Emailmw-Signature: v1 hmac-sha256 <base64 of the MAC>

    The MAC is HMAC-SHA256 over an unambiguous encoding (each field as its
    UTF-8 length, a colon, the bytes, a comma) of: the subject (topic or
    service name), the body, the metadata headers (``Source-Timestamp``,
    ``Publisher-GID``, ``Client-GID``, ``Request-Sequence-Number``,
    ``Publication-Number``, ``Previous-Timestamp``; empty when absent),
    ``Message-ID`` and ``In-Reply-To``. Changing any of them, or
    moving a field's bytes into another, breaks the signature.

Admission (:class:`AdmissionPolicy`), applied to every received email before
it is dispatched:
    * ``allowed-senders``: the ``From`` address must be listed, or its domain
      (``example.com`` or ``@example.com``). Without signing this only stops
      honest mistakes: ``From`` is trivially forged.
    * with a key: an unsigned email is dropped (``unsigned``), a wrong MAC is
      dropped (``bad_signature``), and so is a replay (``replay``): a
      ``Message-ID`` accepted before, or a ``Source-Timestamp`` older than
      ``max-age`` (or more than :data:`MAX_CLOCK_SKEW` seconds in the future).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_PREVIOUS_NUMBER,
    HEADER_PREVIOUS_TIMESTAMP,
    HEADER_PUBLICATION_NUMBER,
    HEADER_PUBLISHER_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SOURCE_TIMESTAMP,
    Timestamp,
)
from emailmw.stats import DropReason

if TYPE_CHECKING:
    from emailmw.transport.data import EmailData

__all__ = [
    "MAX_CLOCK_SKEW",
    "SIGNATURE_HEADER",
    "AdmissionPolicy",
    "compute_signature",
    "sign_email",
    "verify_signature",
]

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Emailmw-Signature"
_SCHEME = "v1 hmac-sha256 "
#: Seconds a Source-Timestamp may lie in the future (clock skew between hosts).
MAX_CLOCK_SKEW = 300.0
#: Upper bound of remembered Message-IDs for replay detection.
REPLAY_WINDOW = 200_000
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


def _normalize_sender(entry: str) -> str:
    return entry.strip().lower()


class AdmissionPolicy:
    """Decides whether a received email may be dispatched.

    :meth:`check` returns ``None`` to admit, or the :class:`DropReason`.
    Thread-safe.
    """

    def __init__(
        self,
        key: bytes | None = None,
        *,
        max_age: float = 24 * 3600.0,
        allowed_senders: Iterable[str] = (),
    ) -> None:
        self._key = key
        self._max_age = max_age
        self._addresses: set[str] = set()
        self._domains: set[str] = set()
        for entry in map(_normalize_sender, allowed_senders):
            if "@" in entry.lstrip("@"):
                self._addresses.add(entry)
            else:
                self._domains.add(entry.lstrip("@"))
        # Message-ID -> (accepted at, Source-Timestamp in ns)
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()
        # emails stamped at or before this were pushed out of memory unexpired: refused
        self._floor_ns: int | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """True if this policy can drop anything."""
        return self._key is not None or bool(self._addresses or self._domains)

    def check(self, email: EmailData) -> DropReason | None:
        """Admit ``email`` (``None``) or say why it must be dropped."""
        if (self._addresses or self._domains) and not self._sender_allowed(email.from_):
            return DropReason.SENDER_NOT_ALLOWED
        if self._key is None:
            return None
        valid = verify_signature(email, self._key)
        if valid is None:
            return DropReason.UNSIGNED
        if not valid:
            return DropReason.BAD_SIGNATURE
        return self._check_replay(email)

    def _sender_allowed(self, sender: str) -> bool:
        address = _normalize_sender(sender)
        if address in self._addresses:
            return True
        return address.rpartition("@")[2] in self._domains

    def _check_replay(self, email: EmailData) -> DropReason | None:
        text = email.headers.get(HEADER_SOURCE_TIMESTAMP)
        stamp = Timestamp.from_string(text) if text is not None else None
        now = time.time()
        if stamp is not None:
            age = now - stamp.nanoseconds / 1e9
            if age > self._max_age or age < -MAX_CLOCK_SKEW:
                return DropReason.REPLAY
        if not email.message_id or stamp is None:
            return DropReason.REPLAY  # freshness cannot be shown
        with self._lock:
            seen = self._seen
            if email.message_id in seen:
                return DropReason.REPLAY
            if self._floor_ns is not None and stamp.nanoseconds <= self._floor_ns:
                return DropReason.REPLAY
            seen[email.message_id] = (now, stamp.nanoseconds)
            # Forget ids older than max-age: a replay of those fails the age check. An id
            # forgotten earlier (memory full) raises the floor instead.
            horizon = now - self._max_age - MAX_CLOCK_SKEW
            while seen:
                accepted, stamped = next(iter(seen.values()))
                if len(seen) > REPLAY_WINDOW:
                    floor = self._floor_ns
                    self._floor_ns = stamped if floor is None else max(floor, stamped)
                elif accepted >= horizon:
                    break
                seen.popitem(last=False)
        return None
