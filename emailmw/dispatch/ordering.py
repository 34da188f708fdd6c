"""Per-publisher ordering of messages that the mail system may reorder.

Mail servers do not keep order: Postfix hands messages to the mailbox over
several connections at once, and a deferred message is retried seconds later.
Each publisher therefore numbers its messages (``Publication-Number``: 1, 2,
3, ...) and says when it published the one before (``Previous-Timestamp``,
nanoseconds; absent on number 1). :class:`PublicationOrder` releases each
publisher's messages in number order:

* a message that overtook an earlier one is held back until the earlier one
  arrives, or for at most ``window`` seconds; then the gap is given up (the
  late message, if it ever comes, is released when it comes);
* where a stream starts is learned from the first messages seen: a message's
  predecessor is waited for only if it was published after the topic's first
  subscription was made (less :data:`CLOCK_SKEW`). A subscriber that starts
  late never waits for messages published before it existed, and one that
  starts early still gets the first messages in order.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["CLOCK_SKEW_NS", "MAX_TRACKED_STREAMS", "PublicationOrder"]

T = TypeVar("T")

#: Allowance for clocks of different hosts when comparing publish times with
#: the moment a subscription was made (nanoseconds).
CLOCK_SKEW_NS = 1_000_000_000
#: How many streams (topic, publisher) are tracked; beyond that the least
#: recently active ones with nothing held back are forgotten.
MAX_TRACKED_STREAMS = 10_000


@dataclass(slots=True)
class _Stream(Generic[T]):
    expected: int
    guessing: bool = True
    held: dict[int, tuple[T, int | None]] = field(default_factory=dict)
    deadline: float | None = None


class PublicationOrder(Generic[T]):
    """Releases items of each stream in publication-number order. Not thread-safe:
    the caller serializes calls."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._streams: OrderedDict[tuple[str, int], _Stream[T]] = OrderedDict()

    def add(
        self,
        topic: str,
        publisher: int,
        number: int,
        *,
        previous_ns: int | None,
        since_ns: int,
        item: T,
    ) -> list[T]:
        """Record ``item`` (publication ``number`` of ``publisher`` on ``topic``, whose
        predecessor was published at ``previous_ns``) and return what may be released
        now, in order. ``since_ns`` is when the topic's first subscription was made."""
        key = (topic, publisher)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(expected=number)
            self._forget_idle()
        else:
            self._streams.move_to_end(key)
        if number < stream.expected and not stream.guessing:
            return [item]  # late: its place was given up already
        stream.held[number] = (item, previous_ns)
        if stream.guessing:
            # Walk back while the lowest message's predecessor was published after
            # the subscription existed: that one should arrive too.
            lowest = min(stream.held)
            _, previous = stream.held[lowest]
            stream.expected = lowest
            if lowest > 1 and previous is not None and previous >= since_ns - CLOCK_SKEW_NS:
                stream.expected = lowest - 1
            else:
                stream.guessing = False
        return self._release(stream)

    def _release(self, stream: _Stream[T]) -> list[T]:
        ready = []
        while stream.expected in stream.held:
            ready.append(stream.held.pop(stream.expected)[0])
            stream.expected += 1
        if not stream.held:
            stream.deadline = None
        elif ready or stream.deadline is None:
            stream.deadline = time.monotonic() + self._window
        return ready

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to release (monotonic seconds), or None."""
        deadlines = [s.deadline for s in self._streams.values() if s.deadline is not None]
        return min(deadlines, default=None)

    def expire(self) -> list[tuple[str, list[T]]]:
        """Give up the gaps held longer than the window: ``(topic, items)`` to release."""
        now = time.monotonic()
        out = []
        for (topic, _), stream in self._streams.items():
            if stream.deadline is not None and stream.deadline <= now:
                numbers = sorted(stream.held)
                out.append((topic, [stream.held.pop(n)[0] for n in numbers]))
                stream.expected = numbers[-1] + 1
                stream.guessing = False
                stream.deadline = None
        return out

    def _forget_idle(self) -> None:
        if len(self._streams) <= MAX_TRACKED_STREAMS:
            return
        for key in [k for k, s in self._streams.items() if not s.held]:
            del self._streams[key]
            if len(self._streams) <= MAX_TRACKED_STREAMS // 2:
                break
