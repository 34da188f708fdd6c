"""Event-driven waiting shared by subscriptions, clients, servers, guard conditions
and wait sets.

A waiting thread creates a :class:`Waiter` and attaches it to every
:class:`Waitable` it waits on. Whoever makes a waitable ready calls
:meth:`Waiter.set` on the waiters attached to it; a context's shutdown does the
same for every waitable of that context. Nothing polls: the waiting thread
sleeps in a lock acquire until woken or timed out.
"""

from __future__ import annotations

import _thread
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

__all__ = ["WaitOwner", "Waitable", "Waiter", "block_until"]

T = TypeVar("T")


class Waiter:
    """A binary semaphore: :meth:`set` wakes one :meth:`wait` (or the next one).

    The cheapest wake-up primitive CPython offers: one lock, no condition.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        """Wake the waiting thread (or let its next :meth:`wait` return at once)."""
        try:  # noqa: SIM105 - contextlib.suppress costs more on this hot path
            self._lock.release()
        except RuntimeError:  # already set
            pass

    def is_set(self) -> bool:
        """True if a :meth:`set` has not been consumed by a :meth:`wait` yet."""
        return not self._lock.locked()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until set (consuming it) or ``timeout`` seconds; True if set."""
        return self._lock.acquire(True, -1 if timeout is None else timeout)


class WaitOwner(Protocol):
    """What waiting needs of the object a waitable belongs to (a context): a
    check that raises once it is shut down, and a way to be woken by its
    shutdown. Waiting depends on this, not on the context itself."""

    def _check(self) -> None:
        """Raise (a :class:`~emailmw.ContextError`) unless running."""
        ...

    def _attach_waiter(self, waiter: Waiter) -> None:
        """Set ``waiter`` when shut down (at once if it is already)."""
        ...

    def _detach_waiter(self, waiter: Waiter) -> None:
        """Stop setting ``waiter``."""
        ...


class Waitable:
    """Base of everything a wait set can wait on.

    Subclasses guard their state with ``self._lock`` and call
    :meth:`_wake_locked` (with the lock held) when they become ready.
    """

    __slots__ = ("__weakref__", "_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._waiters: list[Waiter] = []

    @property
    def _waitable_context(self) -> WaitOwner | None:
        """The owner (context) whose shutdown must wake waiters of this object, if any."""
        return None

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _attach(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.append(waiter)

    def _detach(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.remove(waiter)

    def _wake_locked(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def _wake(self) -> None:
        with self._lock:
            self._wake_locked()


def block_until(
    attempt: Callable[[], T | None],
    waitables: Iterable[Waitable],
    timeout: float | None,
    contexts: Iterable[WaitOwner] = (),
) -> T | None:
    """Call ``attempt`` until it returns something other than ``None``.

    Between attempts, sleep until one of ``waitables`` signals. A shutdown of
    the context of any waitable (or of one of ``contexts``) wakes the sleeper,
    and ``attempt`` or the context check then raises
    :class:`~emailmw.ContextError`. ``timeout`` is seconds or ``None`` for
    forever (already normalized); ``0`` makes exactly one attempt. Returns
    ``None`` on timeout.
    """
    extra = list(contexts)
    for ctx in extra:
        ctx._check()
    result = attempt()
    if result is not None or timeout == 0:
        return result
    items = list(waitables)
    ctxs: list[WaitOwner] = list(extra)
    for item in items:
        owner = item._waitable_context
        if owner is not None and all(owner is not c for c in ctxs):
            ctxs.append(owner)
    waiter = Waiter()
    for item in items:
        item._attach(waiter)
    for ctx in extra:
        ctx._attach_waiter(waiter)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for ctx in ctxs:
                ctx._check()
            result = attempt()
            if result is not None:
                return result
            if deadline is None:
                waiter.wait()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                waiter.wait(remaining)
    finally:
        for item in items:
            item._detach(waiter)
        for ctx in extra:
            ctx._detach_waiter(waiter)
