"""The intraprocess transport: emails handed over in memory, no server.

:class:`IntraEmailSender` gives each email straight to its
:class:`IntraEmailReceiver`, which stamps it with a random ``Message-ID`` (as a
mail server's sender would) and queues it until the polling manager takes it.
The receiver also keeps the last ``history_depth`` messages of each topic
(default :data:`HISTORY_DEPTH`), for subscriptions made with ``history=N``.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections import deque
from typing import TYPE_CHECKING

from emailmw.info import HEADER_PUBLISHER_GID
from emailmw.transport.codec import WireFormat, encode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.receiver import Dispatcher, EmailReceiver, History
from emailmw.transport.sender import EmailSender
from emailmw.waitable import Waiter

if TYPE_CHECKING:
    from emailmw.stats import StatsCounters

logger = logging.getLogger(__name__)

__all__ = ["HISTORY_DEPTH", "INTRAPROCESS_ADDRESS", "IntraEmailReceiver", "IntraEmailSender"]

#: The From and To address of intraprocess emails.
INTRAPROCESS_ADDRESS = "intraprocess@localhost"
#: How many messages of each topic the intraprocess receiver keeps for ``history=N``
#: (config key ``history-depth``).
HISTORY_DEPTH = 100


class IntraEmailReceiver(EmailReceiver):
    """An in-memory mailbox fed by :class:`IntraEmailSender`.

    With a bound dispatcher (see :meth:`bind_dispatcher`), an email delivered
    while nothing else is queued or being dispatched is dispatched at once in
    the sender's thread (no thread hop: the latency of a function call);
    otherwise it is queued and the polling thread dispatches it. A lock held
    while dispatching, and taken before the queue is drained, keeps emails in
    delivery order either way.

    The last ``history_depth`` messages (``Publisher-GID``, no ``In-Reply-To``)
    of each topic are kept, in delivery order, for :meth:`history` (0: none).
    """

    def __init__(self, history_depth: int = HISTORY_DEPTH) -> None:
        if history_depth < 0:
            raise ValueError(f"history_depth must be 0 or more, not {history_depth}")
        self._history_depth = history_depth
        self._history: dict[str, deque[EmailData]] = {}  # kept under the dispatch lock
        self._in_flight: frozenset[str] = frozenset()
        self._queue: deque[EmailData] = deque()
        self._wakeup = Waiter()
        self._interrupted = False
        self._dispatcher: Dispatcher | None = None
        self._dispatch_lock = threading.Lock()
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def bind_dispatcher(self, dispatcher: Dispatcher) -> bool:
        """Dispatch in the delivering thread when possible (see the class docstring)."""
        self._dispatcher = dispatcher
        return True

    def new_message_id(self) -> str:
        """A new Message-ID: a random per-receiver prefix and a counter (unique,
        unguessable across runs, and cheap)."""
        return f"<{self._prefix}.{next(self._counter)}@intraprocess>"

    def deliver(self, email: EmailData) -> str:
        """Dispatch or queue ``email``; return its Message-ID.

        An email without a Message-ID gets a new random one here, as a mail
        server's receiving end would stamp it.
        """
        if not email.message_id:
            email.message_id = self.new_message_id()
        message_id = email.message_id
        dispatcher = self._dispatcher
        queue = self._queue
        if dispatcher is not None and not queue and self._dispatch_lock.acquire(blocking=False):
            try:
                if not queue:
                    self._keep([email])
                    dispatcher([email])
                    return message_id
                queue.append(email)
            finally:
                self._dispatch_lock.release()
        else:
            queue.append(email)
        if not self._wakeup.is_set():
            self._wakeup.set()
        return message_id

    def history(self, topic: str, count: int) -> History:
        """Up to the last ``count`` messages dispatched on ``topic`` (at most the last
        ``history_depth``), oldest first. Taken under the dispatch lock: every
        message it holds was dispatched, every later one is dispatched after it
        (with no bound dispatcher: the last batch :meth:`receive` returned is in
        flight)."""
        if count <= 0:
            return History([])
        if count > self._history_depth:
            logger.warning(
                "history=%d on %r: the intraprocess transport keeps only the last %d messages"
                " of each topic (config key history-depth)",
                count,
                topic[:80],
                self._history_depth,
            )
        with self._dispatch_lock:
            kept = self._history.get(topic)
            emails = [] if not kept else list(kept)[-count:]
            return History(emails, self._in_flight)

    def _keep(self, emails: list[EmailData]) -> None:
        """Add the messages among ``emails`` to their topics' history (dispatch lock held)."""
        if not self._history_depth:
            return
        for email in emails:
            if email.in_reply_to or HEADER_PUBLISHER_GID not in email.headers:
                continue
            topic = email.content.subject
            kept = self._history.get(topic)
            if kept is None:
                kept = self._history[topic] = deque(maxlen=self._history_depth)
            kept.append(email)

    def receive(self, timeout: float | None) -> list[EmailData]:
        """Every queued email, waiting up to ``timeout`` for one to arrive.

        With a bound dispatcher the emails are dispatched here, under the
        dispatch lock, and the list returned is empty.
        """
        queue = self._queue
        if queue or self._interrupted:
            self._wakeup.wait(0)  # consume the wake-up left for what is taken now
        else:
            self._wakeup.wait(timeout)
        self._interrupted = False
        dispatcher = self._dispatcher
        with self._dispatch_lock:
            emails = _drain(queue)
            self._keep(emails)
            if dispatcher is None:  # the caller dispatches them
                self._in_flight = frozenset(e.message_id for e in emails)
                return emails
            if emails:
                dispatcher(emails)
        return []

    def interrupt(self) -> None:
        """Wake a blocked :meth:`receive`."""
        self._interrupted = True
        self._wakeup.set()


