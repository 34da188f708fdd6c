"""SmtpEmailSender against the real Postfix + Dovecot dev server (and a few scripted fakes).

Emails are read back with plain imapclient and decoded with decode_email.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_smtp import FakeSmtp, fake_smtp_fixture  # noqa: F401  (fixture)
from mailstack import require_mailstack, stored_emails

from emailmw.devserver import DevServer
from emailmw.errors import (
    AuthenticationError,
    ConnectError,
    RecipientsRefusedError,
    SmtpError,
    TlsError,
)
from emailmw.options import Options
from emailmw.security import verify_signature
from emailmw.stats import StatsCounters
from emailmw.transport import smtp as smtp_module
from emailmw.transport.codec import decode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.signing import SigningSender
from emailmw.transport.smtp import SmtpEmailSender

pytestmark = [pytest.mark.timeout(120), pytest.mark.mailstack]

METADATA = {"Publisher-GID": "42", "Source-Timestamp": "1700000000000000000"}

BODIES = {
    "empty": "",
    "lf": "a\nb\n",
    "crlf": "a\r\nb\r\n",
    "lone_cr": "a\rb\r",
    "mixed": "x\ny\r\nz\r",
    "long_line": "y" * 5000,
    "leading_dots": ".\n..\n.\r\n.x",
    "from_lines": "From me\nFrom you\n",
    "nul": "\0a\0",
    "trailing_ws": "space \ntab\t\n ",
    "non_ascii": "héllo — 日本語 🎉\n",
    "only_newlines": "\n\n\n",
}

SUBJECTS = ["/chatter", " padded  subject ", "=?utf-8?b?QQ==?=", "é" * 255, "a" * 300]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def restartable_server() -> Iterator[DevServer]:
    """A DevServer of this module's own, for the tests that stop or restart Postfix."""
    require_mailstack()
    with DevServer(accounts=("alice", "bob")) as server:
        yield server


def make_options(
    server: DevServer, account: str = "alice", extra: dict[str, Any] | None = None, **email: Any
) -> Options:
    """Options for ``account`` with keys of the ``email:`` section overridden
    (``extra`` for keys that are not identifiers, like ``send-timeout``)."""
    email.update(extra or {})
    tls = email.pop("tls_mode", "starttls")
    config = server.config(account, tls=tls)
    section = config["email"]
    for key, value in email.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            section[key] = {**section[key], **value}
        else:
            section[key] = value
    return Options.from_dict(config)


def mailbox_options(
    server: DevServer, extra: dict[str, Any] | None = None, **email: Any
) -> tuple[Options, str, str]:
    """Options sending to (and from) a fresh folder of alice: ``(options, folder, address)``."""
    folder, address = server.new_mailbox("alice")
    email.setdefault("recipients", {"to": address})
    email.setdefault("from", address)
    return make_options(server, extra=extra, **email), folder, address


def decode_all(raw: list[bytes], *, duplicates: bool = False) -> dict[str, EmailData]:
    """Decoded emails by Message-ID; a second copy of one fails unless ``duplicates``."""
    emails: dict[str, EmailData] = {}
    for item in raw:
        email = decode_email(item)
        assert email is not None
        if email.message_id in emails:
            assert duplicates, f"{email.message_id} delivered twice"
            assert emails[email.message_id].content == email.content
        emails[email.message_id] = email
    return emails


def collect(
    server: DevServer, folder: str, message_ids: list[str], timeout: float = 30.0
) -> dict[str, EmailData]:
    """Wait until every one of ``message_ids`` is in ``folder``, tolerating duplicates
    (Postfix delivers at least once: a restart during delivery can deliver twice)."""
    deadline = time.monotonic() + timeout
    while True:
        received = decode_all(stored_emails(server, folder, len(message_ids)), duplicates=True)
        if set(message_ids) <= set(received) or time.monotonic() > deadline:
            return received
        time.sleep(0.1)


