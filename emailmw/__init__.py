"""emailmw: pub/sub messages and request/reply services over email.

Quick start (no mail server needed)::

    from pydantic import BaseModel

    import emailmw

    class Point(BaseModel):
        x: float
        y: float

    emailmw.init(emailmw.Options(intraprocess=True))
    sub = emailmw.Subscription("/points", Point)  # str if no type is given
    emailmw.Publisher("/points", Point).publish(Point(x=1, y=2))
    print(emailmw.wait_for_message(sub, timeout=1.0))
    emailmw.shutdown()

Callbacks run in an :class:`Executor` (or ``emailmw.spin()``); every entity also
has an asyncio twin (``apublish``, ``aget``, ``async for``, ``acall``, ...).

Everything listed in ``__all__`` is the public API.
"""

from __future__ import annotations

from emailmw.context import Context, ContextState, init, shutdown, stats
from emailmw.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ConnectionLimitError,
    ContextError,
    DurableNameInUseError,
    EmailmwError,
    GuardConditionInUseError,
    ImapError,
    InvalidHeaderError,
    InvalidMessageError,
    InvalidNameError,
    MessageTypeError,
    RecipientsRefusedError,
    SmtpError,
    StateStoreError,
    TlsError,
    TransportError,
    UnknownRequestError,
    WaitTimeoutError,
)
from emailmw.executor import Executor, spin
from emailmw.info import (
    Gid,
    MessageInfo,
    ServiceInfo,
    ServiceRequest,
    ServiceRequestId,
    Timestamp,
)
from emailmw.metrics import ConnectionState, Metrics
from emailmw.options import Options
from emailmw.pubsub import Publisher, Subscription
from emailmw.service import ServiceClient, ServiceServer
from emailmw.stats import DropReason, Stats
from emailmw.wait import (
    GuardCondition,
    WaitSet,
    wait_for_message,
    wait_for_message_with_info,
    wait_for_request,
    wait_for_request_with_info,
    wait_for_response,
    wait_for_response_with_info,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "ConnectionLimitError",
    "ConnectionState",
    "Context",
    "ContextError",
    "ContextState",
    "DropReason",
    "DurableNameInUseError",
    "EmailmwError",
    "Executor",
    "Gid",
    "GuardCondition",
    "GuardConditionInUseError",
    "ImapError",
    "InvalidHeaderError",
    "InvalidMessageError",
    "InvalidNameError",
    "MessageInfo",
    "MessageTypeError",
    "Metrics",
    "Options",
    "Publisher",
    "RecipientsRefusedError",
    "ServiceClient",
    "ServiceInfo",
    "ServiceRequest",
    "ServiceRequestId",
    "ServiceServer",
    "SmtpError",
    "StateStoreError",
    "Stats",
    "Subscription",
    "Timestamp",
    "TlsError",
    "TransportError",
    "UnknownRequestError",
    "WaitSet",
    "WaitTimeoutError",
    "__version__",
    "init",
    "shutdown",
    "spin",
    "stats",
    "wait_for_message",
    "wait_for_message_with_info",
    "wait_for_request",
    "wait_for_request_with_info",
    "wait_for_response",
    "wait_for_response_with_info",
]
