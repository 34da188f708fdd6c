"""A recipient the SMTP server refuses is never swallowed.

With several recipients the server answers ``RCPT TO`` for each one. A temporary
refusal (``4xx``) is retried for the refused recipients only (the same bytes, so the
same Message-ID; the recipients that accepted are not sent it again) until
``send-timeout``; a permanent refusal (``5xx``), or a temporary one still there at
``send-timeout``, raises :class:`~emailmw.RecipientsRefusedError`, which names each
refused recipient with the server's code and text and says who did get the email;
``send_failures`` counts it, ``send_retries`` counts the retries.

The exact reply codes come from the scripted fake server (tests/fake_smtp.py); the
same cases then run against the real Postfix of the dev server, which refuses an
unknown user of its domain (``550 5.1.1``) and, through
:meth:`DevServer.refuse_recipient`, any address with a chosen reply.
"""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_smtp import FakeSmtp, fake_smtp_fixture  # noqa: F401  (fixture)
from mailstack import stored_emails

import emailmw
from emailmw.devserver import DevServer
from emailmw.errors import RecipientsRefusedError, SmtpError
from emailmw.options import Options
from emailmw.stats import StatsCounters
from emailmw.transport.codec import decode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.smtp import SmtpEmailSender

pytestmark = [pytest.mark.timeout(60)]

A = "a@example.test"
B = "b@example.test"
C = "c@example.test"
METADATA = {"Publisher-GID": "42", "Source-Timestamp": "1700000000000000000"}


def fake_options(port: int, to: list[str], **email: Any) -> Options:
    section: dict[str, Any] = {
        "user": {
            "url-smtp": f"smtp://127.0.0.1:{port}",
            "url-imap": "imap://127.0.0.1",
            "username": "me@example.test",
            "password": "pw",
        },
        "recipients": {"to": to},
        "timeout": 2.0,
        **email,
    }
    return Options.from_dict({"email": section})


def rcpt_commands(server: FakeSmtp) -> list[str]:
    """The address of every RCPT TO the server heard, in order."""
    return [
        c.partition("<")[2].partition(">")[0]
        for c in server.commands
        if c.upper().startswith("RCPT")
    ]


def counters(stats: StatsCounters) -> tuple[int, int, int]:
    snapshot = stats.snapshot()
    return snapshot.sent, snapshot.send_retries, snapshot.send_failures


def send(server: FakeSmtp, to: list[str], stats: StatsCounters, **email: Any) -> str:
    smtp = SmtpEmailSender(fake_options(server.port, to, **email).smtp_settings(), stats)
    try:
        return smtp.send(EmailContent("/t", "body"), EmailHeaders(METADATA))
    finally:
        smtp.close()


# ----------------------------------------------------------------------------- scripted server


def test_temporary_refusal_is_retried_for_that_recipient_only(fake_smtp: FakeSmtp) -> None:
    fake_smtp.rcpt_replies = {B: ["450 4.2.1 mailbox busy"]}
    stats = StatsCounters()
    message_id = send(fake_smtp, [A, B], stats)
    # b got the very same bytes on the retry; a was not sent them again
    assert fake_smtp.envelopes == [[A], [B]]
    assert fake_smtp.messages[0] == fake_smtp.messages[1]
    email = decode_email(fake_smtp.messages[1])
    assert email is not None
    assert email.message_id == message_id
    assert rcpt_commands(fake_smtp) == [A, B, B]
    assert counters(stats) == (1, 1, 0)
    assert stats.snapshot().reconnects == 1  # the retry is a new session


def test_permanent_refusal_raises_naming_the_recipient_and_who_accepted(
    fake_smtp: FakeSmtp,
) -> None:
    fake_smtp.rcpt_replies = {B: ["550 5.1.1 no such user"]}
    stats = StatsCounters()
    started = time.monotonic()
    with pytest.raises(RecipientsRefusedError) as info:
        send(fake_smtp, [A, B], stats, **{"send-timeout": 20})
    assert time.monotonic() - started < 5  # at once, not at send-timeout
    error = info.value
    assert isinstance(error, SmtpError)
    assert isinstance(error, emailmw.RecipientsRefusedError)
    assert error.refused == {B: (550, "5.1.1 no such user")}
    assert error.accepted == (A,)
    assert error.server == f"127.0.0.1:{fake_smtp.port}"
    text = str(error)
    assert f"{B}: 550 5.1.1 no such user" in text
    assert f"accepted for {A}" in text
    assert fake_smtp.envelopes == [[A]]  # a got it once; b was not tried again
    assert rcpt_commands(fake_smtp) == [A, B]
    assert counters(stats) == (0, 0, 1)


