"""Dispatch units: the PollingManager thread (with a fake receiver) and the handlers
(with hand-made EmailData)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

import pytest

from emailmw.dispatch.handlers import ServiceHandler, SubscriptionHandler
from emailmw.dispatch.polling import PollingManager
from emailmw.info import Gid, MessageInfo, ServiceInfo, Timestamp
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.receiver import EmailReceiver

pytestmark = pytest.mark.timeout(30)


# -- a fake receiver -----------------------------------------------------------------


class FakeReceiver(EmailReceiver):
    """Hands out batches pushed by the test; blocks on a condition in between."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._batches: deque[list[EmailData]] = deque()
        self._interrupted = False
        self.fail_next = 0
        self.receive_calls = 0
        self.closed = False

    def push(self, *emails: EmailData) -> None:
        with self._cond:
            self._batches.append(list(emails))
            self._cond.notify_all()

    def receive(self, timeout: float | None) -> list[EmailData]:
        with self._cond:
            self.receive_calls += 1
            if self.fail_next:
                self.fail_next -= 1
                raise OSError("the server went away")
            self._cond.wait_for(lambda: self._batches or self._interrupted, timeout)
            self._interrupted = False
            return self._batches.popleft() if self._batches else []

    def interrupt(self) -> None:
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def close(self) -> None:
        self.closed = True


class Recorder:
    """A handler that records what it was offered and signals when it has ``n``."""

    def __init__(self, take: bool = True) -> None:
        self.take = take
        self.seen: list[str] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, email: EmailData) -> bool:
        with self._cond:
            self.seen.append(email.content.body)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()
        return self.take

    def wait_for(self, n: int, timeout: float = 5.0) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.seen) >= n, timeout), self.seen
            return list(self.seen)


def email(body: str, message_id: str = "", subject: str = "/t", **headers: str) -> EmailData:
    return EmailData(
        EmailContent(subject, body),
        EmailHeaders({k.replace("_", "-"): v for k, v in headers.items()}),
        message_id=message_id,
    )


@pytest.fixture
def receiver() -> FakeReceiver:
    return FakeReceiver()


@pytest.fixture
def stats() -> StatsCounters:
    return StatsCounters()


@pytest.fixture
def manager(receiver: FakeReceiver, stats: StatsCounters) -> Iterable[PollingManager]:
    pm = PollingManager(receiver, stats)
    yield pm
    assert pm.shutdown(timeout=2.0)


# -- PollingManager ------------------------------------------------------------------


def test_dispatches_in_order_on_a_named_thread(
    manager: PollingManager, receiver: FakeReceiver, stats: StatsCounters
) -> None:
    recorder = Recorder()
    manager.register_handler(recorder)
    manager.start()
    assert manager.running
    receiver.push(*(email(str(i), f"<{i}@x>") for i in range(5)))
    receiver.push(*(email(str(i), f"<{i}@x>") for i in range(5, 10)))
    assert recorder.wait_for(10) == [str(i) for i in range(10)]
    assert recorder.threads == {"emailmw-poll"}
    snapshot = stats.snapshot()
    assert snapshot.received == 10
    assert snapshot.dropped_total == 0


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


def test_shutdown_before_start(receiver: FakeReceiver) -> None:
    pm = PollingManager(receiver)
    assert pm.shutdown()
    assert not pm.running


def test_every_handler_is_offered_every_email(
    manager: PollingManager, receiver: FakeReceiver, stats: StatsCounters
) -> None:
    declines, takes = Recorder(take=False), Recorder()
    manager.register_handler(declines)
    manager.register_handler(takes)
    manager.start()
    receiver.push(email("a", "<a@x>"), email("b", "<b@x>"))
    assert takes.wait_for(2) == ["a", "b"]
    assert declines.wait_for(2) == ["a", "b"]
    assert stats.snapshot().dropped["unmatched"] == 0


def test_email_no_handler_takes_is_counted_unmatched(
    manager: PollingManager, receiver: FakeReceiver, stats: StatsCounters
) -> None:
    declines = Recorder(take=False)
    manager.register_handler(declines)
    manager.start()
    receiver.push(email("a", "<a@x>"))
    declines.wait_for(1)
    manager.shutdown(timeout=2.0)
    assert stats.snapshot().dropped["unmatched"] == 1


