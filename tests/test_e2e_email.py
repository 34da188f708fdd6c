"""End to end over the real mail stack, through the public API only (plus
``Context.stats()``): foreign and malformed emails in the stream, Bcc, several
readers of one mailbox, prompt shutdown while in IDLE, and the errors
``Context.init()`` raises when it cannot connect."""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from mailstack import stored_emails

import emailmw
from emailmw.devserver import DevServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.mailstack]

WAIT = 20.0
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def options(
    server: DevServer,
    account: str = "alice",
    folder_address: tuple[str, str] | None = None,
    *,
    tls_mode: str = "starttls",
    receive_mode: str = "auto",
    **email: Any,
) -> emailmw.Options:
    """Options reading and sending to ``folder_address`` (a fresh folder of
    ``account`` when None), its address also the ``From``; ``email`` overrides
    keys of the ``email:`` section (``user`` merged)."""
    folder, address = folder_address or server.new_mailbox(account)
    config = server.config(
        account, mailbox=folder, to=address, tls=tls_mode, receive_mode=receive_mode
    )
    section = config["email"]
    section["from"] = address
    for name, value in email.items():
        key = name.replace("_", "-")
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            section[key] = {**section[key], **value}
        else:
            section[key] = value
    return emailmw.Options.from_dict(config)


@pytest.fixture
def contexts() -> Iterator[Callable[[emailmw.Options], emailmw.Context]]:
    """Make running contexts; all shut down after the test."""
    made: list[emailmw.Context] = []

    def make(opts: emailmw.Options) -> emailmw.Context:
        ctx = emailmw.Context(opts).init()
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.shutdown()


def header_block(raw: bytes) -> str:
    return raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait for another thread's state to change (short sleeps between looks)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# ------------------------------------------------------------------------ foreign mail


def test_foreign_and_malformed_emails_are_skipped_logged_counted_and_the_stream_goes_on(
    dev_server: DevServer,
    contexts: Callable[[emailmw.Options], emailmw.Context],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="emailmw")
    folder, address = dev_server.new_mailbox("alice")
    ctx = contexts(options(dev_server, folder_address=(folder, address)))
    sub = emailmw.Subscription("/stream", context=ctx)
    pub = emailmw.Publisher("/stream", context=ctx)
    pub.publish("first")
    assert emailmw.wait_for_message(sub, WAIT) == "first"
    now = time.time_ns()
    head = f"From: other@example.test\r\nTo: {address}\r\n"
    junk = {
        # a person's email: not emailmw at all
        "not_emailmw": f"{head}Subject: /stream\r\nMessage-ID: <human@x>\r\n\r\nHi!\r\n",
        # an emailmw header with a value that does not parse (refused by the codec)
        "bad_gid": f"{head}Subject: /stream\r\nPublisher-GID: not-a-number\r\n"
        f"Source-Timestamp: {now}\r\nMessage-ID: <bad-gid@x>\r\n\r\nbody\r\n",
        # an unknown charset: the body cannot be decoded
        "bad_charset": f"{head}Subject: /stream\r\nPublisher-GID: 5\r\nSource-Timestamp: {now}"
        "\r\nMessage-ID: <bad-charset@x>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=no-such-charset\r\n\r\nbody\r\n",
        # a service header without its partner (refused by the service handler)
        "half_request": f"{head}Subject: /stream\r\nClient-GID: 9\r\n"
        f"Source-Timestamp: {now}\r\nMessage-ID: <half@x>\r\n\r\nbody\r\n",
        # no Source-Timestamp (refused by the subscription handler)
        "no_timestamp": f"{head}Subject: /stream\r\nPublisher-GID: 6\r\n"
        "Message-ID: <no-stamp@x>\r\n\r\nbody\r\n",
        # not even a header block
        "garbage": "\x00\x01 this is no email\r\n\r\n\xff",
    }
    for raw in junk.values():
        dev_server.append("alice", raw.encode("latin-1"), folder)
    # A hand-written emailmw message (as another implementation would write it)
    # appended directly is delivered like any other.
    dev_server.append(
        "alice",
        f"{head}Subject: /stream\r\nPublisher-GID: 7\r\nSource-Timestamp: {now}\r\n"
        "Message-ID: <hand@x>\r\n\r\nhand-written\r\n".encode(),
        folder,
    )
    pub.publish("second")
    message, info = emailmw.wait_for_message_with_info(sub, WAIT)
    assert (message, info.publisher_gid.value) == ("hand-written", 7)
    assert emailmw.wait_for_message(sub, WAIT) == "second"

    dropped = ctx.stats().dropped
    assert dropped["not_emailmw"] == 2, dropped  # the person's email and the garbage
    assert dropped["malformed"] == 4, dropped
    assert ctx.stats().delivered == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for expected in (
        "UID 3: invalid Publisher-GID value 'not-a-number'",
        "UID 4: cannot decode the body",
        "<half@x>",
        "<no-stamp@x>",
    ):
        assert sum(expected in text for text in warnings) == 1, (expected, warnings)
    assert len(warnings) == 4, warnings
    not_ours = [
        r.getMessage() for r in caplog.records if "not an emailmw message" in r.getMessage()
    ]
    assert len(not_ours) == 2, not_ours
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # and the stream goes on
    pub.publish("third")
    assert emailmw.wait_for_message(sub, WAIT) == "third"


