"""The context lifecycle: init, shutdown, the global context, several contexts, and
what happens to everything once a context is shut down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import emailmw
from emailmw import (
    Context,
    ContextError,
    ContextState,
    GuardCondition,
    Options,
    Publisher,
    ServiceClient,
    ServiceRequestId,
    ServiceServer,
    Subscription,
    WaitSet,
    wait_for_message,
    wait_for_message_with_info,
    wait_for_request,
    wait_for_request_with_info,
    wait_for_response,
    wait_for_response_with_info,
)
from emailmw.waitable import Waitable

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def no_global() -> Iterator[None]:
    """Make sure the global context is down before and after the test."""
    emailmw.shutdown()
    yield
    emailmw.shutdown()


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def until_waiting(waitable: Waitable) -> None:
    until(lambda: bool(waitable._waiters))


# -- the global context --------------------------------------------------------------


def test_init_and_shutdown(no_global: None) -> None:
    ctx = emailmw.init(Options(intraprocess=True))
    assert isinstance(ctx, Context)
    assert ctx.ok
    assert ctx.state is ContextState.RUNNING
    assert poll_threads() == 1
    assert emailmw.shutdown() is True
    assert poll_threads() == 0
    assert emailmw.shutdown() is False
    assert not ctx.ok
    assert ctx.state is ContextState.SHUT_DOWN
    assert emailmw.shutdown() is False


def test_shutdown_without_init(no_global: None) -> None:
    assert emailmw.shutdown() is False


def test_stats_without_any_init() -> None:
    import emailmw.context as context_module

    saved = context_module._global_context
    context_module._global_context = None
    try:
        with pytest.raises(ContextError):
            emailmw.stats()
        with pytest.raises(ContextError):
            Publisher("/t")
    finally:
        context_module._global_context = saved


def test_init_twice_is_refused(no_global: None) -> None:
    first = emailmw.init(Options(intraprocess=True))
    with pytest.raises(ContextError, match="already initialized"):
        emailmw.init(Options(intraprocess=True))
    assert first.ok  # the first context is untouched
    emailmw.shutdown()


def test_init_again_after_shutdown(no_global: None) -> None:
    first = emailmw.init(Options(intraprocess=True))
    emailmw.shutdown()
    second = emailmw.init(Options(intraprocess=True))
    assert second is not first
    sub = Subscription("/t")
    Publisher("/t").publish("again")
    assert wait_for_message(sub, timeout=5.0) == "again"


def test_entities_without_init(no_global: None) -> None:
    for make in (
        lambda: Publisher("/t"),
        lambda: Subscription("/t"),
        lambda: ServiceClient("/s"),
        lambda: ServiceServer("/s"),
    ):
        with pytest.raises(ContextError):
            make()


def test_entities_with_a_context_not_initialized() -> None:
    ctx = Context(Options(intraprocess=True))
    assert ctx.state is ContextState.CREATED
    with pytest.raises(ContextError, match="not initialized"):
        Publisher("/t", context=ctx)
    with pytest.raises(ContextError, match="not initialized"):
        Subscription("/t", context=ctx)
    with pytest.raises(ContextError, match="not initialized"):
        ServiceClient("/s", context=ctx)
    assert ctx.shutdown() is False
    with pytest.raises(ContextError):
        ctx.init()


def test_init_from_a_path(no_global: None, tmp_path: Path) -> None:
    path = tmp_path / "email.yml"
    path.write_text("email:\n  intraprocess: true\n  queue-depth: 5\n", encoding="utf-8")
    ctx = emailmw.init(path)
    assert ctx.options.queue_depth == 5
    emailmw.shutdown()
    ctx = emailmw.init(str(path))
    assert ctx.options.intraprocess
    emailmw.shutdown()


def test_init_with_none_finds_the_config_file(
    no_global: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "custom.yml"
    path.write_text("email:\n  intraprocess: true\n  queue-depth: 9\n", encoding="utf-8")
    monkeypatch.setenv("EMAIL_CONFIG_FILE", str(path))
    ctx = emailmw.init()
    assert ctx.options.queue_depth == 9
    emailmw.shutdown()


def test_init_with_a_bad_config_leaves_nothing_initialized(no_global: None, tmp_path: Path) -> None:
    path = tmp_path / "email.yml"
    path.write_text("email:\n  intraprocess: maybe\n", encoding="utf-8")
    with pytest.raises(emailmw.ConfigError):
        emailmw.init(path)
    with pytest.raises(ContextError):
        Publisher("/t")
    emailmw.init(Options(intraprocess=True))


def test_bad_options_type() -> None:
    with pytest.raises(TypeError):
        Context(42)  # type: ignore[arg-type]


def test_global_stats(global_ctx: Context) -> None:
    Publisher("/t").publish("x")
    assert emailmw.stats().sent == 1
    assert global_ctx.stats().sent == 1


# -- explicit contexts ---------------------------------------------------------------


def test_context_as_a_context_manager() -> None:
    with Context(Options(intraprocess=True)) as ctx:
        assert ctx.ok
        sub = Subscription("/t", context=ctx)
        Publisher("/t", context=ctx).publish("x")
        assert wait_for_message(sub, timeout=5.0) == "x"
    assert ctx.state is ContextState.SHUT_DOWN
    with pytest.raises(ContextError), ctx:
        pass


def test_context_manager_on_a_running_context() -> None:
    ctx = Context(Options(intraprocess=True)).init()
    with ctx as same:
        assert same is ctx
    assert not ctx.ok


def test_context_manager_shuts_down_on_error() -> None:
    with pytest.raises(RuntimeError), Context(Options(intraprocess=True)) as ctx:
        raise RuntimeError("boom")
    assert not ctx.ok


def test_context_properties(ctx: Context) -> None:
    assert ctx.options.intraprocess
    assert "intraprocess" in repr(ctx)
    assert "running" in repr(ctx)
    assert ctx.stats() == emailmw.Stats(dropped=ctx.stats().dropped)
    assert set(ctx.stats().dropped) == {r.value for r in emailmw.DropReason}


def test_two_independent_contexts(ctx: Context) -> None:
    with Context(Options(intraprocess=True)) as other:
        here = Subscription("/shared", context=ctx)
        there = Subscription("/shared", context=other)
        Publisher("/shared", context=ctx).publish("from ctx")
        assert wait_for_message(here, timeout=5.0) == "from ctx"
        with pytest.raises(emailmw.WaitTimeoutError):
            wait_for_message(there, timeout=0.1)
        Publisher("/shared", context=other).publish("from other")
        assert wait_for_message(there, timeout=5.0) == "from other"
        assert not here.has_message()
        assert ctx.stats().sent == 1
        assert other.stats().sent == 1
    # Shutting one down leaves the other working.
    assert ctx.ok
    Publisher("/shared", context=ctx).publish("still here")
    assert wait_for_message(here, timeout=5.0) == "still here"


def test_explicit_context_and_global_context_are_separate(
    ctx: Context, global_ctx: Context
) -> None:
    local = Subscription("/t", context=ctx)
    glob = Subscription("/t")
    Publisher("/t").publish("global")
    assert wait_for_message(glob, timeout=5.0) == "global"
    assert not local.has_message()


def test_service_across_contexts_is_not_connected(ctx: Context) -> None:
    with Context(Options(intraprocess=True)) as other:
        server = ServiceServer("/svc", context=other)
        client = ServiceClient("/svc", context=ctx)
        client.send_request("q")
        with pytest.raises(emailmw.WaitTimeoutError):
            wait_for_request(server, timeout=0.1)


# -- after shutdown ------------------------------------------------------------------


def test_every_entity_call_after_shutdown_raises() -> None:
    ctx = Context(Options(intraprocess=True)).init()
    sub = Subscription("/t", context=ctx)
    pub = Publisher("/t", context=ctx)
    server = ServiceServer("/s", context=ctx)
    client = ServiceClient("/s", context=ctx)
    seq = client.send_request("q")
    request = wait_for_request(server, timeout=5.0)
    pub.publish("m")
    assert wait_for_message(sub, timeout=5.0) == "m"
    pub.publish("waiting")  # left in the queue
    ws = WaitSet()
    ws.add_subscription(sub)

    start = time.monotonic()
    assert ctx.shutdown() is True
    assert time.monotonic() - start < 1.0
    assert ctx.shutdown() is False

    calls: list[Callable[[], object]] = [
        lambda: pub.publish("x"),
        sub.get_message,
        sub.get_message_with_info,
        sub.has_message,
        lambda: client.send_request("x"),
        lambda: client.get_response(seq),
        lambda: client.get_response_with_info(None),
        client.has_response,
        server.get_request,
        server.get_request_with_info,
        server.has_request,
        lambda: server.send_response(request.id, "x"),
        lambda: server.send_response(ServiceRequestId(99, client.gid), "x"),
        lambda: wait_for_message(sub, timeout=0),
        lambda: wait_for_message(sub, timeout=1),
        lambda: wait_for_message_with_info(sub, timeout=None),
        lambda: wait_for_request(server, timeout=1),
        lambda: wait_for_request_with_info(server, timeout=None),
        lambda: wait_for_response(seq, client, timeout=1),
        lambda: wait_for_response_with_info(seq, client, timeout=None),
        lambda: ws.wait(1),
        lambda: ws.wait(None),
        lambda: Publisher("/t", context=ctx),
        lambda: Subscription("/t", context=ctx),
        lambda: ServiceClient("/s", context=ctx),
        lambda: ServiceServer("/s", context=ctx),
        ctx.init,
    ]
    for i, call in enumerate(calls):
        start = time.monotonic()
        with pytest.raises(ContextError):
            call()
        assert time.monotonic() - start < 0.5, f"call {i} blocked"
    sub.close()  # closing is always allowed
    client.close()
    server.close()
    assert ctx.stats().sent >= 2  # the counters stay readable


def poll_threads() -> int:
    """How many polling threads are alive in this process."""
    return sum(1 for t in threading.enumerate() if t.name == "emailmw-poll")


def test_shutdown_stops_the_polling_thread() -> None:
    before = poll_threads()
    ctx = Context(Options(intraprocess=True)).init()
    assert poll_threads() == before + 1
    ctx.shutdown()
    assert poll_threads() == before  # gone when shutdown() returns, not later


def test_shutdown_wakes_every_waiter_promptly() -> None:
    ctx = Context(Options(intraprocess=True)).init()
    sub = Subscription("/t", context=ctx)
    server = ServiceServer("/s", context=ctx)
    client = ServiceClient("/s", context=ctx)
    seq = client.send_request("never answered")
    assert wait_for_request(server, timeout=5.0) is not None

    ws_sub = WaitSet()
    ws_sub.add_subscription(Subscription("/t", context=ctx))
    guard = GuardCondition()
    ws_guard = WaitSet(context=ctx)
    ws_guard.add_guard_condition(guard)
    ws_empty = WaitSet(context=ctx)

    runs = [
        (sub, in_thread(lambda: wait_for_message(sub, timeout=None))),
        (sub, in_thread(lambda: wait_for_message_with_info(sub, timeout=-1))),
        (server, in_thread(lambda: wait_for_request(server, timeout=None))),
        (client, in_thread(lambda: wait_for_response(seq, client, timeout=None))),
        (None, in_thread(lambda: ws_sub.wait(None))),
        (guard, in_thread(lambda: ws_guard.wait(None))),
        (None, in_thread(lambda: ws_empty.wait(None))),
    ]
    for waitable, _ in runs:
        if waitable is not None:
            until_waiting(waitable)
    until(lambda: len(ws_sub._subscriptions[0]._waiters) == 1)
    until(lambda: len(ctx._waiters) == 2)  # ws_guard and ws_empty

    start = time.monotonic()
    assert ctx.shutdown() is True
    shutdown_time = time.monotonic() - start
    for _, (thread, _) in runs:
        thread.join(max(0.0, 1.0 - (time.monotonic() - start)))
    woken_time = time.monotonic() - start
    assert shutdown_time < 1.0
    for i, (_, (thread, out)) in enumerate(runs):
        assert not thread.is_alive(), f"waiter {i} still blocked after shutdown"
        assert len(out) == 1 and isinstance(out[0], ContextError), (i, out)
    assert woken_time < 1.0


def test_a_wait_set_without_entities_or_context_ignores_other_contexts() -> None:
    """Only a WaitSet's own context (or its entities') ends its wait."""
    guard = GuardCondition()
    ws = WaitSet()
    ws.add_guard_condition(guard)
    with Context(Options(intraprocess=True)):
        pass
    assert ws.wait(0) is False
    guard.trigger()
    assert ws.wait(0) is True


def test_shutdown_from_several_threads_at_once() -> None:
    ctx = Context(Options(intraprocess=True)).init()
    barrier = threading.Barrier(8)
    results: list[bool] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        result = ctx.shutdown()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(results) == [False] * 7 + [True]


def test_publish_racing_shutdown_raises_context_error_or_succeeds() -> None:
    ctx = Context(Options(intraprocess=True)).init()
    pub = Publisher("/t", context=ctx)
    Subscription("/t", context=ctx)
    stop = threading.Event()
    unexpected: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                pub.publish("x")
            except ContextError:
                return
            except BaseException as exc:
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    until(lambda: ctx.stats().sent >= 100)
    ctx.shutdown()
    for t in threads:
        t.join(5)
    stop.set()
    assert not unexpected
    assert all(not t.is_alive() for t in threads)


def test_a_wait_set_of_a_shut_down_context_raises_even_without_blocking() -> None:
    ctx = Context(Options(intraprocess=True)).init()
    ws_guard = WaitSet(context=ctx)
    ws_guard.add_guard_condition(GuardCondition())
    ws_empty = WaitSet(context=ctx)
    ctx.shutdown()
    for ws in (ws_guard, ws_empty):
        for timeout in (0, 0.01, None):
            with pytest.raises(ContextError):
                ws.wait(timeout)
