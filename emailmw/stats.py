"""Counters of what a context sent, received, delivered and dropped."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

from emailmw.metrics import ConnectionTracker, Histogram

__all__ = ["DropReason", "Stats", "StatsCounters"]


class DropReason(enum.Enum):
    """Why an email (or a queued entry) was not delivered."""

    NOT_EMAILMW = "not_emailmw"  #: an email that is not an emailmw message
    MALFORMED = "malformed"  #: claims to be emailmw but cannot be decoded
    UNSIGNED = "unsigned"  #: a signing key is set and the email has no signature
    BAD_SIGNATURE = "bad_signature"  #: the signature does not verify
    REPLAY = "replay"  #: a signed email seen before, or older than ``max-age``
    #: a fresh signed email refused because the replay memory is full
    REPLAY_MEMORY_FULL = "replay_memory_full"
    SENDER_NOT_ALLOWED = "sender_not_allowed"  #: ``From`` not in ``allowed-senders``
    TOO_LARGE = "too_large"  #: bigger than ``max-message-size``
    QUEUE_FULL = "queue_full"  #: an entity's queue was full; the oldest entry was dropped
    DUPLICATE = "duplicate"  #: the same Message-ID or response was delivered already
    INVALID_MESSAGE = "invalid_message"  #: the body does not validate as the receiver's type
    UNMATCHED = "unmatched"  #: no subscription, server or client wanted it
    #: skipped, without downloading its body, by the re-read of a folder whose
    #: UIDVALIDITY changed: handled before, or older than the receiver can vouch for
    RESYNC_SKIPPED = "resync_skipped"


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a context's counters (see :meth:`emailmw.Context.stats`)."""

    sent: int = 0
    send_retries: int = 0
    send_failures: int = 0
    received: int = 0
    delivered: int = 0
    reconnects: int = 0
    #: callbacks and service handlers that raised (see :class:`~emailmw.Executor`)
    callback_errors: int = 0
    #: UIDVALIDITY changes handled (the folder was recreated): by the receiver, and
    #: by each durable subscription that finds its folder recreated
    resyncs: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        """Every drop, whatever the reason."""
        return sum(self.dropped.values())


class StatsCounters:
    """The live, thread-safe counters behind :class:`Stats`, and the live metrics
    behind :class:`~emailmw.metrics.Metrics`: the latency histograms
    (``send_latency``, ``delivery_latency``, IMAP round trips by command through
    :meth:`observe_imap`) and the state of each connection (``connections``)."""

    __slots__ = (
        "_counts",
        "_dropped",
        "_imap",
        "_lock",
        "connections",
        "delivery_latency",
        "send_latency",
    )

    _NAMES = (
        "sent",
        "send_retries",
        "send_failures",
        "received",
        "delivered",
        "reconnects",
        "callback_errors",
        "resyncs",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self._NAMES, 0)
        self._dropped = {reason.value: 0 for reason in DropReason}
        self._imap: dict[str, Histogram] = {}
        #: publish (request, response) until the server accepted it, in seconds
        self.send_latency = Histogram()
        #: Source-Timestamp until the message was in this process's hands, in seconds
        self.delivery_latency = Histogram()
        self.connections = ConnectionTracker()

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` (one of :class:`Stats`' int fields)."""
        with self._lock:
            self._counts[name] += amount

    def drop(self, reason: DropReason, amount: int = 1) -> None:
        """Count ``amount`` drops for ``reason``."""
        with self._lock:
            self._dropped[reason.value] += amount

    def snapshot(self) -> Stats:
        """A consistent copy of every counter."""
        with self._lock:
            return Stats(dropped=dict(self._dropped), **self._counts)

    def observe_imap(self, command: str, seconds: float) -> None:
        """Count the round trip of one IMAP ``command`` (``NOOP``, ``UID FETCH``, ...)."""
        histogram = self._imap.get(command)
        if histogram is None:
            with self._lock:
                histogram = self._imap.setdefault(command, Histogram())
        histogram.observe(seconds)

    def imap_round_trips(self) -> dict[str, Histogram]:
        """The IMAP round-trip histograms by command."""
        with self._lock:
            return dict(self._imap)
