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

from emailmw.context import Context
from emailmw.entity import Entity, check_depth
from emailmw.errors import UnknownRequestError
from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SOURCE_TIMESTAMP,
    Gid,
    ServiceInfo,
    ServiceRequest,
    ServiceRequestId,
)
from emailmw.stats import DropReason
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.validation import validate_payload
from emailmw.waitable import Waitable

__all__ = ["ServiceClient", "ServiceServer"]

logger = logging.getLogger(__name__)

#: How many sent-but-unanswered requests a client remembers.
MAX_PENDING_REQUESTS = 100_000
#: A server keeps the requests it received but has not answered yet, up to
#: ``max(2 * depth, MIN_UNANSWERED_KEPT)`` of them; older ones can no longer be answered.
MIN_UNANSWERED_KEPT = 1_000


def _service_headers(client_gid: Gid, sequence_number: int) -> EmailHeaders:
    headers = EmailHeaders()
    headers[HEADER_SOURCE_TIMESTAMP] = str(time.time_ns())
    headers[HEADER_CLIENT_GID] = client_gid.to_string()
    headers[HEADER_SEQUENCE_NUMBER] = str(sequence_number)
    return headers


class ServiceClient(Entity, Waitable):
    """Sends requests to a service and collects the responses.

    :meth:`send_request` returns a sequence number unique to this client;
    responses are kept by sequence number (up to ``depth`` of them, the oldest
    dropped beyond that) until taken with :meth:`get_response`.
    """

    __slots__ = (
        "_closed",
        "_context",
        "_depth",
        "_gid",
        "_name",
        "_next_sequence_number",
        "_pending",
        "_responses",
        "_sequence",
    )
    _kind = "service"

    def __init__(
        self, service_name: str, *, depth: int | None = None, context: Context | None = None
    ) -> None:
        Waitable.__init__(self)
        self._setup(service_name, context)
        self._depth = check_depth(depth, self._context)
        self._sequence = itertools.count(1)
        self._next_sequence_number = 1
        self._pending: OrderedDict[int, None] = OrderedDict()
        self._responses: dict[int, tuple[str, ServiceInfo]] = {}
        self._context._register_waitable(self)
        delivery = self._context._delivery
        while not delivery.register_service_client(self._gid, self):
            self._gid = Gid.new()  # GID collision with another client of this context

    @property
    def service_name(self) -> str:
        """The service."""
        return self._name

    def send_request(self, request: str) -> int:
        """Send ``request``; return its sequence number. Returns once the transport
        accepted it."""
        if not isinstance(request, str):
            raise TypeError(f"request must be a str, got {type(request).__name__}")
        validate_payload(request, "request")
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
                EmailContent(self._name, request),
                _service_headers(self._gid, sequence_number),
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

    def get_response(self, sequence_number: int) -> str | None:
        """Take the response to ``sequence_number``, or ``None`` if it has not arrived."""
        item = self.get_response_with_info(sequence_number)
        return None if item is None else item[0]

    def get_response_with_info(
        self, sequence_number: int | None = None
    ) -> tuple[str, ServiceInfo] | None:
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

    def _push_response(self, message: str, info: ServiceInfo) -> bool:
        """Keep a response; False if it was dropped (a duplicate, or never requested)."""
        counters = self._context._counters
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


class ServiceServer(Entity, Waitable):
    """Receives requests for a service and sends responses back.

    Requests wait in a bounded queue of ``depth`` entries (the oldest dropped
    beyond that). Answer each one with :meth:`send_response` and its id.
    """

    __slots__ = ("_closed", "_context", "_depth", "_gid", "_name", "_originals", "_queue")
    _kind = "service"

    def __init__(
        self, service_name: str, *, depth: int | None = None, context: Context | None = None
    ) -> None:
        Waitable.__init__(self)
        self._setup(service_name, context)
        self._depth = check_depth(depth, self._context)
        self._queue: deque[tuple[ServiceRequest, ServiceInfo]] = deque()
        self._originals: OrderedDict[ServiceRequestId, EmailData] = OrderedDict()
        self._context._register_waitable(self)
        self._context._delivery.register_service_server(self._name, self)

    @property
    def service_name(self) -> str:
        """The service."""
        return self._name

    def has_request(self) -> bool:
        """True if a request is waiting."""
        self._context._check()
        return bool(self._queue)

    def get_request(self) -> ServiceRequest | None:
        """Take the oldest waiting request, or ``None``."""
        item = self.get_request_with_info()
        return None if item is None else item[0]

    def get_request_with_info(self) -> tuple[ServiceRequest, ServiceInfo] | None:
        """Take the oldest waiting request with its metadata, or ``None``."""
        self._context._check()
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def send_response(self, request_id: ServiceRequestId, response: str) -> None:
        """Reply to the request ``request_id`` with ``response``.

        Raises :class:`~emailmw.UnknownRequestError` if this server has no such
        request waiting for an answer (never received, or answered already), and
        :class:`TypeError` if an argument is not of its type.
        """
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        if not isinstance(request_id, ServiceRequestId):
            raise TypeError(
                f"request_id must be a ServiceRequestId, got {type(request_id).__name__}"
            )
        validate_payload(response, "response")
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
                EmailContent(self._name, response),
                original,
                _service_headers(request_id.client_gid, request_id.sequence_number),
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

    def _push_request(self, email: EmailData, info: ServiceInfo) -> None:
        request_id = ServiceRequestId(info.sequence_number, info.client_gid)
        request = ServiceRequest(request_id, email.content.body)
        with self._lock:
            if request_id in self._originals:
                self._context._counters.drop(DropReason.DUPLICATE)
                return
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
