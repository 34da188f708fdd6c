"""PublicationOrder units, with a fake clock: each (topic, publisher) stream is released
as a chain (a message once its predecessor was released), a missing predecessor is waited
for at most ``window`` after the stream stops making progress, failed publishes
(``Previous-Number``) are not waited for, where a stream starts is decided by the
horizon, forged numbers cannot take a stream over, and memory stays bounded.

The order's clock is injected (``clock=``), so windows are exact and nothing sleeps."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import pytest
from fakeclock import FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emailmw.dispatch import ordering
from emailmw.dispatch.ordering import (
    MAX_HELD_PER_STREAM,
    MAX_TRACKED_STREAMS,
    RECENT_NUMBERS,
    PublicationOrder,
)

pytestmark = pytest.mark.timeout(60)

WINDOW = 5.0
#: Where the receiver took its start position (wall-clock ns, arbitrary).
HORIZON = 1_700_000_000_000_000_000
MS = 1_000_000
#: A publish time before the horizon: such a message could not be received.
BEFORE = HORIZON - 1_000 * MS
FORGED = 2**62


def published(number: int) -> int:
    """When publication ``number`` was published: 1 ms apart, all after the horizon."""
    return HORIZON + number * MS


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def order(clock: FakeClock) -> PublicationOrder[str]:
    return PublicationOrder(WINDOW, horizon_ns=HORIZON, clock=clock)


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
    previous_ns: int | Literal["auto"] | None = "auto",
    item: bool = True,
) -> list[str]:
    """Report publication ``number`` as Publisher.publish numbers it: its predecessor is
    ``number - 1`` unless ``previous_number`` says otherwise (a failed publish), and that
    predecessor's publish time is sent only if there is one (``previous_ns="auto"``).
    ``item=False`` reports it with nobody subscribed (``item=None``)."""
    previous = number - 1 if previous_number is None else previous_number
    if previous_ns == "auto":
        previous_ns = None if previous == 0 else published(previous)
    return order.add(
        topic,
        publisher,
        number,
        previous_number=previous,
        previous_ns=previous_ns,
        source_ns=published(number),
        item=label(number, topic, publisher) if item else None,
    )


def feed(order: PublicationOrder[str], numbers: Sequence[int], **kwargs: Any) -> list[str]:
    """Add ``numbers`` in this order; everything released, in release order."""
    out: list[str] = []
    for n in numbers:
        out += add(order, n, **kwargs)
    return out


def remembered(order: PublicationOrder[str], topic: str = "t", publisher: int = 1) -> set[int]:
    """The released numbers a stream remembers (white box: for the memory bound)."""
    stream = order._streams[(topic, publisher)]
    assert len(stream.recent) <= RECENT_NUMBERS
    return {number for number, _ in stream.recent}


# -- in order, overtaking --------------------------------------------------------------


def test_in_order_is_released_at_once(order: PublicationOrder[str]) -> None:
    for n in range(1, 6):
        assert add(order, n) == [label(n)]
        assert order.next_deadline() is None
    assert order.held_count == 0
    assert order.expire() == []


def test_overtaking_message_is_held_until_the_earlier_one_arrives(
    order: PublicationOrder[str],
) -> None:
    assert add(order, 1) == labels([1])
    assert add(order, 3) == []
    assert add(order, 4) == []
    assert order.held_count == 2
    assert add(order, 2) == labels([2, 3, 4])
    assert order.held_count == 0
    assert add(order, 5) == labels([5])
    assert order.next_deadline() is None


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(1, 6))))
def test_every_arrival_order_is_restored(
    order: PublicationOrder[str], arrival: tuple[int, ...]
) -> None:
    # Every message was published after the horizon: the first one is waited for too.
    assert feed(order, arrival) == labels(range(1, 6))
    assert order.next_deadline() is None
    assert order.held_count == 0


@pytest.mark.parametrize(
    ("missing", "arrival"),
    [
        (missing, arrival)
        for missing in range(1, 6)
        for arrival in itertools.permutations([n for n in range(1, 6) if n != missing])
    ],
)
def test_every_arrival_order_with_one_missing_gives_it_up_exactly_at_the_window(
    order: PublicationOrder[str], clock: FakeClock, missing: int, arrival: tuple[int, ...]
) -> None:
    start = clock.now
    # Everything below the missing one comes out in order; everything above is held.
    assert feed(order, arrival) == labels(range(1, missing))
    assert order.held_count == 5 - missing
    if missing == 5:
        assert order.next_deadline() is None
    else:
        assert order.next_deadline() == start + WINDOW
        clock.now = start + WINDOW - 0.001
        assert order.expire() == []
        clock.now = start + WINDOW
        assert order.expire() == [("t", labels(range(missing + 1, 6)))]
        assert order.next_deadline() is None
    # The missing one, late: released at once, and only once.
    assert add(order, missing) == labels([missing])
    assert order.held_count == 0
    assert order.expire() == []


def test_several_gaps_are_filled_one_by_one(order: PublicationOrder[str]) -> None:
    assert add(order, 1) == labels([1])
    assert add(order, 5) == []
    assert add(order, 3) == []
    assert add(order, 2) == labels([2, 3])
    assert add(order, 4) == labels([4, 5])


# -- independent streams ---------------------------------------------------------------


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
    assert add(order, 1, topic="b") == labels([1], topic="b")
    assert add(order, 2, topic="b") == labels([2], topic="b")
    assert add(order, 3, topic="b") == labels([3], topic="b")
    assert add(order, 2, topic="a") == labels([2, 3], topic="a")


def test_one_stream_expiring_does_not_release_another(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1, topic="a")
    add(order, 3, topic="a")
    clock.advance(WINDOW / 2)
    add(order, 1, topic="b")
    add(order, 3, topic="b")
    clock.advance(WINDOW / 2)
    assert order.expire() == [("a", labels([3], topic="a"))]
    assert order.held_count == 1
    clock.advance(WINDOW / 2)
    assert order.expire() == [("b", labels([3], topic="b"))]


# -- Previous-Number: failed publishes ---------------------------------------------------


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


def test_failed_message_stored_after_all_is_released_once_when_it_comes(
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


def test_several_failed_numbers_arriving_late(order: PublicationOrder[str]) -> None:
    # 2 and 3 failed (3 names 1 too), 4 names 1.
    add(order, 1)
    assert add(order, 4, previous_number=1) == labels([4])
    assert add(order, 3, previous_number=1) == labels([3])
    assert add(order, 2) == labels([2])
    assert add(order, 5) == labels([5])
    assert order.next_deadline() is None


def test_first_message_with_previous_number_zero_is_not_held(
    order: PublicationOrder[str],
) -> None:
    # publish() of 1 and 2 raised; 3 says nothing was accepted before it.
    assert add(order, 3, previous_number=0) == labels([3])
    assert order.next_deadline() is None
    assert add(order, 4) == labels([4])
    assert add(order, 1) == labels([1])  # the failed ones, late
    assert add(order, 2) == labels([2])


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
    assert [r for r in released if r != label(3)] == labels([1, 2, 4, 5, 6])
    if arrival.index(3) < arrival.index(4):  # 3 came before its successor: in order
        assert released == labels(range(1, 7))
    assert order.next_deadline() is None


# -- late subscription: learned from everything seen ---------------------------------------


def test_messages_nobody_wanted_teach_the_stream(order: PublicationOrder[str]) -> None:
    # 1..3 went by while the topic had no subscription: reported with item=None.
    for n in (1, 2, 3):
        assert add(order, n, item=False) == []
    assert order.held_count == 0
    # A subscription is made: 4 is released at once, nothing is waited for.
    assert add(order, 4) == labels([4])
    assert order.next_deadline() is None


def test_messages_nobody_wanted_are_never_held(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    # Out of order and unwanted: nothing to hold, only learned.
    assert add(order, 3, item=False) == []
    assert add(order, 1, item=False) == []
    assert order.held_count == 0
    assert order.next_deadline() is None
    # 2 went by unwanted too; the subscription made now gets 4 at once after 3.
    assert add(order, 2, item=False) == []
    assert add(order, 4) == labels([4])
    clock.advance(10 * WINDOW)
    assert order.expire() == []


def test_late_subscription_after_unwanted_messages_out_of_order(
    order: PublicationOrder[str],
) -> None:
    # 1 and 3 went by unwanted; then a subscription is made and 2, 4 arrive.
    add(order, 1, item=False)
    add(order, 3, item=False)
    assert add(order, 2) == labels([2])  # its predecessor 1 went by
    assert add(order, 4) == labels([4])  # its predecessor 3 went by


def test_an_unwanted_predecessor_releases_what_waited_for_it(
    order: PublicationOrder[str],
) -> None:
    # 3 is held while subscribed; the subscription goes and 2 is reported unwanted.
    add(order, 1)
    assert add(order, 3) == []
    assert add(order, 2, item=False) == labels([3])
    assert order.held_count == 0
    assert order.next_deadline() is None


# -- where a stream starts: the horizon ----------------------------------------------------


def test_first_seen_stream_whose_predecessor_is_before_the_horizon_is_released_at_once(
    order: PublicationOrder[str],
) -> None:
    assert add(order, 7, previous_ns=BEFORE) == labels([7])
    assert order.next_deadline() is None
    assert add(order, 8) == labels([8])


@pytest.mark.parametrize(
    ("previous_ns", "waits"),
    [(HORIZON - 1, False), (HORIZON, True), (HORIZON + 1, True), (None, False)],
)
def test_horizon_boundary(
    order: PublicationOrder[str], previous_ns: int | None, waits: bool
) -> None:
    released = add(order, 7, previous_ns=previous_ns)
    assert released == ([] if waits else labels([7]))
    assert (order.next_deadline() is not None) == waits


def test_first_seen_stream_whose_predecessor_is_after_the_horizon_waits_for_it(
    order: PublicationOrder[str],
) -> None:
    assert add(order, 7) == []
    assert order.held_count == 1
    assert add(order, 6, previous_ns=BEFORE) == labels([6, 7])
    assert order.next_deadline() is None


def test_first_seen_stream_waits_at_most_the_window(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    start = clock.now
    assert add(order, 7) == []
    assert add(order, 8) == []
    clock.now = start + WINDOW - 0.001
    assert order.expire() == []
    clock.now = start + WINDOW
    assert order.expire() == [("t", labels([7, 8]))]
    # The chain continues from there; the one given up comes late, at once.
    assert add(order, 9) == labels([9])
    assert add(order, 6, previous_ns=BEFORE) == labels([6])


def test_the_horizon_is_per_order_not_per_stream(clock: FakeClock) -> None:
    # A receiver that started later has a later horizon: the same message is old for it.
    early = PublicationOrder[str](WINDOW, horizon_ns=HORIZON, clock=clock)
    late = PublicationOrder[str](WINDOW, horizon_ns=published(100), clock=clock)
    assert add(early, 7) == []
    assert add(late, 7) == labels([7])
    assert late.horizon_ns == published(100)


# -- held at most a window after the stream stops making progress ---------------------------


def test_progress_restarts_the_window(order: PublicationOrder[str], clock: FakeClock) -> None:
    add(order, 1)
    start = clock.now
    add(order, 3)
    add(order, 5)
    clock.advance(WINDOW - 1.0)
    assert add(order, 2) == labels([2, 3])  # progress; 5 still waits for 4
    assert order.next_deadline() == clock.now + WINDOW
    clock.now = start + WINDOW
    assert order.expire() == []  # the first window is over, but the stream moved
    clock.now = start + 2 * WINDOW - 1.0 - 0.001
    assert order.expire() == []
    clock.now = start + 2 * WINDOW - 1.0
    assert order.expire() == [("t", labels([5]))]


def test_holding_more_does_not_push_the_deadline_back(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    start = clock.now
    add(order, 3)
    clock.advance(1.0)
    add(order, 5)  # held, but nothing was released: no progress
    clock.advance(1.0)
    add(order, 4)  # held behind 3
    assert order.next_deadline() == start + WINDOW
    clock.now = start + WINDOW
    assert order.expire() == [("t", labels([3, 4, 5]))]


def test_a_gap_after_a_give_up_is_waited_for_again(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    add(order, 3)
    clock.advance(WINDOW)
    assert order.expire() == [("t", labels([3]))]
    assert add(order, 5) == []  # 4 is a new gap, with a new window
    assert order.next_deadline() == clock.now + WINDOW
    clock.advance(WINDOW)
    assert order.expire() == [("t", labels([5]))]


def test_late_arrivals_after_a_give_up_are_released_at_once(
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


def test_a_late_arrival_after_a_long_give_up_is_not_held_behind_a_busy_stream(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    # 2 is lost for longer than the window while far more than RECENT_NUMBERS messages
    # are held behind it; they are given up. When 2 finally comes, its predecessor 1 is
    # older than anything the stream remembers: the chain passed it long ago.
    add(order, 1)
    count = RECENT_NUMBERS * 2
    assert feed(order, range(3, 3 + count)) == []
    clock.advance(WINDOW)
    assert order.expire() == [("t", labels(range(3, 3 + count)))]
    assert add(order, 2) == labels([2])
    # A stream that keeps publishing: nothing is held, so nothing waits for it to pause.
    for n in range(3 + count, 3 + count + 10):
        clock.advance(1.0)
        assert add(order, n) == labels([n])
    assert order.held_count == 0


# -- next_deadline --------------------------------------------------------------------------


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
    assert order.next_deadline() == start + WINDOW
    clock.advance(1.0)
    add(order, 2)
    assert order.next_deadline() is None


def test_next_deadline_cleared_after_expire(order: PublicationOrder[str], clock: FakeClock) -> None:
    add(order, 2)
    deadline = order.next_deadline()
    assert deadline is not None
    clock.now = deadline
    assert order.expire() == [("t", labels([2]))]
    assert order.next_deadline() is None
    assert order.held_count == 0


def test_next_deadline_is_the_earliest_stream(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    first = clock.now
    add(order, 3, topic="a")
    clock.advance(2.0)
    add(order, 3, topic="b")
    assert order.next_deadline() == first + WINDOW
    clock.advance(1.0)
    add(order, 3, topic="c")
    assert order.next_deadline() == first + WINDOW
    add(order, 2, topic="a", previous_ns=BEFORE)  # a releases 2, 3: b is the earliest now
    assert order.next_deadline() == first + 2.0 + WINDOW
    clock.now = first + 2.0 + WINDOW
    assert order.expire() == [("b", labels([3], topic="b"))]
    assert order.next_deadline() == first + 3.0 + WINDOW


# -- forgery: a number cannot take a stream over ------------------------------------------------


def test_forged_huge_number_does_not_hold_drop_or_reorder_the_genuine_stream(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    assert feed(order, [1, 2]) == labels([1, 2])
    # A forged email with the publisher's GID and a huge number (default predecessor).
    assert add(order, FORGED) == []
    # The genuine stream goes on, in order, at once, without the forged one.
    for n in range(3, 10):
        clock.advance(WINDOW / 2)  # a live stream: never idle for a window
        assert add(order, n) == labels([n])
    # Genuine reordering still works while the forged one is held.
    assert add(order, 11) == []
    assert add(order, 10) == labels([10, 11])
    assert order.held_count == 1
    # Once the stream is idle for a window, the forged one is released by itself.
    clock.advance(WINDOW - 0.001)
    assert order.expire() == []
    clock.advance(0.001)
    assert order.expire() == [("t", [label(FORGED)])]
    # The genuine chain continues from its own numbers.
    assert add(order, 12) == labels([12])
    assert add(order, 14) == []
    assert add(order, 13) == labels([13, 14])
    assert order.held_count == 0


def test_forged_number_naming_a_released_predecessor_is_released_at_once(
    order: PublicationOrder[str],
) -> None:
    assert feed(order, [1, 2, 3]) == labels([1, 2, 3])
    assert add(order, FORGED, previous_number=2) == [label(FORGED)]
    assert order.held_count == 0
    # The genuine chain continues: 4 names 3, which was released.
    assert add(order, 4) == labels([4])
    assert add(order, 6) == []
    assert add(order, 5) == labels([5, 6])


def add_forged_three(order: PublicationOrder[str]) -> list[str]:
    """A forged email reusing the genuine number 3 (naming 2), from the same GID."""
    return order.add(
        "t", 1, 3, previous_number=2, previous_ns=published(2), source_ns=0, item="forged 3"
    )


@pytest.mark.parametrize("forged_first", [True, False])
def test_forged_reuse_of_a_genuine_number_never_holds_or_drops_it(
    order: PublicationOrder[str], forged_first: bool
) -> None:
    assert feed(order, [1, 2]) == labels([1, 2])
    if forged_first:
        assert add_forged_three(order) == ["forged 3"]
        assert add(order, 3) == labels([3])  # released as it comes
    else:
        assert add(order, 3) == labels([3])
        assert add_forged_three(order) == ["forged 3"]  # delivered itself, nothing more
    assert add(order, 4) == labels([4])
    assert add(order, 6) == []
    assert add(order, 5) == labels([5, 6])
    assert order.held_count == 0


@pytest.mark.parametrize("forged_first", [True, False])
def test_forged_reuse_of_a_held_genuine_number_never_holds_or_drops_it(
    order: PublicationOrder[str], forged_first: bool
) -> None:
    add(order, 1)
    # 3 and its forged double both wait for 2 (the first of them is held).
    released: list[str] = []
    for who in ("forged", "genuine") if forged_first else ("genuine", "forged"):
        released += add_forged_three(order) if who == "forged" else add(order, 3)
    released += add(order, 2)
    released += add(order, 4)
    assert sorted(released) == sorted(["forged 3", *labels([2, 3, 4])])
    # The genuine messages are all there, in their own chain's order: a forged 3 is
    # another link (another timestamp), so it does not take the genuine 3's place.
    assert [r for r in released if r != "forged 3"] == labels([2, 3, 4])
    assert order.held_count == 0


def test_forged_reuse_naming_a_guessed_predecessor_is_held_alone(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    # A forger who does not know the exact publish time of 2 reuses number 3.
    assert feed(order, [1, 2]) == labels([1, 2])
    forged = order.add(
        "t", 1, 3, previous_number=2, previous_ns=published(2) + 1, source_ns=0, item="f3"
    )
    assert forged == []
    for n in (3, 4, 5):  # the genuine stream goes on, at once and in order
        clock.advance(1.0)
        assert add(order, n) == labels([n])
    clock.advance(WINDOW)
    assert order.expire() == [("t", ["f3"])]
    assert add(order, 6) == labels([6])


def test_the_same_message_twice_is_released_as_it_comes(order: PublicationOrder[str]) -> None:
    # Another copy of one message (the same link): never held, never dropped.
    assert feed(order, [1, 2]) == labels([1, 2])
    assert add(order, 2) == labels([2])
    assert add(order, 4) == []
    assert add(order, 4) == labels([4])  # a copy of a held message
    assert add(order, 3) == labels([3, 4])
    assert order.held_count == 0


def test_forged_numbers_cannot_grow_a_stream_without_bound(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    for k in range(RECENT_NUMBERS * 3):
        add(order, FORGED + 2 * k)  # each waits for a predecessor that never comes
    assert order.held_count == RECENT_NUMBERS * 3
    assert add(order, 2) == labels([2])  # the genuine stream is not held by them
    clock.advance(WINDOW)
    [(topic, items)] = order.expire()
    assert topic == "t"
    assert items == [label(FORGED + 2 * k) for k in range(RECENT_NUMBERS * 3)]
    assert len(remembered(order)) <= RECENT_NUMBERS
    assert add(order, 3) == labels([3])


# -- bounds: streams, held messages, remembered numbers -------------------------------------


def test_forgotten_streams_hold_nothing_and_the_bound_is_kept(clock: FakeClock) -> None:
    order = PublicationOrder[str](WINDOW, horizon_ns=HORIZON, clock=clock, max_streams=4)
    for publisher in range(1, 5):
        add(order, 1, publisher=publisher)
    assert order.stream_count == 4
    add(order, 2, publisher=1)  # publisher 1 is the most recently active of the four
    add(order, 1, publisher=99)  # one stream too many: forget down to half the bound
    assert order.stream_count <= 4
    assert {key[1] for key in order._streams} == {1, 4, 99}
    for publisher in range(100, 140):
        add(order, 1, publisher=publisher)
        assert order.stream_count <= 4


def test_a_stream_holding_messages_is_never_forgotten(clock: FakeClock) -> None:
    order = PublicationOrder[str](WINDOW, horizon_ns=HORIZON, clock=clock, max_streams=4)
    add(order, 1, publisher=1)
    assert add(order, 3, publisher=1) == []  # held, waiting for 2
    for publisher in range(2, 20):
        add(order, 1, publisher=publisher)
    assert (("t", 1)) in order._streams
    assert add(order, 2, publisher=1) == labels([2, 3], publisher=1)


def test_a_forgotten_stream_that_speaks_again_is_not_held(clock: FakeClock) -> None:
    order = PublicationOrder[str](WINDOW, horizon_ns=HORIZON, clock=clock, max_streams=4)
    # Four publishers released up to different numbers (so different publish times).
    for publisher, last in ((1, 10), (2, 20), (3, 5), (4, 7)):
        assert feed(order, range(1, last + 1), publisher=publisher) == labels(
            range(1, last + 1), publisher=publisher
        )
    add(order, 1, publisher=99)  # forgets publishers 1 and 2
    assert ("t", 1) not in order._streams and ("t", 2) not in order._streams
    # The horizon moved to the newest publish time among the forgotten streams.
    assert order.horizon_ns == published(20) + 1
    # Both speak again: their predecessors were released, so they are not waited for.
    assert add(order, 11, publisher=1) == labels([11], publisher=1)
    assert add(order, 21, publisher=2) == labels([21], publisher=2)
    assert order.next_deadline() is None


def test_a_forgotten_stream_still_waits_for_a_message_it_never_saw(clock: FakeClock) -> None:
    order = PublicationOrder[str](WINDOW, horizon_ns=HORIZON, clock=clock, max_streams=2)
    feed(order, [1, 2], publisher=1)
    add(order, 1, publisher=2)
    add(order, 1, publisher=3)  # forgets publisher 1 (released up to 2)
    assert ("t", 1) not in order._streams
    # 3 was published after the forgotten stream's last release and is missing: 4 waits.
    assert add(order, 4, publisher=1) == []
    assert add(order, 3, publisher=1) == labels([3, 4], publisher=1)


def test_the_default_stream_bound(order: PublicationOrder[str]) -> None:
    for publisher in range(MAX_TRACKED_STREAMS + 10):
        add(order, 1, publisher=publisher)
    assert order.stream_count <= MAX_TRACKED_STREAMS
    assert order.stream_count >= MAX_TRACKED_STREAMS // 2


def test_too_many_held_messages_give_the_gap_up_at_the_next_expire(
    order: PublicationOrder[str], clock: FakeClock
) -> None:
    add(order, 1)
    numbers = range(3, 3 + MAX_HELD_PER_STREAM)
    assert feed(order, numbers) == []
    assert order.held_count == MAX_HELD_PER_STREAM
    assert order.next_deadline() == clock.now + WINDOW
    assert add(order, 3 + MAX_HELD_PER_STREAM) == []  # one too many
    assert order.next_deadline() == clock.now  # due now, not after the window
    [(topic, items)] = order.expire()
    assert topic == "t"
    assert items == labels(range(3, 4 + MAX_HELD_PER_STREAM))
    assert order.held_count == 0
    assert order.next_deadline() is None


def test_remembered_numbers_stay_bounded(order: PublicationOrder[str]) -> None:
    assert feed(order, range(1, 10 * RECENT_NUMBERS)) == labels(range(1, 10 * RECENT_NUMBERS))
    assert remembered(order) == set(range(9 * RECENT_NUMBERS, 10 * RECENT_NUMBERS))
    # Learned (unwanted) numbers count against the same bound.
    feed(order, range(10 * RECENT_NUMBERS, 12 * RECENT_NUMBERS), item=False)
    assert len(remembered(order)) == RECENT_NUMBERS


def test_bounds_hold_under_a_mix_of_streams(clock: FakeClock) -> None:
    order = PublicationOrder[str](WINDOW, horizon_ns=HORIZON, clock=clock, max_streams=8)
    for round_ in range(5):
        for publisher in range(20):
            base = round_ * 100
            feed(order, [base + 2, base + 1], publisher=publisher)
            assert order.stream_count <= 8 or order.held_count > 0
        clock.advance(WINDOW)
        order.expire()
        assert order.held_count == 0
        for stream in order._streams.values():
            assert len(stream.recent) <= RECENT_NUMBERS
            assert len({n for n, _ in stream.recent}) <= RECENT_NUMBERS
            assert not stream.waiting


def test_module_bounds_are_what_the_docs_say() -> None:
    assert (MAX_TRACKED_STREAMS, RECENT_NUMBERS, MAX_HELD_PER_STREAM) == (10_000, 64, 10_000)
    assert ordering.__all__ == [
        "MAX_HELD_PER_STREAM",
        "MAX_TRACKED_STREAMS",
        "RECENT_NUMBERS",
        "PublicationOrder",
    ]


# -- a property: random interleavings of a few streams -----------------------------------------

STREAMS = [("a", 1), ("a", 2), ("b", 1)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[str, int, int]], list[float]]:
    """Some streams of up to 12 numbers (a few of them missing), every arrival order
    across them, and how far the clock moves before each arrival."""
    arrivals: list[tuple[str, int, int]] = []
    for topic, publisher in STREAMS[: draw(st.integers(1, len(STREAMS)))]:
        length = draw(st.integers(1, 12))
        missing = draw(st.sets(st.integers(1, length), max_size=2))
        arrivals += [(topic, publisher, n) for n in range(1, length + 1) if n not in missing]
    arrivals = draw(st.permutations(arrivals))
    steps = draw(
        st.lists(
            st.sampled_from([0.0, 0.0, 0.0, 0.5, WINDOW / 2, WINDOW]),
            min_size=len(arrivals),
            max_size=len(arrivals),
        )
    )
    return arrivals, steps


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_interleavings_release_every_item_once_in_chain_order(
    scenario: tuple[list[tuple[str, int, int]], list[float]],
) -> None:
    arrivals, steps = scenario
    clock = FakeClock()
    order = PublicationOrder[str](WINDOW, horizon_ns=HORIZON, clock=clock)
    # Every release, in order: (stream, number, released by a give-up?).
    events: list[tuple[tuple[str, int], int, bool]] = []

    def record(items: list[str], gave_up: bool) -> None:
        for item in items:
            topic, publisher, number = item.split("/")
            events.append(((topic, int(publisher)), int(number), gave_up))

    for (topic, publisher, number), step in zip(arrivals, steps, strict=True):
        clock.advance(step)
        if step:
            for _topic, items in order.expire():
                record(items, gave_up=True)
        record(add(order, number, topic=topic, publisher=publisher), gave_up=False)
    clock.advance(WINDOW)
    for _topic, items in order.expire():
        record(items, gave_up=True)

    # Every item added is released exactly once; nothing else is released.
    released = Counter(label(n, key[0], key[1]) for key, n, _ in events)
    assert released == Counter(label(n, topic, publisher) for topic, publisher, n in arrivals)
    assert order.held_count == 0
    assert order.next_deadline() is None
    # Each stream is released in increasing number order, except an item released after a
    # give-up of that stream released a higher number (it came late, its gap was given up).
    highest: dict[tuple[str, int], int] = {}
    given_up: dict[tuple[str, int], int] = {}
    for key, number, gave_up in events:
        if number < highest.get(key, 0):
            assert given_up.get(key, 0) > number, (key, number, events)
        highest[key] = max(highest.get(key, 0), number)
        if gave_up:
            given_up[key] = max(given_up.get(key, 0), number)