def test_a_failing_handler_does_not_kill_the_thread(
    manager: PollingManager,
    receiver: FakeReceiver,
    stats: StatsCounters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="emailmw")

    def boom(e: EmailData) -> bool:
        if e.content.body == "bad":
            raise RuntimeError("handler exploded")
        return False

    recorder = Recorder()
    manager.register_handler(boom)
    manager.register_handler(recorder)
    manager.start()
    receiver.push(email("bad", "<1@x>"))
    receiver.push(email("good", "<2@x>"))
    # The next handler still got the email, and the thread goes on with the next one.
    assert recorder.wait_for(2) == ["bad", "good"]
    assert manager.running
    assert "handler exploded" in caplog.text
    assert any(r.exc_info for r in caplog.records)
    assert stats.snapshot().dropped["unmatched"] == 0


class Timed(Recorder):
    """A handler with a deadline, like the subscription handler's reorder buffer."""

    def __init__(self, delay: float, fail: bool = False) -> None:
        super().__init__(take=False)
        self.deadline: float | None = time.monotonic() + delay
        self.fail = fail
        self.expired = threading.Event()

    def next_deadline(self) -> float | None:
        return self.deadline

    def expire(self) -> None:
        self.expired.set()
        self.deadline = None
        if self.fail:
            raise RuntimeError("expire exploded")


def test_a_timed_handler_is_woken_at_its_deadline(manager: PollingManager) -> None:
    timed, plain = Timed(0.05), Recorder()
    manager.register_handler(timed)
    manager.register_handler(plain)  # a plain callable has no deadline: still fine
    manager.start()
    # No email arrives: only the deadline can end the receiver's wait.
    assert timed.expired.wait(5.0)
    assert timed.seen == [] and plain.seen == []


def test_a_failing_expire_does_not_kill_the_thread(
    manager: PollingManager, receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="emailmw")
    timed = Timed(0.01, fail=True)
    manager.register_handler(timed)
    manager.start()
    assert timed.expired.wait(5.0)
    receiver.push(email("after", "<after@x>"))
    assert timed.wait_for(1) == ["after"]
    assert manager.running
    assert "expire exploded" in caplog.text


def test_a_failing_receiver_is_retried(
    manager: PollingManager, receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="emailmw")
    receiver.fail_next = 1
    recorder = Recorder()
    manager.register_handler(recorder)
    manager.start()
    receiver.push(email("after the failure", "<1@x>"))
    assert recorder.wait_for(1, timeout=5.0) == ["after the failure"]
    assert "the server went away" in caplog.text


def test_duplicate_message_ids_are_dropped(
    manager: PollingManager, receiver: FakeReceiver, stats: StatsCounters
) -> None:
    recorder = Recorder()
    manager.register_handler(recorder)
    manager.start()
    receiver.push(email("1", "<same@x>"), email("2", "<other@x>"), email("3", "<same@x>"))
    receiver.push(email("4", "<other@x>"), email("5", "<last@x>"))
    assert recorder.wait_for(3) == ["1", "2", "5"]
    manager.shutdown(timeout=2.0)
    assert recorder.seen == ["1", "2", "5"]
    snapshot = stats.snapshot()
    assert snapshot.dropped["duplicate"] == 2
    assert snapshot.received == 5


def test_emails_without_message_id_are_not_deduplicated(
    receiver: FakeReceiver, stats: StatsCounters
) -> None:
    pm = PollingManager(receiver, stats)
    recorder = Recorder()
    pm.register_handler(recorder)
    pm.dispatch_batch([email("a"), email("a")])
    assert recorder.seen == ["a", "a"]
    assert stats.snapshot().dropped["duplicate"] == 0


def test_dispatch_batch_can_be_used_without_the_thread(
    receiver: FakeReceiver, stats: StatsCounters
) -> None:
    pm = PollingManager(receiver, stats)
    recorder = Recorder()
    pm.register_handler(recorder)
    pm.dispatch_batch([email("x", "<1@x>"), email("y", "<2@x>")])
    assert recorder.seen == ["x", "y"]
    assert stats.snapshot().received == 2


# -- the handlers: messages ----------------------------------------------------------


class FakeSubscription:
    def __init__(self) -> None:
        self.messages: list[tuple[str, MessageInfo]] = []

    def _push_message(self, message: str, info: MessageInfo) -> None:
        self.messages.append((message, info))


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[tuple[EmailData, ServiceInfo]] = []

    def _push_request(self, email: EmailData, info: ServiceInfo) -> None:
        self.requests.append((email, info))


