"""Per-publisher ordering of messages that the mail system may reorder.

Mail servers do not keep order: Postfix hands messages to the mailbox over
several connections at once, and a deferred message is retried seconds later.
Each publisher therefore numbers its messages (``Publication-Number``: 1, 2,
3, ...) and names its predecessor: the number before (or, after a
``publish()`` that raised, the last number the transport accepted:
``Previous-Number``) and when that one was published (``Previous-Timestamp``).

:class:`PublicationOrder` releases each stream (topic, publisher) as a chain
of links, a link being a message's number and its ``Source-Timestamp``: a
message is released once the exact predecessor it names (number and
``Previous-Timestamp``) was released. The rules:

* **Learned from everything seen.** The caller reports every numbered message
  it sees, whether a subscription wants it or not (``item=None``), so a
  subscription made later never waits for a message that went by before it.
* **Where a stream starts.** A message waits for its predecessor only if that
  predecessor was published after the *horizon*: the moment the receiver took
  its start position (or, for streams forgotten under the stream bound, the
  newest publish time among them), as it was when the stream was first seen.
  A message published before the horizon could not be received, so it is
  never waited for, whichever of its successors arrives first. Until a stream
  has released anything, a message that does not say when its predecessor was
  published does not wait either.
* **Held at most a window.** A message whose predecessor is missing is held
  until the predecessor comes, or until its stream has released nothing for
  ``window`` seconds (each release restarts the window); then everything the
  stream holds is released in number order and the chain continues from there.
  A message that comes after its gap was given up is released when it comes if
  its predecessor was released recently, or is older than every number its
  stream remembers (the chain went past it long ago, as after a gap of more
  than :data:`RECENT_NUMBERS` messages was given up).
* **Forgery cannot take a stream over.** Nothing jumps ahead, and a link
  carries a nanosecond timestamp that a forger would have to guess. An email
  that forges a live publisher's GID with a huge number is held (its
  predecessor never comes) and released by itself once the stream pauses for a
  window, or at once if it names a released predecessor; one that reuses the
  genuine next number is released as it comes, and the genuine message, and
  the ones after it, still follow their own chain. The same link seen again
  (another copy of one message) is released as it comes, never held or dropped.

Memory is bounded: :data:`MAX_TRACKED_STREAMS` streams, each remembering its
last :data:`RECENT_NUMBERS` released links and holding at most
:data:`MAX_HELD_PER_STREAM` messages (beyond that the stream's gap is given up
at once). Not thread-safe: the caller serializes calls (see
:class:`emailmw.dispatch.core.DeliveryCore`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "MAX_HELD_PER_STREAM",
    "MAX_TRACKED_STREAMS",
    "RECENT_NUMBERS",
    "PublicationOrder",
]

T = TypeVar("T")

#: How many streams (topic, publisher) are tracked; beyond that the least
#: recently active ones with nothing held back are forgotten.
MAX_TRACKED_STREAMS = 10_000
#: How many released links each stream remembers (its predecessors-to-be).
RECENT_NUMBERS = 64
#: How many messages one stream may hold back before its gap is given up.
MAX_HELD_PER_STREAM = 10_000


#: A link of a chain: (publication number, its Source-Timestamp); the timestamp
#: is None where a message names its predecessor without one.
Link = tuple[int, int | None]


@dataclass(slots=True)
class _Held(Generic[T]):
    link: tuple[int, int]
    previous: Link
    item: T | None


@dataclass(slots=True)
class _Stream(Generic[T]):
    topic: str
    horizon_ns: int  # the order's horizon when this stream was first seen
    last: Link = (-1, None)  # the last link released (the usual predecessor)
    last_ns: int = 0  # when the newest released message was published
    recent: OrderedDict[tuple[int, int], None] = field(default_factory=OrderedDict)
    held: dict[tuple[int, int], _Held[T]] = field(default_factory=dict)
    waiting: dict[Link, list[tuple[int, int]]] = field(default_factory=dict)
    deadline: float | None = None

    def released(self, link: Link) -> bool:
        """Whether ``link`` (or, without a timestamp, its number) was released."""
        number, stamp = link
        if stamp is None:  # rare: a sender that names no timestamp
            return any(n == number for n, _ in self.recent)
        return (number, stamp) in self.recent

    def forgotten(self, number: int) -> bool:
        """Whether ``number`` is older than every number this stream remembers: its
        chain went past it long ago (released, or given up), so it is not waited for."""
        recent = self.recent
        return len(recent) >= RECENT_NUMBERS and number < min(n for n, _ in recent)


class PublicationOrder(Generic[T]):
    """Releases the items of each stream in chain order (see the module docstring).

    ``horizon_ns``: wall-clock nanoseconds of the receiver's start position.
    ``clock``: the monotonic clock for windows (replaceable in tests).
    """

    def __init__(
        self,
        window: float,
        *,
        horizon_ns: int,
        clock: Callable[[], float] = time.monotonic,
        max_streams: int = MAX_TRACKED_STREAMS,
    ) -> None:
        self._window = window
        self._horizon_ns = horizon_ns
        self._clock = clock
        self._max_streams = max_streams
        self._streams: OrderedDict[tuple[str, int], _Stream[T]] = OrderedDict()
        self._holding: dict[tuple[str, int], _Stream[T]] = {}

    @property
    def horizon_ns(self) -> int:
        """Predecessors published before this (wall-clock ns) are never waited for."""
        return self._horizon_ns

    @property
    def stream_count(self) -> int:
        """How many streams are tracked now."""
        return len(self._streams)

    @property
    def held_count(self) -> int:
        """How many messages are held back now, over every stream."""
        return sum(len(s.held) for s in self._holding.values())

    def add(
        self,
        topic: str,
        publisher: int,
        number: int,
        *,
        previous_number: int,
        previous_ns: int | None,
        source_ns: int,
        item: T | None,
    ) -> list[T]:
        """Record publication ``number`` and return the items released now, in order.

        ``previous_number`` is its predecessor (0: none), published at
        ``previous_ns`` (None if unknown); ``source_ns`` is when ``number`` was
        published. ``item`` is what to release (None: nobody wants it, only
        learn from it; it is then never held).
        """
        key = (topic, publisher)
        link = (number, source_ns)
        previous: Link = (previous_number, previous_ns)
        stream = self._streams.get(key)
        if stream is None:
            self._make_room()
            stream = self._streams[key] = _Stream(topic, self._horizon_ns)
        else:
            self._streams.move_to_end(key)
        if (previous_ns is None and stream.last[0] < 0) or (
            previous_ns is not None and previous_ns < stream.horizon_ns
        ):
            # Published before we could see it (or, while the stream has released
            # nothing yet, at an unknown time): not waited for.
            previous = (0, None)
        if link in stream.recent or link in stream.held:
            # The same message again (another copy): as it comes, chain untouched.
            return [] if item is None else [item]
        if (
            item is not None
            and previous[0] != 0
            and previous != stream.last
            and not stream.released(previous)
            and not stream.forgotten(previous[0])
        ):
            self._hold(key, stream, _Held(link, previous, item))
            return []
        ready: list[T] = []
        self._release(stream, link, item, ready)
        self._progress(key, stream)
        return ready

    def is_held(self, topic: str, publisher: int, number: int, source_ns: int) -> bool:
        """Whether the message (``number`` published at ``source_ns``) is held now."""
        stream = self._streams.get((topic, publisher))
        return stream is not None and (number, source_ns) in stream.held

    def waits(
        self, topic: str, publisher: int, *, previous_number: int, previous_ns: int | None
    ) -> bool:
        """Whether a message naming this predecessor would wait for it now (as
        :meth:`add` decides for a wanted message)."""
        if previous_number == 0:
            return False
        stream = self._streams.get((topic, publisher))
        horizon = self._horizon_ns if stream is None else stream.horizon_ns
        if previous_ns is None:
            if stream is None or stream.last[0] < 0:
                return False
        elif previous_ns < horizon:
            return False
        if stream is None:
            return True
        previous = (previous_number, previous_ns)
        return (
            previous != stream.last
            and not stream.released(previous)
            and not stream.forgotten(previous_number)
        )

    def hold(
        self,
        topic: str,
        publisher: int,
        number: int,
        *,
        previous_number: int,
        previous_ns: int | None,
        source_ns: int,
        item: T,
    ) -> None:
        """Hold ``item`` until its predecessor is released (or the stream's window
        passes), even if its own link was released already: a message read again
        from the mailbox for a subscription's history, that came before a message it
        follows (see :meth:`emailmw.dispatch.core.DeliveryCore.deliver_history`)."""
        key = (topic, publisher)
        stream = self._streams.get(key)
        if stream is None:
            self._make_room()
            stream = self._streams[key] = _Stream(topic, self._horizon_ns)
        self._hold(key, stream, _Held((number, source_ns), (previous_number, previous_ns), item))

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to release (the clock's seconds), or None."""
        if not self._holding:  # the usual case, asked after every dispatch
            return None
        deadline = None
        for stream in self._holding.values():
            if stream.deadline is not None and (deadline is None or stream.deadline < deadline):
                deadline = stream.deadline
        return deadline

    def expire(self) -> list[tuple[str, list[T]]]:
        """Give up the gaps of streams idle past their deadline: ``(topic, items)``."""
        now = self._clock()
        out = []
        for key, stream in list(self._holding.items()):
            if stream.deadline is not None and stream.deadline <= now:
                out.append((stream.topic, self._give_up(key, stream)))
        return out

    # -- internal -------------------------------------------------------------------

    def _hold(self, key: tuple[str, int], stream: _Stream[T], held: _Held[T]) -> None:
        stream.held[held.link] = held
        stream.waiting.setdefault(held.previous, []).append(held.link)
        self._holding[key] = stream
        if stream.deadline is None:
            stream.deadline = self._clock() + self._window
        if len(stream.held) > MAX_HELD_PER_STREAM:
            stream.deadline = self._clock()  # the next expire() gives the gap up

    def _release(
        self, stream: _Stream[T], link: tuple[int, int], item: T | None, ready: list[T]
    ) -> None:
        """Release ``link`` and, in turn, every held message chained to it."""
        if not stream.waiting:  # nothing held on this stream (the usual case): this one only
            self._remember(stream, link)
            if item is not None:
                ready.append(item)
            return
        todo = [(link, item)]
        while todo:
            current, it = todo.pop()
            self._remember(stream, current)
            if it is not None:
                ready.append(it)
            followers = stream.waiting.pop(current, [])
            if stream.waiting:  # some may have named it without a timestamp
                followers += stream.waiting.pop((current[0], None), [])
            for follower in sorted(followers, reverse=True):
                held = stream.held.pop(follower, None)
                if held is not None:
                    todo.append((follower, held.item))

    def _remember(self, stream: _Stream[T], link: tuple[int, int]) -> None:
        stream.last = link
        stamp = link[1]
        stream.last_ns = max(stream.last_ns, stamp)
        recent = stream.recent
        if link in recent:
            return
        recent[link] = None
        if len(recent) > RECENT_NUMBERS:
            recent.popitem(last=False)

    def _progress(self, key: tuple[str, int], stream: _Stream[T]) -> None:
        if stream.held:
            stream.deadline = self._clock() + self._window
        else:
            stream.deadline = None
            self._holding.pop(key, None)

    def _give_up(self, key: tuple[str, int], stream: _Stream[T]) -> list[T]:
        ready: list[T] = []
        while stream.held:
            lowest = min(stream.held)
            held = stream.held.pop(lowest)
            waiting = stream.waiting.get(held.previous)
            if waiting is not None:
                waiting.remove(lowest)
                if not waiting:
                    del stream.waiting[held.previous]
            self._release(stream, lowest, held.item, ready)
        stream.waiting.clear()
        stream.deadline = None
        self._holding.pop(key, None)
        return ready

    def _make_room(self) -> None:
        """Make room for one more stream: when the bound is reached, forget the least
        recently active streams that hold nothing, down to half the bound. Their
        newest publish time becomes the horizon, so a forgotten stream that speaks
        again is not made to wait for a predecessor it released already."""
        if len(self._streams) < self._max_streams:
            return
        for key in [k for k, s in self._streams.items() if not s.held]:
            stream = self._streams.pop(key)
            self._horizon_ns = max(self._horizon_ns, stream.last_ns + 1)
            if len(self._streams) <= self._max_streams // 2:
                break
