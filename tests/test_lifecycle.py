"""Prompt lifecycle: ``shutdown()`` never waits on a silent server, the polling
thread is gone when it returns, and ``init()`` connects without holding a lock
that ``shutdown()`` needs.

The silent servers are real ones behind a proxy that stops forwarding
(``benchmarks/faults.py``: :class:`TcpProxy`), or a listener that accepts and
never speaks (:class:`SilentServer`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mailstack import load_benchmark

import emailmw
from emailmw.devserver import DevServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.mailstack]

faults = load_benchmark("faults")

#: shutdown() must return within about a second
PROMPT = 1.5
#: the network timeout of these contexts: far longer than PROMPT
TIMEOUT = 20.0


def poll_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "emailmw-poll")


@pytest.fixture
def folder(dev_server: DevServer) -> tuple[str, str]:
    return dev_server.new_mailbox("alice")


def config_for(
    server: DevServer,
    folder: tuple[str, str],
    *,
    smtp_port: int | None = None,
    imap_port: int | None = None,
    receive_mode: str = "auto",
) -> emailmw.Options:
    name, address = folder
    config = server.config("alice", mailbox=name, to=address, receive_mode=receive_mode)
    email: dict[str, Any] = config["email"]
    if smtp_port is not None:
        email["user"]["url-smtp"] = f"smtp://127.0.0.1:{smtp_port}"
    if imap_port is not None:
        email["user"]["url-imap"] = f"imap://127.0.0.1:{imap_port}"
    email["timeout"] = TIMEOUT
    email["send-timeout"] = TIMEOUT
    email["polling-period"] = 50_000_000
    return emailmw.Options.from_dict(config)


@pytest.fixture
def proxy_smtp(dev_server: DevServer) -> Iterator[Any]:
    with faults.TcpProxy(dev_server.smtp_port) as proxy:
        yield proxy


@pytest.fixture
def proxy_imap(dev_server: DevServer) -> Iterator[Any]:
    with faults.TcpProxy(dev_server.imap_port) as proxy:
        yield proxy


def test_shutdown_aborts_a_publish_stuck_on_a_silent_smtp_server(
    dev_server: DevServer, folder: tuple[str, str], proxy_smtp: Any
) -> None:
    before = poll_threads()
    ctx = emailmw.Context(config_for(dev_server, folder, smtp_port=proxy_smtp.port)).init()
    pub = emailmw.Publisher("/stuck", context=ctx)
    pub.publish("fine")  # the connection is up
    proxy_smtp.blackhole()  # ... and now the server never answers again
    outcome: list[BaseException | None] = []

    def publish() -> None:
        try:
            pub.publish("stuck")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish, name="stuck-publisher", daemon=True)
    thread.start()
    time.sleep(0.5)  # well into the silent wait
    assert not outcome, "publish() should be stuck on the silent server"
    started = time.monotonic()
    assert ctx.shutdown() is True
    took = time.monotonic() - started
    assert took < PROMPT, f"shutdown() took {took:.2f} s"
    assert poll_threads() == before
    thread.join(PROMPT)
    assert not thread.is_alive(), "the stuck publish() was not aborted"
    assert len(outcome) == 1
    assert isinstance(outcome[0], emailmw.SmtpError | emailmw.ContextError), outcome


@pytest.mark.parametrize("receive_mode", ["poll", "idle", "auto"])
def test_shutdown_is_prompt_while_the_imap_server_is_silent(
    dev_server: DevServer,
    folder: tuple[str, str],
    proxy_imap: Any,
    receive_mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = poll_threads()
    options = config_for(dev_server, folder, imap_port=proxy_imap.port, receive_mode=receive_mode)
    ctx = emailmw.Context(options).init()
    sub = emailmw.Subscription("/silent-imap", context=ctx)
    emailmw.Publisher("/silent-imap", context=ctx).publish("before")
    assert emailmw.wait_for_message(sub, 20.0) == "before"
    proxy_imap.freeze()  # the IMAP server hangs: commands in flight never complete
    time.sleep(0.5)  # a poll (NOOP) or an IDLE wait is now stuck on it
    started = time.monotonic()
    assert ctx.shutdown() is True
    took = time.monotonic() - started
    assert took < PROMPT, f"shutdown() took {took:.2f} s in {receive_mode} mode"
    assert poll_threads() == before, "the polling thread outlived shutdown()"
    # the aborted command is the shutdown, not a lost connection: no warning, no reconnect
    assert ctx.stats().reconnects == 0
    assert not [r for r in caplog.records if "lost" in r.getMessage()], caplog.text


def test_shutdown_during_init_to_a_silent_server_is_prompt() -> None:
    """init() connects without the context's lock: shutdown() from another thread
    returns at once, and init() then fails with a ContextError (or the connect
    error it was about to raise)."""
    with faults.SilentServer() as silent:
        options = emailmw.Options(
            user={
                "url-smtp": f"smtp://127.0.0.1:{silent.port}",
                "url-imap": f"imap://127.0.0.1:{silent.port}",
            },
            recipients={"to": "nobody@localhost"},
            timeout=5.0,
        )
        ctx = emailmw.Context(options)
        outcome: list[BaseException | None] = []

        def init() -> None:
            try:
                ctx.init()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=init, name="init", daemon=True)
        thread.start()
        deadline = time.monotonic() + 5
        while ctx.state is emailmw.ContextState.CREATED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # connecting to a server that never greets
        assert ctx.state is emailmw.ContextState.STARTING
        started = time.monotonic()
        assert ctx.shutdown() is True
        assert time.monotonic() - started < PROMPT
        assert ctx.state is emailmw.ContextState.SHUT_DOWN
        thread.join(10)
        assert not thread.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], emailmw.EmailmwError), outcome
        assert not ctx.ok


def test_global_shutdown_during_global_init_is_prompt() -> None:
    with faults.SilentServer() as silent:
        options = emailmw.Options(
            user={
                "url-smtp": f"smtp://127.0.0.1:{silent.port}",
                "url-imap": f"imap://127.0.0.1:{silent.port}",
            },
            recipients={"to": "nobody@localhost"},
            timeout=5.0,
        )
        outcome: list[BaseException | None] = []

        def init() -> None:
            try:
                emailmw.init(options)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=init, name="global-init", daemon=True)
        thread.start()
        time.sleep(0.3)
        with pytest.raises(emailmw.ContextError, match="already initialized"):
            emailmw.init(emailmw.Options(intraprocess=True))  # not while another is starting
        started = time.monotonic()
        emailmw.shutdown()
        assert time.monotonic() - started < PROMPT
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(outcome[0], emailmw.EmailmwError), outcome
    # afterwards the global context can be initialized again
    ctx = emailmw.init(emailmw.Options(intraprocess=True))
    try:
        assert ctx.ok
    finally:
        emailmw.shutdown()


def test_intraprocess_shutdown_leaves_no_polling_thread() -> None:
    before = poll_threads()
    for _ in range(20):
        ctx = emailmw.Context(emailmw.Options(intraprocess=True)).init()
        emailmw.Subscription("/t", context=ctx)
        ctx.shutdown()
        assert poll_threads() == before