class FakeClient:
    def __init__(self) -> None:
        self.responses: list[tuple[str, ServiceInfo]] = []

    def _push_response(self, message: str, info: ServiceInfo) -> None:
        self.responses.append((message, info))


NOW = str(time.time_ns())
_ids = itertools.count()


def unique_id() -> str:
    return f"<{next(_ids)}@handmade>"


def message(body: str = "m", subject: str = "/t", **headers: str) -> EmailData:
    base = {"Source-Timestamp": NOW, "Publisher-GID": "77"}
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return EmailData(
        EmailContent(subject, body),
        EmailHeaders({k: v for k, v in base.items() if v is not None}),
        message_id=unique_id(),
    )


def test_subscription_handler_delivers_to_every_subscription_of_the_topic() -> None:
    stats = StatsCounters()
    handler = SubscriptionHandler(stats)
    a, b, other = FakeSubscription(), FakeSubscription(), FakeSubscription()
    handler.register_subscription("/t", a)
    handler.register_subscription("/t", b)
    handler.register_subscription("/other", other)
    before = time.time_ns()
    assert handler(message("hello"))
    assert [m for m, _ in a.messages] == ["hello"]
    assert [m for m, _ in b.messages] == ["hello"]
    assert other.messages == []
    info = a.messages[0][1]
    assert info.publisher_gid == Gid(77)
    assert info.source_timestamp == Timestamp(int(NOW))
    assert before <= info.received_timestamp.nanoseconds <= time.time_ns()
    assert stats.snapshot().delivered == 2


def test_subscription_handler_unregister() -> None:
    handler = SubscriptionHandler(StatsCounters())
    a, b = FakeSubscription(), FakeSubscription()
    handler.register_subscription("/t", a)
    handler.register_subscription("/t", b)
    handler.unregister_subscription("/t", a)
    assert handler(message())
    assert (len(a.messages), len(b.messages)) == (0, 1)
    handler.unregister_subscription("/t", b)
    handler.unregister_subscription("/t", b)  # twice is harmless
    assert not handler(message())


def test_subscription_handler_declines_other_emails() -> None:
    handler = SubscriptionHandler(StatsCounters())
    sub = FakeSubscription()
    handler.register_subscription("/t", sub)
    assert not handler(email("not ours", "<n@x>"))  # no metadata at all
    assert not handler(message(subject="/nobody-listens"))
    reply = message()
    reply.in_reply_to = "<req@x>"
    assert not handler(reply)  # a reply is a service response, not a message
    assert sub.messages == []


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
def test_subscription_handler_malformed_metadata_is_logged_and_counted(
    headers: dict[str, str | None], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="emailmw")
    stats = StatsCounters()
    handler = SubscriptionHandler(stats)
    sub = FakeSubscription()
    handler.register_subscription("/t", sub)
    assert handler(message(**{k.replace("-", "_"): v for k, v in headers.items()}))  # type: ignore[arg-type]
    assert sub.messages == []
    assert stats.snapshot().dropped["malformed"] == 1
    assert reason in caplog.text
    assert "malformed" in caplog.text


def test_subscription_handler_does_not_wait_for_a_failed_publication() -> None:
    """Previous-Number says numbers 2 and 3 were never accepted: 4 follows 1 at once."""
    handler = SubscriptionHandler(StatsCounters(), reorder_window=60.0)
    sub = FakeSubscription()
    handler.register_subscription("/t", sub)
    first = str(time.time_ns())
    assert handler(message("1", Publication_Number="1", Source_Timestamp=first))
    assert handler(
        message("4", Publication_Number="4", Previous_Number="1", Previous_Timestamp=first)
    )
    assert [m for m, _ in sub.messages] == ["1", "4"]
    assert handler.next_deadline() is None  # nothing held back
    assert handler(message("3", Publication_Number="3"))  # stored after all: comes late
    assert [m for m, _ in sub.messages] == ["1", "4", "3"]


def test_subscription_handler_holds_back_a_message_that_overtook_one() -> None:
    handler = SubscriptionHandler(StatsCounters(), reorder_window=60.0)
    sub = FakeSubscription()
    handler.register_subscription("/t", sub)
    first = str(time.time_ns())
    assert handler(message("1", Publication_Number="1", Source_Timestamp=first))
    assert handler(message("3", Publication_Number="3", Previous_Timestamp=first))
    assert [m for m, _ in sub.messages] == ["1"]
    assert handler.next_deadline() is not None
    assert handler(message("2", Publication_Number="2", Previous_Timestamp=first))
    assert [m for m, _ in sub.messages] == ["1", "2", "3"]
    assert handler.next_deadline() is None


