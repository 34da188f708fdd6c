"""Service clients and servers: request/reply over email.

A request is an email whose subject is the service name, carrying
``Client-GID`` and ``Request-Sequence-Number``. The response is a reply to it
(``In-Reply-To`` the request's ``Message-ID``) carrying the same two headers,
so it reaches only the client that asked, whatever order responses come in.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, Generic, TypeVar, overload

from emailmw.aio import AsyncClientMixin, AsyncServerMixin
from emailmw.context import Context
from emailmw.entity import Entity, check_depth
from emailmw.errors import InvalidMessageError, UnknownRequestError
from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SOURCE_TIMESTAMP,
    Gid,
    ServiceInfo,
    ServiceRequest,
    ServiceRequestId,
)
from emailmw.serialization import HEADER_MESSAGE_TYPE, Serializer, serializer_for
from emailmw.stats import DropReason
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.validation import validate_headers
from emailmw.waitable import Waitable

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
) -> EmailHeaders:
    headers = EmailHeaders()
    if additional_headers:
        for name, value in validate_headers(additional_headers).items():
            headers[name] = value
    headers[HEADER_SOURCE_TIMESTAMP] = str(time.time_ns())
    headers[HEADER_CLIENT_GID] = client_gid.to_string()
    headers[HEADER_SEQUENCE_NUMBER] = str(sequence_number)
    if serializer.header is not None:
        headers[HEADER_MESSAGE_TYPE] = serializer.header
    return headers


def _load(
    serializer: Serializer[Any], plain: bool, body: str, message_type: str | None, what: str
) -> tuple[bool, Any]:
    """``(True, value)``, or ``(False, None)`` after logging why ``body`` is invalid."""
    if plain:
        return True, body
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
        self._sequence = itertools.count(1)
        self._next_sequence_number = 1
        self._pending: OrderedDict[int, None] = OrderedDict()
        self._responses: dict[int, tuple[Resp, ServiceInfo]] = {}
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
        body = self._request_serializer.dump(request, "request")
        context = self._context
        context._check()
        sequence_number = next(self._sequence)
        with self._lock:
            self._next_sequence_number = max(self._next_sequence_number, sequence_number + 1)
            self._pending[sequence_number] = None
            if len(self._pending) > MAX_PENDING_REQUESTS:
                self._pending.popitem(last=False)
        try:
            context._send(
                EmailContent(self._name, body, self._request_serializer.media_type),
                _service_headers(
                    self._gid, sequence_number, self._request_serializer, additional_headers
                ),
            )
        except BaseException:
            with self._lock:
                self._pending.pop(sequence_number, None)
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

    def _unregister(self) -> None:
        self._context._delivery.unregister_service_client(self._gid)

    @property
    def _waitable_context(self) -> Context:
        return self._context

    def _is_ready(self) -> bool:
        return self.has_response()

    def _push_response(self, body: str, message_type: str | None, info: ServiceInfo) -> bool:
        """Keep a response; False if it was dropped (a duplicate, never requested, or
        not a valid response)."""
        counters = self._context._counters
        if info.sequence_number in self._pending:
            valid, message = _load(
                self._response_serializer,
                self._plain_responses,
                body,
                message_type,
                f"response {info.sequence_number} on {self._name[:80]!r}",
            )
            if not valid:
                counters.drop(DropReason.INVALID_MESSAGE)
                return False
        else:
            message = body  # dropped below, whatever it holds
        with self._lock:
            if info.sequence_number not in self._pending:
                # Numbers this client handed out already were answered before (or
                # forgotten); any other number was never requested by this client.
                issued = 0 < info.sequence_number < self._next_sequence_number
                counters.drop(DropReason.DUPLICATE if issued else DropReason.UNMATCHED)
                return False
            del self._pending[info.sequence_number]
            if len(self._responses) >= self._depth:
                del self._responses[next(iter(self._responses))]
                counters.drop(DropReason.QUEUE_FULL)
            self._responses[info.sequence_number] = (message, info)
            for waiter in self._waiters:
                waiter.set()
        counters.add("delivered")
        return True


class ServiceServer(Entity, Waitable, AsyncServerMixin, Generic[Req, Resp]):
    """Receives requests for a service and sends responses back.

    Requests wait in a bounded queue of ``depth`` entries (the oldest dropped
    beyond that). Answer each one with :meth:`send_response` and its id.
    ``request_type`` and ``response_type`` as for :class:`ServiceClient`; a
    request that does not validate is dropped and counted as ``invalid_message``.
    """

    _kind = "service"

    @overload
    def __init__(
        self: ServiceServer[str, str],
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
        self._plain_requests = request_type is str
        self._request_type = request_type
        self._response_type = response_type
        self._setup(service_name, context)
        self._depth = check_depth(depth, self._context)
        self._queue: deque[tuple[ServiceRequest[Req], ServiceInfo]] = deque()
        self._originals: OrderedDict[ServiceRequestId, EmailData] = OrderedDict()
        self._context._register_waitable(self)
        self._context._delivery.register_service_server(self._name, self)

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

    @property
    def _waitable_context(self) -> Context:
        return self._context

    def _is_ready(self) -> bool:
        return self.has_request()

    def _push_request(self, email: EmailData, info: ServiceInfo) -> bool:
        request_id = ServiceRequestId(info.sequence_number, info.client_gid)
        valid, content = _load(
            self._request_serializer,
            self._plain_requests,
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
