"""The network subcommands of ``emailmw`` (see :mod:`emailmw.cli`).

Each takes the ``--config`` path (or ``None`` to find the file) and a text
stream to write to, and returns an exit status. Errors are raised as
:class:`~emailmw.EmailmwError` and reported by the CLI.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, BinaryIO, TextIO

from emailmw._progress import ProgressReporter
from emailmw.context import Context
from emailmw.errors import ConfigError, ContextError, WaitTimeoutError
from emailmw.info import MessageInfo, Timestamp
from emailmw.options import Options
from emailmw.pubsub import Publisher, Subscription
from emailmw.service import ServiceClient, ServiceServer
from emailmw.stats import StatsCounters
from emailmw.timeout import Deadline
from emailmw.wait import WaitSet, wait_for_message_with_info, wait_for_response

__all__ = [
    "call",
    "check_config",
    "echo",
    "history",
    "hz",
    "hz_report",
    "message_json",
    "ping",
    "ping_summary",
    "prune",
    "publish",
    "receive_raw",
    "run_call",
    "run_echo",
    "run_history",
    "run_hz",
    "run_ping",
    "run_prune",
    "run_topics",
    "send_raw",
    "topics",
]

#: ``emailmw hz`` reports once per this many seconds.
HZ_PERIOD = 1.0


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


def echo(
    config: str | None,
    topic: str,
    count: int,
    timeout: float | None,
    out: TextIO,
    *,
    as_json: bool = False,
    err: TextIO | None = None,
) -> int:
    """Print messages published on ``topic`` as they arrive (see :func:`run_echo`)."""
    with Context(_options(config)) as ctx:
        return run_echo(ctx, topic, count, timeout, out, as_json=as_json, err=err)


def run_echo(
    ctx: Context,
    topic: str,
    count: int,
    timeout: float | None,
    out: TextIO,
    *,
    as_json: bool = False,
    err: TextIO | None = None,
) -> int:
    """Print the messages on ``topic`` of ``ctx`` as they arrive, one line each and
    flushed per line; stop after ``count`` messages (0: never) or ``timeout``
    seconds, or when ``ctx`` shuts down.

    Plain lines are ``[GID +DELAY ms] MESSAGE``; with ``as_json`` each line is
    :func:`message_json`, and the "listening" line goes to ``err`` (default
    stderr) so that ``out`` holds nothing but JSON. Returns 1 if fewer than
    ``count`` messages came, else 0.
    """
    received = 0
    deadline = Deadline(timeout)
    subscription = Subscription(topic, context=ctx)
    notice = (err or sys.stderr) if as_json else out
    notice.write(f"listening on {topic!r} (Ctrl-C to stop)\n")
    notice.flush()
    while count <= 0 or received < count:
        try:
            message, info = wait_for_message_with_info(subscription, deadline.remaining())
        except (WaitTimeoutError, ContextError):
            break
        received += 1
        if as_json:
            out.write(message_json(topic, message, info) + "\n")
        else:
            delay_ms = (time.time_ns() - info.source_timestamp.nanoseconds) / 1e6
            out.write(f"[{info.publisher_gid.value} +{delay_ms:.1f} ms] {message}{os.linesep}")
        out.flush()
    return 0 if count <= 0 or received >= count else 1


def message_json(topic: str, message: str, info: MessageInfo) -> str:
    """One received message as a single line of JSON (what ``emailmw echo --json``
    prints): ``topic``, ``message``, ``source_timestamp`` and
    ``received_timestamp`` (integer nanoseconds since the Unix epoch),
    ``publisher_gid`` (integer) and ``headers`` (the publisher's additional
    headers, an object)."""
    return json.dumps(
        {
            "topic": topic,
            "message": message,
            "source_timestamp": info.source_timestamp.nanoseconds,
            "received_timestamp": info.received_timestamp.nanoseconds,
            "publisher_gid": info.publisher_gid.value,
            "headers": dict(info.headers),
        },
        ensure_ascii=False,
    )


def call(config: str | None, service: str, request: str, timeout: float | None, out: TextIO) -> int:
    """Send one request and print its response (see :func:`run_call`)."""
    with Context(_options(config)) as ctx:
        return run_call(ctx, service, request, timeout, out)


def run_call(ctx: Context, service: str, request: str, timeout: float | None, out: TextIO) -> int:
    """Send ``request`` (a ``str``) to ``service`` and print the response on one
    line of ``out``.

    ``timeout`` follows the timeout rule (``None`` or negative: forever).
    Raises :class:`~emailmw.WaitTimeoutError` when no response came in time
    (the CLI reports it and exits 1).
    """
    client = ServiceClient(service, context=ctx)
    sequence_number = client.send_request(request)
    try:
        response = wait_for_response(sequence_number, client, timeout)
    except WaitTimeoutError as exc:
        raise WaitTimeoutError(f"{exc} (is a server for {service!r} running?)") from None
    out.write(f"{response}{os.linesep}")
    out.flush()
    return 0


#: ``emailmw hz --clock`` choices: whose time stamps the intervals are measured between.
HZ_CLOCKS = ("source", "received")


def hz(
    config: str | None,
    topic: str,
    window: int,
    out: TextIO,
    err: TextIO | None = None,
    *,
    clock: str = "source",
) -> int:
    """Print the message rate on ``topic`` every second (see :func:`run_hz`)."""
    with Context(_options(config)) as ctx:
        return run_hz(ctx, topic, window, out, err, clock=clock)


def run_hz(
    ctx: Context,
    topic: str,
    window: int,
    out: TextIO,
    err: TextIO | None = None,
    *,
    clock: str = "source",
) -> int:
    """Print the rate of the messages on ``topic`` once a second until ``ctx``
    shuts down or the process is interrupted (Ctrl-C, or SIGTERM as the CLI maps
    it); either way it returns 0.

    Like ``ros2 topic hz``: over the last ``window`` messages, the average rate,
    the shortest and longest interval, their standard deviation and the number
    of messages::

        average rate: 20.012
        \tmin: 0.041s max: 0.062s std dev: 0.00420s window: 41

    ``clock="source"`` (the default) measures between the messages'
    ``Source-Timestamp`` (when they were published); ``clock="received"``
    between the times emailmw received them. Email arrives in bursts (one IMAP
    fetch brings every email that came since the last), so received times
    describe the mail system's batching more than the topic's rate. A second
    without a new message prints ``no new messages``; nothing is printed before
    the second message. Sleeps between messages (no polling).
    """
    if clock not in HZ_CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(HZ_CLOCKS)}, got {clock!r}")
    if window < 2:
        raise ValueError(f"window must be at least 2 messages, got {window}")
    subscription = Subscription(topic, context=ctx)
    (err or sys.stderr).write(f"subscribed to {topic!r} (Ctrl-C to stop)\n")
    (err or sys.stderr).flush()
    by_source = clock == "source"
    stamps: deque[int] = deque(maxlen=window)
    new = 0
    next_report = time.monotonic() + HZ_PERIOD
    try:
        while True:
            remaining = next_report - time.monotonic()
            if remaining > 0:
                try:
                    _, info = wait_for_message_with_info(subscription, remaining)
                except WaitTimeoutError:
                    pass
                else:
                    stamp = info.source_timestamp if by_source else info.received_timestamp
                    stamps.append(stamp.nanoseconds)
                    new += 1
                    continue
            line = hz_report(stamps) if new else "no new messages"
            if line:
                out.write(line + "\n")
                out.flush()
            new = 0
            next_report += HZ_PERIOD
            if next_report <= time.monotonic():  # fell behind (a stopped process): skip
                next_report = time.monotonic() + HZ_PERIOD
    except (KeyboardInterrupt, ContextError):
        return 0


def hz_report(stamps: deque[int] | list[int]) -> str:
    """The ``emailmw hz`` report for time stamps ``stamps`` (integer nanoseconds,
    in any order: they are sorted), or ``""`` with fewer than two."""
    if len(stamps) < 2:
        return ""
    values = sorted(stamps)  # delivery order need not be the order of either clock
    intervals = [(b - a) / 1e9 for a, b in itertools.pairwise(values)]
    mean = statistics.fmean(intervals)
    rate = 1.0 / mean if mean > 0 else math.inf
    return (
        f"average rate: {rate:.3f}\n"
        f"\tmin: {min(intervals):.3f}s max: {max(intervals):.3f}s "
        f"std dev: {statistics.pstdev(intervals):.5f}s window: {len(values)}"
    )


def prune(
    config: str | None,
    out: TextIO,
    *,
    older_than: float | None = None,
    topic: str | None = None,
    dry_run: bool = False,
    progress: TextIO | None = None,
) -> int:
    """Apply the retention to the folder (see :func:`run_prune`)."""
    return run_prune(
        Context(_options(config)),
        out,
        older_than=older_than,
        topic=topic,
        dry_run=dry_run,
        progress=progress,
    )


def run_prune(
    ctx: Context,
    out: TextIO,
    *,
    older_than: float | None = None,
    topic: str | None = None,
    dry_run: bool = False,
    progress: TextIO | None = None,
) -> int:
    """Run :meth:`Context.prune` and print one line per topic (``TOPIC: examined N,
    deleted N, kept N``) and a total line. Returns 0.

    With a ``progress`` stream (the CLI gives stderr), how far the listing and
    the deleting got is written there: a bar on a terminal, plain lines
    otherwise (see :mod:`emailmw._progress`)."""
    reporter = None if progress is None else ProgressReporter(progress, "prune")
    try:
        result = ctx.prune(older_than, topic=topic, dry_run=dry_run, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    verb = "would delete" if dry_run else "deleted"
    for name in sorted(result.topics):
        counts = result.topics[name]
        out.write(
            f"{name}: examined {counts.examined}, {verb} {counts.deleted}, kept {counts.kept}\n"
        )
    out.write(
        f"total: examined {result.examined}, {verb} {result.deleted}, kept {result.kept}"
        f"{' (dry run: nothing deleted)' if dry_run else ''}\n"
    )
    return 0


def _iso(stamp: Timestamp | None) -> str:
    if stamp is None:
        return "-"
    moment = datetime.fromtimestamp(stamp.nanoseconds / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def topics(config: str | None, out: TextIO, *, as_json: bool = False) -> int:
    """List the topics in the folder (see :func:`run_topics`)."""
    return run_topics(_options(config), out, as_json=as_json)


def run_topics(options: Options, out: TextIO, *, as_json: bool = False) -> int:
    """Print the topics of the folder, from headers only: name, number of
    messages, publishers (GIDs) and the newest ``Source-Timestamp``. With
    ``as_json`` one JSON object per line (``topic``, ``count``, ``publishers``,
    ``last_timestamp`` in ns). Returns 0."""
    from emailmw.transport.mailbox import open_admin_session
    from emailmw.transport.mailbox import topics as list_topics

    session = open_admin_session(options.imap_settings(), writable=False)
    try:
        found = list_topics(session)
    finally:
        session.close(polite=True)
    if not as_json:
        out.write(f"{'TOPIC':<30} {'COUNT':>8}  {'LAST MESSAGE (UTC)':<24}  PUBLISHERS\n")
    for entry in found:
        publishers = sorted(gid.value for gid in entry.publishers)
        if as_json:
            record = {
                "topic": entry.topic,
                "count": entry.count,
                "publishers": publishers,
                "last_timestamp": entry.last.nanoseconds if entry.last else None,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            gids = " ".join(str(gid) for gid in publishers)
            out.write(f"{entry.topic:<30} {entry.count:>8}  {_iso(entry.last):<24}  {gids}\n")
    return 0


def history(
    config: str | None,
    topic: str,
    count: int,
    out: TextIO,
    *,
    as_json: bool = False,
    progress: TextIO | None = None,
) -> int:
    """Print the last messages of a topic (see :func:`run_history`)."""
    return run_history(_options(config), topic, count, out, as_json=as_json, progress=progress)


def run_history(
    options: Options,
    topic: str,
    count: int,
    out: TextIO,
    *,
    as_json: bool = False,
    progress: TextIO | None = None,
) -> int:
    """Print the last ``count`` messages of ``topic`` in the folder, oldest first,
    one per line: ``TIME [GID] MESSAGE``; with ``as_json`` one JSON object per
    line (``topic``, ``message``, ``source_timestamp`` in ns, ``publisher_gid``,
    ``message_id``, ``uid``, ``size``, ``headers``). Only those ``count`` bodies
    are fetched. Returns 0 (also when the topic has no messages). With a
    ``progress`` stream, the listing and the fetching report how far they got
    there (as for :func:`run_prune`)."""
    from emailmw.info import additional_headers
    from emailmw.transport.mailbox import history as last_messages
    from emailmw.transport.mailbox import open_admin_session

    if count < 0:
        raise ConfigError(f"-n must be >= 0, got {count}")
    reporter = None if progress is None else ProgressReporter(progress, "history")
    session = open_admin_session(options.imap_settings(), writable=False)
    try:
        found = last_messages(session, topic, count, reporter)
    finally:
        session.close(polite=True)
        if reporter is not None:
            reporter.close()
    for summary, email in found:
        gid = summary.publisher_gid.value if summary.publisher_gid else None
        if as_json:
            record = {
                "topic": summary.topic,
                "message": email.content.body,
                "source_timestamp": summary.source_timestamp.nanoseconds,
                "publisher_gid": gid,
                "message_id": summary.message_id,
                "uid": summary.uid,
                "size": summary.size,
                "headers": dict(additional_headers(email.headers)),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write(f"{_iso(summary.source_timestamp)} [{gid}] {email.content.body}{os.linesep}")
    return 0


#: ``emailmw ping``'s service name unless ``--service`` says otherwise.
PING_SERVICE = "/emailmw/ping"


def ping(
    config: str | None,
    out: TextIO,
    *,
    count: int = 4,
    interval: float = 1.0,
    timeout: float = 10.0,
    service: str = PING_SERVICE,
    answer: bool = True,
) -> int:
    """Round trips through the mailbox of the configured account (see :func:`run_ping`).
    Works on the intraprocess transport too."""
    options = Options.load() if config is None else Options.from_file(config)
    with Context(options) as ctx:
        return run_ping(
            ctx,
            out,
            count=count,
            interval=interval,
            timeout=timeout,
            service=service,
            answer=answer,
        )


def _describe_route(options: Options) -> str:
    if options.intraprocess or options.user is None:
        return "intraprocess"
    return f"{options.user.username} ({options.user.smtp} -> {options.user.imap})"


def run_ping(
    ctx: Context,
    out: TextIO,
    *,
    count: int = 4,
    interval: float = 1.0,
    timeout: float = 10.0,
    service: str = PING_SERVICE,
    answer: bool = True,
) -> int:
    """Send ``count`` requests (0: until interrupted) to ``service``, at least
    ``interval`` seconds apart, and print each round trip, then a summary, like
    ``ping``. Returns 0 if any reply came back, else 1.

    Each request is an email to the configured recipients; ``answer`` (the
    default) has this process answer it when it comes back through the mailbox,
    so one round trip is a request and its reply, both through the mail
    servers. With ``answer=False`` another process must answer (a
    :class:`~emailmw.ServiceServer` for ``service`` that sends each request
    back). A reply that takes longer than ``timeout`` seconds counts as lost
    (and is reported as late if it still comes). Ctrl-C stops early and still
    prints the summary.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not interval >= 0 or not timeout > 0:
        raise ValueError(f"interval must be >= 0 and timeout > 0, got {interval}, {timeout}")
    client = ServiceClient(service, context=ctx)
    server = ServiceServer(service, context=ctx) if answer else None
    waitset = WaitSet(context=ctx)
    waitset.add_client(client)
    if server is not None:
        waitset.add_server(server)
    out.write(
        f"PING {service} via {_describe_route(ctx.options)}: "
        f"{'answered here' if answer else 'answered elsewhere'}, timeout {timeout:g} s\n"
    )
    out.flush()
    times: list[float] = []
    sent = 0
    outstanding: dict[int, tuple[int, float]] = {}  # sequence number -> (seq, when sent)
    expired: set[int] = set()  # given up on: a late reply is taken, and counted lost
    last_sent = 0.0
    started = time.monotonic()
    try:
        for index in itertools.count(1):
            if count and index > count:
                break
            if index > 1:
                pause = interval - (time.monotonic() - last_sent)
                if pause > 0:
                    time.sleep(pause)
            last_sent = time.monotonic()
            number = client.send_request(f"ping {index}")
            sent += 1
            outstanding[number] = (index, time.perf_counter())
            deadline = Deadline(timeout)
            while number in outstanding:
                remaining = deadline.remaining()
                if remaining == 0:
                    outstanding.pop(number)
                    expired.add(number)
                    out.write(f"no reply to seq={index} within {timeout:g} s\n")
                    break
                if waitset.wait(remaining):
                    _answer(server)
                    _take_replies(client, outstanding, expired, times, out)
            out.flush()
    except (KeyboardInterrupt, ContextError):
        pass
    finally:
        waitset.clear()
        client.close()
        if server is not None:
            server.close()
    elapsed = time.monotonic() - started
    out.write(ping_summary(service, sent, times, elapsed) + "\n")
    out.flush()
    return 0 if times else 1


