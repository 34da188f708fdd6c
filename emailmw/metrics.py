"""Metrics: latency histograms, connection states and the snapshot that
:meth:`emailmw.Context.metrics` returns.

* :class:`Histogram`: fixed, log-spaced buckets (:data:`LATENCY_BUCKETS`, 10 µs
  to 100 s, four per decade, and one above), so its memory is bounded whatever
  it sees; thread-safe; an observation is a bisection and an increment under a
  lock (a few hundred nanoseconds).
* :class:`ConnectionState`: where a connection stands (``connected``,
  ``reconnecting``, ``auth_failed``, ...), a ``str`` enum.
* :class:`ConnectionTracker`: the state of each of a context's connections
  (``smtp``, ``imap``, ``intraprocess``), set by the transports.
* :class:`Metrics`, :class:`HistogramSnapshot`: consistent copies to read.

Standalone: imports no other emailmw module (the transports use it).
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import threading
from dataclasses import dataclass, field

__all__ = [
    "LATENCY_BUCKETS",
    "ConnectionState",
    "ConnectionTracker",
    "Histogram",
    "HistogramSnapshot",
    "Metrics",
]

#: Upper bounds (seconds, inclusive) of the latency buckets: 10 µs to 100 s,
#: four per decade (each about 1.78 times the one before). A value above the
#: last bound falls in the overflow bucket.
LATENCY_BUCKETS: tuple[float, ...] = tuple(float(f"{10 ** (e / 4):.6g}") for e in range(-20, 9))


class ConnectionState(enum.StrEnum):
    """Where a connection (or a whole context, see :attr:`emailmw.Context.connection_state`)
    stands."""

    DISCONNECTED = "disconnected"  #: not connected (not yet, or it failed to connect)
    CONNECTING = "connecting"  #: the first connection is being made
    CONNECTED = "connected"  #: the last use of the server succeeded
    RECONNECTING = "reconnecting"  #: the connection was lost; trying again (with backoff)
    AUTH_FAILED = "auth_failed"  #: the server refused the credentials at the last attempt
    CLOSED = "closed"  #: closed on purpose (shut down)


# worst first: what a context reports when its connections disagree
_SEVERITY = {
    ConnectionState.AUTH_FAILED: 0,
    ConnectionState.RECONNECTING: 1,
    ConnectionState.DISCONNECTED: 2,
    ConnectionState.CONNECTING: 3,
    ConnectionState.CONNECTED: 4,
    ConnectionState.CLOSED: 5,
}


class ConnectionTracker:
    """The state of each connection of a context, by name; thread-safe."""

    __slots__ = ("_changes", "_lock", "_states")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, ConnectionState] = {}
        self._changes = 0

    def set(self, connection: str, state: ConnectionState) -> None:
        """Record that ``connection`` (``smtp``, ``imap``, ...) is now in ``state``."""
        with self._lock:
            if self._states.get(connection) is not state:
                self._states[connection] = state
                self._changes += 1

    def close(self, connection: str) -> None:
        """Record that ``connection`` was closed on purpose: ``closed``, unless the server
        refused the credentials (``auth_failed`` stays, to say why it is not connected)."""
        with self._lock:
            if self._states.get(connection) not in (
                ConnectionState.CLOSED,
                ConnectionState.AUTH_FAILED,
            ):
                self._states[connection] = ConnectionState.CLOSED
                self._changes += 1

    def states(self) -> dict[str, ConnectionState]:
        """A copy of every connection's state."""
        with self._lock:
            return dict(self._states)

    @property
    def changes(self) -> int:
        """How many times a state changed (a reconnect is two changes)."""
        return self._changes

    def worst(self) -> ConnectionState | None:
        """The most troubled state of any connection (``auth_failed`` first, then
        ``reconnecting``, ...), or None when none is known."""
        with self._lock:
            states = list(self._states.values())
        return min(states, key=_SEVERITY.__getitem__) if states else None


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A copy of a :class:`Histogram`: ``counts[i]`` values were at most
    ``bounds[i]`` (and above ``bounds[i - 1]``); the last count is the overflow
    bucket (above every bound)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    @property
    def mean(self) -> float:
        """The mean of the values (NaN when there were none)."""
        return self.sum / self.count if self.count else math.nan

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values at most that)`` per bucket, the last bound being
        ``inf`` (the Prometheus ``le`` buckets)."""
        running = 0
        result: list[tuple[float, int]] = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result

    def quantile(self, q: float) -> float:
        """An upper estimate of quantile ``q`` (0 < q <= 1): the bound of the bucket
        where it falls (``inf`` in the overflow bucket, NaN with no values)."""
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q!r}")
        if not self.count:
            return math.nan
        rank = q * self.count
        for bound, running in self.cumulative():
            if running >= rank:
                return bound
        return math.inf  # unreachable: the last cumulative count is the total


class Histogram:
    """Counts values (seconds) in fixed buckets; thread-safe, bounded memory.

    A negative or NaN value (clocks of two hosts that disagree) counts as 0.
    """

    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if not bounds or any(not 0 < b < math.inf for b in bounds):
            raise ValueError("bounds must be finite positive numbers")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError("bounds must be strictly increasing")
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Count one value."""
        if not seconds > 0:
            seconds = 0.0
        index = bisect.bisect_left(self._bounds, seconds)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        """A consistent copy."""
        with self._lock:
            counts = tuple(self._counts)
            total = self._sum
        return HistogramSnapshot(self._bounds, counts, sum(counts), total)

    @staticmethod
    def merge(snapshots: list[HistogramSnapshot]) -> HistogramSnapshot:
        """One snapshot counting the values of all of ``snapshots`` (same bounds)."""
        if not snapshots:
            return Histogram().snapshot()
        bounds = snapshots[0].bounds
        if any(s.bounds != bounds for s in snapshots):
            raise ValueError("cannot merge histograms with different bounds")
        counts = tuple(sum(column) for column in zip(*(s.counts for s in snapshots), strict=True))
        return HistogramSnapshot(
            bounds, counts, sum(s.count for s in snapshots), sum(s.sum for s in snapshots)
        )


@dataclass(frozen=True, slots=True)
class Metrics:
    """A snapshot of what a context is doing (see :meth:`emailmw.Context.metrics`).

    ``counters`` only grow: ``sent``, ``send_retries``, ``send_failures``,
    ``received``, ``delivered``, ``reconnects``, ``callback_errors``, ``resyncs``,
    ``dropped`` (all reasons), ``imap_commands`` and ``imap_bytes_received``
    (0 on the intraprocess transport). ``dropped`` counts by
    :class:`~emailmw.DropReason` value. ``gauges`` go up and down:
    ``held_messages`` (waiting for an earlier message of their publisher),
    ``publisher_streams``, ``uptime_seconds``.

    ``histograms`` (seconds):

    ``send_seconds``
        ``publish()`` (or a request, or a response) until the SMTP server
        accepted the email; on the intraprocess transport, until it was handed
        over (which may include delivering it to local subscriptions).
    ``delivery_seconds``
        the email's ``Source-Timestamp`` until the message (request,
        response) was in this process's hands (its ``received_timestamp``).
        Between hosts this includes their clock difference.
    ``imap_command_seconds``
        the round trip of every IMAP command of the receiver (``NOOP``,
        ``UID FETCH``, ``EXAMINE``, ``IDLE`` until the server's continuation,
        ``DONE``); by command in ``imap_commands``.
    """

    connection_state: ConnectionState
    connections: dict[str, ConnectionState] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, HistogramSnapshot] = field(default_factory=dict)
    imap_commands: dict[str, HistogramSnapshot] = field(default_factory=dict)
