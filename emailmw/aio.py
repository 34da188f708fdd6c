"""asyncio: the awaitable twins of the blocking calls, as mixins of the entity
classes and the context.

Each ``a``-method does what its blocking twin does (httpx's sync/async
symmetry) without blocking the running event loop:

* sending (``apublish``, the request of ``acall``, ``asend_response``) can block
  on SMTP, so it runs in the loop's default executor (a worker thread);
* waiting (``aget``, ``async for``, the response of ``acall``, ``aget_request``)
  holds no thread: it attaches a :class:`LoopWaiter` to the entity, whose
  :meth:`~LoopWaiter.set` (called by whichever emailmw thread queued an item,
  or by the context's shutdown, or by ``close()``) resolves a future on the
  loop with ``loop.call_soon_threadsafe``. The awaiting task then takes the
  item itself, so a task cancelled in between takes nothing: the item stays
  queued for the next ``aget``.

``Context.__aenter__``/``__aexit__`` run ``init()`` and ``shutdown()`` in a
worker thread. This module sits at the context layer and depends on small
protocols, not on the entity classes, so that the context and the entities can
all take its mixins.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Protocol, TypeVar

from emailmw.errors import ContextError, WaitTimeoutError
from emailmw.info import MessageInfo, ServiceInfo, ServiceRequest, ServiceRequestId
from emailmw.timeout import Timeout, to_seconds
from emailmw.waitable import Waiter

__all__ = [
    "AsyncClientMixin",
    "AsyncContextMixin",
    "AsyncPublisherMixin",
    "AsyncServerMixin",
    "AsyncSubscriptionMixin",
    "LoopWaiter",
]

logger = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)
Resp_co = TypeVar("Resp_co", covariant=True)
Req_contra = TypeVar("Req_contra", contravariant=True)
Resp_contra = TypeVar("Resp_contra", contravariant=True)


class LoopWaiter(Waiter):
    """A :class:`~emailmw.waitable.Waiter` that wakes a task instead of a thread.

    :meth:`set` may be called from any thread (often with emailmw locks held):
    it only schedules the resolution of a future on the loop, with
    ``call_soon_threadsafe``; a future that is already done (woken, or
    cancelled with its task) is left alone, and a closed loop is ignored.
    The task awaits :meth:`sleep`; the blocking :meth:`wait` is refused.
    """

    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Not Waiter.__init__: this waiter has no lock, only a future.
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        """Wake the awaiting task (or let its next :meth:`sleep` return at once)."""
        future = self._future
        if future.done():
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to wake
            self._loop.call_soon_threadsafe(_resolve, future)

    def is_set(self) -> bool:
        """True if a wake-up is waiting to be consumed by :meth:`sleep`."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Refused: a loop waiter is awaited (:meth:`sleep`), never blocked on."""
        raise RuntimeError("a LoopWaiter is awaited with sleep(), not waited on by a thread")

    async def sleep(self, deadline: float | None) -> bool:
        """Sleep until set (consuming it) or until ``deadline`` (``loop.time()``);
        True if set. Must be awaited on the waiter's loop."""
        future = self._future
        if not future.done():
            if deadline is None:
                await future
            else:
                remaining = deadline - self._loop.time()
                if remaining > 0:
                    await asyncio.wait((future,), timeout=remaining)
        if not future.done():
            return False
        self._future = self._loop.create_future()
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Attachable(Protocol):
    """What awaiting needs of an entity: attach and detach a waiter."""

    def _attach(self, waiter: Waiter) -> None: ...
    def _detach(self, waiter: Waiter) -> None: ...


async def _await_ready(
    attempt: Callable[[], R | None], waitable: _Attachable, timeout: float | None
) -> R | None:
    """The asyncio twin of :func:`~emailmw.waitable.block_until` for one waitable:
    call ``attempt`` until it returns something other than ``None``, sleeping on
    a :class:`LoopWaiter` in between. ``None`` on timeout. The waiter is detached
    however this ends (a result, an error, a timeout or a cancellation)."""
    result = attempt()
    if result is not None or timeout == 0:
        return result
    loop = asyncio.get_running_loop()
    waiter = LoopWaiter(loop)
    waitable._attach(waiter)
    try:
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            result = attempt()  # again, now that a push cannot go unnoticed
            if result is not None:
                return result
            if not await waiter.sleep(deadline):
                return None
    finally:
        waitable._detach(waiter)


