"""Dispatch: the polling-manager thread and the handlers that route each received
email to the subscriptions, service clients and service servers that want it."""

from __future__ import annotations

from emailmw.dispatch.handlers import EmailHandler, ServiceHandler, SubscriptionHandler
from emailmw.dispatch.polling import PollingManager

__all__ = ["EmailHandler", "PollingManager", "ServiceHandler", "SubscriptionHandler"]
