"""Publishers and subscriptions: one-to-many messages on a topic."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from emailmw.aio import AsyncPublisherMixin, AsyncSubscriptionMixin
from emailmw.context import Context
from emailmw.dispatch.handlers import Message
from emailmw.durable import DurableCursor
from emailmw.entity import Entity, callback_arity, check_depth
from emailmw.errors import ContextError, InvalidMessageError
from emailmw.info import (
    HEADER_PREVIOUS_NUMBER,
    HEADER_PREVIOUS_TIMESTAMP,
    HEADER_PUBLICATION_NUMBER,
    HEADER_PUBLISHER_GID,
    HEADER_SOURCE_TIMESTAMP,
    MessageInfo,
)
from emailmw.serialization import HEADER_MESSAGE_TYPE, Serializer, serializer_for
from emailmw.state_store import check_durable_name
from emailmw.stats import DropReason
from emailmw.transport.data import EmailContent, EmailHeaders
from emailmw.validation import validate_headers
from emailmw.waitable import Waitable, block_until

__all__ = ["Publisher", "Subscription"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What an iteration's attempt returns once the subscription is closed and drained.
_END: tuple[()] = ()


class Publisher(Entity, AsyncPublisherMixin, Generic[T]):
    """Publishes messages on one topic: each message is one email.

    The email's subject is the topic name and its body the message; the
    ``Source-Timestamp`` and ``Publisher-GID`` headers carry the metadata, and
    ``Publication-Number`` and ``Previous-Timestamp`` let subscribers restore
    this publisher's order when the mail system reorders messages. After a
    ``publish()`` that raised, the next message also names the last accepted one
    (``Previous-Number``), so that subscribers do not wait for the failed one.

    ``message_type`` is ``str`` (the default), ``bytes`` or anything pydantic
    can validate (see :mod:`emailmw.serialization`).
    """

    _kind = "topic"

    @overload
    def __init__(
        self: Publisher[str], topic_name: str, *, context: Context | None = None
    ) -> None: ...
    @overload
    def __init__(
        self, topic_name: str, message_type: type[T], *, context: Context | None = None
    ) -> None: ...
    @overload
    def __init__(
        self, topic_name: str, message_type: Any, *, context: Context | None = None
    ) -> None: ...
    def __init__(
        self, topic_name: str, message_type: Any = str, *, context: Context | None = None
    ) -> None:
        self._serializer: Serializer[T] = serializer_for(message_type)
        self._message_type = message_type
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

    @property
    def message_type(self) -> Any:
        """The type of the messages (``str`` unless given)."""
        return self._message_type

    def publish(self, message: T, additional_headers: Mapping[str, str] | None = None) -> None:
        """Send ``message``; returns once the transport accepted it.

        ``additional_headers`` are extra email headers (validated; emailmw's own
        and structural headers are reserved; subscribers read them in
        :attr:`MessageInfo.headers`). Raises :class:`~emailmw.InvalidMessageError`
        (a value that is not of the message type, or that cannot be carried),
        :class:`~emailmw.InvalidHeaderError` before anything is sent,
        :class:`~emailmw.TransportError` if sending failed.
        """
        serializer = self._serializer
        body = serializer.dump(message, "message")
        context = self._context
        headers = EmailHeaders()
        if additional_headers:
            for name, value in validate_headers(additional_headers).items():
                headers[name] = value
        headers[HEADER_PUBLISHER_GID] = self._gid_text
        if serializer.header is not None:
            headers[HEADER_MESSAGE_TYPE] = serializer.header
        content = EmailContent(self._name, body, serializer.media_type)
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


class Subscription(Entity, Waitable, AsyncSubscriptionMixin, Generic[T]):
    """Receives the messages published on one topic, in arrival order.

    Messages wait in a bounded queue of ``depth`` entries (default: the
    ``queue-depth`` option); when it is full the oldest message is dropped and
    counted in :meth:`Context.stats` as ``queue_full``. With a ``message_type``
    other than ``str``, each message is validated as it arrives; one that does
    not validate is dropped, logged and counted as ``invalid_message``.

    With a ``callback``, an :class:`~emailmw.Executor` (or :func:`emailmw.spin`)
    takes the queued messages and calls ``callback(message)``, or
    ``callback(message, info)`` if it has two required positional parameters
    (decided once, here; see :func:`emailmw.entity.callback_arity`). Keep a
    reference to the subscription: one that is garbage-collected stops
    receiving. ``for message in subscription:`` yields the messages as they come.

    ``history=N``: first up to the last ``N`` messages of the topic already in the
    mailbox (intraprocess: among the last ``history-depth`` kept per topic), oldest
    first and in each publisher's order, then the live ones, with no gap and no
    duplicate between the two; the constructor returns once they are queued
    (raises :class:`~emailmw.TransportError` if the server cannot answer). Only
    this subscription gets them. ``0`` (the default): only what comes after.
    """

    _kind = "topic"

    @overload
    def __init__(
        self: Subscription[str],
        topic_name: str,
        *,
        callback: Callable[[str], object] | Callable[[str, MessageInfo], object] | None = None,
        depth: int | None = None,
        history: int = 0,
        durable: str | None = None,
        context: Context | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        topic_name: str,
        message_type: type[T],
        *,
        callback: Callable[[T], object] | Callable[[T, MessageInfo], object] | None = None,
        depth: int | None = None,
        history: int = 0,
        durable: str | None = None,
        context: Context | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        topic_name: str,
        message_type: Any,
        *,
        callback: Callable[[Any], object] | Callable[[Any, MessageInfo], object] | None = None,
        depth: int | None = None,
        history: int = 0,
        durable: str | None = None,
        context: Context | None = None,
    ) -> None: ...
    def __init__(
        self,
        topic_name: str,
        message_type: Any = str,
        *,
        callback: Callable[..., object] | None = None,
        depth: int | None = None,
        history: int = 0,
        durable: str | None = None,
        context: Context | None = None,
    ) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be an int, 0 or more, got {history!r}")
        if durable is not None:
            check_durable_name(durable)
            if history:
                raise ValueError(
                    "history and durable cannot be combined: a durable subscription gets "
                    "everything published since its name was first used"
                )
        Waitable.__init__(self)
        self._serializer: Serializer[T] = serializer_for(message_type)
        self._plain = message_type is str
        self._message_type = message_type
        self._callback = callback
        self._callback_arity = 0 if callback is None else callback_arity(callback, "callback")
        self._setup(topic_name, context)
        self._depth = check_depth(depth, self._context)
        self._queue: deque[tuple[T, MessageInfo]] = deque()
        # history given, that may come live too (received, not yet dispatched)
        self._history_keys: set[_Key] = set()
        self._durable: DurableCursor | None = None
        if durable is not None:
            self._durable = self._context._durable_cursor(durable, self._name)
        self._context._register_waitable(self)
        core = self._context._delivery
        if self._durable is not None:
            core.watch_uids(self._name, self._durable.read_watcher)
        core.register_subscription(self._name, self)
        try:  # registered first: what is not read back comes live
            if self._durable is not None:
                cursor = self._durable
                backlog = self._context._backlog(self._name, cursor.uidvalidity, cursor.position)
                core.deliver_history(self._name, self, cursor.catch_up(backlog))
            elif history:
                core.deliver_history(self._name, self, self._context._history(self._name, history))
        except BaseException:
            self.close()
            raise
        if callback is not None:
            self._context._set_callback_entity(self, True)

    @property
    def topic_name(self) -> str:
        """The topic."""
        return self._name

    @property
    def message_type(self) -> Any:
        """The type of the messages (``str`` unless given)."""
        return self._message_type

    @property
    def depth(self) -> int:
        """The queue's capacity."""
        return self._depth

    @property
    def callback(self) -> Callable[..., object] | None:
        """The callback an :class:`~emailmw.Executor` runs for each message, if any."""
        return self._callback

    def has_message(self) -> bool:
        """True if a message is waiting."""
        self._context._check()
        return bool(self._queue)

    def get_message(self) -> T | None:
        """Take the oldest waiting message, or ``None`` if there is none. Never blocks."""
        item = self.get_message_with_info()
        return None if item is None else item[0]

    @property
    def durable(self) -> str | None:
        """The durable subscription's name, or ``None``."""
        return None if self._durable is None else self._durable.name

    def get_message_with_info(self) -> tuple[T, MessageInfo] | None:
        """Take the oldest waiting message and its metadata, or ``None``."""
        self._context._check()
        with self._lock:
            item = self._queue.popleft() if self._queue else None
        if item is not None and self._durable is not None:
            self._durable.handled(item[1])
        return item

    def __iter__(self) -> Iterator[T]:
        """Yield the messages as they come, blocking in between.

        Ends when the context shuts down, or when the subscription is closed
        (once the messages already queued are taken). Event-driven, like
        :func:`~emailmw.wait_for_message`. Items are taken from the same queue as
        :meth:`get_message` (and an executor, for a subscription with a callback).
        """
        while True:
            try:
                item = block_until(self._take_or_end, [self], None)
            except ContextError:
                return
            if item is None or item is _END:
                return
            yield item[0]

    # -- internal ------------------------------------------------------------------------

    def _take_or_end(self) -> tuple[T] | tuple[()] | None:
        """The next message as ``(message,)``; ``_END`` once closed and drained."""
        self._context._check()
        ended = self._unregistered  # read first: nothing is queued after this is set
        with self._lock:
            item = self._queue.popleft() if self._queue else None
        if item is not None:
            if self._durable is not None:
                self._durable.handled(item[1])
            return (item[0],)
        return _END if ended else None

    def _unregister(self) -> None:
        try:
            core = self._context._delivery
            core.unregister_subscription(self._name, self)
            if self._durable is not None:
                core.unwatch_uids(self._name, self._durable.read_watcher)
        finally:
            if self._durable is not None:  # what is still queued comes again next time
                self._durable.close()

    def _has_callback(self) -> bool:
        return self._callback is not None

    def _take_callback(self) -> Callable[[], object] | None:
        callback = self._callback
        if callback is None or self._closed:
            return None
        with self._lock:
            if not self._queue:
                return None
            message, info = self._queue.popleft()
        if self._callback_arity == 2:
            call = functools.partial(callback, message, info)
        else:
            call = functools.partial(callback, message)
        durable = self._durable
        if durable is None:
            return call

        def call_then_mark_handled() -> object:
            result = call()  # raised: not handled, it comes again after a restart
            durable.handled(info)
            return result

        return call_then_mark_handled

    @property
    def _waitable_context(self) -> Context:
        return self._context

    def _is_ready(self) -> bool:
        return self.has_message()

    def _push_history(self, messages: list[Message]) -> int:
        """Queue ``messages`` (the history, oldest first) before what came live since
        the subscription was registered, leaving out those that came live; the others
        are left out when they come live later. Returns how many were queued."""
        with self._lock:
            live = {_key(info) for _, info in self._queue}
        items: list[tuple[T, MessageInfo]] = []
        keys: set[_Key] = set()
        for body, message_type, info in messages:
            key = _key(info)
            if key in live or key in keys:
                continue
            value = self._load(body, message_type, info)
            if value is _INVALID:
                if self._durable is not None:
                    self._durable.dropped(info)
                continue
            items.append((value, info))
            keys.add(key)
        durable = self._durable
        with self._lock:
            self._history_keys = keys
            queue = self._queue
            queue.extendleft(reversed(items))
            # a durable catch-up is kept whole (see durable.py)
            while len(queue) > self._depth and durable is None:
                queue.popleft()
                self._context._counters.drop(DropReason.QUEUE_FULL)
            if queue:
                for waiter in self._waiters:
                    waiter.set()
        return len(items)

    def _load(self, body: str, message_type: str | None, info: MessageInfo) -> Any:
        """The message's value, or ``_INVALID`` if it does not validate (counted)."""
        if self._plain:
            return body
        try:
            return self._serializer.load(body, message_type)
        except InvalidMessageError as exc:
            logger.warning(
                "dropping a message on %r from publisher %d: %s",
                self._name[:80],
                info.publisher_gid.value,
                exc,
            )
            self._context._counters.drop(DropReason.INVALID_MESSAGE)
            return _INVALID

    def _push_message(self, body: str, message_type: str | None, info: MessageInfo) -> bool:
        """Queue a received message; False if it does not validate (dropped, counted)
        or if it came already in the history."""
        if self._history_keys:
            key = _key(info)
            with self._lock:
                if key in self._history_keys:
                    self._history_keys.discard(key)
                    logger.debug("%r: a message of the history came live too", self._name[:80])
                    return False
        value: Any = body if self._plain else self._load(body, message_type, info)
        if value is _INVALID:
            if self._durable is not None:
                self._durable.dropped(info)
            return False
        durable = self._durable
        with self._lock:
            queue = self._queue
            if len(queue) >= self._depth:
                _, lost = queue.popleft()
                self._context._counters.drop(DropReason.QUEUE_FULL)
                if durable is not None:
                    durable.dropped(lost)
            queue.append((value, info))
            for waiter in self._waiters:
                waiter.set()
        return True


#: What identifies a message among a topic's: its publisher and its Source-Timestamp
#: (a publisher stamps its messages one at a time, in nanoseconds).
_Key = tuple[int, int]
_INVALID = object()


def _key(info: MessageInfo) -> _Key:
    return (info.publisher_gid.value, info.source_timestamp.nanoseconds)