def _drain(queue: deque[EmailData]) -> list[EmailData]:
    emails = []
    while queue:
        emails.append(queue.popleft())
    return emails


class IntraEmailSender(EmailSender):
    """Sends emails to an :class:`IntraEmailReceiver` in the same process.

    Takes ownership of the ``headers`` it is given. With ``wire_format``
    ``"rmw-email"`` each email is also encoded in that format before it is
    handed over (and not handed over if that raises), so that what the SMTP
    sender would refuse is refused here too; the in-memory transport carries
    8-bit bodies and UTF-8 subjects.
    """

    def __init__(
        self,
        receiver: IntraEmailReceiver,
        address: str = INTRAPROCESS_ADDRESS,
        stats: StatsCounters | None = None,
        wire_format: WireFormat = "emailmw",
    ) -> None:
        self._receiver = receiver
        self._address = address
        self._stats = stats
        self._wire_format = wire_format

    def new_message_id(self) -> str:
        """A new Message-ID from the receiver (see :meth:`IntraEmailReceiver.new_message_id`)."""
        return self._receiver.new_message_id()

    def send(
        self,
        content: EmailContent,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Hand a new email to the receiver; return its Message-ID."""
        email = EmailData(
            content=content,
            headers=headers if headers is not None else EmailHeaders(),
            message_id=message_id or "",
            from_=self._address,
            recipients=EmailRecipients(to=[self._address]),
        )
        return self._hand_over(email)

    def reply(
        self,
        content: EmailContent,
        original: EmailData,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Hand a reply to ``original`` to the receiver; return its Message-ID."""
        email = EmailData(
            content=content,
            headers=headers if headers is not None else EmailHeaders(),
            message_id=message_id or "",
            in_reply_to=original.message_id,
            from_=self._address,
            recipients=EmailRecipients(to=[original.from_ or self._address]),
        )
        return self._hand_over(email)

    def _hand_over(self, email: EmailData) -> str:
        if self._wire_format != "emailmw":
            if not email.message_id:
                email.message_id = self._receiver.new_message_id()
            encode_email(email, wire_format=self._wire_format)  # raises what SMTP would
        if self._stats is not None:
            self._stats.add("sent")  # before delivering: it may be dispatched right away
        return self._receiver.deliver(email)
