"""Service clients and servers over the intraprocess transport."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from emailmw import (
    Context,
    Gid,
    InvalidNameError,
    Publisher,
    ServiceClient,
    ServiceRequestId,
    ServiceServer,
    Subscription,
    UnknownRequestError,
    wait_for_message,
    wait_for_request,
    wait_for_request_with_info,
    wait_for_response,
    wait_for_response_with_info,
)
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders

pytestmark = pytest.mark.timeout(30)

_flush_ids = itertools.count()


def flush(ctx: Context) -> None:
    """Return once everything this thread sent through ``ctx`` was dispatched."""
    topic = f"/__flush__/{next(_flush_ids)}"
    sub = Subscription(topic, context=ctx)
    Publisher(topic, context=ctx).publish("flush")
    assert wait_for_message(sub, timeout=5.0) == "flush"
    sub.close()


def test_round_trip(ctx: Context) -> None:
    server = ServiceServer("/add", context=ctx)
    client = ServiceClient("/add", context=ctx)
    before = time.time_ns()
    seq = client.send_request("2 3")
    request, info = wait_for_request_with_info(server, timeout=5.0)
    assert request.content == "2 3"
    assert request.id == ServiceRequestId(seq, client.gid)
    assert info.client_gid == client.gid
    assert info.sequence_number == seq
    assert before <= info.source_timestamp.nanoseconds
    assert info.source_timestamp <= info.received_timestamp
    a, b = map(int, request.content.split())
    server.send_response(request.id, str(a + b))
    response, rinfo = wait_for_response_with_info(seq, client, timeout=5.0)
    assert response == "5"
    assert rinfo.client_gid == client.gid
    assert rinfo.sequence_number == seq
    assert info.source_timestamp <= rinfo.source_timestamp <= rinfo.received_timestamp
    assert not client.has_response()


@pytest.mark.parametrize("text", ["", "\r\n", "\r", "\x00", "é🚀", "x" * 100_000])
def test_exact_round_trip_of_requests_and_responses(ctx: Context, text: str) -> None:
    server = ServiceServer("/echo", context=ctx)
    client = ServiceClient("/echo", context=ctx)
    seq = client.send_request(text)
    request = wait_for_request(server, timeout=5.0)
    assert request.content == text
    server.send_response(request.id, text[::-1])
    assert wait_for_response(seq, client, timeout=5.0) == text[::-1]


def test_properties_and_repr(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    assert server.service_name == client.service_name == "/svc"
    assert isinstance(server.gid, Gid)
    assert isinstance(client.gid, Gid)
    assert "/svc" in repr(server)
    assert "/svc" in repr(client)


def test_sequence_numbers_are_unique_and_increasing(ctx: Context) -> None:
    ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seqs = [client.send_request(str(i)) for i in range(50)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 50
    assert all(isinstance(s, int) for s in seqs)


def test_sequence_numbers_are_unique_across_threads(ctx: Context) -> None:
    client = ServiceClient("/svc", context=ctx)
    results: list[list[int]] = [[] for _ in range(4)]

    def run(tid: int) -> None:
        for _ in range(500):
            results[tid].append(client.send_request("x"))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    every = [s for r in results for s in r]
    assert len(set(every)) == 2000
    for r in results:
        assert r == sorted(r)


def test_responses_out_of_order(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seqs = [client.send_request(f"q{i}") for i in range(5)]
    requests = [wait_for_request(server, timeout=5.0) for _ in seqs]
    assert [r.id.sequence_number for r in requests] == seqs
    for request in reversed(requests):
        server.send_response(request.id, "answer to " + request.content)
    # Waiting for the first request while the others arrive first still gets the right one.
    for i, seq in enumerate(seqs):
        assert wait_for_response(seq, client, timeout=5.0) == f"answer to q{i}"
    assert not client.has_response()


def test_waiting_for_one_response_leaves_the_others_queued(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    s1, s2 = client.send_request("1"), client.send_request("2")
    r1, r2 = wait_for_request(server, timeout=5.0), wait_for_request(server, timeout=5.0)
    server.send_response(r2.id, "two")
    server.send_response(r1.id, "one")
    assert wait_for_response(s1, client, timeout=5.0) == "one"
    assert client.has_response(s2)
    assert not client.has_response(s1)
    assert client.get_response(s2) == "two"


def test_a_response_waited_for_from_another_thread(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("ping")
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(wait_for_response(seq, client, 5.0)))
    waiter.start()
    request = wait_for_request(server, timeout=5.0)
    server.send_response(request.id, "pong")
    waiter.join(5)
    assert got == ["pong"]


def test_two_clients_each_get_only_their_responses(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    alice = ServiceClient("/svc", context=ctx)
    bob = ServiceClient("/svc", context=ctx)
    assert alice.gid != bob.gid
    a_seq = alice.send_request("alice")
    b_seq = bob.send_request("bob")
    assert a_seq == b_seq == 1  # sequence numbers are per client: the GID tells them apart
    for _ in range(2):
        request = wait_for_request(server, timeout=5.0)
        server.send_response(request.id, f"for {request.content}")
    assert wait_for_response(a_seq, alice, timeout=5.0) == "for alice"
    assert wait_for_response(b_seq, bob, timeout=5.0) == "for bob"
    flush(ctx)
    assert not alice.has_response()
    assert not bob.has_response()
    assert ctx.stats().dropped["duplicate"] == 0


def test_two_servers_of_one_service_both_get_the_request(ctx: Context) -> None:
    first = ServiceServer("/svc", context=ctx)
    second = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("who?")
    r1 = wait_for_request(first, timeout=5.0)
    r2 = wait_for_request(second, timeout=5.0)
    assert r1 == r2
    first.send_response(r1.id, "first")
    second.send_response(r2.id, "second")
    flush(ctx)
    # The client keeps the first response; the second is a duplicate.
    assert client.get_response(seq) == "first"
    assert not client.has_response()
    assert ctx.stats().dropped["duplicate"] == 1


def test_server_for_another_service_gets_nothing(ctx: Context) -> None:
    other = ServiceServer("/other", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    client.send_request("x")
    flush(ctx)
    assert not other.has_request()
    assert ctx.stats().dropped["unmatched"] == 1


def _reply_headers(client: ServiceClient, seq: int) -> EmailHeaders:
    return EmailHeaders(
        {
            "Source-Timestamp": str(time.time_ns()),
            "Client-GID": client.gid.to_string(),
            "Request-Sequence-Number": str(seq),
        }
    )


def test_a_duplicate_response_email_is_dropped(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("q")
    request = wait_for_request(server, timeout=5.0)
    server.send_response(request.id, "real")
    assert wait_for_response(seq, client, timeout=5.0) == "real"
    # A second reply email for the same request (as a mail server that delivers twice
    # with a new Message-ID, or a second server, would produce).
    original = EmailData(EmailContent("/svc", "q"), message_id="<request@test>")
    ctx._sender.reply(EmailContent("/svc", "again"), original, _reply_headers(client, seq))
    flush(ctx)
    assert not client.has_response()
    assert client.get_response(seq) is None
    assert ctx.stats().dropped["duplicate"] == 1


def test_a_duplicate_before_the_first_is_taken(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("q")
    request = wait_for_request(server, timeout=5.0)
    server.send_response(request.id, "real")
    original = EmailData(EmailContent("/svc", "q"), message_id="<request@test>")
    ctx._sender.reply(EmailContent("/svc", "again"), original, _reply_headers(client, seq))
    flush(ctx)
    assert client.get_response(seq) == "real"
    assert not client.has_response()
    assert ctx.stats().dropped["duplicate"] == 1


def test_a_response_handed_to_the_handler_twice(ctx: Context) -> None:
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("q")
    reply = EmailData(
        EmailContent("/svc", "once"),
        _reply_headers(client, seq),
        message_id="<reply@test>",
        in_reply_to="<request@test>",
    )
    handler = ctx._core._services  # past the core's Message-ID memory, on purpose
    assert handler.handle(reply)
    assert handler.handle(reply)
    assert client.get_response(seq) == "once"
    assert client.get_response(seq) is None
    assert ctx.stats().dropped["duplicate"] == 1


def test_a_response_to_a_request_never_sent_is_dropped(ctx: Context) -> None:
    client = ServiceClient("/svc", context=ctx)
    original = EmailData(EmailContent("/svc", "q"), message_id="<request@test>")
    ctx._sender.reply(EmailContent("/svc", "unasked"), original, _reply_headers(client, 99))
    flush(ctx)
    assert not client.has_response()


def test_send_response_to_an_unknown_request(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    with pytest.raises(UnknownRequestError) as info:
        server.send_response(ServiceRequestId(1, Gid(42)), "nobody asked")
    assert isinstance(info.value, KeyError)
    assert "/svc" in str(info.value)
    assert ctx.stats().sent == 0


def test_send_response_twice(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    client.send_request("q")
    request = wait_for_request(server, timeout=5.0)
    server.send_response(request.id, "first")
    with pytest.raises(UnknownRequestError):
        server.send_response(request.id, "second")


def test_a_request_to_another_server_cannot_be_answered_here(ctx: Context) -> None:
    mine = ServiceServer("/mine", context=ctx)
    theirs = ServiceServer("/theirs", context=ctx)
    client = ServiceClient("/theirs", context=ctx)
    client.send_request("q")
    request = wait_for_request(theirs, timeout=5.0)
    with pytest.raises(UnknownRequestError):
        mine.send_response(request.id, "not mine")


def test_get_response_with_info_none_returns_the_oldest(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    assert client.get_response_with_info(None) is None
    assert client.get_response_with_info() is None
    seqs = [client.send_request(str(i)) for i in range(3)]
    requests = [wait_for_request(server, timeout=5.0) for _ in seqs]
    for request in reversed(requests):
        server.send_response(request.id, f"r{request.content}")
    flush(ctx)
    got = []
    while (item := client.get_response_with_info(None)) is not None:
        got.append((item[0], item[1].sequence_number, item[1].client_gid))
    assert got == [
        ("r2", seqs[2], client.gid),
        ("r1", seqs[1], client.gid),
        ("r0", seqs[0], client.gid),
    ]


def test_has_and_get_response(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("q")
    assert not client.has_response(seq)
    assert client.get_response(seq) is None
    request = wait_for_request(server, timeout=5.0)
    assert not server.has_request()
    assert server.get_request() is None
    server.send_response(request.id, "a")
    flush(ctx)
    assert client.has_response()
    assert client.has_response(seq)
    assert not client.has_response(seq + 1)
    assert client.get_response(seq + 1) is None
    assert client.get_response(seq) == "a"


def test_request_queue_depth(ctx: Context) -> None:
    server = ServiceServer("/svc", depth=2, context=ctx)
    client = ServiceClient("/svc", context=ctx)
    for i in range(4):
        client.send_request(str(i))
    flush(ctx)
    assert [server.get_request().content for _ in range(2)] == ["2", "3"]  # type: ignore[union-attr]
    assert server.get_request() is None
    assert ctx.stats().dropped["queue_full"] == 2


def test_dropped_requests_cannot_be_answered(ctx: Context) -> None:
    server = ServiceServer("/svc", depth=1, context=ctx)
    client = ServiceClient("/svc", context=ctx)
    first = client.send_request("first")
    client.send_request("second")
    flush(ctx)
    with pytest.raises(UnknownRequestError):
        server.send_response(ServiceRequestId(first, client.gid), "too late")


def test_response_queue_depth(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", depth=2, context=ctx)
    seqs = [client.send_request(str(i)) for i in range(3)]
    for _ in seqs:
        request = wait_for_request(server, timeout=5.0)
        server.send_response(request.id, request.content)
    flush(ctx)
    assert client.get_response(seqs[0]) is None
    assert client.get_response(seqs[1]) == "1"
    assert client.get_response(seqs[2]) == "2"
    assert ctx.stats().dropped["queue_full"] == 1


def test_closed_client_gets_no_responses(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("q")
    request = wait_for_request(server, timeout=5.0)
    client.close()
    client.close()
    server.send_response(request.id, "a")
    flush(ctx)
    assert client.get_response(seq) is None
    assert ctx.stats().dropped["unmatched"] == 1


def test_closed_server_gets_no_requests(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    server.close()
    server.close()
    client.send_request("q")
    flush(ctx)
    assert not server.has_request()


@pytest.mark.parametrize("value", [b"x", None, 1])
def test_non_str_request_and_response(ctx: Context, value: object) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    with pytest.raises(TypeError):
        client.send_request(value)  # type: ignore[arg-type]
    client.send_request("ok")
    request = wait_for_request(server, timeout=5.0)
    with pytest.raises(TypeError):
        server.send_response(request.id, value)  # type: ignore[arg-type]
    server.send_response(request.id, "still answerable")


@pytest.mark.parametrize("name", ["", "a\nb", "a\rb", "\x00", "\x7f", "x" * 256, None, 3])
def test_invalid_service_names(ctx: Context, name: object) -> None:
    with pytest.raises(InvalidNameError):
        ServiceClient(name, context=ctx)  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        ServiceServer(name, context=ctx)  # type: ignore[arg-type]


def test_many_clients_one_server_under_load(ctx: Context) -> None:
    server = ServiceServer("/load", depth=10_000, context=ctx)
    clients = [ServiceClient("/load", context=ctx) for _ in range(4)]
    per_client = 200
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            request = server.get_request()
            if request is None:
                try:
                    request = wait_for_request(server, timeout=0.2)
                except TimeoutError:
                    continue
            server.send_response(request.id, request.content.upper())

    server_thread = threading.Thread(target=serve)
    server_thread.start()
    failures: list[str] = []

    def call(client: ServiceClient, tag: str) -> None:
        for i in range(per_client):
            text = f"{tag}-{i}"
            seq = client.send_request(text)
            response = wait_for_response(seq, client, timeout=5.0)
            if response != text.upper():
                failures.append(f"{text} -> {response}")

    threads = [threading.Thread(target=call, args=(c, f"c{n}")) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    stop.set()
    server_thread.join(5)
    assert not failures
    assert ctx.stats().dropped_total == 0
