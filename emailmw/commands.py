"""The network subcommands of ``emailmw`` (see :mod:`emailmw.cli`).

Each takes the ``--config`` path (or ``None`` to find the file) and a text
stream to write to, and returns an exit status. Errors are raised as
:class:`~emailmw.EmailmwError` and reported by the CLI.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, BinaryIO, TextIO

from emailmw.context import Context
from emailmw.errors import ConfigError, WaitTimeoutError
from emailmw.options import Options
from emailmw.pubsub import Publisher, Subscription
from emailmw.stats import StatsCounters
from emailmw.timeout import Deadline
from emailmw.wait import wait_for_message_with_info

__all__ = ["check_config", "echo", "publish", "receive_raw", "send_raw"]


def _options(config: str | None) -> Options:
    options = Options.load() if config is None else Options.from_file(config)
    if options.intraprocess:
        raise ConfigError("this command needs a mail server, but the config says intraprocess")
    return options


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return " ".join(str(v) for v in value)
    return str(value)


def check_config(config: str | None, out: TextIO) -> int:
    """Load the config, log in to both servers and report what they offer."""
    from emailmw.transport.imap import ImapEmailReceiver
    from emailmw.transport.smtp import SmtpEmailSender

    path = config or Options.find_file()
    options = _options(config)
    assert options.user is not None
    out.write(f"config:  {path}\n")
    out.write(f"account: {options.user.username}\n")
    sender = SmtpEmailSender(options.smtp_settings(), StatsCounters())
    try:
        sender.connect()
        out.write(f"SMTP     {options.user.smtp}: OK\n")
        for key, value in sender.probe().items():
            out.write(f"  {key}: {_describe(value)}\n")
    finally:
        sender.close()
    receiver = ImapEmailReceiver(options.imap_settings(), StatsCounters())
    try:
        receiver.connect()
        out.write(f"IMAP     {options.user.imap}: OK (mailbox {options.mailbox!r})\n")
        for key, value in receiver.probe().items():
            out.write(f"  {key}: {_describe(value)}\n")
    finally:
        receiver.close()
    out.write("configuration OK\n")
    return 0


def send_raw(config: str | None, file: str | None, out: TextIO) -> int:
    """Send a raw RFC 5322 email (from ``file`` or stdin) to the configured recipients."""
    from emailmw.transport.smtp import SmtpEmailSender

    options = _options(config)
    stream: BinaryIO
    if file is None:
        raw = sys.stdin.buffer.read()
    else:
        with open(file, "rb") as stream:
            raw = stream.read()
    sender = SmtpEmailSender(options.smtp_settings(), StatsCounters())
    try:
        sender.connect()
        sender.send_raw(raw)
    finally:
        sender.close()
    out.write(f"sent {len(raw)} bytes via {options.user.smtp if options.user else '?'}\n")
    return 0


def receive_raw(config: str | None, count: int, timeout: float | None, out: TextIO) -> int:
    """Print each email that arrives in the mailbox as raw bytes, separated by a line."""
    from emailmw.transport.imap import ImapEmailReceiver

    options = _options(config)
    receiver = ImapEmailReceiver(options.imap_settings(), StatsCounters())
    deadline = Deadline(timeout)
    received = 0
    receiver.connect()
    try:
        while count <= 0 or received < count:
            remaining = deadline.remaining()
            if remaining == 0:
                break
            for uid, raw in receiver.receive_raw(remaining):
                received += 1
                out.write(f"--- email {received} (UID {uid}, {len(raw)} bytes) ---\n")
                out.write(raw.decode("utf-8", "replace"))
                if not raw.endswith(b"\n"):
                    out.write("\n")
                out.flush()
                if count > 0 and received >= count:
                    break
    finally:
        receiver.close()
    return 0 if count <= 0 or received >= count else 1


def publish(config: str | None, topic: str, message: str, out: TextIO) -> int:
    """Publish one message."""
    with Context(_options(config)) as ctx:
        Publisher(topic, context=ctx).publish(message)
    out.write(f"published {len(message)} characters on {topic!r}\n")
    return 0


def echo(config: str | None, topic: str, count: int, timeout: float | None, out: TextIO) -> int:
    """Print messages published on ``topic`` as they arrive."""
    received = 0
    deadline = Deadline(timeout)
    with Context(_options(config)) as ctx:
        subscription = Subscription(topic, context=ctx)
        out.write(f"listening on {topic!r} (Ctrl-C to stop)\n")
        out.flush()
        while count <= 0 or received < count:
            try:
                message, info = wait_for_message_with_info(subscription, deadline.remaining())
            except WaitTimeoutError:
                break
            received += 1
            delay_ms = (time.time_ns() - info.source_timestamp.nanoseconds) / 1e6
            out.write(f"[{info.publisher_gid.value} +{delay_ms:.1f} ms] {message}{os.linesep}")
            out.flush()
    return 0 if count <= 0 or received >= count else 1