# -- the handlers: services ----------------------------------------------------------


def service_email(
    body: str = "r",
    subject: str = "/svc",
    gid: str | None = "9",
    seq: str | None = "1",
    stamp: str | None = NOW,
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


def test_service_handler_routes_requests_to_servers_of_the_service() -> None:
    stats = StatsCounters()
    handler = ServiceHandler(stats)
    a, b, other = FakeServer(), FakeServer(), FakeServer()
    handler.register_service_server("/svc", a)
    handler.register_service_server("/svc", b)
    handler.register_service_server("/other", other)
    request = service_email("2 3", gid="9", seq="4")
    assert handler(request)
    assert [e for e, _ in a.requests] == [request]
    assert len(b.requests) == 1
    assert other.requests == []
    info = a.requests[0][1]
    assert (info.client_gid, info.sequence_number) == (Gid(9), 4)
    assert info.source_timestamp == Timestamp(int(NOW))
    assert stats.snapshot().delivered == 2
    handler.unregister_service_server("/svc", a)
    handler.unregister_service_server("/svc", b)
    assert not handler(request)


def test_service_handler_routes_responses_by_client_gid_only() -> None:
    handler = ServiceHandler(StatsCounters())
    mine, theirs, server = FakeClient(), FakeClient(), FakeServer()
    handler.register_service_client(Gid(9), mine)
    handler.register_service_client(Gid(10), theirs)
    handler.register_service_server("/svc", server)
    assert handler(service_email("5", gid="9", seq="1", in_reply_to="<req@x>"))
    assert [m for m, _ in mine.responses] == ["5"]
    assert mine.responses[0][1].sequence_number == 1
    assert theirs.responses == []
    assert server.requests == []  # a reply never goes to a server


def test_service_handler_response_for_unknown_client_is_not_delivered() -> None:
    handler = ServiceHandler(StatsCounters())
    client = FakeClient()
    handler.register_service_client(Gid(9), client)
    assert not handler(service_email(gid="11", in_reply_to="<req@x>"))
    assert client.responses == []
    handler.unregister_service_client(Gid(9))
    assert not handler(service_email(gid="9", in_reply_to="<req@x>"))
    assert client.responses == []


def test_service_handler_refuses_a_second_client_with_the_same_gid() -> None:
    handler = ServiceHandler(StatsCounters())
    handler.register_service_client(Gid(9), FakeClient())
    with pytest.raises(ValueError):
        handler.register_service_client(Gid(9), FakeClient())


def test_service_handler_ignores_non_service_emails() -> None:
    stats = StatsCounters()
    handler = ServiceHandler(stats)
    server = FakeServer()
    handler.register_service_server("/svc", server)
    assert not handler(email("plain", "<p@x>", subject="/svc"))
    assert not handler(message(subject="/svc"))  # a pub/sub message
    assert server.requests == []
    assert stats.snapshot().dropped_total == 0


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
def test_service_handler_malformed_metadata_is_logged_and_counted(
    kwargs: dict[str, str | None], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="emailmw")
    stats = StatsCounters()
    handler = ServiceHandler(stats)
    server, client = FakeServer(), FakeClient()
    handler.register_service_server("/svc", server)
    handler.register_service_client(Gid(9), client)
    assert handler(service_email(**kwargs))  # type: ignore[arg-type]
    assert server.requests == []
    assert client.responses == []
    assert stats.snapshot().dropped["malformed"] == 1
    assert reason in caplog.text


def test_malformed_email_through_the_polling_manager_is_never_raised(
    receiver: FakeReceiver, stats: StatsCounters
) -> None:
    pm = PollingManager(receiver, stats)
    subs, services = SubscriptionHandler(stats), ServiceHandler(stats)
    pm.register_handler(subs)
    pm.register_handler(services)
    sub = FakeSubscription()
    subs.register_subscription("/t", sub)
    pm.dispatch_batch(
        [
            message(Publisher_GID="junk"),
            service_email(seq=None),
            email("not emailmw", "<n@x>"),
            message("fine"),
        ]
    )
    assert [m for m, _ in sub.messages] == ["fine"]
    snapshot = stats.snapshot()
    assert snapshot.dropped["malformed"] == 2
    assert snapshot.dropped[DropReason.UNMATCHED.value] == 1
