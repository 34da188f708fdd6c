"""History for late joiners: ``Subscription(..., history=N)``, on both transports.

A subscription made with ``history=N`` first gets up to the last ``N`` messages of
its topic that are already in the mailbox (intraprocess: in the receiver's bounded
memory), oldest first and in each publisher's order, then the live ones, with no
gap and no duplicate between the two. Over IMAP the folder is searched by header
and only the wanted bodies are fetched.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from transports import Transport, transport_fixture  # noqa: F401  (the "transport" fixture)

import emailmw
from emailmw.devserver import DevServer
from emailmw.dispatch.handlers import SubscriptionHandler
from emailmw.dispatch.ordering import PublicationOrder
from emailmw.stats import StatsCounters
from emailmw.transport.codec import encode_email, new_message_id
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.imap import ImapEmailReceiver

pytestmark = [pytest.mark.timeout(180)]

TOPIC = "/history"


class Point(BaseModel):
    x: int
    y: int


def take(sub: emailmw.Subscription[str], count: int, wait: float) -> list[str]:
    """The next ``count`` messages of ``sub`` (fails if they do not all come)."""
    return [emailmw.wait_for_message(sub, wait) for _ in range(count)]


def nothing_more(sub: emailmw.Subscription[str], wait: float = 1.0) -> None:
    """Nothing else comes on ``sub`` within ``wait`` seconds (a duplicate would)."""
    with pytest.raises(emailmw.WaitTimeoutError):
        emailmw.wait_for_message(sub, wait)


def publish_received(
    transport: Transport, topic: str, values: list[tuple[emailmw.Publisher[str], str]]
) -> None:
    """Publish ``values`` one by one, each once the receiver got the one before: the
    mailbox then holds them in publication order, and below the receiver's position."""
    probe = emailmw.Subscription(topic, context=transport.ctx)
    try:
        for publisher, value in values:
            publisher.publish(value)
            assert emailmw.wait_for_message(probe, transport.wait) == value
    finally:
        probe.close()


def test_history_gives_the_last_n_oldest_first_then_the_live_ones(transport: Transport) -> None:
    ctx = transport.ctx
    pub = emailmw.Publisher(TOPIC, context=ctx)
    publish_received(transport, TOPIC, [(pub, f"m{i}") for i in range(1, 11)])
    sub = emailmw.Subscription(TOPIC, history=3, context=ctx)
    assert take(sub, 3, transport.wait) == ["m8", "m9", "m10"]
    pub.publish("m11")
    pub.publish("m12")
    assert take(sub, 2, transport.wait) == ["m11", "m12"]
    nothing_more(sub)


def test_history_larger_than_what_exists_gives_all_of_it(transport: Transport) -> None:
    ctx = transport.ctx
    pub = emailmw.Publisher(TOPIC, context=ctx)
    other = emailmw.Publisher("/history/other", context=ctx)
    publish_received(transport, TOPIC, [(pub, f"m{i}") for i in range(1, 5)])
    other.publish("not this topic")
    sub = emailmw.Subscription(TOPIC, history=100, context=ctx)
    assert take(sub, 4, transport.wait) == ["m1", "m2", "m3", "m4"]
    pub.publish("m5")
    assert take(sub, 1, transport.wait) == ["m5"]
    nothing_more(sub)


def test_two_publishers_interleaved_keep_their_order(transport: Transport) -> None:
    ctx = transport.ctx
    a = emailmw.Publisher(TOPIC, context=ctx)
    b = emailmw.Publisher(TOPIC, context=ctx)
    values = [(p, f"{name}{i}") for i in range(1, 7) for p, name in ((a, "a"), (b, "b"))]
    publish_received(transport, TOPIC, values)
    sub = emailmw.Subscription(TOPIC, history=8, context=ctx)
    got = take(sub, 8, transport.wait)
    assert got == ["a3", "b3", "a4", "b4", "a5", "b5", "a6", "b6"]
    a.publish("a7")
    b.publish("b7")
    assert sorted(take(sub, 2, transport.wait)) == ["a7", "b7"]
    nothing_more(sub)


def test_typed_history(transport: Transport) -> None:
    ctx = transport.ctx
    pub = emailmw.Publisher("/history/points", Point, context=ctx)
    probe = emailmw.Subscription("/history/points", Point, context=ctx)
    for i in range(5):
        pub.publish(Point(x=i, y=-i))
        assert emailmw.wait_for_message(probe, transport.wait) == Point(x=i, y=-i)
    sub = emailmw.Subscription("/history/points", Point, history=2, context=ctx)
    first = emailmw.wait_for_message_with_info(sub, transport.wait)
    second = emailmw.wait_for_message_with_info(sub, transport.wait)
    assert [first[0], second[0]] == [Point(x=3, y=-3), Point(x=4, y=-4)]
    assert first[1].publisher_gid == pub.gid
    pub.publish(Point(x=9, y=9))
    assert emailmw.wait_for_message(sub, transport.wait) == Point(x=9, y=9)