async def _in_thread(function: Callable[[], R]) -> R:
    """Run ``function`` in the running loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, function)


# -- publishers and subscriptions ------------------------------------------------------


class _Publishes(Protocol[T_contra]):
    def publish(
        self, message: T_contra, additional_headers: Mapping[str, str] | None = None
    ) -> None: ...


class _Subscribed(_Attachable, Protocol[T_co]):
    @property
    def topic_name(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def get_message_with_info(self) -> tuple[T_co, MessageInfo] | None: ...


class AsyncPublisherMixin:
    """``apublish`` for :class:`~emailmw.Publisher`."""

    __slots__ = ()

    async def apublish(
        self: _Publishes[T], message: T, additional_headers: Mapping[str, str] | None = None
    ) -> None:
        """:meth:`~emailmw.Publisher.publish` without blocking the event loop: the
        sending runs in a worker thread. Raises what ``publish()`` raises.
        Cancelling the awaiting task does not recall a message already handed
        to the transport."""
        await _in_thread(lambda: self.publish(message, additional_headers))


class _End:
    """Returned by the iteration's attempt once the subscription is closed and empty."""


_END = _End()


class AsyncSubscriptionMixin:
    """``aget``, ``aget_with_info`` and ``async for`` for :class:`~emailmw.Subscription`."""

    __slots__ = ()

    async def aget_with_info(
        self: _Subscribed[T], timeout: Timeout = None
    ) -> tuple[T, MessageInfo]:
        """Await the next message with its metadata (the asyncio twin of
        :func:`~emailmw.wait_for_message_with_info`).

        Raises :class:`~emailmw.WaitTimeoutError` on timeout and
        :class:`~emailmw.ContextError` if the context shuts down. A cancelled
        ``aget`` takes nothing: a message that arrives afterwards stays queued.
        """
        return await _next_message(self, timeout)

    async def aget(self: _Subscribed[T], timeout: Timeout = None) -> T:
        """Await the next message (see :meth:`aget_with_info`)."""
        return (await _next_message(self, timeout))[0]

    def __aiter__(self: _Subscribed[T]) -> AsyncIterator[T]:
        """``async for message in subscription``: the messages as they come.

        Ends when the subscription is closed (after the messages already queued)
        or when the context shuts down, like nats.py's ``messages`` iterator.
        """
        return _iterate(self)


async def _next_message(subscription: _Subscribed[T], timeout: Timeout) -> tuple[T, MessageInfo]:
    seconds = to_seconds(timeout)
    item = await _await_ready(subscription.get_message_with_info, subscription, seconds)
    if item is None:
        raise WaitTimeoutError(f"no message on {subscription.topic_name!r} within {seconds} s")
    return item


async def _iterate(subscription: _Subscribed[T]) -> AsyncIterator[T]:
    def attempt() -> tuple[T, MessageInfo] | _End | None:
        try:
            item = subscription.get_message_with_info()
        except ContextError:  # shut down
            return _END
        if item is None and subscription.closed:
            return _END
        return item

    while True:
        item: tuple[T, MessageInfo] | _End | None = await _await_ready(attempt, subscription, None)
        if item is None or isinstance(item, _End):
            return
        yield item[0]


# -- service clients and servers -------------------------------------------------------


class _Calls(_Attachable, Protocol[Req_contra, Resp_co]):
    _lock: _thread.LockType

    @property
    def service_name(self) -> str: ...
    @property
    def _pending(self) -> MutableMapping[int, None]: ...
    @property
    def _responses(self) -> MutableMapping[int, Any]: ...
    def send_request(
        self, request: Req_contra, additional_headers: Mapping[str, str] | None = None
    ) -> int: ...
    def get_response_with_info(
        self, sequence_number: int | None = None
    ) -> tuple[Resp_co, ServiceInfo] | None: ...


class _Serves(_Attachable, Protocol[T, Resp_contra]):
    @property
    def service_name(self) -> str: ...
    def get_request_with_info(self) -> tuple[ServiceRequest[T], ServiceInfo] | None: ...
    def send_response(
        self,
        request_id: ServiceRequestId,
        response: Resp_contra,
        additional_headers: Mapping[str, str] | None = None,
    ) -> None: ...


def _forget_request(client: _Calls[Any, Any], sequence_number: int) -> None:
    """Stop expecting the response to ``sequence_number`` (a late one is dropped and
    counted) and drop it if it came already."""
    with client._lock:
        client._pending.pop(sequence_number, None)
        client._responses.pop(sequence_number, None)


