"""Publishers and subscriptions: one-to-many messages on a topic."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Mapping

from emailmw.context import Context
from emailmw.entity import Entity, check_depth
from emailmw.info import (
    HEADER_PREVIOUS_NUMBER,
    HEADER_PREVIOUS_TIMESTAMP,
    HEADER_PUBLICATION_NUMBER,
    HEADER_PUBLISHER_GID,
    HEADER_SOURCE_TIMESTAMP,
    MessageInfo,
)
from emailmw.stats import DropReason
from emailmw.transport.data import EmailContent, EmailHeaders
from emailmw.validation import validate_headers, validate_payload
from emailmw.waitable import Waitable

__all__ = ["Publisher", "Subscription"]


class Publisher(Entity):
    """Publishes messages on one topic: each message is one email.

    The email's subject is the topic name and its body the message; the
    ``Source-Timestamp`` and ``Publisher-GID`` headers carry the metadata, and
    ``Publication-Number`` and ``Previous-Timestamp`` let subscribers restore
    this publisher's order when the mail system reorders messages. After a
    ``publish()`` that raised, the next message also names the last accepted one
    (``Previous-Number``), so that subscribers do not wait for the failed one.
    """

    _kind = "topic"

    def __init__(self, topic_name: str, *, context: Context | None = None) -> None:
        self._setup(topic_name, context)
        self._gid_text = self._gid.to_string()
        self._numbers = itertools.count(1)
        # The last message the transport accepted: (publication number, timestamp).
        self._accepted: tuple[int, int] | None = None
        self._numbers_lock = threading.Lock()

    @property
    def topic_name(self) -> str:
        """The topic."""
        return self._name

    def publish(self, message: str, additional_headers: Mapping[str, str] | None = None) -> None:
        """Send ``message``; returns once the transport accepted it.

        ``additional_headers`` are extra email headers (validated; emailmw's own
        and structural headers are reserved). Raises
        :class:`~emailmw.InvalidHeaderError` or :class:`TypeError` before
        anything is sent, :class:`~emailmw.TransportError` if sending failed.
        """
        if not isinstance(message, str):
            raise TypeError(f"message must be a str, got {type(message).__name__}")
        validate_payload(message, "message")
        context = self._context
        context._check()
        headers = EmailHeaders()
        if additional_headers:
            for name, value in validate_headers(additional_headers).items():
                headers[name] = value
        headers[HEADER_PUBLISHER_GID] = self._gid_text
        content = EmailContent(self._name, message)
        with self._numbers_lock:  # numbered and stamped in the order they are sent
            stamp = time.time_ns()
            number = next(self._numbers)
            headers[HEADER_SOURCE_TIMESTAMP] = str(stamp)
            headers[HEADER_PUBLICATION_NUMBER] = str(number)
            previous_number, previous_ns = self._accepted or (0, None)
            if previous_ns is not None:
                headers[HEADER_PREVIOUS_TIMESTAMP] = str(previous_ns)
            if previous_number != number - 1:  # a publish() in between raised
                headers[HEADER_PREVIOUS_NUMBER] = str(previous_number)
            # A send that raises keeps its number used: the email may still have
            # been stored (a reply lost after the data was accepted), and a
            # reused number would make two different messages collide.
            context._send(content, headers)
            self._accepted = (number, stamp)


class Subscription(Entity, Waitable):
    """Receives the messages published on one topic, in arrival order.

    Messages wait in a bounded queue of ``depth`` entries (default: the
    ``queue-depth`` option); when it is full the oldest message is dropped and
    counted in :meth:`Context.stats` as ``queue_full``.
    """

    __slots__ = ("_closed", "_context", "_depth", "_gid", "_name", "_queue")
    _kind = "topic"

    def __init__(
        self, topic_name: str, *, depth: int | None = None, context: Context | None = None
    ) -> None:
        Waitable.__init__(self)
        self._setup(topic_name, context)
        self._depth = check_depth(depth, self._context)
        self._queue: deque[tuple[str, MessageInfo]] = deque()
        self._context._register_waitable(self)
        self._context._delivery.register_subscription(self._name, self)

    @property
    def topic_name(self) -> str:
        """The topic."""
        return self._name

    @property
    def depth(self) -> int:
        """The queue's capacity."""
        return self._depth

    def has_message(self) -> bool:
        """True if a message is waiting."""
        self._context._check()
        return bool(self._queue)

    def get_message(self) -> str | None:
        """Take the oldest waiting message, or ``None`` if there is none. Never blocks."""
        item = self.get_message_with_info()
        return None if item is None else item[0]

    def get_message_with_info(self) -> tuple[str, MessageInfo] | None:
        """Take the oldest waiting message and its metadata, or ``None``."""
        self._context._check()
        with self._lock:
            return self._queue.popleft() if self._queue else None

    # -- internal ------------------------------------------------------------------------

    def _unregister(self) -> None:
        self._context._delivery.unregister_subscription(self._name, self)

    @property
    def _waitable_context(self) -> Context:
        return self._context

    def _is_ready(self) -> bool:
        return self.has_message()

    def _push_message(self, message: str, info: MessageInfo) -> None:
        with self._lock:
            queue = self._queue
            if len(queue) >= self._depth:
                queue.popleft()
                self._context._counters.drop(DropReason.QUEUE_FULL)
            queue.append((message, info))
            for waiter in self._waiters:
                waiter.set()
