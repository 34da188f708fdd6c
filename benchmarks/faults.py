"""Fault-injection benchmark: does every message survive a mail-server fault?

Each scenario starts its own Dovecot + Postfix (:class:`emailmw.devserver.DevServer`),
a subscriber context and a publisher context on one fresh folder, and a
publisher thread that publishes a numbered stream (``"0"``, ``"1"``, ...) as
fast as ``publish()`` returns. When the stream is half way, a fault is injected
from another thread while the publisher carries on. Afterwards it counts, per
fault:

* ``sent``: ``publish()`` calls that returned (the SMTP server accepted them);
* ``publish errors``: ``publish()`` calls that raised (they may or may not arrive);
* ``delivered``: distinct messages the subscription got;
* ``duplicated``: copies the subscription got beyond the first (must be 0);
* ``lost``: messages whose ``publish()`` returned but that never arrived (must be 0);
* ``recovery``: from the moment the fault began until the first message whose
  ``publish()`` started after that moment was delivered;
* ``longest delivery gap``: the longest time the subscriber went without a new
  message (how long delivery stalled);
* ``max publish``: the longest single ``publish()`` call.

Faults: ``dovecot-restart``, ``postfix-restart``, ``kick`` (``doveadm kick``
drops the IMAP connections), ``postfix-down`` (Postfix stopped for longer than
``send-timeout``: some ``publish()`` calls must raise), ``smtp-silent`` and
``imap-silent`` (a proxy in front of the server stops answering for a few
seconds: existing connections hang, new ones are accepted and never greeted),
and ``silent-init`` (``init()`` against a server that accepts TCP and never
answers: how long until ``ConnectError``).

    python benchmarks/faults.py                  # every fault, 1000 messages each
    python benchmarks/faults.py --messages 300 --only kick --only dovecot-restart
    python benchmarks/faults.py --json
    python benchmarks/faults.py --plot faults.png   # also draw each fault's timeline

Needs the local mail stack (Debian's dovecot-imapd, dovecot-lmtpd, postfix; root).
Which fault it is at goes to stderr (a bar on a terminal). The module is also
imported by ``tests/test_faults.py``, which asserts on the same runs. Nothing
here asserts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import emailmw
from emailmw._progress import ProgressReporter
from emailmw.devserver import DevServer

__all__ = [
    "FAULTS",
    "SilentServer",
    "StreamReport",
    "TcpProxy",
    "main",
    "run_fault",
    "run_stream",
    "silent_init",
    "stream_config",
]

logger = logging.getLogger("faults")

#: connect/command timeout and send-timeout used by every scenario (seconds)
TIMEOUT = 2.0
SEND_TIMEOUT = 10.0
#: how long a "silent" fault lasts, and how long Postfix stays down in "postfix-down"
SILENCE = 3.0
DOWN = 4.0
DOWN_SEND_TIMEOUT = 1.5
#: after the publisher is done, how long to wait for the last messages ...
SETTLE = 60.0
#: ... and then how long to keep listening for late duplicates
QUIET = 1.0


# ----------------------------------------------------------------------------- network tools


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts every connection and never says a word."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """How many connections it accepted."""
        return len(self._held)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        for conn in self._held:
            conn.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pipe:
    """One proxied connection: two pumps that forward bytes while ``flowing`` is set."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            # a frozen connection forwards nothing, not even the end of the stream
            while not self.flowing.wait(0.05):
                if self.closed.is_set():
                    return
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            try:
                dst.sendall(data)
            except OSError:
                self.close()
                return

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """Forwards connections from a loopback port to ``127.0.0.1:target_port``,
    byte for byte (TLS passes through untouched), and can go silent.

    * :meth:`freeze`: existing connections stop forwarding in both directions
      (no data, no close: a server that hangs), and new connections are accepted
      but never connected upstream (a server that accepts TCP and never answers).
    * :meth:`resume`: everything flows again; connections accepted while frozen
      are closed (their clients gave up long ago).
    * :meth:`blackhole`: the existing connections hang for good (a half-open
      connection: the server is gone without a FIN), new ones work normally.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self._target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pipes: list[_Pipe] = []
        self._limbo: list[_Pipe] = []  # blackholed for good
        self._held: list[socket.socket] = []
        self._frozen = False
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                if self._closed:
                    client.close()
                    return
                if self._frozen:
                    self._held.append(client)
                    continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down: so is the proxy
                continue
            with self._lock:
                self._pipes.append(_Pipe(client, upstream))

    def freeze(self) -> None:
        """Go silent (see the class docstring)."""
        with self._lock:
            self._frozen = True
            for pipe in self._pipes:
                pipe.flowing.clear()

    def resume(self) -> None:
        """Forward again (see the class docstring)."""
        with self._lock:
            self._frozen = False
            held, self._held = self._held, []
            for pipe in self._pipes:
                pipe.flowing.set()
        for sock in held:
            sock.close()

    def blackhole(self) -> None:
        """Hang the existing connections for good; new ones are unaffected."""
        with self._lock:
            for pipe in self._pipes:
                pipe.flowing.clear()
            self._limbo.extend(self._pipes)
            self._pipes = []

    def close(self) -> None:
        """Stop listening and close every connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pipes = self._pipes + self._limbo
            held, self._held = self._held, []
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        for pipe in pipes:
            pipe.close()
        for sock in held:
            sock.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- the stream


