"""The polling manager: one thread per context that receives emails and hands
each one to the registered handlers."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from emailmw.security import AdmissionPolicy
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.data import EmailData
from emailmw.transport.receiver import EmailReceiver

__all__ = ["Handler", "PollingManager", "TimedHandler"]

logger = logging.getLogger(__name__)

#: A handler takes an email (returns True) or declines it (returns False).
Handler = Callable[[EmailData], bool]


@runtime_checkable
class TimedHandler(Protocol):
    """A handler that holds emails back for a while (the subscription handler,
    restoring publication order): the polling thread wakes up at
    :meth:`next_deadline` and calls :meth:`expire`."""

    def __call__(self, email: EmailData) -> bool: ...

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to do (``time.monotonic()``), or None."""
        ...

    def expire(self) -> None:
        """Release what was held past its deadline."""
        ...


#: How many recent Message-IDs are remembered to drop duplicates.
DEDUP_WINDOW = 10_000
_ERROR_BACKOFF_MAX = 5.0
#: How long past its deadline a gap is kept while the receiver still reads a backlog.
_EXPIRE_GRACE = 30.0


class PollingManager:
    """Runs the receive loop on a named thread (``emailmw-poll``).

    Each email is first checked by the admission policy (signature, replay,
    allowed senders; see :mod:`emailmw.security`), then offered to every
    handler (a callable returning ``True`` when it took the email). An email
    whose ``Message-ID`` was seen recently is dropped as a duplicate.
    Exceptions from the receiver or a handler are logged and never end the
    thread.
    """

    def __init__(
        self,
        receiver: EmailReceiver,
        stats: StatsCounters | None = None,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self._receiver = receiver
        self._admission = admission if admission is not None and admission.active else None
        self._stats = stats if stats is not None else StatsCounters()
        self._handlers: list[Handler] = []
        self._timed: list[TimedHandler] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()

    def register_handler(self, handler: Handler) -> None:
        """Add a handler (a :class:`TimedHandler` is also woken at its deadlines).
        Register all handlers before :meth:`start`."""
        self._handlers.append(handler)
        if isinstance(handler, TimedHandler):
            self._timed.append(handler)

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, name: str = "emailmw-poll") -> None:
        """Start the thread."""
        if self._thread is not None:
            raise RuntimeError("polling manager already started")
        if self._receiver.bind_dispatcher(self.dispatch_batch):
            logger.debug("receiver dispatches in the delivering thread when it can")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 1.0) -> bool:
        """Stop the thread and wait up to ``timeout`` s; True if it ended."""
        self._stop.set()
        self._receiver.interrupt()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("polling thread did not stop within %.1f s", timeout)
            return False
        return True

    def dispatch_batch(self, emails: list[EmailData]) -> None:
        """Count and dispatch received emails, in order. Callers serialize calls."""
        self._stats.add("received", len(emails))
        for email in emails:
            self.dispatch(email)

    def dispatch(self, email: EmailData) -> None:
        """Offer one email to the handlers (what the thread does for each email)."""
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
                if handler(email):
                    return  # one email, one owner: it is delivered (or counted) once
            except Exception:
                logger.exception("handler %r failed on email %s", handler, message_id)
        self._stats.drop(DropReason.UNMATCHED)
        logger.debug(
            "no subscription, server or client for email %s (subject %r)",
            message_id[:100],
            email.content.subject[:80],
        )

    def _run(self) -> None:
        logger.debug("polling thread started")
        backoff = 0.1
        while not self._stop.is_set():
            deadline = self._next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                emails = self._receiver.receive(timeout)
                backoff = 0.1
            except Exception:
                logger.exception("receiver failed; retrying in %.1f s", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _ERROR_BACKOFF_MAX)
                continue
            if emails:
                self.dispatch_batch(emails)
            now = time.monotonic()
            # give a gap up once the receiver caught up (an empty receive); a stream
            # that never pauses still gives up after the grace period
            if (
                deadline is not None
                and now >= deadline
                and (not emails or now >= deadline + _EXPIRE_GRACE)
            ):
                self._expire()
        logger.debug("polling thread stopped")

    def _next_deadline(self) -> float | None:
        """The earliest time a timed handler wants :meth:`_expire`."""
        deadlines = [when for h in self._timed if (when := h.next_deadline()) is not None]
        return min(deadlines, default=None)

    def _expire(self) -> None:
        for handler in self._timed:
            try:
                handler.expire()
            except Exception:
                logger.exception("handler %r failed to expire held emails", handler)
