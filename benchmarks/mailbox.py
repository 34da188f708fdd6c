"""Mailbox benchmark: emailmw over a real Dovecot + Postfix, next to a minimal floor.

Starts its own local mail stack (:class:`emailmw.devserver.DevServer`: Dovecot +
Postfix on free loopback ports; Debian's dovecot-imapd, dovecot-lmtpd and
postfix, run as root) and prints, from one run, side by side:

* **floor**: the least any client can do. ``smtplib`` (one persistent
  connection, STARTTLS with the dev server's CA, AUTH) sends a stream; a
  second process with ``imapclient`` EXAMINEs the folder and busy-loops
  ``UID FETCH <next uid> (BODY.PEEK[])`` (the reference design's polling: no
  NOOP, no sleep), recording when each body is in hand.
* **emailmw**: the same stream through ``Publisher.publish()`` in this
  process and ``wait_for_message()`` in a subscriber process, once per receive
  mode (``--modes``): latency, IMAP commands per message (the receiver's own
  count, ``ImapEmailReceiver.commands_sent``, and a breakdown by command) and
  the subscriber's CPU use.
* **paired**: the ``auto`` subscriber and the floor's poller reading one folder
  at the same time (``--no-paired`` skips it): both see the same deliveries, so
  the per-email difference is the receiver's own cost, whatever the mail
  system's delays (they share the CPU, though).
* **idle**: a subscriber of each mode waiting ``--idle-seconds`` for nothing:
  CPU use and IMAP commands per minute.
* **throughput**: ``--burst`` messages sent back to back by one sender, end to
  end (first send → last message in hand; also up to the 99th percent message),
  emailmw (``auto`` mode) next to the floor.
* **late joiner: first message**: while a 20 Hz stream runs (``Publisher`` in
  this process, in a thread), a new subscriber process starts with its own
  ``Context``, so its receiver takes its start position in the middle of the
  stream; after ``init()`` returned it creates its ``Subscription`` and waits.
  Two times per join: from the ``Subscription`` creation to the first message
  in hand (this includes waiting for the next send, up to 50 ms at 20 Hz), and
  the latency of that first message (send → in hand); also how many messages
  were already queued behind it (a burst means they were held back).
  ``--late-joins`` joins per mode, each a fresh process, for each of
  ``--late-joiner-modes`` (``auto``: the default mode, whose first email comes
  through IDLE, ~0.5 s on Dovecot; ``poll-10ms``: no push delay, so what
  remains is the receiver and the order); p50 and max, and their ratio to the
  floor's p50 of the same run. Afterwards the folder is read back in UID
  (delivery) order, and for each join that waited over a second the report says
  whether the message published just before its first one was stored after it
  (the mail system held it back) or before it (it did not: the wait was the
  receiver's or the order's). ``--no-late-joiner`` skips it;
  ``--late-joiner-only`` runs only the floor and this row (about a minute; with
  ``PYTHONPATH`` pointing at another emailmw tree it measures that tree).

* **history: last 100 of 100 000 emails**: a folder filled by IMAP
  ``MULTIAPPEND`` (batches of 500) with ``--history-emails`` emailmw messages
  (default 100 000; every 100th on the measured topic, the rest on 9 others),
  then, in a fresh ``Context`` on it, the time of
  ``Subscription(topic, history=100)`` (it returns once the history is queued)
  and the bytes its receiver read from the server meanwhile
  (``ImapEmailReceiver.bytes_received``), next to the folder's size.
  ``--history-only`` runs only this row; ``--no-history`` skips it.

* **prune** (``--prune-only``, ``--prune-emails N``, default 100 000): the time
  to prune a folder of N emailmw emails (and ``emailmw topics`` / ``history`` on
  it); it runs ``benchmarks/retention.py``, which owns that measurement.

* **sender pool** (``--sender-pool-only``): ``--pool-messages`` messages sent as
  fast as they go by ``--pool-publishers`` publisher threads (one
  ``Publisher`` each, one context) through ``smtp-connections`` N for each N of
  ``--pool-connections`` (1, 2, 4, 8), next to the floor (one ``smtplib``
  connection, one thread, ``sendmail()`` back to back): the send rate (first
  send → last send accepted by Postfix) and the end-to-end rate (until the
  folder holds them all: IMAP ``STATUS MESSAGES``, asked every 50 ms).
* **fan-out** (``--fanout-only``): one publisher whose recipients are M
  plus-addressed folders (``DevServer.new_mailbox``) for each M of
  ``--fanout-recipients`` (1, 10, 50), one subscriber ``Context`` per folder
  (in subscriber processes of up to 10 contexts each, ``--fanout-mode``, default
  ``auto``); ``--fanout-messages`` messages at 1 Hz: how long ``publish()``
  takes (one SMTP transaction with M ``RCPT TO``), and from just before the
  send until the last of the M subscribers has it (p50, max), and until the
  first one has it.

    python benchmarks/mailbox.py                          # the table, about 4.5 minutes
    python benchmarks/mailbox.py --json                   # the same results as JSON
    python benchmarks/mailbox.py --messages 50 --idle-seconds 5 --burst 300   # quick look
    python benchmarks/mailbox.py --modes auto,poll-10ms --no-paired --save out.json
    python benchmarks/mailbox.py --late-joiner-only       # floor + late joiner, ~1 minute
    python benchmarks/mailbox.py --plot mailbox.png       # also draw latency CDFs, bars, joins
    python benchmarks/mailbox.py --sender-pool-only       # SMTP connections 1-8, ~2 minutes
    python benchmarks/mailbox.py --fanout-only            # 1, 10, 50 recipients, ~2 minutes

How it measures:

* Every latency is from just before the send call (``sendmail()`` or
  ``publish()``) to the moment the receiving process holds the message
  (``UID FETCH`` returned, or ``wait_for_message()`` returned). The send time
  travels in the message body; both processes read ``time.monotonic_ns()``
  (``CLOCK_MONOTONIC``, one clock for the whole machine on Linux).
* The stream is paced on an absolute schedule (message ``i`` at ``start +
  i / rate``), so a slow send does not shift the ones after it.
* Receivers run in their own processes (``multiprocessing``, spawn), so the
  CPU figure (``getrusage(RUSAGE_SELF)``: user + system, every thread) is the
  receiver's alone, measured from the start of the stream to the last message
  and given in % of one core.
* Each path gets a fresh folder (``DevServer.new_mailbox``). The publisher's
  own context reads another, empty folder in ``idle`` mode, so it adds no IMAP
  traffic. ``poll-Nms`` is ``receive-mode: poll`` with ``polling-period`` N ms;
  ``auto`` and ``idle`` carry the dev server's default polling-period (10 ms),
  which they do not use while the server offers IDLE.
* Before the first measurement a few emails go through the stack unmeasured
  (the first message after a start is 30-40 ms slower).
* A late joiner's clock starts just before ``Subscription(...)``, after its
  ``Context`` was initialized (process start and connecting are not counted);
  it waits at most ``STALL`` seconds for its first message (a join that gets
  nothing is counted as a timeout, not as a number).

Which phase it is in, and how many messages it sent, goes to stderr (a bar on a
terminal). The module is named like the standard library's ``mailbox``: run it
as a script, never import it as ``mailbox``. Nothing here asserts; the results go
to ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import platform
import re
import resource
import smtplib
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate, make_msgid
from multiprocessing.connection import Connection
from typing import Any

import imapclient

import emailmw
from emailmw._progress import ProgressReporter
from emailmw.devserver import DevServer

TOPIC = "/bench"
ACCOUNT = "alice"
HISTORY_EMAILS = 100_000  # emails in the history row's folder
HISTORY_LAST = 100  # the history asked for
DEFAULT_MODES = "auto,idle,poll-10ms,poll-100ms"
THROUGHPUT_MODE = "auto"
PAIRED_MODE = "auto"
LATE_JOINER_MODES = "auto,poll-10ms"
LATE_JOINER_RATE = 20.0  # Hz: the stream a late joiner starts in the middle of
LATE_JOINS = 10  # fresh subscriber processes per mode
LATE_JOINER_LEAD = 1.0  # seconds the stream runs before the first join
STALL = 20.0  # a receiver gives up after this long without a new message
CHILD_TIMEOUT = 60.0  # how long the parent waits for a child's answer beyond the phase
POOL_CONNECTIONS = "1,2,4,8"  # smtp-connections of the sender-pool section
POOL_PUBLISHERS = 8
POOL_MESSAGES = 1000
FANOUT_RECIPIENTS = "1,10,50"
FANOUT_MESSAGES = 20
FANOUT_PER_PROCESS = 10  # subscriber contexts per process in the fan-out section

# targets (issue #3)
TARGET_P50_RATIO = 1.5  # auto p50 <= 1.5 x the floor's
TARGET_COMMANDS_FRACTION = 0.2  # auto commands per message <= a fifth of the floor's
TARGET_IDLE_CPU = 1.0  # % of one core
TARGET_IDLE_COMMANDS = 2.0  # per minute
TARGET_THROUGHPUT_RATIO = 0.9

# "=" is "=3D" in an emailmw body as stored (quoted-printable)
_BODY_RE = re.compile(rb"seq=(?:3D)?(\d+) t=(?:3D)?(\d+)")


# -- small helpers ----------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def stream_body(seq: int, sent_ns: int) -> str:
    """What each message carries: its number and its send time."""
    return f"seq={seq} t={sent_ns}"


def parse_body(body: bytes) -> tuple[int, int]:
    """(seq, sent_ns) from a body or a whole raw email."""
    found = _BODY_RE.search(body)
    if found is None:
        raise ValueError(f"no seq/t in {body[:200]!r}")
    return int(found.group(1)), int(found.group(2))


def pace(start: float, index: int, rate: float) -> None:
    """Sleep until message ``index`` of a stream at ``rate`` Hz is due (0: no pacing)."""
    if rate > 0:
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


@dataclass(frozen=True)
class ServerInfo:
    """What a child process needs to reach the dev server (picklable)."""

    host: str
    smtp_port: int
    imap_port: int
    ca_file: str
    username: str
    password: str


def tls_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def imap_login(info: ServerInfo) -> imapclient.IMAPClient:
    """A logged-in IMAPClient over STARTTLS (as emailmw connects to the dev server)."""
    client = imapclient.IMAPClient(info.host, info.imap_port, ssl=False, timeout=30)
    client.starttls(tls_context(info.ca_file))
    client.login(info.username, info.password)
    return client


def smtp_login(info: ServerInfo) -> smtplib.SMTP:
    """One smtplib connection: EHLO, STARTTLS, EHLO, AUTH (as emailmw's sender does)."""
    smtp = smtplib.SMTP(info.host, info.smtp_port, timeout=30)
    smtp.ehlo()
    smtp.starttls(context=tls_context(info.ca_file))
    smtp.ehlo()
    smtp.login(info.username, info.password)
    return smtp


def raw_email(sender: str, to: str, body: str) -> bytes:
    """A minimal plain-text email for the floor."""
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {TOPIC}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {make_msgid(domain='example.test')}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n{body}\r\n"
    ).encode("ascii")


