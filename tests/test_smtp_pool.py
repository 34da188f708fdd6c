"""``smtp-connections: N``: a context sends over N SMTP connections
(:class:`~emailmw.transport.smtp_pool.SmtpSenderPool`).

Over the real Postfix + Dovecot: each publisher is pinned to one connection
(Postfix's log says which smtpd session took each email) and its messages
arrive in order with four publishers sending at once over four connections;
the counters and connection states cover every connection. Against a scripted
server that goes silent after DATA: shutdown aborts every pooled connection.
"""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from email.parser import BytesHeaderParser
from typing import Any

import pytest
from fake_smtp import FakeSmtp
from mailstack import stored_emails

import emailmw
from emailmw.devserver import DevServer
from emailmw.transport.settings import ServerAddress, SmtpSettings
from emailmw.transport.smtp_pool import SmtpSenderPool

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0
PUBLISHERS = 4
EACH = 40


def pool_options(server: DevServer, folder: str, address: str, **email: Any) -> emailmw.Options:
    config = server.config("alice", mailbox=folder, to=address)
    config["email"].update(email)
    return emailmw.Options.from_dict(config)


def postfix_sessions(server: DevServer) -> dict[str, str]:
    """Message-ID -> the pid of the smtpd that took it (one smtpd serves one
    connection at a time), from Postfix's log."""
    log = (server.root / "postfix-log" / "postfix.log").read_text(errors="replace")
    smtpd = dict(
        (queue_id, pid) for pid, queue_id in re.findall(r"smtpd\[(\d+)\]: (\w+): client=", log)
    )
    taken: dict[str, str] = {}
    for queue_id, message_id in re.findall(r"cleanup\[\d+\]: (\w+): message-id=(<[^>]+>)", log):
        if queue_id in smtpd:
            taken[message_id] = smtpd[queue_id]
    return taken


@pytest.mark.mailstack
def test_each_publisher_keeps_its_order_over_four_connections(
    dev_server: DevServer, dev_mailbox: tuple[str, str]
) -> None:
    folder, address = dev_mailbox
    sender = emailmw.Context(pool_options(dev_server, folder, address, **{"smtp-connections": 4}))
    reader = emailmw.Context(pool_options(dev_server, folder, address))
    with sender, reader:
        sub = emailmw.Subscription("/pool", context=reader)
        publishers = [emailmw.Publisher("/pool", context=sender) for _ in range(PUBLISHERS)]
        start = threading.Barrier(PUBLISHERS)
        errors: list[BaseException] = []

        def publish_all(index: int) -> None:
            try:
                start.wait(10)
                for n in range(EACH):
                    publishers[index].publish(f"{index}:{n}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=publish_all, args=(i,)) for i in range(PUBLISHERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not errors, errors

        got: dict[int, list[int]] = defaultdict(list)
        for _ in range(PUBLISHERS * EACH):
            message, info = emailmw.wait_for_message_with_info(sub, WAIT)
            index, n = map(int, message.split(":"))
            assert info.publisher_gid == publishers[index].gid
            got[index].append(n)
        assert sub.get_message() is None
        # Each publisher's messages in its order, none lost or twice.
        assert {i: got[i] for i in range(PUBLISHERS)} == {
            i: list(range(EACH)) for i in range(PUBLISHERS)
        }

        # Counters and states cover every connection.
        assert sender.stats().sent == PUBLISHERS * EACH
        assert sender.stats().send_failures == 0
        states = sender.metrics().connections
        names = ["smtp", "smtp-1", "smtp-2", "smtp-3"]
        assert {name: states.get(name) for name in names} == dict.fromkeys(
            names, emailmw.ConnectionState.CONNECTED
        )
        assert sender.connection_state is emailmw.ConnectionState.CONNECTED

    # Each publisher's emails went over one SMTP session; the four over four.
    stored = stored_emails(dev_server, folder, PUBLISHERS * EACH)
    by_publisher: dict[str, list[str]] = defaultdict(list)
    for raw in stored:
        headers = BytesHeaderParser().parsebytes(raw)
        by_publisher[str(headers["Publisher-GID"])].append(str(headers["Message-ID"]).strip())
    assert len(by_publisher) == PUBLISHERS
    sessions: dict[str, set[str]] = {}
    deadline = time.monotonic() + WAIT
    while True:  # Postfix's log is written by its own process, a moment later
        taken = postfix_sessions(dev_server)
        if all(mid in taken for mids in by_publisher.values() for mid in mids):
            break
        assert time.monotonic() < deadline, "Postfix did not log every email"
        time.sleep(0.1)
    sessions = {gid: {taken[mid] for mid in mids} for gid, mids in by_publisher.items()}
    assert all(len(pids) == 1 for pids in sessions.values()), sessions
    assert len(set().union(*sessions.values())) == PUBLISHERS, sessions


@pytest.mark.mailstack
def test_shutdown_aborts_every_pooled_connection_promptly(
    dev_server: DevServer, dev_mailbox: tuple[str, str]
) -> None:
    folder, address = dev_mailbox
    with FakeSmtp(stall_data=True) as fake:
        config = dev_server.config("alice", mailbox=folder, to=address)
        config["email"]["user"]["url-smtp"] = f"smtp://127.0.0.1:{fake.port}"
        config["email"].update({"smtp-connections": 4, "timeout": 10, "send-timeout": 30})
        ctx = emailmw.Context(emailmw.Options.from_dict(config)).init()
        try:
            assert (
                sum(c.upper().startswith("EHLO") for c in fake.commands) == 4
            )  # init() opened all four
            publishers = [emailmw.Publisher("/held", context=ctx) for _ in range(4)]
            outcomes: list[BaseException | None] = [None] * 4

            def publish(index: int) -> None:
                try:
                    publishers[index].publish("never answered")
                except BaseException as exc:
                    outcomes[index] = exc

            threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            # Pinned in turn: one send held on each of the four connections.
            assert fake.wait_stalled(4, WAIT)
            started = time.monotonic()
            assert ctx.shutdown()
            took = time.monotonic() - started
            for thread in threads:
                thread.join(5)
            assert not any(thread.is_alive() for thread in threads)
            # Without the abort each send would wait out timeout (10 s).
            assert took < 3.0, f"shutdown took {took:.2f} s"
            assert all(isinstance(exc, emailmw.TransportError) for exc in outcomes), outcomes
            assert ctx.metrics().connections.get("smtp-3") is emailmw.ConnectionState.CLOSED

        finally:
            ctx.shutdown()


def test_a_pool_refuses_a_size_out_of_bounds() -> None:
    settings = SmtpSettings(server=ServerAddress("smtp", "127.0.0.1", 25, "starttls"))
    for bad in (0, 65, -1, True, 2.0):
        with pytest.raises(ValueError, match="connections must be an int from 1 to 64"):
            SmtpSenderPool(settings, bad)  # type: ignore[arg-type]
    assert SmtpSenderPool(settings, 64).size == 64


@pytest.mark.parametrize("value", [0, 65, "2", 1.5])
def test_smtp_connections_out_of_bounds_is_a_config_error(value: object) -> None:
    with pytest.raises(emailmw.ConfigError) as info:
        emailmw.Options(intraprocess=True, **{"smtp-connections": value})  # type: ignore[arg-type]
    assert info.value.key == "email.smtp-connections"
