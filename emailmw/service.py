"""Service clients and servers: request/reply over email.

A request is an email whose subject is the service name, carrying
``Client-GID`` and ``Request-Sequence-Number``. The response is a reply to it
(``In-Reply-To`` the request's ``Message-ID``) carrying the same two headers,
so it reaches only the client that asked, whatever order responses come in.

Sequence numbers start at 1; with ``wire-format: rmw-email`` they start at 0
and every request also carries ``Publisher-GID`` (the client's GID + 1,
modulo 2**32), as the reference implementation's requests do.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Generic, TypeVar, overload

from emailmw.aio import AsyncClientMixin, AsyncServerMixin
from emailmw.context import Context, ContextState
from emailmw.entity import Entity, callback_arity, check_depth
from emailmw.errors import (
    ContextError,
    InvalidMessageError,
    UnknownRequestError,
    WaitTimeoutError,
)
from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_PUBLISHER_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SOURCE_TIMESTAMP,
    Gid,
    ServiceInfo,
    ServiceRequest,
    ServiceRequestId,
)
from emailmw.serialization import HEADER_MESSAGE_TYPE, Serializer, serializer_for
from emailmw.stats import DropReason
from emailmw.timeout import Timeout, to_seconds
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.validation import validate_headers
from emailmw.waitable import Waitable, Waiter, block_until

__all__ = ["ServiceClient", "ServiceServer"]

logger = logging.getLogger(__name__)

#: How many sent-but-unanswered requests a client remembers.
MAX_PENDING_REQUESTS = 100_000
#: A server keeps the requests it received but has not answered yet, up to
#: ``max(2 * depth, MIN_UNANSWERED_KEPT)`` of them; older ones can no longer be answered.
MIN_UNANSWERED_KEPT = 1_000


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _service_headers(
    client_gid: Gid,
    sequence_number: int,
    serializer: Serializer[Any],
    additional_headers: Mapping[str, str] | None,
    *,
    publisher_gid: bool = False,
) -> EmailHeaders:
    """The headers of a request or response; ``publisher_gid`` adds the reference
    implementation's ``Publisher-GID`` (client GID + 1) to a request."""
    headers = EmailHeaders()
    if additional_headers:
        for name, value in validate_headers(additional_headers).items():
            headers[name] = value
    headers[HEADER_SOURCE_TIMESTAMP] = str(time.time_ns())
    headers[HEADER_CLIENT_GID] = client_gid.to_string()
    headers[HEADER_SEQUENCE_NUMBER] = str(sequence_number)
    if publisher_gid:
        headers[HEADER_PUBLISHER_GID] = str((client_gid.value + 1) % 2**32)
    if serializer.header is not None:
        headers[HEADER_MESSAGE_TYPE] = serializer.header
    return headers


class _FutureResolver:
    """Resolves the futures of :meth:`ServiceClient.call_future` outside every
    emailmw lock.

    A response is filed under the delivery core's lock; a future's
    ``set_result`` runs the callbacks users added to it, so it must not run
    there. The client hands the future and its value to the resolver of its
    context instead, whose thread (``emailmw-futures``, one per context,
    started by the first :meth:`ServiceClient.call_future`) resolves it with no
    lock held. The thread sleeps on a :class:`~emailmw.waitable.Waiter` and ends
    when its context shuts down, once it has resolved what it holds.
    """

    def __init__(self, context: Context) -> None:
        self._context = context
        self._lock = threading.Lock()
        self._items: deque[tuple[Future[Any], Any]] = deque()
        self._waiter = Waiter()
        self._running = False

    def start(self) -> None:
        """Have the thread running (it stops after its context shuts down)."""
        with self._lock:
            if self._running:
                return
            self._running = True
        self._context._attach_waiter(self._waiter)
        threading.Thread(target=self._run, name="emailmw-futures", daemon=True).start()

    def put(self, future: Future[Any], value: Any) -> None:
        """Resolve ``future`` with ``value`` soon, in the resolver's thread (any
        thread, any lock held)."""
        with self._lock:
            self._items.append((future, value))
            running = self._running
        if running:
            self._waiter.set()
        else:  # a response racing its context's shutdown: the thread just ended
            self.start()
            self._waiter.set()

    def _run(self) -> None:
        try:
            while True:
                self._waiter.wait()
                with self._lock:
                    items = list(self._items)
                    self._items.clear()
                    if not items and self._context.state is ContextState.SHUT_DOWN:
                        self._running = False
                        return
                for future, value in items:
                    if future.set_running_or_notify_cancel():  # False: cancelled
                        future.set_result(value)
                # Look once more before sleeping: a shutdown that woke this round
                # has been consumed by it.
                self._waiter.set()
        finally:
            with self._lock:
                self._running = False
            self._context._detach_waiter(self._waiter)
            with _resolvers_lock:
                if _resolvers.get(id(self._context)) is self:
                    del _resolvers[id(self._context)]