# ------------------------------------------------------------------------ recipients


def test_bcc_recipients_get_the_mail_but_no_bcc_header(
    dev_server: DevServer, contexts: Callable[[emailmw.Options], emailmw.Context]
) -> None:
    alice_folder, alice_address = dev_server.new_mailbox("alice")
    bob_folder, bob_address = dev_server.new_mailbox("bob")
    alice = contexts(
        options(
            dev_server,
            folder_address=(alice_folder, alice_address),
            recipients={"to": alice_address, "bcc": bob_address},
        )
    )
    bob = contexts(options(dev_server, "bob", (bob_folder, bob_address)))
    alice_sub = emailmw.Subscription("/secret", context=alice)
    bob_sub = emailmw.Subscription("/secret", context=bob)
    pub = emailmw.Publisher("/secret", context=alice)
    pub.publish("for alice, and bob in secret")
    assert emailmw.wait_for_message(alice_sub, WAIT) == "for alice, and bob in secret"
    message, info = emailmw.wait_for_message_with_info(bob_sub, WAIT)
    assert message == "for alice, and bob in secret"
    assert info.publisher_gid == pub.gid
    for account, folder in (("alice", alice_folder), ("bob", bob_folder)):
        (raw,) = stored_emails(dev_server, folder, 1, account, timeout=WAIT)
        headers = header_block(raw)
        lines = [line.lower() for line in headers.splitlines()]
        assert not any(line.startswith("bcc:") for line in lines), headers
        # bob's address is nowhere in the headers (Delivered-To aside, which
        # Dovecot adds to bob's copy)
        visible = [line for line in lines if not line.startswith("delivered-to:")]
        assert not any(bob_address.lower() in line for line in visible), headers


def test_every_reader_of_a_mailbox_gets_every_message(
    dev_server: DevServer, contexts: Callable[[emailmw.Options], emailmw.Context]
) -> None:
    box = dev_server.new_mailbox("alice")
    readers = [contexts(options(dev_server, folder_address=box, receive_mode=m))
               for m in ("auto", "idle", "poll")]  # fmt: skip
    subs = [emailmw.Subscription("/all", context=ctx) for ctx in readers]
    pub = emailmw.Publisher("/all", context=readers[0])
    sent = [f"m{i}" for i in range(5)]
    for text in sent:
        pub.publish(text)
    for sub in subs:
        got = [emailmw.wait_for_message(sub, WAIT) for _ in sent]
        assert sorted(got) == sent


def test_responses_reach_the_requesting_context_only(
    dev_server: DevServer, contexts: Callable[[emailmw.Options], emailmw.Context]
) -> None:
    """Two client contexts share one mailbox with the server: each gets only its
    own responses, although every context sees every email."""
    box = dev_server.new_mailbox("alice")
    server_ctx, ctx_a, ctx_b = (contexts(options(dev_server, folder_address=box))
                                for _ in range(3))  # fmt: skip
    server = emailmw.ServiceServer("/shared", context=server_ctx)
    client_a = emailmw.ServiceClient("/shared", context=ctx_a)
    client_b = emailmw.ServiceClient("/shared", context=ctx_b)
    seq_a = client_a.send_request("from a")
    seq_b = client_b.send_request("from b")
    assert seq_a == seq_b == 1
    for _ in range(2):
        request = emailmw.wait_for_request(server, WAIT)
        server.send_response(request.id, f"re: {request.content}")
    assert emailmw.wait_for_response(seq_a, client_a, WAIT) == "re: from a"
    assert emailmw.wait_for_response(seq_b, client_b, WAIT) == "re: from b"
    time.sleep(0.3)  # proving an absence: nothing else comes
    assert not client_a.has_response() and not client_b.has_response()


