"""Serving a context's metrics in the Prometheus / OpenMetrics text format.

Used only when the config sets ``metrics-port``; needs the optional extra
``emailmw[metrics]`` (the ``prometheus_client`` package), which is imported
here and nowhere else. :func:`start_metrics_server` binds ``metrics-address``
(default ``127.0.0.1``) and serves ``/metrics`` (any path, in fact) on a
daemon thread named ``emailmw-metrics``; each scrape takes a fresh
:class:`~emailmw.metrics.Metrics` snapshot.

What is exported (``emailmw_`` prefix)::

    emailmw_sent_total, ..._received_total, ..._delivered_total, ...   counters
    emailmw_dropped_total{reason="..."}                                 by DropReason
    emailmw_held_messages, ..._publisher_streams, ..._uptime_seconds    gauges
    emailmw_connection_state{state="..."}                               1 for the current one
    emailmw_transport_connection_state{connection="imap",state="..."}   per connection
    emailmw_send_seconds, emailmw_delivery_seconds                      histograms
    emailmw_imap_command_seconds{command="NOOP"}                        histogram by command
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from emailmw.errors import ConfigError
from emailmw.metrics import ConnectionState, HistogramSnapshot, Metrics

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["MetricsServer", "start_metrics_server"]

logger = logging.getLogger(__name__)

_PREFIX = "emailmw_"
_COUNTER_HELP = {
    "sent": "emails sent (messages, requests, responses)",
    "send_retries": "send attempts repeated after a temporary failure",
    "send_failures": "sends that failed for good",
    "received": "emails received",
    "delivered": "messages, requests and responses handed to an entity",
    "reconnects": "connections lost and made again (SMTP and IMAP)",
    "callback_errors": "callbacks and service handlers that raised",
    "imap_commands": "tagged IMAP commands sent by the receiver",
    "imap_bytes_received": "bytes read from the IMAP server by the receiver",
}
_GAUGE_HELP = {
    "held_messages": "messages held back, waiting for an earlier one of their publisher",
    "publisher_streams": "publisher streams whose order is tracked",
    "uptime_seconds": "seconds since the context started running",
}
_HISTOGRAM_HELP = {
    "send_seconds": "publish (request, response) until the server accepted the email",
    "delivery_seconds": "Source-Timestamp until the message was in this process's hands",
}


def _buckets(snapshot: HistogramSnapshot) -> list[tuple[str, float]]:
    return [
        ("+Inf" if math.isinf(bound) else repr(bound), float(count))
        for bound, count in snapshot.cumulative()
    ]


class _Collector:
    """A prometheus_client collector that reads a fresh snapshot on each scrape."""

    def __init__(self, read: Callable[[], Metrics]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        metrics = self._read()
        for name, value in metrics.counters.items():
            if name == "dropped":
                continue  # by reason below
            yield CounterMetricFamily(
                _PREFIX + name, _COUNTER_HELP.get(name, name), value=float(value)
            )
        dropped = CounterMetricFamily(
            _PREFIX + "dropped", "emails or entries not delivered, by reason", labels=["reason"]
        )
        for reason, count in sorted(metrics.dropped.items()):
            dropped.add_metric([reason], float(count))
        yield dropped
        for gauge, level in metrics.gauges.items():
            yield GaugeMetricFamily(_PREFIX + gauge, _GAUGE_HELP.get(gauge, gauge), value=level)
        overall = GaugeMetricFamily(
            _PREFIX + "connection_state",
            "the context's connection state (1 for the current one)",
            labels=["state"],
        )
        for state in ConnectionState:
            overall.add_metric([state.value], 1.0 if state is metrics.connection_state else 0.0)
        yield overall
        each = GaugeMetricFamily(
            _PREFIX + "transport_connection_state",
            "each connection's state (1 for the current one)",
            labels=["connection", "state"],
        )
        for connection, current in sorted(metrics.connections.items()):
            for state in ConnectionState:
                each.add_metric([connection, state.value], 1.0 if state is current else 0.0)
        yield each
        for name, help_text in _HISTOGRAM_HELP.items():
            snapshot = metrics.histograms.get(name)
            if snapshot is not None:
                yield HistogramMetricFamily(
                    _PREFIX + name, help_text, buckets=_buckets(snapshot), sum_value=snapshot.sum
                )
        imap = HistogramMetricFamily(
            _PREFIX + "imap_command_seconds",
            "round trip of the receiver's IMAP commands",
            labels=["command"],
        )
        for command, snapshot in metrics.imap_commands.items():
            imap.add_metric([command], _buckets(snapshot), snapshot.sum)
        yield imap


class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it."""

    def __init__(self, server: object, thread: threading.Thread, address: tuple[str, int]) -> None:
        self._server = server
        self._thread = thread
        self.address = address  #: (host, port) bound

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        server = self._server
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=1.0)


def _registry(read: Callable[[], Metrics]) -> CollectorRegistry:
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(read))
    return registry


def render(read: Callable[[], Metrics]) -> str:
    """The Prometheus text format of one snapshot (what a scrape returns)."""
    from prometheus_client.exposition import generate_latest

    return generate_latest(_registry(read)).decode("utf-8")


def start_metrics_server(read: Callable[[], Metrics], host: str, port: int) -> MetricsServer:
    """Serve ``read()`` over HTTP on ``host:port`` (port 0: any free one).

    Raises :class:`~emailmw.ConfigError` naming ``email.metrics-port`` when
    ``prometheus_client`` is not installed or the address cannot be bound.
    """
    try:
        from prometheus_client.exposition import start_http_server
    except ImportError:
        raise ConfigError(
            "email.metrics-port is set, but the prometheus_client package is not installed: "
            "pip install 'emailmw[metrics]' (or remove metrics-port)",
            key="email.metrics-port",
        ) from None
    try:
        server, thread = start_http_server(port, addr=host, registry=_registry(read))
    except OSError as exc:
        raise ConfigError(
            f"email.metrics-port: cannot serve the metrics on {host}:{port}: {exc.strerror or exc}",
            key="email.metrics-port",
        ) from exc
    thread.name = "emailmw-metrics"
    bound = server.server_address
    address = (str(bound[0]), int(bound[1]))
    logger.info("serving metrics on http://%s:%d/metrics", *address)
    return MetricsServer(server, thread, address)
