"""What the IMAP receiver remembers of the emails it handled, and how it re-reads a
folder whose ``UIDVALIDITY`` changed.

A new ``UIDVALIDITY`` (the folder was deleted and recreated, restored, or its
index rebuilt) makes the UIDs meaningless: the receiver reads the folder again
from its first email up to the ``UIDNEXT`` it found on reconnecting (emails
from there on are new and received as usual). That re-read must deliver what
arrived while the receiver was away and skip what it handled before, and it
decides from what emailmw itself set, never from a date a stranger can set
(any client may ``APPEND`` an email with an ``INTERNALDATE`` hours ahead).

What is remembered (:class:`HandledMemory`)
    For each of the last :data:`MEMORY_SIZE` emails the receiver handed on, a
    fingerprint of a few header fields (``Message-ID``, ``Date``, ``From``,
    ``Subject``, the emailmw metadata headers and ``Emailmw-Signature``: see
    :data:`RESYNC_FIELDS`) and its *bound*: its ``Source-Timestamp``, but never
    later than the receiver's own clock when it handled the email. The
    *horizon* is the receiver's start (its first connection) or, once the
    memory overflowed, the newest bound of an email the memory forgot, if that
    is later.

The rule (:meth:`Resync.decide`), for each email of the re-read part
    Listed with ``UID RFC822.SIZE INTERNALDATE`` and only those header fields
    (``BODY.PEEK[HEADER.FIELDS (...)]``, a few hundred bytes an email); a body
    is downloaded only for an email that will be delivered.

    1. Over ``max-message-size``: skipped as ``too_large`` (as ever).
    2. Its fingerprint is remembered: it was handled before; skipped as
       ``resync_skipped``.
    3. Not an emailmw email (no metadata header): dropped as ``not_emailmw``
       on its headers (``receive_raw`` delivers it if its ``INTERNALDATE`` is
       not before the cut-off: a stranger's date can only make a stranger's
       email come out, never hold one of emailmw's back).
    4. An emailmw email whose ``Source-Timestamp`` is before the cut-off (the
       horizon minus :data:`MARGIN`): older than anything the memory can vouch
       for, so it was handled before or sat in the folder before the receiver
       started; skipped as ``resync_skipped``.
    5. Anything else is delivered (an emailmw email without a valid
       ``Source-Timestamp`` too: the decoder and the admission checks judge it).

Why a stranger cannot cost a genuine message
    The cut-off comes from the horizon, which only moves to the bound of an
    email the receiver handled, and a bound is never later than the receiver's
    clock at that moment, so never later than the disconnection. An email
    published while the receiver was away carries a later ``Source-Timestamp``
    (up to :data:`MARGIN` of clock difference between the two hosts is
    absorbed). A forged emailmw email with a ``Source-Timestamp`` hours ahead
    moves the horizon no further than a genuine one handled at the same moment
    would. A forgery can shadow a genuine email in a re-read only by carrying
    exactly its fingerprint, which takes a copy of its headers made before this
    receiver handled the genuine email; even then the skip is counted and
    logged.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

from emailmw.info import METADATA_HEADERS, Timestamp
from emailmw.stats import DropReason

__all__ = [
    "FETCH_RESYNC",
    "MARGIN",
    "MEMORY_SIZE",
    "RESYNC_FIELDS",
    "HandledMemory",
    "Resync",
    "Summary",
    "header_block",
    "summarize",
]

#: Emails whose fingerprint the receiver remembers.
MEMORY_SIZE = 10_000
#: How far before the horizon an emailmw email is still delivered by a re-read (ns):
#: absorbs clock differences between hosts and mail stored late.
MARGIN = 60 * 1_000_000_000
#: The header fields a re-read fetches to decide, lower case.
RESYNC_FIELDS: tuple[str, ...] = (
    "message-id",
    "date",
    "from",
    "subject",
    "emailmw-signature",
    *sorted(METADATA_HEADERS),
)
#: ``UID FETCH`` items of a re-read listing: no body.
FETCH_RESYNC = b"(UID RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (%s)])" % " ".join(
    RESYNC_FIELDS
).upper().encode("ascii")
_SOURCE_TIMESTAMP = "source-timestamp"
_WANTED = frozenset(RESYNC_FIELDS)
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def header_block(raw: bytes) -> bytes:
    """The header block of a whole email (everything before the first empty line)."""
    if raw[:1] == b"\n" or raw[:2] == b"\r\n":
        return b""
    match = _HEADER_END.search(raw)
    return raw if match is None else raw[: match.start()]


@dataclass(frozen=True, slots=True)
class Summary:
    """What a re-read needs to know of one email, from its header fields."""

    key: bytes  #: fingerprint of the fields in :data:`RESYNC_FIELDS`
    emailmw: bool  #: it has an emailmw metadata header
    timestamp: int | None  #: its ``Source-Timestamp`` (ns), when there is one valid one


def summarize(block: bytes) -> Summary:
    """The :class:`Summary` of a header block: a whole email's (see
    :func:`header_block`) or the answer to ``BODY[HEADER.FIELDS (...)]``; both
    give the same summary for the same email. Never raises."""
    fields: list[tuple[str, bytearray]] = []
    current: bytearray | None = None
    for raw_line in block.split(b"\n"):
        line = raw_line[:-1] if raw_line.endswith(b"\r") else raw_line
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current += b" " + line.strip(b" \t")
            continue
        current = None
        match = _FIELD.match(line)
        if match is None:
            continue
        name = match.group(1).decode("ascii").lower()
        if name in _WANTED:
            current = bytearray(line[match.end() :].strip(b" \t"))
            fields.append((name, current))
    fields.sort(key=lambda item: item[0])  # stable: repeated fields keep their order
    digest = hashlib.blake2b(digest_size=16)
    for name, value in fields:
        text = bytes(value).strip(b" \t")
        digest.update(b"%d:%s=%d:" % (len(name), name.encode("ascii"), len(text)))
        digest.update(text)
    stamps = [value for name, value in fields if name == _SOURCE_TIMESTAMP]
    stamp = None
    if len(stamps) == 1:  # a repeated one makes the email malformed: let the decoder say so
        stamp = Timestamp.from_string(stamps[0].decode("ascii", "replace"))
    return Summary(
        key=digest.digest(),
        emailmw=any(name in METADATA_HEADERS for name, _ in fields),
        timestamp=None if stamp is None else stamp.nanoseconds,
    )


class HandledMemory:
    """The fingerprints of the last ``size`` emails handled, and the horizon (see the
    module docstring). Not thread-safe: the receiving thread owns it."""

    def __init__(self, size: int = MEMORY_SIZE) -> None:
        self._size = size
        self._bounds: OrderedDict[bytes, int | None] = OrderedDict()
        self._horizon: int | None = None

    def start(self, now_ns: int) -> None:
        """The receiver's first connection: the horizon before anything was forgotten."""
        if self._horizon is None:
            self._horizon = now_ns

    @property
    def horizon(self) -> int | None:
        """Nothing at or after it is forgotten (ns); None before :meth:`start`."""
        return self._horizon

    def remember(self, summary: Summary, now_ns: int) -> None:
        """``summary``'s email was handled now (``now_ns``: the receiver's clock)."""
        bound = None if summary.timestamp is None else min(summary.timestamp, now_ns)
        self._bounds[summary.key] = bound
        self._bounds.move_to_end(summary.key)
        while len(self._bounds) > self._size:
            _, forgotten = self._bounds.popitem(last=False)
            if forgotten is not None and (self._horizon is None or forgotten > self._horizon):
                self._horizon = forgotten

    def __contains__(self, key: object) -> bool:
        return key in self._bounds

    def __len__(self) -> int:
        return len(self._bounds)


