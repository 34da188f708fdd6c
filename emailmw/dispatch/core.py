"""The delivery core: every received email goes through one object, under one lock.

:class:`DeliveryCore` owns all the state that decides what is delivered and
when: the admission policy (signatures, replay, allowed senders), the memory
of recent ``Message-ID`` values (duplicates), the per-publisher order
(:class:`~emailmw.dispatch.ordering.PublicationOrder`) with its deadlines, and
the routes to subscriptions, servers and clients (the handlers). Two paths
feed it, and both take the same lock:

* the polling thread (:class:`~emailmw.dispatch.polling.PollingManager`): what
  the receiver returns, and the expiry of held messages at their deadline;
* the intraprocess receiver, which dispatches in the sender's thread when it can.

So a message released by an expiry and one dispatched inline can never
overtake each other. Whenever a dispatch makes the earliest deadline earlier
than the one the polling thread sleeps on, the core wakes it (the receiver's
``interrupt``), so no expiry is late.

History (``Subscription(..., history=N)``): the subscription is registered
first, so it gets every message dispatched from then on; then the receiver
reads the topic's last ``N`` messages up to its position (every message after
them is dispatched later), and :meth:`DeliveryCore.deliver_history` hands them
to that subscription alone, under the lock, before what it got live meanwhile:

* a message that came live meanwhile is not given twice (the subscription
  compares publisher and Source-Timestamp; not the Message-ID memory, which
  would take it from the other subscriptions too);
* one the receiver returned but that is not dispatched yet (not in the
  Message-ID memory), or that the order holds, comes live instead;
* one whose predecessor the order has not released (it is still on its way
  through the mail system) is held in the order for this subscription only and
  released after the predecessor, or when the window passes.

Lock order: the intraprocess receiver's dispatch lock, then this core's lock,
then an entity's lock. Entities never call the core while holding their own
lock, and no user code runs under any of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from emailmw.dispatch.handlers import (
    HistorySink,
    MessageSink,
    Release,
    RequestSink,
    ResponseSink,
    ServiceHandler,
    SubscriptionHandler,
)
from emailmw.dispatch.ordering import PublicationOrder
from emailmw.info import Gid
from emailmw.security import AdmissionPolicy
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.data import EmailData
from emailmw.transport.receiver import History

__all__ = ["DEDUP_WINDOW", "DeliveryCore"]

logger = logging.getLogger(__name__)

#: How many recent Message-IDs are remembered to drop duplicates.
DEDUP_WINDOW = 10_000


class DeliveryCore:
    """Admission, duplicates, order, expiry and routing, under one lock.

    ``horizon_ns`` is the wall-clock time (ns) at which the receiver took its
    start position: predecessors published before it are never waited for.
    ``clock`` is the monotonic clock of the order's deadlines.
    """

    def __init__(
        self,
        stats: StatsCounters,
        *,
        reorder_window: float,
        horizon_ns: int,
        admission: AdmissionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._stats = stats
        self._admission = admission if admission is not None and admission.active else None
        self._order: PublicationOrder[Release] = PublicationOrder(
            reorder_window, horizon_ns=horizon_ns, clock=clock
        )
        self._subscriptions = SubscriptionHandler(stats, self._order, reorder_window)
        self._services = ServiceHandler(stats)
        self._handlers = (self._subscriptions, self._services)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._wake: Callable[[], None] | None = None
        self._sleeper: int | None = None  # thread id of whoever sleeps on the deadline
        self._armed: float | None = None  # the deadline it sleeps until (None: none)

    # -- routes -------------------------------------------------------------------------

    def register_subscription(self, topic_name: str, subscription: MessageSink) -> None:
        """Deliver messages on ``topic_name`` to ``subscription`` from now on."""
        with self._lock:
            self._subscriptions.register(topic_name, subscription)

    def watch_uids(self, topic_name: str, watcher: Callable[[int], None]) -> None:
        """Tell ``watcher`` the IMAP UID of every message on ``topic_name`` as it is
        dispatched, before the order may hold it (a durable subscription's position
        must not pass a message still held)."""
        with self._lock:
            self._subscriptions.watch_uids(topic_name, watcher)

    def unwatch_uids(self, topic_name: str, watcher: Callable[[int], None]) -> None:
        """Stop telling ``watcher``."""
        with self._lock:
            self._subscriptions.unwatch_uids(topic_name, watcher)

    def unregister_subscription(self, topic_name: str, subscription: MessageSink) -> None:
        """Stop delivering to ``subscription``."""
        with self._lock:
            self._subscriptions.unregister(topic_name, subscription)

    def register_service_server(self, service_name: str, server: RequestSink) -> None:
        """Deliver requests for ``service_name`` to ``server`` from now on."""
        with self._lock:
            self._services.register_server(service_name, server)

    def unregister_service_server(self, service_name: str, server: RequestSink) -> None:
        """Stop delivering to ``server``."""
        with self._lock:
            self._services.unregister_server(service_name, server)

    def register_service_client(self, gid: Gid, client: ResponseSink) -> bool:
        """Deliver responses addressed to ``gid`` to ``client``; False if the GID is taken."""
        with self._lock:
            return self._services.register_client(gid, client)

    def unregister_service_client(self, gid: Gid) -> None:
        """Stop delivering responses addressed to ``gid``."""
        with self._lock:
            self._services.unregister_client(gid)

    # -- delivering -----------------------------------------------------------------------

    def dispatch_batch(self, emails: list[EmailData]) -> None:
        """Count and dispatch received emails, in order (any thread)."""
        with self._lock:
            self._stats.add("received", len(emails))
            for email in emails:
                self._dispatch(email)
            wake = self._deadline_moved()
        if wake is not None:
            wake()

    def deliver_history(self, topic_name: str, subscription: HistorySink, history: History) -> None:
        """Hand ``emails``, the history read for a subscription registered before it
        was read, to that subscription only (see "History" in the module docstring).

        Admission applies (senders, signature, age) but not the Message-ID memories:
        these emails may have been dispatched before, or be about to be.
        """
        with self._lock:
            admitted: list[EmailData] = []
            for email in history.emails:
                if email.message_id in history.in_flight and email.message_id not in self._seen:
                    continue  # received but not dispatched yet: it comes live
                if self._admission is not None:
                    reason = self._admission.check(email, replay=False)
                    if reason is not None:
                        self._stats.drop(reason)
                        logger.warning(
                            "history: dropping email %s from %r: %s",
                            email.message_id[:100],
                            email.from_[:100],
                            reason.value,
                        )
                        continue
                admitted.append(email)
            messages = self._subscriptions.history(topic_name, subscription, admitted)
            try:
                self._stats.add("delivered", subscription._push_history(messages))
            except Exception:
                logger.exception("subscription %r failed to take its history", subscription)
            wake = self._deadline_moved()
        if wake is not None:
            wake()

    def dispatch(self, email: EmailData) -> None:
        """Dispatch one email (see :meth:`dispatch_batch`)."""
        self.dispatch_batch([email])

    def expire(self) -> None:
        """Deliver what was held past its deadline, giving up the gaps."""
        with self._lock:
            self._subscriptions.expire()

    # -- sleeping on the deadline -------------------------------------------------------------

    def bind_wake(self, wake: Callable[[], None], sleeper: threading.Thread | None) -> None:
        """Call ``wake`` when a dispatch in another thread than ``sleeper`` makes the
        earliest deadline earlier than the one ``sleeper`` sleeps on."""
        with self._lock:
            self._wake = wake
            self._sleeper = None if sleeper is None else sleeper.ident

    def arm(self) -> float | None:
        """The earliest deadline (monotonic seconds), or None; the caller sleeps until it."""
        with self._lock:
            self._sleeper = threading.get_ident()
            self._armed = self._order.next_deadline()
            return self._armed

    def next_deadline(self) -> float | None:
        """The earliest deadline (monotonic seconds), or None."""
        with self._lock:
            return self._order.next_deadline()

    @property
    def held_count(self) -> int:
        """How many messages are held back now, waiting for an earlier one."""
        with self._lock:
            return self._order.held_count

    @property
    def stream_count(self) -> int:
        """How many publisher streams the order tracks now."""
        with self._lock:
            return self._order.stream_count

    # -- internal -------------------------------------------------------------------------

    def _deadline_moved(self) -> Callable[[], None] | None:
        """The wake-up to call (outside the lock) if the sleeper sleeps too long now."""
        deadline = self._order.next_deadline()  # None at once when nothing is held
        if deadline is None or (self._armed is not None and deadline >= self._armed):
            return None
        if self._wake is None or threading.get_ident() == self._sleeper:
            return None
        self._armed = deadline
        return self._wake

    def _dispatch(self, email: EmailData) -> None:
        message_id = email.message_id
        if self._admission is not None:
            reason = self._admission.check(email)
            if reason is not None:
                self._stats.drop(reason)
                logger.warning(
                    "dropping email %s from %r: %s",
                    message_id[:100],
                    email.from_[:100],
                    reason.value,
                )
                return
        if message_id:
            seen = self._seen
            if message_id in seen:
                self._stats.drop(DropReason.DUPLICATE)
                logger.debug("dropping duplicate %s", message_id)
                return
            seen[message_id] = None
            if len(seen) > DEDUP_WINDOW:
                seen.popitem(last=False)
        for handler in self._handlers:
            try:
                if handler.handle(email):
                    return  # one email, one owner: it is delivered (or counted) once
            except Exception:
                logger.exception("handler %r failed on email %s", handler, message_id[:100])
        self._stats.drop(DropReason.UNMATCHED)
        logger.debug(
            "no subscription, server or client for email %s (subject %r)",
            message_id[:100],
            email.content.subject[:80],
        )
