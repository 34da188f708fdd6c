"""The interface every email receiver implements."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable

from emailmw.transport.data import EmailData

#: Takes a batch of received emails, in order, and routes them.
Dispatcher = Callable[[list[EmailData]], None]

__all__ = ["Dispatcher", "EmailReceiver"]


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
