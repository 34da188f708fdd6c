"""The server's cap on IMAP connections per user, against the real Dovecot.

Dovecot lets one user hold ``mail_max_userip_connections`` IMAP connections
from one address (``DevServer(max_user_connections=N)``) and refuses the next
login with ``NO [LIMIT] Maximum number of connections from user+IP exceeded``.
``Context.init()`` past the cap raises :class:`emailmw.ConnectionLimitError` at
once (no retries); a running receiver whose reconnect meets the cap retries
with its backoff, logs the reason once, and gets in (losing nothing) when a
connection frees up.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterator

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from mailstack import require_mailstack

import emailmw
from emailmw.devserver import DevServer

pytestmark = [pytest.mark.timeout(90), pytest.mark.mailstack]

CAP = 3
REFUSAL = "Maximum number of connections from user+IP exceeded"
WAIT = 20.0


@pytest.fixture
def server() -> Iterator[DevServer]:
    """A dev server of its own (the shared one allows 1000 connections per user)."""
    require_mailstack()
    with DevServer(accounts=("alice",), max_user_connections=CAP) as srv:
        yield srv


def options(server: DevServer, folder: str, address: str) -> emailmw.Options:
    return emailmw.Options.from_dict(server.config("alice", mailbox=folder, to=address))


def login(server: DevServer) -> IMAPClient:
    """One more IMAP connection of alice's (raises LoginError past the cap)."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    client = IMAPClient(server.host, server.imaps_port, ssl=True, ssl_context=context, timeout=10)
    try:
        client.login(server.account("alice").address, server.account("alice").password)
    except BaseException:
        client.shutdown()
        raise
    return client


def refusals(server: DevServer) -> int:
    """How many logins Dovecot has refused for the cap so far (its log)."""
    log = server.root / "dovecot" / "log" / "dovecot.log"
    return log.read_text(errors="replace").count(REFUSAL)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Wait for other processes (Dovecot's log, a receiver's backoff) to get there."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def test_init_past_the_cap_raises_connection_limit_error_at_once(server: DevServer) -> None:
    folder, address = server.new_mailbox("alice")
    running = [emailmw.Context(options(server, folder, address)).init() for _ in range(CAP)]
    try:
        assert len(server.imap_connections("alice")) == CAP  # one IMAP connection per context
        before = refusals(server)
        extra = emailmw.Context(options(server, folder, address))
        started = time.monotonic()
        with pytest.raises(emailmw.ConnectionLimitError) as caught:
            extra.init()
        took = time.monotonic() - started
        error = caught.value
        assert error.limit == CAP
        assert error.server == f"imap://127.0.0.1:{server.imap_port}"
        assert "[LIMIT]" in str(error)
        assert f"mail_max_userip_connections={CAP}" in str(error)
        assert not isinstance(error, emailmw.AuthenticationError)
        assert isinstance(error, emailmw.ConnectError)
        assert took < 10.0, f"init() took {took:.1f} s to give up"
        assert extra.connection_state is emailmw.ConnectionState.DISCONNECTED  # not auth_failed
        # One login was refused: init() did not retry.
        assert wait_until(lambda: refusals(server) > before, 10.0)
        assert refusals(server) == before + 1

        # Not sticky: once a connection closes, the next init() gets in.
        running.pop().shutdown()
        assert wait_until(lambda: len(server.imap_connections("alice")) < CAP, 10.0)
        running.append(emailmw.Context(options(server, folder, address)).init())
        assert len(server.imap_connections("alice")) == CAP
    finally:
        for ctx in running:
            ctx.shutdown()


@pytest.mark.timeout(120)
def test_a_receiver_whose_reconnect_meets_the_cap_backs_off_logs_once_and_loses_nothing(
    server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.set_max_user_connections(10)
    folder, address = server.new_mailbox("alice")
    ctx = emailmw.Context(options(server, folder, address)).init()
    fillers: list[IMAPClient] = []
    try:
        sub = emailmw.Subscription("/capped", context=ctx)
        pub = emailmw.Publisher("/capped", context=ctx)
        pub.publish("before")
        assert emailmw.wait_for_message(sub, WAIT) == "before"
        (receiver_pid,) = server.imap_connections("alice")
        fillers = [login(server) for _ in range(CAP)]  # 4 open, the cap still 10

        # Lower the cap under the open connections; wait until new logins meet it.
        base = refusals(server)
        server.set_max_user_connections(CAP)

        def capped() -> bool:
            try:
                client = login(server)
            except LoginError as exc:
                assert "[LIMIT]" in str(exc)
                return True
            client.logout()  # an imap-login process of before the reload took it
            return False

        assert wait_until(capped, 10.0)
        assert wait_until(lambda: refusals(server) == base + 1, 10.0)  # Dovecot logged it

        # The receiver's connection ends; its reconnect meets the cap.
        caplog.set_level(logging.DEBUG, logger="emailmw")
        before = refusals(server)
        server.drop_imap_connection("alice", receiver_pid)
        pub.publish("while capped")  # SMTP is not capped: the email is stored meanwhile
        # It retries with backoff (0.1 s doubling): several refusals, not a storm.
        # The third comes after 0.2 + 0.4 + 0.8 s; a loop without backoff would be far past.
        started = time.monotonic()
        assert wait_until(lambda: refusals(server) >= before + 3, 15.0)
        span = time.monotonic() - started
        attempts = refusals(server) - before
        assert attempts <= 5, f"{attempts} logins refused in {span:.1f} s"
        assert span >= 0.5, f"{attempts} logins refused in {span:.2f} s: no backoff"
        assert ctx.connection_state is emailmw.ConnectionState.RECONNECTING
        assert sub.get_message() is None

        # The reason is logged once (later attempts only at DEBUG), naming the cap.
        cap_records = [
            r
            for r in caplog.records
            if "mail_max_userip_connections" in r.message and r.levelno >= logging.INFO
        ]
        assert len(cap_records) == 1, [r.message for r in cap_records]
        assert cap_records[0].levelno == logging.WARNING
        assert "refused one more IMAP connection" in cap_records[0].message

        # A connection frees up: the receiver gets in and delivers what came meanwhile.
        fillers.pop().logout()
        assert emailmw.wait_for_message(sub, WAIT) == "while capped"
        assert ctx.connection_state is emailmw.ConnectionState.CONNECTED
        pub.publish("after")
        assert emailmw.wait_for_message(sub, WAIT) == "after"
        assert sub.get_message() is None
    finally:
        ctx.shutdown()
        for client in fillers:
            client.logout()
