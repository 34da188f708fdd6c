"""The executor: spin / spin_once / timeout / shutdown, threads, idle CPU, emailmw.spin.

Semantics follow rclpy's executors: ``spin`` runs callbacks until the executor
or the context shuts down (or the timeout), ``spin_once`` runs at most one, the
callbacks of one entity never overlap, and with ``threads > 1`` the callbacks of
different entities run in parallel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from transports import Transport, transport_fixture  # noqa: F401  ("transport")

import emailmw

pytestmark = [pytest.mark.timeout(120)]


class Spins:
    """Runs ``executor.spin`` (or any call) in background threads; joins them after."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, target: Callable[[], object], name: str = "test-spin") -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread


@pytest.fixture
def spins() -> Iterator[Spins]:
    spins = Spins()
    yield spins
    for thread in spins.threads:
        thread.join(timeout=10.0)
        assert not thread.is_alive(), f"{thread.name} is still spinning"


def publish_and_wait(
    pub: emailmw.Publisher[str], witness: emailmw.Subscription[str], text: str, wait: float
) -> None:
    """Publish ``text`` and wait until it arrived (``witness`` is a plain subscription)."""
    pub.publish(text)
    assert emailmw.wait_for_message(witness, wait) == text


# -- spin_once ------------------------------------------------------------------------


