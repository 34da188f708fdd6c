"""Federation benchmark: emailmw within one mail domain next to across one relay.

Starts its own :class:`emailmw.devserver.Federation` of two domains
(``a.test`` on 127.0.0.2 and ``b.test`` on 127.0.0.3: a Postfix + Dovecot
each, relaying to each other over SMTP with STARTTLS) and prints, from one
run, side by side:

* **latency** (p50/p90/p99/max): a ``Publisher`` on ``a.test`` publishes a
  paced stream (``--rate`` Hz, ``--messages`` messages) to a subscriber
  reading a folder of ``a.test`` (**one domain**: a.test's Postfix delivers it
  to a.test's Dovecot) and to one reading a folder of ``b.test`` (**one
  relay**: a.test's Postfix hands it over SMTP to b.test's Postfix, which
  delivers it). One stream per receive mode (``--modes``): ``poll-10ms``
  shows what the relay itself costs; ``auto`` (IDLE) is what a default
  subscriber sees on Dovecot (which reports new mail in IDLE after ~0.5 s).
* **throughput**: ``--burst`` messages published back to back to each path:
  how fast ``publish()`` returns (what a.test's Postfix accepts) and how fast
  they arrive end to end (first publish to last message in hand; also to the
  99th percent message).
* **store and forward**: ``b.test``'s Postfix stops; ``--outage-messages``
  are published to the relay path during an ``--outage-seconds`` outage
  (a.test's Postfix queues them; ``publish()`` durations, p50 and max); then
  it starts again: the time from ``start_smtp`` to the first and to the last
  message in the subscriber's hand, and whether all came in order.
  ``--outage-seconds 0`` skips it.

    python benchmarks/federation.py              # the table, about 2.5 minutes
    python benchmarks/federation.py --json       # the same results as JSON
    python benchmarks/federation.py --messages 50 --burst 200 --modes poll-10ms   # quick look
    python benchmarks/federation.py --plot federation.png   # also draw CDFs, bars, the outage

How it measures: every latency is from just before ``publish()`` to the
return of ``wait_for_message()`` in a subscriber thread of this process (the
publish time travels in the body; one ``time.monotonic_ns()`` clock). Each
stream has fresh folders; the publisher's own context reads an empty folder
in ``idle`` mode, so it adds no IMAP traffic. The stream is paced on an
absolute schedule (message ``i`` at ``start + i / rate``). A few messages go
through each path unmeasured first. The paths alternate (one domain, one
relay, per mode), so the load of a shared machine falls on both alike. Run as
root, with Debian's dovecot-imapd, dovecot-lmtpd and postfix. Which stream it
is at, and how many messages it published, goes to stderr (a bar on a
terminal): after each publish of a paced stream (its send time already stamped)
or of the outage (its duration already taken); a back-to-back burst reports
only its start and end. Nothing here asserts; the results go to
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import emailmw
from emailmw._progress import ProgressReporter
from emailmw.devserver import Federation

PATHS = {"one domain": "a.test", "one relay": "b.test"}  # where the subscriber reads
WARMUP = 5
STALL = 60.0  # seconds: the longest a receiver waits for one message

Tick = Callable[[int, int], None]  # (done, total) of the phase under way


def no_tick(done: int, total: int) -> None:
    """A phase that reports nowhere."""


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def parse_mode(mode: str) -> tuple[str, int]:
    """``auto`` / ``idle`` / ``poll-<N>ms`` -> (receive-mode, polling-period in ns)."""
    if mode in ("auto", "idle"):
        return mode, 10_000_000
    if mode.startswith("poll-") and mode.endswith("ms") and mode[5:-2].isdigit():
        return "poll", int(mode[5:-2]) * 1_000_000
    raise argparse.ArgumentTypeError(f"unknown mode {mode!r} (auto, idle, poll-<N>ms)")


@dataclass
class Stream:
    """One subscriber and one publisher, wired for one path and one receive mode."""

    pub: emailmw.Publisher[str]
    sub: emailmw.Subscription[str]
    contexts: tuple[emailmw.Context, emailmw.Context]


@contextmanager
def stream(fed: Federation, domain: str, mode: str, topic: str) -> Iterator[Stream]:
    """A subscriber on a fresh folder of bob at ``domain``, a publisher as alice at a.test."""
    receive_mode, period = parse_mode(mode)
    folder, address = fed.new_mailbox("bob", domain, prefix="bench")
    own, _ = fed.new_mailbox("alice", "a.test", prefix="benchpub")
    sub_config = fed.config(
        "bob", domain, mailbox=folder, receive_mode=receive_mode, polling_period_ns=period
    )
    pub_config = fed.config("alice", "a.test", mailbox=own, to=address, receive_mode="idle")
    sub_ctx = emailmw.Context(emailmw.Options.from_dict(sub_config)).init()
    pub_ctx = emailmw.Context(emailmw.Options.from_dict(pub_config)).init()
    try:
        sub = emailmw.Subscription(topic, context=sub_ctx, depth=100_000)
        pub = emailmw.Publisher(topic, context=pub_ctx)
        for i in range(WARMUP):
            pub.publish(f"warmup {i}")
        for _ in range(WARMUP):
            emailmw.wait_for_message(sub, STALL)
        yield Stream(pub, sub, (sub_ctx, pub_ctx))
    finally:
        pub_ctx.shutdown()
        sub_ctx.shutdown()


def collect(sub: emailmw.Subscription[str], n: int, out: list[tuple[int, int, int]]) -> None:
    """Receive ``n`` messages ``"seq sent_ns"``; append (seq, sent_ns, received_ns)."""
    for _ in range(n):
        message = emailmw.wait_for_message(sub, STALL)
        received = time.monotonic_ns()
        seq, sent = message.split()
        out.append((int(seq), int(sent), received))


def latency(
    fed: Federation, domain: str, mode: str, n: int, rate: float, tick: Tick = no_tick
) -> dict[str, Any]:
    """A paced stream of ``n`` messages; latency in ms. ``tick`` hears of each publish
    after it returned (the latency is stamped before it)."""
    with stream(fed, domain, mode, f"/bench/latency/{domain}/{mode}") as s:
        got: list[tuple[int, int, int]] = []
        receiver = threading.Thread(target=collect, args=(s.sub, n, got), name="bench-recv")
        receiver.start()
        start = time.monotonic()
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the pacing schedule
            s.pub.publish(f"{i} {time.monotonic_ns()}")
            tick(i + 1, n)
        receiver.join(STALL + n / rate)
        sub_stats = s.contexts[0].stats()
    ms = sorted((received - sent) / 1e6 for _, sent, received in got)
    return {
        "messages": n,
        "received": len(got),
        "in_order": [seq for seq, _, _ in got] == list(range(len(got))),
        "p50_ms": percentile(ms, 0.50),
        "p90_ms": percentile(ms, 0.90),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": ms[-1],
        "dropped": sum(sub_stats.dropped.values()),
        "latencies_ms": ms,
    }


def throughput(fed: Federation, domain: str, n: int) -> dict[str, Any]:
    """``n`` messages published back to back, end to end."""
    with stream(fed, domain, "poll-10ms", f"/bench/burst/{domain}") as s:
        got: list[tuple[int, int, int]] = []
        receiver = threading.Thread(target=collect, args=(s.sub, n, got), name="bench-recv")
        receiver.start()
        first = time.monotonic_ns()
        for i in range(n):
            s.pub.publish(f"{i} {time.monotonic_ns()}")
        published = time.monotonic_ns()
        receiver.join(STALL + n)
    arrivals = sorted(received for _, _, received in got)
    p99 = arrivals[max(0, int(0.99 * n) - 1)]
    return {
        "messages": n,
        "received": len(got),
        "in_order": [seq for seq, _, _ in got] == list(range(len(got))),
        "publish_per_s": n / ((published - first) / 1e9),
        "end_to_end_per_s": len(got) / ((arrivals[-1] - first) / 1e9),
        "end_to_end_99pct_per_s": int(0.99 * n) / ((p99 - first) / 1e9),
        "seconds": (arrivals[-1] - first) / 1e9,
    }


def store_and_forward(
    fed: Federation, n: int, outage: float, tick: Tick = no_tick
) -> dict[str, Any]:
    """``n`` messages published to b.test while its SMTP is down for ``outage`` s.
    ``tick`` hears of each publish after its duration was taken."""
    with stream(fed, "b.test", "poll-10ms", "/bench/outage") as s:
        got: list[tuple[int, int, int]] = []
        receiver = threading.Thread(target=collect, args=(s.sub, n, got), name="bench-recv")
        receiver.start()
        durations: list[float] = []
        fed.stop_smtp("b.test")
        down = time.monotonic()
        try:
            for i in range(n):
                started = time.monotonic()
                s.pub.publish(f"{i} {time.monotonic_ns()}")
                durations.append(time.monotonic() - started)
                tick(i + 1, n)
            queued = fed.queued("a.test")
            time.sleep(max(0.0, outage - (time.monotonic() - down)))  # the outage itself
        finally:
            up = time.monotonic_ns()
            fed.start_smtp("b.test")
        receiver.join(STALL + n)
    arrivals = sorted(received for _, _, received in got)
    durations.sort()
    return {
        "messages": n,
        "outage_s": outage,
        "received": len(got),
        "in_order": [seq for seq, _, _ in got] == list(range(len(got))),
        "queued_on_a_after_publishing": queued,
        "publish_p50_ms": percentile(durations, 0.5) * 1e3,
        "publish_max_ms": durations[-1] * 1e3,
        "first_after_up_s": (arrivals[0] - up) / 1e9 if arrivals else None,
        "last_after_up_s": (arrivals[-1] - up) / 1e9 if arrivals else None,
        # for the plot: when stop_smtp returned and (seq, published, in hand), in s from
        # start_smtp (so the first two are negative)
        "down_s": down - up / 1e9,
        "timeline": sorted(
            (seq, (sent - up) / 1e9, (got_ns - up) / 1e9) for seq, sent, got_ns in got
        ),
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    load = " ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    print(f"{m['cpus']} CPUs, {m['platform']}, Python {m['python']}, load {load}")
    print(f"federation started in {results['start_s']:.2f} s")
    print()
    print("latency (ms), publish on a.test -> subscriber")
    header = f"{'mode':<10} {'path':<11} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}  got"
    print(header)
    for row in results["latency"]:
        notes = ("" if row["in_order"] else " OUT OF ORDER") + (
            f" dropped {row['dropped']}" if row["dropped"] else ""
        )
        print(
            f"{row['mode']:<10} {row['path']:<11} {row['p50_ms']:8.1f} {row['p90_ms']:8.1f} "
            f"{row['p99_ms']:8.1f} {row['max_ms']:8.1f}  {row['received']}/{row['messages']}"
            f"{notes}"
        )
    print()
    print("throughput (msg/s), burst published back to back on a.test")
    print(f"{'path':<11} {'publish':>9} {'end to end':>11} {'to 99 %':>9} {'seconds':>8}  got")
    for row in results["throughput"]:
        print(
            f"{row['path']:<11} {row['publish_per_s']:9.0f} {row['end_to_end_per_s']:11.0f} "
            f"{row['end_to_end_99pct_per_s']:9.0f} {row['seconds']:8.2f}  "
            f"{row['received']}/{row['messages']}{'' if row['in_order'] else ' OUT OF ORDER'}"
        )
    row = results.get("store_and_forward")
    if row:
        print()
        print(
            f"store and forward: {row['messages']} messages published to b.test during a "
            f"{row['outage_s']:.0f} s outage of its SMTP"
        )
        print(
            f"  publish() p50 {row['publish_p50_ms']:.1f} ms, max {row['publish_max_ms']:.1f} ms; "
            f"queued on a.test: {row['queued_on_a_after_publishing']}"
        )
        print(
            f"  after start_smtp: first in hand {row['first_after_up_s']:.2f} s, last "
            f"{row['last_after_up_s']:.2f} s; got {row['received']}/{row['messages']}"
            f"{'' if row['in_order'] else ' OUT OF ORDER'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="messages per stream (200)")
    parser.add_argument("--rate", type=float, default=10.0, help="stream rate in Hz (10)")
    parser.add_argument("--burst", type=int, default=1000, help="throughput messages (1000)")
    parser.add_argument(
        "--modes", default="poll-10ms,auto", help="receive modes, comma-separated (poll-10ms,auto)"
    )
    parser.add_argument(
        "--outage-seconds",
        type=float,
        default=10.0,
        help="store-and-forward outage (10 s; 0: skip)",
    )
    parser.add_argument(
        "--outage-messages", type=int, default=100, help="published during the outage (100)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the results into PATH.png (needs emailmw[plot])",
    )
    args = parser.parse_args(argv)
    try:
        modes = [m for m in args.modes.split(",") if parse_mode(m)]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    pyplot = None
    if args.plot:
        import _plot

        pyplot = _plot.start(parser, args.plot)
    progress = ProgressReporter(sys.stderr, "federation")

    def phase(name: str) -> Tick:
        """Report the phase ``name`` as started; its ticks follow."""
        progress(name, 0, 1)
        return lambda done, total: progress(name, done, total)

    # "plot" stays out of the printed arguments: the JSON is the same without --plot
    settings = {key: value for key, value in vars(args).items() if key != "plot"}
    results: dict[str, Any] = {"machine": machine(), "args": settings}
    started = time.monotonic()
    progress("start", 0, 1)
    with Federation(domains=("a.test", "b.test"), accounts=("alice", "bob")) as fed:
        results["start_s"] = time.monotonic() - started
        progress("start", 1, 1)
        results["latency"] = []
        for mode in modes:
            for path, domain in PATHS.items():
                tick = phase(f"latency {mode} {path}")
                row = latency(fed, domain, mode, args.messages, args.rate, tick)
                results["latency"].append({"mode": mode, "path": path, **row})
        results["throughput"] = []
        for path, domain in PATHS.items():
            tick = phase(f"burst {path}")  # no ticks inside: publish() is timed back to back
            results["throughput"].append({"path": path, **throughput(fed, domain, args.burst)})
            tick(1, 1)
        if args.outage_seconds > 0:
            results["store_and_forward"] = store_and_forward(
                fed, args.outage_messages, args.outage_seconds, phase("store and forward")
            )
    progress.close()
    drawn = split_plot_only(results)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print_report(results)
    if pyplot is not None:
        plot(pyplot, args.plot, results, drawn)
    return 0


def split_plot_only(results: dict[str, Any]) -> dict[str, Any]:
    """Take what only ``--plot`` draws out of ``results`` (never printed: the table and
    the JSON are the same with and without ``--plot``) and return it: the latency
    samples by (mode, path), the store-and-forward timeline and when the outage began."""
    drawn: dict[str, Any] = {
        "latencies_ms": {
            (row["mode"], row["path"]): row.pop("latencies_ms") for row in results["latency"]
        }
    }
    outage = results.get("store_and_forward")
    if outage is not None:
        drawn["timeline"] = outage.pop("timeline")
        drawn["down_s"] = outage.pop("down_s")
    return drawn


# -- plot -----------------------------------------------------------------------------------


def plot(pyplot: Any, path: str, results: dict[str, Any], drawn: dict[str, Any]) -> None:
    """Draw the results: per receive mode, the latency CDFs of one domain and one relay;
    the throughput of both side by side; the store-and-forward timeline."""
    import _plot

    args = results["args"]
    modes = list(dict.fromkeys(row["mode"] for row in results["latency"]))
    outage = results.get("store_and_forward")
    fig, axes = _plot.figure(pyplot, len(modes) + 1 + (outage is not None), size=(5.5, 3.4))
    for mode, ax in zip(modes, axes, strict=False):
        for index, path_name in enumerate(PATHS):
            row = next(r for r in results["latency"] if (r["mode"], r["path"]) == (mode, path_name))
            _plot.cdf(
                ax,
                drawn["latencies_ms"][(mode, path_name)],
                f"{path_name}: p50 {row['p50_ms']:.1f}, p99 {row['p99_ms']:.1f} ms "
                f"({row['received']}/{row['messages']})",
                color=f"C{index}",
            )
        _plot.log_scale(ax)
        ax.set_xlabel("latency, publish() on a.test -> message in hand (ms)")
        ax.set_title(f"{mode}: {args['messages']} messages at {args['rate']:g} Hz")
        ax.legend(loc="lower right")
    tput = axes[len(modes)]
    rows = results["throughput"]
    _plot.grouped_bars(
        tput,
        [row["path"] for row in rows],
        {
            "publish()": [row["publish_per_s"] for row in rows],
            "end to end": [row["end_to_end_per_s"] for row in rows],
            "to 99 %": [row["end_to_end_99pct_per_s"] for row in rows],
        },
        unit="msg/s",
        fmt="{:.0f}",
    )
    tput.set_title(f"throughput, {args['burst']} messages back to back on a.test")
    if outage is not None:
        draw_outage(axes[-1], outage, drawn["timeline"], drawn["down_s"])
    _plot.save(pyplot, fig, path, "federation: one mail domain next to one relay")


def draw_outage(
    ax: Any, row: dict[str, Any], timeline: list[tuple[int, float, float]], down_s: float
) -> None:
    """Store and forward: each message's publish() (during the outage: from ``down_s``
    to 0) and its arrival in the subscriber's hand, in seconds from b.test's start_smtp."""
    seqs = [seq for seq, _, _ in timeline]
    ax.axvspan(down_s, 0.0, color="C3", alpha=0.12, label="b.test's SMTP down")
    ax.scatter([sent for _, sent, _ in timeline], seqs, s=8, color="C0", label="publish()")
    ax.scatter([got for _, _, got in timeline], seqs, s=8, color="C2", label="in hand")
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.set_xlabel("seconds from start_smtp on b.test")
    ax.set_ylabel("message number")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    first, last = row["first_after_up_s"], row["last_after_up_s"]
    came = "" if first is None else f", {first:.2f} to {last:.2f} s after the start"
    ax.set_title(
        f"store and forward: {row['messages']} published in a {row['outage_s']:g} s outage;"
        f"\n{row['received']} in hand{came}"
    )


if __name__ == "__main__":
    sys.exit(main())