# -- child processes ---------------------------------------------------------------------


def floor_receiver(conn: Connection, info: ServerInfo, folder: str, n: int) -> None:
    """The floor's receiving side: busy ``UID FETCH <next uid> (BODY.PEEK[])``."""
    try:
        client = imap_login(info)
        uid = int(client.select_folder(folder, readonly=True)[b"UIDNEXT"])
        conn.send(("ready", None))
        conn.recv()  # "go"
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        arrivals: list[tuple[int, int, int]] = []
        commands = 0
        last_progress = wall0
        while len(arrivals) < n:
            found = client.fetch([uid], [b"BODY.PEEK[]"])
            commands += 1
            item = found.get(uid)
            if item is not None and b"BODY[]" in item:
                now_ns = time.monotonic_ns()
                seq, sent_ns = parse_body(item[b"BODY[]"])
                arrivals.append((seq, sent_ns, now_ns))
                uid += 1
                last_progress = time.monotonic()
                client._imap.untagged_responses.clear()  # EXISTS lines pile up otherwise
            elif time.monotonic() - last_progress > STALL:
                break
        wall = (arrivals[-1][2] / 1e9 if arrivals else time.monotonic()) - wall0
        cpu = cpu_seconds() - cpu0
        client.logout()
        conn.send(
            (
                "done",
                {
                    "arrivals": arrivals,
                    "commands": commands,
                    "breakdown": {"UID FETCH": commands},
                    "cpu_s": cpu,
                    "wall_s": wall,
                },
            )
        )
    except BaseException as exc:  # report it to the parent rather than die silently
        conn.send(("error", repr(exc)))
        raise


def _count_commands(tally: Counter[str]) -> None:
    """Count every tagged IMAP command this process sends, by name (instrumentation)."""
    original = getattr(imaplib.IMAP4, "_command")  # noqa: B009 (private; untyped in typeshed)

    def counting(self: imaplib.IMAP4, name: str, *args: Any) -> Any:
        tally[f"UID {args[0]}" if name == "UID" and args else name] += 1
        return original(self, name, *args)

    setattr(imaplib.IMAP4, "_command", counting)  # noqa: B010


def emailmw_receiver(conn: Connection, config: dict[str, Any], n: int, idle_seconds: float) -> None:
    """A subscriber process: ``n`` messages (or, with ``n == 0``, ``idle_seconds`` of nothing)."""
    try:
        tally: Counter[str] = Counter()
        _count_commands(tally)
        options = emailmw.Options.from_dict(config)
        with emailmw.Context(options) as ctx:
            sub = emailmw.Subscription(TOPIC, depth=max(n, 1000), context=ctx)
            receiver = ctx._receiver

            def commands_of() -> int:
                return int(getattr(receiver, "commands_sent", -1))

            conn.send(("ready", None))
            conn.recv()  # "go"
            cpu0, wall0, commands0 = cpu_seconds(), time.monotonic(), commands_of()
            before = Counter(tally)
            arrivals: list[tuple[int, int, int]] = []
            if n == 0:
                with contextlib.suppress(emailmw.WaitTimeoutError):
                    emailmw.wait_for_message(sub, timeout=idle_seconds)
                end = time.monotonic()
            else:
                while len(arrivals) < n:
                    try:
                        message = emailmw.wait_for_message(sub, timeout=STALL)
                    except emailmw.WaitTimeoutError:
                        break
                    now_ns = time.monotonic_ns()
                    seq, sent_ns = parse_body(message.encode())
                    arrivals.append((seq, sent_ns, now_ns))
                end = arrivals[-1][2] / 1e9 if arrivals else time.monotonic()
            cpu = cpu_seconds() - cpu0
            commands = commands_of() - commands0
            breakdown = dict(tally - before)
            stats = ctx.stats()
            mode_now = str(getattr(receiver, "mode", "?"))
        conn.send(
            (
                "done",
                {
                    "arrivals": arrivals,
                    "commands": commands,
                    "breakdown": breakdown,
                    "cpu_s": cpu,
                    "wall_s": end - wall0,
                    "dropped": stats.dropped_total,
                    "reconnects": stats.reconnects,
                    "mode_at_end": mode_now,
                },
            )
        )
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


