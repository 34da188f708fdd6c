"""The intraprocess transport: IntraEmailSender hands emails to IntraEmailReceiver."""

from __future__ import annotations

import re
import threading
import time

import pytest

from emailmw.context import _create_transport
from emailmw.stats import StatsCounters
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.intra import INTRAPROCESS_ADDRESS, IntraEmailReceiver, IntraEmailSender
from emailmw.transport.receiver import EmailReceiver
from emailmw.transport.sender import EmailSender

pytestmark = pytest.mark.timeout(30)

MESSAGE_ID = re.compile(r"<[^<>@\s]+@[^<>@\s]+>")


def pair() -> tuple[IntraEmailSender, IntraEmailReceiver]:
    receiver = IntraEmailReceiver()
    return IntraEmailSender(receiver), receiver


def test_the_context_assembles_an_intraprocess_transport() -> None:
    from emailmw import Options

    sender, receiver = _create_transport(Options(intraprocess=True), StatsCounters())
    assert isinstance(sender, IntraEmailSender)
    assert isinstance(receiver, IntraEmailReceiver)
    assert isinstance(sender, EmailSender)
    assert isinstance(receiver, EmailReceiver)
    sender.connect()
    receiver.connect()
    sender.send(EmailContent("/t", "x"))
    assert [e.content.body for e in receiver.receive(0)] == ["x"]
    sender.close()
    receiver.close()
    receiver.close()  # idempotent


def test_send_then_receive_without_dispatcher() -> None:
    sender, receiver = pair()
    headers = EmailHeaders({"Publisher-GID": "5"})
    message_id = sender.send(EmailContent("/t", "hello"), headers)
    emails = receiver.receive(1.0)
    assert len(emails) == 1
    email = emails[0]
    assert email.content == EmailContent("/t", "hello")
    assert email.headers == {"Publisher-GID": "5"}
    assert email.message_id == message_id
    assert email.in_reply_to is None
    assert email.from_ == INTRAPROCESS_ADDRESS
    assert email.recipients.to == [INTRAPROCESS_ADDRESS]


def test_receive_returns_everything_queued_in_order() -> None:
    sender, receiver = pair()
    for i in range(50):
        sender.send(EmailContent("/t", str(i)))
    assert [e.content.body for e in receiver.receive(0)] == [str(i) for i in range(50)]
    assert receiver.receive(0) == []


def test_message_ids_are_unique_random_and_well_formed() -> None:
    sender_a, receiver_a = pair()
    sender_b, _ = pair()
    ids_a = [sender_a.send(EmailContent("/t", "x")) for _ in range(100)]
    ids_b = [sender_b.send(EmailContent("/t", "x")) for _ in range(100)]
    assert all(MESSAGE_ID.fullmatch(i) for i in ids_a + ids_b)
    assert len(set(ids_a)) == 100
    assert not set(ids_a) & set(ids_b)  # two receivers never hand out the same id
    assert [e.message_id for e in receiver_a.receive(0)] == ids_a


def test_receiver_stamps_an_email_without_message_id() -> None:
    _, receiver = pair()
    email = EmailData(EmailContent("/t", "x"))
    assert email.message_id == ""
    new_id = receiver.deliver(email)
    assert MESSAGE_ID.fullmatch(new_id)
    assert email.message_id == new_id
    assert [e.message_id for e in receiver.receive(0)] == [new_id]


def test_reply_goes_to_the_original_sender() -> None:
    sender, receiver = pair()
    original = EmailData(
        EmailContent("/svc", "req"), message_id="<req-1@host>", from_="client@example.com"
    )
    reply_id = sender.reply(EmailContent("/svc", "resp"), original, EmailHeaders({"A": "1"}))
    [email] = receiver.receive(0)
    assert email.message_id == reply_id
    assert email.in_reply_to == "<req-1@host>"
    assert email.recipients.to == ["client@example.com"]
    assert email.headers == {"A": "1"}
    assert email.content.body == "resp"


def test_receive_times_out_with_an_empty_list() -> None:
    _, receiver = pair()
    start = time.monotonic()
    assert receiver.receive(0.2) == []
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 2.0
    start = time.monotonic()
    assert receiver.receive(0) == []
    assert time.monotonic() - start < 0.1


