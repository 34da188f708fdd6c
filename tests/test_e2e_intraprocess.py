"""End to end, intraprocess: a small application built only on the public API,
with several threads, pub/sub and services, WaitSets and guard conditions, then a
clean shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import emailmw

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def app() -> Iterator[emailmw.Context]:
    emailmw.shutdown()
    ctx = emailmw.init(emailmw.Options(intraprocess=True))
    try:
        yield ctx
    finally:
        emailmw.shutdown()


def test_quick_start_from_the_package_docstring(app: emailmw.Context) -> None:
    sub = emailmw.Subscription("/chatter")
    emailmw.Publisher("/chatter").publish("hello")
    assert emailmw.wait_for_message(sub, timeout=1.0) == "hello"


def test_a_node_serving_a_service_and_a_topic_from_one_wait_set(app: emailmw.Context) -> None:
    """One executor thread waits on a server, a subscription and a stop guard
    condition; clients in other threads call the service while a publisher
    streams; the executor stops when the guard condition fires."""
    server = emailmw.ServiceServer("/add_two_ints")
    commands = emailmw.Subscription("/commands")
    stop = emailmw.GuardCondition()
    seen_commands: list[str] = []
    saw_last = threading.Event()
    executor_errors: list[BaseException] = []

    def executor() -> None:
        ws = emailmw.WaitSet()
        ws.add_server(server)
        ws.add_subscription(commands)
        ws.add_guard_condition(stop)
        try:
            while True:
                assert ws.wait(10.0), "executor starved"
                for _ in ws.servers:
                    while (item := server.get_request_with_info()) is not None:
                        request, info = item
                        assert info.client_gid == request.id.client_gid
                        a, b = map(int, request.content.split())
                        server.send_response(request.id, str(a + b))
                for sub in ws.subscriptions:
                    while (message := sub.get_message()) is not None:
                        seen_commands.append(message)
                        if message == "last":
                            saw_last.set()
                if ws.guard_conditions:
                    return
        except BaseException as exc:
            executor_errors.append(exc)

    executor_thread = threading.Thread(target=executor, name="executor")
    executor_thread.start()

    results: dict[str, list[tuple[int, int, int]]] = {}

    def caller(name: str, count: int) -> None:
        client = emailmw.ServiceClient("/add_two_ints")
        pending = {}
        for i in range(count):
            pending[client.send_request(f"{i} {i * 10}")] = (i, i * 10)
        out = []
        for seq, (a, b) in pending.items():
            response, info = emailmw.wait_for_response_with_info(seq, client, timeout=5.0)
            assert info.client_gid == client.gid
            assert info.sequence_number == seq
            out.append((a, b, int(response)))
        results[name] = out
        client.close()

    callers = [
        threading.Thread(target=caller, args=(f"caller{n}", 50), name=f"caller{n}")
        for n in range(4)
    ]
    for t in callers:
        t.start()
    publisher = emailmw.Publisher("/commands")
    for i in range(100):
        publisher.publish(f"cmd {i}")
    for t in callers:
        t.join(10)
        assert not t.is_alive()

    # The last command flushes through before the stop: one sender thread, one order.
    publisher.publish("last")
    assert saw_last.wait(5) or executor_errors, "the executor never saw the last command"
    stop.trigger()
    executor_thread.join(5)
    assert not executor_thread.is_alive()
    assert not executor_errors, executor_errors

    assert seen_commands == [f"cmd {i}" for i in range(100)] + ["last"]
    assert sorted(results) == [f"caller{n}" for n in range(4)]
    for out in results.values():
        assert out == [(i, i * 10, i + i * 10) for i in range(50)]
    stats = emailmw.stats()
    assert stats.dropped_total == 0
    assert stats.sent == stats.received == 101 + 4 * 50 * 2


def test_pipeline_of_threads_over_topics(app: emailmw.Context) -> None:
    """raw → (doubler thread) → doubled → test thread; ordering survives the hop."""
    raw = emailmw.Subscription("/raw")
    doubled = emailmw.Subscription("/doubled")
    out = emailmw.Publisher("/doubled")
    n = 500

    def doubler() -> None:
        for _ in range(n):
            message, info = emailmw.wait_for_message_with_info(raw, timeout=5.0)
            out.publish(f"{int(message) * 2} from {info.publisher_gid.value}")

    thread = threading.Thread(target=doubler)
    thread.start()
    source = emailmw.Publisher("/raw")
    for i in range(n):
        source.publish(str(i))
    got = [emailmw.wait_for_message(doubled, timeout=5.0) for _ in range(n)]
    thread.join(5)
    assert got == [f"{i * 2} from {source.gid.value}" for i in range(n)]


def test_shutdown_in_the_middle_of_traffic(app: emailmw.Context) -> None:
    sub = emailmw.Subscription("/busy")
    pub = emailmw.Publisher("/busy")
    server = emailmw.ServiceServer("/svc")
    client = emailmw.ServiceClient("/svc")
    outcomes: list[str] = []
    lock = threading.Lock()
    started = threading.Barrier(4)

    def record(what: str) -> None:
        with lock:
            outcomes.append(what)

    def publish_forever() -> None:
        started.wait()
        try:
            while True:
                pub.publish("x")
        except emailmw.ContextError:
            record("publisher stopped")

    def consume_forever() -> None:
        started.wait()
        try:
            while True:
                emailmw.wait_for_message(sub, timeout=None)
        except emailmw.ContextError:
            record("consumer stopped")

    def serve_forever() -> None:
        started.wait()
        try:
            while True:
                emailmw.wait_for_request(server, timeout=None)
        except emailmw.ContextError:
            record("server stopped")

    threads = [
        threading.Thread(target=f) for f in (publish_forever, consume_forever, serve_forever)
    ]
    for t in threads:
        t.start()
    started.wait()
    seq = client.send_request("unanswered")
    start = time.monotonic()
    assert emailmw.shutdown() is True
    for t in threads:
        t.join(2)
    assert time.monotonic() - start < 2.0
    assert all(not t.is_alive() for t in threads)
    assert sorted(outcomes) == ["consumer stopped", "publisher stopped", "server stopped"]
    with pytest.raises(emailmw.ContextError):
        emailmw.wait_for_response(seq, client, timeout=None)


def test_restart_after_shutdown_is_a_fresh_world(app: emailmw.Context) -> None:
    old_sub = emailmw.Subscription("/t")
    emailmw.Publisher("/t").publish("before")
    assert emailmw.wait_for_message(old_sub, timeout=5.0) == "before"
    emailmw.shutdown()
    emailmw.init(emailmw.Options(intraprocess=True))
    new_sub = emailmw.Subscription("/t")
    emailmw.Publisher("/t").publish("after")
    assert emailmw.wait_for_message(new_sub, timeout=5.0) == "after"
    with pytest.raises(emailmw.ContextError):
        old_sub.get_message()
    assert emailmw.stats().sent == 1
