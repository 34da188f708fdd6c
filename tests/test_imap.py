"""ImapEmailReceiver against the real Dovecot + Postfix dev server (and a few scripted fakes).

Each test takes a fresh folder; emails go in over SMTP (smtplib) or IMAP APPEND.
"""

from __future__ import annotations

import contextlib
import logging
import random
import smtplib
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from emailmw.devserver import DevServer
from emailmw.errors import AuthenticationError, ConnectError, ImapError, TlsError
from emailmw.options import Options
from emailmw.stats import StatsCounters
from emailmw.transport import imap_cadence, imap_session
from emailmw.transport.codec import encode_email, new_message_id
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.imap import ImapEmailReceiver

pytestmark = [pytest.mark.timeout(60), pytest.mark.mailstack]

MODES = ["poll", "idle", "auto"]
TLS_MODES = ["starttls", "implicit"]


# ----------------------------------------------------------------------------- helpers


def emailmw_raw(address: str, body: str, message_id: str | None = None) -> bytes:
    """An emailmw message (topic /t) from and to ``address``."""
    email = EmailData(
        content=EmailContent(subject="/t", body=body),
        headers=EmailHeaders({"Publisher-GID": "7", "Source-Timestamp": str(time.time_ns())}),
        message_id=message_id or new_message_id("example.test"),
        from_=address,
        recipients=EmailRecipients(to=[address]),
    )
    return encode_email(email)


def plain_raw(address: str, body: str) -> bytes:
    """An ordinary email: no emailmw metadata header."""
    return (
        f"From: {address}\r\nTo: {address}\r\nSubject: hello\r\n"
        f"Message-ID: {new_message_id('example.test')}\r\n\r\n{body}\r\n"
    ).encode()


def malformed_raw(address: str) -> bytes:
    """Claims to be emailmw (metadata header) but its Publisher-GID is not a number."""
    return (
        f"From: {address}\r\nTo: {address}\r\nSubject: /t\r\n"
        f"Message-ID: {new_message_id('example.test')}\r\nPublisher-GID: not-a-number\r\n"
        "\r\nbody\r\n"
    ).encode()


def send(server: DevServer, address: str, raws: list[bytes]) -> None:
    """Send each message over one SMTP connection, in order."""
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        for raw in raws:
            smtp.sendmail(address, [address], raw)


def receive_n(receiver: ImapEmailReceiver, n: int, timeout: float = 15.0) -> list[EmailData]:
    """Receive until ``n`` emails came (or ``timeout``)."""
    got: list[EmailData] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += receiver.receive(min(1.0, max(0.0, deadline - time.monotonic())))
    return got


