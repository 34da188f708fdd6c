"""One conformance suite for every transport (kombu style).

Each test takes a ``transport`` (or ``smoke_transport``) fixture: a running
context over the intraprocess transport or over real SMTP + IMAP (the dev
server, a fresh mailbox per test), and runs the very same code on each. What a
test may assume is only what the public API promises; the one thing that
differs is the wait timeout (generous for the mail servers).

``transport``        intraprocess, and email over STARTTLS in ``auto`` receive mode
``smoke_transport``  the above, plus email over STARTTLS and implicit TLS in each
                     receive mode (poll, idle, auto): a smoke subset
``email_transport``  email only (the 10 MB body, marked slow)

The mail system does not keep the order of emails (Postfix delivers over
several LMTP connections at once), so tests that send several messages on one
topic here match them by content, not by position; ordering is tested in
``test_two_processes.py``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from mailstack import stored_emails

import emailmw
from emailmw.devserver import DevServer

pytestmark = [pytest.mark.timeout(120)]

MAILSTACK = pytest.mark.mailstack
EMAIL_WAIT = 20.0
INTRA_WAIT = 5.0


@dataclass(frozen=True)
class Spec:
    """How to build one transport."""

    kind: str  # "intraprocess" or "email"
    tls: str = "starttls"
    receive_mode: str = "auto"


@dataclass
class Transport:
    """A running context over one transport, and what a test needs to use it."""

    spec: Spec
    ctx: emailmw.Context
    wait: float  #: timeout for anything that must arrive
    #: the raw emails stored in the mailbox, once there are at least N (email only)
    stored: Callable[[int], list[bytes]] | None = None
    extra: list[emailmw.Context] = field(default_factory=list)

    @property
    def is_email(self) -> bool:
        return self.spec.kind == "email"


INTRA = pytest.param(Spec("intraprocess"), id="intraprocess")
EMAIL = pytest.param(Spec("email"), id="email", marks=MAILSTACK)
SMOKE = [
    INTRA,
    *(
        pytest.param(Spec("email", tls, mode), id=f"email-{tls}-{mode}", marks=MAILSTACK)
        for tls in ("starttls", "implicit")
        for mode in ("poll", "idle", "auto")
    ),
]


@contextlib.contextmanager
def open_transport(spec: Spec, request: pytest.FixtureRequest) -> Iterator[Transport]:
    """A running context over ``spec``'s transport; shut down afterwards."""
    if spec.kind == "intraprocess":
        ctx = emailmw.Context(emailmw.Options(intraprocess=True)).init()
        try:
            yield Transport(spec, ctx, INTRA_WAIT)
        finally:
            ctx.shutdown()
        return
    server: DevServer = request.getfixturevalue("dev_server")
    folder, address = server.new_mailbox("alice")
    config = server.config(
        "alice", mailbox=folder, to=address, tls=spec.tls, receive_mode=spec.receive_mode
    )
    # Replies (service responses) go to the request's From: make it this mailbox too.
    config["email"]["from"] = address
    ctx = emailmw.Context(emailmw.Options.from_dict(config)).init()
    try:
        yield Transport(
            spec,
            ctx,
            EMAIL_WAIT,
            stored=lambda count: stored_emails(server, folder, count, timeout=EMAIL_WAIT),
        )
    finally:
        ctx.shutdown()


@pytest.fixture(params=[INTRA, EMAIL])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    with open_transport(request.param, request) as t:
        yield t


@pytest.fixture(params=SMOKE)
def smoke_transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    with open_transport(request.param, request) as t:
        yield t


@pytest.fixture(params=[EMAIL])
def email_transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    with open_transport(request.param, request) as t:
        yield t


def collect(sub: emailmw.Subscription, count: int, wait: float) -> list[str]:
    """``count`` messages from ``sub``, in arrival order."""
    return [emailmw.wait_for_message(sub, wait) for _ in range(count)]


def assert_nothing_more(t: Transport, *entities: emailmw.Subscription) -> None:
    """Nothing else is waiting (a short look: proves an absence, not a delivery)."""
    time.sleep(0.2 if t.is_email else 0.01)
    for entity in entities:
        assert entity.get_message() is None, f"unexpected extra message on {entity}"


# ------------------------------------------------------------------------ smoke subset


def test_pubsub_round_trip_with_info(smoke_transport: Transport) -> None:
    t = smoke_transport
    sub = emailmw.Subscription("/chatter", context=t.ctx)
    pub = emailmw.Publisher("/chatter", context=t.ctx)
    before = time.time_ns()
    pub.publish("hello, world")
    after_publish = time.time_ns()
    message, info = emailmw.wait_for_message_with_info(sub, t.wait)
    got_at = time.time_ns()
    assert message == "hello, world"
    assert info.publisher_gid == pub.gid
    assert before <= info.source_timestamp.nanoseconds <= after_publish
    assert info.source_timestamp.nanoseconds <= info.received_timestamp.nanoseconds <= got_at
    assert sub.get_message() is None


