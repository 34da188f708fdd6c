"""Waiting: wait sets, guard conditions and the ``wait_for_*`` helpers.

Every wait follows one rule for its timeout: seconds (``float``) or a
:class:`~datetime.timedelta`; ``None`` or negative waits forever; ``0`` does
not block. Waiting is event-driven (no polling) and a context's shutdown wakes
every waiter, which then raises :class:`~emailmw.ContextError`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, TypeVar

from emailmw.context import Context
from emailmw.errors import GuardConditionInUseError, WaitTimeoutError
from emailmw.info import MessageInfo, ServiceInfo, ServiceRequest
from emailmw.pubsub import Subscription
from emailmw.service import ServiceClient, ServiceServer
from emailmw.timeout import Timeout, to_seconds
from emailmw.waitable import Waitable, block_until

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

__all__ = [
    "GuardCondition",
    "WaitSet",
    "wait_for_message",
    "wait_for_message_with_info",
    "wait_for_request",
    "wait_for_request_with_info",
    "wait_for_response",
    "wait_for_response_with_info",
]


class GuardCondition(Waitable):
    """A flag that one thread triggers to wake a wait set in another.

    A guard condition belongs to at most one wait set at a time (see
    :meth:`exchange_in_use`). A wait set that reports it ready also resets it.
    """

    __slots__ = ("_in_use", "_triggered")

    def __init__(self) -> None:
        super().__init__()
        self._triggered = False
        self._in_use = False

    def trigger(self) -> None:
        """Set the flag and wake the wait set waiting on it. Thread-safe."""
        with self._lock:
            self._triggered = True
            self._wake_locked()

    def triggered(self) -> bool:
        """True if triggered and not reset since."""
        return self._triggered

    def reset(self) -> None:
        """Clear the flag."""
        with self._lock:
            self._triggered = False

    def exchange_in_use(self, in_use: bool) -> bool:
        """Atomically set whether a wait set holds this; return the previous value."""
        with self._lock:
            previous = self._in_use
            self._in_use = in_use
            return previous

    def _is_ready(self) -> bool:
        return self._triggered

    def __repr__(self) -> str:
        return f"<GuardCondition triggered={self._triggered}>"


class WaitSet:
    """Waits until at least one of its subscriptions, clients, servers or guard
    conditions is ready.

    Add entities, call :meth:`wait`, then read :attr:`subscriptions`,
    :attr:`clients`, :attr:`servers` and :attr:`guard_conditions`: they hold the
    entities that were ready. A wait set can wait many times on the same
    entities; :meth:`clear` empties it. Waiting on an empty wait set sleeps.
    ``context`` (optional) is a context whose shutdown also ends the wait.
    """

    def __init__(self, *, context: Context | None = None) -> None:
        self._context = context
        self._subscriptions: list[Subscription[Any]] = []
        self._clients: list[ServiceClient[Any, Any]] = []
        self._servers: list[ServiceServer[Any, Any]] = []
        self._guard_conditions: list[GuardCondition] = []
        self._ready_subscriptions: list[Subscription[Any]] = []
        self._ready_clients: list[ServiceClient[Any, Any]] = []
        self._ready_servers: list[ServiceServer[Any, Any]] = []
        self._ready_guard_conditions: list[GuardCondition] = []

    def add_subscription(self, subscription: Subscription[Any]) -> None:
        """Wait for messages on ``subscription`` too."""
        _add_once(self._subscriptions, subscription, Subscription)

    def add_client(self, client: ServiceClient[Any, Any]) -> None:
        """Wait for responses to ``client`` too."""
        _add_once(self._clients, client, ServiceClient)

    def add_server(self, server: ServiceServer[Any, Any]) -> None:
        """Wait for requests to ``server`` too."""
        _add_once(self._servers, server, ServiceServer)

    def add_guard_condition(self, guard_condition: GuardCondition) -> None:
        """Wait for ``guard_condition`` to be triggered too.

        Raises :class:`~emailmw.GuardConditionInUseError` if it is in another
        wait set.
        """
        if not isinstance(guard_condition, GuardCondition):
            raise TypeError(f"expected a GuardCondition, got {type(guard_condition).__name__}")
        if any(g is guard_condition for g in self._guard_conditions):
            return
        if guard_condition.exchange_in_use(True):
            raise GuardConditionInUseError("guard condition is already in another wait set")
        self._guard_conditions.append(guard_condition)

    @property
    def subscriptions(self) -> list[Subscription[Any]]:
        """The subscriptions that had a message when the last :meth:`wait` returned."""
        return list(self._ready_subscriptions)

    @property
    def clients(self) -> list[ServiceClient[Any, Any]]:
        """The clients that had a response when the last :meth:`wait` returned."""
        return list(self._ready_clients)

    @property
    def servers(self) -> list[ServiceServer[Any, Any]]:
        """The servers that had a request when the last :meth:`wait` returned."""
        return list(self._ready_servers)

    @property
    def guard_conditions(self) -> list[GuardCondition]:
        """The guard conditions that were triggered (and are now reset)."""
        return list(self._ready_guard_conditions)

    def wait(self, timeout: Timeout = None) -> bool:
        """Block until something is ready; True if so, False on timeout."""
        seconds = to_seconds(timeout)
        waitables: list[Waitable] = [
            *self._subscriptions,
            *self._clients,
            *self._servers,
            *self._guard_conditions,
        ]
        if not waitables:
            self._set_ready([], [], [], [])
            if self._context is not None:
                block_until(lambda: None, [], seconds, [self._context])
            elif seconds is None:
                threading.Event().wait()
            elif seconds > 0:
                time.sleep(seconds)
            return False
        contexts = [self._context] if self._context is not None else []
        ready = block_until(self._collect, waitables, seconds, contexts)
        if ready is None:
            self._set_ready([], [], [], [])
            return False
        return True

    def clear(self) -> None:
        """Remove every entity (and release the guard conditions)."""
        for guard_condition in self._guard_conditions:
            guard_condition.exchange_in_use(False)
        self._subscriptions.clear()
        self._clients.clear()
        self._servers.clear()
        self._guard_conditions.clear()
        self._set_ready([], [], [], [])

    def __del__(self) -> None:
        for guard_condition in getattr(self, "_guard_conditions", ()):
            guard_condition.exchange_in_use(False)

    def _collect(self) -> bool | None:
        subs = [s for s in self._subscriptions if s._is_ready()]
        clients = [c for c in self._clients if c._is_ready()]
        servers = [s for s in self._servers if s._is_ready()]
        guards = []
        for guard_condition in self._guard_conditions:
            with guard_condition._lock:
                if guard_condition._triggered:
                    guard_condition._triggered = False
                    guards.append(guard_condition)
        if not (subs or clients or servers or guards):
            return None
        self._set_ready(subs, clients, servers, guards)
        return True

    def _set_ready(
        self,
        subs: list[Subscription[Any]],
        clients: list[ServiceClient[Any, Any]],
        servers: list[ServiceServer[Any, Any]],
        guards: list[GuardCondition],
    ) -> None:
        self._ready_subscriptions = subs
        self._ready_clients = clients
        self._ready_servers = servers
        self._ready_guard_conditions = guards


def _add_once(items: list[Any], item: object, kind: type) -> None:
    if not isinstance(item, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(item).__name__}")
    if not any(existing is item for existing in items):
        items.append(item)


def _describe(timeout: Timeout) -> str:
    return f"{to_seconds(timeout)} s"


def wait_for_message_with_info(
    subscription: Subscription[T], timeout: Timeout = None
) -> tuple[T, MessageInfo]:
    """Wait for the next message on ``subscription`` and take it with its metadata.

    Raises :class:`~emailmw.WaitTimeoutError` on timeout.
    """
    item = block_until(subscription.get_message_with_info, [subscription], to_seconds(timeout))
    if item is None:
        raise WaitTimeoutError(
            f"no message on {subscription.topic_name!r} within {_describe(timeout)}"
        )
    return item


def wait_for_message(subscription: Subscription[T], timeout: Timeout = None) -> T:
    """Wait for the next message on ``subscription`` and take it."""
    return wait_for_message_with_info(subscription, timeout)[0]


def wait_for_request_with_info(
    server: ServiceServer[Req, Resp], timeout: Timeout = None
) -> tuple[ServiceRequest[Req], ServiceInfo]:
    """Wait for the next request to ``server`` and take it with its metadata.

    Raises :class:`~emailmw.WaitTimeoutError` on timeout.
    """
    item = block_until(server.get_request_with_info, [server], to_seconds(timeout))
    if item is None:
        raise WaitTimeoutError(
            f"no request for {server.service_name!r} within {_describe(timeout)}"
        )
    return item


def wait_for_request(
    server: ServiceServer[Req, Resp], timeout: Timeout = None
) -> ServiceRequest[Req]:
    """Wait for the next request to ``server`` and take it."""
    return wait_for_request_with_info(server, timeout)[0]


def wait_for_response_with_info(
    sequence_number: int, client: ServiceClient[Req, Resp], timeout: Timeout = None
) -> tuple[Resp, ServiceInfo]:
    """Wait for the response to request ``sequence_number`` of ``client`` and take it
    with its metadata (other responses that arrive meanwhile stay queued).

    Raises :class:`~emailmw.WaitTimeoutError` on timeout.
    """
    item = block_until(
        lambda: client.get_response_with_info(sequence_number), [client], to_seconds(timeout)
    )
    if item is None:
        raise WaitTimeoutError(
            f"no response to request {sequence_number} on {client.service_name!r} "
            f"within {_describe(timeout)}"
        )
    return item


def wait_for_response(
    sequence_number: int, client: ServiceClient[Req, Resp], timeout: Timeout = None
) -> Resp:
    """Wait for the response to request ``sequence_number`` of ``client`` and take it."""
    return wait_for_response_with_info(sequence_number, client, timeout)[0]