def test_history_zero_is_todays_behaviour(transport: Transport) -> None:
    ctx = transport.ctx
    pub = emailmw.Publisher(TOPIC, context=ctx)
    publish_received(transport, TOPIC, [(pub, f"old{i}") for i in range(3)])
    sub = emailmw.Subscription(TOPIC, context=ctx)
    explicit = emailmw.Subscription(TOPIC, history=0, context=ctx)
    pub.publish("new")
    assert take(sub, 1, transport.wait) == ["new"]
    assert take(explicit, 1, transport.wait) == ["new"]
    nothing_more(sub, 0.5)
    nothing_more(explicit, 0.5)


def test_other_subscriptions_do_not_get_the_history_again(transport: Transport) -> None:
    ctx = transport.ctx
    pub = emailmw.Publisher(TOPIC, context=ctx)
    early = emailmw.Subscription(TOPIC, context=ctx)
    publish_received(transport, TOPIC, [(pub, f"m{i}") for i in range(1, 6)])
    assert take(early, 5, transport.wait) == [f"m{i}" for i in range(1, 6)]
    late = emailmw.Subscription(TOPIC, history=5, context=ctx)
    assert take(late, 5, transport.wait) == [f"m{i}" for i in range(1, 6)]
    pub.publish("m6")
    assert take(early, 1, transport.wait) == ["m6"]
    assert take(late, 1, transport.wait) == ["m6"]
    nothing_more(early)
    nothing_more(late, 0.2)


def test_no_gap_and_no_duplicate_while_publishing_during_the_creation(
    transport: Transport,
) -> None:
    """Two publishers publish in a loop from threads while subscriptions are made (at
    a quarter, half and three quarters of the stream): with a history larger than the
    stream, each gets every number exactly once, in order per publisher, whether it
    came as history or live."""
    count = 80 if transport.email else 400
    with contextlib.ExitStack() as stack:
        if transport.email:
            ctx = transport.ctx
        else:  # the intraprocess history must hold the whole stream (default: 100)
            options = emailmw.Options(intraprocess=True, history_depth=10 * count)
            ctx = stack.enter_context(emailmw.Context(options))
        _publish_while_subscribing(transport, ctx, count)


def _publish_while_subscribing(transport: Transport, ctx: emailmw.Context, count: int) -> None:
    publishers = {name: emailmw.Publisher(TOPIC, context=ctx) for name in ("a", "b")}
    started = threading.Barrier(3)
    marks = [threading.Event() for _ in range(3)]

    def run(name: str) -> None:
        started.wait()
        for i in range(1, count + 1):
            publishers[name].publish(f"{name}:{i}")
            if name == "a" and i % (count // 4) == 0 and i < count:
                marks[i // (count // 4) - 1].set()

    threads = [threading.Thread(target=run, args=(name,)) for name in publishers]
    for thread in threads:
        thread.start()
    started.wait()
    subs = []
    for mark in marks:
        assert mark.wait(transport.wait)
        subs.append(emailmw.Subscription(TOPIC, history=10 * count, context=ctx))
    for thread in threads:
        thread.join(transport.wait * 3)
    for sub in subs:
        got = take(sub, 2 * count, transport.wait)
        per = {n: [int(v.split(":")[1]) for v in got if v.startswith(f"{n}:")] for n in publishers}
        for mine in per.values():
            assert mine == list(range(1, count + 1)), (
                subs.index(sub),
                {n: _around_gap(m) for n, m in per.items()},
            )
    for sub in subs:
        nothing_more(sub, 0.5)


def _around_gap(numbers: list[int]) -> str:
    """Where ``numbers`` first departs from 1, 2, 3, ... (for the failure message)."""
    first = next((i for i, n in enumerate(numbers) if n != i + 1), len(numbers))
    return f"{len(numbers)} numbers, at {first}: {numbers[max(0, first - 3) : first + 12]}"


def test_a_history_batch_is_put_in_each_publishers_order() -> None:
    """Oldest first by Source-Timestamp, but each publisher's own messages in the
    order of their numbers even if their stamps say otherwise."""

    def email(gid: int, number: int, stamp: int) -> EmailData:
        headers = EmailHeaders(
            {
                "Publisher-GID": str(gid),
                "Publication-Number": str(number),
                "Source-Timestamp": str(stamp),
            }
        )
        return EmailData(EmailContent(TOPIC, f"{gid}:{number}"), headers, message_id=f"<{stamp}@x>")

    class Sink:
        def _push_message(self, body: str, message_type: str | None, info: object) -> bool:
            raise AssertionError("nothing is held: every predecessor is before the horizon")

    sink = Sink()
    handler = SubscriptionHandler(StatsCounters(), PublicationOrder(5.0, horizon_ns=10**18))
    batch = [email(2, 1, 150), email(1, 2, 100), email(1, 1, 300), email(2, 2, 400)]
    batch.append(EmailData(EmailContent(TOPIC, "reply"), EmailHeaders({"Publisher-GID": "1"})))
    batch[-1].in_reply_to = "<a@x>"
    got = [body for body, _, _ in handler.history(TOPIC, sink, batch)]  # type: ignore[arg-type]
    # stamps order: (1,2)@100 (2,1)@150 (1,1)@300 (2,2)@400; publisher 1 swapped into order
    assert got == ["1:1", "2:1", "1:2", "2:2"]


def test_history_must_be_a_count() -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        for bad in (-1, True, "3", 1.5):
            with pytest.raises(ValueError, match="history"):
                emailmw.Subscription(TOPIC, history=bad, context=ctx)  # type: ignore[call-overload]


def test_the_intraprocess_history_is_bounded_by_history_depth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True, history_depth=5)) as ctx:
        pub = emailmw.Publisher(TOPIC, context=ctx)
        for i in range(1, 11):
            pub.publish(f"m{i}")
        with caplog.at_level(logging.WARNING, logger="emailmw.transport.intra"):
            sub = emailmw.Subscription(TOPIC, history=100, context=ctx)
        # asking for more than is kept says so, with the key to raise
        assert any(
            "keeps only the last 5 messages" in r.getMessage() and "history-depth" in r.getMessage()
            for r in caplog.records
        )
        assert take(sub, 5, 1.0) == [f"m{i}" for i in range(6, 11)]
        assert sub.get_message() is None
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="emailmw.transport.intra"):
            emailmw.Subscription(TOPIC, history=5, context=ctx)
        assert not caplog.records  # within the bound: nothing to say