@pytest.mark.timeout(30)
def test_temporary_refusal_that_outlives_send_timeout_raises(fake_smtp: FakeSmtp) -> None:
    fake_smtp.rcpt_replies = {B: "450 4.2.1 mailbox busy"}  # every time
    stats = StatsCounters()
    started = time.monotonic()
    with pytest.raises(RecipientsRefusedError) as info:
        send(fake_smtp, [A, B], stats, **{"send-timeout": 1.0})
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 4
    error = info.value
    assert error.refused == {B: (450, "4.2.1 mailbox busy")}
    assert error.accepted == (A,)
    assert f"{B}: 450 4.2.1 mailbox busy" in str(error)
    assert f"accepted for {A}" in str(error)
    assert "still refused at send-timeout (1 s)" in str(error)
    assert fake_smtp.envelopes == [[A]]
    rcpts = rcpt_commands(fake_smtp)
    assert rcpts.count(A) == 1
    assert rcpts.count(B) >= 3  # retried with backoff meanwhile
    sent, retries, failures = counters(stats)
    assert (sent, failures) == (0, 1)
    assert retries == rcpts.count(B) - 1


def test_every_recipient_refused_for_a_while_is_retried(fake_smtp: FakeSmtp) -> None:
    # smtplib raises when every recipient is refused: the same rule applies
    fake_smtp.rcpt_replies = {A: ["451 4.3.0 try later"], B: ["450 4.2.1 busy", "450 4.2.1 busy"]}
    stats = StatsCounters()
    send(fake_smtp, [A, B], stats)
    assert fake_smtp.envelopes == [[A], [B]]
    assert fake_smtp.messages[0] == fake_smtp.messages[1]
    assert counters(stats) == (1, 2, 0)


def test_421_to_a_recipient_retries_every_recipient(fake_smtp: FakeSmtp) -> None:
    # a 421 ends the session before DATA: a's 250 did not get a the email either
    fake_smtp.rcpt_replies = {B: ["421 4.3.2 shutting down"]}
    stats = StatsCounters()
    send(fake_smtp, [A, B, C], stats)
    assert rcpt_commands(fake_smtp) == [A, B, A, B, C]
    assert fake_smtp.envelopes == [[A, B, C]]
    assert counters(stats) == (1, 1, 0)


def test_every_recipient_refused_for_good_says_none_accepted(fake_smtp: FakeSmtp) -> None:
    fake_smtp.rcpt_replies = {A: "550 5.1.1 unknown", B: "553 5.1.3 bad address"}
    stats = StatsCounters()
    with pytest.raises(RecipientsRefusedError) as info:
        send(fake_smtp, [A, B], stats)
    assert info.value.refused == {A: (550, "5.1.1 unknown"), B: (553, "5.1.3 bad address")}
    assert info.value.accepted == ()
    assert "no recipient accepted it" in str(info.value)
    assert fake_smtp.messages == []
    assert counters(stats) == (0, 0, 1)


def test_mixed_refusals_retry_the_temporary_and_report_the_permanent(fake_smtp: FakeSmtp) -> None:
    fake_smtp.rcpt_replies = {B: ["550 5.1.1 no such user"], C: ["452 4.2.2 mailbox full"]}
    stats = StatsCounters()
    with pytest.raises(RecipientsRefusedError) as info:
        send(fake_smtp, [A, B, C], stats)
    # c got it on the retry before the error was raised for b
    assert info.value.refused == {B: (550, "5.1.1 no such user")}
    assert info.value.accepted == (A, C)
    assert f"accepted for {A}, {C}" in str(info.value)
    assert fake_smtp.envelopes == [[A], [C]]
    assert rcpt_commands(fake_smtp) == [A, B, C, C]
    assert counters(stats) == (0, 1, 1)


def test_data_rejected_on_the_retry_still_says_who_accepted(fake_smtp: FakeSmtp) -> None:
    fake_smtp.rcpt_replies = {B: ["450 4.2.1 busy"]}
    fake_smtp.data_replies = ["250 ok", "552 5.3.4 too big for b"]
    stats = StatsCounters()
    with pytest.raises(RecipientsRefusedError) as info:
        send(fake_smtp, [A, B], stats)
    assert info.value.refused == {B: (552, "5.3.4 too big for b")}
    assert info.value.accepted == (A,)
    assert counters(stats) == (0, 1, 1)