def test_service_round_trip(smoke_transport: Transport) -> None:
    t = smoke_transport
    server = emailmw.ServiceServer("/add", context=t.ctx)
    client = emailmw.ServiceClient("/add", context=t.ctx)
    seq = client.send_request("2 3")
    assert seq == 1
    request, request_info = emailmw.wait_for_request_with_info(server, t.wait)
    assert request.content == "2 3"
    assert request.id.sequence_number == seq == request_info.sequence_number
    assert request.id.client_gid == client.gid == request_info.client_gid
    server.send_response(request.id, str(sum(map(int, request.content.split()))))
    response, info = emailmw.wait_for_response_with_info(seq, client, t.wait)
    assert response == "5"
    assert info.sequence_number == seq
    assert info.client_gid == client.gid
    assert not client.has_response()


# ------------------------------------------------------------------------ pub/sub

PAYLOADS: dict[str, str] = {
    "empty": "",
    "crlf": "\r\n",
    "lone_cr": "\r",
    "lone_lf": "\n",
    "mixed_line_endings": "a\r\nb\nc\rd\r\r\n\n",
    "only_newlines": "\n\n\n",
    "long_line": "x" * 5000,
    "long_line_non_ascii": "é" * 3000,
    "long_line_crlf": ("y" * 1500 + "\r\n") * 3,
    "leading_dots": ".\n..\n.\r\n.x\n.",
    "lone_dot_line": "a\n.\nb",
    "from_lines": "From me\nFrom you\n>From them\nFrom",
    "nul": "\0a\0b\0",
    "controls": "\x01\x07\x1b[31mred\x1b[0m\x7f\x0c",
    "non_ascii": "héllo — 日本語 🎉 Ωmega",
    "unicode_line_breaks": "a\u2028b\u2029c\x85d\x0be",
    "bom": "\ufeffstarts with a BOM",
    "trailing_whitespace": "space \ntab\t\n ",
    "only_spaces": "   ",
    "encoded_word_lookalike": "=?utf-8?b?QQ==?= =?iso-8859-1?q?=E9?=",
    "qp_lookalike": "=3D=\n=\r\n=20 =",
    "mime_lookalike": "--boundary\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n--boundary--",
    "headers_lookalike": "Subject: fake\nPublisher-GID: 1\n\nbody",
}


def _one_mb() -> str:
    rng = random.Random(20240601)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:=-_/éü日\t"
    lines = []
    size = 0
    while size < 1_000_000:
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def test_awkward_payloads_round_trip_exactly(transport: Transport) -> None:
    t = transport
    payloads = {**PAYLOADS, "one_mb": _one_mb(), "one_mb_crlf": "z" * 999 + "\r\n" * 500_000}
    # One topic per payload: the mail system may reorder emails.
    subs = {name: emailmw.Subscription(f"/payload/{name}", context=t.ctx) for name in payloads}
    for name, payload in payloads.items():
        emailmw.Publisher(f"/payload/{name}", context=t.ctx).publish(payload)
    wrong = []
    for name, payload in payloads.items():
        got = emailmw.wait_for_message(subs[name], t.wait)
        if got != payload:
            wrong.append(f"{name}: sent {payload[:60]!r} (len {len(payload)}), "
                         f"got {got[:60]!r} (len {len(got)})")  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_two_hundred_topics(transport: Transport) -> None:
    t = transport
    topics = [f"/topic/{i:03d}" for i in range(200)]
    subs = [emailmw.Subscription(topic, context=t.ctx) for topic in topics]
    for topic in topics:
        emailmw.Publisher(topic, context=t.ctx).publish(f"on {topic}")
    for topic, sub in zip(topics, subs, strict=True):
        assert emailmw.wait_for_message(sub, t.wait) == f"on {topic}"
    assert_nothing_more(t, *subs)


TOPIC_NAMES = [
    "/ünïcödé/τοπικό",
    "日本語のトピック",
    "/emoji/🎉🚀",
    "with spaces in it",
    " leading and trailing ",
    "double  space",
    "=?utf-8?b?QQ==?=",
    "=?",
    "?=",
    "=?utf-8?q?not_really?= plain",
    'semi;colon:colon,comma "quoted" <angle> (paren) back\\slash',
    "é" * 255,
    "a" * 255,
    "x",
    "/a/b/c/",
    "non\u00a0breaking",
    "RTL \u05e9\u05dc\u05d5\u05dd",
    "caf\u00e9",  # NFC ...
    "cafe\u0301",  # ... and NFD: two different topics
]


