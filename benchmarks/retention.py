"""Retention and mailbox tools benchmark: ``prune``, ``topics`` and ``history`` on a
big folder of the real dev server.

Starts its own local mail stack (:class:`emailmw.devserver.DevServer`), fills a
fresh folder with ``--emails`` emailmw publications (encoded by emailmw's own
codec, ``--topics`` topics, 3 publishers, one every 10 ms of ``Source-Timestamp``)
plus ``--foreign`` foreign emails, with IMAP ``MULTIAPPEND`` (500 a command) on one connection
(much faster than SMTP; the fill time is printed), then times, each on a fresh
session as the CLI does:

* ``emailmw topics`` (:func:`emailmw.commands.run_topics`);
* ``emailmw history TOPIC -n 100`` (:func:`emailmw.commands.run_history`), and
  the bytes read from the server for it;
* ``emailmw prune --dry-run`` and ``prune --older-than 0`` (every emailmw email
  of the folder deleted; the foreign ones stay, which is checked).

    python benchmarks/retention.py                    # 100 000 emails
    python benchmarks/retention.py --emails 20000     # quicker
    python benchmarks/retention.py --plot retention.png   # also draw the times

How far the fill, ``history`` and ``prune`` got goes to stderr (a bar on a terminal).

The tests (tests/test_retention.py) share :func:`publication` and :func:`fill`.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import ssl
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from imapclient import IMAPClient

from emailmw._progress import ProgressReporter
from emailmw.devserver import DevServer
from emailmw.options import Options
from emailmw.transport.codec import encode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients


def publication(
    topic: str, stamp_ns: int, gid: int, number: int, body: str = "", to: str = "a@b.test"
) -> bytes:
    """An emailmw publication on ``topic`` as a publisher writes it (emailmw's codec)."""
    headers = EmailHeaders()
    headers["Publisher-GID"] = str(gid)
    headers["Source-Timestamp"] = str(stamp_ns)
    headers["Publication-Number"] = str(number)
    return encode_email(
        EmailData(
            content=EmailContent(topic, body or f"message {number} of {gid}"),
            headers=headers,
            message_id=f"<{gid}.{number}.{stamp_ns}@bench.test>",
            from_="alice@bench.test",
            recipients=EmailRecipients(to=[to]),
        )
    )


def foreign(number: int, subject: str = "lunch?") -> bytes:
    """A plain email, not emailmw's."""
    return (
        f"From: carol@example.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <foreign.{number}@example.test>\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
        f"see you at noon ({number})\r\n"
    ).encode()


def imap_login(server: DevServer, account: str = "alice") -> IMAPClient:
    """An IMAPS connection of ``account``, logged in."""
    acct = server.account(account)
    context = ssl.create_default_context(cafile=str(server.ca_file))
    imap = IMAPClient(server.host, server.imaps_port, ssl=True, ssl_context=context)
    imap.login(acct.address, acct.password)
    return imap


def fill(
    server: DevServer, folder: str, raws: Iterable[bytes], account: str = "alice", chunk: int = 500
) -> int:
    """Put every email of ``raws`` into ``folder`` on one connection, ``chunk`` at a
    time with MULTIAPPEND (RFC 3502: one command, one mailbox sync per chunk);
    return how many, in order."""
    count = 0
    with imap_login(server, account) as imap:
        batch: list[bytes] = []
        for raw in raws:
            batch.append(raw)
            if len(batch) == chunk:
                imap.multiappend(folder, batch)
                count, batch = count + len(batch), []
        if batch:
            imap.multiappend(folder, batch)
            count += len(batch)
    return count


def _emails(n: int, topics: int, start_ns: int) -> Iterable[bytes]:
    for i in range(n):
        gid = 1000 + i % 3
        yield publication(f"/bench/{i % topics}", start_ns + i * 10_000_000, gid, i)


def _counted(raws: Iterable[bytes], total: int, progress: ProgressReporter) -> Iterator[bytes]:
    """``raws``, reporting every 500th (a MULTIAPPEND chunk) to ``progress``."""
    for done, raw in enumerate(raws, 1):
        yield raw
        if done % 500 == 0 or done == total:
            progress("fill", done, total)


def plot(pyplot: Any, path: str, seconds: dict[str, float], emails: int, topics: int) -> None:
    """The time of each step, fill included."""
    import _plot

    fig, (ax,) = _plot.figure(pyplot, 1, size=(8.0, 3.6))
    _plot.bars(ax, list(seconds), list(seconds.values()), unit="s", fmt="{:.2f}")
    ax.set_title(f"{emails:,} emailmw emails on {topics} topics, each step on a fresh session")
    _plot.save(pyplot, fig, path, "retention: prune, topics and history on a big folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=100_000, help="emailmw emails (100000)")
    parser.add_argument("--topics", type=int, default=10, help="topics (10)")
    parser.add_argument("--foreign", type=int, default=10, help="foreign emails (10)")
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
    progress = ProgressReporter(sys.stderr, "retention")
    seconds: dict[str, float] = {}

    from emailmw import commands

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with DevServer(accounts=("alice",)) as server:
        folder, _ = server.new_mailbox("alice", prefix="bench")
        options = Options.from_dict(server.config("alice", mailbox=folder, tls="implicit"))
        started = time.perf_counter()
        start_ns = time.time_ns() - args.emails * 10_000_000 - 3600 * 10**9
        emails = _emails(args.emails, args.topics, start_ns)
        filled = fill(server, folder, _counted(emails, args.emails, progress))
        filled += fill(server, folder, (foreign(i) for i in range(args.foreign)))
        fill_s = time.perf_counter() - started
        seconds[f"fill ({filled} emails)"] = fill_s
        print(f"fill: {filled} emails APPENDed in {fill_s:.1f} s ({filled / fill_s:.0f}/s)")

        def timed(label: str, run: object) -> str:
            out = io.StringIO()
            t0 = time.perf_counter()
            run(out)  # type: ignore[operator]
            seconds[label] = time.perf_counter() - t0
            print(f"{label:<36} {seconds[label]:8.2f} s")
            return out.getvalue()

        listing = timed("topics", lambda out: commands.run_topics(options, out))
        print(f"  ({len(listing.splitlines()) - 1} topics)")
        shown = timed(
            "history /bench/0 -n 100",
            lambda out: commands.run_history(options, "/bench/0", 100, out, progress=sys.stderr),
        )
        print(f"  ({len(shown.splitlines())} messages printed)")
        from emailmw.context import Context

        ctx = Context(options)
        report = timed(
            "prune --dry-run --older-than 0",
            lambda out: commands.run_prune(
                ctx, out, older_than=0, dry_run=True, progress=sys.stderr
            ),
        )
        print("  " + report.splitlines()[-1])
        report = timed(
            f"prune --older-than 0 ({args.emails} emails)",
            lambda out: commands.run_prune(ctx, out, older_than=0, progress=sys.stderr),
        )
        print("  " + report.splitlines()[-1])
        with imap_login(server) as imap:
            left = imap.select_folder(folder, readonly=True)[b"EXISTS"]
        print(f"  left in the folder: {left} (the {args.foreign} foreign emails)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if pyplot is not None:
        plot(pyplot, args.plot, seconds, args.emails, args.topics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
