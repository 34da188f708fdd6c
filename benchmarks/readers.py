"""Many readers: K subscriber processes on one mailbox of the dev server.

Starts its own local mail stack (:class:`emailmw.devserver.DevServer`, with
``max_user_connections`` raised above the largest K: Dovecot counts every
reader's IMAP connection against one user) and, for each K of ``--readers``
(default 1, 4, 16, 64):

* starts K subscriber processes (``multiprocessing``, spawn), each with its own
  ``Context`` reading one folder of ``alice`` in ``--mode`` (default ``auto``)
  and a ``Subscription`` on the topic;
* publishes ``--messages`` messages (default 100) at ``--rate`` Hz (default 5)
  from this process (a context of ``bob``'s, so that every IMAP connection of
  ``alice`` is a reader's), each carrying its send time;
* prints the latency (send → in a reader's hand, over every message and
  reader: p50, p90, p99, max), messages lost, IMAP commands per second (the
  readers' own counts, ``ImapEmailReceiver.commands_sent``, summed), the CPU
  of each reader (``getrusage`` in its process: mean and max, % of one core),
  and the CPU of Dovecot's ``imap`` processes that serve the readers (their
  pids from ``doveadm who``; CPU time from ``/proc/<pid>/schedstat``, else
  ``utime`` + ``stime`` of ``/proc/<pid>/stat``, sampled when the stream starts
  and when the last reader has its last message; their sum, % of one core), and
  the connect time (all K readers up).

    python benchmarks/readers.py                      # K = 1, 4, 16, 64: about 3 minutes
    python benchmarks/readers.py --readers 1,8 --messages 30 --json
    python benchmarks/readers.py --plot readers.png   # also draw latency and CPU against K

Latencies use ``time.monotonic_ns()`` in both processes (one clock per machine
on Linux). How many readers are up, and how many messages went out, goes to
stderr (a bar on a terminal): after each reader answered, and after each publish
in the pacing's slack (its send time already stamped). Nothing here asserts;
the numbers go to docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import emailmw
from emailmw._progress import ProgressReporter
from emailmw.devserver import DevServer

TOPIC = "/readers"
READERS = "1,4,16,64"
STALL = 30.0  # a reader gives up after this long without a new message
CHILD_TIMEOUT = 180.0  # start-up of 64 processes on a busy two-core machine
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``; 0 if it is gone.

    ``/proc/<pid>/schedstat`` (its first field: nanoseconds on a CPU, exact)
    where the kernel has it, else ``utime + stime`` from ``/proc/<pid>/stat``,
    which counts in clock ticks (10 ms) and misses much of a process that runs
    in bursts of microseconds, as an IMAP server process answering NOOPs does.
    """
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as fh:
            return int(fh.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # after "pid (comm)": state is field 3, utime 14 and stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / _TICKS


def percentile(values: list[float], fraction: float) -> float:
    index = min(len(values) - 1, max(0, round(fraction * len(values)) - 1))
    return values[index]


def reader(conn: Connection, config: dict[str, Any], n: int) -> None:
    """One subscriber process: ready → go → ``n`` messages → its numbers."""
    try:
        with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
            sub = emailmw.Subscription(TOPIC, depth=max(n, 1000), context=ctx)
            receiver: Any = ctx._receiver
            conn.send(("ready", None))
            conn.recv()  # "go"
            cpu0, wall0, commands0 = cpu_seconds(), time.monotonic(), receiver.commands_sent
            latencies: list[float] = []
            last_ns = 0
            while len(latencies) < n:
                try:
                    message = emailmw.wait_for_message(sub, timeout=STALL)
                except emailmw.WaitTimeoutError:
                    break
                last_ns = time.monotonic_ns()
                latencies.append((last_ns - int(message.split()[1])) / 1e6)
            wall = (last_ns / 1e9 if latencies else time.monotonic()) - wall0
            conn.send(
                (
                    "done",
                    {
                        "latencies_ms": latencies,
                        "cpu_s": cpu_seconds() - cpu0,
                        "wall_s": wall,
                        "commands": receiver.commands_sent - commands0,
                        "last_ns": last_ns,
                    },
                )
            )
            conn.recv()  # "stop": stay logged in until the parent has read Dovecot's CPU
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


class Child:
    """A reader process driven over a pipe."""

    _mp = multiprocessing.get_context("spawn")

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.conn, child_conn = self._mp.Pipe()
        self.process = self._mp.Process(target=target, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()

    def answer(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"reader process gave no answer within {timeout:g} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"reader process failed: {value}")
        return value

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


def no_progress(phase: str, done: int, total: int) -> None:
    """Progress reported nowhere."""


def run(
    server: DevServer,
    k: int,
    n: int,
    rate: float,
    mode: str,
    progress: Callable[[str, int, int], None] = no_progress,
) -> dict[str, Any]:
    """K readers on one fresh folder, ``n`` messages at ``rate`` Hz. ``progress`` hears
    of each reader that is up and of each message published, outside the timed parts."""
    folder, address = server.new_mailbox("alice", prefix="readers")
    config = server.config("alice", mailbox=folder, to=address, receive_mode=mode)
    quiet, _ = server.new_mailbox("bob", prefix="quiet")
    pub_config = server.config("bob", mailbox=quiet, to=address, receive_mode="idle")
    before = server.imap_connections("alice")
    connecting, streaming = partial(progress, f"connect K={k}"), partial(progress, f"stream K={k}")
    connecting(0, k)
    started = time.monotonic()
    kids = [Child(reader, config, n) for _ in range(k)]
    try:
        for up, kid in enumerate(kids, 1):
            kid.answer(CHILD_TIMEOUT)
            answered = time.monotonic()  # the others start meanwhile: report, then wait on
            connecting(up, k)
        connect_s = answered - started
        imap_pids = sorted(server.imap_connections("alice") - before)
        with emailmw.Context(emailmw.Options.from_dict(pub_config)) as ctx:
            pub = emailmw.Publisher(TOPIC, context=ctx)
            dovecot0 = {pid: process_cpu_seconds(pid) for pid in imap_pids}
            streaming(0, n)
            for kid in kids:
                kid.conn.send("go")
            start = time.monotonic()
            for i in range(n):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pub.publish(f"{i} {time.monotonic_ns()}")
                streaming(i + 1, n)  # after the send time was stamped
            results = [kid.answer(STALL + CHILD_TIMEOUT) for kid in kids]
            end = max((r["last_ns"] for r in results if r["last_ns"]), default=0) / 1e9
            wall = (end or time.monotonic()) - start
            dovecot_cpu = sum(process_cpu_seconds(p) - dovecot0[p] for p in imap_pids)
            for kid in kids:
                kid.conn.send("stop")
    finally:
        for kid in kids:
            kid.kill()
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    cpu = [100.0 * r["cpu_s"] / r["wall_s"] for r in results if r["wall_s"] > 0]
    out: dict[str, Any] = {
        "readers": k,
        "messages": n,
        "lost": k * n - len(latencies),
        "connect_s": connect_s,
        "imap_commands_per_s": sum(r["commands"] for r in results) / wall,
        "reader_cpu_mean_percent": statistics.fmean(cpu) if cpu else 0.0,
        "reader_cpu_max_percent": max(cpu, default=0.0),
        "dovecot_imap_processes": len(imap_pids),
        "dovecot_imap_cpu_percent": 100.0 * dovecot_cpu / wall,
    }
    if latencies:
        out.update(
            p50_ms=percentile(latencies, 0.5),
            p90_ms=percentile(latencies, 0.9),
            p99_ms=percentile(latencies, 0.99),
            max_ms=latencies[-1],
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", default=READERS, help=f"values of K ({READERS})")
    parser.add_argument("--messages", type=int, default=100, help="messages per K (100)")
    parser.add_argument("--rate", type=float, default=5.0, help="stream rate in Hz (5)")
    parser.add_argument("--mode", default="auto", help="the readers' receive-mode (auto)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the results into PATH.png (needs emailmw[plot])",
    )
    args = parser.parse_args(argv)
    try:
        ks = [int(k) for k in args.readers.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--readers: comma-separated counts, not {args.readers!r}")
    if not ks or min(ks) < 1 or args.messages < 1 or args.rate <= 0:
        parser.error("--readers, --messages and --rate must be positive")
    if args.mode not in ("auto", "idle", "poll"):
        parser.error("--mode: auto, idle or poll")
    pyplot = None
    if args.plot:
        import _plot

        pyplot = _plot.start(parser, args.plot)
    progress = ProgressReporter(sys.stderr, "readers")
    started = time.monotonic()
    load_at_start = os.getloadavg()
    rows = []
    # Dovecot counts each reader's connection against alice: allow them all.
    with DevServer(accounts=("alice", "bob"), max_user_connections=max(ks) + 16) as server:
        for k in ks:
            rows.append(run(server, k, args.messages, args.rate, args.mode, progress))
    progress.close()
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "elapsed_s": time.monotonic() - started,
    }
    if args.json:
        json.dump({"machine": machine, "mode": args.mode, "rows": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(machine, rows, args)
    if pyplot is not None:
        plot(pyplot, args.plot, machine, rows, args)
    return 0


def print_table(machine: dict[str, Any], rows: list[dict[str, Any]], args: Any) -> None:
    """The table of ``rows`` (one per K), under a line on the machine and the stream."""
    out = sys.stdout
    out.write(
        f"machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}; "
        f"load average {machine['load_average_at_start'][0]:.1f} at start, "
        f"{machine['load_average_at_end'][0]:.1f} at end\n"
        f"{args.messages} messages at {args.rate:g} Hz, receive-mode {args.mode}\n\n"
    )
    header = (
        "| readers | p50 ms | p90 ms | p99 ms | max ms | lost | IMAP cmd/s | reader CPU % "
        "mean / max | Dovecot imap CPU % (sum) | all connected in |\n"
    )
    out.write(header + "|" + "---|" * 10 + "\n")
    for r in rows:
        out.write(
            f"| {r['readers']} | {r.get('p50_ms', float('nan')):.1f} "
            f"| {r.get('p90_ms', float('nan')):.1f} | {r.get('p99_ms', float('nan')):.1f} "
            f"| {r.get('max_ms', float('nan')):.1f} | {r['lost']} "
            f"| {r['imap_commands_per_s']:.1f} "
            f"| {r['reader_cpu_mean_percent']:.2f} / {r['reader_cpu_max_percent']:.2f} "
            f"| {r['dovecot_imap_cpu_percent']:.2f} ({r['dovecot_imap_processes']} processes) "
            f"| {r['connect_s']:.1f} s |\n"
        )
    out.write(f"\n(run took {machine['elapsed_s']:.0f} s)\n")


# -- plot -----------------------------------------------------------------------------------


def plot(
    pyplot: Any, path: str, machine: dict[str, Any], rows: list[dict[str, Any]], args: Any
) -> None:
    """Against K: the latency p50 / p90 / p99 (over every message and reader), and the
    CPU of Dovecot's imap processes (their sum) next to that of one reader (mean)."""
    import _plot
    from matplotlib import ticker

    ks = [row["readers"] for row in rows]
    fig, (latency, cpu) = _plot.figure(pyplot, 2, size=(5.5, 3.4))
    for key, name in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99")):
        got = [(row["readers"], row[key]) for row in rows if key in row]
        latency.plot([k for k, _ in got], [v for _, v in got], marker="o", label=name)
    for row in rows:
        if row["lost"]:
            latency.annotate(f"{row['lost']} lost", (row["readers"], row.get("p99_ms", 1.0)))
    _plot.log_scale(latency, "y")
    # labels at 1, 2 and 5 of each decade: a few K may span less than one decade
    latency.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    latency.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:g}"))
    latency.set_ylabel("latency, publish() -> in a reader's hand (ms)")
    latency.set_title(
        f"{args.messages} messages at {args.rate:g} Hz, receive-mode {args.mode}, every reader"
    )
    latency.legend(loc="best")
    cpu.plot(
        ks,
        [row["dovecot_imap_cpu_percent"] for row in rows],
        marker="o",
        label="Dovecot imap processes (sum)",
    )
    cpu.plot(
        ks, [row["reader_cpu_mean_percent"] for row in rows], marker="s", label="one reader (mean)"
    )
    cpu.set_ylabel("CPU, % of one core")
    cpu.set_ylim(bottom=0)
    cpu.set_title("CPU while the stream ran")
    cpu.legend(loc="best")
    load = machine["load_average_at_start"][0], machine["load_average_at_end"][0]
    for ax in (latency, cpu):
        _plot.log_scale(ax, "x")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K, reader processes on one mailbox")
        ax.grid(True, which="major", alpha=0.3)
    _plot.save(
        pyplot,
        fig,
        path,
        f"readers: K subscriber processes on one mailbox "
        f"(load average {load[0]:.1f} at start, {load[1]:.1f} at end)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