def fanout_subscribers(conn: Connection, configs: list[dict[str, Any]], n: int) -> None:
    """Several subscriber contexts in one process (one per folder of the fan-out),
    each with a thread that records when each of ``n`` messages is in hand."""
    try:
        with contextlib.ExitStack() as stack:
            subs = []
            for config in configs:
                ctx = stack.enter_context(emailmw.Context(emailmw.Options.from_dict(config)))
                subs.append(emailmw.Subscription(TOPIC, depth=max(n, 1000), context=ctx))
            conn.send(("ready", None))
            conn.recv()  # "go"
            arrivals: list[list[tuple[int, int]]] = [[] for _ in subs]

            def collect(index: int) -> None:
                while len(arrivals[index]) < n:
                    try:
                        message = emailmw.wait_for_message(subs[index], timeout=STALL)
                    except emailmw.WaitTimeoutError:
                        return
                    arrivals[index].append((parse_body(message.encode())[0], time.monotonic_ns()))

            threads = [
                threading.Thread(target=collect, args=(i,), daemon=True) for i in range(len(subs))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        conn.send(("done", {"arrivals": arrivals}))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


def late_joiner(conn: Connection, config: dict[str, Any]) -> None:
    """A subscriber that starts while a stream runs: how long until its first message.

    The clock starts after ``init()`` returned (the receiver has taken its start
    position), just before the ``Subscription`` is created, and stops when
    ``wait_for_message()`` returns the first message.
    """
    try:
        options = emailmw.Options.from_dict(config)
        with emailmw.Context(options) as ctx:
            created_ns = time.monotonic_ns()
            sub = emailmw.Subscription(TOPIC, depth=10_000, context=ctx)
            try:
                message = emailmw.wait_for_message(sub, timeout=STALL)
            except emailmw.WaitTimeoutError:
                conn.send(("done", {"first": None}))
                return
            in_hand_ns = time.monotonic_ns()
            seq, sent_ns = parse_body(message.encode())
            queued_behind = 0  # delivered together with the first one
            while sub.get_message() is not None:
                queued_behind += 1
        conn.send(
            (
                "done",
                {
                    "first": seq,
                    "time_to_first_ms": (in_hand_ns - created_ns) / 1e6,
                    "first_latency_ms": (in_hand_ns - sent_ns) / 1e6,
                    "sent_after_subscription_ms": (sent_ns - created_ns) / 1e6,
                    "queued_behind": queued_behind,
                },
            )
        )
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


class Child:
    """A receiver in its own process, driven over a pipe: ready → go → done."""

    _mp = multiprocessing.get_context("spawn")

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.conn, child_conn = self._mp.Pipe()
        self.process = self._mp.Process(target=target, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()

    def _answer(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"receiver process gave no answer within {timeout:g} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"receiver process failed: {value}")
        return value

    def ready(self) -> None:
        self._answer(CHILD_TIMEOUT)

    def go(self) -> None:
        self.conn.send("go")

    def result(self, timeout: float) -> dict[str, Any]:
        value = self._answer(timeout)
        self.process.join(10)
        return dict(value)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


@contextlib.contextmanager
def children(*kids: Child) -> Iterator[None]:
    try:
        for kid in kids:
            kid.ready()
        yield
    finally:
        for kid in kids:
            kid.kill()


# -- phases --------------------------------------------------------------------------------


class Bench:
    """One dev server, the phases, and the results."""

    def __init__(self, server: DevServer) -> None:
        self.server = server
        account = server.account(ACCOUNT)
        self.info = ServerInfo(
            server.host,
            server.smtp_port,
            server.imap_port,
            str(server.ca_file),
            account.address,
            account.password,
        )
        #: where each phase reports how far it got (None: nowhere)
        self.progress: ProgressReporter | None = None
        self._phase, self._total = "", 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Report the phase ``name`` to :attr:`progress` while it runs (and its steps,
        through :meth:`tick`)."""
        self._phase, self._total = name, 1
        self._report(0, 1)
        try:
            yield
        finally:
            self._report(self._total, self._total)

    def tick(self, done: int, total: int) -> None:
        """``done`` of the current phase's ``total`` steps are done."""
        self._total = total
        if done < total:
            self._report(done, total)

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self._phase, done, total)
        self._counters: list[imapclient.IMAPClient] = []  # folder_count's connections

    def history(self, total: int, last: int) -> dict[str, Any]:
        """Fill a folder with ``total`` emails (every 100th on the topic), then time
        ``Subscription(topic, history=last)`` in a fresh context and count its bytes."""
        from emailmw.transport.codec import encode_email, new_message_id
        from emailmw.transport.data import (
            EmailContent,
            EmailData,
            EmailHeaders,
            EmailRecipients,
        )
        from emailmw.transport.imap import ImapEmailReceiver

        folder, address = self.server.new_mailbox(ACCOUNT, prefix="history")
        client = imap_login(self.info)
        fill_started = time.monotonic()
        size = 0
        on_topic = 0
        previous: dict[str, tuple[int, int]] = {}
        batch: list[bytes] = []
        for i in range(total):
            topic = TOPIC if i % 100 == 0 else f"{TOPIC}/other{i % 9}"
            number, stamp_before = previous.get(topic, (0, 0))
            stamp = time.time_ns()
            headers = {
                "Publisher-GID": "4242",
                "Source-Timestamp": str(stamp),
                "Publication-Number": str(number + 1),
            }
            if stamp_before:
                headers["Previous-Timestamp"] = str(stamp_before)
            previous[topic] = (number + 1, stamp)
            on_topic += topic == TOPIC
            raw = encode_email(
                EmailData(
                    content=EmailContent(topic, f"message {i} " + "x" * 200),
                    headers=EmailHeaders(headers),
                    message_id=new_message_id("example.test"),
                    from_=address,
                    recipients=EmailRecipients(to=[address]),
                )
            )
            size += len(raw)
            batch.append(raw)
            if len(batch) == 500 or i == total - 1:
                client.multiappend(folder, batch)
                batch = []
                self.tick(i + 1, total)
        client.logout()
        fill_s = time.monotonic() - fill_started
        config = self.server.config(ACCOUNT, mailbox=folder, to=address)
        with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
            receiver = ctx._receiver
            assert isinstance(receiver, ImapEmailReceiver)
            before_bytes = receiver.bytes_received
            before_commands = receiver.commands_sent
            started = time.monotonic()
            sub = emailmw.Subscription(TOPIC, history=last, context=ctx)
            elapsed = time.monotonic() - started
            read = receiver.bytes_received - before_bytes
            commands = receiver.commands_sent - before_commands
            got = []
            while (item := sub.get_message()) is not None:
                got.append(item)
            started = time.monotonic()
            emailmw.Subscription(TOPIC, history=last, context=ctx).close()
            again = time.monotonic() - started
        expected = [f"message {i} " + "x" * 200 for i in range(0, total, 100)][-last:]
        return {
            "emails": total,
            "on_topic": on_topic,
            "last": last,
            "delivered": len(got),
            "correct": got == expected,
            "folder_bytes": size,
            "fill_s": fill_s,
            "time_ms": elapsed * 1000,
            "again_ms": again * 1000,
            "bytes_read": read,
            "commands": commands,
        }

    def warm_up(self, count: int = 10) -> None:
        """Send ``count`` emails through the stack and read them back (unmeasured)."""
        folder, address = self.server.new_mailbox(ACCOUNT, prefix="warm")
        client = imap_login(self.info)
        uid = int(client.select_folder(folder, readonly=True)[b"UIDNEXT"])
        smtp = smtp_login(self.info)
        deadline = time.monotonic() + 30
        for i in range(count):
            raw = raw_email(self.info.username, address, stream_body(i, 0))
            smtp.sendmail(self.info.username, [address], raw)
            while uid not in client.fetch([uid], [b"BODY.PEEK[]"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("warm-up: the mail stack does not deliver")
            uid += 1
        smtp.quit()
        client.logout()

    # -- floor

    def floor(self, n: int, rate: float) -> dict[str, Any]:
        folder, address = self.server.new_mailbox(ACCOUNT, prefix="floor")
        kid = Child(floor_receiver, self.info, folder, n)
        with children(kid):
            smtp = smtp_login(self.info)
            sender = self.info.username
            kid.go()
            start = time.monotonic()
            first_ns = time.monotonic_ns()
            for i in range(n):
                pace(start, i, rate)
                sent_ns = time.monotonic_ns()
                raw = raw_email(sender, address, stream_body(i, sent_ns))
                smtp.sendmail(sender, [address], raw)
                self.tick(i + 1, n)
            sent_done_ns = time.monotonic_ns()
            smtp.quit()
            result = kid.result(STALL + CHILD_TIMEOUT)
        return strip(summarize(result, n, first_ns, sent_done_ns, keep=rate > 0))

    # -- emailmw

    def publisher_context(self, address: str) -> emailmw.Context:
        """A context that publishes to ``address`` and itself reads a quiet folder in IDLE."""
        quiet, _ = self.server.new_mailbox(ACCOUNT, prefix="quiet")
        config = self.server.config(ACCOUNT, mailbox=quiet, to=address, receive_mode="idle")
        return emailmw.Context(emailmw.Options.from_dict(config))

    def subscriber_config(self, folder: str, mode: str) -> dict[str, Any]:
        receive_mode, period_ns = parse_mode(mode)
        kw: dict[str, Any] = {"mailbox": folder, "receive_mode": receive_mode}
        if period_ns is not None:
            kw["polling_period_ns"] = period_ns
        return self.server.config(ACCOUNT, **kw)

    def stream(self, mode: str, n: int, rate: float) -> dict[str, Any]:
        """``n`` messages from a Publisher to a subscriber process in ``mode``."""
        return strip(self._publish_stream(mode, n, rate, paired=False)[0])

    def paired(self, mode: str, n: int, rate: float) -> dict[str, Any]:
        """The stream with the floor's poller reading the same folder at the same time:
        both see the same deliveries, so the per-message difference is the receiver's
        own cost, whatever the mail system's delays (both share the CPU, though)."""
        emailmw_result, floor_result = self._publish_stream(mode, n, rate, paired=True)
        assert floor_result is not None
        ours = dict(zip(emailmw_result["seqs"], emailmw_result["recv_ns"], strict=True))
        theirs = dict(zip(floor_result["seqs"], floor_result["recv_ns"], strict=True))
        deltas = sorted((ours[s] - theirs[s]) / 1e6 for s in ours.keys() & theirs.keys())
        out = {"emailmw": strip(emailmw_result), "floor": strip(floor_result)}
        if deltas:
            out["delta_ms"] = {
                "p10": percentile(deltas, 0.10),
                "p50": percentile(deltas, 0.50),
                "p90": percentile(deltas, 0.90),
                "p99": percentile(deltas, 0.99),
            }
        return out

    def _publish_stream(
        self, mode: str, n: int, rate: float, *, paired: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        folder, address = self.server.new_mailbox(ACCOUNT, prefix="sub")
        kids = [Child(emailmw_receiver, self.subscriber_config(folder, mode), n, 0.0)]
        if paired:
            kids.append(Child(floor_receiver, self.info, folder, n))
        with children(*kids), self.publisher_context(address) as ctx:
            pub = emailmw.Publisher(TOPIC, context=ctx)
            for kid in kids:
                kid.go()
            start = time.monotonic()
            first_ns = time.monotonic_ns()
            for i in range(n):
                pace(start, i, rate)
                sent_ns = time.monotonic_ns()
                pub.publish(stream_body(i, sent_ns))
                self.tick(i + 1, n)
            sent_done_ns = time.monotonic_ns()
            results = [kid.result(STALL + CHILD_TIMEOUT) for kid in kids]
        summaries = [summarize(r, n, first_ns, sent_done_ns, keep=rate > 0) for r in results]
        return summaries[0], (summaries[1] if paired else None)

    def late_joiner(
        self, modes: list[str], joins: int, floor_p50_ms: float | None
    ) -> dict[str, Any]:
        """``joins`` fresh subscriber processes per mode, each started while a 20 Hz
        stream runs, one after the other: time to the first message and its latency."""
        folder, address = self.server.new_mailbox(ACCOUNT, prefix="late")
        stop = threading.Event()
        failures: list[BaseException] = []
        per_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        with self.publisher_context(address) as ctx:
            pub = emailmw.Publisher(TOPIC, context=ctx)

            def stream() -> None:
                start, i = time.monotonic(), 0
                try:
                    while not stop.wait(max(0.0, start + i / LATE_JOINER_RATE - time.monotonic())):
                        pub.publish(stream_body(i, time.monotonic_ns()))
                        i += 1
                except BaseException as exc:  # the joins would wait for nothing: say why
                    failures.append(exc)

            publisher = threading.Thread(target=stream, name="bench-late-stream", daemon=True)
            publisher.start()
            try:
                time.sleep(LATE_JOINER_LEAD)
                for mode in modes:
                    config = self.subscriber_config(folder, mode)
                    for _ in range(joins):
                        if failures:
                            raise RuntimeError(f"late-joiner stream failed: {failures[0]!r}")
                        kid = Child(late_joiner, config)
                        try:
                            per_mode[mode].append(kid.result(STALL + 2 * CHILD_TIMEOUT))
                        finally:
                            kid.kill()
                        self.tick(sum(map(len, per_mode.values())), len(modes) * joins)
            finally:
                stop.set()
                publisher.join(10)
        stored = self.stored_order(folder)
        for joins_of_mode in per_mode.values():
            for join in joins_of_mode:
                join["predecessor_stored_after"] = predecessor_stored_after(join, stored)
        return {
            "rate": LATE_JOINER_RATE,
            "joins": joins,
            "floor_p50_ms": floor_p50_ms,
            "stored_seqs": sorted(stored, key=stored.__getitem__),  # the folder in UID order
            "modes": {
                mode: summarize_joins(joins_of_mode, floor_p50_ms)
                for mode, joins_of_mode in per_mode.items()
            },
        }

    def stored_order(self, folder: str) -> dict[int, int]:
        """Where each stream message (seq) stands in ``folder``, in UID (delivery) order."""
        client = imap_login(self.info)
        try:
            client.select_folder(folder, readonly=True)
            uids = client.search("ALL")
            fetched = client.fetch(uids, [b"BODY.PEEK[TEXT]"]) if uids else {}
        finally:
            client.logout()
        order: dict[int, int] = {}
        for rank, uid in enumerate(sorted(fetched)):
            with contextlib.suppress(KeyError, ValueError):
                order.setdefault(parse_body(fetched[uid][b"BODY[TEXT]"])[0], rank)
        return order

    # -- many writers, fan-out

    def folder_count(self, folder: str) -> Callable[[], int]:
        """A function telling how many emails ``folder`` holds (one IMAP connection)."""
        client = imap_login(self.info)
        self._counters.append(client)
        return lambda: int(client.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"])

    def wait_stored(self, count: Callable[[], int], n: int) -> float:
        """Wait (asking every 50 ms) until the folder holds ``n`` emails; return when."""
        deadline = time.monotonic() + STALL + n / 50
        while count() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {count()} of {n} emails were stored")
            time.sleep(0.05)
        return time.monotonic()

    def pool_floor(self, n: int) -> dict[str, Any]:
        """``n`` emails over one smtplib connection, back to back, from one thread."""
        folder, address = self.server.new_mailbox(ACCOUNT, prefix="poolfloor")
        count = self.folder_count(folder)
        smtp = smtp_login(self.info)
        sender = self.info.username
        start = time.monotonic()
        for i in range(n):
            smtp.sendmail(sender, [address], raw_email(sender, address, stream_body(i, 0)))
        sent = time.monotonic()
        smtp.quit()
        stored = self.wait_stored(count, n)
        return {
            "messages": n,
            "send_msgs_per_s": n / (sent - start),
            "end_to_end_msgs_per_s": n / (stored - start),
        }

    def pool(self, connections: int, publishers: int, n: int) -> dict[str, Any]:
        """``n`` messages from ``publishers`` threads over ``smtp-connections``."""
        folder, address = self.server.new_mailbox(ACCOUNT, prefix="pool")
        count = self.folder_count(folder)
        quiet, _ = self.server.new_mailbox(ACCOUNT, prefix="quiet")
        config = self.server.config(ACCOUNT, mailbox=quiet, to=address, receive_mode="idle")
        config["email"]["smtp-connections"] = connections
        each = [n // publishers + (i < n % publishers) for i in range(publishers)]
        failures: list[BaseException] = []
        with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
            pubs = [emailmw.Publisher(TOPIC, context=ctx) for _ in range(publishers)]
            go = threading.Barrier(publishers + 1)

            def publish(index: int) -> None:
                try:
                    go.wait()
                    for i in range(each[index]):
                        pubs[index].publish(stream_body(i, 0))
                except BaseException as exc:
                    failures.append(exc)

            threads = [
                threading.Thread(target=publish, args=(i,), daemon=True) for i in range(publishers)
            ]
            for thread in threads:
                thread.start()
            go.wait()
            start = time.monotonic()
            for thread in threads:
                thread.join()
            sent = time.monotonic()
            if failures:
                raise RuntimeError(f"publishing failed: {failures[0]!r}")
            stored = self.wait_stored(count, n)
            stats = ctx.stats()
        return {
            "connections": connections,
            "publishers": publishers,
            "messages": n,
            "sent": stats.sent,
            "send_retries": stats.send_retries,
            "send_msgs_per_s": n / (sent - start),
            "end_to_end_msgs_per_s": n / (stored - start),
        }

    def sender_pool(self, connections: list[int], publishers: int, n: int) -> dict[str, Any]:
        try:
            return {
                "floor": self.pool_floor(n),
                "pool": [self.pool(c, publishers, n) for c in connections],
            }
        finally:
            for client in self._counters:
                with contextlib.suppress(Exception):
                    client.logout()

    def fanout(self, recipients: int, n: int, mode: str) -> dict[str, Any]:
        """One publisher to ``recipients`` folders, a subscriber on each."""
        folders = [self.server.new_mailbox(ACCOUNT, prefix="fan") for _ in range(recipients)]
        configs = [self.subscriber_config(folder, mode) for folder, _ in folders]
        quiet, _ = self.server.new_mailbox(ACCOUNT, prefix="quiet")
        config = self.server.config(ACCOUNT, mailbox=quiet, receive_mode="idle")
        config["email"]["recipients"] = {"to": [address for _, address in folders]}
        groups = [
            configs[i : i + FANOUT_PER_PROCESS] for i in range(0, recipients, FANOUT_PER_PROCESS)
        ]
        kids = [Child(fanout_subscribers, group, n) for group in groups]
        sent: dict[int, tuple[int, int]] = {}  # seq -> (send started, publish returned)
        with children(*kids), emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
            pub = emailmw.Publisher(TOPIC, context=ctx)
            for kid in kids:
                kid.go()
            start = time.monotonic()
            for i in range(n):
                pace(start, i, 1.0)
                before = time.monotonic_ns()
                pub.publish(stream_body(i, before))
                sent[i] = (before, time.monotonic_ns())
            results = [kid.result(STALL + CHILD_TIMEOUT + n) for kid in kids]
        by_seq: dict[int, list[int]] = {i: [] for i in range(n)}
        for result in results:
            for arrivals in result["arrivals"]:
                for seq, got_ns in arrivals:
                    by_seq[seq].append(got_ns)
        complete = [i for i in range(n) if len(by_seq[i]) == recipients]
        last = sorted((max(by_seq[i]) - sent[i][0]) / 1e6 for i in complete)
        first = sorted((min(by_seq[i]) - sent[i][0]) / 1e6 for i in complete)
        publish_ms = sorted((done - began) / 1e6 for began, done in sent.values())
        out: dict[str, Any] = {
            "recipients": recipients,
            "messages": n,
            "mode": mode,
            "incomplete": n - len(complete),
            "deliveries_missing": recipients * n - sum(len(v) for v in by_seq.values()),
            "publish_p50_ms": percentile(publish_ms, 0.5),
            "publish_max_ms": publish_ms[-1],
        }
        if last:
            out.update(
                last_p50_ms=percentile(last, 0.5),
                last_max_ms=last[-1],
                first_p50_ms=percentile(first, 0.5),
            )
        return out

    def idle(self, modes: list[str], seconds: float) -> dict[str, dict[str, Any]]:
        """One idle subscriber per mode, side by side (each measures its own process)."""
        kids = {}
        for mode in modes:
            folder, _ = self.server.new_mailbox(ACCOUNT, prefix="idle")
            kids[mode] = Child(emailmw_receiver, self.subscriber_config(folder, mode), 0, seconds)
        results: dict[str, dict[str, Any]] = {}
        with children(*kids.values()):
            for kid in kids.values():
                kid.go()
            for mode, kid in kids.items():
                r = kid.result(seconds + CHILD_TIMEOUT)
                results[mode] = {
                    "seconds": r["wall_s"],
                    "cpu_percent": 100.0 * r["cpu_s"] / r["wall_s"],
                    "commands": r["commands"],
                    "commands_per_min": 60.0 * r["commands"] / r["wall_s"],
                    "breakdown": r["breakdown"],
                }
        return results


def parse_mode(mode: str) -> tuple[str, int | None]:
    """``auto`` / ``idle`` / ``poll`` / ``poll-<N>ms`` → (receive-mode, polling-period ns)."""
    if mode in ("auto", "idle"):
        return mode, None
    found = re.fullmatch(r"poll(?:-(\d+(?:\.\d+)?)ms)?", mode)
    if found is None:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r} (auto, idle, poll, poll-<N>ms)")
    ms = float(found.group(1)) if found.group(1) else 100.0
    return "poll", round(ms * 1e6)


def summarize(
    result: dict[str, Any], n: int, first_ns: int, sent_done_ns: int, *, keep: bool
) -> dict[str, Any]:
    """Latency percentiles, losses, commands, CPU; with ``keep``, every latency by seq."""
    arrivals: list[tuple[int, int, int]] = result["arrivals"]
    latencies = sorted((recv - sent) / 1e6 for _, sent, recv in arrivals)
    seqs = [seq for seq, _, _ in arrivals]
    received = len(set(seqs))
    out: dict[str, Any] = {
        "messages": n,
        "received": received,
        "lost": n - received,
        "duplicates": len(seqs) - received,
        "out_of_order": sum(1 for a, b in itertools.pairwise(seqs) if b < a),
        "commands": result["commands"],
        "commands_per_message": result["commands"] / max(received, 1),
        "breakdown_per_message": {
            k: v / max(received, 1) for k, v in sorted(result["breakdown"].items())
        },
        "cpu_percent": 100.0 * result["cpu_s"] / result["wall_s"] if result["wall_s"] > 0 else 0.0,
        "send_msgs_per_s": n / ((sent_done_ns - first_ns) / 1e9),
    }
    for key in ("dropped", "reconnects", "mode_at_end"):
        if key in result:
            out[key] = result[key]
    if latencies:
        out.update(
            p50_ms=percentile(latencies, 0.50),
            p90_ms=percentile(latencies, 0.90),
            p99_ms=percentile(latencies, 0.99),
            max_ms=latencies[-1],
            mean_ms=statistics.fmean(latencies),
            end_to_end_msgs_per_s=received / ((max(r for _, _, r in arrivals) - first_ns) / 1e9),
        )
        # the same, up to the 99th percent of the messages: one email the mail system
        # holds back for seconds decides the end-to-end figure; this one it does not
        in_hand = sorted(r for _, _, r in arrivals)
        k = max(1, math.ceil(0.99 * n))
        if len(in_hand) >= k:
            out["msgs_per_s_to_99_percent"] = k / ((in_hand[k - 1] - first_ns) / 1e9)
    if keep:
        out["latency_by_seq_ms"] = [
            round((recv - sent) / 1e6, 3) for _, sent, recv in sorted(arrivals)
        ]
    out["seqs"] = seqs  # for pairing; strip() removes them
    out["recv_ns"] = [recv for _, _, recv in arrivals]
    return out


def summarize_joins(joins: list[dict[str, Any]], floor_p50_ms: float | None) -> dict[str, Any]:
    """p50/max of a late joiner's time to its first message and of that message's
    latency, each also as a multiple of the floor's p50; every join's own values."""
    got = [j for j in joins if j.get("first") is not None]
    out: dict[str, Any] = {
        "joins": len(joins),
        "timeouts": len(joins) - len(got),
        # joins whose first message's predecessor was stored after it (mail-system reorder)
        "predecessor_reordered": sum(
            1 for j in got if (j.get("predecessor_stored_after") or 0) > 0
        ),
    }
    for key in ("time_to_first_ms", "first_latency_ms", "queued_behind"):
        values = sorted(float(j[key]) for j in got)
        if not values:
            continue
        out[key] = {"p50": percentile(values, 0.50), "max": values[-1]}
        if floor_p50_ms and key != "queued_behind":
            out[key]["p50_x_floor"] = out[key]["p50"] / floor_p50_ms
            out[key]["max_x_floor"] = values[-1] / floor_p50_ms
    out["each"] = joins
    return out


def predecessor_stored_after(join: dict[str, Any], stored: dict[int, int]) -> int | None:
    """How many emails after a late joiner's first message the mail system stored the
    one published just before it (negative: before it, as sent; None: not known).
    A first message that waited about a reorder window while its predecessor was
    stored long after it waited for the mail system, not for the order."""
    first = join.get("first")
    if first is None or first - 1 not in stored or first not in stored:
        return None
    return stored[first - 1] - stored[first]


def strip(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without the raw arrival lists."""
    return {k: v for k, v in summary.items() if k not in ("seqs", "recv_ns")}


# -- report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "emailmw": emailmw.__version__,
        "commit": commit,
        "package": os.path.dirname(os.path.abspath(emailmw.__file__)),
        "load_average_at_start": os.getloadavg(),
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #3: the measured value, the limit, PASS/MISS."""
    rows: list[dict[str, Any]] = []
    floor = results["floor"]
    auto = results["modes"].get("auto")
    if auto is not None and "p50_ms" in auto and "p50_ms" in floor:
        ratio = auto["p50_ms"] / floor["p50_ms"]
        rows.append(
            {
                "target": f"auto p50 latency <= {TARGET_P50_RATIO:g} x floor p50",
                "measured": f"{auto['p50_ms']:.1f} ms vs {floor['p50_ms']:.1f} ms = {ratio:.2f} x",
                "passed": ratio <= TARGET_P50_RATIO,
            }
        )
        ratio = auto["commands_per_message"] / floor["commands_per_message"]
        rows.append(
            {
                "target": "auto IMAP commands/message <= 1/5 of the floor's",
                "measured": (
                    f"{auto['commands_per_message']:.1f} vs {floor['commands_per_message']:.1f}"
                    f" = {ratio:.2f} x"
                ),
                "passed": ratio <= TARGET_COMMANDS_FRACTION,
            }
        )
    idle = results["idle"].get("auto")
    if idle is not None:
        rows.append(
            {
                "target": f"idle subscriber (auto) CPU < {TARGET_IDLE_CPU:g} %",
                "measured": f"{idle['cpu_percent']:.3f} % over {idle['seconds']:.0f} s",
                "passed": idle["cpu_percent"] < TARGET_IDLE_CPU,
            }
        )
        rows.append(
            {
                "target": f"idle subscriber (auto) <= {TARGET_IDLE_COMMANDS:g} IMAP commands/min",
                "measured": f"{idle['commands_per_min']:.2f} /min ({idle['commands']} commands)",
                "passed": idle["commands_per_min"] <= TARGET_IDLE_COMMANDS,
            }
        )
    tput = results.get("throughput")
    if tput is not None:
        f = tput["floor"].get("end_to_end_msgs_per_s")
        e = tput["emailmw"].get("end_to_end_msgs_per_s")
        if f and e:
            lost = tput["emailmw"]["lost"]
            rows.append(
                {
                    "target": f"throughput >= {TARGET_THROUGHPUT_RATIO:g} x floor's",
                    "measured": f"{e:.0f} vs {f:.0f} msg/s = {e / f:.2f} x",
                    "passed": e / f >= TARGET_THROUGHPUT_RATIO and lost == 0,
                }
            )
    return rows


def fmt_load(load: Any) -> str:
    return " ".join(f"{x:.1f}" for x in load) or "?"


def label(path: str) -> str:
    return "floor (busy UID FETCH)" if path == "floor" else f"emailmw {path}"


def print_late_joiner(late: dict[str, Any]) -> None:
    """The late-joiner rows: p50/max in ms and as a multiple of the floor's p50."""
    w = sys.stdout.write
    floor = late["floor_p50_ms"]
    w(
        f"\nlate joiner: first message; a new subscriber process joins a {late['rate']:g} Hz "
        f"stream, {late['joins']} joins per mode\n(from Subscription() after init(), and "
        f"send -> in hand; x floor: / floor p50 {floor or 0:.1f} ms)\n"
    )
    w(f"{'path':<38}{'p50':>8}{'max':>8}{'p50 x':>8}{'max x':>8}{'queued':>8}{'none':>6}\n")
    for mode, r in late["modes"].items():
        queued = r.get("queued_behind", {})
        for key, what in (("time_to_first_ms", "to first"), ("first_latency_ms", "first latency")):
            v = r.get(key)
            name = f"late joiner {mode}: {what}"
            if v is None:
                w(f"{name:<38}{'(nothing received)':>40}{r['timeouts']:6d}\n")
                continue
            w(
                f"{name:<38}{v['p50']:8.1f}{v['max']:8.1f}{v.get('p50_x_floor', 0):8.1f}"
                f"{v.get('max_x_floor', 0):8.1f}"
            )
            if key == "time_to_first_ms":
                w(f"{queued.get('p50', 0):8.0f}{r['timeouts']:6d}\n")
            else:
                w("\n")
    w("  (queued: p50 of the messages in hand together with the first; none: no message)\n")
    for mode, r in late["modes"].items():
        slow = [j for j in r["each"] if j.get("first") is not None and j["time_to_first_ms"] > 1e3]
        if len(slow) > 3:
            w(
                f"  {mode}: {len(slow)} of {len(r['each'])} joins waited over a second; "
                "the first 3:\n"
            )
        for j in slow[:3]:
            after = j.get("predecessor_stored_after")
            where = (
                "not found in the folder"
                if after is None
                else f"stored {after} emails after it"
                if after > 0
                else "stored before it (the mail system did not hold it back)"
            )
            w(
                f"  {mode}: a join waited {j['time_to_first_ms'] / 1e3:.2f} s for message "
                f"{j['first']} ({j['queued_behind']} queued behind it); the one published "
                f"before it was {where}\n"
            )


def print_history(h: dict[str, Any]) -> None:
    """The history row: time and bytes of ``Subscription(..., history=N)``."""
    sys.stdout.write(
        f"\nhistory: last {h['last']} of {h['emails']:,} emails "
        f"({h['on_topic']:,} on the topic; folder {h['folder_bytes'] / 1e6:.1f} MB, "
        f"filled in {h['fill_s']:.0f} s)\n"
        f"  Subscription(..., history={h['last']}): {h['time_ms']:.0f} ms, "
        f"{h['bytes_read'] / 1e3:.1f} kB read from the server "
        f"({100 * h['bytes_read'] / h['folder_bytes']:.3f} % of the folder), "
        f"{h['commands']} IMAP commands; {h['delivered']} messages, "
        f"{'the right ones in order' if h['correct'] else 'NOT the expected ones'}; "
        f"a second one right after: {h['again_ms']:.0f} ms\n"
    )


def print_report(results: dict[str, Any]) -> None:
    s = results["settings"]
    m = results["machine"]
    w = sys.stdout.write
    w(
        f"emailmw mailbox benchmark: {s['messages']} messages at {s['rate']:g} Hz, "
        f"idle {s['idle_seconds']:g} s, burst {s['burst']}\n"
        f"machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, "
        f"emailmw {m['emailmw']} {m['commit']} (package {m.get('package', '?')})\n"
        f"load average (1/5/15 min) at start {fmt_load(m['load_average_at_start'])}, "
        f"at end {fmt_load(m.get('load_average_at_end', ()))}\n\n"
    )
    w("latency, send -> message in hand (ms); IMAP commands per message; receiver CPU\n")
    w(f"{'path':<26}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    w(f"{'cmd/msg':>9}{'CPU %':>8}{'lost':>6}\n")
    floor_p50 = results["floor"].get("p50_ms")
    paths = {"floor": results["floor"], **results["modes"]}
    for path, r in paths.items():
        if "p50_ms" not in r:
            w(f"{label(path):<26}{'(nothing received)':>40}\n")
            continue
        w(
            f"{label(path):<26}{r['p50_ms']:8.1f}{r['p90_ms']:8.1f}{r['p99_ms']:8.1f}"
            f"{r['max_ms']:8.1f}{r['commands_per_message']:9.2f}{r['cpu_percent']:8.1f}"
            f"{r['lost']:6d}\n"
        )
    late = results.get("late_joiner")
    if late is not None:
        print_late_joiner(late)
    if results["modes"]:
        w("\nratios to the floor (p50 latency, IMAP commands per message):\n")
    for path, r in results["modes"].items():
        if "p50_ms" in r and floor_p50:
            w(
                f"  {path:<12} p50 {r['p50_ms'] / floor_p50:5.2f} x   commands "
                f"{r['commands_per_message'] / results['floor']['commands_per_message']:5.3f} x\n"
            )
    w("\nIMAP commands per message, by command:\n")
    for path, r in paths.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_per_message"].items())
        w(f"  {path:<12} {parts}\n")
    paired = results.get("paired")
    if paired is not None and "delta_ms" in paired:
        e, f, d = paired["emailmw"], paired["floor"], paired["delta_ms"]
        w(
            f"\npaired: {PAIRED_MODE} subscriber and floor poller reading one folder, same "
            f"emails:\n  {PAIRED_MODE} p50 {e['p50_ms']:.1f} ms (p90 {e['p90_ms']:.1f}), floor "
            f"p50 {f['p50_ms']:.1f} ms (p90 {f['p90_ms']:.1f}) = {e['p50_ms'] / f['p50_ms']:.2f} x;"
            f"\n  per email, {PAIRED_MODE} minus floor: p10 {d['p10']:.1f}, p50 {d['p50']:.1f}, "
            f"p90 {d['p90']:.1f}, p99 {d['p99']:.1f} ms; {PAIRED_MODE} "
            f"{e['commands_per_message']:.2f} cmd/msg, floor {f['commands_per_message']:.0f}\n"
        )
    if results["idle"]:
        w(f"\nidle subscriber, {s['idle_seconds']:g} s waiting for nothing:\n")
        w(f"  {'mode':<12}{'CPU %':>9}{'IMAP cmd/min':>14}  commands\n")
        for mode, r in results["idle"].items():
            parts = ", ".join(f"{k} {v}" for k, v in sorted(r["breakdown"].items())) or "none"
            w(f"  {mode:<12}{r['cpu_percent']:9.3f}{r['commands_per_min']:14.2f}  {parts}\n")
    tput = results.get("throughput")
    if tput is not None:
        w(f"\nthroughput, {s['burst']} messages from one sender, first send -> last in hand:\n")
        for name, r in (("floor", tput["floor"]), (f"emailmw {THROUGHPUT_MODE}", tput["emailmw"])):
            e2e = r.get("end_to_end_msgs_per_s", 0.0)
            w(
                f"  {name:<14}{e2e:6.0f} msg/s end to end; 99 % in hand at "
                f"{r.get('msgs_per_s_to_99_percent', 0):.0f} msg/s; sending alone "
                f"{r['send_msgs_per_s']:.0f} msg/s\n"
                f"  {'':<14}{r['commands_per_message']:.2f} IMAP cmd/msg, receiver CPU "
                f"{r['cpu_percent']:.0f} %, lost {r['lost']}, out of order "
                f"{r['out_of_order']}, slowest email {r.get('max_ms', 0) / 1e3:.1f} s\n"
            )
    if results["targets"]:
        w("\ntargets:\n")
    for row in results["targets"]:
        verdict = "PASS" if row["passed"] else "MISS"
        w(f"  {row['target']:<56}{row['measured']:<36}{verdict}\n")


# -- main -----------------------------------------------------------------------------------


def print_sender_pool(section: dict[str, Any]) -> None:
    out = sys.stdout
    floor = section["floor"]
    out.write(
        f"\nsender pool: {floor['messages']} messages, as fast as they go\n"
        "| sender | publisher threads | sent msg/s | end to end msg/s |\n|---|---|---|---|\n"
        f"| floor: one smtplib connection | 1 | {floor['send_msgs_per_s']:.0f} "
        f"| {floor['end_to_end_msgs_per_s']:.0f} |\n"
    )
    for row in section["pool"]:
        out.write(
            f"| smtp-connections: {row['connections']} | {row['publishers']} "
            f"| {row['send_msgs_per_s']:.0f} | {row['end_to_end_msgs_per_s']:.0f} |\n"
        )


def print_fanout(rows: list[dict[str, Any]]) -> None:
    out = sys.stdout
    mode = rows[0]["mode"] if rows else "?"
    out.write(
        f"\nfan-out: one publisher, M recipient folders, a subscriber ({mode}) on each, 1 Hz\n"
        "| M | publish() p50 / max ms | first subscriber p50 ms | last subscriber p50 / max ms "
        "| incomplete |\n|---|---|---|---|---|\n"
    )
    for r in rows:
        nan = float("nan")
        out.write(
            f"| {r['recipients']} | {r['publish_p50_ms']:.1f} / {r['publish_max_ms']:.1f} "
            f"| {r.get('first_p50_ms', nan):.1f} "
            f"| {r.get('last_p50_ms', nan):.1f} / {r.get('last_max_ms', nan):.1f} "
            f"| {r['incomplete']} of {r['messages']} |\n"
        )


def counts(text: str, flag: str) -> list[int]:
    """A comma-separated list of positive counts."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{flag}: comma-separated positive counts, not {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="messages per stream (200)")
    parser.add_argument("--rate", type=float, default=10.0, help="stream rate in Hz (10)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle phase (60 s)")
    parser.add_argument("--burst", type=int, default=2000, help="throughput messages (2000)")
    parser.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help=f"receive modes to measure, comma-separated ({DEFAULT_MODES}); "
        "poll-<N>ms is poll mode with polling-period N ms",
    )
    parser.add_argument(
        "--no-paired",
        dest="paired",
        action="store_false",
        help=f"skip the paired run ({PAIRED_MODE} subscriber and floor poller on one folder)",
    )
    parser.add_argument(
        "--no-late-joiner",
        dest="late_joiner",
        action="store_false",
        help="skip the late-joiner row (new subscriber processes joining a 20 Hz stream)",
    )
    parser.add_argument(
        "--late-joiner-only",
        action="store_true",
        help="measure only the floor and the late-joiner row",
    )
    parser.add_argument(
        "--late-joins",
        type=int,
        default=LATE_JOINS,
        help=f"late joiners per mode, each a fresh process ({LATE_JOINS})",
    )
    parser.add_argument(
        "--late-joiner-modes",
        default=LATE_JOINER_MODES,
        help=f"receive modes of the late joiners, comma-separated ({LATE_JOINER_MODES})",
    )
    parser.add_argument(
        "--history-emails",
        type=int,
        default=HISTORY_EMAILS,
        help=f"emails in the history row's folder ({HISTORY_EMAILS})",
    )
    parser.add_argument(
        "--no-history", dest="history", action="store_false", help="skip the history row"
    )
    parser.add_argument("--history-only", action="store_true", help="measure only the history row")
    parser.add_argument(
        "--prune-only",
        action="store_true",
        help="measure only pruning (with topics and history): benchmarks/retention.py",
    )
    parser.add_argument(
        "--prune-emails",
        type=int,
        default=100_000,
        help="with --prune-only: emailmw emails in the folder to prune (100000)",
    )
    parser.add_argument(
        "--sender-pool-only",
        action="store_true",
        help="measure only the sender pool (smtp-connections) next to the floor",
    )
    parser.add_argument(
        "--pool-connections",
        default=POOL_CONNECTIONS,
        help=f"smtp-connections to measure ({POOL_CONNECTIONS})",
    )
    parser.add_argument(
        "--pool-publishers",
        type=int,
        default=POOL_PUBLISHERS,
        help=f"publisher threads ({POOL_PUBLISHERS})",
    )
    parser.add_argument(
        "--pool-messages",
        type=int,
        default=POOL_MESSAGES,
        help=f"messages per sender ({POOL_MESSAGES})",
    )
    parser.add_argument(
        "--fanout-only", action="store_true", help="measure only the fan-out to M mailboxes"
    )
    parser.add_argument(
        "--fanout-recipients",
        default=FANOUT_RECIPIENTS,
        help=f"values of M ({FANOUT_RECIPIENTS})",
    )
    parser.add_argument(
        "--fanout-messages",
        type=int,
        default=FANOUT_MESSAGES,
        help=f"messages per M, at 1 Hz ({FANOUT_MESSAGES})",
    )
    parser.add_argument(
        "--fanout-mode", default="auto", help="the fan-out subscribers' receive mode (auto)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--save", metavar="PATH", help="also write the JSON results to PATH")
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the results into PATH.png (needs emailmw[plot])",
    )
    args = parser.parse_args(argv)
    pyplot = None
    if args.plot:
        import _plot

        pyplot = _plot.start(parser, args.plot)
    if args.prune_only:  # the retention benchmark owns that measurement
        if args.prune_emails < 1:
            parser.error("--prune-emails must be >= 1")
        extra = ["--plot", args.plot] if args.plot else []
        return retention_benchmark().main(["--emails", str(args.prune_emails), *extra])
    if args.sender_pool_only or args.fanout_only:
        try:
            pool_connections = counts(args.pool_connections, "--pool-connections")
            fanout_recipients = counts(args.fanout_recipients, "--fanout-recipients")
            parse_mode(args.fanout_mode)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        if min(args.pool_publishers, args.pool_messages, args.fanout_messages) < 1:
            parser.error("--pool-publishers, --pool-messages, --fanout-messages must be >= 1")
        return scale_only(args, pool_connections, fanout_recipients)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    late_modes = [m.strip() for m in args.late_joiner_modes.split(",") if m.strip()]
    for mode in modes + late_modes:
        try:
            parse_mode(mode)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if args.late_joins < 1:
        parser.error("--late-joins must be >= 1")
    if args.late_joiner_only:
        if not args.late_joiner:
            parser.error("--late-joiner-only and --no-late-joiner contradict each other")
        modes, args.paired, args.idle_seconds, args.burst = [], False, 0.0, 0

    if args.history_only:
        if not args.history:
            parser.error("--history-only and --no-history contradict each other")
        modes, args.paired, args.idle_seconds, args.burst = [], False, 0.0, 0
        args.late_joiner = False
    if args.history and args.history_emails < HISTORY_LAST:
        parser.error(f"--history-emails must be >= {HISTORY_LAST}")
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "messages": args.messages,
            "rate": args.rate,
            "idle_seconds": args.idle_seconds,
            "burst": args.burst,
            "modes": modes,
            "late_joiner_modes": late_modes if args.late_joiner else [],
            "late_joins": args.late_joins,
        },
        "modes": {},
        "idle": {},
    }
    started = time.monotonic()
    with DevServer(accounts=(ACCOUNT,)) as server:
        bench = Bench(server)
        bench.progress = ProgressReporter(sys.stderr, "mailbox")
        with bench.phase("warm-up"):
            bench.warm_up()
        if args.history:
            with bench.phase("history fill"):
                results["history"] = bench.history(args.history_emails, HISTORY_LAST)
        if not args.history_only:
            with bench.phase("floor"):
                results["floor"] = bench.floor(args.messages, args.rate)
        if args.late_joiner and late_modes:
            with bench.phase("late joiners"):
                results["late_joiner"] = bench.late_joiner(
                    late_modes, args.late_joins, results["floor"].get("p50_ms")
                )
        for mode in modes:
            with bench.phase(f"stream {mode}"):
                results["modes"][mode] = bench.stream(mode, args.messages, args.rate)
        if args.paired:
            with bench.phase("paired"):
                results["paired"] = bench.paired(PAIRED_MODE, args.messages, args.rate)
        if args.idle_seconds > 0:
            with bench.phase("idle subscribers"):
                results["idle"] = bench.idle(modes, args.idle_seconds)
        if args.burst > 0:
            with bench.phase("burst floor"):
                burst_floor = bench.floor(args.burst, 0.0)
            with bench.phase(f"burst {THROUGHPUT_MODE}"):
                burst_emailmw = bench.stream(THROUGHPUT_MODE, args.burst, 0.0)
            results["throughput"] = {"floor": burst_floor, "emailmw": burst_emailmw}
    results["elapsed_s"] = time.monotonic() - started
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["targets"] = targets(results) if "floor" in results else []
    if args.save:
        with open(args.save, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.history_only:
        m = results["machine"]
        sys.stdout.write(
            f"machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; load average "
            f"at start {fmt_load(m['load_average_at_start'])}, "
            f"at end {fmt_load(m['load_average_at_end'])}\n"
        )
        print_history(results["history"])
        sys.stdout.write(f"\n(run took {results['elapsed_s']:.0f} s)\n")
    else:
        print_report(results)
        if "history" in results:
            print_history(results["history"])
        sys.stdout.write(f"\n(run took {results['elapsed_s']:.0f} s)\n")
    if pyplot is not None:
        plot(pyplot, args.plot, results)
    return 0


# -- plot -----------------------------------------------------------------------------------


def plot(pyplot: Any, path: str, results: dict[str, Any]) -> None:
    """Draw the results: latency CDFs per receive mode next to the floor, the paired
    run, IMAP commands per message, throughput, the late joiners, idle, history."""
    import _plot

    panels: list[Callable[[Any], None]] = []
    floor = results.get("floor", {})
    s = results["settings"]
    streams = {"floor": floor, **results["modes"]}
    if any("latency_by_seq_ms" in r for r in streams.values()):

        def latency(ax: Any) -> None:
            for path_name, r in streams.items():
                style = {"color": "k", "linewidth": 2} if path_name == "floor" else {}
                _plot.cdf(ax, r.get("latency_by_seq_ms", []), label(path_name), **style)
            _plot.log_scale(ax)
            ax.set_xlabel("latency, send -> message in hand (ms)")
            ax.set_title(f"{s['messages']} messages at {s['rate']:g} Hz, per receive mode")
            ax.legend(loc="lower right")

        panels.append(latency)
    paired = results.get("paired")
    if paired is not None and "latency_by_seq_ms" in paired["emailmw"]:

        def paired_cdf(ax: Any) -> None:
            _plot.cdf(ax, paired["floor"].get("latency_by_seq_ms", []), label("floor"), color="k")
            _plot.cdf(ax, paired["emailmw"]["latency_by_seq_ms"], label(PAIRED_MODE))
            _plot.log_scale(ax)
            ax.set_xlabel("latency, send -> message in hand (ms)")
            ax.set_title("paired: both reading one folder, the same emails")
            ax.legend(loc="lower right")

        panels.append(paired_cdf)
    commanded = {p: r for p, r in streams.items() if "commands_per_message" in r}
    if commanded:

        def commands(ax: Any) -> None:
            _plot.bars(
                ax,
                [label(p) for p in commanded],
                [r["commands_per_message"] for r in commanded.values()],
                unit="IMAP commands per message",
                fmt="{:.2f}",
                suffix="",
                colors=["k" if p == "floor" else "C0" for p in commanded],
            )
            _plot.log_scale(ax)
            ax.set_title("IMAP commands per message (the receiver's own count)")

        panels.append(commands)
    tput = results.get("throughput")
    if tput is not None:

        def throughput(ax: Any) -> None:
            pair = (tput["floor"], tput["emailmw"])
            _plot.grouped_bars(
                ax,
                ["floor (busy UID FETCH)", f"emailmw {THROUGHPUT_MODE}"],
                {
                    "end to end": [r.get("end_to_end_msgs_per_s", 0.0) for r in pair],
                    "99 % in hand": [r.get("msgs_per_s_to_99_percent", 0.0) for r in pair],
                    "sending alone": [r["send_msgs_per_s"] for r in pair],
                },
                unit="msg/s",
                fmt="{:.0f}",
            )
            ax.set_title(f"throughput, {s['burst']} messages from one sender")

        panels.append(throughput)
    late = results.get("late_joiner")
    if late is not None:

        def late_joiners(ax: Any) -> None:
            modes = list(late["modes"])
            for index, mode in enumerate(modes):
                each = late["modes"][mode]["each"]
                got = [j["time_to_first_ms"] for j in each if j.get("first") is not None]
                ax.scatter([index] * len(got), got, s=14, alpha=0.7, label=f"{mode}: each join")
                timeouts = len(each) - len(got)
                if timeouts:
                    ax.annotate(f"{timeouts} got nothing", (index, STALL * 1e3), ha="center")
            if late["floor_p50_ms"]:
                ax.axhline(late["floor_p50_ms"], color="k", linestyle="--", linewidth=0.8)
                ax.annotate("floor p50", (len(modes) - 0.5, late["floor_p50_ms"]), fontsize=7)
            ax.set_xticks(range(len(modes)), [f"late joiner {m}" for m in modes])
            ax.set_xlim(-0.5, len(modes) - 0.5)
            _plot.log_scale(ax, "y")
            ax.set_ylabel("Subscription() -> first message (ms)")
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.set_title(
                f"late joiners: {late['joins']} per mode into a {late['rate']:g} Hz stream"
            )

        panels.append(late_joiners)
    if results["idle"]:

        def idle(ax: Any) -> None:
            _plot.bars(
                ax,
                [f"{m} ({r['cpu_percent']:.2f} % CPU)" for m, r in results["idle"].items()],
                [r["commands_per_min"] for r in results["idle"].values()],
                unit="IMAP commands/min",
                fmt="{:.2f}",
                suffix="/min",
            )
            ax.axvline(TARGET_IDLE_COMMANDS, color="C3", linestyle="--", linewidth=0.8)
            ax.set_title(f"idle subscriber, {s['idle_seconds']:g} s (dashed: target)")

        panels.append(idle)
    history = results.get("history")
    if history is not None:

        def history_bars(ax: Any) -> None:
            _plot.bars(
                ax,
                [f"Subscription(history={history['last']})", "a second one right after"],
                [history["time_ms"], history["again_ms"]],
                unit="ms",
                fmt="{:.0f}",
            )
            ax.set_title(
                f"history: last {history['last']} of {history['emails']:,} emails; "
                f"{history['bytes_read'] / 1e3:.0f} kB of {history['folder_bytes'] / 1e6:.0f} MB "
                "read"
            )

        panels.append(history_bars)
    fig, axes = _plot.figure(pyplot, max(len(panels), 1), size=(5.5, 3.4))
    for draw, ax in zip(panels, axes, strict=False):
        draw(ax)
    _plot.save(pyplot, fig, path, "mailbox: emailmw over Dovecot + Postfix next to the floor")


def retention_benchmark() -> Any:
    """``benchmarks/retention.py`` as a module (loaded from beside this file: this
    script's own name shadows the standard library's ``mailbox``, so the benchmarks
    are not importable as a package)."""
    path = pathlib.Path(__file__).with_name("retention.py")
    spec = importlib.util.spec_from_file_location("emailmw_bench_retention", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scale_only(args: argparse.Namespace, connections: list[int], recipients: list[int]) -> int:
    """``--sender-pool-only`` and/or ``--fanout-only``: those sections alone."""
    results: dict[str, Any] = {"machine": machine()}
    started = time.monotonic()
    with DevServer(accounts=(ACCOUNT,)) as server:
        bench = Bench(server)
        bench.warm_up()
        if args.sender_pool_only:
            results["sender_pool"] = bench.sender_pool(
                connections, args.pool_publishers, args.pool_messages
            )
        if args.fanout_only:
            results["fanout"] = [
                bench.fanout(m, args.fanout_messages, args.fanout_mode) for m in recipients
            ]
    results["elapsed_s"] = time.monotonic() - started
    results["machine"]["load_average_at_end"] = os.getloadavg()
    if args.save:
        with open(args.save, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    m = results["machine"]
    sys.stdout.write(
        f"machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, commit "
        f"{m['commit']}; load average at start {fmt_load(m['load_average_at_start'])}, "
        f"at end {fmt_load(m['load_average_at_end'])}\n"
    )
    if "sender_pool" in results:
        print_sender_pool(results["sender_pool"])
    if "fanout" in results:
        print_fanout(results["fanout"])
    sys.stdout.write(f"\n(run took {results['elapsed_s']:.0f} s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
