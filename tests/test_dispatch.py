"""Delivery core units: DeliveryCore (admission, duplicates, order, expiry and routing
under one lock) with hand-made EmailData and a fake clock; the PollingManager thread
with a fake receiver; the deadline wake-up; and expiry racing the intraprocess
receiver's inline dispatch from two publishing threads."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakeclock import FakeClock

import emailmw
from emailmw.dispatch import ordering
from emailmw.dispatch.core import DeliveryCore
from emailmw.dispatch.polling import PollingManager
from emailmw.info import Gid, MessageInfo, ServiceInfo, Timestamp
from emailmw.security import AdmissionPolicy
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.intra import IntraEmailReceiver, IntraEmailSender
from emailmw.transport.receiver import EmailReceiver

pytestmark = pytest.mark.timeout(30)

WINDOW = 5.0
#: Where the (fake) receiver took its start position.
HORIZON = time.time_ns()
MS = 1_000_000


def published(number: int) -> int:
    """When publication ``number`` was published: 1 ms apart, after the horizon."""
    return HORIZON + number * MS


# -- fakes: receiver and entities ---------------------------------------------------------


class FakeReceiver(EmailReceiver):
    """Hands out batches pushed by the test; blocks on a condition in between."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._batches: deque[list[EmailData]] = deque()
        self._interrupted = False
        self.fail_next = 0
        self.interrupts = 0

    def push(self, *emails: EmailData) -> None:
        with self._cond:
            self._batches.append(list(emails))
            self._cond.notify_all()

    def receive(self, timeout: float | None) -> list[EmailData]:
        with self._cond:
            if self.fail_next:
                self.fail_next -= 1
                raise OSError("the server went away")
            self._cond.wait_for(lambda: self._batches or self._interrupted, timeout)
            self._interrupted = False
            return self._batches.popleft() if self._batches else []

    def interrupt(self) -> None:
        with self._cond:
            self.interrupts += 1
            self._interrupted = True
            self._cond.notify_all()


