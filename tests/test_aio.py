"""asyncio: ``apublish``, ``aget``, ``async for``, ``acall``, ``aget_request`` and
``async with Context``, on both transports.

Each test runs its coroutine with ``asyncio.run`` on a fresh loop. Waiting holds
no thread (a :class:`~emailmw.aio.LoopWaiter` is attached to the entity), the
loop is never blocked, and a cancelled wait takes nothing and leaves nothing
attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

import emailmw
from emailmw.aio import LoopWaiter
from emailmw.devserver import DevServer
from emailmw.waitable import Waitable

pytestmark = [pytest.mark.timeout(120)]

T = TypeVar("T")


class Point(BaseModel):
    x: float
    y: float
    label: str = ""


@dataclasses.dataclass
class Bench:
    options: emailmw.Options
    ctx: emailmw.Context
    wait: float  # how long a message may take to arrive


@contextlib.contextmanager
def open_bench(kind: str, request: pytest.FixtureRequest) -> Iterator[Bench]:
    if kind == "intraprocess":
        options = emailmw.Options(intraprocess=True)
        with emailmw.Context(options) as ctx:
            yield Bench(options, ctx, 5.0)
        return
    server: DevServer = request.getfixturevalue("dev_server")
    folder, address = server.new_mailbox("alice")
    options = emailmw.Options.from_dict(server.config("alice", mailbox=folder, to=address))
    with emailmw.Context(options) as ctx:
        yield Bench(options, ctx, 20.0)


@pytest.fixture(
    params=[
        pytest.param("intraprocess", id="intraprocess"),
        pytest.param("email", id="email", marks=pytest.mark.mailstack),
    ]
)
def bench(request: pytest.FixtureRequest) -> Iterator[Bench]:
    with open_bench(request.param, request) as b:
        yield b


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run ``coroutine`` on a fresh event loop, failing after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


async def until_attached(waitable: Waitable, count: int = 1) -> None:
    """Let the other tasks run until ``count`` waiters are attached to ``waitable``."""
    for _ in range(2_000):
        if len(waitable._waiters) >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{len(waitable._waiters)} waiters attached, expected {count}")


async def eventually(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)


# -- publish / subscribe ---------------------------------------------------------------


def test_apublish_then_aget_round_trip(bench: Bench) -> None:
    sub = emailmw.Subscription("/chatter", context=bench.ctx)
    pub = emailmw.Publisher("/chatter", context=bench.ctx)

    async def main() -> None:
        await pub.apublish("hello", {"Trace-Id": "t-1"})
        message, info = await sub.aget_with_info(bench.wait)
        assert message == "hello"
        assert dict(info.headers) == {"Trace-Id": "t-1"}
        assert info.publisher_gid == pub.gid
        await pub.apublish("again")
        assert await sub.aget(bench.wait) == "again"

    run(main())
    assert sub._waiters == []


@pytest.mark.parametrize(
    ("message_type", "value"),
    [
        (Point, Point(x=1.5, y=-2.0, label="café ☕")),
        (bytes, bytes(range(256))),
        (list[int], [1, 2, 3]),
    ],
)
def test_aget_returns_the_declared_type(bench: Bench, message_type: Any, value: Any) -> None:
    sub = emailmw.Subscription("/typed", message_type, context=bench.ctx)
    pub = emailmw.Publisher("/typed", message_type, context=bench.ctx)

    async def main() -> Any:
        await pub.apublish(value)
        return await sub.aget(bench.wait)

    got = run(main())
    assert got == value
    assert type(got) is type(value)


def test_apublish_raises_what_publish_raises(bench: Bench) -> None:
    pub = emailmw.Publisher("/typed", Point, context=bench.ctx)
    with pytest.raises(emailmw.InvalidMessageError):
        run(pub.apublish("not a point"))  # type: ignore[arg-type]


def test_aget_times_out(bench: Bench) -> None:
    sub = emailmw.Subscription("/silence", context=bench.ctx)
    started = time.monotonic()
    with pytest.raises(emailmw.WaitTimeoutError, match="/silence"):
        run(sub.aget(0.2))
    assert time.monotonic() - started >= 0.2
    with pytest.raises(emailmw.WaitTimeoutError):
        run(sub.aget(0))
    assert sub._waiters == []


def test_aget_raises_when_the_context_shuts_down(bench: Bench) -> None:
    sub = emailmw.Subscription("/chatter", context=bench.ctx)

    async def main() -> None:
        task = asyncio.create_task(sub.aget())
        await until_attached(sub)
        await asyncio.to_thread(bench.ctx.shutdown)
        with pytest.raises(emailmw.ContextError):
            await task

    run(main(), timeout=10)
    assert sub._waiters == []


def test_async_for_yields_messages_and_ends_on_close(bench: Bench) -> None:
    sub = emailmw.Subscription("/stream", context=bench.ctx)
    pub = emailmw.Publisher("/stream", context=bench.ctx)

    async def main() -> list[str]:
        got: list[str] = []

        async def consume() -> None:
            async for message in sub:
                got.append(message)
                if len(got) == 3:
                    sub.close()  # the messages queued already still come, then it ends

        consumer = asyncio.create_task(consume())
        await until_attached(sub)
        for i in range(5):
            await pub.apublish(f"m{i}")
        await eventually(lambda: len(got) >= 3, bench.wait, "three messages")
        await consumer
        return got

    got = run(main())
    assert got[:3] == ["m0", "m1", "m2"]
    assert got == [f"m{i}" for i in range(len(got))]
    assert sub._waiters == []


def test_async_for_ends_when_closed_from_another_thread_while_waiting(bench: Bench) -> None:
    sub = emailmw.Subscription("/stream", context=bench.ctx)

    async def main() -> list[str]:
        consumer = asyncio.create_task(_collect(sub))
        await until_attached(sub)
        await asyncio.to_thread(sub.close)
        return await consumer

    assert run(main(), timeout=10) == []
    assert sub._waiters == []


def test_async_for_ends_when_the_context_shuts_down(bench: Bench) -> None:
    sub = emailmw.Subscription("/stream", context=bench.ctx)
    pub = emailmw.Publisher("/stream", context=bench.ctx)

    got: list[str] = []

    async def consume() -> None:
        async for message in sub:
            got.append(message)

    async def main() -> None:
        consumer = asyncio.create_task(consume())
        await until_attached(sub)
        await pub.apublish("before shutdown")
        await eventually(lambda: got == ["before shutdown"], bench.wait, "the message taken")
        await until_attached(sub)  # waiting for the next one
        await asyncio.to_thread(bench.ctx.shutdown)
        await consumer

    run(main(), timeout=30)
    assert got == ["before shutdown"]
    assert sub._waiters == []


async def _collect(sub: emailmw.Subscription[str]) -> list[str]:
    return [message async for message in sub]


def test_the_loop_keeps_running_while_aget_waits(bench: Bench) -> None:
    sub = emailmw.Subscription("/silence", context=bench.ctx)

    async def main() -> tuple[int, float]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(emailmw.WaitTimeoutError):
            await sub.aget(1.0)
        waited = time.monotonic() - started
        stop.set()
        await ticking
        return ticks, waited

    ticks, waited = run(main())
    assert waited >= 1.0
    # A blocked loop would tick at most once; a free one about 100 times (10 ms each).
    assert ticks >= 20, f"only {ticks} ticks of 10 ms during a 1 s aget"


def test_a_cancelled_aget_takes_nothing_and_leaves_no_waiter(bench: Bench) -> None:
    sub = emailmw.Subscription("/cancel", context=bench.ctx)
    pub = emailmw.Publisher("/cancel", context=bench.ctx)

    async def main() -> str:
        waiting = asyncio.create_task(sub.aget())
        await until_attached(sub)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert sub._waiters == []
        await pub.apublish("after the cancel")
        return await sub.aget(bench.wait)

    assert run(main()) == "after the cancel"
    assert sub._waiters == []


def test_a_cancel_racing_with_the_wake_up_loses_nothing(bench: Bench) -> None:
    """The message is queued and the waiter set, but the task is cancelled before it
    runs again: the message stays queued."""
    sub = emailmw.Subscription("/cancel", context=bench.ctx)
    pub = emailmw.Publisher("/cancel", context=bench.ctx)

    async def main() -> str:
        waiting = asyncio.create_task(sub.aget())
        await until_attached(sub)
        pub.publish("raced")  # blocking publish on the loop's thread: no await in between
        if bench.options.intraprocess:
            assert sub.has_message()  # dispatched inline, the waiter was set
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert sub._waiters == []
        return await sub.aget(bench.wait)

    assert run(main()) == "raced"


def test_many_awaiters_hold_no_thread_each(bench: Bench) -> None:
    count = 100
    subs = [emailmw.Subscription(f"/many/{i}", context=bench.ctx) for i in range(count)]
    pub = emailmw.Publisher("/many/0", context=bench.ctx)
    pubs = [pub] + [emailmw.Publisher(f"/many/{i}", context=bench.ctx) for i in range(1, count)]

    async def main() -> tuple[int, int, list[str]]:
        before = threading.active_count()
        tasks = [asyncio.create_task(sub.aget(bench.wait * 3)) for sub in subs]
        for sub in subs:
            await until_attached(sub)
        during = threading.active_count()
        await asyncio.gather(*(p.apublish(f"to {i}") for i, p in enumerate(pubs)))
        return before, during, list(await asyncio.gather(*tasks))

    before, during, got = run(main(), timeout=90)
    assert during == before, f"{during - before} threads more while {count} tasks wait"
    assert got == [f"to {i}" for i in range(count)]
    assert all(sub._waiters == [] for sub in subs)


# -- services ----------------------------------------------------------------------------


async def _serve_once(server: emailmw.ServiceServer[str, str], wait: float) -> str:
    request, info = await server.aget_request_with_info(wait)
    server.send_response(request.id, request.content.upper())
    return f"{request.content} from {info.client_gid.value}"


def test_acall_with_aget_request_and_send_response(bench: Bench) -> None:
    server = emailmw.ServiceServer("/upper", context=bench.ctx)
    client = emailmw.ServiceClient("/upper", context=bench.ctx)

    async def main() -> tuple[str, str]:
        serving = asyncio.create_task(_serve_once(server, bench.wait))
        response = await client.acall("hello", bench.wait)
        return response, await serving

    response, served = run(main())
    assert response == "HELLO"
    assert served == f"hello from {client.gid.value}"
    assert client._waiters == [] and server._waiters == []
    assert not client._pending


def test_acall_typed_with_aget_request_and_asend_response(bench: Bench) -> None:
    server = emailmw.ServiceServer("/scale", Point, list[float], context=bench.ctx)
    client = emailmw.ServiceClient("/scale", Point, list[float], context=bench.ctx)

    async def serve() -> None:
        request = await server.aget_request(bench.wait)
        point = request.content
        await server.asend_response(request.id, [point.x * 2, point.y * 2])

    async def main() -> list[float]:
        serving = asyncio.create_task(serve())
        response, info = await client.acall_with_info(
            Point(x=1, y=2), bench.wait, additional_headers={"Trace-Id": "s-1"}
        )
        await serving
        assert info.sequence_number == 1
        return response

    assert run(main()) == [2.0, 4.0]


def test_acall_times_out_and_forgets_the_request(bench: Bench) -> None:
    server = emailmw.ServiceServer("/slow", context=bench.ctx)
    client = emailmw.ServiceClient("/slow", context=bench.ctx)

    async def main() -> None:
        with pytest.raises(emailmw.WaitTimeoutError, match="/slow"):
            await client.acall("late", 0.3)
        assert not client._pending
        assert client._waiters == []
        # The answer comes after the timeout: it is dropped, never queued.
        request = await server.aget_request(bench.wait)
        dropped_before = bench.ctx.stats().dropped.get("duplicate", 0)
        await server.asend_response(request.id, "too late")
        await eventually(
            lambda: bench.ctx.stats().dropped.get("duplicate", 0) > dropped_before,
            bench.wait,
            "the late response dropped",
        )
        assert not client.has_response()
        # The client still works.
        serving = asyncio.create_task(_serve_once(server, bench.wait))
        assert await client.acall("on time", bench.wait) == "ON TIME"
        await serving

    run(main())


def test_a_cancelled_acall_forgets_the_request(bench: Bench) -> None:
    server = emailmw.ServiceServer("/cancel", context=bench.ctx)
    client = emailmw.ServiceClient("/cancel", context=bench.ctx)

    async def main() -> None:
        calling = asyncio.create_task(client.acall("never mind"))
        request = await server.aget_request(bench.wait)  # so it was sent
        await until_attached(client)
        calling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await calling
        assert client._waiters == []
        assert not client._pending
        server.send_response(request.id, "unwanted")
        await eventually(
            lambda: bench.ctx.stats().dropped.get("duplicate", 0) > 0,
            bench.wait,
            "the unwanted response dropped",
        )
        assert not client.has_response()

    run(main())


def test_aget_request_times_out(bench: Bench) -> None:
    server = emailmw.ServiceServer("/idle", context=bench.ctx)
    with pytest.raises(emailmw.WaitTimeoutError, match="/idle"):
        run(server.aget_request(0.1))
    assert server._waiters == []


# -- the context -------------------------------------------------------------------------


def test_async_with_context_inits_and_shuts_down_in_a_thread(bench: Bench) -> None:
    ctx = emailmw.Context(bench.options)
    loop_threads: list[str] = []

    async def main() -> None:
        loop_threads.append(threading.current_thread().name)
        async with ctx as entered:
            assert entered is ctx
            assert ctx.state is emailmw.ContextState.RUNNING
            sub = emailmw.Subscription("/ctx", context=ctx)
            await emailmw.Publisher("/ctx", context=ctx).apublish("inside")
            assert await sub.aget(bench.wait) == "inside"
        assert ctx.state is emailmw.ContextState.SHUT_DOWN

    run(main())
    assert loop_threads == [threading.main_thread().name]


def test_async_with_a_running_context_shuts_it_down_on_exit(bench: Bench) -> None:
    async def main() -> None:
        async with bench.ctx as ctx:
            assert ctx is bench.ctx
        assert bench.ctx.state is emailmw.ContextState.SHUT_DOWN

    run(main())


def test_async_with_a_shut_down_context_raises() -> None:
    ctx = emailmw.Context(emailmw.Options(intraprocess=True))
    ctx.init()
    ctx.shutdown()

    async def main() -> None:
        async with ctx:
            raise AssertionError("entered a shut-down context")

    with pytest.raises(emailmw.ContextError):
        run(main())


# -- the loop waiter ---------------------------------------------------------------------


def test_loop_waiter_set_from_another_thread_wakes_the_task() -> None:
    async def main() -> bool:
        waiter = LoopWaiter(asyncio.get_running_loop())
        loop_time = asyncio.get_running_loop().time
        threading.Timer(0.05, waiter.set).start()
        return await waiter.sleep(loop_time() + 5.0)

    assert run(main()) is True


def test_loop_waiter_set_before_sleep_is_kept_and_consumed() -> None:
    async def main() -> tuple[bool, bool, bool]:
        waiter = LoopWaiter(asyncio.get_running_loop())
        waiter.set()
        waiter.set()  # twice: still one wake-up
        await asyncio.sleep(0)  # let the scheduled resolution run
        first = await waiter.sleep(None)
        set_after = waiter.is_set()
        second = await waiter.sleep(asyncio.get_running_loop().time() + 0.05)
        return first, set_after, second

    assert run(main()) == (True, False, False)


def test_loop_waiter_refuses_a_blocking_wait_and_ignores_a_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    waiter = LoopWaiter(loop)
    with pytest.raises(RuntimeError, match="awaited"):
        waiter.wait(0)
    loop.close()
    waiter.set()  # nobody to wake: no error