@dataclass(slots=True)
class Resync:
    """One re-read of a folder after a ``UIDVALIDITY`` change: UIDs below ``below``."""

    below: int  #: the folder's UIDNEXT when the change was found
    cutoff: int | None  #: emailmw emails with an earlier Source-Timestamp are skipped (ns)
    counts: Counter[str] = field(default_factory=Counter)  #: what it did (see :meth:`note`)

    @classmethod
    def after_change(cls, below: int, memory: HandledMemory) -> Resync:
        """The re-read of a folder whose UIDNEXT is now ``below``."""
        horizon = memory.horizon
        return cls(below=below, cutoff=None if horizon is None else horizon - MARGIN)

    def decide(
        self, summary: Summary, date: datetime | None, memory: HandledMemory, raw: bool
    ) -> tuple[DropReason, str] | None:
        """Why the email listed with ``summary`` and ``INTERNALDATE`` ``date`` is not
        to be delivered (the drop reason and a word for the log), or None to deliver
        it (``raw``: for ``receive_raw``)."""
        if summary.key in memory:
            return DropReason.RESYNC_SKIPPED, "handled before"
        if not summary.emailmw:
            if not raw:
                return DropReason.NOT_EMAILMW, "not emailmw"
            if self._before_cutoff(None if date is None else int(date.timestamp() * 1e9)):
                return DropReason.RESYNC_SKIPPED, "stored before the cut-off"
            return None
        if self._before_cutoff(summary.timestamp):
            return DropReason.RESYNC_SKIPPED, "published before the cut-off"
        return None

    def _before_cutoff(self, at: int | None) -> bool:
        return self.cutoff is not None and at is not None and at < self.cutoff

    def describe(self) -> str:
        """What the re-read did, for the log."""
        parts = [f"{n} {why}" for why, n in sorted(self.counts.items())]
        return ", ".join(parts) if parts else "nothing"

    def note(self, why: str) -> None:
        """Count what became of one email of the re-read (``fetched``: its body was
        downloaded to be decoded and delivered; ``too large``, ``vanished``, or the
        word :meth:`decide` gave)."""
        self.counts[why] += 1

    @property
    def skipped(self) -> int:
        """Emails skipped so far (every one not fetched), for any reason."""
        return sum(n for why, n in self.counts.items() if why != "fetched")
