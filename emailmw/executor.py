"""Executors: run the callbacks of subscriptions and the handlers of service servers.

An entity with a callback (``Subscription(..., callback=f)``,
``ServiceServer(..., handler=h)``) queues what it receives like any other
entity; an :class:`Executor` it was added to takes the queued items out and
calls the user code, in the executor's threads and outside every emailmw lock
(the queues are filled under the delivery core's lock; an executor holds only
its own lock while it takes an item, never while it runs one).

The semantics follow rclpy's executors:

* :meth:`Executor.spin` runs callbacks until :meth:`Executor.shutdown`, the
  context's shutdown or the timeout; :meth:`Executor.spin_once` runs at most one.
* ``threads=1`` (rclpy's ``SingleThreadedExecutor``): every callback runs in the
  thread that called :meth:`~Executor.spin`. ``threads=N``
  (``MultiThreadedExecutor``): :meth:`~Executor.spin` runs callbacks in its own
  thread and ``N - 1`` helper threads (``emailmw-executor-1``, ...) started for
  the spin and joined before it returns.
* The callbacks of **one entity never run concurrently** (rclpy's default,
  mutually exclusive callback group): its messages reach its callback one at a
  time and in order. The callbacks of different entities run in parallel when
  ``threads > 1``. Entities are served in turn (round robin).
* A callback that raises is logged and counted (``Stats.callback_errors``), and
  spinning goes on. ``KeyboardInterrupt`` and other ``BaseException`` end the
  spin and are raised from :meth:`~Executor.spin`.
* Waiting is event-driven: a spinning thread sleeps on a
  :class:`~emailmw.waitable.Waiter` attached to every entity it serves, to the
  context (its shutdown) and to the executor (``add``, ``remove``,
  ``shutdown``). An idle executor uses no CPU.

An entity belongs to at most one executor at a time. :func:`spin` runs, for the
global context, every entity with a callback that is in no executor: the context
keeps a registry of its callback entities (held weakly) and one executor of its
own for :func:`spin`, which follows that registry (an entity created while it
spins is served from then on).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeAlias, cast

from emailmw.context import Context, get_global_context, resolve_context
from emailmw.errors import ContextError
from emailmw.pubsub import Subscription
from emailmw.service import ServiceServer
from emailmw.timeout import Timeout, to_seconds
from emailmw.waitable import Waiter

__all__ = ["Executor", "spin"]

logger = logging.getLogger(__name__)

#: What an executor runs: an entity created with a callback or a handler.
CallbackEntity: TypeAlias = "Subscription[Any] | ServiceServer[Any, Any]"


class Executor:
    """Runs the callbacks of the entities added to it (see the module docstring).

    ``context`` is the context of those entities (the global one when ``None``);
    ``threads`` how many threads :meth:`spin` runs callbacks in (default 1).
    """

    def __init__(self, *, context: Context | None = None, threads: int = 1) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self._context = resolve_context(context)
        self._threads = threads
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a callback ends
        self._entities: list[CallbackEntity] = []
        self._version = 0  # changes whenever _entities does
        self._follow = False  # spin()'s executor: also every free callback entity
        self._busy: set[int] = set()  # id() of the entities whose callback runs now
        self._running = 0  # callbacks running now
        self._next = 0  # where the next round robin starts
        self._watchers: set[Waiter] = set()  # one per spinning thread
        self._thread_ids: set[int] = set()  # the spinning threads
        self._spinning = False
        self._stop_spin = False  # the current spin() is over: helpers stop
        self._shutdown = False

    # -- entities ---------------------------------------------------------------------

    @property
    def context(self) -> Context:
        """The context of this executor's entities."""
        return self._context

    @property
    def threads(self) -> int:
        """How many threads :meth:`spin` runs callbacks in."""
        return self._threads

    @property
    def entities(self) -> list[CallbackEntity]:
        """The entities added (and not removed or closed since)."""
        with self._lock:
            return [e for e in self._entities if not e.closed]

    def add(self, entity: CallbackEntity) -> None:
        """Run ``entity``'s callback (or handler) from now on.

        Raises :class:`TypeError` unless it is a :class:`~emailmw.Subscription` or
        :class:`~emailmw.ServiceServer`, and :class:`ValueError` if it has no
        callback, is closed, belongs to another context or is in another
        executor. Adding it twice is a no-op.
        """
        if not isinstance(entity, (Subscription, ServiceServer)):
            raise TypeError(
                f"an executor runs subscriptions and service servers, got {type(entity).__name__}"
            )
        if not entity._has_callback():
            what = "callback" if isinstance(entity, Subscription) else "handler"
            raise ValueError(f"{entity!r} has no {what}: create it with {what}=...")
        if entity._context is not self._context:
            raise ValueError(f"{entity!r} belongs to another context than this executor")
        if entity.closed:
            raise ValueError(f"{entity!r} is closed")
        with entity._lock:
            owner = entity._executor
            if owner is self:
                return
            if owner is not None:
                raise ValueError(f"{entity!r} is already in another executor")
            entity._executor = self
        with self._lock:
            self._entities.append(entity)
            self._changed_locked()

    def remove(self, entity: CallbackEntity) -> None:
        """Stop running ``entity``'s callback (one that is running completes).
        A no-op if it is not in this executor."""
        with self._lock:
            if not any(e is entity for e in self._entities):
                return
            self._entities = [e for e in self._entities if e is not entity]
            self._changed_locked()
        self._release(entity)

    # -- spinning ---------------------------------------------------------------------

    def spin(self, timeout: Timeout = None) -> None:
        """Run callbacks as their items come, until :meth:`shutdown`, the context's
        shutdown, or ``timeout`` (the wait rule: seconds or a ``timedelta``;
        ``None`` spins until one of the others).

        Returns at once if the executor or the context is shut down already.
        Raises :class:`RuntimeError` if this executor is spinning already (in
        another thread, or from one of its own callbacks).
        """
        deadline = _deadline(timeout)
        if not self._begin_spin():
            return
        failures: list[BaseException] = []
        helpers = [
            threading.Thread(
                target=self._helper,
                args=(deadline, failures),
                name=f"emailmw-executor-{index}",
                daemon=True,
            )
            for index in range(1, self._threads)
        ]
        try:
            for helper in helpers:
                helper.start()
            self._work(deadline, once=False)
        finally:
            with self._lock:
                self._stop_spin = True
                watchers = list(self._watchers)
            for waiter in watchers:
                waiter.set()
            for helper in helpers:
                if helper.ident is not None:
                    helper.join()
            self._end_spin()
        if failures:
            raise failures[0]

    def spin_once(self, timeout: Timeout = None) -> bool:
        """Run at most one callback, waiting up to ``timeout`` for one to be ready
        (``0``: do not wait; ``None``: until one is, or a shutdown).

        Runs in the calling thread, whatever ``threads``. Returns True if a
        callback ran (even one that raised), False on timeout or shutdown.
        """
        deadline = _deadline(timeout)
        if not self._begin_spin():
            return False
        try:
            return self._work(deadline, once=True)
        finally:
            self._end_spin()

    def shutdown(self, timeout: Timeout = None) -> bool:
        """Stop spinning, and remove every entity (they can join another executor).

        A :meth:`spin` in progress returns once its running callbacks complete;
        later spins return at once. Waits up to ``timeout`` (``None``: forever)
        for the running callbacks to complete, unless called from one of them.
        Returns True if none is running when it returns. Idempotent.
        """
        seconds = to_seconds(timeout)
        with self._lock:
            self._shutdown = True
            entities, self._entities = self._entities, []
            self._changed_locked()
        for entity in entities:
            self._release(entity)
        with self._lock:
            if threading.get_ident() in self._thread_ids:
                return self._running <= 1  # this callback itself is running
            return self._idle.wait_for(lambda: self._running == 0, seconds)

    def __repr__(self) -> str:
        return (
            f"<Executor threads={self._threads} entities={len(self._entities)}"
            f"{' shut down' if self._shutdown else ''}>"
        )

    # -- internal ---------------------------------------------------------------------

    def _changed_locked(self) -> None:
        """The entities changed (or a stop was asked): wake every spinning thread."""
        self._version += 1
        for waiter in self._watchers:
            waiter.set()

    def _release(self, entity: CallbackEntity) -> None:
        with entity._lock:
            if entity._executor is self:
                entity._executor = None

    def _begin_spin(self) -> bool:
        with self._lock:
            if self._spinning:
                raise RuntimeError(f"{self!r} is spinning already")
            if self._shutdown or not self._context.ok:
                return False
            self._spinning = True
            self._stop_spin = False
            return True

    def _end_spin(self) -> None:
        with self._lock:
            self._spinning = False

    def _helper(self, deadline: float | None, failures: list[BaseException]) -> None:
        try:
            self._work(deadline, once=False)
        except BaseException as exc:  # hand it to spin(), which raises it
            failures.append(exc)
            with self._lock:
                self._stop_spin = True
                self._changed_locked()

    def _stopped_locked(self) -> bool:
        return self._shutdown or self._stop_spin or not self._context.ok

    def _current_locked(self) -> tuple[tuple[int, int], list[CallbackEntity]]:
        """The entities to serve now, and a version that changes when they do."""
        entities = self._entities
        if not self._follow:
            return (self._version, 0), entities
        generation, registered = self._context._callback_entity_list()
        free = [
            cast("CallbackEntity", e)
            for e in registered
            if cast("CallbackEntity", e)._executor is None
        ]
        return (self._version, generation), [*entities, *free]

    def _work(self, deadline: float | None, *, once: bool) -> bool:
        """Take and run callbacks in this thread until stopped; True if any ran."""
        waiter = Waiter()
        attached: dict[int, weakref.ref[CallbackEntity]] = {}
        seen: tuple[int, int] | None = None
        ran = False
        me = threading.get_ident()
        context = self._context
        with self._lock:
            self._watchers.add(waiter)
            self._thread_ids.add(me)
        context._attach_waiter(waiter)
        if self._follow:
            context._watch_callback_entities(waiter, True)
        try:
            while True:
                with self._lock:
                    if self._stopped_locked():
                        return ran
                    version, entities = self._current_locked()
                    if version != seen:  # attach to the new entities, detach from the gone
                        seen = version
                        _sync_attached(waiter, attached, entities)
                    taken = self._take_locked(entities)
                if taken is not None:
                    entity, work = taken
                    try:
                        self._run(entity, work)
                    finally:
                        with self._lock:
                            self._busy.discard(id(entity))
                            self._running -= 1
                            self._idle.notify_all()
                    ran = True
                    if once:
                        return True
                    continue
                if deadline is None:
                    waiter.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not waiter.wait(remaining):
                        return ran
        finally:
            if self._follow:
                context._watch_callback_entities(waiter, False)
            context._detach_waiter(waiter)
            for ref in attached.values():
                entity_alive = ref()
                if entity_alive is not None:
                    entity_alive._detach(waiter)
            with self._lock:
                self._watchers.discard(waiter)
                self._thread_ids.discard(me)

    def _take_locked(
        self, entities: list[CallbackEntity]
    ) -> tuple[CallbackEntity, Callable[[], object]] | None:
        """The next entity in turn with an item (not busy), and the call to make."""
        count = len(entities)
        closed = False
        for step in range(count):
            index = (self._next + step) % count
            entity = entities[index]
            if id(entity) in self._busy:
                continue
            if entity.closed:
                closed = True
                continue
            work = entity._take_callback()
            if work is not None:
                self._busy.add(id(entity))
                self._running += 1
                self._next = index + 1
                return entity, work
        if closed:  # forget the closed entities (they are out of the registry already)
            self._entities = [e for e in self._entities if not e.closed]
            self._version += 1
        return None

    def _run(self, entity: CallbackEntity, work: Callable[[], object]) -> None:
        try:
            work()
        except Exception:
            logger.exception("%s of %r raised", entity._callback_description(), entity)
            entity._context._counters.add("callback_errors")


