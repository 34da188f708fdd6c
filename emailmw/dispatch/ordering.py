"""Per-publisher ordering of messages that the mail system may reorder.

Mail servers do not keep order: Postfix hands messages to the mailbox over
several connections at once, and a deferred message is retried seconds later.
Each publisher therefore numbers its messages (``Publication-Number``: 1, 2,
3, ...) and says when it published the one before (``Previous-Timestamp``,
nanoseconds; absent on number 1). After a ``publish()`` that raised, the next
message names the last one the transport accepted (``Previous-Number``); the
numbers in between may never come. :class:`PublicationOrder` releases each
publisher's messages in number order:

* a message that overtook an earlier one is held back until the earlier one
  arrives, or until its stream has released nothing for ``window`` seconds
  (each release restarts the window, so a backlog that is being read is not
  given up); then the gap is given up (the late message, if it ever comes, is
  released when it comes);
* numbers between a message and its ``Previous-Number`` (failed publishes) are
  not waited for once everything up to that number was released; a failed
  message that was stored after all is released when it comes;
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
class _Held(Generic[T]):
    item: T
    previous_number: int  # the publisher's last accepted message before this one
    previous_ns: int | None  # and when it was published


@dataclass(slots=True)
class _Stream(Generic[T]):
    expected: int
    guessing: bool = True
    held: dict[int, _Held[T]] = field(default_factory=dict)
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
        previous_number: int | None = None,
    ) -> list[T]:
        """Record ``item`` and return what may be released now, in order.

        ``item`` is publication ``number`` of ``publisher`` on ``topic``; its
        predecessor is ``previous_number`` (default ``number - 1``; lower when
        publishes in between failed), published at ``previous_ns``. ``since_ns``
        is when the topic's first subscription was made.
        """
        if previous_number is None:
            previous_number = number - 1
        key = (topic, publisher)
        stream = self._streams.get(key)
        if stream is None:
            self._forget_idle()  # before adding: the new stream holds nothing yet
            stream = self._streams[key] = _Stream(expected=number)
        else:
            self._streams.move_to_end(key)
        if number < stream.expected and not stream.guessing:
            return [item]  # late: its place was given up already
        stream.held[number] = _Held(item, previous_number, previous_ns)
        if stream.guessing:
            # Walk back while the lowest message's predecessor was published after
            # the subscription existed: that one should arrive too.
            lowest = min(stream.held)
            held = stream.held[lowest]
            stream.expected = lowest
            if (
                held.previous_number >= 1
                and held.previous_ns is not None
                and held.previous_ns >= since_ns - CLOCK_SKEW_NS
            ):
                stream.expected = held.previous_number
            else:
                stream.guessing = False
        return self._release(stream)

    def _release(self, stream: _Stream[T]) -> list[T]:
        ready = []
        held = stream.held
        while held:
            if stream.expected not in held:
                # Skip numbers whose publish() raised: the lowest held message's
                # accepted predecessor was released (or given up) already.
                lowest = min(held)
                if held[lowest].previous_number >= stream.expected:
                    break
                stream.expected = lowest
            ready.append(held.pop(stream.expected).item)
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
                out.append((topic, [stream.held.pop(n).item for n in numbers]))
                stream.expected = numbers[-1] + 1
                stream.guessing = False
                stream.deadline = None
        return out

    def _forget_idle(self) -> None:
        """Make room for one more stream: when the bound is reached, forget the least
        recently active streams that hold nothing, down to half the bound."""
        if len(self._streams) < MAX_TRACKED_STREAMS:
            return
        for key in [k for k, s in self._streams.items() if not s.held]:
            del self._streams[key]
            if len(self._streams) <= MAX_TRACKED_STREAMS // 2:
                break
