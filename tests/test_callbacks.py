"""Subscription callbacks and service handlers, run by an executor, on both transports.

A callback takes ``(message)`` or ``(message, info)`` (decided once by its
signature); a handler's return value is sent as the response. User code runs in
the executor's thread and outside every emailmw lock: a callback that raises is
counted and spinning goes on; a handler that raises sends nothing. Entities
dropped without ``close()`` are no longer routed to.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from transports import Transport, transport_fixture  # noqa: F401  ("transport")

import emailmw
from emailmw.entity import callback_arity

pytestmark = [pytest.mark.timeout(120)]


class Point(BaseModel):
    x: float
    y: float


def spin_until(executor: emailmw.Executor, done: Callable[[], bool], timeout: float) -> None:
    """Run callbacks one at a time until ``done()`` (fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        assert remaining > 0, "timed out"
        executor.spin_once(remaining)


@pytest.fixture
def spinning() -> Iterator[Callable[[emailmw.Executor], None]]:
    """Spin executors in background threads; shut them down and join after the test."""
    started: list[tuple[emailmw.Executor, threading.Thread]] = []

    def start(executor: emailmw.Executor) -> None:
        thread = threading.Thread(target=executor.spin, name="test-spin")
        thread.start()
        started.append((executor, thread))

    yield start
    for executor, thread in started:
        executor.shutdown(timeout=10.0)
        thread.join(timeout=10.0)
        assert not thread.is_alive()


# -- subscriptions ------------------------------------------------------------------------


def test_a_one_argument_callback_gets_each_message_in_order(transport: Transport) -> None:
    got: list[str] = []
    sub = emailmw.Subscription("/cb", callback=got.append, context=transport.ctx)
    pub = emailmw.Publisher("/cb", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    for text in ("a", "b", "c"):
        pub.publish(text)
    spin_until(executor, lambda: len(got) == 3, transport.wait)
    assert got == ["a", "b", "c"]
    assert not sub.has_message()


def test_a_two_argument_callback_gets_the_info_too(transport: Transport) -> None:
    got: list[tuple[Point, emailmw.MessageInfo]] = []

    def on_point(point: Point, info: emailmw.MessageInfo) -> None:
        got.append((point, info))

    sub = emailmw.Subscription("/points", Point, callback=on_point, context=transport.ctx)
    pub = emailmw.Publisher("/points", Point, context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    pub.publish(Point(x=1, y=2), {"Trace-Id": "t-1"})
    spin_until(executor, lambda: len(got) == 1, transport.wait)
    point, info = got[0]
    assert point == Point(x=1, y=2) and type(point) is Point
    assert info.publisher_gid == pub.gid
    assert dict(info.headers) == {"Trace-Id": "t-1"}


def test_a_raising_callback_is_counted_and_spinning_goes_on(
    transport: Transport, spinning: Callable[[emailmw.Executor], None]
) -> None:
    got: list[str] = []
    done = threading.Event()

    def callback(message: str) -> None:
        if message == "bad":
            raise RuntimeError("callback failed on purpose")
        got.append(message)
        if message == "last":
            done.set()

    sub = emailmw.Subscription("/raise", callback=callback, context=transport.ctx)
    pub = emailmw.Publisher("/raise", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    spinning(executor)
    for text in ("first", "bad", "last"):
        pub.publish(text)
    assert done.wait(transport.wait)
    assert got == ["first", "last"]
    assert transport.ctx.stats().callback_errors == 1


def test_callbacks_run_in_the_executor_thread_outside_every_lock(
    transport: Transport, spinning: Callable[[emailmw.Executor], None]
) -> None:
    """The callback publishes on its own topic and reads its own subscription: if
    it ran under the core's or the entity's lock, this would deadlock."""
    got: list[tuple[str, str]] = []
    done = threading.Event()
    pub = emailmw.Publisher("/echo", context=transport.ctx)

    def callback(message: str) -> None:
        got.append((message, threading.current_thread().name))
        sub.has_message()
        if message == "ping":
            pub.publish("pong")  # delivered to this very subscription
        else:
            done.set()

    sub = emailmw.Subscription("/echo", callback=callback, context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    spinning(executor)
    pub.publish("ping")
    assert done.wait(transport.wait)
    assert got == [("ping", "test-spin"), ("pong", "test-spin")]


def test_a_callback_that_closes_its_own_subscription_does_not_deadlock(
    transport: Transport, spinning: Callable[[emailmw.Executor], None]
) -> None:
    got: list[str] = []
    closed = threading.Event()

    def callback(message: str) -> None:
        got.append(message)
        sub.close()
        closed.set()

    sub = emailmw.Subscription("/close", callback=callback, context=transport.ctx)
    pub = emailmw.Publisher("/close", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    spinning(executor)
    witness = emailmw.Subscription("/close", context=transport.ctx)
    pub.publish("one")
    assert closed.wait(transport.wait)
    pub.publish("two")  # not routed to the closed subscription any more
    assert emailmw.wait_for_message(witness, transport.wait) == "one"
    assert emailmw.wait_for_message(witness, transport.wait) == "two"
    assert got == ["one"]
    assert not sub.has_message()
    assert executor.entities == []


# -- service handlers ---------------------------------------------------------------------


def test_a_handler_returns_the_typed_response(
    transport: Transport, spinning: Callable[[emailmw.Executor], None]
) -> None:
    def area(point: Point) -> float:
        return point.x * point.y

    server = emailmw.ServiceServer("/area", Point, float, handler=area, context=transport.ctx)
    client = emailmw.ServiceClient("/area", Point, float, context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(server)
    spinning(executor)
    response = client.call(Point(x=3, y=4), timeout=transport.wait)
    assert response == 12.0 and type(response) is float
    assert client.call(Point(x=2, y=0.5), timeout=transport.wait) == 1.0


def test_a_two_argument_handler_gets_the_service_info(
    transport: Transport, spinning: Callable[[emailmw.Executor], None]
) -> None:
    def who(request: str, info: emailmw.ServiceInfo) -> str:
        return f"{request} from {info.client_gid.value} ({info.headers.get('Caller')})"

    server = emailmw.ServiceServer("/who", handler=who, context=transport.ctx)
    client = emailmw.ServiceClient("/who", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(server)
    spinning(executor)
    answer = client.call("hi", timeout=transport.wait, additional_headers={"Caller": "me"})
    assert answer == f"hi from {client.gid.value} (me)"


def test_a_raising_handler_sends_nothing_and_is_counted(
    transport: Transport, spinning: Callable[[emailmw.Executor], None]
) -> None:
    def handler(request: str) -> str:
        if request == "bad":
            raise ValueError("handler failed on purpose")
        if request == "wrong type":
            return 42  # type: ignore[return-value]  # not a str: cannot be sent
        return request.upper()

    server = emailmw.ServiceServer("/upper", handler=handler, context=transport.ctx)
    client = emailmw.ServiceClient("/upper", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(server)
    spinning(executor)
    sent_before = transport.ctx.stats().sent
    with pytest.raises(emailmw.WaitTimeoutError):
        client.call("bad", timeout=1.0 if not transport.email else 5.0)
    with pytest.raises(emailmw.WaitTimeoutError):
        client.call("wrong type", timeout=1.0 if not transport.email else 5.0)
    assert transport.ctx.stats().callback_errors == 2
    assert transport.ctx.stats().sent == sent_before + 2  # the two requests, no response
    assert client.call("good", timeout=transport.wait) == "GOOD"  # the server goes on


# -- the signature rule -----------------------------------------------------------------


def one(message: str) -> None: ...
def two(message: str, info: object) -> None: ...
def optional_info(message: str, info: object = None) -> None: ...
def star(*args: object) -> None: ...
def three(a: object, b: object, c: object) -> None: ...
def keyword_only(message: str, *, flag: bool) -> None: ...
def nothing() -> None: ...


class Handler:
    def __call__(self, request: str, info: object) -> str:
        return request

    def method(self, message: str) -> None: ...


@pytest.mark.parametrize(
    ("function", "arity"),
    [
        (one, 1),
        (two, 2),
        (optional_info, 1),
        (star, 1),
        (print, 1),
        ([].append, 1),
        (lambda m: None, 1),
        (lambda m, i: None, 2),
        (Handler(), 2),
        (Handler().method, 1),
        (functools.partial(three, 1), 2),
    ],
)
def test_the_signature_decides_the_arguments(function: Any, arity: int) -> None:
    assert callback_arity(function, "callback") == arity


@pytest.mark.parametrize("function", [three, keyword_only, nothing, "not callable"])
def test_a_callback_that_cannot_be_called_either_way_is_refused(
    ctx: emailmw.Context, function: Any
) -> None:
    with pytest.raises(TypeError, match="callback"):
        emailmw.Subscription("/t", callback=function, context=ctx)
    with pytest.raises(TypeError, match="handler"):
        emailmw.ServiceServer("/s", handler=function, context=ctx)


# -- garbage collection ------------------------------------------------------------------


def test_an_entity_dropped_without_close_is_no_longer_routed(ctx: emailmw.Context) -> None:
    routes = ctx._delivery._subscriptions
    services = ctx._delivery._services
    sub = emailmw.Subscription("/gc", callback=lambda m: None, context=ctx)
    server = emailmw.ServiceServer("/gc-service", handler=lambda r: r, context=ctx)
    client = emailmw.ServiceClient("/gc-service", context=ctx)
    refs = [weakref.ref(sub), weakref.ref(server), weakref.ref(client)]
    assert (routes.route_count, services.route_count) == (1, 2)
    del sub, server, client
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    assert (routes.route_count, services.route_count) == (0, 0)
    # and a message on that topic now finds nobody
    unmatched = ctx.stats().dropped["unmatched"]
    emailmw.Publisher("/gc", context=ctx).publish("anyone?")
    assert ctx.stats().dropped["unmatched"] == unmatched + 1
    assert ctx.stats().delivered == 0


def test_a_dropped_entity_is_pruned_when_the_topic_is_next_used(ctx: emailmw.Context) -> None:
    """Without asking for a count: the next message prunes the dead route."""
    keep = emailmw.Subscription("/gc2", context=ctx)
    emailmw.Subscription("/gc2", callback=lambda m: None, context=ctx)  # dropped at once
    gc.collect()
    emailmw.Publisher("/gc2", context=ctx).publish("x")
    assert emailmw.wait_for_message(keep, 1.0) == "x"
    assert ctx.stats().delivered == 1
    assert ctx._delivery._subscriptions._count_routes() == 1
