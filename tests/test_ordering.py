"""PublicationOrder units: each (topic, publisher) stream is released in publication-number
order; overtaking messages are held for a window, failed publishes (``Previous-Number``)
are not waited for, and where a stream starts is guessed from the publish times.

The clock of the ordering module is replaced by a fake one, so windows are exact and
nothing sleeps."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

import pytest

from emailmw.dispatch import ordering
from emailmw.dispatch.ordering import CLOCK_SKEW_NS, PublicationOrder

pytestmark = pytest.mark.timeout(30)

WINDOW = 5.0
#: When the topic's first subscription was made (nanoseconds, arbitrary).
SINCE = 1_700_000_000_000_000_000
#: A publish time after the subscription existed: its message should arrive too.
RECENT = SINCE + 1_000
#: A publish time well before the subscription existed (beyond the clock skew allowance).
OLD = SINCE - 10 * CLOCK_SKEW_NS


class FakeClock:
    """Stands in for the ``time`` module of the ordering module: ``monotonic()`` only."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(ordering, "time", fake)
    return fake


@pytest.fixture
def order(clock: FakeClock) -> PublicationOrder[str]:
    return PublicationOrder(WINDOW)


def label(number: int, topic: str = "t", publisher: int = 1) -> str:
    return f"{topic}/{publisher}/{number}"


def labels(numbers: Iterable[int], topic: str = "t", publisher: int = 1) -> list[str]:
    return [label(n, topic, publisher) for n in numbers]


def add(
    order: PublicationOrder[str],
    number: int,
    *,
    topic: str = "t",
    publisher: int = 1,
    previous_number: int | None = None,
    previous_ns: int | None = RECENT,
    since_ns: int = SINCE,
) -> list[str]:
    """Add publication ``number`` (item ``topic/publisher/number``) as Publisher.publish
    numbers it: no ``previous_ns`` when no earlier publication was accepted."""
    accepted = number - 1 if previous_number is None else previous_number
    return order.add(
        topic,
        publisher,
        number,
        previous_ns=None if accepted == 0 else previous_ns,
        since_ns=since_ns,
        item=label(number, topic, publisher),
        previous_number=previous_number,
    )


def feed(order: PublicationOrder[str], numbers: Sequence[int]) -> list[str]:
    """Add ``numbers`` in this order and return everything released, in release order."""
    out: list[str] = []
    for n in numbers:
        out += add(order, n)
    return out


# -- in order, overtaking, expiry ----------------------------------------------------


def test_in_order_is_released_at_once(order: PublicationOrder[str]) -> None:
    for n in range(1, 6):
        assert add(order, n) == [label(n)]
    assert order.next_deadline() is None
    assert order.expire() == []


def test_overtaking_message_is_held_until_the_earlier_one_arrives(
    order: PublicationOrder[str],
) -> None:
    assert add(order, 1) == labels([1])
    assert add(order, 3) == []
    assert add(order, 4) == []
    assert add(order, 2) == labels([2, 3, 4])
    assert add(order, 5) == labels([5])
    assert order.next_deadline() is None


def test_overtaking_the_very_first_message_waits_for_it(order: PublicationOrder[str]) -> None:
    # Number 2 was published after the subscription existed: number 1 is waited for.
    assert add(order, 2) == []
    assert add(order, 1) == labels([1, 2])


def test_several_gaps_are_filled_one_by_one(order: PublicationOrder[str]) -> None:
    assert add(order, 1) == labels([1])
    assert add(order, 5) == []
    assert add(order, 3) == []
    assert add(order, 2) == labels([2, 3])
    assert add(order, 4) == labels([4, 5])


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(1, 6))))
def test_any_arrival_order_is_restored(
    order: PublicationOrder[str], arrival: tuple[int, ...]
) -> None:
    # Every message was published after the subscription existed (an early subscriber).
    assert feed(order, arrival) == labels(range(1, 6))
    assert order.next_deadline() is None