class FakeSubscription:
    """Records what it is given; ``wait_for(n)`` waits until it has ``n`` messages."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.messages: list[tuple[str, MessageInfo]] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self._cond = threading.Condition()

    def _push_message(self, message: str, message_type: str | None, info: MessageInfo) -> bool:
        if message == self.fail_on:
            raise RuntimeError("subscription exploded")
        with self._cond:
            self.messages.append((message, info))
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()
        return True

    @property
    def bodies(self) -> list[str]:
        with self._cond:
            return [m for m, _ in self.messages]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= n, timeout), self.messages
            return [m for m, _ in self.messages]


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[tuple[EmailData, ServiceInfo]] = []

    def _push_request(self, email: EmailData, info: ServiceInfo) -> bool:
        self.requests.append((email, info))
        return True


class FakeClient:
    def __init__(self, pending: bool = True) -> None:
        self.pending = pending
        self.responses: list[tuple[str, ServiceInfo]] = []

    def _push_response(self, message: str, message_type: str | None, info: ServiceInfo) -> bool:
        if self.pending:
            self.responses.append((message, info))
        return self.pending


# -- hand-made emails -----------------------------------------------------------------------

_ids = itertools.count()


def unique_id() -> str:
    return f"<{next(_ids)}@handmade>"


def plain(body: str, message_id: str = "", subject: str = "/t") -> EmailData:
    """An email with none of our headers."""
    return EmailData(EmailContent(subject, body), EmailHeaders(), message_id=message_id)


def message(
    body: str = "m",
    *,
    number: int | None = None,
    previous: int | None = None,
    gid: int = 77,
    subject: str = "/t",
    message_id: str | None = None,
    **headers: str | None,
) -> EmailData:
    """A message as Publisher.publish sends it: numbered if ``number`` is given, naming
    ``previous`` (default ``number - 1``) and its publish time."""
    base: dict[str, str | None] = {
        "Publisher-GID": str(gid),
        "Source-Timestamp": str(published(number or 0)),
    }
    if number is not None:
        prev = number - 1 if previous is None else previous
        base["Publication-Number"] = str(number)
        if prev:
            base["Previous-Timestamp"] = str(published(prev))
        if prev != number - 1:
            base["Previous-Number"] = str(prev)
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return EmailData(
        EmailContent(subject, body),
        EmailHeaders({k: v for k, v in base.items() if v is not None}),
        message_id=unique_id() if message_id is None else message_id,
    )


def numbered(*numbers: int, gid: int = 77, subject: str = "/t") -> list[EmailData]:
    return [message(str(n), number=n, gid=gid, subject=subject) for n in numbers]


def service_email(
    body: str = "r",
    subject: str = "/svc",
    gid: str | None = "9",
    seq: str | None = "1",
    stamp: str | None = str(HORIZON),
    in_reply_to: str | None = None,
) -> EmailData:
    headers = EmailHeaders()
    for name, value in (
        ("Source-Timestamp", stamp),
        ("Client-GID", gid),
        ("Request-Sequence-Number", seq),
    ):
        if value is not None:
            headers[name] = value
    return EmailData(
        EmailContent(subject, body), headers, message_id=unique_id(), in_reply_to=in_reply_to
    )


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def stats() -> StatsCounters:
    return StatsCounters()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(stats: StatsCounters, clock: FakeClock) -> DeliveryCore:
    return DeliveryCore(stats, reorder_window=WINDOW, horizon_ns=HORIZON, clock=clock)


@pytest.fixture
def receiver() -> FakeReceiver:
    return FakeReceiver()


@pytest.fixture
def manager(receiver: FakeReceiver, core: DeliveryCore) -> Iterator[PollingManager]:
    pm = PollingManager(receiver, core)
    yield pm
    assert pm.shutdown(timeout=2.0)


def in_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` in another thread and wait for it (re-raising what it raised)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="other")
    thread.start()
    thread.join(10.0)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


# -- the polling thread --------------------------------------------------------------------


def test_dispatches_in_order_on_a_named_thread(
    manager: PollingManager, receiver: FakeReceiver, core: DeliveryCore, stats: StatsCounters
) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    manager.start()
    assert manager.running
    receiver.push(*numbered(1, 2, 3, 4, 5))
    receiver.push(*(message(str(i), message_id=f"<{i}@x>") for i in range(6, 11)))
    assert sub.wait_for(10) == [str(i) for i in range(1, 11)]
    assert sub.threads == {"emailmw-poll"}
    snapshot = stats.snapshot()
    assert (snapshot.received, snapshot.delivered, snapshot.dropped_total) == (10, 10, 0)


def test_start_twice_is_refused(manager: PollingManager) -> None:
    manager.start()
    with pytest.raises(RuntimeError):
        manager.start()


def test_shutdown_is_prompt_and_idempotent(manager: PollingManager) -> None:
    manager.start()
    start = time.monotonic()
    assert manager.shutdown(timeout=2.0)
    assert time.monotonic() - start < 1.0
    assert not manager.running
    assert manager.shutdown(timeout=2.0)


def test_shutdown_is_prompt_while_a_message_is_held(
    manager: PollingManager, receiver: FakeReceiver, core: DeliveryCore
) -> None:
    # The thread sleeps on a (fake, far) deadline: shutdown still ends it at once.
    sub = FakeSubscription()  # referenced: routes hold entities weakly
    core.register_subscription("/t", sub)
    manager.start()
    core.dispatch_batch(numbered(2))
    assert core.held_count == 1
    start = time.monotonic()
    assert manager.shutdown(timeout=2.0)
    assert time.monotonic() - start < 1.0


def test_shutdown_before_start(receiver: FakeReceiver, core: DeliveryCore) -> None:
    pm = PollingManager(receiver, core)
    assert pm.shutdown()
    assert not pm.running


def test_a_failing_receiver_is_retried(
    manager: PollingManager,
    receiver: FakeReceiver,
    core: DeliveryCore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="emailmw")
    receiver.fail_next = 2
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    manager.start()
    receiver.push(message("after the failures"))
    assert sub.wait_for(1) == ["after the failures"]
    assert "the server went away" in caplog.text
    assert manager.running


def test_a_failing_subscription_does_not_kill_the_thread(
    manager: PollingManager,
    receiver: FakeReceiver,
    core: DeliveryCore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="emailmw")
    sub = FakeSubscription(fail_on="bad")
    core.register_subscription("/t", sub)
    manager.start()
    receiver.push(message("bad"))
    receiver.push(message("good"))
    assert sub.wait_for(1) == ["good"]
    assert manager.running
    assert "subscription exploded" in caplog.text
    assert any(r.exc_info for r in caplog.records)


def test_duplicate_message_ids_are_dropped(
    manager: PollingManager, receiver: FakeReceiver, core: DeliveryCore, stats: StatsCounters
) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    manager.start()
    receiver.push(
        message("1", message_id="<same@x>"),
        message("2", message_id="<other@x>"),
        message("3", message_id="<same@x>"),
    )
    receiver.push(message("4", message_id="<other@x>"), message("5", message_id="<last@x>"))
    assert sub.wait_for(3) == ["1", "2", "5"]
    assert manager.shutdown(timeout=2.0)
    assert sub.bodies == ["1", "2", "5"]
    snapshot = stats.snapshot()
    assert snapshot.dropped["duplicate"] == 2
    assert snapshot.received == 5


def test_emails_without_message_id_are_not_deduplicated(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch_batch([message("a", message_id=""), message("a", message_id="")])
    assert sub.bodies == ["a", "a"]
    assert stats.snapshot().dropped["duplicate"] == 0


def test_a_held_message_is_released_at_its_deadline_with_no_email_arriving(
    receiver: FakeReceiver, stats: StatsCounters
) -> None:
    # Real clock, short window. The thread sleeps in receive(None) when the message is
    # held by a dispatch in this thread: only the wake-up can end that sleep in time.
    core = DeliveryCore(stats, reorder_window=0.05, horizon_ns=HORIZON)
    pm = PollingManager(receiver, core)
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    pm.start()
    try:
        core.dispatch_batch(numbered(1))
        core.dispatch_batch(numbered(3))
        assert sub.bodies == ["1"]
        assert sub.wait_for(2) == ["1", "3"]
        assert sub.threads == {"MainThread", "emailmw-poll"}
        assert receiver.interrupts >= 1
        assert core.held_count == 0
    finally:
        assert pm.shutdown(timeout=2.0)


# -- routing: messages -----------------------------------------------------------------------


def test_messages_go_to_every_subscription_of_their_topic(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    a, b, other = FakeSubscription(), FakeSubscription(), FakeSubscription()
    core.register_subscription("/t", a)
    core.register_subscription("/t", b)
    core.register_subscription("/other", other)
    before = time.time_ns()
    core.dispatch(message("hello", number=1))
    assert a.bodies == ["hello"]
    assert b.bodies == ["hello"]
    assert other.messages == []
    info = a.messages[0][1]
    assert info.publisher_gid == Gid(77)
    assert info.source_timestamp == Timestamp(published(1))
    assert before <= info.received_timestamp.nanoseconds <= time.time_ns()
    snapshot = stats.snapshot()
    assert (snapshot.received, snapshot.delivered) == (1, 2)


def test_unregistered_subscriptions_get_nothing(core: DeliveryCore, stats: StatsCounters) -> None:
    a, b = FakeSubscription(), FakeSubscription()
    core.register_subscription("/t", a)
    core.register_subscription("/t", b)
    core.unregister_subscription("/t", a)
    core.dispatch(message())
    assert (len(a.messages), len(b.messages)) == (0, 1)
    core.unregister_subscription("/t", b)
    core.unregister_subscription("/t", b)  # twice is harmless
    core.dispatch(message())
    assert (len(a.messages), len(b.messages)) == (0, 1)
    assert stats.snapshot().dropped["unmatched"] == 1


def test_emails_nobody_wants_are_counted_unmatched(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    reply = message()
    reply.in_reply_to = "<req@x>"  # a reply is a service response, not a message
    core.dispatch_batch([plain("not ours", "<n@x>"), message(subject="/nobody-listens"), reply])
    assert sub.messages == []
    snapshot = stats.snapshot()
    assert snapshot.dropped["unmatched"] == 3
    assert snapshot.dropped["malformed"] == 0
    assert snapshot.delivered == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Publisher-GID": "-1"}, "Publisher-GID"),
        ({"Publisher-GID": "4294967296"}, "Publisher-GID"),
        ({"Publisher-GID": "abc"}, "Publisher-GID"),
        ({"Publisher-GID": ""}, "Publisher-GID"),
        ({"Source-Timestamp": None}, "Source-Timestamp"),
        ({"Source-Timestamp": "yesterday"}, "Source-Timestamp"),
        ({"Publication-Number": "0"}, "Publication-Number"),
        ({"Publication-Number": "one"}, "Publication-Number"),
        ({"Publication-Number": "2", "Previous-Timestamp": "then"}, "Previous-Timestamp"),
        ({"Publication-Number": "3", "Previous-Number": "3"}, "Previous-Number"),
        ({"Publication-Number": "3", "Previous-Number": "7"}, "Previous-Number"),
        ({"Publication-Number": "3", "Previous-Number": "-1"}, "Previous-Number"),
        ({"Publication-Number": "3", "Previous-Number": "two"}, "Previous-Number"),
    ],
)
def test_malformed_message_metadata_is_logged_and_counted(
    core: DeliveryCore,
    stats: StatsCounters,
    headers: dict[str, str | None],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="emailmw")
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    fields: dict[str, Any] = {k.replace("-", "_"): v for k, v in headers.items()}
    core.dispatch(message(**fields))
    assert sub.messages == []
    snapshot = stats.snapshot()
    assert snapshot.dropped["malformed"] == 1
    assert snapshot.dropped["unmatched"] == 0
    assert reason in caplog.text
    assert "malformed" in caplog.text


def test_malformed_emails_never_raise_and_the_batch_goes_on(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch_batch(
        [
            message(Publisher_GID="junk"),
            service_email(seq=None),
            plain("not emailmw", "<n@x>"),
            message("fine"),
        ]
    )
    assert sub.bodies == ["fine"]
    snapshot = stats.snapshot()
    assert snapshot.dropped["malformed"] == 2
    assert snapshot.dropped[DropReason.UNMATCHED.value] == 1
    assert snapshot.received == 4


def test_an_unnumbered_message_is_delivered_as_it_comes(core: DeliveryCore) -> None:
    # Another implementation's message (no Publication-Number): never held.
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch_batch([message("3", number=3), message("plain")])
    assert sub.bodies == ["plain"]
    assert core.held_count == 1


# -- routing: order --------------------------------------------------------------------------


def test_a_failed_publication_is_not_waited_for(core: DeliveryCore) -> None:
    # Previous-Number says numbers 2 and 3 were never accepted: 4 follows 1 at once.
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch_batch([message("1", number=1), message("4", number=4, previous=1)])
    assert sub.bodies == ["1", "4"]
    assert core.next_deadline() is None
    # 3 was stored after all (its publish() raised late); it too names 1. Late, once.
    core.dispatch(message("3", number=3, previous=1))
    assert sub.bodies == ["1", "4", "3"]


def test_a_message_that_overtook_one_is_held_until_it_comes(
    core: DeliveryCore, clock: FakeClock
) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch_batch(numbered(1, 3))
    assert sub.bodies == ["1"]
    assert core.held_count == 1
    assert core.next_deadline() == clock.now + WINDOW
    core.dispatch_batch(numbered(2))
    assert sub.bodies == ["1", "2", "3"]
    assert core.next_deadline() is None
    assert core.held_count == 0


def test_expire_gives_the_gap_up_at_the_window_and_says_so(
    core: DeliveryCore,
    clock: FakeClock,
    stats: StatsCounters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="emailmw")
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    start = clock.now
    core.dispatch_batch(numbered(1, 3, 4))
    clock.now = start + WINDOW - 0.001
    core.expire()
    assert sub.bodies == ["1"]
    clock.now = start + WINDOW
    core.expire()
    assert sub.bodies == ["1", "3", "4"]
    assert stats.snapshot().delivered == 3
    assert "2 message(s) on '/t' waited" in caplog.text
    core.dispatch_batch(numbered(2, 5))  # the late one as it comes; the chain goes on
    assert sub.bodies == ["1", "3", "4", "2", "5"]


def test_the_core_learns_from_unmatched_numbered_messages(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    # Message 1 goes by while the topic has no subscription: unmatched, but learned.
    core.dispatch(message("1", number=1))
    assert stats.snapshot().dropped["unmatched"] == 1
    assert core.stream_count == 1
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch(message("2", number=2))
    assert sub.bodies == ["2"]  # at once: 1 is not waited for
    assert core.next_deadline() is None


def test_a_late_subscription_does_not_wait_for_unwanted_messages_out_of_order(
    core: DeliveryCore,
) -> None:
    core.dispatch_batch(numbered(1, 3))  # nobody subscribed: both learned, none held
    assert core.held_count == 0
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch_batch(numbered(2, 4))
    assert sub.bodies == ["2", "4"]
    assert core.next_deadline() is None


@pytest.mark.parametrize("between", [[], [2]])
def test_a_resubscription_does_not_wait(core: DeliveryCore, between: list[int]) -> None:
    first = FakeSubscription()
    core.register_subscription("/t", first)
    core.dispatch_batch(numbered(1))
    core.unregister_subscription("/t", first)
    core.dispatch_batch(numbered(*between))  # what went by while unsubscribed, if any
    again = FakeSubscription()
    core.register_subscription("/t", again)
    following = len(between) + 2
    core.dispatch_batch(numbered(following))
    assert again.bodies == [str(following)]
    assert first.bodies == ["1"]
    assert core.next_deadline() is None


def test_a_stream_first_seen_mid_way_does_not_wait_for_what_was_before_the_horizon(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    before = str(HORIZON - 1000 * MS)
    core.dispatch(message("7", number=7, Previous_Timestamp=before))
    assert sub.bodies == ["7"]
    core.dispatch(message("9", number=9))  # 8 was published after the horizon: waited for
    assert sub.bodies == ["7"]
    core.dispatch(message("8", number=8))
    assert sub.bodies == ["7", "8", "9"]


def test_a_mid_stream_start_whose_first_two_messages_swapped_does_not_wait(
    core: DeliveryCore,
) -> None:
    # The receiver started while 7 was in flight (published before the horizon); 8 and 9
    # were published after it and arrive swapped. 9 waits for 8; 8 starts the stream.
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    before = str(HORIZON - 1000 * MS)
    core.dispatch(message("9", number=9))
    assert sub.bodies == []
    core.dispatch(message("8", number=8, Previous_Timestamp=before))
    assert sub.bodies == ["8", "9"]
    assert core.held_count == 0
    assert core.next_deadline() is None


def test_publishers_of_a_topic_are_ordered_independently(core: DeliveryCore) -> None:
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    core.dispatch_batch([*numbered(1, 3, gid=1), *numbered(1, 2, gid=2), *numbered(2, gid=1)])
    assert [(info.publisher_gid.value, body) for body, info in sub.messages] == [
        (1, "1"),
        (2, "1"),
        (2, "2"),
        (1, "2"),
        (1, "3"),
    ]


# -- routing: services -----------------------------------------------------------------------


def test_requests_go_to_every_server_of_their_service(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    a, b, other = FakeServer(), FakeServer(), FakeServer()
    core.register_service_server("/svc", a)
    core.register_service_server("/svc", b)
    core.register_service_server("/other", other)
    request = service_email("2 3", gid="9", seq="4")
    core.dispatch(request)
    assert [e for e, _ in a.requests] == [request]
    assert len(b.requests) == 1
    assert other.requests == []
    info = a.requests[0][1]
    assert (info.client_gid, info.sequence_number) == (Gid(9), 4)
    assert info.source_timestamp == Timestamp(HORIZON)
    assert stats.snapshot().delivered == 2
    core.unregister_service_server("/svc", a)
    core.unregister_service_server("/svc", b)
    core.dispatch(service_email())
    assert len(a.requests) == len(b.requests) == 1
    assert stats.snapshot().dropped["unmatched"] == 1


def test_responses_go_to_their_client_by_gid_only(core: DeliveryCore) -> None:
    mine, theirs, server = FakeClient(), FakeClient(), FakeServer()
    assert core.register_service_client(Gid(9), mine)
    assert core.register_service_client(Gid(10), theirs)
    core.register_service_server("/svc", server)
    core.dispatch(service_email("5", gid="9", seq="1", in_reply_to="<req@x>"))
    assert [m for m, _ in mine.responses] == ["5"]
    assert mine.responses[0][1].sequence_number == 1
    assert theirs.responses == []
    assert server.requests == []  # a reply never goes to a server


def test_a_response_for_an_unknown_client_is_unmatched(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    client = FakeClient()
    assert core.register_service_client(Gid(9), client)
    core.dispatch(service_email(gid="11", in_reply_to="<req@x>"))
    core.unregister_service_client(Gid(9))
    core.dispatch(service_email(gid="9", in_reply_to="<req@x>"))
    assert client.responses == []
    assert stats.snapshot().dropped["unmatched"] == 2


def test_a_response_its_client_does_not_wait_for_is_not_unmatched(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    client = FakeClient(pending=False)  # referenced: routes hold entities weakly
    assert core.register_service_client(Gid(9), client)
    core.dispatch(service_email(gid="9", in_reply_to="<req@x>"))
    assert stats.snapshot().dropped_total == 0


def test_a_second_client_with_the_same_gid_is_refused(core: DeliveryCore) -> None:
    first, second = FakeClient(), FakeClient()
    assert core.register_service_client(Gid(9), first)
    assert not core.register_service_client(Gid(9), second)
    core.dispatch(service_email(gid="9", in_reply_to="<req@x>"))
    assert (len(first.responses), len(second.responses)) == (1, 0)
    core.unregister_service_client(Gid(9))
    assert core.register_service_client(Gid(9), second)


def test_servers_ignore_emails_that_are_not_requests(
    core: DeliveryCore, stats: StatsCounters
) -> None:
    server = FakeServer()
    core.register_service_server("/svc", server)
    core.dispatch_batch([plain("plain", "<p@x>", subject="/svc"), message(subject="/svc")])
    assert server.requests == []
    assert stats.snapshot().dropped["unmatched"] == 2
    assert stats.snapshot().dropped["malformed"] == 0


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"seq": None}, "must come together"),
        ({"gid": None}, "must come together"),
        ({"gid": "-3"}, "Client-GID"),
        ({"gid": "x"}, "Client-GID"),
        ({"seq": "one"}, "Request-Sequence-Number"),
        ({"seq": str(2**63)}, "Request-Sequence-Number"),
        ({"stamp": None}, "Source-Timestamp"),
        ({"stamp": "now"}, "Source-Timestamp"),
        ({"stamp": None, "in_reply_to": "<r@x>"}, "Source-Timestamp"),
    ],
)
def test_malformed_service_metadata_is_logged_and_counted(
    core: DeliveryCore,
    stats: StatsCounters,
    kwargs: dict[str, Any],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="emailmw")
    server, client = FakeServer(), FakeClient()
    core.register_service_server("/svc", server)
    assert core.register_service_client(Gid(9), client)
    core.dispatch(service_email(**kwargs))
    assert server.requests == []
    assert client.responses == []
    assert stats.snapshot().dropped["malformed"] == 1
    assert reason in caplog.text


# -- admission ---------------------------------------------------------------------------------


def test_admission_drops_before_dedupe_and_routing(stats: StatsCounters) -> None:
    policy = AdmissionPolicy(allowed_senders=["friend@example.org"])
    core = DeliveryCore(stats, reorder_window=WINDOW, horizon_ns=HORIZON, admission=policy)
    sub = FakeSubscription()
    core.register_subscription("/t", sub)
    stranger = message("from a stranger", message_id="<m@x>")
    stranger.from_ = "stranger@example.org"
    friend = message("from a friend", message_id="<m@x>")  # same Message-ID: still new
    friend.from_ = "friend@example.org"
    core.dispatch_batch([stranger, friend])
    assert sub.bodies == ["from a friend"]
    snapshot = stats.snapshot()
    assert snapshot.dropped["sender_not_allowed"] == 1
    assert snapshot.dropped["duplicate"] == 0


# -- sleeping on the deadline: arm() and bind_wake() ---------------------------------------


class Wakes:
    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)


def test_arm_returns_the_earliest_deadline(core: DeliveryCore, clock: FakeClock) -> None:
    sub = FakeSubscription()  # referenced: routes hold entities weakly
    core.register_subscription("/t", sub)
    assert core.arm() is None
    start = clock.now
    core.dispatch_batch(numbered(3, gid=1))
    clock.advance(1.0)
    core.dispatch_batch(numbered(3, gid=2))
    assert core.arm() == core.next_deadline() == start + WINDOW
    core.dispatch_batch(numbered(1, 2, gid=1))
    assert core.arm() == start + 1.0 + WINDOW


def test_a_dispatch_in_another_thread_wakes_the_sleeper_only_when_it_makes_the_deadline_earlier(
    core: DeliveryCore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = FakeSubscription()  # referenced: routes hold entities weakly
    core.register_subscription("/t", sub)
    wakes = Wakes()
    core.bind_wake(wakes, threading.current_thread())  # this thread is the sleeper
    assert core.arm() is None  # it sleeps with no deadline
    in_thread(lambda: core.dispatch_batch(numbered(1, 2, gid=1)))
    assert wakes.threads == []  # nothing held: no deadline
    in_thread(lambda: core.dispatch_batch(numbered(4, gid=1)))
    assert wakes.threads == ["other"]  # a deadline where there was none
    clock.advance(1.0)
    in_thread(lambda: core.dispatch_batch(numbered(5, gid=1)))  # held behind 4: same deadline
    in_thread(lambda: core.dispatch_batch(numbered(3, gid=2)))  # a later deadline
    in_thread(lambda: core.dispatch_batch(numbered(1, gid=3)))  # nothing held
    assert wakes.threads == ["other"]
    # The sleeper re-arms on the earliest deadline; an overflowing stream makes a
    # deadline of now: earlier, so it is woken again.
    assert core.arm() == clock.now - 1.0 + WINDOW
    monkeypatch.setattr(ordering, "MAX_HELD_PER_STREAM", 2)
    in_thread(lambda: core.dispatch_batch(numbered(4, 5, gid=2)))
    assert core.next_deadline() == clock.now
    assert wakes.threads == ["other", "other"]


def test_the_sleepers_own_dispatch_does_not_wake_it(core: DeliveryCore, clock: FakeClock) -> None:
    sub = FakeSubscription()  # referenced: routes hold entities weakly
    core.register_subscription("/t", sub)
    wakes = Wakes()
    core.bind_wake(wakes, threading.current_thread())
    assert core.arm() is None
    core.dispatch_batch(numbered(3))  # the sleeper itself holds a message: it re-arms next
    assert wakes.threads == []
    assert core.arm() == clock.now + WINDOW
    in_thread(lambda: core.dispatch_batch(numbered(1, gid=2)))  # nothing earlier
    in_thread(lambda: core.dispatch_batch(numbered(3, gid=3)))  # the same deadline
    assert wakes.threads == []


def test_a_wake_up_is_not_called_under_the_core_lock(core: DeliveryCore, clock: FakeClock) -> None:
    sub = FakeSubscription()  # referenced: routes hold entities weakly
    core.register_subscription("/t", sub)
    seen: list[int | None] = []
    # The wake-up may take other locks (the receiver's): it must run outside the core's.
    core.bind_wake(lambda: seen.append(core.held_count), threading.current_thread())
    core.arm()
    in_thread(lambda: core.dispatch_batch(numbered(3)))
    assert seen == [1]


# -- expiry racing the intraprocess inline dispatch ---------------------------------------------

PER_PUBLISHER = 3000
GAP_EVERY = 97  # this number is skipped: its successor waits for it, and is given up


def publish_with_gaps(sender: IntraEmailSender, gid: int, seed: int) -> None:
    """Publish 1..PER_PUBLISHER on /race as Publisher.publish would, except that every
    GAP_EVERY-th number and the one before the last are never sent (lost): what follows
    each is held until the window gives the gap up, while this thread goes on sending."""
    rng = random.Random(seed)
    stamps: dict[int, int] = {}
    for n in range(1, PER_PUBLISHER + 1):
        stamps[n] = time.time_ns()
        if n % GAP_EVERY == 0 or n == PER_PUBLISHER - 1:
            continue
        headers = EmailHeaders(
            {
                "Publisher-GID": str(gid),
                "Source-Timestamp": str(stamps[n]),
                "Publication-Number": str(n),
            }
        )
        if n > 1:
            headers["Previous-Timestamp"] = str(stamps[n - 1])
        sender.send(EmailContent("/race", str(n)), headers)
        if rng.random() < 0.02:
            time.sleep(rng.random() * 0.03)  # sometimes longer than the window


def sent_numbers() -> list[int]:
    return [n for n in range(1, PER_PUBLISHER + 1) if n % GAP_EVERY and n != PER_PUBLISHER - 1]


@pytest.mark.timeout(120)
def test_expiry_racing_inline_dispatch_keeps_each_publishers_order() -> None:
    stats = StatsCounters()
    receiver = IntraEmailReceiver()
    receiver.connect()
    core = DeliveryCore(stats, reorder_window=0.02, horizon_ns=receiver.start_time_ns)
    manager = PollingManager(receiver, core)
    sub = FakeSubscription()
    core.register_subscription("/race", sub)
    manager.start()
    sender = IntraEmailSender(receiver, stats=stats)
    errors: list[BaseException] = []

    def run(gid: int) -> None:
        try:
            publish_with_gaps(sender, gid, seed=gid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(gid,), name=f"pub-{gid}") for gid in (1, 2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60.0)
        assert not errors
        expected = sent_numbers()
        # The last message of each waits for a lost one: only the expiry releases it,
        # and only a wake-up lets the polling thread see that deadline in time.
        sub.wait_for(2 * len(expected), timeout=30.0)
    finally:
        assert manager.shutdown(timeout=2.0)
    by_publisher: dict[int, list[int]] = {1: [], 2: []}
    for body, info in sub.messages:
        by_publisher[info.publisher_gid.value].append(int(body))
    for gid in (1, 2):
        # In publication order, none lost, none twice.
        assert by_publisher[gid] == expected, gid
    # Both paths ran: inline in the publishing threads and on the polling thread.
    assert {"pub-1", "pub-2", "emailmw-poll"} <= sub.threads
    assert core.held_count == 0
    snapshot = stats.snapshot()
    assert snapshot.delivered == 2 * len(expected)
    assert snapshot.dropped_total == 0


@pytest.mark.timeout(120)
def test_two_publishing_threads_with_a_short_window_through_a_real_context() -> None:
    count = 2000
    context = emailmw.Context(emailmw.Options(intraprocess=True, reorder_window=0.02))
    context.init()
    try:
        sub = emailmw.Subscription("/race", depth=2 * count, context=context)
        publishers = [emailmw.Publisher("/race", context=context) for _ in range(2)]
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                for n in range(count):
                    publishers[index].publish(f"{index}:{n}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60.0)
        assert not errors
        got: dict[str, list[int]] = {"0": [], "1": []}
        for _ in range(2 * count):
            index, n = emailmw.wait_for_message(sub, 10.0).split(":")
            got[index].append(int(n))
        assert sub.get_message() is None
        assert got == {"0": list(range(count)), "1": list(range(count))}
        assert context.stats().dropped_total == 0
    finally:
        context.shutdown()
