"""The polling manager: one thread per context that receives emails and hands
them to the :class:`~emailmw.dispatch.core.DeliveryCore`.

The loop, on a thread named ``emailmw-poll``::

    deadline = core.arm()                 # the earliest reorder deadline, if any
    emails = receiver.receive(until deadline)
    core.dispatch_batch(emails)           # in the order received
    core.expire()                         # what is due is released now

A dispatch in another thread (intraprocess, inline) that makes the deadline
earlier interrupts the receive (:meth:`DeliveryCore.bind_wake`), so the loop
sleeps again with the new deadline. :meth:`PollingManager.shutdown` sets a
stop event and interrupts the receive; the receiver's ``close`` aborts any
socket read still in progress.
"""

from __future__ import annotations

import logging
import threading
import time

from emailmw.dispatch.core import DeliveryCore
from emailmw.transport.receiver import EmailReceiver

__all__ = ["PollingManager"]

logger = logging.getLogger(__name__)

_ERROR_BACKOFF_MAX = 5.0


class PollingManager:
    """Runs the receive loop on a named thread (``emailmw-poll``).

    Exceptions from the receiver or the core are logged and never end the thread.
    """

    def __init__(self, receiver: EmailReceiver, core: DeliveryCore) -> None:
        self._receiver = receiver
        self._core = core
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, name: str = "emailmw-poll") -> None:
        """Start the thread."""
        if self._thread is not None:
            raise RuntimeError("polling manager already started")
        thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread = thread
        thread.start()
        self._core.bind_wake(self._receiver.interrupt, thread)
        if self._receiver.bind_dispatcher(self._core.dispatch_batch):
            logger.debug("receiver dispatches in the delivering thread when it can")

    def stop(self) -> None:
        """Ask the thread to stop (and interrupt its receive); does not wait."""
        self._stop.set()
        self._receiver.interrupt()

    def shutdown(self, timeout: float = 1.0) -> bool:
        """Stop the thread and wait up to ``timeout`` s; True if it ended."""
        self.stop()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("polling thread did not stop within %.1f s", timeout)
            return False
        return True

    def _run(self) -> None:
        logger.debug("polling thread started")
        backoff = 0.1
        core = self._core
        while not self._stop.is_set():
            deadline = core.arm()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                emails = self._receiver.receive(timeout)
                backoff = 0.1
            except Exception:
                logger.exception("receiver failed; retrying in %.1f s", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _ERROR_BACKOFF_MAX)
                continue
            try:
                if emails:
                    core.dispatch_batch(emails)
                core.expire()
            except Exception:
                logger.exception("dispatching failed")
        logger.debug("polling thread stopped")
