"""Iteration over a subscription, and one-call request/reply (call, call_future).

``for message in subscription`` yields messages as they come and ends when the
subscription is closed or the context shuts down. ``call`` sends and waits;
``call_future`` returns a future resolved outside every emailmw lock; a request
given up (timeout, cancellation) is forgotten and its late response is dropped
and counted.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from transports import Transport, transport_fixture  # noqa: F401  ("transport")

import emailmw

pytestmark = [pytest.mark.timeout(120)]


class Point(BaseModel):
    x: float
    y: float


class Collector:
    """Iterates a subscription in a thread of its own, collecting what it yields."""

    def __init__(self, sub: emailmw.Subscription[object]) -> None:
        self.items: list[object] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(sub,), name="test-iterate")
        self.thread.start()

    def _run(self, sub: emailmw.Subscription[object]) -> None:
        try:
            for item in sub:
                self.items.append(item)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.items) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.items) >= count, self.items

    def ended(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for collector in made:
        collector.thread.join(timeout=10.0)
        assert not collector.thread.is_alive()


# -- iteration ------------------------------------------------------------------------


def test_iteration_yields_typed_messages_and_ends_on_close(
    transport: Transport, collectors: list[Collector]
) -> None:
    sub = emailmw.Subscription("/it", Point, context=transport.ctx)
    pub = emailmw.Publisher("/it", Point, context=transport.ctx)
    collector = Collector(sub)  # type: ignore[arg-type]
    collectors.append(collector)
    points = [Point(x=i, y=-i) for i in range(3)]
    for point in points:
        pub.publish(point)
    collector.wait_for(3, transport.wait)
    assert collector.items == points
    assert all(type(item) is Point for item in collector.items)
    time.sleep(0.1)
    assert not collector.ended(0)  # blocked, waiting for more
    sub.close()  # wakes the blocked iterator, which ends
    assert collector.ended(5.0)
    assert collector.error is None


def test_iteration_ends_when_the_context_shuts_down(
    transport: Transport, collectors: list[Collector]
) -> None:
    sub = emailmw.Subscription("/it", context=transport.ctx)
    collector = Collector(sub)  # type: ignore[arg-type]
    collectors.append(collector)
    emailmw.Publisher("/it", context=transport.ctx).publish("one")
    collector.wait_for(1, transport.wait)
    transport.ctx.shutdown()
    assert collector.ended(5.0)
    assert collector.items == ["one"] and collector.error is None
    assert list(sub) == []  # on a shut-down context: ends at once


def test_a_closed_subscription_yields_what_it_holds_then_ends(ctx: emailmw.Context) -> None:
    sub = emailmw.Subscription("/it", context=ctx)
    pub = emailmw.Publisher("/it", context=ctx)
    pub.publish("a")
    pub.publish("b")
    sub.close()
    pub.publish("c")  # not routed any more
    assert list(sub) == ["a", "b"]
    assert list(sub) == []


def test_breaking_out_of_the_loop_keeps_the_rest(ctx: emailmw.Context) -> None:
    sub = emailmw.Subscription("/it", context=ctx)
    pub = emailmw.Publisher("/it", context=ctx)
    for text in ("a", "b", "c"):
        pub.publish(text)
    for message in sub:
        assert message == "a"
        break
    assert sub.get_message() == "b"
    assert next(iter(sub)) == "c"


# -- call --------------------------------------------------------------------------------


@pytest.fixture
def area_server(transport: Transport) -> Iterator[emailmw.ServiceServer[Point, float]]:
    """A typed server answering from an executor in a background thread."""
    server = emailmw.ServiceServer(
        "/area", Point, float, handler=lambda p: p.x * p.y, context=transport.ctx
    )
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(server)
    thread = threading.Thread(target=executor.spin, name="test-spin")
    thread.start()
    yield server
    executor.shutdown(timeout=5.0)
    thread.join(timeout=5.0)
    assert not thread.is_alive()


def test_call_returns_the_typed_response(
    transport: Transport, area_server: emailmw.ServiceServer[Point, float]
) -> None:
    client = emailmw.ServiceClient("/area", Point, float, context=transport.ctx)
    assert client.call(Point(x=3, y=4), timeout=transport.wait) == 12.0
    assert client.call(Point(x=1, y=0.5), transport.wait) == 0.5
    with pytest.raises(emailmw.InvalidMessageError):
        client.call("not a point", timeout=transport.wait)  # type: ignore[arg-type]


def test_call_times_out_and_forgets_the_request(transport: Transport) -> None:
    server = emailmw.ServiceServer("/slow", context=transport.ctx)  # answered by hand
    client = emailmw.ServiceClient("/slow", context=transport.ctx)
    with pytest.raises(emailmw.WaitTimeoutError, match="no response"):
        client.call("late", timeout=0.3)
    request = emailmw.wait_for_request(server, transport.wait)
    unmatched = transport.ctx.stats().dropped["unmatched"]
    server.send_response(request.id, "too late")
    deadline = time.monotonic() + transport.wait
    while transport.ctx.stats().dropped["unmatched"] == unmatched:
        assert time.monotonic() < deadline, transport.ctx.stats()
        time.sleep(0.02)
    assert transport.ctx.stats().dropped["unmatched"] == unmatched + 1
    assert not client.has_response()


def test_call_raises_when_the_context_shuts_down(ctx: emailmw.Context) -> None:
    emailmw.ServiceServer("/never", context=ctx)
    client = emailmw.ServiceClient("/never", context=ctx)
    threading.Timer(0.2, ctx.shutdown).start()
    with pytest.raises(emailmw.ContextError):
        client.call("x")


# -- call_future -------------------------------------------------------------------------


def test_call_future_resolves_outside_every_lock(
    transport: Transport, area_server: emailmw.ServiceServer[Point, float]
) -> None:
    client = emailmw.ServiceClient("/area", Point, float, context=transport.ctx)
    chained: concurrent.futures.Future[float] = concurrent.futures.Future()
    threads: list[str] = []

    def then(future: concurrent.futures.Future[float]) -> None:
        # Sends a request from the done callback and waits for its answer: this
        # needs the core's and the client's locks, so it would deadlock under them.
        threads.append(threading.current_thread().name)
        chained.set_result(future.result() + client.call(Point(x=1, y=1), transport.wait))

    future = client.call_future(Point(x=2, y=3))
    future.add_done_callback(then)
    assert future.result(timeout=transport.wait) == 6.0
    assert chained.result(timeout=transport.wait) == 7.0
    assert threads in (["emailmw-futures"], ["MainThread"])  # resolved, or already done


def test_many_futures_resolve_in_any_order(
    transport: Transport, area_server: emailmw.ServiceServer[Point, float]
) -> None:
    client = emailmw.ServiceClient("/area", Point, float, context=transport.ctx)
    futures = [client.call_future(Point(x=i, y=2)) for i in range(5)]
    done, _ = concurrent.futures.wait(futures, timeout=transport.wait)
    assert len(done) == 5
    assert [f.result() for f in futures] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert not client.has_response()  # a future's response is not queued as well


def test_cancelling_a_future_forgets_the_request(transport: Transport) -> None:
    server = emailmw.ServiceServer("/manual", context=transport.ctx)
    client = emailmw.ServiceClient("/manual", context=transport.ctx)
    future = client.call_future("x")
    assert future.cancel()
    assert future.cancelled()
    request = emailmw.wait_for_request(server, transport.wait)
    unmatched = transport.ctx.stats().dropped["unmatched"]
    server.send_response(request.id, "late")
    deadline = time.monotonic() + transport.wait
    while transport.ctx.stats().dropped["unmatched"] == unmatched:
        assert time.monotonic() < deadline, transport.ctx.stats()
        time.sleep(0.02)
    assert not client.has_response()
    # the client goes on: a new request gets its own response
    second = client.call_future("y")
    request = emailmw.wait_for_request(server, transport.wait)
    server.send_response(request.id, "on time")
    assert second.result(timeout=transport.wait) == "on time"


def test_close_cancels_and_shutdown_fails_the_pending_futures(ctx: emailmw.Context) -> None:
    emailmw.ServiceServer("/never", context=ctx)
    closing = emailmw.ServiceClient("/never", context=ctx)
    cancelled = closing.call_future("x")
    closing.close()
    assert cancelled.cancelled()
    client = emailmw.ServiceClient("/never", context=ctx)
    failed = client.call_future("y")
    ctx.shutdown()
    with pytest.raises(emailmw.ContextError):
        failed.result(timeout=5.0)
    deadline = time.monotonic() + 5.0
    while any(t.name == "emailmw-futures" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the futures thread outlived its context"
        time.sleep(0.01)


def test_call_future_refuses_a_bad_request_before_sending(ctx: emailmw.Context) -> None:
    client = emailmw.ServiceClient("/typed", Point, float, context=ctx)
    with pytest.raises(emailmw.InvalidMessageError):
        client.call_future({"x": 1})  # type: ignore[arg-type]
    assert ctx.stats().sent == 0