# ------------------------------------------------------------------------ shutdown


@pytest.mark.parametrize("receive_mode", ["idle", "auto"])
def test_shutdown_while_in_idle_is_prompt(dev_server: DevServer, receive_mode: str) -> None:
    ctx = emailmw.Context(options(dev_server, receive_mode=receive_mode)).init()
    try:
        sub = emailmw.Subscription("/idle", context=ctx)
        receiver: Any = ctx._receiver
        wait_until(lambda: receiver.mode == "idle")
        time.sleep(0.2)  # well into the IDLE wait
        assert receiver.mode == "idle"
        threads_before = {t.name for t in threading.enumerate()}
        assert "emailmw-poll" in threads_before
        started = time.monotonic()
        assert ctx.shutdown() is True
        took = time.monotonic() - started
    finally:
        ctx.shutdown()
    assert took < 1.0, f"shutdown took {took:.3f} s"
    assert "emailmw-poll" not in {t.name for t in threading.enumerate() if t.is_alive()}
    with pytest.raises(emailmw.ContextError):
        sub.get_message()


# ------------------------------------------------------------------------ init errors


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate that did not sign the dev server's certificate."""
    directory = tmp_path_factory.mktemp("other-ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(directory / "key.pem"), "-out", str(directory / "ca.pem"),
         "-days", "1", "-subj", "/CN=Some Other CA"],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return directory / "ca.pem"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TIMEOUT = 2.0  #: the configured connect timeout in these tests


def init_fails(opts: emailmw.Options, error: type[emailmw.TransportError]) -> str:
    """``Context(opts).init()`` raises ``error`` within the configured timeout, starts
    no thread and leaves the context unusable; returns the message."""
    threads_before = set(threading.enumerate())
    ctx = emailmw.Context(opts)
    started = time.monotonic()
    with pytest.raises(error) as info:
        ctx.init()
    took = time.monotonic() - started
    assert took < TIMEOUT + 1.0, f"{error.__name__} after {took:.2f} s"
    assert not ctx.ok
    assert not set(threading.enumerate()) - threads_before, "init() left a thread running"
    with pytest.raises(emailmw.ContextError):
        emailmw.Publisher("/x", context=ctx)
    message = str(info.value)
    assert info.value.server, "the error names no server"
    assert "127.0.0.1" in message
    return message


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_init_with_a_wrong_password(dev_server: DevServer, tls: str) -> None:
    wrong = "Not-The-Password-0815"
    opts = options(dev_server, tls_mode=tls, timeout=TIMEOUT, user={"password": wrong})
    message = init_fails(opts, emailmw.AuthenticationError)
    assert wrong not in message and wrong not in repr(opts)


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_init_with_a_wrong_ca(dev_server: DevServer, other_ca: Path, tls: str) -> None:
    opts = options(dev_server, tls_mode=tls, timeout=TIMEOUT, tls={"ca-file": str(other_ca)})
    message = init_fails(opts, emailmw.TlsError)
    assert "certificate" in message


@pytest.mark.parametrize("down", ["smtp", "imap", "both"])
def test_init_with_a_server_not_running(dev_server: DevServer, down: str) -> None:
    user: dict[str, str] = {}
    if down in ("smtp", "both"):
        user["url-smtp"] = f"smtp://127.0.0.1:{free_port()}"
    if down in ("imap", "both"):
        user["url-imap"] = f"imap://127.0.0.1:{free_port()}"
    message = init_fails(options(dev_server, timeout=TIMEOUT, user=user), emailmw.ConnectError)
    assert "refused" in message