def test_expire_gives_the_gap_up_after_the_window(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    assert add(order, 1) == labels([1])
    assert add(order, 3) == []
    assert add(order, 5) == []
    clock.advance(WINDOW - 0.001)
    assert order.expire() == []
    clock.advance(0.001)
    assert order.expire() == [("t", labels([3, 5]))]
    assert order.next_deadline() is None
    assert order.expire() == []


def test_late_arrival_after_give_up_is_released_at_once(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    add(order, 3)
    add(order, 5)
    clock.advance(WINDOW)
    assert order.expire() == [("t", labels([3, 5]))]
    assert add(order, 4) == labels([4])
    assert add(order, 2) == labels([2])
    assert order.next_deadline() is None
    # The stream goes on after the highest given-up message.
    assert add(order, 6) == labels([6])
    assert add(order, 8) == []
    assert add(order, 7) == labels([7, 8])


def test_expire_of_a_guessed_start_releases_and_accepts_late_ones(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    # The first message seen waits for its (recent) predecessor, which never comes.
    assert add(order, 7) == []
    clock.advance(WINDOW)
    assert order.expire() == [("t", labels([7]))]
    assert add(order, 6) == labels([6])
    assert add(order, 8) == labels([8])


def test_gap_after_give_up_is_waited_for_again(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    add(order, 3)
    clock.advance(WINDOW)
    assert order.expire() == [("t", labels([3]))]
    assert add(order, 5) == []  # 4 is a new gap, with a new window
    assert order.next_deadline() == pytest.approx(clock.now + WINDOW)
    clock.advance(WINDOW)
    assert order.expire() == [("t", labels([5]))]


def test_expire_only_releases_streams_whose_window_passed(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1, topic="a")
    add(order, 3, topic="a")
    clock.advance(WINDOW / 2)
    add(order, 1, topic="b")
    add(order, 3, topic="b")
    clock.advance(WINDOW / 2)
    assert order.expire() == [("a", labels([3], topic="a"))]
    clock.advance(WINDOW / 2)
    assert order.expire() == [("b", labels([3], topic="b"))]


def test_expire_reports_each_publisher_of_a_topic(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    for publisher in (1, 2):
        add(order, 1, publisher=publisher)
        add(order, 3, publisher=publisher)
    clock.advance(WINDOW)
    released = order.expire()
    assert sorted(released) == [("t", labels([3], publisher=1)), ("t", labels([3], publisher=2))]


def test_real_clock_window() -> None:
    # The same with the real monotonic clock and a short window, in case the fake one
    # hides something.
    order: PublicationOrder[str] = PublicationOrder(0.05)
    add(order, 1)
    assert add(order, 3) == []
    deadline = order.next_deadline()
    assert deadline is not None
    assert 0 < deadline - time.monotonic() <= 0.05
    assert order.expire() == []
    time.sleep(0.06)
    assert order.expire() == [("t", labels([3]))]


# -- where a stream starts -----------------------------------------------------------


def test_late_subscriber_does_not_wait_for_messages_published_before_it(
    order: PublicationOrder[str],
) -> None:
    # The subscription was made long after the publisher started.
    assert add(order, 57, previous_ns=OLD) == labels([57])
    assert order.next_deadline() is None
    assert add(order, 58) == labels([58])
    assert add(order, 56, previous_ns=OLD) == labels([56])  # late: released as it comes


def test_late_subscriber_waits_for_messages_published_after_it(
    order: PublicationOrder[str],
) -> None:
    # 3 was published before the subscription, 4 and 5 after; 5 arrives first.
    assert add(order, 5) == []  # its predecessor 4 is recent
    assert add(order, 4, previous_ns=OLD) == labels([4, 5])
    assert order.next_deadline() is None
    assert add(order, 3, previous_ns=OLD) == labels([3])


def test_early_subscriber_waits_for_predecessor_published_after_since(
    order: PublicationOrder[str],
) -> None:
    assert add(order, 4) == []
    assert add(order, 3) == []
    assert add(order, 2) == []
    assert add(order, 1) == labels([1, 2, 3, 4])


def test_guess_walks_back_to_a_lower_first_message(order: PublicationOrder[str]) -> None:
    # A lower message arriving while the start is guessed becomes the new lowest; the
    # guess stops there when its predecessor is old, and the gap above it is waited for.
    assert add(order, 5) == []
    assert add(order, 2, previous_ns=OLD) == labels([2])
    assert add(order, 4) == []
    assert add(order, 3) == labels([3, 4, 5])


@pytest.mark.parametrize(
    ("previous_ns", "waits"),
    [
        (SINCE, True),
        (SINCE - CLOCK_SKEW_NS // 2, True),
        (SINCE - CLOCK_SKEW_NS, True),
        (SINCE - CLOCK_SKEW_NS - 1, False),
        (OLD, False),
    ],
)
def test_clock_skew_allowance_boundary(
    order: PublicationOrder[str], previous_ns: int, waits: bool
) -> None:
    released = add(order, 10, previous_ns=previous_ns)
    if waits:
        assert released == []
        assert order.next_deadline() is not None
        assert add(order, 9, previous_ns=OLD) == labels([9, 10])
    else:
        assert released == labels([10])
        assert order.next_deadline() is None


def test_since_is_taken_from_each_call(order: PublicationOrder[str]) -> None:
    # The same publish time is recent for one topic and old for another.
    assert add(order, 5, topic="old-topic", since_ns=RECENT + 10 * CLOCK_SKEW_NS) == labels(
        [5], topic="old-topic"
    )
    assert add(order, 5, topic="new-topic") == []


def test_missing_previous_timestamp_starts_the_stream(order: PublicationOrder[str]) -> None:
    # A numbered message without Previous-Timestamp: nothing to compare, start here.
    released = order.add("t", 1, 4, previous_ns=None, since_ns=SINCE, item=label(4))
    assert released == labels([4])
    assert order.next_deadline() is None


# -- independent streams -------------------------------------------------------------


def test_publishers_of_a_topic_are_independent(order: PublicationOrder[str]) -> None:
    assert add(order, 1, publisher=1) == labels([1], publisher=1)
    assert add(order, 3, publisher=1) == []
    # Publisher 2 has its own numbers: its 1 and 2 are not held by publisher 1's gap.
    assert add(order, 1, publisher=2) == labels([1], publisher=2)
    assert add(order, 3, publisher=2) == []
    assert add(order, 2, publisher=2) == labels([2, 3], publisher=2)
    # ... and publisher 2's number 2 did not fill publisher 1's gap.
    assert add(order, 4, publisher=1) == []
    assert add(order, 2, publisher=1) == labels([2, 3, 4], publisher=1)


def test_topics_are_independent(order: PublicationOrder[str]) -> None:
    assert add(order, 1, topic="a") == labels([1], topic="a")
    assert add(order, 3, topic="a") == []
    assert add(order, 2, topic="b", previous_ns=OLD) == labels([2], topic="b")
    assert add(order, 3, topic="b") == labels([3], topic="b")
    assert add(order, 2, topic="a") == labels([2, 3], topic="a")


# -- Previous-Number: failed publishes -----------------------------------------------


def test_failed_numbers_are_not_waited_for(order: PublicationOrder[str]) -> None:
    # publish() of 2 and 3 raised; 4 names 1 as the last accepted one.
    assert add(order, 1) == labels([1])
    assert add(order, 4, previous_number=1) == labels([4])
    assert order.next_deadline() is None
    assert add(order, 5) == labels([5])


def test_successor_before_accepted_predecessor_waits_then_skips(
    order: PublicationOrder[str],
) -> None:
    # 2 was accepted, 3 failed, 4 names 2; 4 overtakes 2.
    assert add(order, 1) == labels([1])
    assert add(order, 4, previous_number=2) == []
    assert order.next_deadline() is not None
    assert add(order, 2) == labels([2, 4])
    assert order.next_deadline() is None
    assert add(order, 5) == labels([5])


def test_failed_message_arriving_late_is_released_once(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    assert add(order, 3, previous_number=1) == labels([3])
    assert add(order, 2) == labels([2])  # stored after all: released as it comes
    assert order.next_deadline() is None
    clock.advance(10 * WINDOW)
    assert order.expire() == []
    assert add(order, 4) == labels([4])


def test_failed_message_arriving_late_while_another_gap_is_held(
    order: PublicationOrder[str],
) -> None:
    add(order, 1)
    assert add(order, 3, previous_number=1) == labels([3])
    assert add(order, 5) == []  # waits for 4
    assert add(order, 2) == labels([2])  # late, does not disturb the wait
    assert add(order, 4) == labels([4, 5])


def test_failed_message_arriving_early_is_released_in_order(
    order: PublicationOrder[str],
) -> None:
    # 2 accepted, 3 failed (but was stored after all), 4 names 2. Arrival: 3, 4, 2.
    add(order, 1)
    assert add(order, 3) == []
    assert add(order, 4, previous_number=2) == []
    assert add(order, 2) == labels([2, 3, 4])
    assert order.next_deadline() is None


def test_failed_message_arriving_before_its_successor(order: PublicationOrder[str]) -> None:
    # 2 failed, 3 names 1. The failed 2 arrives first, then 3.
    add(order, 1)
    assert add(order, 2) == labels([2])
    assert add(order, 3, previous_number=1) == labels([3])
    assert order.next_deadline() is None


def test_several_failed_numbers_arriving_late(order: PublicationOrder[str]) -> None:
    # 2 and 3 failed (both name 1), 4 names 1.
    add(order, 1)
    assert add(order, 4, previous_number=1) == labels([4])
    assert add(order, 3, previous_number=1) == labels([3])
    assert add(order, 2) == labels([2])
    assert add(order, 5) == labels([5])
    assert order.next_deadline() is None


def test_a_gap_below_the_failed_ones_is_still_waited_for(
    order: PublicationOrder[str],
) -> None:
    # 2 and 3 accepted, 4 failed, 5 names 3. 5 and 2 arrive before 3.
    add(order, 1)
    assert add(order, 5, previous_number=3) == []
    assert add(order, 2) == labels([2])
    assert add(order, 3) == labels([3, 5])


def test_first_message_with_previous_number_zero(order: PublicationOrder[str]) -> None:
    # publish() of 1 and 2 raised; 3 says nothing was accepted before it.
    assert add(order, 3, previous_number=0) == labels([3])
    assert order.next_deadline() is None
    assert add(order, 4) == labels([4])
    assert add(order, 1) == labels([1])  # the failed one, late
    assert add(order, 2) == labels([2])


def test_no_accepted_predecessor_is_never_waited_for(order: PublicationOrder[str]) -> None:
    # Publisher.publish sends no Previous-Timestamp then; even if another implementation
    # does, there is no number 0 to wait for.
    released = order.add(
        "t", 1, 3, previous_ns=RECENT, since_ns=SINCE, item=label(3), previous_number=0
    )
    assert released == labels([3])
    assert order.add("t", 2, 1, previous_ns=RECENT, since_ns=SINCE, item=label(1, publisher=2))
    assert order.next_deadline() is None


def test_previous_number_zero_after_the_failed_first_one_arrived(
    order: PublicationOrder[str],
) -> None:
    # publish() of 1 raised but it was stored after all, and arrives first.
    assert add(order, 1) == labels([1])
    assert add(order, 2, previous_number=0) == labels([2])
    assert add(order, 3) == labels([3])


@pytest.mark.parametrize("arrival", list(itertools.permutations([1, 2, 4, 5, 6])))
def test_failed_number_never_arriving_never_delays(
    order: PublicationOrder[str], arrival: tuple[int, ...]
) -> None:
    # 3 failed and never comes; 4 names 2. No arrival order needs the window.
    released: list[str] = []
    for n in arrival:
        released += add(order, n, previous_number=2 if n == 4 else None)
    assert released == labels([1, 2, 4, 5, 6])
    assert order.next_deadline() is None


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(1, 7))))
def test_failed_number_arriving_anyway_is_released_once(
    order: PublicationOrder[str], arrival: tuple[int, ...]
) -> None:
    # 3 failed but was stored after all; 4 names 2.
    released: list[str] = []
    for n in arrival:
        released += add(order, n, previous_number=2 if n == 4 else None)
    assert sorted(released) == labels(range(1, 7))  # each exactly once
    accepted = [r for r in released if r != label(3)]
    assert accepted == labels([1, 2, 4, 5, 6])  # the accepted ones in order
    if arrival.index(3) < arrival.index(4):  # 3 came before its successor: in order
        assert released == labels(range(1, 7))
    assert order.next_deadline() is None


# -- guessing combined with Previous-Number ------------------------------------------


def test_guess_walks_back_to_previous_number(order: PublicationOrder[str]) -> None:
    # 4 failed, 5 names 3: the guess waits for 3, not for 4.
    assert add(order, 5, previous_number=3) == []
    assert add(order, 3, previous_ns=OLD) == labels([3, 5])
    assert order.next_deadline() is None


def test_guess_without_previous_number_waits_for_number_minus_one(
    order: PublicationOrder[str],
) -> None:
    # The contrast with the test above: without Previous-Number, 4 is waited for.
    assert add(order, 5) == []
    assert add(order, 3, previous_ns=OLD) == labels([3])
    assert order.next_deadline() is not None
    assert add(order, 4) == labels([4, 5])


def test_guess_with_old_previous_number_starts_at_once(order: PublicationOrder[str]) -> None:
    assert add(order, 5, previous_number=3, previous_ns=OLD) == labels([5])
    assert add(order, 4, previous_number=3, previous_ns=OLD) == labels([4])  # late
    assert add(order, 6) == labels([6])


def test_guess_walks_back_through_previous_number_to_the_start(
    order: PublicationOrder[str],
) -> None:
    # 1, 2 accepted; 3 failed; 4 names 2. An early subscriber sees 4 first.
    assert add(order, 4, previous_number=2) == []
    assert add(order, 2) == []  # its predecessor 1 is recent too
    assert add(order, 1) == labels([1, 2, 4])
    assert order.next_deadline() is None


def test_guess_with_failed_message_seen_first(order: PublicationOrder[str]) -> None:
    # 3 failed but was stored; 4 names 2. The failed 3 is the first one seen.
    assert add(order, 3) == []
    assert add(order, 4, previous_number=2) == []
    assert add(order, 2, previous_ns=OLD) == labels([2, 3, 4])


# -- next_deadline -------------------------------------------------------------------


def test_next_deadline_none_when_nothing_is_held(order: PublicationOrder[str]) -> None:
    assert order.next_deadline() is None
    add(order, 1)
    add(order, 2)
    assert order.next_deadline() is None


def test_next_deadline_set_while_held_and_cleared_on_release(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    start = clock.now
    add(order, 3)
    assert order.next_deadline() == pytest.approx(start + WINDOW)
    # More held without progress: the deadline is not pushed back.
    clock.advance(1.0)
    add(order, 5)
    assert order.next_deadline() == pytest.approx(start + WINDOW)
    add(order, 2)  # releases 2, 3; 5 is still held
    deadline = order.next_deadline()
    assert deadline is not None
    assert start < deadline <= clock.now + WINDOW
    add(order, 4)
    assert order.next_deadline() is None


def test_progress_restarts_the_window_of_what_is_still_held(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    start = clock.now
    add(order, 3)
    add(order, 5)
    clock.advance(WINDOW - 1.0)
    assert add(order, 2) == labels([2, 3])  # progress; 5 still waits for 4
    assert order.next_deadline() == pytest.approx(clock.now + WINDOW)
    clock.now = start + WINDOW
    assert order.expire() == []
    clock.now = start + 2 * WINDOW - 1.0
    assert order.expire() == [("t", labels([5]))]


def test_next_deadline_cleared_after_expire(order: PublicationOrder[str], clock: FakeClock) -> None:
    add(order, 2)
    deadline = order.next_deadline()
    assert deadline is not None
    clock.now = deadline
    assert order.expire() == [("t", labels([2]))]
    assert order.next_deadline() is None


def test_next_deadline_is_the_earliest_stream(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    first = clock.now
    add(order, 3, topic="a")
    clock.advance(2.0)
    add(order, 3, topic="b")
    assert order.next_deadline() == pytest.approx(first + WINDOW)
    add(order, 2, topic="a", previous_ns=OLD)  # a starts at 2: releases 2, 3
    assert order.next_deadline() == pytest.approx(first + 2.0 + WINDOW)


# -- MAX_TRACKED_STREAMS -------------------------------------------------------------


@pytest.fixture
def few_streams(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(ordering, "MAX_TRACKED_STREAMS", 4)
    return 4


def is_remembered(order: PublicationOrder[str], publisher: int, number: int) -> bool:
    """Whether the stream of ``publisher`` (which released ``number - 1``) is still known:
    a remembered stream releases ``number`` at once, a forgotten one guesses its start
    anew and waits for the recent predecessor."""
    return add(order, number, publisher=publisher) == labels([number], publisher=publisher)


def test_least_recently_active_idle_streams_are_forgotten(
    order: PublicationOrder[str], few_streams: int
) -> None:
    for publisher in range(1, few_streams + 1):
        add(order, 1, publisher=publisher)
    add(order, 2, publisher=1)  # publisher 1 is the most recently active of the four
    add(order, 1, publisher=99)  # one stream too many
    assert is_remembered(order, 1, 3)
    assert is_remembered(order, 99, 2)
    assert not is_remembered(order, 2, 2)


def test_streams_within_the_bound_are_kept(order: PublicationOrder[str], few_streams: int) -> None:
    for publisher in range(1, few_streams + 1):
        add(order, 1, publisher=publisher)
    for publisher in range(1, few_streams + 1):
        assert is_remembered(order, publisher, 2)


def test_streams_holding_messages_are_not_forgotten(
    order: PublicationOrder[str], few_streams: int
) -> None:
    add(order, 1, publisher=1)
    assert add(order, 3, publisher=1) == []  # held, waiting for 2
    for publisher in range(2, few_streams + 3):
        add(order, 1, publisher=publisher)
    assert add(order, 2, publisher=1) == labels([2, 3], publisher=1)


def test_new_stream_is_not_lost_when_held_streams_fill_the_bound(
    order: PublicationOrder[str], clock: FakeClock, few_streams: int
) -> None:
    # Two streams hold messages (half the bound), two more are idle.
    for publisher in (1, 2):
        add(order, 1, publisher=publisher)
        assert add(order, 3, publisher=publisher) == []
    for publisher in (3, 4):
        add(order, 1, publisher=publisher)
    # A fifth stream starts with a message that waits for its predecessor.
    released = add(order, 2, publisher=5)
    assert released == []
    released += add(order, 1, publisher=5)
    clock.advance(10 * WINDOW)
    for topic, items in order.expire():
        assert topic == "t"
        released += [item for item in items if item.startswith("t/5/")]
    # Whatever the bookkeeping, both of its messages must come out, in order.
    assert released == labels([1, 2], publisher=5)
