"""Mailbox administration: retention (prune) and the mailbox tools (topics, history).

Everything here works on its **own** IMAP session, opened read-write (``SELECT``)
with :func:`open_admin_session`, never on the receiver's read-only one. emailmw
emails are found by their headers only: ``UID SEARCH HEADER Source-Timestamp ""``
(every emailmw email carries one), then ``UID FETCH (UID RFC822.SIZE
BODY.PEEK[HEADER.FIELDS (SUBJECT SOURCE-TIMESTAMP PUBLISHER-GID CLIENT-GID
MESSAGE-ID)])`` in batches. An email whose ``Source-Timestamp`` does not parse
is not emailmw's and is never touched.

:func:`prune` deletes with ``UID STORE +FLAGS.SILENT (\\Deleted)`` and ``UID
EXPUNGE`` (RFC 4315, UIDPLUS) of exactly those UIDs: an email another client
flagged ``\\Deleted`` stays until that client expunges it. A server without
UIDPLUS is refused (a plain ``EXPUNGE`` would expunge the other client's
deletions too). Readers that ``EXAMINE`` the folder meanwhile just see the
``EXPUNGE`` responses; they never lose an email that prune did not delete.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emailmw.errors import ImapError, TlsError
from emailmw.info import Gid, Timestamp
from emailmw.transport.codec import MalformedEmailError, decode_email, decode_value, parse_fields
from emailmw.transport.data import EmailData
from emailmw.transport.imap_session import ConnectionLostError, Session, open_session
from emailmw.transport.settings import ImapSettings
from emailmw.transport.tls import client_context

__all__ = [
    "BATCH",
    "EmailSummary",
    "Progress",
    "PruneResult",
    "TopicPrune",
    "TopicSummary",
    "fetch_emails",
    "history",
    "list_emailmw",
    "open_admin_session",
    "prune",
    "topics",
]

logger = logging.getLogger(__name__)

#: UIDs per ``UID FETCH`` / ``UID STORE`` / ``UID EXPUNGE`` command.
BATCH = 2000

#: Told how far a long operation got: ``progress(phase, done, total)`` after each
#: batch (phases ``listing``, ``fetching``, ``deleting``).
Progress = Callable[[str, int, int], None]

_FIELDS = b"SUBJECT SOURCE-TIMESTAMP PUBLISHER-GID CLIENT-GID MESSAGE-ID"
_HEADER_ITEM = b"BODY[HEADER.FIELDS (" + _FIELDS + b")]"
_FETCH_ITEMS = b"(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (" + _FIELDS + b")])"


@dataclass(frozen=True, slots=True)
class EmailSummary:
    """One emailmw email as its headers describe it (its body is not fetched).

    ``topic`` is the ``Subject`` (a topic or a service name); ``publisher_gid``
    is set for publications, ``client_gid`` for service requests and responses.
    """

    uid: int
    size: int
    topic: str
    source_timestamp: Timestamp
    publisher_gid: Gid | None
    client_gid: Gid | None
    message_id: str


@dataclass(slots=True)
class TopicPrune:
    """What :func:`prune` did on one topic: emails examined, deleted, kept."""

    examined: int = 0
    deleted: int = 0
    kept: int = 0


@dataclass(slots=True)
class PruneResult:
    """What :func:`prune` did: totals and per topic. ``dry_run``: nothing was deleted
    (``deleted`` counts what would have been)."""

    dry_run: bool
    topics: dict[str, TopicPrune] = field(default_factory=dict)

    @property
    def examined(self) -> int:
        """emailmw emails examined."""
        return sum(t.examined for t in self.topics.values())

    @property
    def deleted(self) -> int:
        """emailmw emails deleted (or, in a dry run, that would be)."""
        return sum(t.deleted for t in self.topics.values())

    @property
    def kept(self) -> int:
        """emailmw emails kept."""
        return sum(t.kept for t in self.topics.values())


@dataclass(slots=True)
class TopicSummary:
    """One topic of the folder (``emailmw topics``): how many publications, by
    which publishers, and the newest ``Source-Timestamp``."""

    topic: str
    count: int = 0
    publishers: set[Gid] = field(default_factory=set)
    last: Timestamp | None = None


def _ssl_context(settings: ImapSettings) -> ssl.SSLContext:
    tls = settings.tls
    try:
        return client_context(tls.ca_file, tls.verify)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"{settings.server}: cannot load tls.ca-file {tls.ca_file}: {exc}",
            server=str(settings.server),
        ) from exc


def _ignore(_: int) -> None:
    return None


def open_admin_session(settings: ImapSettings, *, writable: bool = True) -> Session:
    """A new IMAP session of its own on ``settings.mailbox``: ``SELECT``\\ed
    (read-write) if ``writable``, else left ``EXAMINE``\\d. Raises a
    :class:`~emailmw.TransportError` subclass."""
    session = open_session(settings, _ssl_context(settings), _ignore)
    if writable:
        try:
            session.client.select_folder(settings.mailbox, readonly=False)
        except Exception as exc:
            session.close(polite=False)
            raise ImapError(
                f"{session.server}: cannot open mailbox {settings.mailbox!r} read-write: {exc}",
                server=session.server,
            ) from exc
    return session


def _uid_set(uids: Sequence[int]) -> bytes:
    """``1:3,7,9:10`` for sorted ``uids``."""
    parts: list[str] = []
    start = prev = uids[0]
    for uid in uids[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts).encode("ascii")


def _command(session: Session, what: str, *args: Any) -> list[Any]:
    """Run ``UID <args>``; return the untagged data of ``what``; ImapError on NO/BAD."""
    imap = session.imap
    try:
        typ, data = imap._simple_command("UID", *args)
        if typ != "OK":
            raise ImapError(
                f"{session.server}: UID {args[0]} failed: {data}", server=session.server
            )
        _, found = imap._untagged_response(typ, data, what)
        imap.untagged_responses.clear()
    except ImapError:
        raise
    except Exception as exc:
        raise ImapError(f"{session.server}: UID {args[0]}: {exc}", server=session.server) from exc
    return [item for item in found if item is not None]


def _search(session: Session, topic: str | None) -> list[int]:
    criteria: list[bytes] = [b"HEADER", b"Source-Timestamp", b'""']
    if topic is not None:
        criteria += [b"HEADER", b"Subject", _quote(topic)]
    found = _command(session, "SEARCH", "SEARCH", *criteria)
    uids = sorted({int(uid) for line in found for uid in line.split()})
    return uids


def _quote(text: str) -> bytes:
    data = text.encode("utf-8")
    if any(b in data for b in b"\r\n\x00") or not text.isascii():
        # a literal is not worth it here: search a word of it, the exact topic is checked after
        data = next((w for w in text.split() if w.isascii()), "").encode("ascii")
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _summary(uid: int, item: dict[bytes, Any]) -> EmailSummary | None:
    block = item.get(_HEADER_ITEM)
    if not isinstance(block, bytes):
        return None
    try:
        fields = {name.lower(): value for name, value in parse_fields(block)}
        stamp = Timestamp.from_string(decode_value(fields["source-timestamp"], strict=True))
        subject = fields.get("subject")
        if stamp is None or subject is None:
            return None
        topic = decode_value(subject, strict=True, words=True)

        def gid(name: str) -> Gid | None:
            value = fields.get(name)
            return None if value is None else Gid.from_string(decode_value(value, strict=True))

        message_id = fields.get("message-id")
        return EmailSummary(
            uid=uid,
            size=int(item.get(b"RFC822.SIZE", 0)),
            topic=topic,
            source_timestamp=stamp,
            publisher_gid=gid("publisher-gid"),
            client_gid=gid("client-gid"),
            message_id=decode_value(message_id, strict=False, words=False).strip()
            if message_id is not None
            else "",
        )
    except (KeyError, ValueError, LookupError):
        return None


def list_emailmw(
    session: Session,
    topic: str | None = None,
    batch: int = BATCH,
    progress: Progress | None = None,
) -> list[EmailSummary]:
    """Every emailmw email of the selected folder (of ``topic`` only, if given), in
    UID order, from its headers. ``progress("listing", done, total)`` after each batch."""
    uids = _search(session, topic)
    found: list[EmailSummary] = []
    if progress is not None:
        progress("listing", 0, len(uids))
    for start in range(0, len(uids), batch):
        chunk = uids[start : start + batch]
        try:
            ok, items = session.fetch(_uid_set(chunk), _FETCH_ITEMS)
        except ConnectionLostError as exc:
            raise ImapError(f"{session.server}: {exc}", server=session.server) from exc
        if not ok:
            raise ImapError(f"{session.server}: UID FETCH refused", server=session.server)
        for uid in chunk:
            item = items.get(uid)
            summary = None if item is None else _summary(uid, item)
            if summary is not None and (topic is None or summary.topic == topic):
                found.append(summary)
        if progress is not None:
            progress("listing", start + len(chunk), len(uids))
    return found


def fetch_emails(
    session: Session, uids: Sequence[int], progress: Progress | None = None
) -> dict[int, EmailData]:
    """The decoded emails of ``uids`` (``BODY.PEEK[]``: nothing is marked read);
    one that is not emailmw's or cannot be decoded is left out (and logged).
    ``progress("fetching", done, total)`` after each batch."""
    result: dict[int, EmailData] = {}
    ordered = sorted(uids)
    if progress is not None:
        progress("fetching", 0, len(ordered))
    for start in range(0, len(ordered), BATCH):
        chunk = ordered[start : start + BATCH]
        try:
            _, items = session.fetch(_uid_set(chunk), b"(UID BODY.PEEK[])")
        except ConnectionLostError as exc:
            raise ImapError(f"{session.server}: {exc}", server=session.server) from exc
        for uid in chunk:
            raw = items.get(uid, {}).get(b"BODY[]")
            if not isinstance(raw, bytes):
                continue
            try:
                email = decode_email(raw)
            except MalformedEmailError as exc:
                logger.warning("%s: UID %d cannot be decoded: %s", session.server, uid, exc)
                continue
            if email is not None:
                result[uid] = email
        if progress is not None:
            progress("fetching", start + len(chunk), len(ordered))
    return result


def topics(session: Session) -> list[TopicSummary]:
    """The topics of the folder (publications only), by name, from headers only."""
    by_topic: dict[str, TopicSummary] = {}
    for email in list_emailmw(session):
        if email.publisher_gid is None:
            continue
        summary = by_topic.setdefault(email.topic, TopicSummary(email.topic))
        summary.count += 1
        summary.publishers.add(email.publisher_gid)
        if summary.last is None or email.source_timestamp > summary.last:
            summary.last = email.source_timestamp
    return [by_topic[name] for name in sorted(by_topic)]


def history(
    session: Session, topic: str, count: int, progress: Progress | None = None
) -> list[tuple[EmailSummary, EmailData]]:
    """The last ``count`` publications of ``topic``, oldest first (by
    ``Source-Timestamp``, then UID), decoded: found by header, and only their
    bodies fetched. ``progress`` is told of the listing and the fetching."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    found = [
        e for e in list_emailmw(session, topic, progress=progress) if e.publisher_gid is not None
    ]
    found.sort(key=lambda e: (e.source_timestamp, e.uid))
    last = found[len(found) - count :] if count else []
    bodies = fetch_emails(session, [e.uid for e in last], progress)
    return [(e, bodies[e.uid]) for e in last if e.uid in bodies]