@pytest.mark.parametrize("silent", ["smtp", "imap"])
def test_init_with_a_silent_server_times_out(dev_server: DevServer, silent: str) -> None:
    with socket.socket() as listener:  # accepts connections (the kernel does), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        user = {f"url-{silent}": f"{silent}://127.0.0.1:{port}"}
        opts = options(dev_server, timeout=TIMEOUT, user=user)
        message = init_fails(opts, emailmw.ConnectError)
    assert f"127.0.0.1:{port}" in message


# ------------------------------------------------------------------------ examples


class Example:
    """``python examples/NAME.py ARGS`` in the background, its output read by a thread."""

    def __init__(self, cwd: Path, name: str, *args: str, env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:  # closed here, by the only thread that reads it
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"{self.name}: no {text!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)

    def finish(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} still running after {timeout} s") from None
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def examples(tmp_path: Path) -> Iterator[Callable[..., Example]]:
    """Start examples (``run(name, *args, env=...)``); all killed after the test."""
    started: list[Example] = []

    def run(name: str, *args: str, config: Path | None = None) -> Example:
        env = {k: v for k, v in os.environ.items() if k != "EMAIL_CONFIG_FILE"}
        if config is not None:
            env["EMAIL_CONFIG_FILE"] = str(config)
        example = Example(tmp_path, name, *args, env=env)
        started.append(example)
        return example

    yield run
    for example in started:
        example.kill()


def example_config(server: DevServer, path: Path) -> Path:
    """A config file for a fresh folder of alice's, replies coming back to it."""
    folder, address = server.new_mailbox("alice")
    config = server.config("alice", mailbox=folder, to=address)
    config["email"]["from"] = address
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_examples_pub_and_sub(
    dev_server: DevServer, tmp_path: Path, examples: Callable[..., Example]
) -> None:
    # The config found through $EMAIL_CONFIG_FILE, as the README runs them.
    config = example_config(dev_server, tmp_path / "alice.yml")
    sub = examples("sub.py", "--topic", "/ex", "--count", "3", "--timeout", "20", config=config)
    sub.wait_for("listening on '/ex'")
    pub = examples("pub.py", "--topic", "/ex", "--count", "3", "--interval", "0", config=config)
    assert pub.finish() == 0, pub.output
    assert sum("published 'hello #" in line for line in pub.lines) == 3, pub.output
    assert sub.finish() == 0, sub.output
    received = sorted(line.split("'")[1] for line in sub.lines if line.startswith("received"))
    assert received == ["hello #1", "hello #2", "hello #3"], sub.output


def test_examples_service_server_and_client(
    dev_server: DevServer, tmp_path: Path, examples: Callable[..., Example]
) -> None:
    # The config found as ./email.yml in the working directory.
    example_config(dev_server, tmp_path / "email.yml")
    server = examples("service_server.py", "--count", "4", "--timeout", "30")
    server.wait_for("serving '/add'")
    client = examples("service_client.py", "--count", "4", "--timeout", "20")
    assert client.finish() == 0, client.output
    for i in range(1, 5):
        assert f"{i} + {i * 10} = {i * 11} (request #{i})" in client.lines, client.output
    assert server.finish() == 0, server.output
    assert sum("-> " in line for line in server.lines) == 4, server.output


def test_examples_sub_and_client_fail_on_timeout(
    dev_server: DevServer, tmp_path: Path, examples: Callable[..., Example]
) -> None:
    config = example_config(dev_server, tmp_path / "alice.yml")
    sub = examples("sub.py", "--config", str(config), "--count", "1", "--timeout", "1")
    client = examples("service_client.py", "--config", str(config), "--count", "1",
                      "--timeout", "1")  # fmt: skip
    assert sub.finish() == 1, sub.output
    assert "timeout" in sub.output and "Traceback" not in sub.output
    assert client.finish() == 1, client.output
    assert "timeout" in client.output and "Traceback" not in client.output


def test_examples_report_a_bad_config_without_a_traceback(
    tmp_path: Path, examples: Callable[..., Example]
) -> None:
    (tmp_path / "bad.yml").write_text("email:\n  user: {}\n")
    pub = examples("pub.py", "--config", str(tmp_path / "bad.yml"))
    assert pub.finish() == 1
    assert "email.user.url-smtp" in pub.output and "Traceback" not in pub.output