def mailbox_message_ids(server: DevServer, folder: str) -> list[str]:
    """The Message-IDs in ``folder``, in UID order (read with a separate session)."""
    account = server.account("alice")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with IMAPClient(server.host, server.imaps_port, ssl_context=context, timeout=10) as client:
        client.login(account.address, account.password)
        client.select_folder(folder, readonly=True)
        uids = client.search("ALL")
        found = client.fetch(uids, [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        ids = []
        for uid in sorted(found):
            header = found[uid][b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode()
            ids.append(header.split(":", 1)[1].strip())
        return ids


def options_for(server: DevServer, folder: str, **email: Any) -> Options:
    """Options for alice reading ``folder``; keyword arguments override ``email:`` keys."""
    tls = email.pop("tls_mode", "starttls")
    mode = email.pop("receive_mode", "auto")
    config = server.config("alice", mailbox=folder, tls=tls, receive_mode=mode)
    section = config["email"]
    for key, value in email.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            section[key] = {**section[key], **value}
        else:
            section[key] = value
    return Options.from_dict(config)


Factory = Callable[..., tuple[ImapEmailReceiver, StatsCounters, str, str]]


@pytest.fixture
def make_receiver(dev_server: DevServer) -> Iterator[Factory]:
    """Builds connected receivers on fresh folders; closes them all afterwards."""
    made: list[ImapEmailReceiver] = []

    def factory(
        *, connect: bool = True, before: int = 0, **email: Any
    ) -> tuple[ImapEmailReceiver, StatsCounters, str, str]:
        folder, address = dev_server.new_mailbox("alice")
        for i in range(before):
            dev_server.append("alice", emailmw_raw(address, f"old {i}"), folder)
        stats = StatsCounters()
        receiver = ImapEmailReceiver(
            options_for(dev_server, folder, **email).imap_settings(), stats
        )
        made.append(receiver)
        if connect:
            receiver.connect()
        return receiver, stats, folder, address

    yield factory
    for receiver in made:
        receiver.close()


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``target`` in a thread; its result (and end time) land in the returned dict."""
    box: dict[str, Any] = {}

    def run() -> None:
        box["result"] = target()
        box["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def dropped(stats: StatsCounters, reason: str) -> int:
    return stats.snapshot().dropped[reason]


# ----------------------------------------------------------------------------- delivery


@pytest.mark.parametrize("tls_mode", TLS_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_stream_arrives_in_order_exactly_once(
    make_receiver: Factory, dev_server: DevServer, mode: str, tls_mode: str
) -> None:
    receiver, _, folder, address = make_receiver(receive_mode=mode, tls_mode=tls_mode, before=2)
    bodies = [f"message {i}" for i in range(6)]
    send(dev_server, address, [emailmw_raw(address, b) for b in bodies[:3]])
    got = receive_n(receiver, 3)
    send(dev_server, address, [emailmw_raw(address, b) for b in bodies[3:]])
    got += receive_n(receiver, 3)
    assert sorted(e.content.body for e in got) == bodies  # each once, none of the old ones
    # oldest first: the mailbox's UID order (Postfix may deliver a burst out of send order)
    in_mailbox = mailbox_message_ids(dev_server, folder)[2:]
    assert [e.message_id for e in got] == in_mailbox
    assert receiver.receive(0.3) == []


def test_mail_already_there_is_not_received(make_receiver: Factory, dev_server: DevServer) -> None:
    receiver, _, folder, address = make_receiver(before=3)
    assert receiver.receive(0.5) == []
    dev_server.append("alice", emailmw_raw(address, "new"), folder)
    assert [e.content.body for e in receive_n(receiver, 1)] == ["new"]


@pytest.mark.parametrize("tls_mode", TLS_MODES)
def test_idle_sees_mail_that_came_before_idle_at_once(
    make_receiver: Factory, dev_server: DevServer, tls_mode: str
) -> None:
    """The EXISTS that comes with the "+ idling" continuation sits in imaplib's buffer:
    it must be seen without waiting for the next packet (the IMAPClient IDLE race)."""
    receiver, _, folder, address = make_receiver(receive_mode="idle", tls_mode=tls_mode)
    dev_server.append("alice", emailmw_raw(address, "early"), folder)
    started = time.monotonic()
    got = receiver.receive(5.0)
    assert [e.content.body for e in got] == ["early"]
    assert time.monotonic() - started < 0.4  # Dovecot's own IDLE notification takes 0.5 s


@pytest.mark.parametrize("mode", MODES)
def test_non_emailmw_and_malformed_are_skipped(
    make_receiver: Factory,
    dev_server: DevServer,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    receiver, stats, folder, address = make_receiver(receive_mode=mode)
    caplog.set_level(logging.DEBUG, logger="emailmw.transport.imap")
    for raw in (
        emailmw_raw(address, "first"),
        plain_raw(address, "not ours"),
        malformed_raw(address),
        emailmw_raw(address, "second"),
    ):
        dev_server.append("alice", raw, folder)
    got = receive_n(receiver, 2)
    assert [e.content.body for e in got] == ["first", "second"]
    assert dropped(stats, "not_emailmw") == 1
    assert dropped(stats, "malformed") == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "UID 3" in warnings[0].getMessage()
    assert "Publisher-GID" in warnings[0].getMessage()
    # the stream goes on
    dev_server.append("alice", emailmw_raw(address, "third"), folder)
    assert [e.content.body for e in receive_n(receiver, 1)] == ["third"]


def test_receive_raw_gives_every_email_undecoded(
    make_receiver: Factory, dev_server: DevServer
) -> None:
    receiver, stats, folder, address = make_receiver(before=1)
    raws = [emailmw_raw(address, "ours"), plain_raw(address, "not ours")]
    for raw in raws:
        dev_server.append("alice", raw, folder)
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        got += receiver.receive_raw(1.0)
    assert [uid for uid, _ in got] == [2, 3]
    assert [raw.replace(b"\r\n", b"\n") for _, raw in got] == [
        r.replace(b"\r\n", b"\n") for r in raws
    ]
    assert stats.snapshot().dropped_total == 0


@pytest.mark.parametrize("mode", ["poll", "auto"])
def test_oversized_email_is_skipped_by_size(
    make_receiver: Factory,
    dev_server: DevServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    limit = 4000
    receiver, stats, folder, address = make_receiver(
        receive_mode=mode, **{"max-message-size": limit}
    )
    biggest: list[int] = []
    original = imap_session.Session.fetch

    def spy(self: Any, uids: bytes, items: bytes) -> Any:
        ok, found = original(self, uids, items)
        for item in found.values():
            biggest.extend(len(v) for v in item.values() if isinstance(v, bytes))
        return ok, found

    monkeypatch.setattr(imap_session.Session, "fetch", spy)
    caplog.set_level(logging.WARNING, logger="emailmw.transport.imap")
    send(dev_server, address, [emailmw_raw(address, "small 1")])
    assert [e.content.body for e in receive_n(receiver, 1)] == ["small 1"]
    # APPEND, not SMTP: Postfix might deliver the small one first
    dev_server.append("alice", emailmw_raw(address, "x" * 200_000), folder)
    dev_server.append("alice", emailmw_raw(address, "small 2"), folder)
    assert [e.content.body for e in receive_n(receiver, 1)] == ["small 2"]
    assert dropped(stats, "too_large") == 1
    assert any("max-message-size" in r.getMessage() for r in caplog.records)
    assert max(biggest) <= limit  # never more of an email than max-message-size


# ----------------------------------------------------------------------------- connection loss


@pytest.mark.parametrize("mode", MODES)
def test_kick_reconnects_without_loss_or_duplicate(
    make_receiver: Factory,
    dev_server: DevServer,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    receiver, stats, _, address = make_receiver(receive_mode=mode)
    send(dev_server, address, [emailmw_raw(address, f"before {i}") for i in range(3)])
    got = receive_n(receiver, 3)
    caplog.set_level(logging.WARNING, logger="emailmw.transport.imap")
    dev_server.kick("alice")
    send(dev_server, address, [emailmw_raw(address, f"after {i}") for i in range(3)])
    got += receive_n(receiver, 3)
    assert receiver.receive(0.3) == []
    bodies = [e.content.body for e in got]
    assert sorted(bodies) == sorted(
        [f"before {i}" for i in range(3)] + [f"after {i}" for i in range(3)]
    )
    assert stats.snapshot().reconnects >= 1
    assert any("lost" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def own_server() -> Iterator[DevServer]:
    """A dev server of this module's own, for the tests that stop or restart Dovecot."""
    with DevServer(accounts=("alice",)) as server:
        yield server


def test_dovecot_restart_mid_stream(own_server: DevServer) -> None:
    """A stream goes on while Dovecot restarts: everything arrives, once."""
    server = own_server
    folder, address = server.new_mailbox("alice")
    stats = StatsCounters()
    receiver = ImapEmailReceiver(
        options_for(server, folder, receive_mode="auto").imap_settings(), stats
    )
    try:
        receiver.connect()
        got: list[EmailData] = []
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                got.extend(receiver.receive(None))

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        sent = []
        with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
            for i in range(30):
                if i == 10:
                    server.restart_dovecot()
                smtp.sendmail(address, [address], emailmw_raw(address, f"m{i}"))
                sent.append(f"m{i}")
                time.sleep(0.02)
        wait_for(lambda: len(got) >= 30, timeout=30)
        time.sleep(0.3)
        stop.set()
        receiver.interrupt()
        thread.join(5)
        assert sorted(e.content.body for e in got) == sorted(sent)
        assert stats.snapshot().reconnects >= 1
    finally:
        receiver.close()


def test_receive_keeps_its_timeout_while_the_server_is_down(
    own_server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = own_server
    folder, address = server.new_mailbox("alice")
    receiver = ImapEmailReceiver(options_for(server, folder, receive_mode="idle").imap_settings())
    try:
        receiver.connect()
        server.stop_dovecot()
        try:
            caplog.set_level(logging.WARNING, logger="emailmw.transport.imap")
            for _ in range(3):
                started = time.monotonic()
                assert receiver.receive(0.3) == []
                assert time.monotonic() - started < 1.0
            assert receiver.mode == "disconnected"
            thread, box = in_thread(lambda: receiver.receive(None))  # waits in the backoff
            time.sleep(0.3)
            interrupted = time.monotonic()
            receiver.interrupt()
            thread.join(2)
            assert box["result"] == []
            assert box["ended"] - interrupted < 0.5
        finally:
            server.start_dovecot()
        assert any("cannot connect" in r.getMessage() for r in caplog.records)
        server.append("alice", emailmw_raw(address, "back"), folder)
        assert [e.content.body for e in receive_n(receiver, 1)] == ["back"]
    finally:
        receiver.close()


def test_uidvalidity_change_loses_nothing_new(
    make_receiver: Factory, dev_server: DevServer
) -> None:
    """The folder is deleted and made again (a new UIDVALIDITY): emails already received
    are not received again (skipped on their headers, counted ``resync_skipped``), the
    new ones are."""
    receiver, stats, folder, address = make_receiver(receive_mode="poll")
    first = emailmw_raw(address, "first")
    dev_server.append("alice", first, folder)
    assert [e.content.body for e in receive_n(receiver, 1)] == ["first"]
    account = dev_server.account("alice")
    context = ssl.create_default_context(cafile=str(dev_server.ca_file))
    with IMAPClient(dev_server.host, dev_server.imaps_port, ssl_context=context) as admin:
        admin.login(account.address, account.password)
        admin.delete_folder(folder)
        admin.create_folder(folder)
        admin.append(folder, first)  # the same email, copied back
        admin.append(folder, emailmw_raw(address, "second"))
    got = receive_n(receiver, 1, timeout=20)
    assert [e.content.body for e in got] == ["second"]
    assert receiver.receive(0.5) == []
    assert dropped(stats, "resync_skipped") == 1
    assert dropped(stats, "duplicate") == 0


# ----------------------------------------------------------------------------- interrupt, close


@pytest.mark.parametrize("mode", MODES)
def test_interrupt_returns_promptly(make_receiver: Factory, mode: str) -> None:
    receiver, _, _, _ = make_receiver(receive_mode=mode)
    thread, box = in_thread(lambda: receiver.receive(None))
    time.sleep(0.3)
    if mode != "poll":
        assert receiver.mode == "idle"
    interrupted = time.monotonic()
    receiver.interrupt()
    thread.join(2)
    assert box["result"] == []
    assert box["ended"] - interrupted < 1.0
    # an interrupt before receive() makes the next call return at once
    receiver.interrupt()
    started = time.monotonic()
    assert receiver.receive(5.0) == []
    assert time.monotonic() - started < 0.5


def test_close_while_another_thread_receives(make_receiver: Factory, dev_server: DevServer) -> None:
    receiver, _, _, _ = make_receiver(receive_mode="auto")
    thread, box = in_thread(lambda: receiver.receive(None))
    time.sleep(0.3)
    started = time.monotonic()
    receiver.close()
    assert time.monotonic() - started < 1.0
    thread.join(2)
    assert box["result"] == []
    assert box["ended"] - started < 1.0
    assert receiver.mode == "closed"
    assert receiver.receive(1.0) == []
    receiver.close()  # idempotent
    with pytest.raises(ImapError):
        receiver.connect()


def test_receive_timeout_is_kept(make_receiver: Factory) -> None:
    receiver, _, _, _ = make_receiver(receive_mode="auto")
    for timeout in (0.0, 0.2):
        started = time.monotonic()
        assert receiver.receive(timeout) == []
        assert timeout <= time.monotonic() - started + 0.01 < timeout + 0.3


# ----------------------------------------------------------------------------- errors


def test_wrong_password(make_receiver: Factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver, _, _, _ = make_receiver(connect=False, user={"password": "Wr0ng-s3cret"})
    with pytest.raises(AuthenticationError) as info:
        receiver.connect()
    assert info.value.server is not None
    assert info.value.server in str(info.value)
    assert "Wr0ng-s3cret" not in str(info.value)
    assert all("Wr0ng-s3cret" not in r.getMessage() for r in caplog.records)


def test_password_is_never_logged(
    make_receiver: Factory, dev_server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver, _, folder, address = make_receiver(receive_mode="auto")
    dev_server.append("alice", emailmw_raw(address, "x"), folder)
    assert len(receive_n(receiver, 1)) == 1
    receiver.close()
    password = dev_server.account("alice").password
    assert caplog.records
    assert all(password not in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed CA certificate that did not sign the dev server's certificate."""
    directory = tmp_path_factory.mktemp("other-ca")
    cert = directory / "ca.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(directory / "key.pem"), "-out", str(cert),
            "-days", "1", "-subj", "/CN=Some Other CA",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert


@pytest.mark.parametrize("tls_mode", TLS_MODES)
def test_wrong_ca(make_receiver: Factory, other_ca: Path, tls_mode: str) -> None:
    receiver, _, _, _ = make_receiver(
        connect=False, tls_mode=tls_mode, tls={"ca-file": str(other_ca)}
    )
    with pytest.raises(TlsError, match="certificate verification failed"):
        receiver.connect()


def test_missing_ca_file(make_receiver: Factory, tmp_path: Path) -> None:
    receiver, _, _, _ = make_receiver(connect=False, tls={"ca-file": str(tmp_path / "nope.pem")})
    with pytest.raises(TlsError, match="ca-file"):
        receiver.connect()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bare_options(url: str, **email: Any) -> Options:
    section = {
        "user": {
            "url-smtp": "smtp://127.0.0.1:1",
            "url-imap": url,
            "username": "alice@example.test",
            "password": "pw",
        },
        **email,
    }
    return Options.from_dict({"email": section})


@pytest.mark.parametrize("scheme", ["imap", "imaps"])
def test_nothing_listening(scheme: str) -> None:
    receiver = ImapEmailReceiver(
        bare_options(f"{scheme}://127.0.0.1:{free_port()}").imap_settings()
    )
    try:
        with pytest.raises(ConnectError, match="refused") as info:
            receiver.connect()
        assert f"{scheme}://127.0.0.1:" in str(info.value)
    finally:
        receiver.close()


@pytest.mark.parametrize("scheme", ["imap", "imaps"])
def test_silent_server_times_out(scheme: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        receiver = ImapEmailReceiver(
            bare_options(f"{scheme}://127.0.0.1:{port}", timeout=1.0).imap_settings()
        )
        try:
            started = time.monotonic()
            with pytest.raises(ConnectError, match="no answer within 1 s"):
                receiver.connect()
            assert time.monotonic() - started < 3.0
        finally:
            receiver.close()


def test_no_such_mailbox(make_receiver: Factory) -> None:
    receiver, _, _, _ = make_receiver(connect=False, mailbox="does-not-exist")
    with pytest.raises(ImapError, match="does-not-exist") as info:
        receiver.connect()
    assert type(info.value) is ImapError


class FakeImapServer:
    """A scripted IMAP server on loopback that offers no STARTTLS and refuses LOGIN."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lines: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn, conn.makefile("rb") as reader:
                conn.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready\r\n")
                for line in reader:
                    self.lines.append(line)
                    tag, _, rest = line.partition(b" ")
                    command = rest.split(b" ", 1)[0].strip().upper()
                    if command == b"CAPABILITY":
                        conn.sendall(
                            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n"
                        )
                    elif command == b"LOGOUT":
                        conn.sendall(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                        return
                    else:
                        conn.sendall(tag + b" NO [AUTHENTICATIONFAILED] nope\r\n")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def fake_server() -> Iterator[FakeImapServer]:
    server = FakeImapServer()
    yield server
    server.close()


def test_plaintext_login_to_remote_host_is_refused(
    fake_server: FakeImapServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imap_session, "is_loopback", lambda host: False)
    receiver = ImapEmailReceiver(
        bare_options(f"imap://127.0.0.1:{fake_server.port}").imap_settings()
    )
    try:
        with pytest.raises(TlsError, match="STARTTLS"):
            receiver.connect()
    finally:
        receiver.close()
    fake_server.close()
    assert not any(b"LOGIN" in line.upper() for line in fake_server.lines)


def test_plaintext_login_when_allowed(
    fake_server: FakeImapServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imap_session, "is_loopback", lambda host: False)
    receiver = ImapEmailReceiver(
        bare_options(
            f"imap://127.0.0.1:{fake_server.port}", tls={"allow-insecure": True}
        ).imap_settings()
    )
    try:
        with pytest.raises(AuthenticationError, match="AUTHENTICATIONFAILED"):
            receiver.connect()
    finally:
        receiver.close()


def test_is_loopback() -> None:
    assert imap_session.is_loopback("127.0.0.1")
    assert imap_session.is_loopback("::1")
    assert imap_session.is_loopback("[::1]")
    assert imap_session.is_loopback("localhost")
    assert not imap_session.is_loopback("192.0.2.1")
    assert not imap_session.is_loopback("imap.example.com")


# ----------------------------------------------------------------------------- probe, counters


def test_probe(make_receiver: Factory) -> None:
    receiver, _, folder, _ = make_receiver(receive_mode="auto")
    info = receiver.probe()
    assert info["idle"] is True
    assert "IDLE" in info["capabilities"]
    assert info["tls"] == "starttls"
    assert str(info["tls_version"]).startswith("TLS")
    assert info["mailbox"] == folder
    assert info["uidnext"] == 1
    assert info["uidvalidity"] > 0
    assert "Dovecot" in info["greeting"]
    assert receiver.commands_sent > 0


def test_probe_while_another_thread_receives(make_receiver: Factory) -> None:
    receiver, _, _, _ = make_receiver(receive_mode="idle")
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            receiver.receive(None)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert receiver.probe()["idle"] is True
    assert time.monotonic() - started < 1.0
    stop.set()
    receiver.interrupt()
    thread.join(2)
    assert not thread.is_alive()


def test_idle_subscriber_sends_almost_nothing(make_receiver: Factory) -> None:
    receiver, _, _, _ = make_receiver(receive_mode="auto")
    receiver.receive(0.2)
    before = receiver.commands_sent
    for _ in range(10):
        assert receiver.receive(0.1) == []
    assert receiver.commands_sent == before
    assert receiver.mode == "idle"


# ----------------------------------------------------------------------------- the auto cadence


def simulate(arrivals: list[float], rtt: float = 0.0003) -> tuple[list[int], list[float]]:
    """Drive a Cadence the way the receiver does (NOOP polls, IDLE when it says so)
    against emails that become visible at ``arrivals``; return the polls each email
    took (the detecting one included) and each email's detection delay."""
    cadence = imap_cadence.Cadence()
    polls: list[int] = []
    delays: list[float] = []
    count, i, now = 0, 0, arrivals[0]
    last_sync = now
    while i < len(arrivals):
        due = cadence.next_poll(now, last_sync)
        if due is None:  # IDLE: Dovecot reports 0.5 s after the next arrival
            now = arrivals[i] + 0.5
            done, within = now, float("inf")
        else:
            now = max(now, due)
            done, within = now + rtt, now + rtt - last_sync
        count += 1
        seen = [a for a in arrivals[i:] if a <= now]
        if seen:
            cadence.arrival(done, within, len(seen))
            delays += [done - a for a in seen]
            polls.append(count)
            count, i = 0, i + len(seen)
            done += rtt  # the listing
        last_sync = now = done
    return polls, delays


def steady(period: float, n: int, jitter: float, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return sorted(i * period + 0.005 + rng.uniform(-jitter, jitter) for i in range(n))


@pytest.mark.parametrize("period", [0.02, 0.1, 0.5])
def test_cadence_polls_a_steady_stream_just_in_time(period: float) -> None:
    polls, delays = simulate(steady(period, 60, jitter=0.001))
    polls, delays = polls[10:], delays[10:]  # once learnt
    assert statistics.mean(polls) < 3.5
    assert statistics.median(delays) < 0.003


def test_cadence_follows_a_change_of_pace_and_goes_back_to_idle() -> None:
    arrivals = steady(0.1, 40, jitter=0.001)
    arrivals += [5.0 + a for a in steady(0.25, 30, jitter=0.001)]
    polls, delays = simulate(arrivals)
    assert len(delays) == len(arrivals)
    assert statistics.mean(polls[-10:]) < 3.5
    assert statistics.median(delays[-10:]) < 0.003
    cadence = imap_cadence.Cadence()
    assert cadence.next_poll(0.0, 0.0) is None  # nothing seen yet: IDLE
    cadence.arrival(100.0, float("inf"), 1)  # one email through IDLE, out of the blue
    assert cadence.next_poll(100.0, 100.0) is None  # sporadic: stays on IDLE
    cadence.arrival(101.0, float("inf"), 1)  # another one soon after: poll for more
    assert cadence.next_poll(101.0, 101.0) is not None
    cadence = imap_cadence.Cadence()
    for i in range(10):
        cadence.arrival(i * 0.1, 0.001, 1)
    assert cadence.period == pytest.approx(0.1)
    assert cadence.next_poll(1.0, 1.0) is not None
    assert cadence.next_poll(3.5, 3.5) is None  # quiet for 2.5 s: IDLE