def test_interrupt_wakes_a_blocked_receive_promptly() -> None:
    _, receiver = pair()
    result: list[object] = []
    started = threading.Event()

    def run() -> None:
        started.set()
        result.append(receiver.receive(None))

    thread = threading.Thread(target=run)
    thread.start()
    started.wait(5)
    start = time.monotonic()
    receiver.interrupt()
    thread.join(2.0)
    assert not thread.is_alive()
    assert time.monotonic() - start < 1.0
    assert result == [[]]


def test_interrupt_before_receive_makes_the_next_receive_return() -> None:
    _, receiver = pair()
    receiver.interrupt()
    start = time.monotonic()
    assert receiver.receive(5.0) == []
    assert time.monotonic() - start < 1.0


def test_an_interrupt_is_consumed_once() -> None:
    """After the receive that an interrupt ended, receive blocks again as asked."""
    _, receiver = pair()
    receiver.interrupt()
    assert receiver.receive(5.0) == []
    start = time.monotonic()
    assert receiver.receive(0.2) == []
    assert time.monotonic() - start >= 0.15, "a spent interrupt woke a second receive"


def test_receive_wakes_when_an_email_arrives() -> None:
    sender, receiver = pair()
    result: list[list[EmailData]] = []
    thread = threading.Thread(target=lambda: result.append(receiver.receive(10.0)))
    thread.start()
    sender.send(EmailContent("/t", "wake"))
    thread.join(5.0)
    assert not thread.is_alive()
    # The email may have been queued before or after the receive started waiting.
    got = result[0] or receiver.receive(0)
    assert [e.content.body for e in got] == ["wake"]


def test_bound_dispatcher_is_called_in_the_sending_thread_when_idle() -> None:
    sender, receiver = pair()
    calls: list[tuple[str, list[str]]] = []
    assert receiver.bind_dispatcher(
        lambda emails: calls.append(
            (threading.current_thread().name, [e.content.body for e in emails])
        )
    )
    sender.send(EmailContent("/t", "a"))
    sender.send(EmailContent("/t", "b"))
    assert calls == [
        (threading.current_thread().name, ["a"]),
        (threading.current_thread().name, ["b"]),
    ]
    assert receiver.receive(0) == []


def test_bound_dispatcher_keeps_per_sender_order_with_concurrent_senders() -> None:
    """Many threads send at once while a polling loop drains: every email is
    dispatched once, the dispatcher never runs concurrently with itself, and each
    sender's emails come out in the order that sender sent them."""
    sender, receiver = pair()
    threads_count, per_thread = 8, 1500
    total = threads_count * per_thread
    dispatched: list[str] = []
    overlap: list[bool] = []
    in_dispatch = threading.Lock()
    done = threading.Event()

    def dispatcher(emails: list[EmailData]) -> None:
        if not in_dispatch.acquire(blocking=False):
            overlap.append(True)
            return
        try:
            dispatched.extend(e.content.body for e in emails)
            if len(dispatched) >= total:
                done.set()
        finally:
            in_dispatch.release()

    receiver.bind_dispatcher(dispatcher)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            assert receiver.receive(None) == []

    poller = threading.Thread(target=poll, name="test-poll")
    poller.start()
    barrier = threading.Barrier(threads_count)

    def send(tid: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            sender.send(EmailContent("/t", f"{tid}:{i}"))

    senders = [threading.Thread(target=send, args=(t,)) for t in range(threads_count)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(20)
    assert done.wait(10), f"only {len(dispatched)} of {total} dispatched"
    stop.set()
    receiver.interrupt()
    poller.join(5)
    assert not poller.is_alive()
    assert not overlap, "the dispatcher ran in two threads at once"
    assert len(dispatched) == total
    assert len(set(dispatched)) == total
    last = dict.fromkeys(range(threads_count), -1)
    for body in dispatched:
        tid, i = map(int, body.split(":"))
        assert i == last[tid] + 1, f"sender {tid}: {i} after {last[tid]}"
        last[tid] = i
