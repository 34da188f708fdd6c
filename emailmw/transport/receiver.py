"""The interface every email receiver implements."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass

from emailmw.transport.data import EmailData

#: Takes a batch of received emails, in order, and routes them.
Dispatcher = Callable[[list[EmailData]], None]

__all__ = ["Backlog", "Dispatcher", "EmailReceiver", "History"]


@dataclass(frozen=True, slots=True)
class History:
    """A topic's last messages as a receiver read them again (see
    :meth:`EmailReceiver.history`): the emails, oldest first, and the Message-IDs
    of those the last :meth:`EmailReceiver.receive` returned (maybe not dispatched
    yet: if not, they come live)."""

    emails: list[EmailData]
    in_flight: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Backlog:
    """What a durable subscription missed while away (see
    :meth:`EmailReceiver.backlog`): the emails, oldest first; the Message-IDs of
    the last batch :meth:`EmailReceiver.receive` returned (as in :class:`History`);
    the folder's UIDVALIDITY now (``None``: the transport has no UIDs); the last
    UID the receiver had read when it was taken; and whether the folder was
    recreated since (every message of the topic in it is then in ``emails``)."""

    emails: list[EmailData]
    in_flight: frozenset[str] = frozenset()
    uidvalidity: int | None = None
    position: int = 0
    resync: bool = False


class EmailReceiver(abc.ABC):
    """Receives the emails that arrive in a mailbox, in arrival order.

    One thread (the polling manager's) calls :meth:`receive`; :meth:`interrupt`
    and :meth:`close` may be called from any other thread.
    """

    _start_time_ns: int | None = None

    def connect(self) -> None:
        """Open connections eagerly so that configuration errors surface at ``init()``.

        Emails already in the mailbox when this is called are not received:
        a receiver starts at the mailbox's next UID. Implementations record
        when they took that position (:attr:`start_time_ns`).
        """
        if self._start_time_ns is None:
            self._start_time_ns = time.time_ns()

    @property
    def start_time_ns(self) -> int:
        """Wall-clock nanoseconds at which the receiver took its start position:
        a message published before it may be missing, and is never waited for."""
        if self._start_time_ns is None:
            self._start_time_ns = time.time_ns()
        return self._start_time_ns

    @abc.abstractmethod
    def receive(self, timeout: float | None) -> list[EmailData]:
        """Block up to ``timeout`` seconds (``None``: until something arrives or
        :meth:`interrupt`) and return every email that arrived, oldest first.

        Returns an empty list on timeout or interrupt. Connection trouble is
        handled inside (reconnect with backoff); emails that cannot be parsed
        are logged and skipped, never raised.
        """

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Make a blocked or the next :meth:`receive` return promptly. Thread-safe."""

    def history(self, topic: str, count: int) -> History:
        """Up to the last ``count`` messages on ``topic`` that this receiver already
        read (or that came before its start position), oldest first: what a
        subscription made with ``history=count`` receives first.

        Every message after them is received (and dispatched) later. Those of
        the last batch :meth:`receive` returned are named in ``in_flight``: they
        may not be dispatched yet. Called from any thread. A receiver that keeps
        no history returns none.
        """
        return History([])

    def backlog(self, topic: str, uidvalidity: int | None, after_uid: int) -> Backlog:
        """The messages on ``topic`` after UID ``after_uid`` (recorded under
        ``uidvalidity``) that this receiver already read, oldest first: what a
        durable subscription missed while it was away. A receiver without UIDs
        (intraprocess) returns none."""
        return Backlog([])

    def bind_dispatcher(self, dispatcher: Dispatcher) -> bool:
        """Offer to dispatch emails in the thread that delivers them.

        A receiver that can hand emails to ``dispatcher`` itself (the
        intraprocess one) accepts and returns True; :meth:`receive` then hands
        what it gets to the dispatcher too and returns an empty list. Others
        return False and the polling thread dispatches what :meth:`receive`
        returns.
        """
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Idempotent."""
