"""Message authentication and admission: signatures, replay protection, allowed senders.

Signing
    With a key configured (``email.signing-key``, ``email.signing-key-file`` or
    ``$EMAILMW_SIGNING_KEY``), the context wraps its sender in a
    :class:`~emailmw.transport.signing.SigningSender`: every message, request
    and response carries an ``Emailmw-Signature`` header (what it covers is
    described in :mod:`emailmw.transport.signing`, which this module
    re-exports: :func:`compute_signature`, :func:`sign_email`,
    :func:`verify_signature`).

Admission (:class:`AdmissionPolicy`), applied to every received email before
it is dispatched:
    * ``allowed-senders``: the ``From`` address must be listed, or its domain
      (``example.com`` or ``@example.com``). Without signing this only stops
      honest mistakes: ``From`` is trivially forged.
    * with a key: an unsigned email is dropped (``unsigned``), a wrong MAC is
      dropped (``bad_signature``), and so is a replay (``replay``): a
      ``Message-ID`` accepted before, or a ``Source-Timestamp`` older than
      ``max-age`` (or more than :data:`MAX_CLOCK_SKEW` seconds in the future).
      Accepted ids are remembered until they are too old to pass the age check,
      up to :data:`REPLAY_MEMORY_CAPACITY` of them; while that memory is full a
      new email is refused (``replay_memory_full``), never an id forgotten early.

Across restarts
    Given a :class:`ReplayJournal` (the context gives its state store's replay slot
    for the account and mailbox), the replay memory takes the journal's salt, starts
    with the digests it holds that have not expired, and writes every digest it
    accepts to it: in batches, from a thread of its own, at most
    :data:`REPLAY_FLUSH_INTERVAL` seconds after acceptance, and at :meth:`close
    <AdmissionPolicy.close>`. A process killed in between forgets what it accepted
    in that last interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from hashlib import blake2b
from typing import Protocol

from emailmw.info import HEADER_SOURCE_TIMESTAMP, Timestamp
from emailmw.stats import DropReason
from emailmw.transport.data import EmailData
from emailmw.transport.signing import (
    SIGNATURE_HEADER,
    compute_signature,
    sign_email,
    verify_signature,
)

__all__ = [
    "MAX_CLOCK_SKEW",
    "REPLAY_FLUSH_INTERVAL",
    "REPLAY_MEMORY_CAPACITY",
    "SIGNATURE_HEADER",
    "AdmissionPolicy",
    "ReplayJournal",
    "compute_signature",
    "sign_email",
    "verify_signature",
]

logger = logging.getLogger(__name__)

#: Seconds a Source-Timestamp may lie in the future (clock skew between hosts).
MAX_CLOCK_SKEW = 300.0
#: The most Message-IDs one process remembers against replays (about 8 to 10 bytes
#: each: see docs/security.md). While full, new signed emails are refused.
REPLAY_MEMORY_CAPACITY = 2_000_000
_FULL_LOG_EVERY = 60.0  # seconds between WARNINGs while the replay memory stays full
#: The longest a digest accepted by a replay memory with a journal waits before it is
#: written to the journal (seconds).
REPLAY_FLUSH_INTERVAL = 1.0


class ReplayJournal(Protocol):
    """Where a replay memory keeps its digests across restarts (implemented by the
    state store's :class:`~emailmw.state_store.ReplaySlot`)."""

    @property
    def salt(self) -> bytes:
        """The salt of the digests (the same for every process that uses the journal)."""

    def load(self, now: float) -> list[tuple[float, array[int]]]:
        """The digests not expired at ``now``: (expiry time, digests), oldest first."""

    def write(self, batches: list[tuple[float, array[int]]], now: float) -> None:
        """Add ``batches`` of (expiry time, digests); may raise on a storage failure."""

    def release(self) -> None:
        """Give the journal up (nothing is written afterwards)."""


def _normalize_sender(entry: str) -> str:
    return entry.strip().lower()


class _ReplayMemory:
    """Digests of accepted Message-IDs, each kept ``retention`` seconds after it was
    accepted (the caller serializes every call).

    A digest is 8 bytes of BLAKE2b keyed with a per-process random salt (no one can
    aim a collision at it). New digests go into a small *hot* set; every
    ``retention / 16`` seconds (or when the hot set reaches 1/16 of the capacity) it is
    frozen into a sorted ``array('Q')`` (8 bytes an id) that expires as a whole once
    the last id in it is ``retention`` old. A lookup is one set probe plus a binary
    search in each frozen array (at most about 33 of them).
    """

    _SLICES = 16

    def __init__(
        self, retention: float, capacity: int, now: float, salt: bytes | None = None
    ) -> None:
        self._retention = retention
        self._width = max(retention / self._SLICES, 1.0)
        self._hot_limit = max(capacity // self._SLICES, 1)
        self._salt = os.urandom(16) if salt is None else salt
        self._hot: set[int] = set()
        self._hot_end = now + self._width
        # (forget after this time, sorted digests), oldest first
        self._frozen: deque[tuple[float, array[int]]] = deque()
        self._size = 0
        # accepted, not yet written to the journal: (expiry, digests), oldest first;
        # None without a journal
        self._unwritten: list[tuple[float, array[int]]] | None = None

    def preload(self, groups: list[tuple[float, array[int]]]) -> None:
        """Remember ``groups`` (from a journal: expiry time and digests, oldest first),
        frozen into sorted arrays of at most the hot set's size each (so that sorting
        one takes little memory), before anything is added. Empties ``groups`` as it
        goes, so that each group is freed once it is frozen."""
        groups.reverse()
        while groups:
            expires, digests = groups.pop()
            for start in range(0, len(digests), self._hot_limit):
                piece = array("Q", sorted(digests[start : start + self._hot_limit]))
                self._frozen.append((expires, piece))
                self._size += len(piece)
            del digests

    def track_unwritten(self) -> None:
        """Keep what :meth:`add` accepts for :meth:`take_unwritten` from now on."""
        self._unwritten = []

    def take_unwritten(self) -> list[tuple[float, array[int]]]:
        """What was accepted since the last call (expiry time, digests), oldest first."""
        unwritten = self._unwritten
        if not unwritten:
            return []
        self._unwritten = []
        return unwritten

    def stop_tracking(self) -> None:
        """Keep nothing more for the journal (it is closed)."""
        self._unwritten = None

    def give_back_unwritten(self, batches: list[tuple[float, array[int]]]) -> None:
        """Put ``batches`` (taken, then not written) back before what came since."""
        if self._unwritten is not None:
            self._unwritten[:0] = batches

    def __len__(self) -> int:
        return self._size

    def digest(self, message_id: str) -> int:
        """The digest of ``message_id`` (computable without the caller's lock)."""
        data = message_id.encode("utf-8", "surrogatepass")
        return int.from_bytes(blake2b(data, digest_size=8, key=self._salt).digest(), "big")

    def expire(self, now: float) -> None:
        """Freeze the hot set when its slice of time is over; forget expired slices."""
        if now >= self._hot_end:
            self._freeze()
            self._hot_end = now + self._width
        frozen = self._frozen
        while frozen and frozen[0][0] < now:
            self._size -= len(frozen.popleft()[1])

    def _freeze(self) -> None:
        if self._hot:
            # every id in the hot set was accepted before _hot_end (expire() runs first)
            self._frozen.append((self._hot_end + self._retention, array("Q", sorted(self._hot))))
            self._hot = set()

    def __contains__(self, digest: int) -> bool:
        if digest in self._hot:
            return True
        for _, ids in self._frozen:
            index = bisect_left(ids, digest)
            if index < len(ids) and ids[index] == digest:
                return True
        return False

    def add(self, digest: int) -> bool:
        """Remember ``digest`` (accepted now, after :meth:`expire`). True if it is the
        first digest waiting to be written to the journal."""
        self._hot.add(digest)
        self._size += 1
        first = False
        unwritten = self._unwritten
        if unwritten is not None:
            expires = self._hot_end + self._retention  # when its slice will expire
            if not unwritten or unwritten[-1][0] != expires:
                first = not unwritten
                unwritten.append((expires, array("Q")))
            unwritten[-1][1].append(digest)
        if len(self._hot) >= self._hot_limit:
            self._freeze()
        return first

    @property
    def slices(self) -> int:
        """How many frozen arrays a lookup searches (for tests and benchmarks)."""
        return len(self._frozen)


class AdmissionPolicy:
    """Decides whether a received email may be dispatched.

    :meth:`check` returns ``None`` to admit, or the :class:`DropReason`.
    Thread-safe.

    Replays (with a key): every accepted Message-ID is remembered until an email
    with it would be refused for its age anyway (``max-age`` +
    :data:`MAX_CLOCK_SKEW` after it was accepted), so a fresh, never-seen email
    within ``max-age`` is never refused as a replay. At most ``capacity`` ids
    (default :data:`REPLAY_MEMORY_CAPACITY`) are remembered; while the memory is
    full, new emails are refused (``replay_memory_full``, logged at WARNING)
    rather than any id forgotten early. ``clock`` (seconds since the epoch,
    default :func:`time.time`) is the wall clock that ages are measured with.

    ``journal`` (with a key): the replay memory starts with the journal's digests
    and salt, and writes what it accepts to it from a thread of its own
    (``emailmw-replay``), at most :data:`REPLAY_FLUSH_INTERVAL` seconds later.
    The policy owns the journal from then on (also if this constructor raises):
    :meth:`close` writes the rest and releases it.
    """

    def __init__(
        self,
        key: bytes | None = None,
        *,
        max_age: float = 24 * 3600.0,
        allowed_senders: Iterable[str] = (),
        capacity: int | None = None,
        clock: Callable[[], float] = time.time,
        journal: ReplayJournal | None = None,
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
        self._clock = clock
        self._capacity = REPLAY_MEMORY_CAPACITY if capacity is None else capacity
        if self._capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self._capacity}")
        self._refused_full = 0  # refused since the memory last had room
        self._full_logged_at: float | None = None
        self._lock = threading.Lock()
        self._journal = journal
        self._unwritten_ready = threading.Event()  # something waits to be written
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None
        now = clock()
        if journal is None:
            self._memory = _ReplayMemory(max_age + MAX_CLOCK_SKEW, self._capacity, now)
            return
        try:
            if key is None:
                raise ValueError("a replay journal needs a signing key")
            self._memory = _ReplayMemory(
                max_age + MAX_CLOCK_SKEW, self._capacity, now, salt=journal.salt
            )
            self._memory.preload(journal.load(now))
        except BaseException:
            journal.release()
            raise
        self._memory.track_unwritten()
        logger.info(
            "replay memory: %d signed email(s) accepted before remembered from %s",
            len(self._memory),
            journal,
        )
        self._writer = threading.Thread(target=self._write_loop, name="emailmw-replay", daemon=True)
        self._writer.start()

    @property
    def active(self) -> bool:
        """True if this policy can drop anything."""
        return self._key is not None or bool(self._addresses or self._domains)

    @property
    def remembered(self) -> int:
        """How many Message-IDs the replay memory holds now."""
        with self._lock:
            return len(self._memory)

    @property
    def capacity(self) -> int:
        """The most Message-IDs the replay memory holds."""
        return self._capacity

    def check(self, email: EmailData, *, replay: bool = True) -> DropReason | None:
        """Admit ``email`` (``None``) or say why it must be dropped.

        ``replay=False`` (a message read again from the mailbox for a subscription's
        history, which may have been accepted before): the sender, the signature and
        the age are checked, but the Message-ID is neither looked up nor remembered.
        """
        if (self._addresses or self._domains) and not self._sender_allowed(email.from_):
            return DropReason.SENDER_NOT_ALLOWED
        if self._key is None:
            return None
        valid = verify_signature(email, self._key)
        if valid is None:
            return DropReason.UNSIGNED
        if not valid:
            return DropReason.BAD_SIGNATURE
        if not replay:
            return self._check_age(email)
        return self._check_replay(email)

    def _check_age(self, email: EmailData) -> DropReason | None:
        text = email.headers.get(HEADER_SOURCE_TIMESTAMP)
        stamp = Timestamp.from_string(text) if text is not None else None
        if stamp is None:
            return DropReason.REPLAY  # freshness cannot be shown
        age = self._clock() - stamp.nanoseconds / 1e9
        if age > self._max_age or age < -MAX_CLOCK_SKEW:
            return DropReason.REPLAY
        return None

    def _sender_allowed(self, sender: str) -> bool:
        address = _normalize_sender(sender)
        if address in self._addresses:
            return True
        return address.rpartition("@")[2] in self._domains

    def _check_replay(self, email: EmailData) -> DropReason | None:
        text = email.headers.get(HEADER_SOURCE_TIMESTAMP)
        stamp = Timestamp.from_string(text) if text is not None else None
        if not email.message_id or stamp is None:
            return DropReason.REPLAY  # freshness cannot be shown
        digest = self._memory.digest(email.message_id)
        with self._lock:
            now = self._clock()
            age = now - stamp.nanoseconds / 1e9
            if age > self._max_age or age < -MAX_CLOCK_SKEW:
                return DropReason.REPLAY
            memory = self._memory
            memory.expire(now)
            if digest in memory:
                return DropReason.REPLAY
            if len(memory) >= self._capacity:
                self._refuse_full(now)
                return DropReason.REPLAY_MEMORY_FULL
            if memory.add(digest):
                self._unwritten_ready.set()
            if self._refused_full:
                logger.warning(
                    "the replay memory has room again; %d new signed email(s) were refused "
                    "while it was full",
                    self._refused_full,
                )
                self._refused_full = 0
                self._full_logged_at = None
        return None

    @property
    def persistent(self) -> bool:
        """True if the replay memory is written to a journal (it survives a restart)."""
        return self._writer is not None

    def close(self) -> None:
        """Write what the replay memory accepted and has not written yet to the journal,
        and release the journal. Idempotent; without a journal it does nothing. The
        policy still admits afterwards, remembering in memory only."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._closing.set()
        self._unwritten_ready.set()
        writer.join(timeout=10.0)
        if writer.is_alive():
            logger.warning("the replay memory's writer did not finish within 10 s")
        with self._lock:
            self._memory.stop_tracking()
        assert self._journal is not None
        self._journal.release()

    def _write_loop(self) -> None:
        """The ``emailmw-replay`` thread: write what was accepted, in batches."""
        failing = False
        while True:
            self._unwritten_ready.wait()  # idle: no wake-ups
            closing = self._closing.wait(REPLAY_FLUSH_INTERVAL)  # gather a batch
            self._unwritten_ready.clear()
            failing = self._write_unwritten(failing, closing)
            if closing:
                return

    def _write_unwritten(self, failing: bool, closing: bool) -> bool:
        """Write what was accepted since the last write; True if that failed."""
        journal = self._journal
        assert journal is not None
        with self._lock:
            batches = self._memory.take_unwritten()
        if not batches:
            return failing
        try:
            journal.write(batches, self._clock())
        except Exception as exc:
            count = sum(len(digests) for _, digests in batches)
            if closing:
                logger.error(
                    "cannot write the replay memory to %s: %s; the last %d signed email(s) "
                    "accepted are forgotten when this process stops",
                    journal,
                    exc,
                    count,
                )
                return True
            now = self._clock()
            with self._lock:  # retried at the next write; the expired ones need not be
                self._memory.give_back_unwritten([b for b in batches if b[0] >= now])
            self._unwritten_ready.set()
            if not failing:
                logger.warning(
                    "cannot write the replay memory to %s: %s; retrying every %g s (a restart "
                    "meanwhile forgets the signed emails accepted since)",
                    journal,
                    exc,
                    REPLAY_FLUSH_INTERVAL,
                )
            return True
        if failing:
            logger.warning("the replay memory is written to %s again", journal)
        return False

    def _refuse_full(self, now: float) -> None:
        """Count and log (at most once a minute) a refusal for a full memory (lock held)."""
        self._refused_full += 1
        if self._full_logged_at is None or now - self._full_logged_at >= _FULL_LOG_EVERY:
            self._full_logged_at = now
            logger.warning(
                "the replay memory is full (%d Message-IDs, each kept max-age %g s + %g s "
                "of clock skew): refusing new signed emails (%d so far) until the oldest "
                "expire; lower max-age or the sending rate",
                self._capacity,
                self._max_age,
                MAX_CLOCK_SKEW,
                self._refused_full,
            )