def _to_delete(
    emails: Iterable[EmailSummary],
    older_than: float | None,
    max_count: int | None,
    now_ns: int,
    result: PruneResult,
) -> list[int]:
    by_topic: dict[str, list[EmailSummary]] = defaultdict(list)
    for email in emails:
        by_topic[email.topic].append(email)
    cutoff = None if older_than is None else now_ns - round(older_than * 1e9)
    doomed: list[int] = []
    for name, group in by_topic.items():
        group.sort(key=lambda e: (e.source_timestamp, e.uid))
        keep_from = 0 if max_count is None else max(0, len(group) - max_count)
        stats = result.topics.setdefault(name, TopicPrune())
        for index, email in enumerate(group):
            stats.examined += 1
            old = cutoff is not None and email.source_timestamp.nanoseconds < cutoff
            if old or index < keep_from:
                stats.deleted += 1
                doomed.append(email.uid)
            else:
                stats.kept += 1
    return sorted(doomed)


def prune(
    session: Session,
    *,
    older_than: float | None = None,
    max_count: int | None = None,
    topic: str | None = None,
    dry_run: bool = False,
    now: Timestamp | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Delete the emailmw emails of the (``SELECT``\\ed) folder whose
    ``Source-Timestamp`` is older than ``older_than`` seconds, and all but the
    newest ``max_count`` of each topic; only ``topic`` if given. Foreign mail is
    never touched, nor another client's ``\\Deleted`` emails expunged.
    ``progress`` is told of the listing and the deleting, batch by batch.

    Raises :class:`~emailmw.ImapError` if the server lacks UIDPLUS (``UID EXPUNGE``).
    """
    if older_than is not None and not older_than >= 0:
        raise ValueError(f"older_than must be a number of seconds >= 0, got {older_than!r}")
    if max_count is not None and max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count!r}")
    result = PruneResult(dry_run=dry_run)
    if not dry_run and "UIDPLUS" not in session.capabilities:
        raise ImapError(
            f"{session.server}: the server lacks UIDPLUS (UID EXPUNGE): refusing to prune, "
            "since a plain EXPUNGE would also expunge the emails other clients flagged \\Deleted",
            server=session.server,
        )
    started = time.monotonic()
    emails = list_emailmw(session, topic, progress=progress)
    now_ns = (now or Timestamp.now()).nanoseconds
    doomed = _to_delete(emails, older_than, max_count, now_ns, result)
    if not dry_run:
        if progress is not None:
            progress("deleting", 0, len(doomed))
        for start in range(0, len(doomed), BATCH):
            chunk = doomed[start : start + BATCH]
            uids = _uid_set(chunk)
            _command(session, "FETCH", "STORE", uids, "+FLAGS.SILENT", "(\\Deleted)")
            _command(session, "EXPUNGE", "EXPUNGE", uids)
            if progress is not None:
                progress("deleting", start + len(chunk), len(doomed))
    logger.info(
        "%s: prune%s: %d emailmw emails examined, %d deleted, %d kept (%.2f s)",
        session.server,
        " (dry run)" if dry_run else "",
        result.examined,
        result.deleted,
        result.kept,
        time.monotonic() - started,
    )
    return result