def test_a_refused_reply_recipient_follows_the_same_rule(fake_smtp: FakeSmtp) -> None:
    original = EmailData(
        content=EmailContent("/svc", "question"), message_id="<q1@example.test>", from_=B
    )
    stats = StatsCounters()
    smtp = SmtpEmailSender(fake_options(fake_smtp.port, [A]).smtp_settings(), stats)
    try:
        fake_smtp.rcpt_replies = {B: ["421 4.7.0 slow down", "450 4.2.1 busy"]}
        reply_id = smtp.reply(EmailContent("/svc", "answer"), original, EmailHeaders(METADATA))
        assert fake_smtp.envelopes == [[B]]
        assert counters(stats) == (1, 2, 0)
        fake_smtp.rcpt_replies = {B: ["550 5.1.1 gone"]}
        with pytest.raises(RecipientsRefusedError) as info:
            smtp.reply(EmailContent("/svc", "answer"), original, EmailHeaders(METADATA))
    finally:
        smtp.close()
    email = decode_email(fake_smtp.messages[0])
    assert email is not None
    assert email.message_id == reply_id
    assert info.value.refused == {B: (550, "5.1.1 gone")}
    assert info.value.accepted == ()
    assert counters(stats) == (1, 2, 1)


def test_closing_the_sender_during_a_recipient_retry_raises_the_refusal(
    fake_smtp: FakeSmtp,
) -> None:
    fake_smtp.rcpt_replies = {B: "450 4.2.1 busy"}
    stats = StatsCounters()
    smtp = SmtpEmailSender(
        fake_options(fake_smtp.port, [A, B], **{"send-timeout": 30}).smtp_settings(), stats
    )
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            smtp.send(EmailContent("/t", "body"), EmailHeaders(METADATA))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    deadline = time.monotonic() + 10
    while rcpt_commands(fake_smtp).count(B) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting on the sender thread's network traffic
    smtp.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1
    error = errors[0]
    assert isinstance(error, RecipientsRefusedError)
    assert error.accepted == (A,)
    assert "the sender was closed" in str(error)
    assert counters(stats)[2] == 1


# ----------------------------------------------------------------------------- the real Postfix


@contextlib.contextmanager
def publishing_context(
    server: DevServer, folder: str, address: str, to: list[str], **email: Any
) -> Iterator[emailmw.Context]:
    """A running context of alice's on ``folder``, publishing to ``to``."""
    config = server.config("alice", mailbox=folder, to=address)
    config["email"].update({"timeout": 2.0, "from": address, "recipients": {"to": to}, **email})
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        yield ctx