def test_the_intraprocess_history_depth_defaults_to_100() -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        pub = emailmw.Publisher(TOPIC, context=ctx)
        for i in range(1, 151):
            pub.publish(f"m{i}")
        sub = emailmw.Subscription(TOPIC, history=150, context=ctx)
        assert take(sub, 100, 1.0) == [f"m{i}" for i in range(51, 151)]
        assert sub.get_message() is None
    with emailmw.Context(emailmw.Options(intraprocess=True, history_depth=0)) as c:
        emailmw.Publisher(TOPIC, context=c).publish("kept nowhere")
        assert emailmw.Subscription(TOPIC, history=10, context=c).get_message() is None


# -- over IMAP: search by header, fetch only the wanted bodies -----------------------------


def raw_message(address: str, topic: str, body: str, number: int, **extra: str) -> bytes:
    headers = {
        "Publisher-GID": "4242",
        "Source-Timestamp": str(time.time_ns()),
        "Publication-Number": str(number),
        **extra,
    }
    return encode_email(
        EmailData(
            content=EmailContent(subject=topic, body=body),
            headers=EmailHeaders(headers),
            message_id=new_message_id("example.test"),
            from_=address,
            recipients=EmailRecipients(to=[address]),
        )
    )


@pytest.fixture
def filled(dev_server: DevServer) -> Iterator[tuple[str, str, int]]:
    """A folder of 200 emails of ~20 KB on other topics, look-alikes of the topic
    (another case, a longer name, a request, a foreign email) and 5 on the topic."""
    folder, address = dev_server.new_mailbox("alice")
    filler = "x" * 70 + "\n"
    big = filler * (20_000 // len(filler))
    size = 0
    for i in range(200):
        raw = raw_message(address, f"/other/{i % 7}", f"{i}\n{big}", i + 1)
        dev_server.append("alice", raw, folder)
        size += len(raw)
    lookalikes = [
        raw_message(address, TOPIC.upper(), "wrong case", 1),
        raw_message(address, TOPIC + "/deeper", "longer name", 1),
        raw_message(address, "/x" + TOPIC, "prefixed", 1),
        (
            f"From: stranger@example.test\r\nTo: {address}\r\nSubject: {TOPIC}\r\n"
            f"Message-ID: {new_message_id('example.test')}\r\n\r\nnot emailmw\r\n"
        ).encode(),
    ]
    for n in range(1, 6):
        dev_server.append("alice", raw_message(address, TOPIC, f"h{n}", n), folder)
        dev_server.append("alice", lookalikes[(n - 1) % len(lookalikes)], folder)
    yield folder, address, size


@pytest.mark.mailstack
def test_history_over_imap_fetches_far_less_than_the_folder(
    dev_server: DevServer, filled: tuple[str, str, int]
) -> None:
    folder, address, size = filled
    config = dev_server.config("alice", mailbox=folder, to=address)
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        receiver = ctx._receiver
        assert isinstance(receiver, ImapEmailReceiver)
        before = receiver.bytes_received
        sub = emailmw.Subscription(TOPIC, history=5, context=ctx)
        fetched = receiver.bytes_received - before
        assert take(sub, 5, 5.0) == [f"h{n}" for n in range(1, 6)]
        nothing_more(sub, 0.5)
        three = emailmw.Subscription(TOPIC, history=3, context=ctx)
        assert take(three, 3, 5.0) == ["h3", "h4", "h5"]
    assert size > 4_000_000
    assert fetched < 0.01 * size, (fetched, size)  # 5 small bodies and a few headers


class Sink:
    """A subscription as the delivery core sees it: what it was handed, in order."""

    def __init__(self) -> None:
        self.got: list[str] = []

    def _push_message(self, body: str, message_type: str | None, info: object) -> bool:
        self.got.append(body)
        return True

    def _push_history(self, messages: list[tuple[str, str | None, object]]) -> int:
        self.got[:0] = [body for body, _, _ in messages]
        return len(messages)


def numbered(number: int, stamps: dict[int, int], gid: int = 7) -> EmailData:
    """Message ``number`` of publisher ``gid``, chained to ``number - 1`` by its stamp."""
    headers = {
        "Publisher-GID": str(gid),
        "Publication-Number": str(number),
        "Source-Timestamp": str(stamps[number]),
    }
    if number > 1:
        headers["Previous-Timestamp"] = str(stamps[number - 1])
    return EmailData(
        EmailContent(TOPIC, f"n{number}"), EmailHeaders(headers), message_id=f"<{number}@x>"
    )


def test_a_history_message_whose_predecessor_is_on_its_way_waits_for_it() -> None:
    """n3 was read before n2 (the mail system reordered them) and, nobody wanting it,
    released at once; a subscription made then gets n1 and n3 as history, but n3 only
    after n2 comes live. Another subscription gets n2 only (and not the history)."""
    from emailmw.dispatch.core import DeliveryCore
    from emailmw.transport.receiver import History

    stamps = {n: 1_000 + n for n in range(1, 5)}
    core = DeliveryCore(StatsCounters(), reorder_window=5.0, horizon_ns=1_000)
    core.dispatch_batch([numbered(1, stamps), numbered(3, stamps)])
    other, late = Sink(), Sink()
    core.register_subscription(TOPIC, other)
    core.register_subscription(TOPIC, late)
    core.deliver_history(TOPIC, late, History([numbered(1, stamps), numbered(3, stamps)]))
    assert late.got == ["n1"]
    assert core.held_count == 1
    core.dispatch_batch([numbered(2, stamps), numbered(4, stamps)])
    assert late.got == ["n1", "n2", "n3", "n4"]
    assert other.got == ["n2", "n4"]
    assert core.held_count == 0


def test_history_leaves_what_is_not_dispatched_yet_or_held_to_come_live() -> None:
    """n4 waits in the order for n3; n5 was received but is not dispatched yet (in
    flight): the history gives n1 and n2, and the rest comes live, once, in order."""
    from emailmw.dispatch.core import DeliveryCore
    from emailmw.transport.receiver import History

    stamps = {n: 1_000 + n for n in range(1, 6)}
    core = DeliveryCore(StatsCounters(), reorder_window=5.0, horizon_ns=1_000)
    early = Sink()
    core.register_subscription(TOPIC, early)
    core.dispatch_batch([numbered(1, stamps), numbered(2, stamps), numbered(4, stamps)])
    assert early.got == ["n1", "n2"] and core.held_count == 1
    late = Sink()
    core.register_subscription(TOPIC, late)
    everything = [numbered(n, stamps) for n in (1, 2, 4, 5)]
    core.deliver_history(TOPIC, late, History(everything, frozenset({"<5@x>"})))
    assert late.got == ["n1", "n2"]
    core.dispatch_batch([numbered(3, stamps), numbered(5, stamps)])
    assert late.got == ["n1", "n2", "n3", "n4", "n5"]
    assert early.got == ["n1", "n2", "n3", "n4", "n5"]


def test_a_held_history_message_is_not_pushed_into_a_closed_subscription() -> None:
    from emailmw.dispatch.core import DeliveryCore
    from emailmw.transport.receiver import History

    stamps = {n: 1_000 + n for n in range(1, 4)}
    core = DeliveryCore(StatsCounters(), reorder_window=5.0, horizon_ns=1_000)
    core.dispatch_batch([numbered(1, stamps), numbered(3, stamps)])
    late = Sink()
    core.register_subscription(TOPIC, late)
    core.deliver_history(TOPIC, late, History([numbered(1, stamps), numbered(3, stamps)]))
    core.unregister_subscription(TOPIC, late)
    core.dispatch_batch([numbered(2, stamps)])
    assert late.got == ["n1"]
