"""Durable subscriptions: where one is in the folder, and what it already handled.

A :class:`DurableCursor` belongs to one ``Subscription(..., durable=NAME)``. It
holds the name (:meth:`StateStore.claim <emailmw.state_store.StateStore.claim>`)
and tracks, by IMAP UID, the messages on its topic:

* *read*: the receiver dispatched it (the delivery core tells the cursor before
  the per-publisher order may hold it back), or it was read back from the
  folder after a restart;
* *handled*: returned by ``get_message()``/iteration, or its callback returned.
  Its Message-ID and the new position are committed to the state store at once.

The position is the last UID up to which every message read was handled (or
dropped): the smallest UID still waiting, minus one, or the largest UID
handled when nothing is waiting. A message held back by the order therefore
keeps the position behind it. After a restart the subscription asks the receiver
for every message on its topic after the position
(:meth:`EmailReceiver.backlog <emailmw.transport.receiver.EmailReceiver.backlog>`)
and drops those whose Message-ID it handled already (counted as
``duplicate``). So a clean stop loses nothing and repeats nothing, and a crash
repeats at most what was handled but not yet committed: the one message being
handed over when the process died.

A message the subscription's queue overflowed (``queue_full``) is no longer
waited for. After a UIDVALIDITY change (the folder was recreated) the position
means nothing: every message of the topic in the folder is read back and the
handled Message-IDs decide (counted in ``resyncs``).
"""

from __future__ import annotations

import heapq
import logging
import threading
import weakref
from collections.abc import Callable

from emailmw.info import MessageInfo
from emailmw.state_store import HANDLED_KEPT, DurableClaim, StateStore
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.data import EmailData
from emailmw.transport.receiver import Backlog, History

logger = logging.getLogger(__name__)

__all__ = ["DurableCursor"]


class DurableCursor:
    """The position and handled Message-IDs of the durable subscription ``name``."""

    def __init__(self, store: StateStore, name: str, topic: str, stats: StatsCounters) -> None:
        claim, record = store.claim(name, topic)
        self._claim: DurableClaim | None = claim
        self._record = record
        self._store = store
        self._stats = stats
        self.name = name
        self.topic = topic
        self._lock = threading.Lock()
        self._uidvalidity = record.uidvalidity
        self._position = record.position
        # the newest HANDLED_KEPT Message-IDs handled, oldest first
        self._handled: dict[str, None] = dict.fromkeys(record.handled)
        # the UIDs read, not yet handled or dropped: a set, and a heap of them (lazily
        # cleaned) for the smallest
        self._waiting_uids: set[int] = set()
        self._waiting: list[int] = []
        self._largest_handled = record.position
        self._watcher: Callable[[int], None] | None = None

    @property
    def read_watcher(self) -> Callable[[int], None]:
        """:meth:`read`, holding this cursor weakly (for the delivery core: a
        subscription dropped without ``close()`` must let its name go)."""
        watcher = self._watcher
        if watcher is None:
            ref = weakref.ref(self)

            def read(uid: int) -> None:
                cursor = ref()
                if cursor is not None:
                    cursor.read(uid)

            watcher = self._watcher = read
        return watcher

    @property
    def position(self) -> int:
        """The last UID up to which every message read on the topic was handled (or dropped)."""
        return self._position

    @property
    def uidvalidity(self) -> int | None:
        """The folder's UIDVALIDITY the position belongs to (``None``: not known yet)."""
        return self._uidvalidity

    @property
    def is_new(self) -> bool:
        """True when nothing was stored for the name before."""
        return self._record.uidvalidity is None and not self._record.handled

    def catch_up(self, backlog: Backlog) -> History:
        """What to give the subscription first, from ``backlog`` (what the receiver read
        again after the stored position): those not handled already."""
        emails: list[EmailData] = []
        duplicates = 0
        with self._lock:
            for email in backlog.emails:
                if email.message_id in self._handled:
                    duplicates += 1
                else:
                    emails.append(email)
            restart = self._uidvalidity is None or backlog.resync
            if restart:
                # a new name starts at the receiver's position; after a resync the
                # recreated folder's UIDs start again, and the backlog holds them all
                self._position = 0 if backlog.resync else backlog.position
                self._largest_handled = self._position
                self._waiting_uids.clear()
                self._waiting.clear()
            self._uidvalidity = backlog.uidvalidity
            position = self._position
            for email in emails:  # waited for until handled
                if email.uid > position and email.uid not in self._waiting_uids:
                    self._waiting_uids.add(email.uid)
                    heapq.heappush(self._waiting, email.uid)
        if backlog.resync:
            self._stats.add("resyncs")
            logger.warning(
                "durable subscription %r: the folder was recreated (UIDVALIDITY %s -> %s); "
                "read its %d message(s) on %r again, %d of them handled already",
                self.name,
                self._record.uidvalidity,
                backlog.uidvalidity,
                len(backlog.emails),
                self.topic[:80],
                duplicates,
            )
        if duplicates:
            self._stats.drop(DropReason.DUPLICATE, duplicates)
        if restart:
            self._store.save_position(self.name, self.topic, backlog.uidvalidity, position)
        logger.info(
            "durable subscription %r on %r: %d message(s) to catch up after UID %d",
            self.name,
            self.topic[:80],
            len(emails),
            position,
        )
        return History(emails, backlog.in_flight)

    def read(self, uid: int) -> None:
        """The receiver read the message with IMAP UID ``uid`` on the topic (it may be
        held in the order before it is queued): the position waits for it until it is
        handled or dropped. Idempotent."""
        if uid <= 0:
            return
        with self._lock:
            if uid > self._position and uid not in self._waiting_uids:
                self._waiting_uids.add(uid)
                heapq.heappush(self._waiting, uid)

    def dropped(self, info: MessageInfo) -> None:
        """A message read was dropped (queue overflow, invalid): no longer waited for."""
        with self._lock:
            self._forget(info._uid)

    def handled(self, info: MessageInfo) -> None:
        """A message was handed to the user: record it (one commit)."""
        message_id = info._message_id
        with self._lock:
            if self._claim is None:  # closed: not recorded, it comes again next time
                return
            self._forget(info._uid)
            self._largest_handled = max(self._largest_handled, info._uid)
            waiting = self._waiting
            position = waiting[0] - 1 if waiting else self._largest_handled
            self._position = max(self._position, position)
            if message_id:
                handled = self._handled
                handled[message_id] = None
                if len(handled) > HANDLED_KEPT:
                    del handled[next(iter(handled))]
            position = self._position
            uidvalidity = self._uidvalidity
        if message_id:
            self._store.add_handled(self.name, self.topic, message_id, uidvalidity, position)

    def close(self) -> None:
        """Let the name go (what was handled is committed already). Idempotent."""
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()

    def _forget(self, uid: int) -> None:
        self._waiting_uids.discard(uid)
        waiting = self._waiting
        while waiting and waiting[0] not in self._waiting_uids:
            heapq.heappop(waiting)