#: The resolver of each context whose thread runs, by ``id(context)`` (the thread
#: holds the context until it shuts down; the entry goes with the thread).
_resolvers: dict[int, _FutureResolver] = {}
_resolvers_lock = threading.Lock()


def _resolver_for(context: Context) -> _FutureResolver:
    with _resolvers_lock:
        resolver = _resolvers.get(id(context))
        if resolver is None:
            resolver = _resolvers[id(context)] = _FutureResolver(context)
    resolver.start()
    return resolver


def _load(
    serializer: Serializer[Any], body: str, message_type: str | None, what: str
) -> tuple[bool, Any]:
    """``(True, value)``, or ``(False, None)`` after logging why ``body`` is invalid."""
    try:
        return True, serializer.load(body, message_type)
    except InvalidMessageError as exc:
        logger.warning("dropping %s: %s", what, exc)
        return False, None


class ServiceClient(Entity, Waitable, AsyncClientMixin, Generic[Req, Resp]):
    """Sends requests to a service and collects the responses.

    :meth:`send_request` returns a sequence number unique to this client;
    responses are kept by sequence number (up to ``depth`` of them, the oldest
    dropped beyond that) until taken with :meth:`get_response`.
    ``request_type`` and ``response_type`` are ``str`` (the default), ``bytes``
    or anything pydantic can validate (see :mod:`emailmw.serialization`); a
    response that does not validate is dropped and counted as
    ``invalid_message`` (its request stays pending).

    :meth:`call` sends a request and waits for its response in one call;
    :meth:`call_future` returns a :class:`concurrent.futures.Future` instead.
    """

    _kind = "service"

    @overload
    def __init__(
        self: ServiceClient[str, str],
        service_name: str,
        *,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        service_name: str,
        request_type: type[Req],
        response_type: type[Resp],
        *,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        service_name: str,
        request_type: Any = str,
        response_type: Any = str,
        *,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None: ...
    def __init__(
        self,
        service_name: str,
        request_type: Any = str,
        response_type: Any = str,
        *,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None:
        Waitable.__init__(self)
        self._request_serializer: Serializer[Req] = serializer_for(request_type)
        self._response_serializer: Serializer[Resp] = serializer_for(response_type)
        self._plain_responses = response_type is str
        self._request_type = request_type
        self._response_type = response_type
        self._setup(service_name, context)
        self._depth = check_depth(depth, self._context)
        self._rmw_email = self._context.options.wire_format == "rmw-email"
        #: The first sequence number: 0 as in the reference implementation, else 1.
        self._first_sequence_number = 0 if self._rmw_email else 1
        self._sequence = itertools.count(self._first_sequence_number)
        self._next_sequence_number = self._first_sequence_number
        self._pending: OrderedDict[int, None] = OrderedDict()
        self._responses: dict[int, tuple[Resp, ServiceInfo]] = {}
        # call_future(): the futures by sequence number, and who resolves them.
        self._futures: dict[int, Future[Resp]] = {}
        self._resolver: _FutureResolver | None = None
        # Requests given up (call() timed out, future cancelled): a late response
        # to one of them is counted as unmatched.
        self._forgotten: OrderedDict[int, None] = OrderedDict()
        self._context._register_waitable(self)
        delivery = self._context._delivery
        while not delivery.register_service_client(self._gid, self):
            self._gid = Gid.new()  # GID collision with another client of this context

    @property
    def service_name(self) -> str:
        """The service."""
        return self._name

    @property
    def request_type(self) -> Any:
        """The type of the requests (``str`` unless given)."""
        return self._request_type

    @property
    def response_type(self) -> Any:
        """The type of the responses (``str`` unless given)."""
        return self._response_type

    def send_request(
        self, request: Req, additional_headers: Mapping[str, str] | None = None
    ) -> int:
        """Send ``request``; return its sequence number. Returns once the transport
        accepted it.

        Raises :class:`~emailmw.InvalidMessageError` (not a value of the request
        type) or :class:`~emailmw.InvalidHeaderError` before anything is sent.
        """
        return self._send_request(request, additional_headers, None)

    def call(
        self,
        request: Req,
        timeout: Timeout = None,
        *,
        additional_headers: Mapping[str, str] | None = None,
    ) -> Resp:
        """Send ``request`` and wait for its response; return the response.

        ``timeout`` follows the wait rule (seconds or a ``timedelta``; ``None``
        waits forever). Raises :class:`~emailmw.WaitTimeoutError` if no response
        came in time (the request is then forgotten: a response that comes later
        is dropped and counted as ``unmatched``), :class:`~emailmw.ContextError`
        if the context shuts down meanwhile, and whatever :meth:`send_request`
        raises.
        """
        seconds = to_seconds(timeout)
        sequence_number = self._send_request(request, additional_headers, None)
        try:
            item = block_until(
                lambda: self.get_response_with_info(sequence_number), [self], seconds
            )
        except BaseException:
            self._forget(sequence_number)
            raise
        if item is None:
            item = self._forget(sequence_number)  # it may have come just now
            if item is None:
                raise WaitTimeoutError(
                    f"no response to request {sequence_number} on {self._name!r} within {seconds} s"
                )
        return item[0]

    def call_future(
        self, request: Req, *, additional_headers: Mapping[str, str] | None = None
    ) -> Future[Resp]:
        """Send ``request``; return a future of its response.

        The future is resolved by a thread of the context (``emailmw-futures``),
        never under an emailmw lock, so callbacks added with
        ``add_done_callback`` run there. Cancelling it forgets the request (a
        response that comes later is dropped and counted as ``unmatched``);
        :meth:`close` cancels the futures still pending; the context's shutdown
        fails them with :class:`~emailmw.ContextError`. Raises what
        :meth:`send_request` raises, before anything is sent.
        """
        self._context._check()
        if self._resolver is None:
            self._resolver = _resolver_for(self._context)
        future: Future[Resp] = Future()
        sequence_number = self._send_request(request, additional_headers, future)
        future.add_done_callback(functools.partial(self._on_future_done, sequence_number))
        return future

    def _send_request(
        self,
        request: Req,
        additional_headers: Mapping[str, str] | None,
        future: Future[Resp] | None,
    ) -> int:
        body = self._request_serializer.dump(request, "request")
        context = self._context
        context._check()
        context._check_wire_body(body, "request")  # a refused request uses no number
        sequence_number = next(self._sequence)
        with self._lock:
            self._next_sequence_number = max(self._next_sequence_number, sequence_number + 1)
            self._pending[sequence_number] = None
            if future is not None:
                self._futures[sequence_number] = future
            if len(self._pending) > MAX_PENDING_REQUESTS:
                forgotten, _ = self._pending.popitem(last=False)
                self._futures.pop(forgotten, None)  # its future stays unresolved
        try:
            context._send(
                EmailContent(self._name, body, self._request_serializer.media_type),
                _service_headers(
                    self._gid,
                    sequence_number,
                    self._request_serializer,
                    additional_headers,
                    publisher_gid=self._rmw_email,
                ),
            )
        except BaseException:
            with self._lock:
                self._pending.pop(sequence_number, None)
                self._futures.pop(sequence_number, None)
            raise
        return sequence_number

    def has_response(self, sequence_number: int | None = None) -> bool:
        """True if the response to ``sequence_number`` (or any response) is waiting."""
        self._context._check()
        if sequence_number is None:
            return bool(self._responses)
        return sequence_number in self._responses

    def get_response(self, sequence_number: int) -> Resp | None:
        """Take the response to ``sequence_number``, or ``None`` if it has not arrived."""
        item = self.get_response_with_info(sequence_number)
        return None if item is None else item[0]

    def get_response_with_info(
        self, sequence_number: int | None = None
    ) -> tuple[Resp, ServiceInfo] | None:
        """Take the response to ``sequence_number`` (or the oldest waiting response
        when ``None``) with its metadata, or ``None``."""
        self._context._check()
        with self._lock:
            if sequence_number is None:
                if not self._responses:
                    return None
                sequence_number = next(iter(self._responses))
            return self._responses.pop(sequence_number, None)

    # -- internal ------------------------------------------------------------------------

    def _forget(self, sequence_number: int) -> tuple[Resp, ServiceInfo] | None:
        """Stop waiting for ``sequence_number``; return its response if it came."""
        with self._lock:
            item = self._responses.pop(sequence_number, None)
            if item is None and self._pending.pop(sequence_number, 0) is None:
                self._forgotten[sequence_number] = None
                if len(self._forgotten) > MAX_PENDING_REQUESTS:
                    self._forgotten.popitem(last=False)
            self._futures.pop(sequence_number, None)
        return item

    def _on_future_done(self, sequence_number: int, future: Future[Resp]) -> None:
        if future.cancelled():
            self._forget(sequence_number)

    def _take_futures(self) -> list[Future[Resp]]:
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
        return futures

    def _unregister(self) -> None:
        self._context._delivery.unregister_service_client(self._gid)

    def _wake(self) -> None:
        # close() and the context's shutdown come here, with no lock held: end the
        # futures still pending (their callbacks run in this thread).
        super()._wake()
        if self._closed:
            for future in self._take_futures():
                future.cancel()
        elif self._context.state is ContextState.SHUT_DOWN:
            for future in self._take_futures():
                if future.set_running_or_notify_cancel():
                    future.set_exception(
                        ContextError(f"context shut down before the response on {self._name!r}")
                    )

    @property
    def _waitable_context(self) -> Context:
        return self._context

    def _is_ready(self) -> bool:
        return self.has_response()

    def _push_response(self, body: str, message_type: str | None, info: ServiceInfo) -> bool:
        """Keep a response; False if it was dropped (a duplicate, never requested, or
        not a valid response)."""
        counters = self._context._counters
        sequence_number = info.sequence_number
        message: Any = body  # as it is for str responses, and for one dropped below
        if not self._plain_responses and sequence_number in self._pending:
            valid, message = _load(
                self._response_serializer,
                body,
                message_type,
                f"response {info.sequence_number} on {self._name[:80]!r}",
            )
            if not valid:
                counters.drop(DropReason.INVALID_MESSAGE)
                return False
        with self._lock:
            if sequence_number not in self._pending:
                # A request given up (a call() that timed out, a cancelled future)
                # no longer wants its response. Other numbers this client handed
                # out were answered before; any other number was never requested.
                if self._forgotten.pop(sequence_number, 0) is None:
                    counters.drop(DropReason.UNMATCHED)
                    return False
                issued = self._first_sequence_number <= sequence_number < self._next_sequence_number
                counters.drop(DropReason.DUPLICATE if issued else DropReason.UNMATCHED)
                return False
            del self._pending[sequence_number]
            future = self._futures.pop(sequence_number, None)
            if future is None:
                if len(self._responses) >= self._depth:
                    del self._responses[next(iter(self._responses))]
                    counters.drop(DropReason.QUEUE_FULL)
                self._responses[sequence_number] = (message, info)
                for waiter in self._waiters:
                    waiter.set()
        if future is not None:
            assert self._resolver is not None  # set before any future exists
            self._resolver.put(future, message)  # resolved outside this lock
        counters.add("delivered")
        return True


class ServiceServer(Entity, Waitable, AsyncServerMixin, Generic[Req, Resp]):
    """Receives requests for a service and sends responses back.

    Requests wait in a bounded queue of ``depth`` entries (the oldest dropped
    beyond that). Answer each one with :meth:`send_response` and its id.
    ``request_type`` and ``response_type`` as for :class:`ServiceClient`; a
    request that does not validate is dropped and counted as ``invalid_message``.

    With a ``handler``, an :class:`~emailmw.Executor` (or :func:`emailmw.spin`)
    takes the queued requests and calls ``handler(request)``, or
    ``handler(request, info)`` if it has two required positional parameters
    (``request`` is the typed content, ``info`` the :class:`ServiceInfo`); its
    return value is sent as the response. If the handler raises (or its
    return value cannot be sent: not of the response type, a transport error),
    the error is logged and counted as ``callback_errors`` and **no response is
    sent**: the client's :meth:`ServiceClient.call` times out.
    """

    _kind = "service"

    @overload
    def __init__(
        self: ServiceServer[str, str],
        service_name: str,
        *,
        handler: Callable[[str], str] | Callable[[str, ServiceInfo], str] | None = None,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        service_name: str,
        request_type: type[Req],
        response_type: type[Resp],
        *,
        handler: Callable[[Req], Resp] | Callable[[Req, ServiceInfo], Resp] | None = None,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        service_name: str,
        request_type: Any = str,
        response_type: Any = str,
        *,
        handler: Callable[[Any], Any] | Callable[[Any, ServiceInfo], Any] | None = None,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None: ...
    def __init__(
        self,
        service_name: str,
        request_type: Any = str,
        response_type: Any = str,
        *,
        handler: Callable[..., Any] | None = None,
        depth: int | None = None,
        context: Context | None = None,
    ) -> None:
        Waitable.__init__(self)
        self._request_serializer: Serializer[Req] = serializer_for(request_type)
        self._response_serializer: Serializer[Resp] = serializer_for(response_type)
        self._plain_requests = request_type is str
        self._request_type = request_type
        self._response_type = response_type
        self._handler = handler
        self._handler_arity = 0 if handler is None else callback_arity(handler, "handler")
        self._setup(service_name, context)
        self._depth = check_depth(depth, self._context)
        self._queue: deque[tuple[ServiceRequest[Req], ServiceInfo]] = deque()
        self._originals: OrderedDict[ServiceRequestId, EmailData] = OrderedDict()
        self._context._register_waitable(self)
        self._context._delivery.register_service_server(self._name, self)
        if handler is not None:
            self._context._set_callback_entity(self, True)

    @property
    def service_name(self) -> str:
        """The service."""
        return self._name

    @property
    def request_type(self) -> Any:
        """The type of the requests (``str`` unless given)."""
        return self._request_type

    @property
    def response_type(self) -> Any:
        """The type of the responses (``str`` unless given)."""
        return self._response_type

    @property
    def handler(self) -> Callable[..., Any] | None:
        """The handler an :class:`~emailmw.Executor` runs for each request, if any."""
        return self._handler

    def has_request(self) -> bool:
        """True if a request is waiting."""
        self._context._check()
        return bool(self._queue)

    def get_request(self) -> ServiceRequest[Req] | None:
        """Take the oldest waiting request, or ``None``."""
        item = self.get_request_with_info()
        return None if item is None else item[0]

    def get_request_with_info(self) -> tuple[ServiceRequest[Req], ServiceInfo] | None:
        """Take the oldest waiting request with its metadata, or ``None``."""
        self._context._check()
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def send_response(
        self,
        request_id: ServiceRequestId,
        response: Resp,
        additional_headers: Mapping[str, str] | None = None,
    ) -> None:
        """Reply to the request ``request_id`` with ``response``.

        Raises :class:`~emailmw.UnknownRequestError` if this server has no such
        request waiting for an answer (never received, or answered already),
        :class:`~emailmw.InvalidMessageError` if ``response`` is not a value of
        the response type, and :class:`TypeError` if ``request_id`` is not one.
        """
        body = self._response_serializer.dump(response, "response")
        if not isinstance(request_id, ServiceRequestId):
            raise TypeError(
                f"request_id must be a ServiceRequestId, got {type(request_id).__name__}"
            )
        context = self._context
        context._check()
        with self._lock:
            original = self._originals.pop(request_id, None)
        if original is None:
            raise UnknownRequestError(
                f"no request {request_id.sequence_number} from client "
                f"{request_id.client_gid.value} is waiting for a response on "
                f"{self._name!r}"
            )
        try:
            context._reply(
                EmailContent(self._name, body, self._response_serializer.media_type),
                original,
                _service_headers(
                    request_id.client_gid,
                    request_id.sequence_number,
                    self._response_serializer,
                    additional_headers,
                ),
            )
        except BaseException:
            with self._lock:
                self._originals[request_id] = original
            raise

    # -- internal ------------------------------------------------------------------------

    def _unregister(self) -> None:
        self._context._delivery.unregister_service_server(self._name, self)

    def _has_callback(self) -> bool:
        return self._handler is not None

    def _callback_description(self) -> str:
        return "handler"

    def _take_callback(self) -> Callable[[], object] | None:
        handler = self._handler
        if handler is None or self._closed:
            return None
        with self._lock:
            if not self._queue:
                return None
            request, info = self._queue.popleft()
        return functools.partial(self._answer, handler, request, info)

    def _answer(
        self, handler: Callable[..., Any], request: ServiceRequest[Req], info: ServiceInfo
    ) -> None:
        """Run ``handler`` on ``request`` and send what it returns (executor thread)."""
        try:
            if self._handler_arity == 2:
                response = handler(request.content, info)
            else:
                response = handler(request.content)
            self.send_response(request.id, response)
        except Exception:
            logger.exception(
                "handler of %r failed on request %d of client %d: no response is sent",
                self,
                request.id.sequence_number,
                request.id.client_gid.value,
            )
            self._context._counters.add("callback_errors")

    @property
    def _waitable_context(self) -> Context:
        return self._context

    def _is_ready(self) -> bool:
        return self.has_request()

    def _push_request(self, email: EmailData, info: ServiceInfo) -> bool:
        request_id = ServiceRequestId(info.sequence_number, info.client_gid)
        content: Any = email.content.body  # as it is for str requests
        if not self._plain_requests:
            valid, content = _load(
                self._request_serializer,
                email.content.body,
                email.headers.get(HEADER_MESSAGE_TYPE),
                f"request {info.sequence_number} of client {info.client_gid.value} "
                f"on {self._name[:80]!r}",
            )
            if not valid:
                self._context._counters.drop(DropReason.INVALID_MESSAGE)
                return False
        request: ServiceRequest[Req] = ServiceRequest(request_id, content)
        with self._lock:
            if request_id in self._originals:
                self._context._counters.drop(DropReason.DUPLICATE)
                return False
            if len(self._queue) >= self._depth:
                dropped, _ = self._queue.popleft()
                self._originals.pop(dropped.id, None)
                self._context._counters.drop(DropReason.QUEUE_FULL)
            self._queue.append((request, info))
            self._originals[request_id] = email
            # Requests taken but never answered: keep their originals bounded too.
            while len(self._originals) > max(2 * self._depth, MIN_UNANSWERED_KEPT):
                self._originals.popitem(last=False)
            for waiter in self._waiters:
                waiter.set()
        return True