def test_unicode_and_awkward_topic_names(transport: Transport) -> None:
    t = transport
    subs = {name: emailmw.Subscription(name, context=t.ctx) for name in TOPIC_NAMES}
    for index, name in enumerate(TOPIC_NAMES):
        emailmw.Publisher(name, context=t.ctx).publish(f"message {index}")
    for index, name in enumerate(TOPIC_NAMES):
        assert emailmw.wait_for_message(subs[name], t.wait) == f"message {index}", name
    assert_nothing_more(t, *subs.values())


def test_fan_out_to_every_subscription_of_a_topic(transport: Transport) -> None:
    t = transport
    subs = [emailmw.Subscription("/fan", context=t.ctx) for _ in range(5)]
    other = emailmw.Subscription("/fan/other", context=t.ctx)
    pub = emailmw.Publisher("/fan", context=t.ctx)
    sent = [f"fan {i}" for i in range(10)]
    for message in sent:
        pub.publish(message)
    for sub in subs:
        assert sorted(collect(sub, len(sent), t.wait)) == sorted(sent)
    assert_nothing_more(t, *subs, other)


def test_additional_headers_do_not_disturb_delivery(transport: Transport) -> None:
    t = transport
    sub = emailmw.Subscription("/headers", context=t.ctx)
    pub = emailmw.Publisher("/headers", context=t.ctx)
    headers = {"Trace-Id": "abc-123", "Note": "héllo wörld =?x?= ", "Empty": ""}
    pub.publish("with headers", additional_headers=headers)
    message, info = emailmw.wait_for_message_with_info(sub, t.wait)
    assert message == "with headers"
    assert info.publisher_gid == pub.gid
    if t.stored is not None:
        # Not visible through the public API; over email, look at the stored email.
        from emailmw.transport.codec import decode_email

        decoded = decode_email(t.stored(1)[0])
        assert decoded is not None
        for name, value in headers.items():
            assert decoded.headers.get(name) == value, name


def test_stats_count_each_email_once(transport: Transport) -> None:
    t = transport
    sub = emailmw.Subscription("/counted", context=t.ctx)
    pub = emailmw.Publisher("/counted", context=t.ctx)
    for i in range(3):
        pub.publish(f"m{i}")
    collect(sub, 3, t.wait)
    stats = t.ctx.stats()
    assert (stats.sent, stats.received, stats.delivered) == (3, 3, 3), stats
    assert stats.dropped_total == 0, stats.dropped


def test_unencodable_payloads_are_refused_before_anything_is_sent(transport: Transport) -> None:
    """A lone surrogate cannot go into an email: every transport refuses it alike, with
    InvalidMessageError (also a ValueError) naming the character, and sends nothing
    (the intraprocess transport could carry it, but must not: code that works in
    tests would then fail over SMTP)."""
    t = transport
    sub = emailmw.Subscription("/unencodable", context=t.ctx)
    pub = emailmw.Publisher("/unencodable", context=t.ctx)
    server = emailmw.ServiceServer("/unencodable/service", context=t.ctx)
    client = emailmw.ServiceClient("/unencodable/service", context=t.ctx)
    refused: list[str] = []
    with pytest.raises(emailmw.InvalidMessageError) as info:
        pub.publish("a\ud800b")
    refused.append(str(info.value))
    with pytest.raises(emailmw.InvalidMessageError) as info:
        client.send_request("\udfff")
    refused.append(str(info.value))
    assert t.ctx.stats().sent == 0
    seq = client.send_request("a good request")
    assert seq == 1, "the refused request used up a sequence number"
    request = emailmw.wait_for_request(server, t.wait)
    with pytest.raises(emailmw.InvalidMessageError) as info:
        server.send_response(request.id, "x" * 10 + "\udc80")
    refused.append(str(info.value))
    assert isinstance(info.value, ValueError)
    assert t.ctx.stats().sent == 1
    assert refused == [
        "message cannot be sent: U+D800 at index 1 is a lone surrogate, which UTF-8 cannot encode",
        "request cannot be sent: U+DFFF at index 0 is a lone surrogate, which UTF-8 cannot encode",
        "response cannot be sent: U+DC80 at index 10 is a lone surrogate, "
        "which UTF-8 cannot encode",
    ]
    # the request is still waiting for its answer, and everything else still works
    server.send_response(request.id, "a good response")
    assert emailmw.wait_for_response(seq, client, t.wait) == "a good response"
    pub.publish("a good message")
    assert emailmw.wait_for_message(sub, t.wait) == "a good message"
    assert_nothing_more(t, sub)
    assert not server.has_request() and not client.has_response()
    stats = t.ctx.stats()
    assert (stats.sent, stats.received, stats.dropped_total) == (3, 3, 0), stats
    if t.stored is not None:
        assert len(t.stored(3)) == 3  # request, response, message: nothing else arrived


# ------------------------------------------------------------------------ services


