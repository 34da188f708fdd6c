"""Handlers: route each received email by its headers to the entities that want it.

* A **message** carries ``Publisher-GID`` and no ``In-Reply-To``: it goes to
  every subscription on its subject (the topic).
* A **service request** carries ``Client-GID`` and ``Request-Sequence-Number``
  and no ``In-Reply-To``: it goes to every server of its subject (the service).
* A **service response** carries the same two headers and ``In-Reply-To``: it
  goes to the one client whose GID is ``Client-GID``, and only that one.

An email that carries our headers with values that do not parse is logged and
counted as malformed; one that carries none of them is not for these handlers.

Routes hold entities weakly: an entity that is garbage-collected without
``close()`` is no longer routed to. Its weak reference marks the handler
(``_dead_routes``, a plain flag: the collection may happen in any thread, even
one that holds the core's lock) and the handler prunes its routes the next
time it is used, under the core's lock.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from emailmw.dispatch.ordering import PublicationOrder
from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_MESSAGE_TYPE,
    HEADER_PREVIOUS_NUMBER,
    HEADER_PREVIOUS_TIMESTAMP,
    HEADER_PUBLICATION_NUMBER,
    HEADER_PUBLISHER_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SOURCE_TIMESTAMP,
    NO_HEADERS,
    Gid,
    MessageInfo,
    ServiceInfo,
    Timestamp,
    parse_sequence_number,
)
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.data import EmailData

__all__ = [
    "EmailHandler",
    "HistorySink",
    "MessageSink",
    "Release",
    "RequestSink",
    "ResponseSink",
    "ServiceHandler",
    "SubscriptionHandler",
]

logger = logging.getLogger(__name__)

#: Default of how long a message that overtook an earlier one of its publisher
#: is held back, waiting for the earlier one (seconds; config key ``reorder-window``).
REORDER_WINDOW = 5.0


#: A message as the order holds it: body, ``Message-Type`` header, metadata.
Message = tuple[str, "str | None", MessageInfo]

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class _ForOne:
    """A history message held in the order for one subscription only."""

    message: Message
    subscription: weakref.ref[MessageSink]


#: What the order holds: a message for every subscription of its topic, or for one.
Release = Message | _ForOne


@dataclass(frozen=True, slots=True)
class _HistoryEntry:
    gid: int
    number: int  # 0: not numbered
    source_ns: int
    previous_number: int
    previous_ns: int | None
    message: Message


class MessageSink(Protocol):
    """What a subscription offers the subscription handler."""

    def _push_message(self, body: str, message_type: str | None, info: MessageInfo) -> bool:
        """Queue a message; False if the subscription refused it (already counted)."""
        ...


class HistorySink(MessageSink, Protocol):
    """What a subscription made with ``history=N`` offers the delivery core."""

    def _push_history(self, messages: list[Message]) -> int:
        """Queue the history before what came live meanwhile, leaving out what did;
        return how many were queued."""
        ...


class RequestSink(Protocol):
    """What a service server offers the service handler."""

    def _push_request(self, email: EmailData, info: ServiceInfo) -> bool:
        """Queue a request; False if the server refused it (already counted)."""
        ...


class ResponseSink(Protocol):
    """What a service client offers the service handler."""

    def _push_response(self, body: str, message_type: str | None, info: ServiceInfo) -> bool:
        """Keep a response; False if it was dropped (already counted)."""
        ...


class EmailHandler:
    """Base of the handlers: takes an email (True) or declines it (False).

    Handlers keep no lock of their own: :class:`~emailmw.dispatch.core.DeliveryCore`
    calls every method under its lock.
    """

    def __init__(self, stats: StatsCounters) -> None:
        self._stats = stats
        self._dead_routes = False

    def handle(self, email: EmailData) -> bool:
        """Route ``email``; return True if it was for this handler."""
        raise NotImplementedError

    @property
    def route_count(self) -> int:
        """How many entities are routed to (after pruning the collected ones)."""
        self._prune_if_needed()
        return self._count_routes()

    def _ref(self, entity: S) -> weakref.ref[S]:
        """A weak reference to ``entity`` that marks the routes dirty when it dies."""
        return weakref.ref(entity, self._route_died)

    def _route_died(self, _ref: weakref.ref[Any]) -> None:
        self._dead_routes = True  # no lock: see the module docstring

    def _prune_if_needed(self) -> None:
        if self._dead_routes:
            self._dead_routes = False  # before pruning: a death meanwhile sets it again
            self._prune()

    def _prune(self) -> None:
        """Drop the routes to collected entities."""

    def _count_routes(self) -> int:
        return 0

    def _malformed(self, email: EmailData, reason: str) -> bool:
        logger.warning(
            "dropping malformed email %s (subject %r): %s",
            email.message_id[:100],
            email.content.subject[:80],
            reason,
        )
        self._stats.drop(DropReason.MALFORMED)
        return True


class SubscriptionHandler(EmailHandler):
    """Routes messages to subscriptions by topic, in each publisher's order.

    Every numbered message (``Publication-Number``) is reported to the order,
    whether a subscription wants it or not, so that the order knows where each
    stream is when a subscription comes (see :mod:`emailmw.dispatch.ordering`).
    """

    def __init__(
        self,
        stats: StatsCounters,
        order: PublicationOrder[Release],
        reorder_window: float = REORDER_WINDOW,
    ) -> None:
        super().__init__(stats)
        self._order = order
        self._reorder_window = reorder_window
        self._subscriptions: dict[str, tuple[weakref.ref[MessageSink], ...]] = {}
        # durable subscriptions: told the UID of every message on their topic as it is
        # read, before the order may hold it (see emailmw.durable)
        self._uid_watchers: dict[str, tuple[Callable[[int], None], ...]] = {}

    def register(self, topic_name: str, subscription: MessageSink) -> None:
        """Deliver messages on ``topic_name`` to ``subscription`` from now on."""
        self._prune_if_needed()
        subs = self._subscriptions.get(topic_name, ())
        self._subscriptions[topic_name] = (*subs, self._ref(subscription))

    def watch_uids(self, topic_name: str, watcher: Callable[[int], None]) -> None:
        """Call ``watcher(uid)`` for each message on ``topic_name`` read from IMAP
        (before the order holds or releases it), until :meth:`unwatch_uids`."""
        self._uid_watchers[topic_name] = (*self._uid_watchers.get(topic_name, ()), watcher)

    def unwatch_uids(self, topic_name: str, watcher: Callable[[int], None]) -> None:
        """Stop calling ``watcher``."""
        left = tuple(w for w in self._uid_watchers.get(topic_name, ()) if w != watcher)
        if left:
            self._uid_watchers[topic_name] = left
        else:
            self._uid_watchers.pop(topic_name, None)

    def unregister(self, topic_name: str, subscription: MessageSink) -> None:
        """Stop delivering to ``subscription``."""
        self._prune_if_needed()
        subs = tuple(r for r in self._subscriptions.get(topic_name, ()) if r() is not subscription)
        if subs:
            self._subscriptions[topic_name] = subs
        else:
            self._subscriptions.pop(topic_name, None)

    def _prune(self) -> None:
        for topic, refs in list(self._subscriptions.items()):
            alive = tuple(r for r in refs if r() is not None)
            if alive:
                self._subscriptions[topic] = alive
            else:
                del self._subscriptions[topic]

    def _count_routes(self) -> int:
        return sum(len(refs) for refs in self._subscriptions.values())

    def handle(self, email: EmailData) -> bool:
        """Deliver a message to the subscriptions on its topic (False: nobody wants it)."""
        headers = email.headers
        gid_text = headers.get(HEADER_PUBLISHER_GID)
        if gid_text is None or email.in_reply_to:
            return False
        gid = Gid.from_string(gid_text)
        if gid is None:
            return self._malformed(email, f"bad {HEADER_PUBLISHER_GID} {gid_text[:40]!r}")
        stamp = _source_timestamp(email)
        if stamp is None:
            return self._malformed(email, f"missing or bad {HEADER_SOURCE_TIMESTAMP}")
        topic = email.content.subject
        if self._dead_routes:
            self._prune_if_needed()
        wanted = bool(self._subscriptions.get(topic))
        if email.uid and self._uid_watchers:
            for watcher in self._uid_watchers.get(topic, ()):
                watcher(email.uid)
        number_text = headers.get(HEADER_PUBLICATION_NUMBER)
        if number_text is None:  # not numbered (another implementation): as it comes
            if not wanted:
                return False
            self._deliver(topic, [self._message(email, stamp, gid, 2)])
            return True
        number = parse_sequence_number(number_text)
        if number is None or number < 1:
            return self._malformed(email, f"bad {HEADER_PUBLICATION_NUMBER} {number_text[:40]!r}")
        previous_text = headers.get(HEADER_PREVIOUS_TIMESTAMP)
        previous = None if previous_text is None else Timestamp.from_string(previous_text)
        if previous_text is not None and previous is None:
            return self._malformed(email, f"bad {HEADER_PREVIOUS_TIMESTAMP} {previous_text[:40]!r}")
        previous_number = number - 1
        previous_number_text = headers.get(HEADER_PREVIOUS_NUMBER)
        if previous_number_text is not None:
            parsed = parse_sequence_number(previous_number_text)
            if parsed is None or not 0 <= parsed < number:
                return self._malformed(
                    email, f"bad {HEADER_PREVIOUS_NUMBER} {previous_number_text[:40]!r}"
                )
            previous_number = parsed
        if wanted:
            own = 3 + (previous_text is not None) + (previous_number_text is not None)
            item = self._message(email, stamp, gid, own)
        else:
            item = None
        ready = self._order.add(
            topic,
            gid.value,
            number,
            previous_number=previous_number,
            previous_ns=None if previous is None else previous.nanoseconds,
            source_ns=stamp.nanoseconds,
            item=item,
        )
        if ready:
            self._deliver(topic, ready)
        return wanted

    def history(
        self, topic: str, subscription: MessageSink, emails: list[EmailData]
    ) -> list[Message]:
        """Sort ``emails``, a topic's history read again from the mailbox for the
        newly registered ``subscription``, and return what it gets now, oldest first:
        by ``Source-Timestamp``, each publisher's own in ``Publication-Number`` order.

        Left out: a message the order holds (it is released to the subscription with
        the live ones), and one whose predecessor the order has not released yet (it
        is still on its way: the message is held for this subscription alone and
        released after it, or when the window passes). Malformed ones are counted.
        """
        entries: list[_HistoryEntry] = []
        for email in emails:
            entry = self._history_entry(email)
            if entry is not None:
                entries.append(entry)
        entries.sort(key=lambda e: (e.source_ns, e.gid, e.number))
        # each publisher's messages in number order, in the places its messages take
        by_publisher: dict[int, list[_HistoryEntry]] = {}
        for entry in entries:
            by_publisher.setdefault(entry.gid, []).append(entry)
        for mine in by_publisher.values():
            mine.sort(key=lambda e: (e.number, e.source_ns), reverse=True)
        ordered = [by_publisher[entry.gid].pop() for entry in entries]
        order = self._order
        now: list[Message] = []
        later: set[tuple[int, int, int]] = set()  # (gid, number, stamp) held for it
        target = weakref.ref(subscription)
        for entry in ordered:
            if entry.number == 0:  # not numbered (another implementation): as it comes
                now.append(entry.message)
                continue
            if order.is_held(topic, entry.gid, entry.number, entry.source_ns):
                continue  # released with the live ones, to every subscription
            previous = (entry.gid, entry.previous_number, entry.previous_ns or 0)
            if (entry.previous_ns is not None and previous in later) or order.waits(
                topic,
                entry.gid,
                previous_number=entry.previous_number,
                previous_ns=entry.previous_ns,
            ):
                later.add((entry.gid, entry.number, entry.source_ns))
                order.hold(
                    topic,
                    entry.gid,
                    entry.number,
                    previous_number=entry.previous_number,
                    previous_ns=entry.previous_ns,
                    source_ns=entry.source_ns,
                    item=_ForOne(entry.message, target),
                )
                continue
            now.append(entry.message)
        return now

    def _history_entry(self, email: EmailData) -> _HistoryEntry | None:
        headers = email.headers
        gid_text = headers.get(HEADER_PUBLISHER_GID)
        if gid_text is None or email.in_reply_to:
            return None
        gid = Gid.from_string(gid_text)
        stamp = _source_timestamp(email)
        number_text = headers.get(HEADER_PUBLICATION_NUMBER)
        number = 0 if number_text is None else parse_sequence_number(number_text)
        previous_text = headers.get(HEADER_PREVIOUS_TIMESTAMP)
        previous = None if previous_text is None else Timestamp.from_string(previous_text)
        previous_number_text = headers.get(HEADER_PREVIOUS_NUMBER)
        previous_number = (
            (None if number is None else number - 1)
            if previous_number_text is None
            else parse_sequence_number(previous_number_text)
        )
        if (
            gid is None
            or stamp is None
            or number is None
            or number < 0
            or previous_number is None
            or (previous_text is not None and previous is None)
        ):
            self._malformed(email, "bad metadata headers (history)")
            return None
        own = 2 + sum(
            text is not None for text in (number_text, previous_text, previous_number_text)
        )
        return _HistoryEntry(
            gid.value,
            number,
            stamp.nanoseconds,
            max(previous_number, 0),
            None if previous is None else previous.nanoseconds,
            self._message(email, stamp, gid, own),
        )

    def expire(self) -> None:
        """Deliver what was held back longer than the window, giving up the gaps."""
        for topic, ready in self._order.expire():
            if not ready:
                continue
            logger.warning(
                "%d message(s) on %r waited %.1f s for an earlier one of their publisher "
                "that did not arrive; delivering them",
                len(ready),
                topic[:80],
                self._reorder_window,
            )
            self._deliver(topic, ready)

    def _message(self, email: EmailData, stamp: Timestamp, gid: Gid, own: int) -> Message:
        """The message as the order holds it. ``own``: how many of emailmw's headers
        the email is known to carry; with no other header, the info keeps none (a
        queued message then holds no reference to the email's headers)."""
        headers = email.headers
        message_type = headers.get(HEADER_MESSAGE_TYPE)
        if message_type is not None:
            own += 1
        extra = headers if len(headers) > own else NO_HEADERS
        now = time.time_ns()
        self._stats.delivery_latency.observe((now - stamp.nanoseconds) / 1e9)
        info = MessageInfo(stamp, Timestamp(now), gid, extra, email.message_id, email.uid)
        return (email.content.body, message_type, info)

    def _deliver(self, topic: str, ready: list[Release]) -> None:
        routes = self._subscriptions.get(topic, ())
        for entry in ready:
            if isinstance(entry, _ForOne):  # history held for one subscription
                one = entry.subscription()
                # only while it is registered: none once it closed
                targets = tuple(r for r in routes if one is not None and r() is one)
                body, message_type, info = entry.message
            else:
                targets = routes
                body, message_type, info = entry
            delivered = 0
            for route in targets:
                subscription = route()
                if subscription is None:
                    continue  # collected: pruned at the next use
                try:
                    if subscription._push_message(body, message_type, info):
                        delivered += 1
                except Exception:  # never lose the rest of the batch to one subscription
                    logger.exception("subscription %r failed to take a message", subscription)
            self._stats.add("delivered", delivered)


class ServiceHandler(EmailHandler):
    """Routes requests to servers by service name and responses to clients by GID."""

    def __init__(self, stats: StatsCounters) -> None:
        super().__init__(stats)
        self._servers: dict[str, tuple[weakref.ref[RequestSink], ...]] = {}
        self._clients: dict[int, weakref.ref[ResponseSink]] = {}

    def register_server(self, service_name: str, server: RequestSink) -> None:
        """Deliver requests for ``service_name`` to ``server`` from now on."""
        self._prune_if_needed()
        self._servers[service_name] = (*self._servers.get(service_name, ()), self._ref(server))

    def unregister_server(self, service_name: str, server: RequestSink) -> None:
        """Stop delivering to ``server``."""
        self._prune_if_needed()
        servers = tuple(r for r in self._servers.get(service_name, ()) if r() is not server)
        if servers:
            self._servers[service_name] = servers
        else:
            self._servers.pop(service_name, None)

    def register_client(self, gid: Gid, client: ResponseSink) -> bool:
        """Deliver responses addressed to ``gid`` to ``client``; False if ``gid`` is taken."""
        self._prune_if_needed()
        if gid.value in self._clients:
            return False
        self._clients[gid.value] = self._ref(client)
        return True

    def unregister_client(self, gid: Gid) -> None:
        """Stop delivering responses addressed to ``gid``."""
        self._prune_if_needed()
        self._clients.pop(gid.value, None)

    def _prune(self) -> None:
        for name, refs in list(self._servers.items()):
            alive = tuple(r for r in refs if r() is not None)
            if alive:
                self._servers[name] = alive
            else:
                del self._servers[name]
        for value, ref in list(self._clients.items()):
            if ref() is None:
                del self._clients[value]

    def _count_routes(self) -> int:
        return sum(len(refs) for refs in self._servers.values()) + len(self._clients)

    def handle(self, email: EmailData) -> bool:
        """Deliver a request to its servers, or a response to its client."""
        headers = email.headers
        gid_text = headers.get(HEADER_CLIENT_GID)
        seq_text = headers.get(HEADER_SEQUENCE_NUMBER)
        if gid_text is None and seq_text is None:
            return False
        if gid_text is None or seq_text is None:
            return self._malformed(
                email, f"{HEADER_CLIENT_GID} and {HEADER_SEQUENCE_NUMBER} must come together"
            )
        gid = Gid.from_string(gid_text)
        if gid is None:
            return self._malformed(email, f"bad {HEADER_CLIENT_GID} {gid_text[:40]!r}")
        sequence_number = parse_sequence_number(seq_text)
        if sequence_number is None:
            return self._malformed(email, f"bad {HEADER_SEQUENCE_NUMBER} {seq_text[:40]!r}")
        stamp = _source_timestamp(email)
        if stamp is None:
            return self._malformed(email, f"missing or bad {HEADER_SOURCE_TIMESTAMP}")
        now = time.time_ns()
        info = ServiceInfo(stamp, Timestamp(now), gid, sequence_number, headers)
        self._prune_if_needed()
        if email.in_reply_to:
            ref = self._clients.get(gid.value)
            client = None if ref is None else ref()
            if client is None:
                return False
            self._stats.delivery_latency.observe((now - stamp.nanoseconds) / 1e9)
            if not client._push_response(
                email.content.body, headers.get(HEADER_MESSAGE_TYPE), info
            ):
                logger.debug(
                    "dropping response %s (sequence number %d): not pending at its client",
                    email.message_id[:100],
                    sequence_number,
                )
            return True
        servers = [
            s for r in self._servers.get(email.content.subject, ()) if (s := r()) is not None
        ]
        if not servers:
            return False
        self._stats.delivery_latency.observe((now - stamp.nanoseconds) / 1e9)
        delivered = 0
        for server in servers:
            try:
                if server._push_request(email, info):
                    delivered += 1
            except Exception:
                logger.exception("service server %r failed to take a request", server)
        self._stats.add("delivered", delivered)
        return True


def _source_timestamp(email: EmailData) -> Timestamp | None:
    text = email.headers.get(HEADER_SOURCE_TIMESTAMP)
    return None if text is None else Timestamp.from_string(text)