@contextlib.contextmanager
def sender(options: Options, stats: StatsCounters | None = None) -> Iterator[SmtpEmailSender]:
    """A connected sender, closed afterwards."""
    smtp = SmtpEmailSender(options.smtp_settings(), stats)
    try:
        smtp.connect()
        yield smtp
    finally:
        smtp.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def throwaway_ca(directory: Path) -> Path:
    """A CA that signed nothing the dev server uses."""
    ca = directory / "other-ca.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(directory / "other-ca.key"),
            "-out",
            str(ca),
            "-days",
            "2",
            "-subj",
            "/CN=emailmw throwaway CA",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    return ca


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tls_mode", ["starttls", "implicit"])
def test_awkward_bodies_and_subjects_arrive_exactly(dev_server: DevServer, tls_mode: str) -> None:
    options, folder, _ = mailbox_options(dev_server, tls_mode=tls_mode)
    sent: dict[str, tuple[str, str, dict[str, str]]] = {}
    stats = StatsCounters()
    with sender(options, stats) as smtp:
        for index, (name, body) in enumerate(BODIES.items()):
            subject = SUBJECTS[index % len(SUBJECTS)]
            headers = {**METADATA, "Body-Name": name, "User-Text": f"  ünïcode {name}  "}
            message_id = smtp.send(EmailContent(subject, body), EmailHeaders(headers))
            sent[message_id] = (subject, body, headers)
    assert stats.snapshot().sent == len(BODIES)
    received = decode_all(stored_emails(dev_server, folder, len(sent)))
    assert set(received) == set(sent)
    for message_id, (subject, body, headers) in sent.items():
        email = received[message_id]
        assert email.content.subject == subject
        assert email.content.body == body, headers["Body-Name"]
        assert email.headers == EmailHeaders(headers)
        assert email.from_ == options.from_address
        assert email.in_reply_to is None


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_ten_megabyte_body_arrives_exactly(dev_server: DevServer, line_end: str) -> None:
    options, folder, _ = mailbox_options(dev_server)
    line = "0123456789 abcdefghijklmnopqrstuvwxyz ÄÖÜ äöü" + line_end
    body = (line * (10_000_000 // len(line) + 1))[:10_000_000]
    with sender(options) as smtp:
        started = time.perf_counter()
        message_id = smtp.send(EmailContent("/big", body), EmailHeaders(METADATA))
        elapsed = time.perf_counter() - started
    logging.getLogger(__name__).info("10 MB send took %.3f s", elapsed)
    email = decode_all(stored_emails(dev_server, folder, 1))[message_id]
    assert email.content.body == body
    assert elapsed < 20


def test_bcc_is_delivered_but_not_in_the_headers(dev_server: DevServer) -> None:
    to_folder, to_address = dev_server.new_mailbox("alice")
    bcc_folder, bcc_address = dev_server.new_mailbox("bob")
    options = make_options(dev_server, recipients={"to": to_address, "bcc": bcc_address})
    with sender(options) as smtp:
        message_id = smtp.send(EmailContent("/bcc", "secret copy"), EmailHeaders(METADATA))
    to_raw = stored_emails(dev_server, to_folder, 1)[0]
    bcc_raw = stored_emails(dev_server, bcc_folder, 1, account="bob")[0]
    for raw in (to_raw, bcc_raw):
        header_block = raw.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\nbcc:" not in header_block
        email = decode_email(raw)
        assert email is not None
        assert email.message_id == message_id
        assert email.recipients.to == [to_address]
        assert email.recipients.bcc == []
        assert email.content.body == "secret copy"
    assert bcc_address.encode() not in to_raw


def test_reply_threads_to_the_original(dev_server: DevServer) -> None:
    alice_options, folder, address = mailbox_options(dev_server)
    bob_options = make_options(dev_server, "bob")
    with sender(alice_options) as alice:
        request_id = alice.send(
            EmailContent("/service", "request"),
            EmailHeaders({"Client-GID": "7", "Request-Sequence-Number": "1"}),
        )
    request = decode_all(stored_emails(dev_server, folder, 1))[request_id]
    assert request.from_ == address
    with sender(bob_options) as bob:
        reply_id = bob.reply(
            EmailContent("/service", "response\r\n"),
            request,
            EmailHeaders({"Client-GID": "7", "Request-Sequence-Number": "1"}),
        )
    raw = stored_emails(dev_server, folder, 2)
    reply = decode_all(raw)[reply_id]
    assert reply.in_reply_to == request_id
    assert reply.content == EmailContent("/service", "response\r\n")
    assert reply.from_ == dev_server.account("bob").address
    assert reply.recipients.to == [address]
    reply_raw = next(r for r in raw if reply_id.encode() in r)
    assert f"References: {request_id}\r\n".encode() in reply_raw


def test_signed_emails_verify_after_the_trip(dev_server: DevServer) -> None:
    options, folder, _ = mailbox_options(dev_server)
    key = b"shared signing key"
    headers = EmailHeaders(METADATA)
    with sender(options) as plain:
        smtp = SigningSender(plain, key)
        request_id = smtp.send(EmailContent("/signed", "line\r\nbody é"), headers)
        assert headers == EmailHeaders(METADATA)  # the caller's headers are left alone
        request = decode_all(stored_emails(dev_server, folder, 1))[request_id]
        reply_id = smtp.reply(EmailContent("/signed", "reply"), request, EmailHeaders(METADATA))
    received = decode_all(stored_emails(dev_server, folder, 2))
    assert verify_signature(received[request_id], key) is True
    assert verify_signature(received[reply_id], key) is True
    assert received[reply_id].in_reply_to == request_id


def test_send_raw_sends_the_bytes_as_they_are(dev_server: DevServer) -> None:
    options, folder, address = mailbox_options(dev_server)
    raw = (
        f"From: {address}\nTo: {address}\nSubject: /raw\nMessage-ID: <raw.1@example.test>\n"
        "Publisher-GID: 9\nSource-Timestamp: 1\n\nhand made\n"
    ).encode()
    with sender(options) as smtp:
        assert smtp.send_raw(raw) == "<raw.1@example.test>"
        with pytest.raises(ValueError):
            smtp.send_raw(b"  \r\n")
    email = decode_all(stored_emails(dev_server, folder, 1))["<raw.1@example.test>"]
    assert email.content == EmailContent("/raw", "hand made")


def test_probe_describes_the_server(dev_server: DevServer) -> None:
    for tls_mode in ("starttls", "implicit"):
        with sender(make_options(dev_server, tls_mode=tls_mode)) as smtp:
            info = smtp.probe()
        assert info["tls"] == tls_mode
        assert info["tls_version"] in ("TLSv1.2", "TLSv1.3")
        assert info["authenticated"] is True
        assert "PLAIN" in info["auth_mechanisms"]
        assert info["max_message_size"] and info["max_message_size"] > 10_000_000
        assert "size" in info["esmtp_features"]


def test_close_is_idempotent_and_final(dev_server: DevServer) -> None:
    smtp = SmtpEmailSender(make_options(dev_server).smtp_settings())
    smtp.connect()
    smtp.close()
    smtp.close()
    with pytest.raises(SmtpError, match="closed"):
        smtp.send(EmailContent("/t", "x"), EmailHeaders(METADATA))
    SmtpEmailSender(make_options(dev_server).smtp_settings()).close()  # never connected


# ----------------------------------------------------------------------------- connect errors


def test_wrong_password_is_an_authentication_error(dev_server: DevServer) -> None:
    password = "not-the-password-1234"
    options = make_options(dev_server, user={"password": password})
    started = time.monotonic()
    with pytest.raises(AuthenticationError) as info:
        SmtpEmailSender(options.smtp_settings()).connect()
    assert time.monotonic() - started < 5  # Dovecot delays failed logins by up to ~2 s
    assert password not in str(info.value)
    assert f"127.0.0.1:{dev_server.smtp_port}" in str(info.value)
    assert info.value.server == f"127.0.0.1:{dev_server.smtp_port}"


@pytest.mark.parametrize("tls_mode", ["starttls", "implicit"])
def test_untrusted_certificate_is_a_tls_error(
    dev_server: DevServer, tls_mode: str, tmp_path: Path
) -> None:
    ca = throwaway_ca(tmp_path)
    options = make_options(dev_server, tls_mode=tls_mode, tls={"ca-file": str(ca)})
    stats = StatsCounters()
    with pytest.raises(TlsError, match="certificate verif"):
        SmtpEmailSender(options.smtp_settings(), stats).connect()
    # the same failure while sending is not retried
    smtp = SmtpEmailSender(options.smtp_settings(), stats)
    started = time.monotonic()
    with pytest.raises(TlsError):
        smtp.send(EmailContent("/t", "x"), EmailHeaders(METADATA))
    assert time.monotonic() - started < 2
    assert stats.snapshot().send_retries == 0
    assert stats.snapshot().send_failures == 1


def test_system_cas_do_not_trust_the_test_ca(dev_server: DevServer) -> None:
    options = make_options(dev_server, tls={"ca-file": None})
    with pytest.raises(TlsError):
        SmtpEmailSender(options.smtp_settings()).connect()


def test_verify_false_connects_to_an_untrusted_server(
    dev_server: DevServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = make_options(
        dev_server, tls={"ca-file": str(throwaway_ca(tmp_path)), "verify": False}
    )
    with caplog.at_level(logging.WARNING, logger="emailmw.transport.smtp"):
        smtp = SmtpEmailSender(options.smtp_settings())
    assert "verification is disabled" in caplog.text
    try:
        smtp.connect()
        assert smtp.probe()["certificate_verified"] is False
    finally:
        smtp.close()


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_nothing_listening_is_a_connect_error(scheme: str) -> None:
    port = free_port()
    options = Options.from_dict(
        {"email": {"user": {"url-smtp": f"{scheme}://127.0.0.1:{port}", "url-imap": "imap://x"}}}
    )
    started = time.monotonic()
    with pytest.raises(ConnectError, match="refused") as info:
        SmtpEmailSender(options.smtp_settings()).connect()
    assert time.monotonic() - started < 2
    assert f"{scheme}://127.0.0.1:{port}" in str(info.value)


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_silent_server_is_a_connect_error_within_the_timeout(scheme: str) -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) and never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        options = Options.from_dict(
            {
                "email": {
                    "user": {"url-smtp": f"{scheme}://127.0.0.1:{port}", "url-imap": "imap://x"},
                    "timeout": 1.0,
                }
            }
        )
        started = time.monotonic()
        with pytest.raises(ConnectError, match="did not answer"):
            SmtpEmailSender(options.smtp_settings()).connect()
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.5


# ----------------------------------------------------------------------------- send failures


def test_unknown_recipient_is_rejected_at_once(dev_server: DevServer) -> None:
    options = make_options(dev_server, recipients={"to": "nobody@example.test"})
    stats = StatsCounters()
    with sender(options, stats) as smtp:
        started = time.monotonic()
        with pytest.raises(RecipientsRefusedError, match=r"nobody@example\.test: 550") as info:
            smtp.send(EmailContent("/t", "x"), EmailHeaders(METADATA))
        assert time.monotonic() - started < 1
        assert not isinstance(info.value, ConnectError)
        assert list(info.value.refused) == ["nobody@example.test"]
        assert info.value.accepted == ()
        assert "no recipient accepted it" in str(info.value)
        snapshot = stats.snapshot()
        assert (snapshot.sent, snapshot.send_retries, snapshot.send_failures) == (0, 0, 1)


def test_too_big_for_max_message_size_is_refused_before_sending(dev_server: DevServer) -> None:
    options = make_options(dev_server, extra={"max-message-size": 10_000})
    stats = StatsCounters()
    with sender(options, stats) as smtp:
        with pytest.raises(SmtpError, match="max-message-size"):
            smtp.send(EmailContent("/t", "x" * 20_000), EmailHeaders(METADATA))
    assert stats.snapshot().send_failures == 1


def test_sends_survive_a_postfix_restart(
    restartable_server: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []
    original_sendmail = smtplib.SMTP.sendmail

    def recording_sendmail(self: Any, from_addr: str, to_addrs: Any, msg: Any, *a: Any) -> Any:
        email = decode_email(msg)
        assert email is not None
        attempts.append(email.message_id)
        return original_sendmail(self, from_addr, to_addrs, msg, *a)

    monkeypatch.setattr(smtplib.SMTP, "sendmail", recording_sendmail)
    options, folder, _ = mailbox_options(restartable_server)
    stats = StatsCounters()
    sent: list[str] = []
    with sender(options, stats) as smtp:
        for round_ in range(3):
            for i in range(5):
                content = EmailContent("/restart", f"round {round_} message {i}")
                sent.append(smtp.send(content, EmailHeaders(METADATA)))
            restartable_server.restart_postfix()
    snapshot = stats.snapshot()
    assert snapshot.sent == 15
    assert snapshot.send_failures == 0
    assert snapshot.send_retries >= 2  # the first send after each restart hit a dead connection
    assert snapshot.reconnects >= 2
    # a retry re-sends the very same email: same Message-ID
    retried = [mid for mid in set(attempts) if attempts.count(mid) > 1]
    assert len(retried) >= 2
    assert set(attempts) == set(sent)
    received = collect(restartable_server, folder, sent)
    assert set(received) == set(sent)


def test_sends_wait_for_postfix_to_come_back(restartable_server: DevServer) -> None:
    options, folder, _ = mailbox_options(restartable_server, extra={"send-timeout": 20})
    stats = StatsCounters()
    with sender(options, stats) as smtp:
        restartable_server.stop_postfix()
        restarter = threading.Timer(1.0, restartable_server.start_postfix)
        restarter.start()
        try:
            started = time.monotonic()
            message_id = smtp.send(EmailContent("/down", "waited"), EmailHeaders(METADATA))
            elapsed = time.monotonic() - started
        finally:
            restarter.join()
            restartable_server.start_postfix()  # no-op when running
    assert 0.9 < elapsed < 10
    assert stats.snapshot().send_retries >= 2
    assert message_id in collect(restartable_server, folder, [message_id])


def test_send_gives_up_after_send_timeout(restartable_server: DevServer) -> None:
    options = make_options(restartable_server, extra={"send-timeout": 1.0})
    stats = StatsCounters()
    with sender(options, stats) as smtp:
        restartable_server.stop_postfix()
        try:
            started = time.monotonic()
            with pytest.raises(SmtpError, match="failed after") as info:
                smtp.send(EmailContent("/t", "x"), EmailHeaders(METADATA))
            elapsed = time.monotonic() - started
        finally:
            restartable_server.start_postfix()
    assert 0.8 < elapsed < 3
    assert info.value.server == f"127.0.0.1:{restartable_server.smtp_port}"
    snapshot = stats.snapshot()
    assert snapshot.send_failures == 1
    assert snapshot.send_retries >= 3


def test_idle_connection_is_checked_with_noop(
    restartable_server: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smtp_module, "_IDLE_CHECK_AFTER", 0.0)
    options, folder, _ = mailbox_options(restartable_server)
    stats = StatsCounters()
    with sender(options, stats) as smtp:
        first = smtp.send(EmailContent("/idle", "1"), EmailHeaders(METADATA))
        restartable_server.restart_postfix()
        second = smtp.send(EmailContent("/idle", "2"), EmailHeaders(METADATA))
    snapshot = stats.snapshot()
    assert snapshot.send_retries == 0  # the dead connection was found by NOOP, not by a failure
    assert snapshot.reconnects == 1
    assert set(collect(restartable_server, folder, [first, second])) == {first, second}


def test_concurrent_sends_are_delivered_exactly_once(dev_server: DevServer) -> None:
    options, folder, _ = mailbox_options(dev_server)
    stats = StatsCounters()
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(thread: int, smtp: SmtpEmailSender) -> None:
        try:
            for i in range(50):
                message_id = smtp.send(
                    EmailContent("/concurrent", f"thread {thread} message {i}"),
                    EmailHeaders(METADATA),
                )
                with lock:
                    ids.append(message_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with sender(options, stats) as smtp:
        threads = [threading.Thread(target=worker, args=(t, smtp)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors
    assert len(ids) == len(set(ids)) == 200
    received = decode_all(stored_emails(dev_server, folder, 200))
    assert set(received) == set(ids)
    bodies = sorted(email.content.body for email in received.values())
    assert bodies == sorted(f"thread {t} message {i}" for t in range(4) for i in range(50))
    assert stats.snapshot().sent == 200


# ----------------------------------------------------------------------------- scripted fake server


def fake_options(port: int, **email: Any) -> Options:
    section: dict[str, Any] = {
        "user": {
            "url-smtp": f"smtp://127.0.0.1:{port}",
            "url-imap": "imap://127.0.0.1",
            "username": "alice@example.test",
            "password": "s3cret-pw",
        },
        "recipients": {"to": "bob@example.test"},
        "timeout": 2.0,
    }
    section.update(email)
    return Options.from_dict({"email": section})


def test_is_loopback() -> None:
    for host in (
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "[::1]",
        "localhost",
        "LOCALHOST.",
        "a.localhost",
    ):
        assert smtp_module._is_loopback(host), host
    for host in ("10.0.0.1", "example.test", "::2", "localhost.example.test", "128.0.0.1"):
        assert not smtp_module._is_loopback(host), host


def test_no_password_over_plaintext_to_a_remote_host(
    fake_smtp: FakeSmtp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smtp_module, "_is_loopback", lambda host: False)
    with pytest.raises(TlsError, match="plain text") as info:
        SmtpEmailSender(fake_options(fake_smtp.port).smtp_settings()).connect()
    assert "s3cret-pw" not in str(info.value)
    assert not any(c.upper().startswith("AUTH") for c in fake_smtp.commands)
    # allowed when the configuration says so
    smtp = SmtpEmailSender(
        fake_options(fake_smtp.port, tls={"allow-insecure": True}).smtp_settings()
    )
    smtp.connect()
    smtp.close()
    assert any(c.upper().startswith("AUTH PLAIN") for c in fake_smtp.commands)


def test_plaintext_auth_to_loopback_uses_one_mechanism(fake_smtp: FakeSmtp) -> None:
    smtp = SmtpEmailSender(fake_options(fake_smtp.port).smtp_settings())
    smtp.connect()
    assert smtp.probe()["tls"] == "none"
    smtp.close()
    assert [c.split()[:2] for c in fake_smtp.commands if c.upper().startswith("AUTH")] == [
        ["AUTH", "PLAIN"]
    ]
    assert fake_smtp.commands[-1].upper() == "QUIT"


def test_no_auth_without_password(fake_smtp: FakeSmtp) -> None:
    options = fake_options(
        fake_smtp.port,
        user={
            "url-smtp": f"smtp://127.0.0.1:{fake_smtp.port}",
            "url-imap": "imap://x",
            "username": "me",
        },
    )
    smtp = SmtpEmailSender(options.smtp_settings())
    assert smtp.from_address == "me@127.0.0.1"
    smtp.send(EmailContent("/t", "x"), EmailHeaders(METADATA))
    smtp.close()
    assert not any(c.upper().startswith("AUTH") for c in fake_smtp.commands)
    assert "mail FROM:<me@127.0.0.1> size=" in fake_smtp.commands[1]


def test_421_after_data_is_retried_with_the_same_message_id(fake_smtp: FakeSmtp) -> None:
    fake_smtp.data_replies = ["421 4.3.0 going down", "451 4.3.0 try again"]
    stats = StatsCounters()
    smtp = SmtpEmailSender(fake_options(fake_smtp.port).smtp_settings(), stats)
    message_id = smtp.send(EmailContent("/t", "body"), EmailHeaders(METADATA))
    smtp.close()
    assert len(fake_smtp.messages) == 3
    decoded = [decode_email(message) for message in fake_smtp.messages]
    assert {email.message_id for email in decoded if email is not None} == {message_id}
    assert all(email is not None and email.content.body == "body" for email in decoded)
    snapshot = stats.snapshot()
    assert (snapshot.sent, snapshot.send_retries, snapshot.send_failures) == (1, 2, 0)


def test_5xx_after_data_is_not_retried(fake_smtp: FakeSmtp) -> None:
    fake_smtp.data_replies = ["552 5.3.4 message too big"]
    stats = StatsCounters()
    smtp = SmtpEmailSender(fake_options(fake_smtp.port).smtp_settings(), stats)
    with pytest.raises(SmtpError, match=r"552 5\.3\.4 message too big"):
        smtp.send(EmailContent("/t", "body"), EmailHeaders(METADATA))
    # the connection is still good for the next email
    smtp.send(EmailContent("/t", "body"), EmailHeaders(METADATA))
    smtp.close()
    assert len(fake_smtp.messages) == 2
    snapshot = stats.snapshot()
    assert (snapshot.sent, snapshot.send_retries, snapshot.send_failures) == (1, 0, 1)


def test_bad_greeting_is_a_connect_error() -> None:
    with FakeSmtp(greeting="554 5.3.2 go away") as server, pytest.raises(ConnectError, match="554"):
        SmtpEmailSender(fake_options(server.port).smtp_settings()).connect()