def test_service_answers_out_of_order(transport: Transport) -> None:
    t = transport
    server = emailmw.ServiceServer("/echo", context=t.ctx)
    client = emailmw.ServiceClient("/echo", context=t.ctx)
    asked = {client.send_request(f"question {i}"): f"question {i}" for i in range(10)}
    assert sorted(asked) == list(range(1, 11))
    requests = [emailmw.wait_for_request(server, t.wait) for _ in asked]
    assert sorted(r.content for r in requests) == sorted(asked.values())
    for request in sorted(requests, key=lambda r: r.id.sequence_number, reverse=True):
        server.send_response(request.id, f"answer to {request.content}")
    # Wait in request order although the answers were sent the other way round.
    for seq, question in sorted(asked.items()):
        response, info = emailmw.wait_for_response_with_info(seq, client, t.wait)
        assert response == f"answer to {question}"
        assert (info.sequence_number, info.client_gid) == (seq, client.gid)
    assert not client.has_response()


def test_two_clients_get_only_their_own_responses(transport: Transport) -> None:
    t = transport
    server = emailmw.ServiceServer("/who", context=t.ctx)
    clients = {name: emailmw.ServiceClient("/who", context=t.ctx) for name in ("a", "b")}
    sent = {(name, c.send_request(f"{name}{i}")) for name, c in clients.items() for i in range(3)}
    # Both clients number their requests 1, 2, 3: only the Client-GID tells them apart.
    assert {seq for _, seq in sent} == {1, 2, 3}
    requests = [emailmw.wait_for_request(server, t.wait) for _ in sent]
    for request in reversed(requests):
        server.send_response(request.id, f"for {request.content}")
    for name, client in clients.items():
        for seq in (3, 1, 2):
            response, info = emailmw.wait_for_response_with_info(seq, client, t.wait)
            assert response == f"for {name}{seq - 1}"
            assert info.client_gid == client.gid
    time.sleep(0.2 if t.is_email else 0.01)  # proving an absence
    assert not any(c.has_response() for c in clients.values())
    assert t.ctx.stats().dropped.get("unmatched", 0) == 0


def test_no_server_no_response(transport: Transport) -> None:
    t = transport
    client = emailmw.ServiceClient("/nobody", context=t.ctx)
    seq = client.send_request("anyone?")
    with pytest.raises(emailmw.WaitTimeoutError):
        emailmw.wait_for_response(seq, client, 0.5 if t.is_email else 0.05)


# ------------------------------------------------------------------------ shutdown


def test_shutdown_wakes_waiters_promptly(transport: Transport) -> None:
    t = transport
    sub = emailmw.Subscription("/never", context=t.ctx)
    client = emailmw.ServiceClient("/never", context=t.ctx)
    seq = client.send_request("will not be answered")
    errors: dict[str, BaseException] = {}
    woke_at: dict[str, float] = {}
    started = threading.Barrier(3)

    def waiting(name: str, wait: Callable[[], object]) -> None:
        started.wait()
        try:
            wait()
        except BaseException as exc:
            errors[name] = exc
        woke_at[name] = time.monotonic()

    threads = [
        threading.Thread(target=waiting, args=("sub", lambda: emailmw.wait_for_message(sub))),
        threading.Thread(
            target=waiting, args=("client", lambda: emailmw.wait_for_response(seq, client))
        ),
    ]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(0.1)  # let both block (proving they do not return on their own)
    assert not woke_at
    begin = time.monotonic()
    assert t.ctx.shutdown() is True
    shutdown_took = time.monotonic() - begin
    for thread in threads:
        thread.join(5)
    assert not any(thread.is_alive() for thread in threads)
    assert shutdown_took < 1.0, f"shutdown took {shutdown_took:.3f} s"
    for name in ("sub", "client"):
        assert isinstance(errors.get(name), emailmw.ContextError), errors
        assert woke_at[name] - begin < 1.0
    assert t.ctx.state is emailmw.ContextState.SHUT_DOWN
    assert t.ctx.shutdown() is False
    with pytest.raises(emailmw.ContextError):
        emailmw.Publisher("/late", context=t.ctx)


# ------------------------------------------------------------------------ email only


@pytest.mark.slow
def test_ten_megabyte_body(email_transport: Transport) -> None:
    t = email_transport
    rng = random.Random(10)
    line = "".join(rng.choice("abcdefghij ,.é") for _ in range(99))
    body = "\n".join(line[i % 50 :] + str(i) for i in range(120_000))  # ~10 MB
    size = len(body.encode())
    assert size > 10_000_000, size
    sub = emailmw.Subscription("/big", context=t.ctx)
    emailmw.Publisher("/big", context=t.ctx).publish(body)
    got = emailmw.wait_for_message(sub, 60)
    assert len(got) == len(body)
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(got, body, strict=True)) if a != b), None
    )
    assert first_difference is None, f"bodies differ from index {first_difference}"