def test_spin_once_runs_exactly_one_callback(transport: Transport) -> None:
    got: list[str] = []
    sub = emailmw.Subscription("/once", callback=got.append, context=transport.ctx)
    witness = emailmw.Subscription("/once", context=transport.ctx)
    pub = emailmw.Publisher("/once", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    assert executor.spin_once(0) is False  # nothing yet, and it does not wait
    publish_and_wait(pub, witness, "a", transport.wait)
    publish_and_wait(pub, witness, "b", transport.wait)
    assert executor.spin_once(0) is True
    assert got == ["a"]
    assert executor.spin_once(transport.wait) is True
    assert got == ["a", "b"]
    assert executor.spin_once(0.2) is False


def test_spin_once_waits_for_a_message(transport: Transport, spins: Spins) -> None:
    got: list[str] = []
    sub = emailmw.Subscription("/wait", callback=got.append, context=transport.ctx)
    pub = emailmw.Publisher("/wait", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    results: list[bool] = []
    thread = spins.start(lambda: results.append(executor.spin_once(transport.wait)))
    time.sleep(0.1)  # let it block first
    pub.publish("late")
    thread.join(timeout=transport.wait + 5)
    assert results == [True] and got == ["late"]


def test_a_raising_callback_still_counts_as_run(ctx: emailmw.Context) -> None:
    def callback(message: str) -> None:
        raise RuntimeError("on purpose")

    sub = emailmw.Subscription("/r", callback=callback, context=ctx)
    executor = emailmw.Executor(context=ctx)
    executor.add(sub)
    emailmw.Publisher("/r", context=ctx).publish("x")
    assert executor.spin_once(1.0) is True
    assert ctx.stats().callback_errors == 1


# -- spin and its ends ----------------------------------------------------------------


def test_spin_returns_at_its_timeout(ctx: emailmw.Context) -> None:
    executor = emailmw.Executor(context=ctx)
    executor.add(emailmw.Subscription("/t", callback=print, context=ctx))
    start = time.monotonic()
    executor.spin(timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 5.0


def test_spin_runs_until_shutdown_then_returns(transport: Transport, spins: Spins) -> None:
    got: list[str] = []
    sub = emailmw.Subscription("/s", callback=got.append, context=transport.ctx)
    pub = emailmw.Publisher("/s", context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx)
    executor.add(sub)
    thread = spins.start(executor.spin)
    for text in ("1", "2", "3"):
        pub.publish(text)
    deadline = time.monotonic() + transport.wait
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == ["1", "2", "3"]
    assert thread.is_alive()
    assert executor.shutdown(timeout=5.0) is True
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert executor.entities == []
    executor.spin()  # after shutdown: returns at once
    assert executor.spin_once() is False


def test_spin_ends_when_the_context_shuts_down(transport: Transport, spins: Spins) -> None:
    sub = emailmw.Subscription("/s", callback=print, context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx, threads=2)
    executor.add(sub)
    thread = spins.start(executor.spin)
    once = spins.start(lambda: emailmw.Executor(context=transport.ctx).spin_once(), "once")
    time.sleep(0.2)
    assert thread.is_alive() and once.is_alive()
    transport.ctx.shutdown()
    thread.join(timeout=5.0)
    once.join(timeout=5.0)
    assert not thread.is_alive() and not once.is_alive()
    assert spins.errors == []


def test_shutdown_waits_for_the_running_callback(ctx: emailmw.Context, spins: Spins) -> None:
    entered, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow(message: str) -> None:
        entered.set()
        release.wait(10.0)
        finished.append(message)

    sub = emailmw.Subscription("/slow", callback=slow, context=ctx)
    executor = emailmw.Executor(context=ctx)
    executor.add(sub)
    spins.start(executor.spin)
    emailmw.Publisher("/slow", context=ctx).publish("x")
    assert entered.wait(5.0)
    assert executor.shutdown(timeout=0.2) is False  # still running
    release.set()
    assert executor.shutdown(timeout=5.0) is True
    assert finished == ["x"]


def test_a_callback_can_shut_its_executor_down(ctx: emailmw.Context) -> None:
    executor = emailmw.Executor(context=ctx)
    results: list[bool] = []
    sub = emailmw.Subscription(
        "/stop", callback=lambda m: results.append(executor.shutdown()), context=ctx
    )
    executor.add(sub)
    emailmw.Publisher("/stop", context=ctx).publish("stop")
    executor.spin(timeout=10.0)  # returns because of the shutdown, not the timeout
    assert results == [True]


def test_a_base_exception_ends_the_spin_and_is_raised(ctx: emailmw.Context) -> None:
    class Stop(BaseException):
        pass

    def callback(message: str) -> None:
        raise Stop

    for threads in (1, 2):
        sub = emailmw.Subscription(f"/stop{threads}", callback=callback, context=ctx)
        executor = emailmw.Executor(context=ctx, threads=threads)
        executor.add(sub)
        emailmw.Publisher(f"/stop{threads}", context=ctx).publish("x")
        with pytest.raises(Stop):
            executor.spin(timeout=10.0)
        assert ctx.stats().callback_errors == 0


def test_spinning_twice_at_once_is_refused(ctx: emailmw.Context, spins: Spins) -> None:
    executor = emailmw.Executor(context=ctx)
    spins.start(executor.spin)
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="spinning already"):
        executor.spin_once(0)
    executor.shutdown()


# -- threads --------------------------------------------------------------------------


def test_two_threads_run_two_slow_callbacks_at_once(transport: Transport, spins: Spins) -> None:
    """Each callback waits at a barrier for the other: only concurrency passes it."""
    barrier = threading.Barrier(2)
    passed: list[str] = []

    def slow(message: str) -> None:
        barrier.wait(timeout=transport.wait)
        passed.append(message)

    a = emailmw.Subscription("/a", callback=slow, context=transport.ctx)
    b = emailmw.Subscription("/b", callback=slow, context=transport.ctx)
    executor = emailmw.Executor(context=transport.ctx, threads=2)
    executor.add(a)
    executor.add(b)
    spins.start(executor.spin)
    emailmw.Publisher("/a", context=transport.ctx).publish("a")
    emailmw.Publisher("/b", context=transport.ctx).publish("b")
    deadline = time.monotonic() + transport.wait + 5
    while len(passed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    executor.shutdown(timeout=5.0)
    assert sorted(passed) == ["a", "b"]
    assert transport.ctx.stats().callback_errors == 0


def test_one_thread_runs_them_one_after_the_other(ctx: emailmw.Context) -> None:
    """The same two callbacks with threads=1: the barrier breaks (counted errors)."""
    barrier = threading.Barrier(2)

    def slow(message: str) -> None:
        barrier.wait(timeout=0.3)

    executor = emailmw.Executor(context=ctx)
    for topic in ("/a", "/b"):
        executor.add(emailmw.Subscription(topic, callback=slow, context=ctx))
        emailmw.Publisher(topic, context=ctx).publish("x")
    assert executor.spin_once(1.0) and executor.spin_once(1.0)
    assert ctx.stats().callback_errors == 2  # BrokenBarrierError, twice


def test_one_entitys_callbacks_never_overlap_and_keep_order(ctx: emailmw.Context) -> None:
    active = 0
    most = 0
    got: list[int] = []
    lock = threading.Lock()

    def callback(message: str) -> None:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.005)
        got.append(int(message))
        with lock:
            active -= 1

    sub = emailmw.Subscription("/serial", callback=callback, depth=100, context=ctx)
    executor = emailmw.Executor(context=ctx, threads=4)
    executor.add(sub)
    pub = emailmw.Publisher("/serial", context=ctx)
    for i in range(30):
        pub.publish(str(i))
    thread = threading.Thread(target=executor.spin, kwargs={"timeout": 30.0})
    thread.start()
    deadline = time.monotonic() + 20
    while len(got) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    executor.shutdown(timeout=5.0)
    thread.join(timeout=5.0)
    assert got == list(range(30))
    assert most == 1


def test_an_idle_spinning_executor_uses_no_cpu(ctx: emailmw.Context, spins: Spins) -> None:
    executor = emailmw.Executor(context=ctx, threads=2)
    for topic in ("/idle-a", "/idle-b"):
        executor.add(emailmw.Subscription(topic, callback=print, context=ctx))
    spins.start(executor.spin)
    time.sleep(0.1)  # let it settle into its wait
    before = time.process_time()
    time.sleep(1.0)
    used = time.process_time() - before
    executor.shutdown()
    assert used < 0.05, f"an idle executor used {used:.3f} s of CPU in 1 s"


# -- adding and removing --------------------------------------------------------------


def test_add_refuses_what_it_cannot_run(ctx: emailmw.Context) -> None:
    executor = emailmw.Executor(context=ctx)
    with pytest.raises(TypeError, match="Publisher"):
        executor.add(emailmw.Publisher("/p", context=ctx))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no callback"):
        executor.add(emailmw.Subscription("/p", context=ctx))
    with pytest.raises(ValueError, match="no handler"):
        executor.add(emailmw.ServiceServer("/p", context=ctx))
    closed = emailmw.Subscription("/p", callback=print, context=ctx)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        executor.add(closed)
    with emailmw.Context(emailmw.Options(intraprocess=True)) as other:
        with pytest.raises(ValueError, match="another context"):
            executor.add(emailmw.Subscription("/p", callback=print, context=other))
    with pytest.raises(ValueError, match="threads"):
        emailmw.Executor(context=ctx, threads=0)


def test_an_entity_is_in_one_executor_at_a_time(ctx: emailmw.Context) -> None:
    got: list[str] = []
    sub = emailmw.Subscription("/one", callback=got.append, context=ctx)
    first, second = emailmw.Executor(context=ctx), emailmw.Executor(context=ctx)
    first.add(sub)
    first.add(sub)  # twice: a no-op
    assert first.entities == [sub]
    with pytest.raises(ValueError, match="another executor"):
        second.add(sub)
    first.remove(sub)
    first.remove(sub)  # a no-op
    second.add(sub)
    emailmw.Publisher("/one", context=ctx).publish("x")
    assert first.spin_once(0) is False
    assert second.spin_once(1.0) is True
    assert got == ["x"]


def test_an_entity_added_while_spinning_is_served(ctx: emailmw.Context, spins: Spins) -> None:
    got: list[str] = []
    executor = emailmw.Executor(context=ctx)
    spins.start(executor.spin)
    time.sleep(0.1)
    sub = emailmw.Subscription("/late", callback=got.append, context=ctx)
    executor.add(sub)
    emailmw.Publisher("/late", context=ctx).publish("x")
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    executor.shutdown()
    assert got == ["x"]


# -- emailmw.spin ----------------------------------------------------------------------


def test_emailmw_spin_runs_every_callback_entity_of_the_global_context(
    global_ctx: emailmw.Context, spins: Spins
) -> None:
    got: list[str] = []
    done = threading.Event()
    sub = emailmw.Subscription("/g", callback=got.append)
    server = emailmw.ServiceServer("/upper", handler=str.upper)
    mine: list[str] = []
    own = emailmw.Executor()
    in_own = emailmw.Subscription("/g", callback=mine.append)
    own.add(in_own)  # in an executor of its own: not spun by emailmw.spin
    thread = spins.start(emailmw.spin)
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="spinning already"):
        emailmw.spin(0)
    # made while spinning: served from then on
    late = emailmw.Subscription("/late", callback=lambda m: done.set())
    emailmw.Publisher("/g").publish("x")
    assert emailmw.ServiceClient("/upper").call("abc", timeout=5.0) == "ABC"
    emailmw.Publisher("/late").publish("y")
    assert done.wait(5.0)
    assert got == ["x"]
    assert mine == [] and in_own.has_message()
    assert (sub, server, late) and thread.is_alive()
    emailmw.shutdown()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert spins.errors == []


def test_emailmw_spin_returns_at_its_timeout(global_ctx: emailmw.Context) -> None:
    start = time.monotonic()
    emailmw.spin(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 5.0


def test_emailmw_spin_after_shutdown_returns_at_once(global_ctx: emailmw.Context) -> None:
    emailmw.Subscription("/g", callback=print)
    emailmw.shutdown()
    start = time.monotonic()
    emailmw.spin()  # no timeout: it must not wait
    assert time.monotonic() - start < 1.0