def _answer(server: ServiceServer[str, str] | None) -> None:
    """Answer every request waiting at ``server`` with its own content."""
    if server is None:
        return
    while (request := server.get_request()) is not None:
        server.send_response(request.id, request.content)


def _take_replies(
    client: ServiceClient[str, str],
    outstanding: dict[int, tuple[int, float]],
    expired: set[int],
    times: list[float],
    out: TextIO,
) -> None:
    """Take every reply that came: to the requests waited for (their round trip goes
    into ``times``, in ms) and to those given up on (reported late, counted lost),
    so that none stays queued."""
    for number in sorted(outstanding):
        if client.get_response(number) is not None:
            index, sent_at = outstanding.pop(number)
            took = (time.perf_counter() - sent_at) * 1000
            times.append(took)
            out.write(f"reply from {client.service_name}: seq={index} time={took:.1f} ms\n")
    for number in sorted(expired):
        if client.get_response(number) is not None:
            expired.discard(number)
            out.write(f"late reply to request {number} (counted lost)\n")


def ping_summary(service: str, sent: int, times_ms: list[float], elapsed: float) -> str:
    """The closing lines of ``emailmw ping``: counts, loss, and min/avg/max/stddev of
    the round trips ``times_ms`` (milliseconds)."""
    received = len(times_ms)
    lost = 100.0 * (sent - received) / sent if sent else 0.0
    lines = [
        f"--- {service} ping statistics ---",
        f"{sent} requests sent, {received} replies received, {lost:.0f}% lost, "
        f"time {elapsed * 1000:.0f} ms",
    ]
    if times_ms:
        lines.append(
            f"rtt min/avg/max/stddev = {min(times_ms):.1f}/{statistics.fmean(times_ms):.1f}/"
            f"{max(times_ms):.1f}/{statistics.pstdev(times_ms):.1f} ms"
        )
    return "\n".join(lines)