@pytest.fixture
def recorded_envelopes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The envelope recipients of every ``smtplib`` ``sendmail`` call, in order."""
    calls: list[list[str]] = []
    original = smtplib.SMTP.sendmail

    def recording(self: smtplib.SMTP, from_addr: str, to_addrs: Any, msg: Any, *a: Any) -> Any:
        calls.append([to_addrs] if isinstance(to_addrs, str) else list(to_addrs))
        return original(self, from_addr, to_addrs, msg, *a)

    monkeypatch.setattr(smtplib.SMTP, "sendmail", recording)
    return calls


def emails_then_marker(server: DevServer, folder: str, address: str, count: int) -> list[str]:
    """The topics of the emails in ``folder``, once ``count`` emailmw emails and a marker
    sent after them (plain ``smtplib``) are in: a second copy of an earlier email would
    show up here (Postfix delivers in queue order, and emailmw's sends were done)."""
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.sendmail(address, [address], b"Subject: marker\r\n\r\nmarker\r\n")
    raw = stored_emails(server, folder, count + 1)
    markers = [item for item in raw if b"Subject: marker" in item]
    assert len(markers) == 1
    decoded = [decode_email(item) for item in raw if item not in markers]
    return sorted(email.content.subject for email in decoded if email is not None)


@pytest.mark.mailstack
def test_postfix_unknown_user_raises_and_the_other_recipient_gets_it_once(
    dev_server: DevServer, recorded_envelopes: list[list[str]]
) -> None:
    folder, address = dev_server.new_mailbox("alice")
    unknown = "nobody-here@example.test"
    with publishing_context(dev_server, folder, address, [address, unknown]) as ctx:
        with pytest.raises(RecipientsRefusedError) as info:
            emailmw.Publisher("/refused", context=ctx).publish("hello")
        stats = ctx.stats()
    error = info.value
    code, text = error.refused[unknown]
    assert code == 550
    assert text.startswith("5.1.1 ")
    assert "User unknown" in text
    assert error.accepted == (address,)
    assert f"{unknown}: 550 5.1.1" in str(error)
    assert f"accepted for {address}" in str(error)
    assert (stats.sent, stats.send_retries, stats.send_failures) == (0, 0, 1)
    assert recorded_envelopes == [[address, unknown]]
    assert emails_then_marker(dev_server, folder, address, 1) == ["/refused"]


@pytest.mark.mailstack
def test_postfix_temporary_refusal_is_retried_until_accepted(
    dev_server: DevServer, recorded_envelopes: list[list[str]]
) -> None:
    folder, address = dev_server.new_mailbox("alice")
    bob_folder, bob = dev_server.new_mailbox("bob")
    dev_server.refuse_recipient(bob, "450 4.2.1 try again later")
    lifted = threading.Timer(1.0, dev_server.accept_recipient, args=(bob,))
    try:
        with publishing_context(
            dev_server, folder, address, [address, bob], **{"send-timeout": 20}
        ) as ctx:
            lifted.start()
            started = time.monotonic()
            emailmw.Publisher("/retried", context=ctx).publish("hello")
            elapsed = time.monotonic() - started
            stats = ctx.stats()
    finally:
        lifted.cancel()
        lifted.join()
        dev_server.accept_recipient(bob)
    assert 0.9 < elapsed < 15
    assert (stats.sent, stats.send_failures) == (1, 0)
    assert stats.send_retries >= 1
    # alice's folder was in the envelope once; every retry was for bob alone
    assert recorded_envelopes[0] == [address, bob]
    assert recorded_envelopes[1:] == [[bob]] * (len(recorded_envelopes) - 1)
    assert len(recorded_envelopes) == stats.send_retries + 1
    assert emails_then_marker(dev_server, folder, address, 1) == ["/retried"]
    assert topics_in(dev_server, bob_folder, "bob") == ["/retried"]


@pytest.mark.mailstack
@pytest.mark.timeout(30)
def test_postfix_temporary_refusal_past_send_timeout_raises(
    dev_server: DevServer, recorded_envelopes: list[list[str]]
) -> None:
    folder, address = dev_server.new_mailbox("alice")
    _, bob = dev_server.new_mailbox("bob")
    dev_server.refuse_recipient(bob, "452 4.2.2 mailbox full")
    try:
        with publishing_context(
            dev_server, folder, address, [address, bob], **{"send-timeout": 1.0}
        ) as ctx:
            started = time.monotonic()
            with pytest.raises(RecipientsRefusedError) as info:
                emailmw.Publisher("/given-up", context=ctx).publish("hello")
            elapsed = time.monotonic() - started
            stats = ctx.stats()
    finally:
        dev_server.accept_recipient(bob)
    assert 0.9 < elapsed < 5
    error = info.value
    code, text = error.refused[bob]
    assert (code, text) == (452, f"4.2.2 <{bob}>: Recipient address rejected: mailbox full")
    assert error.accepted == (address,)
    assert "still refused at send-timeout (1 s)" in str(error)
    assert (stats.sent, stats.send_failures) == (0, 1)
    assert stats.send_retries >= 2
    assert recorded_envelopes[0] == [address, bob]
    assert recorded_envelopes[1:] == [[bob]] * stats.send_retries
    assert emails_then_marker(dev_server, folder, address, 1) == ["/given-up"]


def test_refuse_recipient_checks_its_arguments() -> None:
    server = DevServer()  # not started: nothing to reload
    try:
        for reply in ("250 2.0.0 ok", "450 try later", "450 5.2.1 mixed classes", "550 5.1.1 \x00"):
            with pytest.raises(ValueError, match="invalid reply"):
                server.refuse_recipient("b@example.test", reply)
        with pytest.raises(ValueError, match="invalid recipient address"):
            server.refuse_recipient("b@example.test\nx@y", "450 4.2.1 later")
        server.refuse_recipient("b@example.test", "550 5.7.1 not here")
        server.accept_recipient("b@example.test")
        server.accept_recipient("never-refused@example.test")
    finally:
        server.stop()


def topics_in(server: DevServer, folder: str, account: str) -> list[str]:
    decoded = [decode_email(item) for item in stored_emails(server, folder, 1, account=account)]
    return [email.content.subject for email in decoded if email is not None]
