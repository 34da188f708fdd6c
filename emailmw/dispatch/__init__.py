"""Dispatch: the delivery core (admission, duplicates, order, expiry, routing under
one lock), the polling-manager thread that feeds it, and the handlers that route
each email to the subscriptions, service clients and service servers that want it."""

from __future__ import annotations

from emailmw.dispatch.core import DeliveryCore
from emailmw.dispatch.handlers import EmailHandler, ServiceHandler, SubscriptionHandler
from emailmw.dispatch.polling import PollingManager

__all__ = [
    "DeliveryCore",
    "EmailHandler",
    "PollingManager",
    "ServiceHandler",
    "SubscriptionHandler",
]
