"""Sending over several SMTP connections: :class:`SmtpSenderPool`.

The config key ``smtp-connections: N`` (N > 1) makes the context send through a
pool of N :class:`~emailmw.transport.smtp.SmtpEmailSender`, each with its own
persistent connection, retries and backoff (with N = 1 the context uses one
``SmtpEmailSender`` and no pool at all).

Which connection carries an email:

* An email of a stream (a message: its ``Publisher-GID``; a service request:
  its ``Client-GID``) goes over the connection its stream is pinned to. A
  stream is pinned when it first sends, to the next connection in turn, so
  that concurrent publishers spread over the connections; it stays pinned, and
  its emails leave in the order it sent them. (``publish()`` returns once the
  server took the email, so a publisher's emails reach the server in order
  whatever the connection; the pin keeps them in one SMTP session too.) The
  pool remembers the last 4096 streams; one forgotten and seen again is pinned
  anew.
* Any other email (a service response, which travels on its own and is matched
  to its request by sequence number) goes over the connection with the fewest
  sends in progress.

Stats: the senders share the context's counters (``sent``, ``send_retries``,
``send_failures``, ``reconnects`` count every connection's sends); each
connection has its own state in ``connections`` (``smtp``, ``smtp-1``, ...,
``smtp-<N-1>``). :meth:`~SmtpSenderPool.connect` opens every connection (at
once, in parallel) and raises the first failure; :meth:`~SmtpSenderPool.close`
closes them all in parallel, aborting sends in progress, as
:meth:`SmtpEmailSender.close` does for one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from emailmw.info import HEADER_CLIENT_GID, HEADER_PUBLISHER_GID
from emailmw.stats import StatsCounters
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.sender import EmailSender
from emailmw.transport.settings import SmtpSettings
from emailmw.transport.smtp import SmtpEmailSender

__all__ = ["MAX_SMTP_CONNECTIONS", "SmtpSenderPool"]

logger = logging.getLogger(__name__)

#: The most connections a pool holds (the bound of ``smtp-connections``).
MAX_SMTP_CONNECTIONS = 64
_MAX_PINNED = 4096  # streams remembered (least recently sent forgotten first)
_CLOSE_JOIN = 5.0  # a close is bounded by the QUIT timeout (2 s) and its wait (1 s)


def connection_name(index: int) -> str:
    """The name of connection ``index`` of a pool in ``stats.connections``."""
    return "smtp" if index == 0 else f"smtp-{index}"


class SmtpSenderPool(EmailSender):
    """Sends emails over ``connections`` persistent SMTP connections (thread-safe).

    Each connection is an :class:`~emailmw.transport.smtp.SmtpEmailSender` with
    ``settings``; see the module docstring for which one carries an email.
    Raises :class:`ValueError` unless 1 <= ``connections`` <= 64.
    """

    def __init__(
        self, settings: SmtpSettings, connections: int, stats: StatsCounters | None = None
    ) -> None:
        if (
            isinstance(connections, bool)
            or not isinstance(connections, int)
            or not 1 <= connections <= MAX_SMTP_CONNECTIONS
        ):
            raise ValueError(
                f"connections must be an int from 1 to {MAX_SMTP_CONNECTIONS}, not {connections!r}"
            )
        self._senders = [
            SmtpEmailSender(settings, stats, connection_name=connection_name(i))
            for i in range(connections)
        ]
        self._lock = threading.Lock()
        self._pins: OrderedDict[str, int] = OrderedDict()  # stream -> its connection
        self._next_pin = 0
        self._in_progress = [0] * connections  # sends under way, per connection
        self._rotation = 0  # where the search for the least busy connection starts

    @property
    def size(self) -> int:
        """How many connections the pool holds."""
        return len(self._senders)

    @property
    def from_address(self) -> str:
        """The ``From`` of every email this sender sends."""
        return self._senders[0].from_address

    def connect(self) -> None:
        """Open every connection now, in parallel; raise the first failure (as
        :meth:`SmtpEmailSender.connect` does) once all attempts ended."""
        self._on_each(lambda sender: sender.connect(), "connect", raise_first=True)

    def new_message_id(self) -> str:
        """A new Message-ID in the domain of the From address."""
        return self._senders[0].new_message_id()

    def offers(self, extension: str) -> bool:
        """Whether the server offered the SMTP ``extension`` (every connection goes
        to the same server: the first one's EHLO answers)."""
        return self._senders[0].offers(extension)

    def send(
        self,
        content: EmailContent,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Send a new email over its stream's connection; return its Message-ID."""
        index = self._take(_stream_of(headers))
        try:
            return self._senders[index].send(content, headers, message_id=message_id)
        finally:
            self._release(index)

    def reply(
        self,
        content: EmailContent,
        original: EmailData,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Reply to ``original`` over the least busy connection; return its Message-ID."""
        index = self._take(None)
        try:
            return self._senders[index].reply(content, original, headers, message_id=message_id)
        finally:
            self._release(index)

    def connection_for(self, stream: str) -> int | None:
        """The connection (0 to ``size - 1``) that stream ``stream`` (a GID, in
        decimal) is pinned to, or None if it is not pinned (yet, or any more)."""
        with self._lock:
            return self._pins.get(stream)

    def close(self) -> None:
        """Close every connection (in parallel; each says QUIT, or is aborted if a
        send holds it). Idempotent; the pool cannot be used afterwards."""
        self._on_each(lambda sender: sender.close(), "close", raise_first=False)

    # ------------------------------------------------------------------ internals

    def _take(self, stream: str | None) -> int:
        """The connection for the next send of ``stream`` (None: the least busy one),
        counted as busy until :meth:`_release`."""
        count = len(self._senders)
        with self._lock:
            if stream is None:
                start = self._rotation
                self._rotation = (start + 1) % count
                order = [(start + i) % count for i in range(count)]
                index = min(order, key=self._in_progress.__getitem__)
            else:
                pinned = self._pins.get(stream)
                if pinned is None:
                    index = self._next_pin
                    self._next_pin = (index + 1) % count
                    self._pins[stream] = index
                    if len(self._pins) > _MAX_PINNED:
                        self._pins.popitem(last=False)
                else:
                    index = pinned
                    self._pins.move_to_end(stream)
            self._in_progress[index] += 1
        return index

    def _release(self, index: int) -> None:
        with self._lock:
            self._in_progress[index] -= 1

    def _on_each(
        self, action: Callable[[SmtpEmailSender], None], what: str, *, raise_first: bool
    ) -> None:
        """Run ``action`` on every sender at once (this thread takes the first one)."""
        errors: list[BaseException | None] = [None] * len(self._senders)

        def run(index: int) -> None:
            try:
                action(self._senders[index])
            except BaseException as exc:  # reported below, in the caller's thread
                errors[index] = exc

        threads = [
            threading.Thread(
                target=run, args=(index,), name=f"emailmw-smtp-{what}-{index}", daemon=True
            )
            for index in range(1, len(self._senders))
        ]
        for thread in threads:
            thread.start()
        run(0)
        for thread in threads:
            thread.join(_CLOSE_JOIN if what == "close" else None)
        failed = [exc for exc in errors if exc is not None]
        if not failed:
            return
        if raise_first:
            raise failed[0]
        for exc in failed:
            logger.debug("closing an SMTP connection of the pool raised %r", exc)


def _stream_of(headers: EmailHeaders | None) -> str | None:
    """The stream an email belongs to: its publisher's, else its client's GID."""
    if headers is None:
        return None
    return headers.get(HEADER_PUBLISHER_GID) or headers.get(HEADER_CLIENT_GID) or None