def _sync_attached(
    waiter: Waiter,
    attached: dict[int, weakref.ref[CallbackEntity]],
    entities: list[CallbackEntity],
) -> None:
    """Attach ``waiter`` to every entity of ``entities`` and detach it from the others."""
    current = {id(e): e for e in entities}
    for key, ref in list(attached.items()):
        entity = ref()
        if entity is None or current.get(key) is not entity:
            del attached[key]
            if entity is not None:
                entity._detach(waiter)
    for key, entity in current.items():
        if key not in attached:
            entity._attach(waiter)
            attached[key] = weakref.ref(entity)


def _deadline(timeout: Timeout) -> float | None:
    seconds = to_seconds(timeout)
    return None if seconds is None else time.monotonic() + seconds


_spin_lock = threading.Lock()


def spin(timeout: Timeout = None) -> None:
    """Run the callbacks of every entity of the global context that has one (and
    is in no :class:`Executor` of its own), in this thread, until the context
    shuts down or ``timeout`` passes.

    Entities created while it spins are served from then on; keep a reference
    to them (one that is garbage-collected is dropped). Returns at once if the
    global context is shut down. Raises :class:`~emailmw.ContextError` if
    :func:`emailmw.init` was never called, :class:`RuntimeError` if another
    :func:`spin` of the same context runs.
    """
    context = get_global_context()
    if not context.ok:  # shut down already: nothing to spin, as Executor.spin
        return
    with _spin_lock:
        executor = cast("Executor | None", context._spin_executor)
        if executor is None:
            try:
                executor = Executor(context=context)
            except ContextError:  # shut down meanwhile
                return
            executor._follow = True
            context._spin_executor = executor
    executor.spin(timeout)