class AsyncClientMixin:
    """``acall`` and ``acall_with_info`` for :class:`~emailmw.ServiceClient`."""

    __slots__ = ()

    async def acall_with_info(
        self: _Calls[T, R],
        request: T,
        timeout: Timeout = None,
        *,
        additional_headers: Mapping[str, str] | None = None,
    ) -> tuple[R, ServiceInfo]:
        """Send ``request`` (in a worker thread) and await its response with its
        metadata.

        ``timeout`` counts from when the request was sent. On timeout raises
        :class:`~emailmw.WaitTimeoutError`; then, and when the awaiting task is
        cancelled, the request is forgotten: a response that comes later is
        dropped (counted as ``duplicate``), never queued.
        """
        return await _call(self, request, timeout, additional_headers)

    async def acall(
        self: _Calls[T, R],
        request: T,
        timeout: Timeout = None,
        *,
        additional_headers: Mapping[str, str] | None = None,
    ) -> R:
        """Send ``request`` and await its response (see :meth:`acall_with_info`)."""
        return (await _call(self, request, timeout, additional_headers))[0]


async def _call(
    client: _Calls[T, R],
    request: T,
    timeout: Timeout,
    additional_headers: Mapping[str, str] | None,
) -> tuple[R, ServiceInfo]:
    seconds = to_seconds(timeout)
    sending = asyncio.get_running_loop().run_in_executor(
        None, lambda: client.send_request(request, additional_headers)
    )
    try:
        sequence_number = await asyncio.shield(sending)
    except asyncio.CancelledError:
        # The send goes on in its thread: forget its number once it has one.
        sending.add_done_callback(
            lambda done: (
                None
                if done.cancelled() or done.exception() is not None
                else _forget_request(client, done.result())
            )
        )
        raise
    item: tuple[R, ServiceInfo] | None = None
    try:
        item = await _await_ready(
            lambda: client.get_response_with_info(sequence_number), client, seconds
        )
    finally:
        if item is None:  # timed out, cancelled or shut down
            _forget_request(client, sequence_number)
    if item is None:
        raise WaitTimeoutError(
            f"no response to request {sequence_number} on {client.service_name!r} "
            f"within {seconds} s"
        )
    return item


class AsyncServerMixin:
    """``aget_request``, ``aget_request_with_info`` and ``asend_response`` for
    :class:`~emailmw.ServiceServer`."""

    __slots__ = ()

    async def aget_request_with_info(
        self: _Serves[T, Any], timeout: Timeout = None
    ) -> tuple[ServiceRequest[T], ServiceInfo]:
        """Await the next request with its metadata (the asyncio twin of
        :func:`~emailmw.wait_for_request_with_info`).

        Raises :class:`~emailmw.WaitTimeoutError` on timeout and
        :class:`~emailmw.ContextError` if the context shuts down.
        """
        return await _next_request(self, timeout)

    async def aget_request(self: _Serves[T, Any], timeout: Timeout = None) -> ServiceRequest[T]:
        """Await the next request (see :meth:`aget_request_with_info`)."""
        return (await _next_request(self, timeout))[0]

    async def asend_response(
        self: _Serves[Any, T],
        request_id: ServiceRequestId,
        response: T,
        additional_headers: Mapping[str, str] | None = None,
    ) -> None:
        """:meth:`~emailmw.ServiceServer.send_response` in a worker thread."""
        await _in_thread(lambda: self.send_response(request_id, response, additional_headers))


async def _next_request(
    server: _Serves[T, Any], timeout: Timeout
) -> tuple[ServiceRequest[T], ServiceInfo]:
    seconds = to_seconds(timeout)
    item = await _await_ready(server.get_request_with_info, server, seconds)
    if item is None:
        raise WaitTimeoutError(f"no request for {server.service_name!r} within {seconds} s")
    return item


# -- the context -----------------------------------------------------------------------


class _ContextManager(Protocol):
    def __enter__(self) -> Any: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    def shutdown(self) -> bool: ...


C = TypeVar("C", bound=_ContextManager)


class AsyncContextMixin:
    """``async with Context(options) as ctx:`` for :class:`~emailmw.Context`."""

    __slots__ = ()

    async def __aenter__(self: C) -> C:
        """What ``with`` does on entry (``init()`` unless running already), in a
        worker thread. If the awaiting task is cancelled meanwhile, the context
        is shut down (which aborts the connection in progress)."""
        try:
            await _in_thread(self.__enter__)
        except asyncio.CancelledError:
            await asyncio.shield(_in_thread(self.shutdown))
            raise
        return self

    async def __aexit__(
        self: C,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``shutdown()`` in a worker thread."""
        await asyncio.shield(_in_thread(lambda: self.__exit__(exc_type, exc, tb)))
