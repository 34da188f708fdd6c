"""Publishers and subscriptions over the intraprocess transport."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emailmw
from emailmw import (
    Context,
    InvalidHeaderError,
    InvalidNameError,
    Options,
    Publisher,
    Subscription,
    wait_for_message,
    wait_for_message_with_info,
)

pytestmark = pytest.mark.timeout(30)

_flush_ids = itertools.count()


def flush(ctx: Context) -> None:
    """Return once everything this thread sent through ``ctx`` was dispatched.

    The intraprocess receiver keeps each sender thread's emails in order, so when a
    sentinel published now has arrived, so has everything sent before it.
    """
    topic = f"/__flush__/{next(_flush_ids)}"
    sub = Subscription(topic, context=ctx)
    Publisher(topic, context=ctx).publish("flush")
    assert wait_for_message(sub, timeout=5.0) == "flush"
    sub.close()


def drain(sub: Subscription) -> list[str]:
    out = []
    while (message := sub.get_message()) is not None:
        out.append(message)
    return out


AWKWARD = [
    pytest.param("", id="empty"),
    pytest.param("\r\n", id="crlf"),
    pytest.param("\r", id="lone-cr"),
    pytest.param("\n", id="lone-lf"),
    pytest.param("a\r\nb\rc\nd", id="mixed-eol"),
    pytest.param("\x00", id="nul"),
    pytest.param("nul\x00inside", id="nul-inside"),
    pytest.param("trailing spaces   \n\t", id="trailing-ws"),
    pytest.param("\nFrom the start\n.\n", id="from-and-dot"),
    pytest.param("héllo wörld — ünïcødé", id="non-ascii"),
    pytest.param("日本語のメッセージ", id="cjk"),
    pytest.param("emoji 🚀🎉👩‍👩‍👧", id="emoji"),
    pytest.param("=?utf-8?b?Zm9v?=", id="encoded-word"),
    pytest.param("x" * 5000, id="long-line"),
    pytest.param("\ufeffbom", id="bom"),
]


@pytest.mark.parametrize("text", AWKWARD)
def test_exact_round_trip(ctx: Context, text: str) -> None:
    sub = Subscription("/chatter", context=ctx)
    Publisher("/chatter", context=ctx).publish(text)
    received = wait_for_message(sub, timeout=5.0)
    assert received == text
    assert type(received) is str


def test_any_string_round_trips() -> None:
    with Context(Options(intraprocess=True)) as ctx:
        sub = Subscription("/any", context=ctx)
        pub = Publisher("/any", context=ctx)

        @settings(max_examples=300, deadline=None, database=None)
        @given(st.text(max_size=2000))
        def check(text: str) -> None:
            pub.publish(text)
            assert wait_for_message(sub, timeout=5.0) == text

        check()


def test_one_megabyte_message(ctx: Context) -> None:
    text = ("0123456789abcdef\n" * 61681)[: 1 << 20]
    assert len(text) == 1 << 20
    sub = Subscription("/big", context=ctx)
    Publisher("/big", context=ctx).publish(text)
    assert wait_for_message(sub, timeout=5.0) == text


def test_message_info(ctx: Context) -> None:
    sub = Subscription("/chatter", context=ctx)
    pub = Publisher("/chatter", context=ctx)
    before = time.time_ns()
    pub.publish("hi")
    message, info = wait_for_message_with_info(sub, timeout=5.0)
    after = time.time_ns()
    assert message == "hi"
    assert info.publisher_gid == pub.gid
    assert before <= info.source_timestamp.nanoseconds
    assert info.source_timestamp <= info.received_timestamp
    assert info.received_timestamp.nanoseconds <= after


def test_publishers_have_distinct_gids(ctx: Context) -> None:
    sub = Subscription("/chatter", context=ctx)
    a, b = Publisher("/chatter", context=ctx), Publisher("/chatter", context=ctx)
    assert a.gid != b.gid
    a.publish("from a")
    b.publish("from b")
    first = wait_for_message_with_info(sub, timeout=5.0)
    second = wait_for_message_with_info(sub, timeout=5.0)
    assert (first[0], first[1].publisher_gid) == ("from a", a.gid)
    assert (second[0], second[1].publisher_gid) == ("from b", b.gid)


def test_properties_and_repr(ctx: Context) -> None:
    pub = Publisher("/chatter", context=ctx)
    sub = Subscription("/chatter", depth=7, context=ctx)
    assert pub.topic_name == sub.topic_name == "/chatter"
    assert sub.depth == 7
    assert isinstance(pub.gid, emailmw.Gid)
    assert isinstance(sub.gid, emailmw.Gid)
    assert "/chatter" in repr(pub)
    assert "/chatter" in repr(sub)


def test_get_message_never_blocks(ctx: Context) -> None:
    sub = Subscription("/quiet", context=ctx)
    start = time.monotonic()
    assert sub.get_message() is None
    assert sub.get_message_with_info() is None
    assert not sub.has_message()
    assert time.monotonic() - start < 0.1


def test_has_message_does_not_consume(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    Publisher("/t", context=ctx).publish("x")
    flush(ctx)
    assert sub.has_message()
    assert sub.has_message()
    assert sub.get_message() == "x"
    assert not sub.has_message()


def test_fan_out_to_every_subscription(ctx: Context) -> None:
    subs = [Subscription("/fan", context=ctx) for _ in range(5)]
    pub = Publisher("/fan", context=ctx)
    for i in range(3):
        pub.publish(f"m{i}")
    for sub in subs:
        assert [wait_for_message(sub, timeout=5.0) for _ in range(3)] == ["m0", "m1", "m2"]
        assert not sub.has_message()


def test_no_cross_topic_leakage(ctx: Context) -> None:
    target = Subscription("/a", context=ctx)
    others = [
        Subscription(name, context=ctx) for name in ("/b", "/a/b", "/A", "a", "/a ", " /a", "/")
    ]
    Publisher("/a", context=ctx).publish("only for /a")
    flush(ctx)
    assert drain(target) == ["only for /a"]
    for sub in others:
        assert not sub.has_message(), sub.topic_name


def test_a_late_subscription_gets_no_old_messages(ctx: Context) -> None:
    early = Subscription("/t", context=ctx)
    pub = Publisher("/t", context=ctx)
    pub.publish("old")
    assert wait_for_message(early, timeout=5.0) == "old"
    late = Subscription("/t", context=ctx)
    assert not late.has_message()
    pub.publish("new")
    assert wait_for_message(late, timeout=5.0) == "new"
    assert wait_for_message(early, timeout=5.0) == "new"
    assert not late.has_message()


def test_a_publisher_without_subscribers(ctx: Context) -> None:
    Publisher("/nobody", context=ctx).publish("into the void")
    flush(ctx)
    snapshot = ctx.stats()
    assert snapshot.dropped["unmatched"] == 1


def test_order_is_preserved_per_publisher(ctx: Context) -> None:
    sub = Subscription("/seq", context=ctx)
    pub = Publisher("/seq", context=ctx)
    for i in range(1000):
        pub.publish(str(i))
    assert [wait_for_message(sub, timeout=5.0) for _ in range(1000)] == [
        str(i) for i in range(1000)
    ]


def test_concurrent_publishers_lose_and_duplicate_nothing(ctx: Context) -> None:
    threads_count, per_thread = 8, 2000
    total = threads_count * per_thread
    sub = Subscription("/load", depth=total, context=ctx)
    publishers = [Publisher("/load", context=ctx) for _ in range(threads_count)]
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def run(tid: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                publishers[tid].publish(f"{tid}:{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(threads_count)]
    for t in threads:
        t.start()
    received = [wait_for_message_with_info(sub, timeout=10.0) for _ in range(total)]
    for t in threads:
        t.join(10)
    assert not errors
    assert not sub.has_message()
    assert len({m for m, _ in received}) == total
    last = dict.fromkeys(range(threads_count), -1)
    for message, info in received:
        tid, i = map(int, message.split(":"))
        assert info.publisher_gid == publishers[tid].gid
        assert i == last[tid] + 1, f"publisher {tid}: message {i} after {last[tid]}"
        last[tid] = i
    snapshot = ctx.stats()
    assert snapshot.sent >= total
    assert snapshot.dropped["queue_full"] == 0
    assert snapshot.dropped["duplicate"] == 0


def test_consumer_in_another_thread(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    got: list[str] = []

    def consume() -> None:
        for _ in range(100):
            got.append(wait_for_message(sub, timeout=5.0))

    consumer = threading.Thread(target=consume)
    consumer.start()
    pub = Publisher("/t", context=ctx)
    for i in range(100):
        pub.publish(str(i))
    consumer.join(10)
    assert got == [str(i) for i in range(100)]


# -- additional headers --------------------------------------------------------------


def test_valid_additional_headers_are_accepted(ctx: Context) -> None:
    sub = Subscription("/h", context=ctx)
    Publisher("/h", context=ctx).publish("x", additional_headers={"Priority": "high"})
    assert wait_for_message(sub, timeout=5.0) == "x"


@pytest.mark.parametrize(
    "headers",
    [
        {"Priority": "high\r\nBcc: victim@example.com"},
        {"Priority": "a\nb"},
        {"Priority": "a\rb"},
        {"Priority": "nul\x00"},
        {"Bad Name": "x"},
        {"Bad:Name": "x"},
        {"": "x"},
        {"Publisher-GID": "1"},
        {"publisher-gid": "1"},
        {"Source-Timestamp": "1"},
        {"Client-GID": "1"},
        {"Subject": "/other"},
        {"Message-ID": "<x@y>"},
        {"In-Reply-To": "<x@y>"},
        {"Content-Type": "text/html"},
        {"Priority": 1},
        {"A": "1", "a": "2"},
    ],
)
def test_invalid_additional_headers_are_refused_before_sending(
    ctx: Context, headers: dict[str, object]
) -> None:
    sub = Subscription("/h", context=ctx)
    pub = Publisher("/h", context=ctx)
    sent_before = ctx.stats().sent
    with pytest.raises(InvalidHeaderError):
        pub.publish("x", additional_headers=headers)  # type: ignore[arg-type]
    assert ctx.stats().sent == sent_before
    flush(ctx)
    assert not sub.has_message()


@pytest.mark.parametrize("message", [b"bytes", None, 1, 1.5, ["x"], {"a": "b"}])
def test_non_str_message_is_a_type_error(ctx: Context, message: object) -> None:
    sub = Subscription("/t", context=ctx)
    pub = Publisher("/t", context=ctx)
    with pytest.raises(TypeError):
        pub.publish(message)  # type: ignore[arg-type]
    flush(ctx)
    assert not sub.has_message()
    assert ctx.stats().sent == 1  # only the flush sentinel


BAD_TOPICS = [
    "",
    "a\rb",
    "a\nb",
    "a\r\nSubject: x",
    "nul\x00",
    "del\x7f",
    "x" * 256,
    None,
    b"/bytes",
    5,
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_invalid_topic_names_are_refused(ctx: Context, topic: object) -> None:
    with pytest.raises(InvalidNameError):
        Publisher(topic, context=ctx)  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        Subscription(topic, context=ctx)  # type: ignore[arg-type]
    assert ctx.stats().sent == 0


def test_topic_name_of_maximum_length(ctx: Context) -> None:
    name = "/" + "x" * 254
    sub = Subscription(name, context=ctx)
    Publisher(name, context=ctx).publish("ok")
    assert wait_for_message(sub, timeout=5.0) == "ok"


def test_unicode_topic(ctx: Context) -> None:
    sub = Subscription("/température/🌡", context=ctx)
    Publisher("/température/🌡", context=ctx).publish("21.5")
    assert wait_for_message(sub, timeout=5.0) == "21.5"


# -- queue depth ---------------------------------------------------------------------


def test_full_queue_drops_the_oldest(ctx: Context) -> None:
    small = Subscription("/q", depth=3, context=ctx)
    witness = Subscription("/q", context=ctx)  # registered after: sees each message later
    pub = Publisher("/q", context=ctx)
    for i in range(5):
        pub.publish(str(i))
    assert [wait_for_message(witness, timeout=5.0) for _ in range(5)] == list("01234")
    assert drain(small) == ["2", "3", "4"]
    assert ctx.stats().dropped["queue_full"] == 2


def test_default_depth_comes_from_the_options() -> None:
    with Context(Options(intraprocess=True, queue_depth=2)) as ctx:
        sub = Subscription("/q", context=ctx)
        assert sub.depth == 2
        pub = Publisher("/q", context=ctx)
        for i in range(4):
            pub.publish(str(i))
        flush(ctx)
        assert drain(sub) == ["2", "3"]
        assert ctx.stats().dropped["queue_full"] == 2


@pytest.mark.parametrize("depth", [0, -1, True, 1.5, "3"])
def test_invalid_depth(ctx: Context, depth: object) -> None:
    with pytest.raises(ValueError):
        Subscription("/q", depth=depth, context=ctx)  # type: ignore[arg-type]


# -- close ---------------------------------------------------------------------------


def test_close_stops_new_messages_but_keeps_waiting_ones(ctx: Context) -> None:
    sub = Subscription("/c", context=ctx)
    pub = Publisher("/c", context=ctx)
    pub.publish("before")
    flush(ctx)
    sub.close()
    sub.close()  # idempotent
    pub.publish("after")
    flush(ctx)
    assert drain(sub) == ["before"]


def test_stats_count_sent_received_delivered(ctx: Context) -> None:
    # kept referenced: a garbage-collected subscription is no longer routed to
    subs = [Subscription("/s", context=ctx), Subscription("/s", context=ctx)]
    pub = Publisher("/s", context=ctx)
    for _ in range(3):
        pub.publish("x")
    flush(ctx)
    snapshot = ctx.stats()
    assert snapshot.sent == 4  # 3 + the flush sentinel
    assert snapshot.received == 4
    assert snapshot.delivered == 3 * 2 + 1
    assert snapshot.dropped_total == 0
    assert all(sub.has_message() for sub in subs)


def test_entities_use_the_global_context(global_ctx: Context) -> None:
    sub = Subscription("/global")
    Publisher("/global").publish("hi")
    assert wait_for_message(sub, timeout=5.0) == "hi"
    assert emailmw.stats().sent == 1


# -- a publish() that raised ----------------------------------------------------------


class FlakySender:
    """Wraps a context's sender: records every email's headers; the listed
    messages raise :class:`emailmw.SmtpError` instead of being sent ("lost"), or
    after being sent ("stored", as when the server's answer is lost)."""

    def __init__(self, ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real_send = ctx._sender.send
        self.headers: dict[str, dict[str, str]] = {}
        self.lost: set[str] = set()
        self.stored: set[str] = set()
        self.held: dict[str, tuple[Any, Any]] = {}
        monkeypatch.setattr(ctx._sender, "send", self.send)

    def send(self, content: Any, headers: Any = None) -> str:
        self.headers[content.body] = dict(headers or {})
        if content.body in self.lost:
            self.held[content.body] = (content, headers)
            raise emailmw.SmtpError("injected failure", server="127.0.0.1:25")
        message_id = self.real_send(content, headers)
        if content.body in self.stored:
            raise emailmw.SmtpError("injected lost answer", server="127.0.0.1:25")
        return message_id


@pytest.fixture
def patient_ctx() -> Iterator[Context]:
    """A context whose subscribers wait a minute for a message that overtook one."""
    with Context(Options(intraprocess=True, reorder_window=60.0)) as ctx:
        yield ctx


def test_a_failed_publish_does_not_hold_up_the_next_messages(
    patient_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = Subscription("/gap", context=patient_ctx)
    pub = Publisher("/gap", context=patient_ctx)
    flaky = FlakySender(patient_ctx, monkeypatch)
    flaky.lost = {"b", "c"}
    pub.publish("a")
    for lost in ("b", "c"):
        with pytest.raises(emailmw.SmtpError):
            pub.publish(lost)
    pub.publish("d")
    pub.publish("e")
    # With a 60 s reorder window, "d" would wait a minute for "b" and "c".
    assert [wait_for_message(sub, timeout=5.0) for _ in range(3)] == ["a", "d", "e"]
    h = flaky.headers
    assert [h[m]["Publication-Number"] for m in "abcde"] == ["1", "2", "3", "4", "5"]
    assert h["d"]["Previous-Number"] == "1"
    assert h["d"]["Previous-Timestamp"] == h["a"]["Source-Timestamp"]
    assert h["c"]["Previous-Timestamp"] == h["a"]["Source-Timestamp"]  # b was not accepted
    assert h["c"]["Previous-Number"] == "1"
    assert "Previous-Number" not in h["b"] and "Previous-Number" not in h["e"]
    assert h["e"]["Previous-Timestamp"] == h["d"]["Source-Timestamp"]


def test_a_failed_publish_that_arrives_late_is_delivered_once(
    patient_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = Subscription("/late", context=patient_ctx)
    pub = Publisher("/late", context=patient_ctx)
    flaky = FlakySender(patient_ctx, monkeypatch)
    flaky.lost = {"b"}
    pub.publish("a")
    with pytest.raises(emailmw.SmtpError):
        pub.publish("b")
    pub.publish("c")
    assert [wait_for_message(sub, timeout=5.0) for _ in range(2)] == ["a", "c"]
    flaky.real_send(*flaky.held["b"])  # the mail system delivers it after all
    assert wait_for_message(sub, timeout=5.0) == "b"
    flush(patient_ctx)
    assert drain(sub) == []


def test_a_failed_publish_that_was_stored_keeps_its_place(
    patient_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = Subscription("/stored", context=patient_ctx)
    pub = Publisher("/stored", context=patient_ctx)
    flaky = FlakySender(patient_ctx, monkeypatch)
    flaky.stored = {"b"}
    pub.publish("a")
    with pytest.raises(emailmw.SmtpError):
        pub.publish("b")
    pub.publish("c")
    assert [wait_for_message(sub, timeout=5.0) for _ in range(3)] == ["a", "b", "c"]
    assert flaky.headers["c"]["Previous-Number"] == "1"


def test_when_the_first_publish_fails_the_next_names_none(
    patient_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = Subscription("/first", context=patient_ctx)
    pub = Publisher("/first", context=patient_ctx)
    flaky = FlakySender(patient_ctx, monkeypatch)
    flaky.lost = {"a"}
    with pytest.raises(emailmw.SmtpError):
        pub.publish("a")
    pub.publish("b")
    assert wait_for_message(sub, timeout=5.0) == "b"
    assert flaky.headers["b"]["Previous-Number"] == "0"
    assert "Previous-Timestamp" not in flaky.headers["b"]
