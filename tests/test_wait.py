"""Waiting: WaitSet, GuardCondition and the wait_for_* helpers."""

from __future__ import annotations

import gc
import itertools
import math
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from emailmw import (
    Context,
    GuardCondition,
    GuardConditionInUseError,
    Publisher,
    ServiceClient,
    ServiceServer,
    Subscription,
    WaitSet,
    WaitTimeoutError,
    wait_for_message,
    wait_for_message_with_info,
    wait_for_request,
    wait_for_request_with_info,
    wait_for_response,
    wait_for_response_with_info,
)
from emailmw.waitable import Waitable

pytestmark = pytest.mark.timeout(30)

_flush_ids = itertools.count()


def flush(ctx: Context) -> None:
    """Return once everything this thread sent through ``ctx`` was dispatched."""
    topic = f"/__flush__/{next(_flush_ids)}"
    sub = Subscription(topic, context=ctx)
    Publisher(topic, context=ctx).publish("flush")
    assert wait_for_message(sub, timeout=5.0) == "flush"
    sub.close()


def until_waiting(waitable: Waitable, timeout: float = 5.0) -> None:
    """Return once some thread is blocked waiting on ``waitable``."""
    deadline = time.monotonic() + timeout
    while not waitable._waiters:
        assert time.monotonic() < deadline, "no thread started waiting"
        time.sleep(0.001)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; the list gets its result or the exception it raised."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- GuardCondition ------------------------------------------------------------------


def test_guard_condition_trigger_and_reset() -> None:
    guard = GuardCondition()
    assert not guard.triggered()
    guard.trigger()
    assert guard.triggered()
    guard.trigger()
    assert guard.triggered()
    guard.reset()
    assert not guard.triggered()
    assert "GuardCondition" in repr(guard)


def test_exchange_in_use_returns_the_previous_value() -> None:
    guard = GuardCondition()
    assert guard.exchange_in_use(True) is False
    assert guard.exchange_in_use(True) is True
    assert guard.exchange_in_use(False) is True
    assert guard.exchange_in_use(False) is False


def test_wait_reports_a_triggered_guard_condition_and_resets_it() -> None:
    guard = GuardCondition()
    ws = WaitSet()
    ws.add_guard_condition(guard)
    guard.trigger()
    assert ws.wait(0)
    assert ws.guard_conditions == [guard]
    assert not guard.triggered()
    assert not ws.wait(0)
    assert ws.guard_conditions == []


def test_a_guard_condition_woken_from_another_thread() -> None:
    guard = GuardCondition()
    ws = WaitSet()
    ws.add_guard_condition(guard)
    thread, out = in_thread(lambda: ws.wait(10))
    until_waiting(guard)
    start = time.monotonic()
    guard.trigger()
    thread.join(5)
    assert out == [True]
    assert time.monotonic() - start < 1.0
    assert ws.guard_conditions == [guard]


def test_a_guard_condition_belongs_to_one_wait_set() -> None:
    guard = GuardCondition()
    first, second = WaitSet(), WaitSet()
    first.add_guard_condition(guard)
    first.add_guard_condition(guard)  # the same wait set again is fine
    with pytest.raises(GuardConditionInUseError):
        second.add_guard_condition(guard)
    first.clear()
    second.add_guard_condition(guard)
    guard.trigger()
    assert second.wait(0)
    assert second.guard_conditions == [guard]


def test_a_dropped_wait_set_releases_its_guard_conditions() -> None:
    guard = GuardCondition()
    ws = WaitSet()
    ws.add_guard_condition(guard)
    del ws
    gc.collect()
    WaitSet().add_guard_condition(guard)


def test_wait_set_refuses_wrong_types(ctx: Context) -> None:
    ws = WaitSet()
    sub = Subscription("/t", context=ctx)
    with pytest.raises(TypeError):
        ws.add_subscription(GuardCondition())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ws.add_client(sub)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ws.add_server(sub)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ws.add_guard_condition(sub)  # type: ignore[arg-type]


# -- WaitSet with entities -----------------------------------------------------------