def stream_config(
    server: DevServer,
    folder: str,
    address: str,
    *,
    smtp_url: str | None = None,
    imap_url: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config for alice reading ``folder`` and publishing to (and from) ``address``.

    ``smtp_url``/``imap_url`` replace the server URLs (a proxy); ``overrides``
    replaces keys of the ``email:`` section (YAML spelling, e.g.
    ``{"send-timeout": 5}``). ``timeout`` and ``send-timeout`` default to
    :data:`TIMEOUT` and :data:`SEND_TIMEOUT`.
    """
    config = server.config("alice", mailbox=folder, to=address)
    section = config["email"]
    if smtp_url is not None:
        section["user"]["url-smtp"] = smtp_url
    if imap_url is not None:
        section["user"]["url-imap"] = imap_url
    section.update({"timeout": TIMEOUT, "send-timeout": SEND_TIMEOUT, "from": address})
    section.update(overrides or {})
    return config


@dataclass
class StreamReport:
    """What happened to one numbered stream across one fault."""

    fault: str
    messages: int
    sent: int = 0
    publish_errors: dict[int, str] = field(default_factory=dict)
    delivered: int = 0
    duplicated: int = 0
    lost: list[int] = field(default_factory=list)
    #: for each lost message: the UIDs it has in the mailbox ([]: the server lost it)
    lost_in_mailbox: dict[int, list[int]] = field(default_factory=dict)
    #: when something was lost: what the mail servers' logs say about it
    server_notes: str = ""
    errored_but_delivered: int = 0
    unexpected: list[str] = field(default_factory=list)
    fault_duration: float = 0.0
    recovery: float | None = None
    longest_gap: float = 0.0
    max_publish: float = 0.0
    publisher_finished: bool = True
    elapsed: float = 0.0
    subscriber_stats: dict[str, Any] = field(default_factory=dict)
    publisher_stats: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    #: for the plot, in seconds from the first publish() call: ``published`` {i: (start,
    #: end)}, ``arrived`` {i: first arrival}, ``fault`` [begin, end] (not in the JSON)
    timeline: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """No loss, no duplicate, nothing unexpected, every publish() returned or raised."""
        return (
            not self.lost
            and not self.duplicated
            and not self.unexpected
            and self.publisher_finished
            and self.sent + len(self.publish_errors) == self.messages
        )


class _Collector:
    """Takes every message from a subscription on its own thread and timestamps it."""

    def __init__(self, subscription: emailmw.Subscription) -> None:
        self._subscription = subscription
        self.counts: collections.Counter[str] = collections.Counter()
        self.first_arrival: dict[str, float] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = emailmw.wait_for_message(self._subscription, 0.1)
            except emailmw.WaitTimeoutError:
                continue
            except emailmw.ContextError:
                return
            now = time.monotonic()
            with self._lock:
                self.counts[message] += 1
                self.first_arrival.setdefault(message, now)
                self._changed.notify_all()

    def wait_for(self, wanted: set[str], timeout: float) -> bool:
        """Wait until every message in ``wanted`` arrived; False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: wanted <= self.counts.keys(), timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _stats_dict(stats: emailmw.Stats) -> dict[str, Any]:
    data = asdict(stats)
    data["dropped"] = {k: v for k, v in stats.dropped.items() if v}
    return data


def run_stream(
    fault: Callable[[], None],
    *,
    name: str,
    publisher_config: dict[str, Any],
    subscriber_config: dict[str, Any],
    messages: int = 1000,
    fault_at: int | None = None,
    settle: float = SETTLE,
    mailbox: tuple[DevServer, str] | None = None,
) -> StreamReport:
    """Publish ``messages`` numbered messages; call ``fault()`` (on its own thread)
    once ``fault_at`` (default: half) of them were published; count what the
    subscriber got. Both contexts are shut down before this returns.

    ``mailbox`` (server, folder): where to look for lost messages, to tell a
    server that lost them from a receiver that missed them.
    """
    topic = f"/faults/{name}"
    fault_at = messages // 2 if fault_at is None else fault_at
    report = StreamReport(name, messages)
    started_at: dict[int, float] = {}
    ended_at: dict[int, float] = {}
    durations: list[float] = []
    fault_window: list[float] = []
    reached = threading.Event()

    def inject() -> None:
        reached.wait()
        begin = time.monotonic()
        fault_window.append(begin)
        try:
            fault()
        finally:
            fault_window.append(time.monotonic())

    begin = time.monotonic()
    with (
        emailmw.Context(emailmw.Options.from_dict(subscriber_config)) as sub_ctx,
        emailmw.Context(emailmw.Options.from_dict(publisher_config)) as pub_ctx,
    ):
        subscription = emailmw.Subscription(topic, depth=max(messages * 2, 1), context=sub_ctx)
        publisher = emailmw.Publisher(topic, context=pub_ctx)
        collector = _Collector(subscription)

        def publish_all() -> None:
            for i in range(messages):
                if i == fault_at:
                    reached.set()
                start = time.monotonic()
                started_at[i] = start
                try:
                    publisher.publish(str(i))
                except emailmw.EmailmwError as exc:
                    report.publish_errors[i] = f"{type(exc).__name__}: {exc}"
                else:
                    report.sent += 1
                ended_at[i] = time.monotonic()
                durations.append(ended_at[i] - start)
            reached.set()

        injector = threading.Thread(target=inject, name="fault", daemon=True)
        injector.start()
        publishing = threading.Thread(target=publish_all, name="publisher", daemon=True)
        publishing.start()
        limit = messages * (SEND_TIMEOUT + TIMEOUT + 1.0) + 60.0
        publishing.join(limit)
        injector.join(60.0)
        report.publisher_finished = not publishing.is_alive()
        ok = {str(i) for i in range(messages) if i in started_at and i not in report.publish_errors}
        collector.wait_for(ok, settle)
        time.sleep(QUIET)  # only to see whether a late duplicate shows up
        collector.stop()
        report.subscriber_stats = _stats_dict(sub_ctx.stats())
        report.publisher_stats = _stats_dict(pub_ctx.stats())
    report.elapsed = time.monotonic() - begin

    counts = collector.counts
    expected = {str(i) for i in range(messages)}
    report.delivered = len(counts.keys() & expected)
    report.duplicated = sum(n - 1 for n in counts.values() if n > 1)
    report.unexpected = sorted(counts.keys() - expected)
    report.lost = sorted(int(m) for m in ok - counts.keys())
    report.errored_but_delivered = sum(1 for i in report.publish_errors if str(i) in counts)
    report.max_publish = max(durations, default=0.0)
    arrival_times = sorted(collector.first_arrival.values())
    report.longest_gap = max((b - a for a, b in itertools.pairwise(arrival_times)), default=0.0)
    if len(fault_window) == 2:
        fault_begin, fault_end = fault_window
        report.fault_duration = fault_end - fault_begin
        arrivals = collector.first_arrival
        after = [
            arrivals[str(i)]
            for i, at in started_at.items()
            if at >= fault_begin and str(i) in arrivals
        ]
        if after:
            report.recovery = min(after) - fault_begin
    zero = min(started_at.values(), default=begin)
    report.timeline = {
        "published": {i: (at - zero, ended_at[i] - zero) for i, at in started_at.items()},
        "arrived": {
            int(m): at - zero for m, at in collector.first_arrival.items() if m in expected
        },
        "fault": [at - zero for at in fault_window],
    }
    if report.lost and mailbox is not None:
        found, message_ids = _read_mailbox(*mailbox)
        report.lost_in_mailbox = {i: found.get(str(i), []) for i in report.lost}
        report.server_notes = _server_notes(mailbox[0], message_ids)
    return report


def _read_mailbox(server: DevServer, folder: str) -> tuple[dict[str, list[int]], set[str]]:
    """Every email in ``folder``: UIDs by body, and the set of Message-IDs."""
    from imapclient import IMAPClient

    from emailmw.transport.codec import decode_email

    account = server.account("alice")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    found: dict[str, list[int]] = collections.defaultdict(list)
    message_ids: set[str] = set()
    with IMAPClient(server.host, server.imaps_port, ssl=True, ssl_context=context) as imap:
        imap.login(account.address, account.password)
        imap.select_folder(folder, readonly=True)
        uids = imap.search("ALL")
        for start in range(0, len(uids), 500):
            for uid, item in imap.fetch(uids[start : start + 500], ["BODY.PEEK[]"]).items():
                email = decode_email(item[b"BODY[]"])
                if email is not None:
                    found[email.content.body].append(uid)
                    message_ids.add(email.message_id)
    return found, message_ids


def _server_notes(server: DevServer, in_mailbox: set[str]) -> str:
    """The Postfix and Dovecot log lines about every Message-ID that Postfix took
    but that is not in the mailbox, and what is still in Postfix's queue."""
    postfix_log = (server.root / "postfix-log" / "postfix.log").read_text(errors="replace")
    dovecot_log = (server.root / "dovecot" / "log" / "dovecot.log").read_text(errors="replace")
    queue_ids: dict[str, str] = {}
    for line in postfix_log.splitlines():
        if "message-id=<" in line:
            queue_id = line.split(": ", 2)[1] if line.count(": ") >= 2 else ""
            message_id = "<" + line.split("message-id=<", 1)[1].split(">", 1)[0] + ">"
            queue_ids[message_id] = queue_id
    notes = []
    for message_id, queue_id in queue_ids.items():
        if message_id in in_mailbox:
            continue
        notes.append(f"not in the mailbox: {message_id} (Postfix queue id {queue_id})")
        notes += [f"  postfix: {line}" for line in postfix_log.splitlines() if queue_id in line]
        bare = message_id.strip("<>")
        notes += [f"  dovecot: {line}" for line in dovecot_log.splitlines() if bare in line]
    queue = subprocess.run(
        ["postqueue", "-c", str(server.root / "postfix"), "-p"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    notes.append("postqueue -p: " + (queue.stdout.strip() or queue.stderr.strip()))
    return "\n".join(notes)


# ----------------------------------------------------------------------------- the faults


@contextlib.contextmanager
def _server() -> Iterator[DevServer]:
    with DevServer(accounts=("alice",)) as server:
        yield server


def _pause(seconds: float) -> None:
    time.sleep(seconds)  # the fault lasts this long


def run_fault(name: str, messages: int = 1000) -> StreamReport:
    """Run the scenario ``name`` (one of :data:`FAULTS`) on a DevServer of its own."""
    with _server() as server:
        folder, address = server.new_mailbox("alice")
        direct = stream_config(server, folder, address)
        if name == "dovecot-restart":
            return run_stream(
                server.restart_dovecot,
                name=name,
                publisher_config=direct,
                subscriber_config=direct,
                messages=messages,
                mailbox=(server, folder),
            )
        if name == "postfix-restart":
            return run_stream(
                server.restart_postfix,
                name=name,
                publisher_config=direct,
                subscriber_config=direct,
                messages=messages,
                mailbox=(server, folder),
            )
        if name == "kick":
            return run_stream(
                lambda: server.kick("alice"),
                name=name,
                publisher_config=direct,
                subscriber_config=direct,
                messages=messages,
                mailbox=(server, folder),
            )
        if name == "postfix-down":

            def down() -> None:
                server.stop_postfix()
                try:
                    _pause(DOWN)
                finally:
                    server.start_postfix()

            report = run_stream(
                down,
                name=name,
                publisher_config=stream_config(
                    server, folder, address, overrides={"send-timeout": DOWN_SEND_TIMEOUT}
                ),
                subscriber_config=direct,
                messages=messages,
                mailbox=(server, folder),
            )
            report.notes = f"Postfix down {DOWN:g} s, send-timeout {DOWN_SEND_TIMEOUT:g} s"
            return report
        if name in ("smtp-silent", "imap-silent"):
            port = server.smtp_port if name == "smtp-silent" else server.imap_port
            with TcpProxy(port) as proxy:

                def silence() -> None:
                    proxy.freeze()
                    try:
                        _pause(SILENCE)
                    finally:
                        proxy.resume()

                via = f"{'smtp' if name == 'smtp-silent' else 'imap'}://127.0.0.1:{proxy.port}"
                proxied = stream_config(
                    server,
                    folder,
                    address,
                    smtp_url=via if name == "smtp-silent" else None,
                    imap_url=via if name == "imap-silent" else None,
                )
                report = run_stream(
                    silence,
                    name=name,
                    publisher_config=proxied if name == "smtp-silent" else direct,
                    subscriber_config=proxied if name == "imap-silent" else direct,
                    messages=messages,
                    mailbox=(server, folder),
                )
                report.notes = f"silent {SILENCE:g} s, timeout {TIMEOUT:g} s"
                return report
        raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")


def silent_init(server: DevServer, which: str, timeout: float = 1.0) -> tuple[float, str]:
    """``init()`` with the SMTP or the IMAP URL pointing at a :class:`SilentServer`:
    the seconds until it raised, and the error (``type: message``)."""
    folder, address = server.new_mailbox("alice")
    with SilentServer() as silent:
        url = f"{which}://127.0.0.1:{silent.port}"
        config = stream_config(
            server,
            folder,
            address,
            smtp_url=url if which == "smtp" else None,
            imap_url=url if which == "imap" else None,
            overrides={"timeout": timeout},
        )
        context = emailmw.Context(emailmw.Options.from_dict(config))
        started = time.monotonic()
        try:
            context.init()
        except emailmw.EmailmwError as exc:
            return time.monotonic() - started, f"{type(exc).__name__}: {exc}"
        finally:
            context.shutdown()
        return time.monotonic() - started, "no error"


FAULTS = (
    "dovecot-restart",
    "postfix-restart",
    "kick",
    "postfix-down",
    "smtp-silent",
    "imap-silent",
)


# ----------------------------------------------------------------------------- CLI


def _table(reports: list[StreamReport]) -> str:
    head = (
        "| fault | sent | publish errors | delivered | duplicated | lost "
        "| recovery | fault lasted | longest delivery gap | max publish() |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        recovery = f"{r.recovery:.2f} s" if r.recovery is not None else "-"
        lines.append(
            f"| {r.fault} | {r.sent} | {len(r.publish_errors)} | {r.delivered} "
            f"| {r.duplicated} | {len(r.lost)} | {recovery} | {r.fault_duration:.2f} s "
            f"| {r.longest_gap:.2f} s | {r.max_publish:.2f} s |"
        )
    return "\n".join(lines)


def plot(
    pyplot: Any, path: str, reports: list[StreamReport], init_rows: list[tuple[str, float, str]]
) -> None:
    """Each fault's timeline (publish() calls and deliveries against time, the fault
    shaded), and the silent-init times."""
    import _plot

    fig, axes = _plot.figure(pyplot, len(reports) + bool(init_rows), size=(5.0, 3.0))
    for ax, r in zip(axes, reports, strict=False):
        published = r.timeline.get("published", {})
        arrived = r.timeline.get("arrived", {})
        fault = r.timeline.get("fault", [])
        if len(fault) == 2:
            ax.axvspan(fault[0], fault[1], color="C3", alpha=0.15, label="fault")
        ok = [i for i in published if i not in r.publish_errors]
        ax.scatter([published[i][0] for i in ok], ok, s=2, color="C0", label="publish() started")
        ax.scatter(list(arrived.values()), list(arrived), s=2, color="C2", label="delivered")
        failed = [i for i in published if i in r.publish_errors]
        if failed:
            starts = [published[i][0] for i in failed]
            ax.scatter(starts, failed, s=12, marker="x", color="C3", label="publish() raised")
        if r.lost:
            starts = [published[i][0] for i in r.lost if i in published]
            ax.scatter(starts, r.lost[: len(starts)], s=16, marker="v", color="k", label="lost")
        recovery = f"{r.recovery:.2f} s" if r.recovery is not None else "-"
        ax.set_title(
            f"{r.fault}: recovery {recovery}, lost {len(r.lost)}, duplicated {r.duplicated}"
        )
        ax.set_xlabel("seconds since the first publish()")
        ax.set_ylabel("message number")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", markerscale=3)
    if init_rows:
        _plot.bars(
            axes[-1],
            [f"init(), silent {which.upper()} server" for which, _, _ in init_rows],
            [seconds for _, seconds, _ in init_rows],
            unit="s",
            fmt="{:.2f}",
        )
        axes[-1].set_title("until init() raised (timeout 1 s)")
    messages = reports[0].messages if reports else 0
    _plot.save(pyplot, fig, path, f"faults: {messages} messages per fault")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages per fault")
    parser.add_argument("--only", action="append", choices=(*FAULTS, "silent-init"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--log", metavar="FILE", help="write emailmw's debug log to FILE")
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
    if args.log:
        logging.basicConfig(
            filename=args.log,
            filemode="w",
            level=logging.WARNING,
            format="%(asctime)s %(threadName)s %(name)s %(levelname)s: %(message)s",
        )
        logging.getLogger("emailmw").setLevel(logging.DEBUG)
    else:
        logging.basicConfig(level=logging.CRITICAL)
    chosen = args.only or [*FAULTS, "silent-init"]
    reports: list[StreamReport] = []
    init_rows: list[tuple[str, float, str]] = []
    started = time.monotonic()
    progress = ProgressReporter(sys.stderr, "faults")
    for done, name in enumerate(chosen):
        progress("faults", done, len(chosen))
        progress.close()  # the fault's own line follows the bar
        if name == "silent-init":
            with _server() as server:
                for which in ("smtp", "imap"):
                    seconds, error = silent_init(server, which)
                    init_rows.append((which, seconds, error))
            continue
        report = run_fault(name, args.messages)
        reports.append(report)
        if not args.json:
            sys.stderr.write(f"{name}: done in {report.elapsed:.1f} s\n")
    progress("faults", len(chosen), len(chosen))
    if pyplot is not None:
        plot(pyplot, args.plot, reports, init_rows)
    if args.json:
        out = {
            "faults": [
                {k: v for k, v in asdict(r).items() if k != "timeline"} | {"ok": r.ok}
                for r in reports
            ],
            "silent_init": [
                {"server": w, "seconds": round(s, 3), "error": e} for w, s, e in init_rows
            ],
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0 if all(r.ok for r in reports) else 1
    lines = [
        f"{args.messages} messages per fault; timeout {TIMEOUT:g} s, send-timeout "
        f"{SEND_TIMEOUT:g} s unless noted",
        "",
    ]
    if reports:
        lines.append(_table(reports))
        for r in reports:
            if r.notes:
                lines.append(f"  {r.fault}: {r.notes}")
            if r.lost:
                lines.append(f"  {r.fault}: LOST {r.lost[:20]}")
                lines.append(f"  {r.fault}: their UIDs in the mailbox: {r.lost_in_mailbox}")
                lines.append(r.server_notes)
            if r.unexpected:
                lines.append(f"  {r.fault}: unexpected {r.unexpected[:20]}")
            if r.publish_errors:
                first = next(iter(r.publish_errors.values()))
                lines.append(
                    f"  {r.fault}: {len(r.publish_errors)} publish() raised, "
                    f"{r.errored_but_delivered} of them arrived anyway; first: {first[:160]}"
                )
            drops = r.subscriber_stats.get("dropped", {})
            lines.append(
                f"  {r.fault}: subscriber reconnects {r.subscriber_stats.get('reconnects')}, "
                f"drops {drops or 'none'}; publisher retries "
                f"{r.publisher_stats.get('send_retries')}, reconnects "
                f"{r.publisher_stats.get('reconnects')}"
            )
    for which, seconds, error in init_rows:
        lines.append(
            f"init() against a silent {which.upper()} server (timeout 1 s): "
            f"{seconds:.2f} s, {error[:160]}"
        )
    lines.append(f"total {time.monotonic() - started:.1f} s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