def test_wait_lists_exactly_the_ready_entities(ctx: Context) -> None:
    sub_a = Subscription("/a", context=ctx)
    sub_b = Subscription("/b", context=ctx)
    server = ServiceServer("/svc", context=ctx)
    other_server = ServiceServer("/other", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    guard = GuardCondition()
    ws = WaitSet()
    ws.add_subscription(sub_a)
    ws.add_subscription(sub_b)
    ws.add_subscription(sub_a)  # added once only
    ws.add_server(server)
    ws.add_server(other_server)
    ws.add_client(client)
    ws.add_guard_condition(guard)

    assert not ws.wait(0)
    assert (ws.subscriptions, ws.servers, ws.clients, ws.guard_conditions) == ([], [], [], [])

    Publisher("/b", context=ctx).publish("x")
    assert ws.wait(5)
    assert ws.subscriptions == [sub_b]
    assert (ws.servers, ws.clients, ws.guard_conditions) == ([], [], [])
    # Waiting does not take anything: still ready.
    assert ws.wait(0)
    assert ws.subscriptions == [sub_b]
    assert sub_b.get_message() == "x"

    seq = client.send_request("q")
    assert ws.wait(5)
    assert ws.servers == [server]
    assert ws.subscriptions == [] and ws.clients == []
    request = server.get_request()
    assert request is not None
    server.send_response(request.id, "a")
    guard.trigger()
    flush(ctx)
    assert ws.wait(5)
    assert ws.clients == [client]
    assert ws.guard_conditions == [guard]
    assert ws.subscriptions == [] and ws.servers == []
    assert client.get_response(seq) == "a"
    assert not ws.wait(0)


def test_the_ready_lists_are_copies(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    ws = WaitSet()
    ws.add_subscription(sub)
    Publisher("/t", context=ctx).publish("x")
    assert ws.wait(5)
    ws.subscriptions.clear()
    assert ws.subscriptions == [sub]


def test_wait_wakes_when_a_message_arrives_from_another_thread(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    ws = WaitSet()
    ws.add_subscription(sub)
    thread, out = in_thread(lambda: ws.wait(None))
    until_waiting(sub)
    Publisher("/t", context=ctx).publish("x")
    thread.join(5)
    assert out == [True]
    assert ws.subscriptions == [sub]


def test_wait_times_out(ctx: Context) -> None:
    ws = WaitSet()
    ws.add_subscription(Subscription("/t", context=ctx))
    start = time.monotonic()
    assert ws.wait(0.2) is False
    assert 0.15 <= time.monotonic() - start < 2.0


def test_wait_zero_does_not_block(ctx: Context) -> None:
    ws = WaitSet()
    ws.add_subscription(Subscription("/t", context=ctx))
    ws.add_guard_condition(GuardCondition())
    start = time.monotonic()
    for _ in range(100):
        assert ws.wait(0) is False
        assert ws.wait(timedelta(0)) is False
    assert time.monotonic() - start < 0.5


def test_wait_accepts_a_timedelta(ctx: Context) -> None:
    ws = WaitSet()
    ws.add_subscription(Subscription("/t", context=ctx))
    start = time.monotonic()
    assert ws.wait(timedelta(milliseconds=200)) is False
    assert 0.15 <= time.monotonic() - start < 2.0


@pytest.mark.parametrize("timeout", [None, -1, -0.5, timedelta(seconds=-1)])
def test_negative_and_none_wait_forever(timeout: object) -> None:
    guard = GuardCondition()
    ws = WaitSet()
    ws.add_guard_condition(guard)
    thread, out = in_thread(lambda: ws.wait(timeout))  # type: ignore[arg-type]
    until_waiting(guard)
    time.sleep(0.1)  # prove that it does not return on its own
    assert thread.is_alive()
    guard.trigger()
    thread.join(5)
    assert out == [True]


def test_an_empty_wait_set_sleeps_for_the_timeout() -> None:
    ws = WaitSet()
    start = time.monotonic()
    assert ws.wait(0.2) is False
    assert 0.15 <= time.monotonic() - start < 2.0
    start = time.monotonic()
    assert ws.wait(0) is False
    assert time.monotonic() - start < 0.1


def test_clear_and_reuse(ctx: Context) -> None:
    sub_a = Subscription("/a", context=ctx)
    sub_b = Subscription("/b", context=ctx)
    ws = WaitSet()
    ws.add_subscription(sub_a)
    Publisher("/a", context=ctx).publish("x")
    assert ws.wait(5)
    assert ws.subscriptions == [sub_a]
    ws.clear()
    assert ws.subscriptions == []
    assert not ws.wait(0)  # sub_a still has its message, but it is no longer in the set
    ws.add_subscription(sub_b)
    Publisher("/b", context=ctx).publish("y")
    assert ws.wait(5)
    assert ws.subscriptions == [sub_b]


def test_one_wait_set_used_many_times(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    pub = Publisher("/t", context=ctx)
    ws = WaitSet()
    ws.add_subscription(sub)
    for i in range(200):
        pub.publish(str(i))
        assert ws.wait(5)
        assert sub.get_message() == str(i)
    assert not sub._waiters  # every wait detached itself


def test_several_wait_sets_on_one_subscription(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    sets = [WaitSet() for _ in range(3)]
    for ws in sets:
        ws.add_subscription(sub)
    runs = [in_thread(lambda ws=ws: ws.wait(10)) for ws in sets]  # type: ignore[misc]
    deadline = time.monotonic() + 5
    while len(sub._waiters) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    Publisher("/t", context=ctx).publish("x")
    for thread, out in runs:
        thread.join(5)
        assert out == [True]


# -- wait_for_* ----------------------------------------------------------------------


def test_wait_for_message_times_out(ctx: Context) -> None:
    sub = Subscription("/quiet", context=ctx)
    start = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        wait_for_message(sub, timeout=0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 2.0
    assert isinstance(info.value, TimeoutError)
    assert "/quiet" in str(info.value)
    with pytest.raises(WaitTimeoutError):
        wait_for_message_with_info(sub, timeout=timedelta(milliseconds=50))


def test_wait_for_request_times_out(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    start = time.monotonic()
    with pytest.raises(WaitTimeoutError, match="/svc"):
        wait_for_request(server, timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 2.0
    with pytest.raises(WaitTimeoutError):
        wait_for_request_with_info(server, timeout=0)


def test_wait_for_response_times_out(ctx: Context) -> None:
    ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    seq = client.send_request("q")
    start = time.monotonic()
    with pytest.raises(WaitTimeoutError, match=str(seq)):
        wait_for_response(seq, client, timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 2.0
    with pytest.raises(WaitTimeoutError):
        wait_for_response_with_info(seq, client, timeout=0)


def test_wait_for_response_ignores_other_responses(ctx: Context) -> None:
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    s1, s2 = client.send_request("1"), client.send_request("2")
    wait_for_request(server, timeout=5.0)
    r2 = wait_for_request(server, timeout=5.0)
    server.send_response(r2.id, "two")
    flush(ctx)
    with pytest.raises(WaitTimeoutError):
        wait_for_response(s1, client, timeout=0.1)
    assert client.has_response(s2)


def test_wait_for_returns_at_once_when_already_available(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    server = ServiceServer("/svc", context=ctx)
    client = ServiceClient("/svc", context=ctx)
    Publisher("/t", context=ctx).publish("m")
    seq = client.send_request("q")
    flush(ctx)
    start = time.monotonic()
    assert wait_for_message(sub, timeout=0) == "m"
    request = wait_for_request(server, timeout=0)
    assert time.monotonic() - start < 0.1
    server.send_response(request.id, "r")
    flush(ctx)
    start = time.monotonic()
    assert wait_for_response(seq, client, timeout=0) == "r"
    assert time.monotonic() - start < 0.1


def test_wait_for_message_with_none_waits_until_a_message(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    thread, out = in_thread(lambda: wait_for_message(sub, timeout=None))
    until_waiting(sub)
    Publisher("/t", context=ctx).publish("late")
    thread.join(5)
    assert out == ["late"]


def test_wait_for_message_with_negative_timeout_waits(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    thread, out = in_thread(lambda: wait_for_message(sub, timeout=-1))
    until_waiting(sub)
    time.sleep(0.05)  # prove that it does not time out at once
    assert thread.is_alive()
    Publisher("/t", context=ctx).publish("late")
    thread.join(5)
    assert out == ["late"]


@pytest.mark.parametrize("timeout", [math.inf, 1e12, timedelta.max])
def test_a_huge_timeout_means_forever(ctx: Context, timeout: object) -> None:
    """An infinite or astronomically long timeout is a wait forever, not an error."""
    sub = Subscription("/t", context=ctx)
    thread, out = in_thread(lambda: wait_for_message(sub, timeout=timeout))  # type: ignore[arg-type]
    until_waiting_or_done(sub, thread)
    Publisher("/t", context=ctx).publish("late")
    thread.join(5)
    assert out == ["late"], out


def until_waiting_or_done(waitable: Waitable, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 5
    while not waitable._waiters and thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_wait_for_with_bad_timeout_types(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    with pytest.raises(TypeError):
        wait_for_message(sub, timeout="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        wait_for_message(sub, timeout=math.nan)


def test_concurrent_waiters_each_get_distinct_messages(ctx: Context) -> None:
    sub = Subscription("/t", context=ctx)
    runs = [in_thread(lambda: [wait_for_message(sub, 5.0) for _ in range(50)]) for _ in range(4)]
    pub = Publisher("/t", context=ctx)
    for i in range(200):
        pub.publish(str(i))
    got: list[str] = []
    for thread, out in runs:
        thread.join(10)
        assert len(out) == 1 and isinstance(out[0], list), out
        got.extend(out[0])
    assert sorted(got, key=int) == [str(i) for i in range(200)]


# -- no busy loops -------------------------------------------------------------------


def test_a_blocked_wait_uses_no_cpu(ctx: Context) -> None:
    """Blocked for 1 s in wait_for_message: the waiting thread, and the whole
    process (polling thread included), stay essentially idle."""
    sub = Subscription("/idle", context=ctx)
    ws = WaitSet()
    ws.add_guard_condition(GuardCondition())
    process_before = time.process_time()
    thread_before = time.thread_time()
    wall_before = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        wait_for_message(sub, timeout=0.6)
    assert ws.wait(0.4) is False
    wall = time.monotonic() - wall_before
    thread_cpu = time.thread_time() - thread_before
    process_cpu = time.process_time() - process_before
    assert wall >= 0.9
    assert thread_cpu < 0.05, f"waiting thread used {thread_cpu:.3f} s CPU in {wall:.2f} s"
    assert process_cpu < 0.2, f"process used {process_cpu:.3f} s CPU in {wall:.2f} s"
